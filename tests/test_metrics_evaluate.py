"""`evaluate_samples`, folder evaluation and the `diffmix evaluate` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio

from diffmix.cli import main
from diffmix.data.io import write_dataset_json
from diffmix.data.schemes import get_scheme
from diffmix.errors import ClassSchemeError, DataError, PairingError
from diffmix.metrics import evaluate_folders, evaluate_samples, instance_metrics, read_label_file

KEYS = ["dice", "aji", "aji_plus", "dq", "sq", "pq"]


def two_nuclei(shift: int = 0) -> np.ndarray:
    m = np.zeros((40, 40), np.int32)
    m[5:15, 5 + shift : 15 + shift] = 3
    m[25:35, 20:30] = 8
    return m


def type_map_of(inst: np.ndarray, classes: dict[int, int]) -> np.ndarray:
    out = np.zeros_like(inst)
    for i, c in classes.items():
        out[inst == i] = c
    return out


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------- arrays


def test_evaluate_samples_structure_and_values():
    t1, p1 = two_nuclei(), two_nuclei(shift=2)
    t2, p2 = two_nuclei(), np.zeros((40, 40), np.int32)
    result = evaluate_samples(
        [(t1, type_map_of(t1, {3: 1, 8: 2})), (t2, type_map_of(t2, {3: 1, 8: 2}))],
        [(p1, type_map_of(p1, {3: 1, 8: 1})), (p2, np.zeros_like(p2))],
        class_ids=[1, 2],
        names=["a", "b"],
    )
    assert list(result) == ["per_image", "mean", "type", "type_counts", "n_images"]
    assert list(result["per_image"]) == ["a", "b"] and result["n_images"] == 2
    assert result["per_image"]["a"] == instance_metrics(t1, p1)
    assert list(result["per_image"]["a"]) == KEYS and list(result["mean"]) == KEYS
    assert result["per_image"]["b"] == {k: 0.0 for k in KEYS}
    for k in KEYS:
        assert result["mean"][k] == pytest.approx((result["per_image"]["a"][k] + 0.0) / 2, abs=1e-15)
    # centroids move by 2 px: both image-a nuclei pair; image b's two are missed.
    # pairs (1,1), (2,1); unpaired true 1 and 2.
    assert result["type"]["f1_d"] == 4 / (4 + 2)
    assert result["type"]["acc"] == 0.5
    assert result["type"]["f1"] == {1: 2 / (2 + 2 + 1), 2: 0 / (2 + 1)}
    # the per-image counts behind the pooled numbers, by hand: image a pairs (1,1) and (2,1);
    # image b misses a class-1 and a class-2 nucleus.
    counts = result["type_counts"]
    assert counts["class_ids"] == [1, 2]
    assert counts["columns"][:4] == ["tp_d", "fp_d", "fn_d", "agree"]
    assert counts["columns"][4:9] == ["1_tp", "1_fp", "1_fn", "1_fp_d", "1_fn_d"]
    assert counts["per_image"]["a"] == [2, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 0]
    assert counts["per_image"]["b"] == [0, 0, 2, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]
    json.dumps(result)  # serialisable as is


def test_evaluate_samples_without_types_reports_detection_only():
    t, p = two_nuclei(), two_nuclei(1)
    result = evaluate_samples([(t, None)], [(p, None)], class_ids=[1, 2])
    assert result["type"] == {"f1_d": 1.0, "acc": None, "f1": {}}


# ---------------------------------------------------------------- folders


def write_mat(path: Path, inst: np.ndarray, types: dict[int, int] | None, with_type_map: bool = True) -> None:
    ids = sorted(types) if types else []
    obj = {"inst_map": inst.astype(np.float64)}  # CoNSeP stores inst_map as double
    if types is not None:
        obj["inst_type"] = np.array([[types[i]] for i in ids], dtype=np.int32).reshape(-1, 1)
        ys_xs = [np.nonzero(inst == i) for i in ids]
        obj["inst_centroid"] = np.array([[xs.mean(), ys.mean()] for ys, xs in ys_xs]).reshape(-1, 2)
        if with_type_map:
            obj["type_map"] = type_map_of(inst, types)
    sio.savemat(path, obj)


@pytest.fixture()
def consep_folders(tmp_path: Path) -> tuple[Path, Path]:
    """Raw CoNSeP-style truth (.mat, classes 4 and 6) and merged predictions (.npy HxWx2)."""
    true_dir, pred_dir = tmp_path / "true", tmp_path / "pred"
    true_dir.mkdir()
    pred_dir.mkdir()
    for k, name in enumerate(["img_1", "img_2"]):
        t = two_nuclei()
        write_mat(true_dir / f"{name}.mat", t, {3: 4, 8: 6})  # raw 4 -> 3, raw 6 -> 4
        p = two_nuclei(shift=k)
        np.save(pred_dir / f"{name}.npy", np.stack([p, type_map_of(p, {3: 3, 8: 4})], axis=-1))
    return true_dir, pred_dir


def test_scheme_merges_raw_truth(consep_folders):
    true_dir, pred_dir = consep_folders
    merged = evaluate_folders(pred_dir, true_dir, scheme="consep")
    assert merged["type"] == {"f1_d": 1.0, "acc": 1.0, "f1": {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}}
    raw = evaluate_folders(pred_dir, true_dir, class_ids=[1, 2, 3, 4])  # merges nothing
    assert raw["type"]["acc"] == 0.0
    assert raw["type"]["f1"][3] == 0.0
    assert merged["per_image"] == raw["per_image"]
    assert merged["per_image"]["img_1"]["dice"] == 1.0


def test_merged_dataset_json_prevents_a_second_merge(consep_folders, tmp_path):
    true_dir, pred_dir = consep_folders
    merged_dir = tmp_path / "merged" / "Labels"
    merged_dir.mkdir(parents=True)
    for name in ["img_1", "img_2"]:
        write_mat(merged_dir / f"{name}.mat", two_nuclei(), {3: 3, 8: 4})
    write_dataset_json(merged_dir.parent, get_scheme("consep"))
    # given the dataset root (Labels/ inside) or Labels/ itself: no merge, perfect types
    for folder in (merged_dir.parent, merged_dir):
        result = evaluate_folders(pred_dir, folder, scheme="consep")
        assert result["type"]["acc"] == 1.0
    with pytest.raises(ClassSchemeError, match="already merged"):
        evaluate_folders(pred_dir, merged_dir.parent, scheme="glysac")


def test_missing_prediction_is_an_error_listing_names(consep_folders):
    true_dir, pred_dir = consep_folders
    (pred_dir / "img_2.npy").unlink()
    with pytest.raises(PairingError, match="img_2"):
        evaluate_folders(pred_dir, true_dir, scheme="consep")


def test_file_reading_rules(tmp_path):
    inst = two_nuclei()
    # inst_type given as a 1xN row is read as N types (upstream [:, 0] would read one)
    sio.savemat(tmp_path / "row.mat", {"inst_map": inst, "inst_type": np.array([[1, 2]]), "inst_centroid": np.array([[9.5, 9.5], [24.5, 29.5]])})
    lab = read_label_file(tmp_path / "row.mat")
    assert lab.types.tolist() == [1, 2] and lab.centroids.shape == (2, 2)
    # inst_type without centroids: centroids from the map; count must match
    sio.savemat(tmp_path / "nocen.mat", {"inst_map": inst, "inst_type": np.array([[1], [2]])})
    assert read_label_file(tmp_path / "nocen.mat").centroids.tolist() == [[9.5, 9.5], [24.5, 29.5]]
    sio.savemat(tmp_path / "bad.mat", {"inst_map": inst, "inst_type": np.array([[1], [2], [3]])})
    with pytest.raises(DataError, match="3 inst_type entries for 2 instances"):
        read_label_file(tmp_path / "bad.mat")
    # hover_net output: inst_map + inst_type + inst_centroid (an instance may lack a row)
    sio.savemat(tmp_path / "hov.mat", {"inst_map": inst, "inst_type": np.array([[2]]), "inst_centroid": np.array([[9.5, 9.5]])})
    assert read_label_file(tmp_path / "hov.mat").types.tolist() == [2]
    # .npy HxW: no class information
    np.save(tmp_path / "plain.npy", inst)
    assert read_label_file(tmp_path / "plain.npy").types is None
    np.save(tmp_path / "cube.npy", np.zeros((4, 4, 3)))
    with pytest.raises(DataError, match="HxW or HxWx2"):
        read_label_file(tmp_path / "cube.npy")
    (tmp_path / "junk.mat").write_bytes(b"not a mat file")
    with pytest.raises(DataError, match="junk.mat"):
        read_label_file(tmp_path / "junk.mat")
    # unknown raw class for the scheme
    write_mat(tmp_path / "raw.mat", inst, {3: 9, 8: 1})
    with pytest.raises(ClassSchemeError, match="9"):
        read_label_file(tmp_path / "raw.mat", get_scheme("consep"))


def test_duplicate_names_and_size_mismatch(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    np.save(a / "x.npy", two_nuclei())
    write_mat(a / "x.mat", two_nuclei(), None)
    np.save(b / "x.npy", two_nuclei())
    with pytest.raises(PairingError, match="both give image 'x'"):
        evaluate_folders(b, a)
    (a / "x.mat").unlink()
    np.save(b / "x.npy", np.zeros((20, 20), np.int32))
    with pytest.raises(DataError, match="differ in size"):
        evaluate_folders(b, a)


# ---------------------------------------------------------------- command line


def test_cli_table_and_exact_json(consep_folders, tmp_path, capsys):
    true_dir, pred_dir = consep_folders
    out_json = tmp_path / "res" / "metrics.json"
    code, out, err = run_cli(
        ["evaluate", "--pred", str(pred_dir), "--true", str(true_dir), "--scheme", "consep", "--json", str(out_json)],
        capsys,
    )
    assert code == 0, err
    assert "img_1" in out and "mean (2)" in out and "F1_d 1.0000" in out and "spindle" in out
    data = json.loads(out_json.read_text())
    assert list(data) == ["per_image", "mean", "type", "type_counts", "n_images"]
    assert list(data["type"]) == ["f1_d", "acc", "f1"]
    assert list(data["type"]["f1"]) == ["1", "2", "3", "4"]
    assert data["n_images"] == 2
    assert data["per_image"]["img_2"] == instance_metrics(two_nuclei(), two_nuclei(shift=1))


def test_cli_user_errors_exit_2(consep_folders, capsys, tmp_path):
    true_dir, pred_dir = consep_folders
    code, _, err = run_cli(["evaluate", "--pred", str(pred_dir), "--true", str(true_dir), "--scheme", "consep", "--classes", "1,2"], capsys)
    assert code == 2 and "not both" in err
    code, _, err = run_cli(["evaluate", "--pred", str(pred_dir), "--true", str(true_dir), "--classes", "1,x"], capsys)
    assert code == 2 and "--classes" in err
    code, _, err = run_cli(["evaluate", "--pred", str(pred_dir), "--true", str(true_dir), "--scheme", "nope"], capsys)
    assert code == 2 and "unknown class scheme" in err
    (pred_dir / "img_1.npy").unlink()
    code, _, err = run_cli(["evaluate", "--pred", str(pred_dir), "--true", str(true_dir)], capsys)
    assert code == 2 and "img_1" in err and "Traceback" not in err
    code, _, err = run_cli(["evaluate", "--pred", str(tmp_path / "none"), "--true", str(true_dir)], capsys)
    assert code == 2 and "not a folder" in err


# ---------------------------------------------------------------- real data


def test_real_consep_style_labels_against_themselves_and_shifted(shared_data, tmp_path, capsys):
    true_dir = shared_data / "real_he_labeled"
    names = ["patch1", "patch2", "patch3"]
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    for name in names:
        mat = sio.loadmat(true_dir / f"{name}.mat")
        sio.savemat(pred_dir / f"{name}.mat", {k: mat[k] for k in ("inst_map", "inst_type", "inst_centroid")})
    same = evaluate_folders(pred_dir, true_dir, class_ids=[1, 2, 3, 5])
    for name in names:
        m = same["per_image"][name]
        assert m["dice"] == m["aji"] == m["aji_plus"] == m["dq"] == 1.0
        n = len(np.unique(sio.loadmat(true_dir / f"{name}.mat")["inst_map"])) - 1
        assert m["sq"] == pytest.approx(n / (n + 1e-6), abs=1e-12)
    assert same["type"] == {"f1_d": 1.0, "acc": 1.0, "f1": {1: 1.0, 2: 1.0, 3: 1.0, 5: 1.0}}
    # Predictions derived from the maps (types by majority, centroids by mean) agree with
    # the stored inst_type / inst_centroid of the real files.
    for name in names:
        mat = sio.loadmat(true_dir / f"{name}.mat")
        np.save(pred_dir / f"{name}.npy", np.stack([mat["inst_map"], mat["type_map"]], -1))
        (pred_dir / f"{name}.mat").unlink()
    code, out, err = run_cli(["evaluate", "--pred", str(pred_dir), "--true", str(true_dir), "--classes", "1,2,3,5"], capsys)
    assert code == 0, err
    assert "Acc 1.0000" in out
