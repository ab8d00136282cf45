"""Nucleus type statistics pooled over a data set: F1_d, Acc and per-class F1 (official-exact).

This is hover_net `compute_stats.run_nuclei_type_stat` with `exhaustive=True`
(hovernet_notes 5): in each image the true and predicted centroids (x, y), cast to float32,
are paired by Munkres on their Euclidean distances (`pair_coordinates`, radius 12 px,
a distance of exactly 12 is a match); pairs and unpaired nuclei are pooled over all images,
then

- F1_d = 2 TP / (2 TP + FP + FN)                         (detection)
- Acc  = paired nuclei whose types agree / paired nuclei (classification)
- F1_t = 2 TP_t / (2 TP_t + 2 FP_t + 2 FN_t + FP_d,t + FN_d,t)   for each class t, where
  TP_t/FP_t/FN_t count *paired* nuclei by (true, pred) type and FP_d,t / FN_d,t count
  *unpaired* predicted / true nuclei of type t (the official weights 2, 2, 1, 1).

Where the official code crashes, returns NaN or is wrong, the values are defined here
(hovernet_notes 6):

- An image without true or without predicted nuclei simply contributes its unpaired
  nuclei. The official code inserts a dummy nucleus of type 0 at (0, 0) on each empty side,
  which creates a fake "correct" pair when both are empty (inflating F1_d and Acc) and can
  pair with a real prediction near the corner; that defect is not reproduced.
- No nucleus at all in the whole set (0/0 everywhere): F1_d = Acc = 1.0 and every F1_t = 1.0.
- Nuclei but no pair (the official code raises in `np.concatenate([])`): F1_d = 0.0 and
  Acc = 0.0.
- A class with no true and no predicted nucleus (official: 0/0 = NaN): F1_t = 1.0, nothing
  to find and nothing wrongly claimed. Choose the class list (the scheme's) accordingly.
- The class list is always explicit; the official default (`np.unique` of the true types)
  would let a missing class silently vanish from the table.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from diffmix.errors import DataError
from diffmix.metrics.instance import _as_ids, _compact

#: The official pairing radius in pixels (compute_stats.py: `pair_coordinates(..., 12)`).
PAIR_RADIUS = 12.0


def _as_centroids(xy: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(xy)
    if arr.size == 0:
        return np.zeros((0, 2), dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise DataError(f"{what} must be Nx2 (x, y), got shape {arr.shape}")
    if arr.dtype.kind not in "iuf" or not np.all(np.isfinite(arr)):
        raise DataError(f"{what} must be finite numbers, got dtype {arr.dtype}")
    # spec (hovernet_notes 5): the official code casts centroids to float32 before cdist.
    return arr.astype(np.float32)


def _as_types(types: np.ndarray, n: int, what: str) -> np.ndarray:
    arr = np.asarray(types)
    if arr.size == 0 and n == 0:
        return np.zeros(0, dtype=np.int64)
    # Nx1 and 1xN both mean N types (the official `[:, 0]` reads a 1xN row as one type).
    if arr.ndim > 2 or (arr.ndim == 2 and 1 not in arr.shape):
        raise DataError(f"{what} must be a vector of N types, got shape {arr.shape}")
    arr = arr.reshape(-1)
    if arr.size != n:
        raise DataError(f"{what} has {arr.size} entries for {n} centroids")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise DataError(f"{what} has non-integer class ids")
    elif arr.dtype.kind not in "iub":
        raise DataError(f"{what} has dtype {arr.dtype}, expected integer class ids")
    return arr.astype(np.int64)


def pair_coordinates(
    true_xy: np.ndarray, pred_xy: np.ndarray, radius: float = PAIR_RADIUS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pair two point sets one to one (official `pair_coordinates`).

    true_xy (N, 2), pred_xy (M, 2): (x, y) coordinates, cast to float32 as upstream.
    Munkres minimises the total Euclidean distance over a maximal assignment of the full
    N x M distance matrix (scipy `cdist` + `linear_sum_assignment`, rows = truths); pairs
    farther than `radius` are then dropped, so a distance of exactly `radius` is a match.

    Returns (pairs (K, 2) int64 [true index, pred index] in increasing true index,
    unpaired_true (N-K,) int64, unpaired_pred (M-K,) int64). Either set may be empty.
    """
    a = _as_centroids(true_xy, "true centroids")
    b = _as_centroids(pred_xy, "pred centroids")
    if a.shape[0] == 0 or b.shape[0] == 0:
        pairs = np.zeros((0, 2), dtype=np.int64)
    else:
        dist = cdist(a, b, metric="euclidean")
        rows, cols = linear_sum_assignment(dist)
        keep = dist[rows, cols] <= radius
        pairs = np.stack([rows[keep], cols[keep]], axis=1).astype(np.int64)
    unpaired_true = np.setdiff1d(np.arange(a.shape[0]), pairs[:, 0]).astype(np.int64)
    unpaired_pred = np.setdiff1d(np.arange(b.shape[0]), pairs[:, 1]).astype(np.int64)
    return pairs, unpaired_true, unpaired_pred


def _ratio(num: int, den: int, empty: float) -> float:
    return float(num / den) if den else empty


#: Per-image counts behind the pooled statistics: detection (paired, unpaired pred, unpaired
#: true, paired with equal types), then for each class (paired TP, paired FP, paired FN,
#: unpaired pred, unpaired true). Pooled statistics are functions of their sums, so an
#: interval over test images (diffmix.stats) resamples rows of this table.
DETECTION_COUNTS = ("tp_d", "fp_d", "fn_d", "agree")
CLASS_COUNTS = ("tp", "fp", "fn", "fp_d", "fn_d")


