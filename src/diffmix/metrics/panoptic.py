"""Class-aware panoptic quality as PanNuke and CoNIC report it: mPQ, bPQ and mPQ+.

Users of the other nuclei datasets compare numbers computed by their challenge's own script,
not hover_net's per-image PQ. Both are built here from the same `OverlapTable` and the same
strict pairing (IoU > 0.5) as `diffmix.metrics.instance`, so the three differ only in *what is
averaged*:

**PanNuke** (TIA-Lab PanNuke-metrics `run.py` with `get_fast_pq`, the intended semantics;
the released script does not run as is: `pq = np.nan` for `pq_tmp = np.nan`, undefined names):

- per image i and class c: PQ_ic = hover_net PQ of the class-c nuclei only (DQ without epsilon,
  SQ / (TP + 1e-6)), or *skipped* (NaN) when the image has no true nucleus of class c. A
  prediction of class c in an image without true class-c nuclei therefore costs nothing;
- per image: mPQ_i = mean of the PQ_ic not skipped; bPQ_i = class-agnostic PQ, skipped when
  the image has no true nucleus at all;
- per tissue t: mean over its images of mPQ_i (resp. bPQ_i), skipped values left out;
- **mPQ** and **bPQ** = mean over tissues of the tissue values (without tissue labels all
  images form one tissue, and the values are means over images);
- per-class PQ_c = mean over images of PQ_ic (skipped left out).

**CoNIC** (`compute_stats.py` + `get_multi_pq_info`): per class c, TP, FP, FN and the summed
IoU of matched pairs are *pooled over all images*, then DQ_c = TP / (TP + FP/2 + FN/2 + 1e-6),
SQ_c = ΣIoU / (TP + 1e-6), PQ_c = DQ_c·SQ_c, and **mPQ+** = mean of PQ_c over every class of
the class list. A class with no true and no predicted nucleus anywhere has PQ_c = 0 and still
counts in the mean (the official arithmetic: 0 / 1e-6).

How they relate to hover_net's PQ (`diffmix evaluate`'s "PQ", a mean over images of the
class-agnostic PQ):

- bPQ equals the mean PQ when every image has a true nucleus and there is one tissue;
  otherwise bPQ leaves out images without true nuclei (diffmix's PQ counts them: 1.0 when the
  prediction is empty too, else 0.0) and weights tissues equally instead of images.
- mPQ and mPQ+ need the class to match as well (an instance is matched only within its class).
  mPQ skips (image, class) cells without true nuclei, so it can exceed bPQ; mPQ+ pools over
  images, so images with many nuclei weigh more, and it has the 1e-6 in DQ, so a perfect
  prediction gives (N / (N + 1e-6)) * (N / (N + 1e-6)) per class, not 1.

On toy predictions (`diffmix demo`'s baseline segmenters of fold 0 on its 6 toy test tiles,
`diffmix seg infer RUN/seg/NET/baseline/fold0/final.safetensors RUN/data/test/Images PRED` then
`diffmix evaluate --pred PRED --true RUN/data/test --scheme consep --pannuke --conic`):

| network | PQ | bPQ | mPQ | mPQ+ | per-class PQ / PQ+ (misc, inflammatory, epithelial, spindle) |
|---|---|---|---|---|---|
| small HoVer-style net | 0.657 | 0.657 | 0.330 | 0.330 | 0/0, .504/.487, .814/.834, 0/0 |
| CPU SONNET (24 steps) | 0.120 | 0.120 | 0.018 | 0.019 | 0/0, 0/0, 0/0, .073/.075 |

bPQ equals PQ (every tile has nuclei, one tissue); mPQ and mPQ+ are about half of it, because
a nucleus found but typed wrong counts as a miss in its true class and a false positive in the
predicted one, and a class never predicted (miscellaneous, spindle here) scores 0 in both.
mPQ (per-image means over the classes an image has) and mPQ+ (counts pooled over the images)
differ only in weighting here.

Input conventions: each image is `ClassedInstances(inst_map, ids, types)` with `types[k]` the
class of instance `ids[k]`; instances whose id is not listed have class 0 (they count for bPQ
only). Undefined values (everything skipped) are None, also in the `--json` output.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from diffmix.errors import DataError
from diffmix.metrics.instance import _pq, overlap_table

#: CoNIC's epsilons (compute_stats.py): DQ and SQ denominators both get + 1e-6.
CONIC_EPS = 1.0e-6


class ClassedInstances(NamedTuple):
    """One image's instances with their classes: inst_map HxW, ids (N,), types (N,)."""

    inst_map: np.ndarray
    ids: np.ndarray
    types: np.ndarray


