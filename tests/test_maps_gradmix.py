"""GradMix baseline (spec 6a pixels): same labels as balancing, changes confined to the swaps."""

from __future__ import annotations

import numpy as np
import pytest

from diffmix.data.sample import NucleiSample
from diffmix.maps.balance import BalanceParams, balance_dataset, balance_plan
from diffmix.maps.gradmix import gradmix_dataset, mean_nuclear_colour, ring_weights, synthesise_swap

from test_maps_balance import ellipse_dataset


def textured(samples: list[NucleiSample], seed: int = 0) -> list[NucleiSample]:
    """H&E-ish images: dark noisy nuclei on a light noisy background."""
    rng = np.random.default_rng(seed)
    out = []
    for s in samples:
        h, w = s.shape
        fg = rng.integers(40, 120, size=(h, w, 3))
        bg = rng.integers(170, 250, size=(h, w, 3))
        out.append(s.replace(image=np.where(s.inst_map[..., None] > 0, fg, bg).astype(np.uint8)))
    return out


@pytest.fixture(scope="module")
def data():
    return textured(ellipse_dataset(seed=1))


def swap_union(shape, swaps) -> np.ndarray:
    union = np.zeros(shape, bool)
    for sw in swaps:
        for (r, c), m in ((sw.dilated_origin, sw.dilated_mask), (sw.paste_origin, sw.paste_mask)):
            union[r : r + m.shape[0], c : c + m.shape[1]] |= m
    return union


def test_labels_equal_balancing_and_pixels_change_only_inside_swaps(data):
    mixed, report = gradmix_dataset(data, BalanceParams(minor_class=1, seed=3))
    labels, report_b = balance_dataset(data, BalanceParams(minor_class=1, seed=3))
    assert report.accepted_swaps == report_b.accepted_swaps > 0
    _, plans, _ = balance_plan(data, BalanceParams(minor_class=1, seed=3))
    changed_total = 0
    for orig, g, b, swaps in zip(data, mixed, labels, plans):
        assert np.array_equal(g.inst_map, b.inst_map) and np.array_equal(g.type_map, b.type_map)
        changed = np.any(g.image != orig.image, axis=-1)
        assert not np.any(changed & ~swap_union(orig.shape, swaps))
        changed_total += int(changed.sum())
    assert changed_total > 0
    assert report.params["inpaint"] is True and report.params["double_blend"] is True


def test_same_seed_same_bytes_and_options_matter(data):
    a, _ = gradmix_dataset(data, BalanceParams(minor_class=1, seed=5))
    b, _ = gradmix_dataset(data, BalanceParams(minor_class=1, seed=5))
    assert all(x.image.tobytes() == y.image.tobytes() for x, y in zip(a, b))
    single, _ = gradmix_dataset(data, BalanceParams(minor_class=1, seed=5), double_blend=False)
    raw, _ = gradmix_dataset(data, BalanceParams(minor_class=1, seed=5), inpaint=False)
    assert any(x.image.tobytes() != y.image.tobytes() for x, y in zip(a, single))
    assert any(x.image.tobytes() != y.image.tobytes() for x, y in zip(a, raw))


def test_ring_weights_hand_computed():
    paste = np.zeros((7, 7), bool)
    paste[3, 3] = True
    union = np.zeros((7, 7), bool)
    union[1:6, 1:6] = True  # chessboard distances 1 (inner ring) and 2 (outer ring)
    w = ring_weights(paste, union)
    assert w[3, 3] == 1.0
    assert np.all(w[2:5, 2:5][np.ones((3, 3), bool) & ~paste[2:5, 2:5]] == 1.0)  # d=1: 1 - 0/1
    outer = union & ~np.pad(np.ones((3, 3), bool), 2)
    assert np.all(w[outer] == 0.0)  # d=2: 1 - 1/1
    assert np.all(w[~union] == 0.0)
    # official 0/0: every ring pixel at d = 1 -> weight 1, not NaN
    union2 = np.zeros((7, 7), bool)
    union2[2:5, 2:5] = True
    w2 = ring_weights(paste, union2)
    assert np.all(np.isfinite(w2)) and np.all(w2[union2] == 1.0)
    # empty ring: only the pasted nucleus has weight
    assert np.array_equal(ring_weights(paste, paste), paste.astype(np.float32))
    # three distances: 1, 2, 3 -> 1, 0.5, 0
    union3 = np.zeros((7, 7), bool)
    union3[3, :] = True
    w3 = ring_weights(paste, union3)
    assert np.allclose(w3[3], [0.0, 0.5, 1.0, 1.0, 1.0, 0.5, 0.0])