def type_counts(
    images: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    class_ids: Sequence[int],
    radius: float = PAIR_RADIUS,
) -> np.ndarray:
    """(n_images, 4 + 5 * len(class_ids)) int64: each image's DETECTION_COUNTS, then
    CLASS_COUNTS for each class in `class_ids` order. `images` as for `type_stats`."""
    rows = []
    for k, (t_xy, t_type, p_xy, p_type) in enumerate(images):
        t_xy = _as_centroids(t_xy, f"image {k}: true centroids")
        p_xy = _as_centroids(p_xy, f"image {k}: pred centroids")
        t_type = _as_types(t_type, t_xy.shape[0], f"image {k}: true types")
        p_type = _as_types(p_type, p_xy.shape[0], f"image {k}: pred types")
        pairs, lone_t, lone_p = pair_coordinates(t_xy, p_xy, radius)
        pt, pp = t_type[pairs[:, 0]], p_type[pairs[:, 1]]
        ut, up = t_type[lone_t], p_type[lone_p]
        row = [pt.size, up.size, ut.size, np.count_nonzero(pt == pp)]
        for cls in class_ids:
            t_is, p_is = pt == int(cls), pp == int(cls)
            row += [
                np.count_nonzero(t_is & p_is),
                np.count_nonzero(~t_is & p_is),  # paired, predicted cls, truly another
                np.count_nonzero(t_is & ~p_is),
                np.count_nonzero(up == int(cls)),
                np.count_nonzero(ut == int(cls)),
            ]
        rows.append(row)
    width = len(DETECTION_COUNTS) + len(CLASS_COUNTS) * len(class_ids)
    return np.asarray(rows, dtype=np.int64).reshape(-1, width)


def stats_from_counts(total: np.ndarray, class_ids: Sequence[int]) -> dict:
    """`type_stats`'s dict from summed `type_counts` rows (the official formulas)."""
    total = np.asarray(total, dtype=np.int64)
    tp_d, fp_d, fn_d, agree = (int(v) for v in total[:4])
    nothing = tp_d + fp_d + fn_d == 0
    f1_d = _ratio(2 * tp_d, 2 * tp_d + fp_d + fn_d, 1.0)
    acc = _ratio(agree, tp_d, 1.0 if nothing else 0.0)
    f1: dict[int, float] = {}
    for j, cls in enumerate(class_ids):
        tp_t, fp_t, fn_t, fp_dt, fn_dt = (int(v) for v in total[4 + 5 * j : 9 + 5 * j])
        # official _f1_type, w = (2, 2, 1, 1); its TN term is always 0 inside the subset.
        f1[int(cls)] = _ratio(2 * tp_t, 2 * tp_t + 2 * fp_t + 2 * fn_t + fp_dt + fn_dt, 1.0)
    return {"f1_d": f1_d, "acc": acc, "f1": f1}


def type_stats(
    images: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    class_ids: Sequence[int],
    radius: float = PAIR_RADIUS,
) -> dict:
    """Detection and classification statistics pooled over images.

    images: per image (true_centroids (N, 2) (x, y), true_types (N,), pred_centroids (M, 2),
        pred_types (M,)); Nx1 type columns are accepted. Centroids and types are aligned.
    class_ids: the classes to report F1 for (the scheme's merged ids, e.g. (1, 2, 3, 4)).

    Returns {"f1_d": float, "acc": float, "f1": {class_id: float}} with the official
    formulas (module docstring), exact where the official code returns a number.
    """
    return stats_from_counts(type_counts(images, class_ids, radius).sum(axis=0), class_ids)


def instance_types_centroids(
    inst_map: np.ndarray, type_map: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids (N,), centroids (N, 2) float64 (x, y), types (N,) int64) of an instance map.

    Instances are in increasing id order. The centroid is the mean pixel coordinate
    (x = column, y = row), the centre of mass hover_net computes with cv2 moments. The type
    is the majority class under the instance, ignoring class 0 unless nothing else is there
    (hover_net `process()`: "if the majority is 0 and a second type exists, use the
    second"); ties go to the smallest class id. Without a type_map every type is 0.
    """
    inst = np.asarray(inst_map)
    if inst.ndim != 2:
        raise DataError(f"inst_map must be HxW, got shape {inst.shape}")
    flat = _as_ids(inst, "inst_map")
    ids, area, idx = _compact(flat)
    n = ids.size
    if n == 0:
        return ids, np.zeros((0, 2)), np.zeros(0, dtype=np.int64)
    fg = idx > 0
    pix = np.flatnonzero(fg)
    rows, cols = np.divmod(pix, inst.shape[1])
    lab = idx[fg] - 1
    cx = np.bincount(lab, weights=cols, minlength=n) / area
    cy = np.bincount(lab, weights=rows, minlength=n) / area
    if type_map is None:
        types = np.zeros(n, dtype=np.int64)
    else:
        tmap = np.asarray(type_map)
        if tmap.shape != inst.shape:
            raise DataError(f"type_map shape {tmap.shape} != inst_map shape {inst.shape}")
        t = _as_ids(tmap, "type_map")[fg]
        k = int(t.max()) + 1 if t.size else 1
        votes = np.bincount(lab * k + t, minlength=n * k).reshape(n, k)
        types = np.zeros(n, dtype=np.int64)
        if k > 1:
            typed = votes[:, 1:].sum(axis=1) > 0
            types[typed] = np.argmax(votes[typed, 1:], axis=1) + 1
    return ids, np.stack([cx, cy], axis=1), types