def class_inst_map(image: ClassedInstances, cls: int) -> np.ndarray:
    """The instance map with every instance not of class `cls` set to background (int64).

    This is CoNIC's `inst * (class_map == c)` and PanNuke's per-class mask channel, taken per
    instance, so a prediction file that carries only `inst_type` works as well as a type map.
    """
    inst = np.asarray(image.inst_map)
    ids = np.asarray(image.ids, dtype=np.int64).reshape(-1)
    types = np.asarray(image.types, dtype=np.int64).reshape(-1)
    if ids.size != types.size:
        raise DataError(f"{ids.size} instance ids but {types.size} instance types")
    keep = np.sort(ids[types == int(cls)])
    flat = inst.reshape(-1).astype(np.int64)
    if keep.size == 0:
        return np.zeros(inst.shape, dtype=np.int64)
    pos = np.clip(np.searchsorted(keep, flat), 0, keep.size - 1)
    mask = keep[pos] == flat
    return np.where(mask, flat, 0).reshape(inst.shape)


def classed_instances(name: str, inst_map: np.ndarray, types: np.ndarray | None) -> ClassedInstances:
    """An evaluation label (`LabelFile` fields) as `ClassedInstances`.

    `types` must list one class per instance in increasing id order, which is how diffmix and
    CoNSeP write `inst_type` and how types derived from a type map come. A file whose
    `inst_type` rows cannot be matched to the instances (hover_net drops instances with
    contours under 3 points from `inst_type` but keeps them in `inst_map`) is refused: its
    class-aware PQ would be a guess.
    """
    if types is None:
        raise DataError(f"{name}: class-aware PQ needs class information (a type_map or inst_type)")
    inst = np.asarray(inst_map)
    ids = np.unique(inst)
    ids = ids[ids > 0].astype(np.int64)
    types = np.asarray(types).reshape(-1)
    if types.size != ids.size:
        raise DataError(
            f"{name}: {types.size} inst_type rows for {ids.size} instances in inst_map; "
            "class-aware PQ needs one class per instance (write a type_map or a full inst_type)"
        )
    return ClassedInstances(inst, ids, types.astype(np.int64))


def read_tissues(path: str | Path, names: Sequence[str]) -> list[str]:
    """The tissue of each named image from a file.

    `.json`: {image name: tissue}; `.csv`/`.tsv`: lines `name,tissue` (a header line `name,...`
    is skipped); `.npy`: PanNuke's `types.npy`, one tissue per image in array order, which is
    the sorted order of the `pannuke_00000`... names diffmix gives PanNuke images.
    Every image must have a tissue; names the file does not know are listed in the error.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: tissue file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
            if arr.ndim != 1 or arr.size != len(names):
                raise DataError(f"{path}: {arr.shape} tissue labels for {len(names)} images (expected one per image)")
            return [str(v) for v in arr.tolist()]
        if suffix == ".json":
            table = json.loads(path.read_text())
            if not isinstance(table, dict):
                raise DataError(f"{path}: expected a JSON object {{image name: tissue}}")
        elif suffix in (".csv", ".tsv"):
            table = {}
            sep = "\t" if suffix == ".tsv" else ","
            for k, line in enumerate(path.read_text().splitlines()):
                if not line.strip():
                    continue
                parts = [x.strip() for x in line.split(sep)]
                if len(parts) < 2:
                    raise DataError(f"{path}:{k + 1}: expected 'name{sep}tissue'")
                if k == 0 and parts[0].lower() in ("name", "image"):
                    continue
                table[parts[0]] = parts[1]
        else:
            raise DataError(f"{path}: tissue labels must be .json, .csv, .tsv or PanNuke's types.npy")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable tissue labels ({exc})") from None
    missing = [n for n in names if n not in table]
    if missing:
        shown = ", ".join(missing[:10]) + (f" ... ({len(missing)} in all)" if len(missing) > 10 else "")
        raise DataError(f"{path}: no tissue for images {shown}")
    return [str(table[n]) for n in names]


def _mean_defined(values: Sequence[float | None]) -> float | None:
    """Mean of the values that are defined (np.nanmean), None when none is."""
    kept = [float(v) for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(kept)) if kept else None


def _check(true: Sequence[ClassedInstances], pred: Sequence[ClassedInstances], names: Sequence[str] | None) -> list[str]:
    if len(true) != len(pred):
        raise DataError(f"{len(true)} ground-truth images but {len(pred)} predictions")
    if not true:
        raise DataError("nothing to evaluate: no images")
    names = [str(i) for i in range(len(true))] if names is None else [str(n) for n in names]
    if len(names) != len(true):
        raise DataError(f"{len(names)} names for {len(true)} images")
    return names


def pannuke_pq(
    true: Sequence[ClassedInstances],
    pred: Sequence[ClassedInstances],
    class_ids: Sequence[int],
    tissues: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """PanNuke's mPQ and bPQ (module docstring), per class, per tissue and per image.

    tissues: the tissue of each image (PanNuke `types.npy`), or None for one group.
    Returns {"mpq", "bpq", "per_class": {c: PQ_c}, "per_tissue": {t: {"mpq", "bpq",
    "n_images"}}, "per_image": {name: {"mpq", "bpq", "pq": {c: PQ_ic}}}}; None = skipped.
    """
    names = _check(true, pred, names)
    if tissues is not None and len(tissues) != len(true):
        raise DataError(f"{len(tissues)} tissue labels for {len(true)} images")
    per_image: dict[str, dict[str, Any]] = {}
    for name, t, p in zip(names, true, pred):
        table = overlap_table(t.inst_map, p.inst_map)
        bpq = None if table.true_ids.size == 0 else float(_pq(table)[2])
        pq_c: dict[int, float | None] = {}
        for c in class_ids:
            tc = class_inst_map(t, c)
            if not tc.any():
                pq_c[int(c)] = None  # PanNuke: no true nucleus of class c here, skipped
                continue
            pq_c[int(c)] = float(_pq(overlap_table(tc, class_inst_map(p, c)))[2])
        per_image[name] = {"mpq": _mean_defined(list(pq_c.values())), "bpq": bpq, "pq": pq_c}
    groups = list(tissues) if tissues is not None else ["all"] * len(names)
    per_tissue: dict[str, dict[str, Any]] = {}
    for tissue in dict.fromkeys(str(g) for g in groups):
        members = [n for n, g in zip(names, groups) if str(g) == tissue]
        per_tissue[tissue] = {
            "mpq": _mean_defined([per_image[n]["mpq"] for n in members]),
            "bpq": _mean_defined([per_image[n]["bpq"] for n in members]),
            "n_images": len(members),
        }
    return {
        "mpq": _mean_defined([v["mpq"] for v in per_tissue.values()]),
        "bpq": _mean_defined([v["bpq"] for v in per_tissue.values()]),
        "per_class": {int(c): _mean_defined([per_image[n]["pq"][int(c)] for n in names]) for c in class_ids},
        "per_tissue": per_tissue,
        "per_image": per_image,
    }


def match_counts(true_inst: np.ndarray, pred_inst: np.ndarray) -> tuple[int, int, int, float]:
    """(TP, FP, FN, summed IoU of the matched pairs) with hover_net's strict IoU > 0.5 pairing."""
    table = overlap_table(true_inst, pred_inst)
    iou = table.inter / table.union if table.inter.size else np.zeros(0)
    matched = iou[iou > 0.5]
    tp = int(matched.size)
    return tp, int(table.pred_ids.size) - tp, int(table.true_ids.size) - tp, float(matched.sum())


