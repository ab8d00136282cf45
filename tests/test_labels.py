"""The label layer shared by the dataset reader and the evaluation (`diffmix.data.labels`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio

from diffmix.data.io import write_dataset_json
from diffmix.data.labels import (
    DATASET_NPY,
    PREDICTION_NPY,
    already_merged,
    as_class_ids,
    compact_ids,
    files_by_name,
    find_dataset_json,
    format_names,
    label_files,
    read_label_maps,
    read_npy_labels,
    remap_ids,
)
from diffmix.data.schemes import get_scheme
from diffmix.errors import ClassSchemeError, DataError, PairingError
from diffmix.metrics import read_label_file, remap_label
from diffmix.metrics.evaluate import evaluate_folders, true_merge


def two_nuclei() -> np.ndarray:
    inst = np.zeros((12, 12), np.int32)
    inst[1:4, 1:4] = 3
    inst[6:10, 5:9] = 8
    return inst


def test_format_names_cuts_long_lists() -> None:
    assert format_names(["a", "b"]) == "a, b"
    names = [f"n{i}" for i in range(25)]
    assert format_names(names) == ", ".join(names[:20]) + " ... (25 in all)"
    assert format_names(names, limit=2) == "n0, n1 ... (25 in all)"


def test_files_by_name_two_naming_rules(tmp_path: Path) -> None:
    for name in ("a.b.mat", "a.npy", "c.MAT", ".d.mat", "e.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "dir.mat").mkdir()
    # dataset rule: stem, dot-files skipped, suffix in any case
    groups = files_by_name(tmp_path, (".mat", ".npy"))
    assert {n: [p.name for p in ps] for n, ps in groups.items()} == {
        "a.b": ["a.b.mat"], "a": ["a.npy"], "c": ["c.MAT"], "dir": ["dir.mat"]
    }
    # official rule (compute_stats): before the first dot, regular files only, dot-files kept
    groups = files_by_name(tmp_path, (".mat", ".npy"), official=True)
    assert {n: [p.name for p in ps] for n, ps in groups.items()} == {
        "": [".d.mat"], "a": ["a.b.mat", "a.npy"], "c": ["c.MAT"]
    }


def test_label_files_clash_and_labels_subfolder(tmp_path: Path) -> None:
    np.save(tmp_path / "y.npy", two_nuclei())
    np.save(tmp_path / "x.npy", two_nuclei())
    (tmp_path / "x.a.mat").write_bytes(b"")
    (tmp_path / "y.b.mat").write_bytes(b"")
    # the clash met first in sorted order is the one named
    with pytest.raises(PairingError, match=r"x\.a\.mat and x\.npy both give image 'x'"):
        label_files(tmp_path)
    root = tmp_path / "ds"
    (root / "Labels").mkdir(parents=True)
    np.save(root / "Labels" / "k.npy", two_nuclei())
    assert label_files(root) == {"k": root / "Labels" / "k.npy"}
    (root / "Labels" / "k.npy").unlink()
    with pytest.raises(DataError, match="no .mat or .npy label files"):
        label_files(root)
    with pytest.raises(DataError, match="not a folder"):
        label_files(tmp_path / "nope")


def test_read_npy_labels_layouts(tmp_path: Path) -> None:
    inst, types = two_nuclei(), (two_nuclei() > 0).astype(np.int32) * 2
    np.save(tmp_path / "stacked.npy", np.stack([inst, types]))
    np.save(tmp_path / "channels.npy", np.stack([inst, types], axis=2))
    np.save(tmp_path / "hw.npy", inst)
    patch = np.concatenate([np.full((12, 12, 3), 7), inst[..., None], types[..., None]], axis=2)
    np.save(tmp_path / "patch.npy", patch)
    for name in ("stacked", "channels"):
        got_inst, got_types, image = read_npy_labels(tmp_path / f"{name}.npy", DATASET_NPY)
        assert np.array_equal(got_inst, inst) and np.array_equal(got_types, types) and image is None
    got_inst, got_types, image = read_npy_labels(tmp_path / "patch.npy", DATASET_NPY)
    assert image.dtype == np.uint8 and image.shape == (12, 12, 3) and np.all(image == 7)
    assert np.array_equal(got_inst, inst) and np.array_equal(got_types, types)
    got_inst, got_types, image = read_npy_labels(tmp_path / "hw.npy", PREDICTION_NPY)
    assert np.array_equal(got_inst, inst) and got_types is None and image is None
    # each reader names the layouts it accepts
    with pytest.raises(DataError, match=r"must be 2xHxW, HxWx2 \(inst, type\) or HxWx5 patches, got \(12, 12\)"):
        read_npy_labels(tmp_path / "hw.npy", DATASET_NPY)
    with pytest.raises(DataError, match=r"must be HxW or HxWx2 \(inst, type\), got \(2, 12, 12\)"):
        read_npy_labels(tmp_path / "stacked.npy", PREDICTION_NPY)
    # a 2xHx2 array is stacked for the dataset reader (checked first) and channels for evaluation
    both = np.arange(2 * 5 * 2).reshape(2, 5, 2)
    np.save(tmp_path / "both.npy", both)
    assert np.array_equal(read_npy_labels(tmp_path / "both.npy", DATASET_NPY)[0], both[0])
    assert np.array_equal(read_npy_labels(tmp_path / "both.npy", PREDICTION_NPY)[0], both[..., 0])
    bad = patch.copy()
    bad[0, 0, 0] = 300
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(DataError, match="outside 0..255"):
        read_npy_labels(tmp_path / "bad.npy", DATASET_NPY)


def test_empty_npy_is_a_data_error_for_both_readers(tmp_path: Path) -> None:
    # np.load raises EOFError on an empty file; `diffmix evaluate` let it escape (exit 130)
    (tmp_path / "e.npy").write_bytes(b"")
    with pytest.raises(DataError, match=r"e\.npy: unreadable \.npy file"):
        read_label_maps(tmp_path / "e.npy")
    with pytest.raises(DataError, match=r"e\.npy: unreadable \.npy file"):
        read_label_file(tmp_path / "e.npy")


def test_read_label_maps_mat_with_inst_type_only(tmp_path: Path) -> None:
    inst = two_nuclei()
    sio.savemat(tmp_path / "a.mat", {"inst_map": inst, "inst_type": np.array([[2], [4]])})
    got_inst, types, image = read_label_maps(tmp_path / "a.mat")
    assert image is None and got_inst.dtype == np.int32 and types.dtype == np.int32
    assert np.array_equal(types, np.where(inst == 3, 2, np.where(inst == 8, 4, 0)))


def test_merged_once_by_both_readers(tmp_path: Path) -> None:
    root = tmp_path / "merged"
    (root / "Labels").mkdir(parents=True)
    write_dataset_json(root, get_scheme("consep"))
    meta, found = find_dataset_json(root / "Labels")  # a Labels/ folder finds its root's
    assert found == root and meta["merged"] is True
    assert find_dataset_json(tmp_path) == (None, tmp_path)
    consep = get_scheme("consep")
    assert already_merged(root, meta, consep).name == "consep"
    assert already_merged(root, meta, None).name == "consep"
    assert already_merged(tmp_path, None, consep) is None
    assert already_merged(tmp_path, {"scheme": meta["scheme"], "merged": False}, consep) is None
    # the same refusal, with the same words, from the dataset reader and the evaluation
    with pytest.raises(ClassSchemeError, match=rf"{root}: labels are already merged with scheme 'consep'; "
                                               r"merging them again with 'glysac' would apply a class merge twice"):
        already_merged(root, meta, get_scheme("glysac"))
    for folder in (root, root / "Labels"):
        with pytest.raises(ClassSchemeError, match=rf"{root}: labels are already merged"):
            true_merge(folder, get_scheme("glysac"))
        assert true_merge(folder, consep) is None
    assert true_merge(tmp_path, consep) is consep and true_merge(root, None) is None
    # (read_dataset's side of the same refusal: test_data.test_raw_merge_applied_once)


def test_evaluate_merges_raw_npy_types_once(tmp_path: Path) -> None:
    true, pred = tmp_path / "true", tmp_path / "pred"
    true.mkdir()
    pred.mkdir()
    inst = two_nuclei()
    raw = np.where(inst == 3, 4, np.where(inst == 8, 3, 0))  # CoNSeP raw 4 and 3 both merge to 3
    np.save(true / "a.npy", np.stack([inst, raw], axis=2))
    np.save(pred / "a.npy", np.stack([inst, (inst > 0) * 3], axis=2))
    assert evaluate_folders(pred, true, scheme="consep")["type"]["acc"] == 1.0
    write_dataset_json(true, get_scheme("consep"))  # now says merged: 4 stays 4 (spindle) != 3
    assert evaluate_folders(pred, true, scheme="consep")["type"]["acc"] == 0.5


def test_as_class_ids_refuses_what_a_merge_cannot_look_up() -> None:
    assert as_class_ids(np.array([1.0, 2.0]), "w", "inst_type").tolist() == [1, 2]
    assert as_class_ids(np.array([True, False]), "w", "t").dtype == np.int64
    with pytest.raises(DataError, match="w: inst_type has non-integer class ids"):
        as_class_ids(np.array([1.5]), "w", "inst_type")
    with pytest.raises(DataError, match="w: t has negative class ids"):
        as_class_ids(np.array([-1]), "w", "t")
    with pytest.raises(DataError, match="w: t has dtype <U1, expected integers"):
        as_class_ids(np.array(["a"]), "w", "t")


@pytest.mark.parametrize(
    "inst",
    [
        np.array([[0, 5, 5], [9, 0, 2**31 - 1]]),
        np.array([[1, 2], [2, 0]], np.int32),
        np.zeros((3, 4), np.int64),
        np.array([[3, 3], [7, 7]], np.uint16),
        np.arange(20).reshape(4, 5) * 1000,
    ],
)
def test_one_compaction_behind_every_remap(inst: np.ndarray) -> None:
    ids = np.unique(inst[inst > 0])
    expected = np.searchsorted(np.concatenate([[0], ids]), inst).astype(np.int32)  # 1..N in order
    present, dense = compact_ids(inst)
    assert present.tolist() == ids.tolist() and dense.dtype == np.int32
    for got in (dense, remap_ids(inst), remap_label(inst)):
        assert got.dtype == np.int32 and np.array_equal(got, expected)
    assert remap_label(inst) is not inst
