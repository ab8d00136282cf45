"""HoVer-Net's training augmentation: same sampling for image and labels, official ranges, seeds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from diffmix.data.io import read_dataset
from diffmix.data.toy import write_toy_dataset
from diffmix.seg.augment import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    affine_matrix,
    draw_shape_params,
    hovernet_augment,
    input_augment,
    shape_augment,
    warp_window,
)
from diffmix.seg.data import PatchItems, Source

DIFFMIX = Path(sys.executable).parent / "diffmix"


def position_coded(h: int = 100, w: int = 100):
    """An image whose colour names its pixel (R = row, G = column), labels that do too."""
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([yy, xx, np.full_like(yy, 7)], axis=2).astype(np.uint8)
    inst = (yy * w + xx + 1).astype(np.int32)
    types = (xx % 5).astype(np.int32)
    return image, inst, types


def test_identity_parameters_give_the_plain_crop():
    image, inst, types = position_coded()
    size, y, x = 40, 20, 30
    mid = (size - 1) / 2
    matrix = affine_matrix((1.0, 1.0), 0.0, 0.0, (0.0, 0.0), (x + mid, y + mid), (mid, mid))
    img, i2, t2 = warp_window(image, inst, types, matrix, size)
    win = (slice(y, y + size), slice(x, x + size))
    assert np.array_equal(img, image[win]) and np.array_equal(i2, inst[win]) and np.array_equal(t2, types[win])
    # a quarter turn about the centre of an odd window is np.rot90 (exact nearest sampling)
    size = 41
    mid = (size - 1) / 2
    matrix = affine_matrix((1.0, 1.0), 0.0, 90.0, (0.0, 0.0), (x + mid, y + mid), (mid, mid))
    _, rot, _ = warp_window(image, inst, types, matrix, size)
    crop = inst[y : y + size, x : x + size]
    assert np.array_equal(rot, np.rot90(crop, 1)) or np.array_equal(rot, np.rot90(crop, -1))


def test_image_and_labels_are_sampled_identically():
    image, inst, types = position_coded()
    for seed in range(200):
        img, i2, t2 = shape_augment(image, inst, types, 20, 30, 40, np.random.default_rng(seed))
        fg = i2 > 0
        src = i2[fg] - 1
        rows, cols = np.divmod(src, 100)
        assert np.array_equal(img[fg][:, 0], rows) and np.array_equal(img[fg][:, 1], cols), seed
        assert np.array_equal(t2[fg], types.reshape(-1)[src]), seed  # the class travels with the id
        assert not img[~fg].any() and not t2[~fg].any()  # outside the sample: black, background


def test_label_maps_keep_ids_and_classes(tmp_path):
    ds = read_dataset(write_toy_dataset(tmp_path / "toy", n_images=1, size=128, seed=1))
    s = ds[0]
    cls_of = s.inst_types()
    for seed in range(30):
        rng = np.random.default_rng(seed)
        img, inst, types = hovernet_augment(s.image, s.inst_map, s.type_map, 32, 32, 64, rng)
        assert img.dtype == np.uint8 and img.shape == (64, 64, 3)
        assert inst.dtype == np.int32 and types.dtype == np.int32
        ids = set(np.unique(inst).tolist()) - {0}
        assert ids <= set(cls_of)  # no interpolated ids
        for i in ids:
            assert set(np.unique(types[inst == i]).tolist()) == {cls_of[i]}
        assert not types[inst == 0].any()


def test_parameters_within_the_official_ranges():
    draws = [draw_shape_params(np.random.default_rng(s), 270) for s in range(2000)]
    sx = np.array([d["scale"] for d in draws])
    tr = np.array([d["translate"] for d in draws])
    assert sx.min() >= 0.8 and sx.max() <= 1.2 and np.abs(tr).max() <= 0.01 * 540
    assert max(abs(d["shear"]) for d in draws) <= 5 and max(abs(d["rotate"]) for d in draws) <= 179
    assert max(abs(d["rotate"]) for d in draws) > 170
    for key in ("flip_lr", "flip_ud"):
        assert 0.45 < np.mean([d[key] for d in draws]) < 0.55


def test_colour_steps_by_hand():
    img = np.array([[[100, 100, 100], [200, 50, 0]]], np.uint8)
    assert adjust_brightness(img, 10.7).tolist() == [[[110, 110, 110], [210, 60, 10]]]
    assert adjust_brightness(img, 100).max() == 255  # clipped
    # contrast 1.25 about the channel means (150, 75, 50): 1.25 * v - 0.25 * mean, truncated:
    # R 87.5 212.5, G 106.25 43.75, B 112.5 -12.5 (clipped to 0)
    assert adjust_contrast(img, 1.25).tolist() == [[[87, 106, 112], [212, 43, 0]]]
    assert adjust_contrast(img, 1.0).tolist() == img.tolist()
    grey = adjust_saturation(img, 0.0)
    assert grey[0, 0].tolist() == [100, 100, 100] and len(set(grey[0, 1].tolist())) == 1
    assert np.array_equal(adjust_saturation(img, 1.0), img)
    hue = adjust_hue(np.array([[[255, 0, 0]]], np.uint8), 60)  # red + 120 degrees = green
    assert hue.tolist() == [[[0, 255, 0]]]


def test_input_augment_is_seeded_and_varied():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    a = input_augment(image, np.random.default_rng(5))
    b = input_augment(image, np.random.default_rng(5))
    assert np.array_equal(a, b) and a.dtype == np.uint8
    outs = [input_augment(image, np.random.default_rng(s)) for s in range(20)]
    assert len({o.tobytes() for o in outs}) == 20


def test_patch_items_same_seed_same_item(tmp_path):
    ds = read_dataset(write_toy_dataset(tmp_path / "toy", n_images=2, size=96, seed=2))
    make = lambda seed: PatchItems([Source(ds)], 64, 0, seed=seed, augmentation="hovernet", crops=1)  # noqa: E731
    a, b = make(3).item(1, 1), make(3).item(1, 1)
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    c = make(4).item(1, 1)
    assert not np.array_equal(a["image"].numpy(), c["image"].numpy())
    light = PatchItems([Source(ds)], 64, 0, seed=3, crops=1).item(1, 1)
    assert not np.array_equal(a["image"].numpy(), light["image"].numpy())
    assert a["image"].shape == (3, 64, 64) and a["tp"].max() <= 4
    with pytest.raises(Exception, match="augmentation must be one of light, hovernet"):
        PatchItems([Source(ds)], 64, 0, augmentation="imgaug")


def test_cli_seg_train_option(tmp_path):
    toy = write_toy_dataset(tmp_path / "toy", n_images=2, size=64, seed=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [str(DIFFMIX), "seg", "train", "--train", str(toy), "--epochs", "1", "--samples-per-epoch", "8",
            "--no-progress", "--device", "cpu", "--threads", "1"]
    proc = subprocess.run(base + [str(tmp_path / "run"), "--augmentation", "hovernet"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert cfg["config"]["augmentation"] == "hovernet"
    proc = subprocess.run(base + [str(tmp_path / "bad"), "--augmentation", "imgaug"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 2 and "augmentation: Input should be 'light' or 'hovernet'" in proc.stderr
    assert not (tmp_path / "bad").exists()
