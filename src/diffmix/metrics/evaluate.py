"""Evaluate predictions against ground truth: per-image instance metrics + pooled type stats.

`evaluate_samples` works on arrays; `evaluate_folders` reads two folders of label files the
way hover_net `compute_stats.py` does (hovernet_notes 5-6) and returns the same structure,
which is exactly what `diffmix evaluate --json` writes:

    {"per_image": {NAME: {"dice", "aji", "aji_plus", "dq", "sq", "pq"}},
     "mean": {same keys},                      # plain mean over images (official)
     "type": {"f1_d", "acc", "f1": {CLASS_ID: value}},   # pooled over images (official)
     "type_counts": {"class_ids", "columns", "per_image": {NAME: counts}},  # behind "type"
     "n_images": N}

Differences from the official script, all deliberate: a ground-truth file without a
prediction (or the reverse) is an error listing the names (upstream iterates over the
prediction folder and silently skips such ground truth); the ground-truth class merge is
applied when a scheme says so (upstream has it commented out); empty images get the defined
values documented in `diffmix.metrics.instance` and `diffmix.metrics.classification`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from diffmix.data.labels import (
    PREDICTION_NPY,
    already_merged,
    as_class_ids,
    find_dataset_json,
    format_names,
    label_files,
    official_name,
    read_mat_labels,
    read_npy_labels,
)
from diffmix.data.schemes import ClassScheme, get_scheme
from diffmix.errors import ClassSchemeError, DataError, PairingError
from diffmix.metrics.classification import (
    CLASS_COUNTS,
    DETECTION_COUNTS,
    instance_types_centroids,
    stats_from_counts,
    type_counts,
)
from diffmix.metrics.compat import hovernet_type_stats
from diffmix.metrics.instance import INSTANCE_METRICS, instance_metrics
from diffmix.metrics.panoptic import classed_instances, conic_pq, pannuke_pq, read_tissues

# Label files are found, read and merged-once by `diffmix.data.labels`, the layer the dataset
# reader uses too (`label_files` stays importable from here).


@dataclass(frozen=True)
class LabelFile:
    """One image's labels as the metrics need them.

    inst_map: HxW instance ids. centroids: (N, 2) (x, y) float. types: (N,) int64 class ids
    aligned with centroids, or None when the file carries no class information.
    """

    name: str
    inst_map: np.ndarray
    centroids: np.ndarray
    types: np.ndarray | None


def labels_from_maps(name: str, inst_map: np.ndarray, type_map: np.ndarray | None) -> LabelFile:
    """Centroids and per-instance types derived from the maps (`instance_types_centroids`)."""
    _, centroids, types = instance_types_centroids(inst_map, type_map)
    return LabelFile(name, np.asarray(inst_map), centroids, types if type_map is not None else None)


def _mean(values: list[float]) -> float:
    return float(np.mean(np.asarray(values, dtype=np.float64)))


def evaluate_labels(
    true: Sequence[LabelFile], pred: Sequence[LabelFile], class_ids: Sequence[int] | None
) -> dict[str, Any]:
    """The evaluation structure (module docstring) for aligned lists of labels.

    Type statistics need class information on both sides: when any file lacks it, "acc" is
    None and "f1" is {} (F1_d, which needs only centroids, is still reported). class_ids
    None means the classes present in the ground truth (the official default).
    """
    if len(true) != len(pred):
        raise DataError(f"{len(true)} ground-truth images but {len(pred)} predictions")
    if not true:
        raise DataError("nothing to evaluate: no images")
    per_image: dict[str, dict[str, float]] = {}
    for t, p in zip(true, pred):
        if t.name in per_image:
            raise DataError(f"image name {t.name!r} appears twice")
        try:
            per_image[t.name] = instance_metrics(t.inst_map, p.inst_map)
        except DataError as exc:
            raise DataError(f"{t.name}: {exc}") from None
    mean = {k: _mean([m[k] for m in per_image.values()]) for k in INSTANCE_METRICS}

    typed = all(x.types is not None for x in (*true, *pred))
    if class_ids is None:
        present = np.concatenate([t.types for t in true if t.types is not None] or [np.zeros(0)])
        class_ids = sorted(int(c) for c in np.unique(present) if c > 0)
    images = []
    for t, p in zip(true, pred):
        t_types = t.types if typed else np.zeros(len(t.centroids), dtype=np.int64)
        p_types = p.types if typed else np.zeros(len(p.centroids), dtype=np.int64)
        images.append((t.centroids, t_types, p.centroids, p_types))
    classes = [int(c) for c in class_ids] if typed else []
    try:
        counts = type_counts(images, classes)
    except DataError as exc:
        raise DataError(f"type statistics: {exc}") from None
    stats = stats_from_counts(counts.sum(axis=0), classes)
    if not typed:
        stats = {"f1_d": stats["f1_d"], "acc": None, "f1": {}}
    # The per-image counts behind the pooled statistics, for intervals over images (diffmix.stats).
    columns = list(DETECTION_COUNTS) + [f"{c}_{name}" for c in classes for name in CLASS_COUNTS]
    per_image_counts = {name: [int(v) for v in row] for name, row in zip(per_image, counts)}
    return {
        "per_image": per_image,
        "mean": mean,
        "type": stats,
        "type_counts": {"class_ids": classes, "columns": columns, "per_image": per_image_counts},
        "n_images": len(per_image),
    }


def evaluate_samples(
    true_pairs: Sequence[tuple[np.ndarray, np.ndarray | None]],
    pred_pairs: Sequence[tuple[np.ndarray, np.ndarray | None]],
    class_ids: Sequence[int],
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Evaluate per-image (inst_map, type_map) pairs; returns the `--json` structure.

    true_pairs / pred_pairs: aligned lists of (inst_map HxW, type_map HxW or None) with
    merged class ids. Centroids (x, y) and per-instance types are derived from the maps
    (`instance_types_centroids`). class_ids: classes to report F1 for (the scheme's).
    names: image names for "per_image" (default "0", "1", ...).
    """
    if names is None:
        names = [str(i) for i in range(len(true_pairs))]
    if len(names) != len(true_pairs):
        raise DataError(f"{len(names)} names for {len(true_pairs)} images")
    true = [labels_from_maps(n, inst, types) for n, (inst, types) in zip(names, true_pairs)]
    pred = [labels_from_maps(n, inst, types) for n, (inst, types) in zip(names, pred_pairs)]
    return evaluate_labels(true, pred, class_ids)


