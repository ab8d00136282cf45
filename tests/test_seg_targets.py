"""HoVer-Net targets: HV maps against hand-computed values and a per-nucleus oracle, NP/TP crops."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from diffmix.data.io import read_mat_labels
from diffmix.errors import ConfigError, DataError
from diffmix.seg.targets import MIN_HV_AREA, hv_map, make_targets, split_disconnected


def oracle_hv(inst_map: np.ndarray, min_area: int = 0, crop: int | None = None) -> np.ndarray:
    """One nucleus at a time, in a zero-padded frame, as hovernet_notes 3 describes the steps:
    split 4-connected pieces, select pieces with >= min_area px in the centre crop, expand the
    bbox by 2 px, round the box-relative centre of mass with int(c + 0.5), 1-based grid minus
    centre, divide the negative side by |min| and the positive side by max, per axis."""
    pad = 4
    ann = np.pad(inst_map, pad)
    pieces = np.zeros_like(ann)
    n = 0
    for i in np.unique(ann)[1:]:
        lab, k = ndimage.label(ann == i)  # scipy default structure: 4-connectivity
        for j in range(1, k + 1):
            n += 1
            pieces[lab == j] = n
    h, w = inst_map.shape
    win = (slice(pad, pad + h), slice(pad, pad + w))
    if crop is not None:
        y0, x0 = int((h - crop) * 0.5), int((w - crop) * 0.5)
        win = (slice(pad + y0, pad + y0 + crop), slice(pad + x0, pad + x0 + crop))
    out = np.zeros((2,) + ann.shape, np.float32)
    for p in range(1, n + 1):
        if np.count_nonzero(pieces[win] == p) < max(min_area, 1):
            continue
        mask = pieces == p
        rr, cc = np.nonzero(mask)
        r0, r1, c0, c1 = rr.min() - 2, rr.max() + 3, cc.min() - 2, cc.max() + 3
        box = mask[r0:r1, c0:c1]
        cy, cx = ndimage.center_of_mass(box)
        cy, cx = int(cy + 0.5), int(cx + 0.5)
        for ch, grid in ((0, np.arange(1, box.shape[1] + 1)[None, :] - cx), (1, np.arange(1, box.shape[0] + 1)[:, None] - cy)):
            vals = np.broadcast_to(grid, box.shape)[box].astype(np.float32)
            if (vals < 0).any():
                vals[vals < 0] /= -vals[vals < 0].min()
            if (vals > 0).any():
                vals[vals > 0] /= vals[vals > 0].max()
            out[ch, r0:r1, c0:c1][box] = vals
    return out[:, pad:-pad, pad:-pad]


def random_label_map(size: int, n: int, seed: int) -> np.ndarray:
    """Touching random rectangles and disks (later shapes take only free pixels)."""
    rng = np.random.default_rng(seed)
    inst = np.zeros((size, size), np.int32)
    yy, xx = np.mgrid[:size, :size]
    for i in range(1, n + 1):
        cy, cx = rng.uniform(0, size, 2)
        if rng.random() < 0.5:
            shape = (yy - cy) ** 2 + (xx - cx) ** 2 <= rng.uniform(2, 8) ** 2
        else:
            hh, ww = rng.uniform(1, 8, 2)
            shape = (abs(yy - cy) <= hh) & (abs(xx - cx) <= ww)
        inst[shape & (inst == 0)] = i
    return inst


def test_hv_hand_computed_bar_and_square():
    inst = np.zeros((12, 12), np.int32)
    inst[5, 2:5] = 1  # 1x3 bar: centre (5, 3)
    inst[8:11, 7:11] = 2  # 3x4 block: centre (9, 8.5) -> rounded (9, 9)
    hv = hv_map(inst)
    # the 1-based grid puts the zero one pixel before the rounded centre (hover_net quirk)
    np.testing.assert_array_equal(hv[0, 5, 2:5], [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(hv[1, 5, 2:5], [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(hv[0, 8, 7:11], [-1.0, 0.0, 0.5, 1.0])
    np.testing.assert_array_equal(hv[1, 8:11, 7], [0.0, 0.5, 1.0])
    assert hv.dtype == np.float32 and hv.shape == (2, 12, 12)
    assert np.all(hv[:, inst == 0] == 0)


def test_hv_matches_oracle_on_random_maps():
    for seed in range(3):
        inst = random_label_map(48, 25, seed)
        np.testing.assert_array_equal(hv_map(inst), oracle_hv(inst))
        np.testing.assert_array_equal(
            hv_map(inst, min_hv_area=MIN_HV_AREA, crop_size=30), oracle_hv(inst, MIN_HV_AREA, 30)
        )


def test_hv_matches_oracle_on_real_patches(shared_data):
    for k in (1, 2, 3):
        inst = read_mat_labels(shared_data / "real_he_labeled" / f"patch{k}.mat")["inst_map"]
        np.testing.assert_array_equal(hv_map(inst), oracle_hv(inst))
        np.testing.assert_array_equal(
            hv_map(inst, min_hv_area=30, crop_size=164), oracle_hv(inst, 30, 164)
        )


def test_hv_range_and_orientation():
    inst = random_label_map(64, 30, 7)
    hv = hv_map(inst)
    assert hv.min() >= -1 and hv.max() <= 1
    pieces = split_disconnected(inst)  # the unit HV is computed on
    for i in np.unique(pieces)[1:]:
        rr, cc = np.nonzero(pieces == i)
        # inside one nucleus x is a non-decreasing function of the column only (y: of the
        # row), and each side that exists reaches +-1
        for ch, coord in ((0, cc), (1, rr)):
            vals = hv[ch, rr, cc]
            order = np.argsort(coord, kind="stable")
            assert np.all(np.diff(vals[order]) >= 0)
            for c in np.unique(coord):
                assert np.ptp(vals[coord == c]) == 0
            if np.ptp(coord) >= 2:
                assert vals.max() == 1.0


def test_disconnected_id_gets_one_centre_per_piece():
    inst = np.zeros((10, 20), np.int32)
    inst[2:7, 1:6] = 3
    inst[2:7, 12:17] = 3  # same id, second piece
    pieces = split_disconnected(inst)
    assert pieces.max() == 2
    hv = hv_map(inst)
    # each piece is normalised on its own: identical values, both reaching -1 and +1
    np.testing.assert_array_equal(hv[:, 2:7, 1:6], hv[:, 2:7, 12:17])
    assert hv[0, 2:7, 1:6].min() == -1 and hv[0, 2:7, 1:6].max() == 1


def test_min_area_counts_pixels_inside_the_crop():
    inst = np.zeros((40, 40), np.int32)
    inst[17:23, 17:23] = 1  # 36 px, inside the 20-px centre crop
    inst[2:6, 2:8] = 2  # 24 px: < 30 anywhere
    inst[8:20, 2:14] = 3  # 144 px, only rows 10..19 x cols 10..13 (40 px) inside the crop
    inst[8:12, 24:34] = 4  # 40 px, 12 of them inside the crop
    hv = hv_map(inst, min_hv_area=30, crop_size=20)
    has_hv = {i: bool(np.any(hv[:, inst == i])) for i in (1, 2, 3, 4)}
    assert has_hv == {1: True, 2: False, 3: True, 4: False}
    # without the rule every instance gets its map
    assert all(np.any(hv_map(inst)[:, inst == i]) for i in (1, 2, 3, 4))


def test_make_targets_crop_shapes_and_dtypes():
    inst = random_label_map(64, 30, 3)
    types = np.where(inst > 0, inst % 4 + 1, 0).astype(np.int32)
    t = make_targets(inst, types, out_size=40)
    assert t["np"].shape == (40, 40) and t["np"].dtype == np.int64
    assert t["tp"].shape == (40, 40) and t["tp"].dtype == np.int64
    assert t["hv"].shape == (2, 40, 40) and t["hv"].dtype == np.float32
    np.testing.assert_array_equal(t["np"], (inst[12:52, 12:52] > 0))
    np.testing.assert_array_equal(t["tp"], types[12:52, 12:52])
    # HV shapes come from the whole patch, then the crop is taken
    np.testing.assert_array_equal(t["hv"], hv_map(inst, min_hv_area=30, crop_size=40)[:, 12:52, 12:52])
    full = make_targets(inst, types, min_hv_area=0)
    assert full["np"].shape == (64, 64)
    np.testing.assert_array_equal(full["hv"], hv_map(inst))
    # odd margins follow hover_net's int((H - out) * 0.5)
    np.testing.assert_array_equal(make_targets(inst, types, out_size=41)["np"], inst[11:52, 11:52] > 0)


def test_make_targets_on_a_sample_with_empty_map():
    t = make_targets(np.zeros((16, 16), np.int32), np.zeros((16, 16), np.int32))
    assert not t["np"].any() and not t["hv"].any() and not t["tp"].any()


def test_target_errors():
    inst = np.zeros((16, 16), np.int32)
    with pytest.raises(DataError, match="type_map shape"):
        make_targets(inst, np.zeros((8, 8), np.int32))
    with pytest.raises(ConfigError, match="larger than the patch"):
        make_targets(inst, inst, out_size=20)
    with pytest.raises(DataError, match="expected HxW"):
        hv_map(np.zeros((2, 4, 4), np.int32))
    with pytest.raises(DataError, match="integers"):
        hv_map(np.zeros((4, 4), np.float32))