def test_mean_nuclear_colour_counts_only_nonzero_values():
    image = np.zeros((2, 3, 3), np.uint8)
    image[0, 0] = (10, 0, 30)
    image[0, 1] = (20, 0, 0)
    image[1, 2] = (99, 99, 99)  # background, ignored
    inst = np.array([[1, 1, 0], [0, 0, 0]])
    assert np.allclose(mean_nuclear_colour(image, inst), [15.0, 0.0, 30.0])
    assert np.allclose(mean_nuclear_colour(image, np.zeros((2, 3), int)), [0.0, 0.0, 0.0])


def test_hand_built_swap_pastes_source_pixels_and_clips_windows():
    # target image: one 10x10 class-2 nucleus; source image: a 3x3 minor nucleus 2 px from its
    # top edge, so the 14-row source window (dilated bbox height) runs off the source image
    inst_t = np.zeros((60, 60), np.int32)
    inst_t[25:35, 25:35] = 1
    types_t = inst_t * 2
    img_t = np.full((60, 60, 3), 200, np.uint8)
    img_t[inst_t > 0] = (60, 40, 100)
    inst_s = np.zeros((60, 60), np.int32)
    inst_s[1:4, 30:33] = 9
    types_s = (inst_s > 0).astype(np.int32)
    img_s = np.full((60, 60, 3), 180, np.uint8)
    img_s[inst_s > 0] = (20, 20, 20)
    samples = [NucleiSample(img_t, inst_t, types_t, "t", 4), NucleiSample(img_s, inst_s, types_s, "s", 4)]
    out, report = gradmix_dataset(samples, BalanceParams(minor_class=1, fraction=1.0, seed=0, border=0))
    assert report.accepted_swaps == 1
    g = out[0]
    # Geometry, hand-computed. Dilated bbox rows/cols 23..36 (h1 = w1 = 14). Source window
    # centred at the source centroid (2, 31): rows -5..8 (clipped at 0), cols 24..37, so the
    # source nucleus (rows 1..3, cols 30..32) lands on C rows/cols 29..31. The label S (3x3)
    # is centred at round(29.5) = 30 the official way: rows/cols floor(30 - 1.5) = 28..30.
    # The official paste of odd-sized masks sits half a pixel up-left of the window centre, so
    # S and the harmonised source pixels overlap on rows/cols 29..30 only.
    assert np.array_equal(np.argwhere(g.inst_map == 1).min(0), [28, 28])
    assert (g.inst_map == 1).sum() == 9
    harmonised = np.floor((20 + np.array([60.0, 40.0, 100.0])) / 2).astype(np.uint8)  # (40, 30, 60)
    assert np.array_equal(g.image[29:31, 29:31].reshape(-1, 3), np.tile(harmonised, (4, 1)))
    # the rest of S shows the source window's background (180), not the old target (60, 40, 100)
    assert np.all(g.image[28, 28:31] == 180) and np.all(g.image[28:31, 28] == 180)
    _, plans, _ = balance_plan(samples, BalanceParams(minor_class=1, fraction=1.0, seed=0, border=0))
    changed = np.any(g.image != img_t, axis=-1)
    assert not np.any(changed & ~swap_union((60, 60), plans[0]))
    # synthesising in place on a copy gives the same image
    frame = img_t.copy()
    synthesise_swap(frame, img_t, plans[0][0], img_s, inst_s, mean_nuclear_colour(img_t, inst_t))
    assert np.array_equal(frame, g.image)


def test_real_patches(shared_data):
    from diffmix.data.io import read_dataset

    ds = read_dataset(shared_data / "real_he_labeled", "consep")
    out, report = gradmix_dataset(ds.samples, BalanceParams(minor_class=1, seed=0, border=20))
    _, plans, _ = balance_plan(ds.samples, BalanceParams(minor_class=1, seed=0, border=20))
    assert report.accepted_swaps > 0
    for a, b, swaps in zip(ds.samples, out, plans):
        changed = np.any(a.image != b.image, axis=-1)
        assert not np.any(changed & ~swap_union(a.shape, swaps))