# --------------------------------------------------------------------------- files


def true_merge(true_dir: str | Path, scheme: ClassScheme | None) -> ClassScheme | None:
    """The scheme to merge ground-truth classes with, or None when no merge applies.

    With a scheme the ground truth is raw (e.g. CoNSeP's 7 classes) and is merged, unless the
    `dataset.json` of the folder (or, for a `Labels/` folder, of its dataset root) says diffmix
    already merged it (a merge is applied exactly once); a folder merged with a different
    scheme is an error (`diffmix.data.labels.already_merged`).
    """
    if scheme is None:
        return None
    meta, root = find_dataset_json(Path(true_dir))
    return None if already_merged(root, meta, scheme) is not None else scheme


def read_label_file(path: str | Path, merge: ClassScheme | None = None) -> LabelFile:
    """Read one label file; `merge` maps raw class ids through a scheme (ground truth only).

    `.mat`: `inst_map` plus either `inst_type` (+ `inst_centroid`, else centroids from the
    map) as hover_net writes them, or a `type_map`; `inst_type` wins when both are present
    (as in compute_stats.py). `.npy`: HxW instance map, or HxWx2 (instance, type).
    """
    path = Path(path)
    name = official_name(path)
    where = str(path)
    if path.suffix.lower() == ".npy":
        inst, tmap, _ = read_npy_labels(path, PREDICTION_NPY)
        if tmap is not None and merge is not None:
            tmap = merge.merge_type_map(as_class_ids(tmap, where, "type map"), where=where)
        try:
            return labels_from_maps(name, inst, tmap)
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
    labels = read_mat_labels(path)
    inst = labels["inst_map"]
    try:
        ids, centroids, derived_types = instance_types_centroids(inst, labels.get("type_map"))
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None
    types: np.ndarray | None = derived_types if "type_map" in labels else None
    if "inst_type" in labels:
        types = as_class_ids(labels["inst_type"], where, "inst_type")
        if "inst_centroid" in labels:
            centroids = labels["inst_centroid"]
            if len(centroids) != len(types):
                raise DataError(
                    f"{where}: {len(types)} inst_type entries but {len(centroids)} inst_centroid rows"
                )
        elif len(types) != len(ids):
            raise DataError(f"{where}: {len(types)} inst_type entries for {len(ids)} instances")
    elif "inst_centroid" in labels:
        centroids = labels["inst_centroid"]
    if types is not None and merge is not None:
        types = merge.merge_type_map(types, where=f"{where} (inst_type)").astype(np.int64)
    return LabelFile(name, inst, np.asarray(centroids, dtype=np.float64).reshape(-1, 2), types)


