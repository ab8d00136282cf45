"""`diffmix evaluate --compat hovernet`: hover_net's run_nuclei_type_stat, dummy points included."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffmix.data.io import write_mat_labels
from diffmix.errors import DataError
from diffmix.metrics.classification import type_stats
from diffmix.metrics.compat import hovernet_type_stats

DIFFMIX = Path(sys.executable).parent / "diffmix"


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(DIFFMIX), *args], capture_output=True, text=True, env=env, timeout=120)


def maps(nuclei: list[tuple[int, int, int]], size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """3x3 nuclei centred on (x, y) with a class each: centroids are exactly (x, y)."""
    inst = np.zeros((size, size), np.int32)
    types = np.zeros((size, size), np.int32)
    for k, (x, y, cls) in enumerate(nuclei, start=1):
        inst[y - 1 : y + 2, x - 1 : x + 2] = k
        types[y - 1 : y + 2, x - 1 : x + 2] = cls
    return inst, types


#: A set with empty images (true, pred) as [(x, y, class)]:
#: a: two pairs, (1 -> 1) and (2 -> 1);  b: empty on both sides;
#: c: one true class-2 nucleus, empty prediction;  d: empty truth, a class-1 prediction at (5, 5),
#: 7.07 px from the (0, 0) dummy, so it pairs with the dummy under hover_net.
CASE = {
    "a": ([(10, 10, 1), (30, 30, 2)], [(11, 10, 1), (30, 31, 1)]),
    "b": ([], []),
    "c": ([(50, 50, 2)], []),
    "d": ([], [(5, 5, 1)]),
}


def as_points(nuclei):
    xy = np.array([(x, y) for x, y, _ in nuclei], dtype=np.float64).reshape(-1, 2)
    return xy, np.array([c for _, _, c in nuclei], dtype=np.int64)


def images():
    return [(*as_points(t), *as_points(p)) for t, p in CASE.values()]


# hover_net by hand: pairs (true, pred types) a (1,1) (2,1), b dummy (0,0), d (dummy 0, 1);
# unpaired true: c's 2; unpaired pred: c's dummy 0. TP 4, FP 1, FN 1.
HOVERNET = {"f1_d": 8 / 10, "acc": 2 / 4, "f1": {0: 2 / (2 + 2 + 1), 1: 2 / (2 + 4), 2: 0.0}}
# diffmix's default by hand: pairs a (1,1) (2,1); unpaired true c's 2, unpaired pred d's 1.
DEFAULT = {"f1_d": 4 / 6, "acc": 1 / 2, "f1": {1: 2 / (2 + 2 + 1), 2: 0.0}}


def test_hovernet_type_stats_by_hand():
    assert hovernet_type_stats(images()) == HOVERNET  # class list = unique true types, dummy 0 too
    explicit = hovernet_type_stats(images(), [1, 2, 3])
    assert explicit["f1"][1] == HOVERNET["f1"][1] and explicit["f1"][2] == 0.0
    assert math.isnan(explicit["f1"][3])  # 0/0, as numpy gives it upstream
    assert type_stats(images(), [1, 2]) == DEFAULT  # the default is unchanged


def test_no_pair_anywhere_raises_as_upstream():
    lone = [(np.array([[50.0, 50.0]]), np.array([2]), np.zeros((0, 2)), np.zeros(0))]
    with pytest.raises(DataError, match="raises here"):
        hovernet_type_stats(lone)
    # the same image next to an empty/empty one has the dummy pair and a number
    both_empty = (np.zeros((0, 2)), np.zeros(0), np.zeros((0, 2)), np.zeros(0))
    r = hovernet_type_stats(lone + [both_empty])
    assert r["f1_d"] == 2 / (2 + 1 + 1) and r["acc"] == 1.0 and r["f1"][0] == 2 / (2 + 1)


@pytest.fixture()
def folders(tmp_path: Path) -> tuple[Path, Path]:
    for name, (t, p) in CASE.items():
        write_mat_labels(tmp_path / "true" / f"{name}.mat", *maps(t))
        write_mat_labels(tmp_path / "pred" / f"{name}.mat", *maps(p))
    return tmp_path / "true", tmp_path / "pred"


def test_cli_compat_hovernet_and_default(folders, tmp_path):
    true_dir, pred_dir = folders
    base = ["evaluate", "--pred", str(pred_dir), "--true", str(true_dir)]
    proc = run(*base, "--compat", "hovernet", "--json", str(tmp_path / "h.json"))
    assert proc.returncode == 0, proc.stderr
    assert "F1_d 0.8000  Acc 0.5000" in proc.stdout and "(type statistics: --compat hovernet)" in proc.stdout
    data = json.loads((tmp_path / "h.json").read_text())
    assert data["compat"] == "hovernet" and "type_counts" not in data
    assert data["type"] == {"f1_d": 0.8, "acc": 0.5, "f1": {"0": 0.4, "1": 1 / 3, "2": 0.0}}
    proc = run(*base, "--classes", "1,2,3", "--compat", "hovernet", "--json", str(tmp_path / "n.json"))
    assert proc.returncode == 0, proc.stderr
    assert "F1 class 3: nan" in proc.stdout
    assert json.loads((tmp_path / "n.json").read_text())["type"]["f1"]["3"] is None  # strict JSON
    proc = run(*base, "--classes", "1,2", "--json", str(tmp_path / "d.json"))
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "d.json").read_text())
    assert "compat" not in data
    assert data["type"] == {"f1_d": 4 / 6, "acc": 0.5, "f1": {"1": 0.4, "2": 0.0}}


def test_cli_compat_failures(folders, tmp_path):
    true_dir, pred_dir = folders
    proc = run("evaluate", "--pred", str(pred_dir), "--true", str(true_dir), "--compat", "sonnet")
    assert proc.returncode == 2 and "unknown compat mode 'sonnet'" in proc.stderr
    for name in ("a", "b", "d"):
        (true_dir / f"{name}.mat").unlink()
        (pred_dir / f"{name}.mat").unlink()
    proc = run("evaluate", "--pred", str(pred_dir), "--true", str(true_dir), "--compat", "hovernet")
    assert proc.returncode == 2 and "hover_net's run_nuclei_type_stat raises here" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run("evaluate", "--pred", str(pred_dir), "--true", str(true_dir))  # the default has a number
    assert proc.returncode == 0 and "F1_d 0.0000" in proc.stdout
