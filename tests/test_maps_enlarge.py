"""Enlarging maps (spec 6b): frozen frame, exact translations, shift statistics, no-overlap mode."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from diffmix.data.sample import NucleiSample, instance_classes
from diffmix.errors import ConfigError
from diffmix.maps.enlarge import _place_faithful, enlarge_dataset, enlarge_patch


def blob_patch(seed: int, size: int = 256, n: int = 70, touching: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Random rectangles/discs (sizes 2-12 px) with classes 1..4; ids deliberately non-contiguous."""
    rng = np.random.default_rng(seed)
    inst = np.zeros((size, size), np.int32)
    types = np.zeros((size, size), np.int32)
    yy, xx = np.mgrid[0:size, 0:size]
    for k in range(n):
        cy, cx = rng.integers(0, size, size=2)
        r = rng.uniform(1.0, 6.0)
        m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        free = m & (inst == 0)
        if not touching:
            free &= ~ndi.binary_dilation(inst > 0, iterations=2)
        if free.sum() < 3:
            continue
        inst[free] = 3 * k + 5
        types[free] = rng.integers(1, 5)
    return inst, types


def touching_pairs(inst: np.ndarray) -> set[tuple[int, int]]:
    """Unordered pairs of different ids that are 8-neighbours somewhere."""
    pairs = set()
    h, w = inst.shape
    for dy, dx in [(0, 1), (1, 0), (1, 1), (1, -1)]:
        a = inst[0 : h - dy, max(0, -dx) : w - max(0, dx)]
        b = inst[dy:h, max(0, dx) : w - max(0, -dx)]
        m = (a != b) & (a > 0) & (b > 0)
        for p, q in zip(a[m].tolist(), b[m].tolist()):
            pairs.add((min(p, q), max(p, q)))
    return pairs


def remapped(inst: np.ndarray) -> np.ndarray:
    """Ids renumbered 1..N in order (the input always has background 0 here)."""
    return np.searchsorted(np.unique(inst), inst).astype(np.int32)


def test_touching_pairs_helper():
    inst = np.zeros((5, 5), np.int32)
    inst[0, 0], inst[1, 1], inst[3, 3], inst[3, 4] = 1, 2, 3, 4
    assert touching_pairs(inst) == {(1, 2), (3, 4)}
    inst2 = np.zeros((5, 5), np.int32)
    inst2[0, 1], inst2[1, 0] = 5, 6  # anti-diagonal neighbours
    assert touching_pairs(inst2) == {(5, 6)}


def test_frozen_unchanged_movers_translated_exactly():
    inst, types = blob_patch(0)
    out, out_types, info = enlarge_patch(inst, types, rng=np.random.default_rng(1))
    base = remapped(inst)
    cls = {i: next(iter(c)) for i, c in instance_classes(base, types).items()}
    frozen = set(info["frozen"])
    movers = set(info["shifts"])
    assert frozen and movers and frozen.isdisjoint(movers)
    assert frozen | movers == set(np.unique(base)) - {0}
    # frozen: exactly the nuclei with a pixel in the 32-px frame
    frame = np.ones((256, 256), bool)
    frame[32:224, 32:224] = False
    assert frozen == set(np.unique(base[frame])) - {0}
    id_map = info["id_map"]
    mover_px = np.zeros(out.shape, bool)
    for i, (dy, dx) in info["shifts"].items():
        assert -15 <= dy <= 14 and -15 <= dx <= 14
        ys, xs = np.nonzero(base == i)
        mover_px[ys + dy, xs + dx] = True
    for i in frozen:
        # a frozen nucleus never moves; it loses exactly the pixels a mover lands on
        ours = out == id_map.get(i, -1)
        assert np.array_equal(ours, (base == i) & ~mover_px)
    for i, (dy, dx) in info["shifts"].items():
        ys, xs = np.nonzero(base == i)
        moved = out[ys + dy, xs + dx]
        # a mover keeps its full shape unless a later (larger-id) mover lands on it
        later = moved != id_map.get(i, -1)
        assert np.all(moved[later] > id_map.get(i, 0))
    # classes: one per instance and the nucleus's own class
    for old, new in id_map.items():
        assert set(np.unique(out_types[out == new]).tolist()) == {cls[old]}
    # ids remapped 1..N
    assert np.array_equal(np.unique(out), np.arange(out.max() + 1))


def test_later_movers_overwrite_earlier_and_frozen():
    inst = np.zeros((12, 12), np.int32)
    inst[1:3, 1:3] = 1  # frozen (frame 4 below)
    inst[5:7, 5:7] = 2
    inst[5:7, 8:10] = 3
    frozen = np.array([True, False, False])
    out = _place_faithful(inst, frozen, np.array([[-3, -3], [0, -2]]))
    expected = np.zeros((12, 12), np.int32)
    expected[1:3, 1:3] = 1
    expected[2:4, 2:4] = 2  # covers the frozen nucleus's pixel (2, 2)
    expected[5:7, 6:8] = 3
    assert np.array_equal(out, expected)
    # both movers land on columns 6..7: id 3 is written after id 2 and wins every pixel
    out = _place_faithful(inst, frozen, np.array([[0, 1], [0, -2]]))
    expected = np.zeros((12, 12), np.int32)
    expected[1:3, 1:3] = 1
    expected[5:7, 6:8] = 3
    assert np.array_equal(out, expected)