def evaluate_folders(
    pred_dir: str | Path,
    true_dir: str | Path,
    scheme: str | Path | ClassScheme | None = None,
    class_ids: Sequence[int] | None = None,
    *,
    compat: str | None = None,
    pannuke: bool = False,
    conic: bool = False,
    tissues: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate a folder of predictions against a folder of ground truth.

    scheme: the class list is the scheme's merged ids, and raw ground-truth classes are
        merged through it (unless `dataset.json` says they already are); predictions are
        taken as already merged. class_ids: an explicit class list, nothing merged.
        Give at most one; with neither, the classes present in the ground truth are used.
    compat, pannuke, conic, tissues: the optional metrics of `field_metrics`.
    Files pair by the name before the first dot; a name on one side only is a PairingError.
    """
    if scheme is not None and class_ids is not None:
        raise ClassSchemeError("give a scheme or an explicit class list, not both")
    resolved = get_scheme(scheme) if scheme is not None else None
    if resolved is not None:
        class_ids = resolved.class_ids
    pred_files = label_files(pred_dir)
    true_files = label_files(true_dir)
    missing = sorted(set(true_files) - set(pred_files))
    if missing:
        raise PairingError(f"{pred_dir}: no prediction for ground-truth images {format_names(missing)}")
    extra = sorted(set(pred_files) - set(true_files))
    if extra:
        raise PairingError(f"{true_dir}: no ground truth for predicted images {format_names(extra)}")
    merge = true_merge(true_dir, resolved)
    names = sorted(true_files)
    true = [read_label_file(true_files[n], merge) for n in names]
    pred = [read_label_file(pred_files[n]) for n in names]
    for t, p in zip(true, pred):
        if np.shape(t.inst_map) != np.shape(p.inst_map):
            raise DataError(
                f"{t.name}: ground truth {np.shape(t.inst_map)} and prediction "
                f"{np.shape(p.inst_map)} differ in size"
            )
    result = evaluate_labels(true, pred, class_ids)
    return field_metrics(result, true, pred, class_ids, compat=compat, pannuke=pannuke, conic=conic, tissues=tissues)


#: `--compat` modes: whose dataset-level type statistics replace diffmix's.
COMPAT_MODES = ("hovernet",)


def field_metrics(
    result: dict[str, Any],
    true: Sequence[LabelFile],
    pred: Sequence[LabelFile],
    class_ids: Sequence[int] | None,
    *,
    compat: str | None = None,
    pannuke: bool = False,
    conic: bool = False,
    tissues: str | Path | None = None,
) -> dict[str, Any]:
    """Add the numbers other tools report to an evaluation result (changed in place, returned).

    compat "hovernet": "type" becomes hover_net's `run_nuclei_type_stat` values
        (`diffmix.metrics.compat`: a dummy (0, 0) nucleus of type 0 for an empty side, NaN for
        0/0, class list with the dummy's 0 when none is given) and "compat": "hovernet" is
        added; "type_counts" is dropped (its per-image counts have no dummy points).
    pannuke: "pannuke" = PanNuke mPQ/bPQ per class, tissue and image; tissues: a file giving
        each image's tissue (`diffmix.metrics.panoptic.read_tissues`), PanNuke only.
    conic: "conic" = CoNIC mPQ+ and per-class PQ pooled over images.
    class_ids None: the classes present in the ground truth (pannuke/conic).
    """
    if compat is not None and compat not in COMPAT_MODES:
        raise DataError(f"unknown compat mode {compat!r}: use one of {', '.join(COMPAT_MODES)}")
    if tissues is not None and not pannuke:
        raise DataError("tissue labels are used by PanNuke's mPQ/bPQ only: add --pannuke")
    typed = all(x.types is not None for x in (*true, *pred))
    if compat == "hovernet":
        if not typed:
            raise DataError("--compat hovernet needs class information (inst_type or type_map) in every file")
        images = [(t.centroids, t.types, p.centroids, p.types) for t, p in zip(true, pred)]
        try:
            result["type"] = hovernet_type_stats(images, class_ids)
        except DataError as exc:
            raise DataError(f"type statistics (--compat hovernet): {exc}") from None
        result.pop("type_counts", None)
        result["compat"] = compat
    if pannuke or conic:
        names = [t.name for t in true]
        t_cls = [classed_instances(f"{t.name} (ground truth)", t.inst_map, t.types) for t in true]
        p_cls = [classed_instances(f"{p.name} (prediction)", p.inst_map, p.types) for p in pred]
        if class_ids is None:
            present = np.concatenate([c.types for c in t_cls] or [np.zeros(0, np.int64)])
            class_ids = sorted(int(c) for c in np.unique(present) if c > 0)
        if pannuke:
            groups = read_tissues(tissues, names) if tissues is not None else None
            result["pannuke"] = pannuke_pq(t_cls, p_cls, class_ids, groups, names)
        if conic:
            result["conic"] = conic_pq(t_cls, p_cls, class_ids, names)
    return result


# --------------------------------------------------------------------------- output


def format_table(result: dict[str, Any], scheme: ClassScheme | None = None) -> str:
    """A plain-text table of an evaluation result (per image, mean, type statistics)."""
    heads = ["image", "Dice", "AJI", "AJI+", "DQ", "SQ", "PQ"]
    rows = [[name] + [f"{m[k]:.4f}" for k in INSTANCE_METRICS] for name, m in result["per_image"].items()]
    rows.append([f"mean ({result['n_images']})"] + [f"{result['mean'][k]:.4f}" for k in INSTANCE_METRICS])
    widths = [max(len(r[i]) for r in rows + [heads]) for i in range(len(heads))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    out = [line(heads), "-" * len(line(heads))] + [line(r) for r in rows[:-1]]
    out += ["-" * len(line(heads)), line(rows[-1]), ""]
    stats = result["type"]
    acc = "n/a (no class information)" if stats["acc"] is None else f"{stats['acc']:.4f}"
    out.append(f"type (pooled): F1_d {stats['f1_d']:.4f}  Acc {acc}")
    for cls, value in stats["f1"].items():
        label = f"{cls}"
        if scheme is not None and int(cls) in scheme.classes:
            label += f" {scheme.class_name(int(cls))}"
        out.append(f"  F1 class {label}: {value:.4f}")
    return "\n".join(out)


def to_json(result: dict[str, Any]) -> str:
    """The `--json` text: the result structure, class ids as string keys; NaN (hover_net's
    0/0 under --compat) is written as null, so the file is strict JSON."""
    return json.dumps(_finite(result), indent=2, allow_nan=False) + "\n"


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
