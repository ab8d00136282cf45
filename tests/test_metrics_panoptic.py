"""PanNuke mPQ/bPQ and CoNIC mPQ+ against values computed by hand, and through `diffmix evaluate`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffmix.data.io import write_mat_labels
from diffmix.errors import DataError
from diffmix.metrics.instance import instance_metrics
from diffmix.metrics.panoptic import (
    ClassedInstances,
    class_inst_map,
    classed_instances,
    conic_pq,
    pannuke_pq,
    read_tissues,
)

EPS = 1e-6
DIFFMIX = Path(sys.executable).parent / "diffmix"


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(DIFFMIX), *args], capture_output=True, text=True, env=env, timeout=120)


def image(h: int = 20, w: int = 20) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((h, w), np.int32), np.zeros((h, w), np.int32)


def put(inst, types, iid, cls, rows, cols):
    inst[rows, cols] = iid
    types[rows, cols] = cls


def hand_made() -> dict[str, tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]]:
    """Four images, classes 1..3 (class 3 appears nowhere).

    A: true t1 (class 1, 4x4) and t2 (class 2, 4x4); pred p1 class 1 = 4x3 inside t1 (IoU 12/16),
       p2 = exactly t2 but class 1, p3 class 2 elsewhere (3x3, false positive).
    B: true t1 class 1 (4x4); pred class 1 covering half of it (IoU exactly 0.5: no match) and
       a class-2 false positive (no true class 2 in B).
    C: no true nucleus; one class-1 prediction.
    D: one class-2 nucleus predicted exactly.
    """
    ti, tt = image(); pi, pt = image()
    put(ti, tt, 1, 1, slice(0, 4), slice(0, 4)); put(ti, tt, 2, 2, slice(10, 14), slice(10, 14))
    put(pi, pt, 1, 1, slice(0, 4), slice(0, 3)); put(pi, pt, 2, 1, slice(10, 14), slice(10, 14))
    put(pi, pt, 3, 2, slice(16, 19), slice(0, 3))
    a = ((ti, tt), (pi, pt))
    ti, tt = image(); pi, pt = image()
    put(ti, tt, 1, 1, slice(0, 4), slice(0, 4))
    put(pi, pt, 1, 1, slice(0, 4), slice(0, 2)); put(pi, pt, 2, 2, slice(10, 12), slice(10, 12))
    b = ((ti, tt), (pi, pt))
    ti, tt = image(); pi, pt = image()
    put(pi, pt, 1, 1, slice(5, 7), slice(5, 7))
    c = ((ti, tt), (pi, pt))
    ti, tt = image(); pi, pt = image()
    put(ti, tt, 1, 2, slice(3, 8), slice(3, 8)); put(pi, pt, 1, 2, slice(3, 8), slice(3, 8))
    d = ((ti, tt), (pi, pt))
    return {"A": a, "B": b, "C": c, "D": d}


def classed(inst: np.ndarray, types: np.ndarray) -> ClassedInstances:
    ids = np.unique(inst)
    ids = ids[ids > 0]
    return ClassedInstances(inst, ids, np.array([types[inst == i][0] for i in ids], dtype=np.int64))


# by hand (docstring of hand_made): PQ = DQ * SQ with SQ = sum IoU / (TP + 1e-6)
PQ_A1 = (1 / 1.5) * (0.75 / (1 + EPS))          # A class 1: TP 1 (IoU .75), FP 1 (p2)
BPQ_A = (2 / 2.5) * (1.75 / (2 + EPS))          # A class-agnostic: TP 2 (.75, 1.0), FP 1
PQ_D = 1.0 * (1.0 / (1 + EPS))                  # D: one exact match


def test_class_inst_map_keeps_only_that_class():
    (ti, tt), (pi, pt) = hand_made()["A"]
    p = classed(pi, pt)
    assert np.array_equal(class_inst_map(p, 1), np.where(np.isin(pi, [1, 2]), pi, 0))
    assert np.array_equal(class_inst_map(p, 2), np.where(pi == 3, 3, 0))
    assert not class_inst_map(p, 3).any()


def test_pannuke_by_hand_without_tissues():
    cases = hand_made()
    true = [classed(*cases[k][0]) for k in "ABCD"]
    pred = [classed(*cases[k][1]) for k in "ABCD"]
    r = pannuke_pq(true, pred, [1, 2, 3], names=list("ABCD"))
    per = r["per_image"]
    assert per["A"]["pq"] == pytest.approx({1: PQ_A1, 2: 0.0, 3: None}, abs=1e-15)
    assert per["A"]["mpq"] == pytest.approx(PQ_A1 / 2, abs=1e-15)
    assert per["A"]["bpq"] == pytest.approx(BPQ_A, abs=1e-15)
    # B: IoU exactly 0.5 is no match; its class-2 false positive is ignored (no true class 2 in B)
    assert per["B"]["pq"] == {1: 0.0, 2: None, 3: None} and per["B"]["mpq"] == 0.0 and per["B"]["bpq"] == 0.0
    # C: no true nucleus: every value is skipped, its false positive costs nothing
    assert per["C"] == {"mpq": None, "bpq": None, "pq": {1: None, 2: None, 3: None}}
    assert per["D"]["mpq"] == pytest.approx(PQ_D, abs=1e-15)
    assert r["mpq"] == pytest.approx((PQ_A1 / 2 + 0.0 + PQ_D) / 3, abs=1e-15)
    assert r["bpq"] == pytest.approx((BPQ_A + 0.0 + PQ_D) / 3, abs=1e-15)
    # per class: mean over the images that have the class; class 3 (empty everywhere) is None
    assert r["per_class"][1] == pytest.approx((PQ_A1 + 0.0) / 2, abs=1e-15)
    assert r["per_class"][2] == pytest.approx((0.0 + PQ_D) / 2, abs=1e-15)
    assert r["per_class"][3] is None
    assert r["per_tissue"] == {"all": {"mpq": r["mpq"], "bpq": r["bpq"], "n_images": 4}}


def test_pannuke_tissues_weigh_tissues_equally():
    cases = hand_made()
    true = [classed(*cases[k][0]) for k in "ABCD"]
    pred = [classed(*cases[k][1]) for k in "ABCD"]
    r = pannuke_pq(true, pred, [1, 2, 3], tissues=["Colon", "Colon", "Breast", "Breast"], names=list("ABCD"))
    assert r["per_tissue"]["Colon"]["mpq"] == pytest.approx(PQ_A1 / 4, abs=1e-15)
    assert r["per_tissue"]["Breast"] == {"mpq": pytest.approx(PQ_D), "bpq": pytest.approx(PQ_D), "n_images": 2}
    assert r["mpq"] == pytest.approx((PQ_A1 / 4 + PQ_D) / 2, abs=1e-15)
    assert r["bpq"] == pytest.approx(((BPQ_A + 0.0) / 2 + PQ_D) / 2, abs=1e-15)
    with pytest.raises(DataError, match="3 tissue labels for 4 images"):
        pannuke_pq(true, pred, [1, 2, 3], tissues=["a", "b", "c"])


def test_conic_by_hand_pooled_over_images_with_an_empty_class():
    cases = hand_made()
    true = [classed(*cases[k][0]) for k in "ABCD"]
    pred = [classed(*cases[k][1]) for k in "ABCD"]
    r = conic_pq(true, pred, [1, 2, 3])
    c1, c2, c3 = (r["per_class"][c] for c in (1, 2, 3))
    # class 1: A TP1 FP1, B FP1 FN1 (IoU 0.5 is no match), C FP1 -> TP 1, FP 3, FN 1, sum IoU .75
    assert (c1["tp"], c1["fp"], c1["fn"], c1["sum_iou"]) == (1, 3, 1, 0.75)
    assert c1["pq"] == pytest.approx((1 / (1 + 1.5 + 0.5 + EPS)) * (0.75 / (1 + EPS)), abs=1e-15)
    # class 2: A FP1 FN1, B FP1, D TP1 (IoU 1) -> TP 1, FP 2, FN 1
    assert (c2["tp"], c2["fp"], c2["fn"], c2["sum_iou"]) == (1, 2, 1, 1.0)
    assert c2["pq"] == pytest.approx((1 / (1 + 1 + 0.5 + EPS)) * (1 / (1 + EPS)), abs=1e-15)
    # class 3: nothing anywhere -> 0 (official 0 / 1e-6), and it still counts in the mean
    assert c3 == {"pq": 0.0, "dq": 0.0, "sq": 0.0, "tp": 0, "fp": 0, "fn": 0, "sum_iou": 0.0}
    assert r["mpq_plus"] == pytest.approx((c1["pq"] + c2["pq"] + 0.0) / 3, abs=1e-15)
    # a perfect prediction is not 1: (N / (N + 1e-6))^2 per class
    perfect = conic_pq([true[3]], [true[3]], [2])
    assert perfect["mpq_plus"] == pytest.approx((1 / (1 + EPS)) ** 2, abs=1e-15)
    assert perfect["mpq_plus"] < 1.0


def test_relation_to_hovernet_pq_on_toy_predictions(tmp_path):
    """bPQ equals diffmix's mean PQ when every image has true nuclei (one tissue); an image
    without true nuclei is skipped by bPQ and counted (0.0 or 1.0) by PQ."""
    from diffmix.data.toy import write_toy_dataset
    from diffmix.data.io import read_dataset

    ds = read_dataset(write_toy_dataset(tmp_path / "toy", n_images=3, size=96, seed=3))
    true, pred, pqs = [], [], []
    for k, s in enumerate(ds):
        # a prediction: every nucleus shifted by k+1 px (some matches lost), types kept
        shifted_inst = np.roll(s.inst_map, k + 1, axis=1)
        shifted_type = np.roll(s.type_map, k + 1, axis=1)
        true.append(classed(s.inst_map, s.type_map))
        pred.append(classed(shifted_inst, shifted_type))
        pqs.append(instance_metrics(s.inst_map, shifted_inst)["pq"])
    r = pannuke_pq(true, pred, [1, 2, 3, 4])
    assert r["bpq"] == pytest.approx(float(np.mean(pqs)), abs=1e-12)
    empty = np.zeros_like(ds[0].inst_map)
    fp_only = classed(*[np.where(ds[0].inst_map == 1, 1, 0)] * 2)
    r2 = pannuke_pq(true + [classed(empty, empty)], pred + [fp_only], [1, 2, 3, 4])
    assert r2["bpq"] == pytest.approx(r["bpq"], abs=1e-15)  # the empty-truth image is skipped
    assert instance_metrics(empty, fp_only.inst_map)["pq"] == 0.0  # ... where PQ counts a 0
    assert r["mpq"] is not None and 0.0 <= r["mpq"] <= 1.0


def test_classed_instances_and_tissue_files(tmp_path):
    inst = np.zeros((5, 5), np.int32)
    inst[0, 0], inst[4, 4] = 3, 9
    c = classed_instances("x", inst, np.array([1, 2]))
    assert c.ids.tolist() == [3, 9] and c.types.tolist() == [1, 2]
    with pytest.raises(DataError, match="1 inst_type rows for 2 instances"):
        classed_instances("x", inst, np.array([1]))
    with pytest.raises(DataError, match="needs class information"):
        classed_instances("x", inst, None)
    (tmp_path / "t.csv").write_text("name,tissue\na,Colon\nb,Breast\n")
    assert read_tissues(tmp_path / "t.csv", ["b", "a"]) == ["Breast", "Colon"]
    (tmp_path / "t.json").write_text(json.dumps({"a": "Colon"}))
    with pytest.raises(DataError, match="no tissue for images b"):
        read_tissues(tmp_path / "t.json", ["a", "b"])
    np.save(tmp_path / "types.npy", np.array(["Colon", "Breast"]))
    assert read_tissues(tmp_path / "types.npy", ["p0", "p1"]) == ["Colon", "Breast"]
    with pytest.raises(DataError, match="one per image"):
        read_tissues(tmp_path / "types.npy", ["p0"])
    (tmp_path / "t.txt").write_text("a Colon")
    with pytest.raises(DataError, match="must be .json, .csv"):
        read_tissues(tmp_path / "t.txt", ["a"])


# ------------------------------------------------------------------------- the CLI


@pytest.fixture()
def folders(tmp_path: Path) -> tuple[Path, Path]:
    true_dir, pred_dir = tmp_path / "true", tmp_path / "pred"
    for name, ((ti, tt), (pi, pt)) in hand_made().items():
        write_mat_labels(true_dir / f"{name}.mat", ti, tt)
        write_mat_labels(pred_dir / f"{name}.mat", pi, pt)
    (tmp_path / "tissues.csv").write_text("A,Colon\nB,Colon\nC,Breast\nD,Breast\n")
    return true_dir, pred_dir


def test_cli_pannuke_and_conic_json(folders, tmp_path):
    true_dir, pred_dir = folders
    out = tmp_path / "r.json"
    proc = run("evaluate", "--pred", str(pred_dir), "--true", str(true_dir), "--classes", "1,2,3",
               "--pannuke", "--conic", "--tissues", str(tmp_path / "tissues.csv"), "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "PanNuke: mPQ" in proc.stdout and "CoNIC: mPQ+" in proc.stdout and "tissue Colon (2)" in proc.stdout
    data = json.loads(out.read_text())
    assert data["pannuke"]["mpq"] == pytest.approx((PQ_A1 / 4 + PQ_D) / 2, abs=1e-15)
    assert data["pannuke"]["per_class"]["3"] is None  # strict JSON null, not NaN
    assert data["pannuke"]["per_image"]["C"]["bpq"] is None
    assert data["conic"]["per_class"]["3"]["pq"] == 0.0
    # the existing PQ is untouched: image C (no truth, one prediction) counts 0.0 there
    assert data["per_image"]["C"]["pq"] == 0.0
    assert data["mean"]["pq"] == pytest.approx((BPQ_A + 0.0 + 0.0 + PQ_D) / 4, abs=1e-15)


def test_cli_panoptic_user_errors(folders, tmp_path):
    true_dir, pred_dir = folders
    base = ["evaluate", "--pred", str(pred_dir), "--true", str(true_dir)]
    proc = run(*base, "--tissues", str(tmp_path / "tissues.csv"))
    assert proc.returncode == 2 and "add --pannuke" in proc.stderr and "Traceback" not in proc.stderr
    proc = run(*base, "--pannuke", "--tissues", str(tmp_path / "nope.csv"))
    assert proc.returncode == 2 and "nope.csv: tissue file not found" in proc.stderr
    (tmp_path / "short.csv").write_text("A,Colon\n")
    proc = run(*base, "--pannuke", "--tissues", str(tmp_path / "short.csv"))
    assert proc.returncode == 2 and "no tissue for images B, C, D" in proc.stderr
    np.save(pred_dir / "A.npy", np.zeros((20, 20), np.int32))  # A now has two prediction files
    (pred_dir / "A.mat").unlink()
    proc = run(*base, "--conic")  # .npy without classes: class-aware PQ cannot be computed
    assert proc.returncode == 2 and "A (prediction): class-aware PQ needs class information" in proc.stderr
