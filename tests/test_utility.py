"""The utility classifier (diffmix.utility) and the `diffmix utility` command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import consep_tiles
from diffmix.data.io import Dataset, write_dataset
from diffmix.data.sample import NucleiSample
from diffmix.data.schemes import CONSEP
from diffmix.data.toy import generate_toy_samples
from diffmix.errors import DataError
from diffmix.utility import (
    REAL,
    REAL_BALANCED,
    UtilitySettings,
    confusion_per_image,
    nucleus_crops,
    predict,
    scores_from_confusion,
    train_classifier,
    utility_study,
)


def _sample(name: str = "a") -> NucleiSample:
    image = np.arange(20 * 20 * 3, dtype=np.uint8).reshape(20, 20, 3)
    inst = np.zeros((20, 20), np.int32)
    inst[0:3, 0:3] = 1  # a 3x3 nucleus in the corner, centroid (1, 1)
    inst[10:14, 8:12] = 2  # a 4x4 one, centroid (x 9.5, y 11.5)
    types = np.where(inst == 1, 2, np.where(inst == 2, 1, 0)).astype(np.int32)
    return NucleiSample(image=image, inst_map=inst, type_map=types, name=name)


def test_crops_are_centred_reflect_padded_and_masked():
    s = _sample()
    c = nucleus_crops([s], size=8)
    assert c.crops.shape == (2, 4, 8, 8) and c.crops.dtype == np.uint8
    assert c.labels.tolist() == [2, 1] and c.image.tolist() == [0, 0] and c.names == ["a"]
    # corner nucleus: centroid (1, 1) -> window rows/cols -3..4, reflected at the border
    padded = np.pad(s.image, ((4, 4), (4, 4), (0, 0)), mode="reflect")
    assert np.array_equal(c.crops[0, :3], padded[1:9, 1:9].transpose(2, 0, 1))
    mask = np.zeros((8, 8), np.uint8)
    mask[3:6, 3:6] = 255  # the nucleus's own pixels only
    assert np.array_equal(c.crops[0, 3], mask)
    # second nucleus: centroid rounds to (x 10, y 12) (numpy rounds .5 to even): rows 8..15
    assert np.array_equal(c.crops[1, :3], s.image[8:16, 6:14].transpose(2, 0, 1))
    assert c.crops[1, 3].sum() == 16 * 255 and c.crops[1, 3, 2:6, 2:6].min() == 255
    only = nucleus_crops([s], size=8, classes=[1])
    assert only.labels.tolist() == [1]
    with pytest.raises(DataError, match="even"):
        nucleus_crops([s], size=7)


def test_scores_and_per_image_confusion_by_hand():
    conf = np.array([[3, 1, 0], [0, 0, 0], [2, 0, 4]])  # rows true 1..3, columns predicted
    sc = scores_from_confusion(conf, [1, 2, 3])
    assert sc["acc"] == pytest.approx(7 / 10)
    # class 1: TP 3, FP 2, FN 1 -> 6/9; class 2: TP 0, FP 1, FN 0 -> 0; class 3: 8/10
    assert sc["f1"] == pytest.approx({1: 6 / 9, 2: 0.0, 3: 0.8})
    assert sc["macro_f1"] == pytest.approx((6 / 9 + 0.8) / 3)
    assert scores_from_confusion(np.zeros((2, 2)), [1, 2])["f1"] == {1: 1.0, 2: 1.0}
    crops = nucleus_crops([_sample("a"), _sample("b")], size=8)
    per_image = confusion_per_image(crops, np.array([2, 2, 1, 1]), 2)
    assert per_image.shape == (2, 2, 2)
    assert per_image[0].tolist() == [[0, 1], [0, 1]] and per_image[1].tolist() == [[1, 0], [1, 0]]


def test_classifier_learns_real_consep_nuclei_above_chance():
    train = nucleus_crops(consep_tiles("train", every=6), 32)  # 72 tiles, ~2,900 nuclei
    test = nucleus_crops(consep_tiles("test", every=8), 32)  # 28 tiles, ~1,200 nuclei
    model = train_classifier(train, 4, UtilitySettings(steps=150, width=8, batch_size=32), seed=0)
    sc = scores_from_confusion(confusion_per_image(test, predict(model, test), 4).sum(0), [1, 2, 3, 4])
    majority = np.bincount(test.labels).max() / len(test)  # always answering the commonest class
    assert sc["acc"] > majority + 0.1, (sc, majority)
    assert sc["macro_f1"] > 0.35, sc  # uniform guessing: ~0.2; the majority answer: ~0.15


def _toy(tmp_path: Path) -> tuple[Dataset, Dataset, Dataset]:
    samples = generate_toy_samples(5, 64, 0, rare_fraction=0.2)
    train = Dataset(samples[:3], CONSEP)
    test = Dataset(samples[3:], CONSEP)
    synth = Dataset([s.replace(name=f"{s.name}_0") for s in samples[:2]], CONSEP)
    for ds, name in ((train, "train"), (test, "test"), (synth, "synth")):
        write_dataset(tmp_path / name, ds.samples, CONSEP, {"split": name})
    return train, test, synth


def test_study_structure_counts_and_pairing(tmp_path):
    train, test, synth = _toy(tmp_path)
    settings = UtilitySettings(steps=3, width=4, batch_size=8, crop=16)
    res = utility_study(train, test, {"syn": synth}, settings=settings, seeds=(0, 1), n_boot=200, progress=False)
    assert list(res["arms"]) == [REAL, REAL_BALANCED, "real + syn"]
    assert list(res["differences"]) == [REAL_BALANCED, "real + syn"]
    real_n, syn_n = res["n_train"][REAL], res["n_train"]["real + syn"]
    own = nucleus_crops(synth.samples, 16)
    assert {c: syn_n[c] - real_n[c] for c in real_n} == {c: int((own.labels == c).sum()) for c in real_n}
    assert sum(res["n_test"].values()) == len(nucleus_crops(test.samples, 16))
    for arm in res["arms"].values():
        assert len(arm["seeds"]) == 2
        for m, iv in arm["intervals"].items():
            assert iv["low"] <= iv["estimate"] <= iv["high"] or np.isclose(iv["low"], iv["high"])
    rec = res["recognition"]
    assert rec["classifier"] == REAL_BALANCED and list(rec["sets"]) == ["real test", "syn"]
    assert rec["sets"]["syn"]["n"] == {c: int((own.labels == c).sum()) for c in real_n}
    for r in rec["sets"].values():
        assert all(v is None or 0.0 <= v <= 1.0 for v in r["recall"].values())
    json.dumps(res)
    # same seeds, same result
    again = utility_study(train, test, {"syn": synth}, settings=settings, seeds=(0, 1), n_boot=200, progress=False)
    assert again["arms"] == res["arms"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffmix", "utility", *args], capture_output=True, text=True)


def test_cli_reports_arms_and_writes_json(tmp_path):
    _toy(tmp_path)
    out = tmp_path / "res" / "utility.json"
    r = _cli(str(tmp_path / "synth"), "--train", str(tmp_path / "train"), "--test", str(tmp_path / "test"),
             "--steps", "3", "--width", "4", "--crop", "16", "--seeds", "0", "--quiet", "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert "real + synth" in r.stdout and "difference vs real" in r.stdout and "F1 miscellaneous" in r.stdout
    assert "recognised as their class" in r.stdout and "recall miscellaneous" in r.stdout
    data = json.loads(out.read_text())
    assert data["seeds"] == [0] and "real + synth" in data["differences"]
    # validation folds of --train instead of --test: 3 images, 3 folds, 1 held out
    r = _cli("--train", str(tmp_path / "train"), "--folds", "3", "--fold", "1", "--steps", "2",
             "--width", "4", "--crop", "16", "--seeds", "0", "--quiet", "--no-control")
    assert r.returncode == 0, r.stderr
    assert "real, class-balanced" not in r.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        ((), "give either --test DATASET or --folds K --fold F"),
        (("--folds", "3", "--fold", "3"), "--fold must be in 0..2"),
        (("--folds", "3", "--seeds", "0,x"), "--seeds '0,x': expected comma-separated integers"),
        (("--folds", "3", "--seeds", "1,1"), "distinct"),
        (("--folds", "3", "--steps", "0"), "--steps must be >= 1"),
        (("--folds", "3", "--crop", "7"), "crop size must be even"),
        (("--folds", "3", "--json", "{train}"), "is a folder; give a file name"),  # checked before training
    ],
)
def test_cli_usage_errors_are_one_line(tmp_path, args, message):
    _toy(tmp_path)
    r = _cli("--train", str(tmp_path / "train"), "--quiet", *(a.format(train=tmp_path / "train") for a in args))
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