def conic_pq(
    true: Sequence[ClassedInstances],
    pred: Sequence[ClassedInstances],
    class_ids: Sequence[int],
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """CoNIC's mPQ+ and per-class PQ pooled over the images (module docstring).

    Returns {"mpq_plus", "per_class": {c: {"pq", "dq", "sq", "tp", "fp", "fn", "sum_iou"}}}.
    """
    _check(true, pred, names)
    if not class_ids:
        raise DataError("mPQ+ needs a class list (--scheme or --classes)")
    per_class: dict[int, dict[str, Any]] = {}
    for c in class_ids:
        tp = fp = fn = 0
        sum_iou = 0.0
        for t, p in zip(true, pred):
            a, b, d, s = match_counts(class_inst_map(t, c), class_inst_map(p, c))
            tp, fp, fn, sum_iou = tp + a, fp + b, fn + d, sum_iou + s
        dq = tp / (tp + 0.5 * fp + 0.5 * fn + CONIC_EPS)
        sq = sum_iou / (tp + CONIC_EPS)
        per_class[int(c)] = {"pq": dq * sq, "dq": dq, "sq": sq, "tp": tp, "fp": fp, "fn": fn, "sum_iou": sum_iou}
    return {"mpq_plus": float(np.mean([v["pq"] for v in per_class.values()])), "per_class": per_class}


def format_panoptic(result: Mapping[str, Any], class_name: Mapping[int, str] | None = None) -> str:
    """Plain-text lines for the "pannuke" and/or "conic" entries of an evaluation result."""
    def num(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    def label(c: int) -> str:
        return f"{c} {class_name[c]}" if class_name and c in class_name else str(c)

    out: list[str] = []
    if "pannuke" in result:
        pn = result["pannuke"]
        out.append(f"PanNuke: mPQ {num(pn['mpq'])}  bPQ {num(pn['bpq'])}")
        for c, v in pn["per_class"].items():
            out.append(f"  PQ class {label(int(c))}: {num(v)}")
        if len(pn["per_tissue"]) > 1 or "all" not in pn["per_tissue"]:
            for tissue, v in pn["per_tissue"].items():
                out.append(f"  tissue {tissue} ({v['n_images']}): mPQ {num(v['mpq'])}  bPQ {num(v['bpq'])}")
    if "conic" in result:
        cn = result["conic"]
        out.append(f"CoNIC: mPQ+ {cn['mpq_plus']:.4f}")
        for c, v in cn["per_class"].items():
            out.append(
                f"  PQ+ class {label(int(c))}: {v['pq']:.4f} (DQ {v['dq']:.4f} SQ {v['sq']:.4f}; "
                f"TP {v['tp']} FP {v['fp']} FN {v['fn']})"
            )
    return "\n".join(out)