def test_nonzero_shift_fraction_over_10k_movers():
    # single-pixel nuclei every 3 px: about 18k movable nuclei in one 600-px map
    size = 600
    inst = np.zeros((size, size), np.int32)
    grid = np.arange(1, size, 3)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    inst[yy, xx] = np.arange(1, yy.size + 1).reshape(yy.shape)
    types = (inst > 0).astype(np.int32)
    _, _, info = enlarge_patch(inst, types, rng=np.random.default_rng(2024))
    shifts = np.array(list(info["shifts"].values()))
    assert len(shifts) >= 10_000
    moved = np.any(shifts != 0, axis=1).mean()
    expected = 1 - (1 - 0.3 * 29 / 30) ** 2
    assert expected == pytest.approx(0.4959, abs=1e-4)
    assert abs(moved - expected) < 0.01
    assert shifts.min() == -15 and shifts.max() == 14
    # 42 % move along one axis and 9 % along both (spec 6b)
    both = np.all(shifts != 0, axis=1).mean()
    assert abs(both - (0.3 * 29 / 30) ** 2) < 0.01


def test_no_overlap_creates_no_new_touching_pairs():
    for seed in range(3):
        inst, types = blob_patch(seed, n=120, touching=True)
        base = remapped(inst)
        out, out_types, info = enlarge_patch(inst, types, rng=np.random.default_rng(seed), no_overlap=True)
        inv = {new: old for old, new in info["id_map"].items()}
        assert len(inv) == len(np.unique(base)) - 1  # nobody vanishes
        before = touching_pairs(base)
        after = {tuple(sorted((inv[a], inv[b]))) for a, b in touching_pairs(out)}
        assert after <= before
        # every nucleus keeps its exact shape, translated by its shift; frozen ones stay
        for old, new in info["id_map"].items():
            dy, dx = info["shifts"].get(old, (0, 0))
            ys, xs = np.nonzero(base == old)
            assert np.array_equal(np.sort((ys + dy) * 256 + xs + dx), np.sort(np.flatnonzero(out == new)))
        assert any(s != (0, 0) for s in info["shifts"].values())


def test_same_rng_same_maps_and_bad_settings():
    inst, types = blob_patch(3)
    a = enlarge_patch(inst, types, rng=np.random.default_rng(9))
    b = enlarge_patch(inst, types, rng=np.random.default_rng(9))
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    with pytest.raises(ConfigError, match="shift range"):
        enlarge_patch(inst, types, rng=np.random.default_rng(0), shift_range=(3, -3))
    with pytest.raises(ConfigError, match="keep probability"):
        enlarge_patch(inst, types, rng=np.random.default_rng(0), keep_prob=1.5)


def test_enlarge_dataset_grid_names_images_and_determinism():
    rng = np.random.default_rng(0)
    inst, types = blob_patch(5, size=180, n=60)
    image = rng.integers(0, 256, size=(180, 180, 3), dtype=np.uint8)
    sample = NucleiSample(image, inst, types, "tile", 4)
    out = enlarge_dataset([sample], patch=128, stride=26, seed=4)
    # offsets {0, 26, 52} on both axes: 9 patches, row-major
    assert [s.name for s in out] == [f"tile_{i:03d}" for i in range(9)]
    assert np.array_equal(out[4].image, image[26:154, 26:154])
    assert all(s.num_classes == 4 for s in out)
    again = enlarge_dataset([sample], patch=128, stride=26, seed=4)
    assert all(x.inst_map.tobytes() == y.inst_map.tobytes() for x, y in zip(out, again))
    other = enlarge_dataset([sample], patch=128, stride=26, seed=5)
    assert any(x.inst_map.tobytes() != y.inst_map.tobytes() for x, y in zip(out, other))
    # each patch equals enlarge_patch on the crop with its own (seed, image, patch) stream
    ref, _, _ = enlarge_patch(inst[52:180, 26:154], types[52:180, 26:154], rng=np.random.default_rng([4, 0, 7]))
    assert np.array_equal(out[7].inst_map, ref)


def test_real_patches(shared_data):
    from diffmix.data.io import read_dataset

    ds = read_dataset(shared_data / "real_he_labeled", "consep")
    out = enlarge_dataset(ds.samples, seed=0)
    assert [s.name for s in out] == [f"{s.name}_000" for s in ds.samples]
    for a, b in zip(ds.samples, out):
        assert np.array_equal(a.image, b.image)
        # faithful mode keeps every frozen nucleus and moves shapes exactly: the foreground
        # area can only shrink where movers overlap
        assert (b.inst_map > 0).sum() <= (a.inst_map > 0).sum()
    out_no = enlarge_dataset(ds.samples, seed=0, no_overlap=True)
    for a, b in zip(ds.samples, out_no):
        assert (b.inst_map > 0).sum() == (a.inst_map > 0).sum()
        assert len(b.inst_ids()) == len(a.inst_ids())


def test_enlarge_patch_of_a_strided_view_keeps_its_nuclei() -> None:
    # Regression: labels read from .mat files are Fortran-ordered and a grid patch is a view of
    # them; the movers were written into a temporary copy (ravel of a non-C-ordered array) and
    # silently vanished.
    full = np.zeros((128, 128), np.int32, order="F")
    full[90:100, 90:100] = 5  # inside the 8-px frame: movable
    full[66:70, 100:110] = 9  # touches the frame of the patch below: frozen
    view = full[64:128, 64:128]
    types = (view > 0).astype(np.int32) * 2
    assert not view.flags["C_CONTIGUOUS"]
    inst, out_types, info = enlarge_patch(view, types, rng=np.random.default_rng(0), frame=8, shift_range=(-4, 3))
    assert sorted(np.unique(inst).tolist()) == [0, 1, 2]
    assert (inst > 0).sum() == (view > 0).sum()  # nothing overwritten: both nuclei keep their area
    assert set(np.unique(out_types[inst > 0]).tolist()) == {2}
