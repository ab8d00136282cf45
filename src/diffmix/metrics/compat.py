"""hover_net-compatible type statistics: `run_nuclei_type_stat` as it runs, dummy points included.

People reproducing HoVer-Net's tables compare against numbers printed by hover_net
`compute_stats.py` (master, metric files of a0f80c7; hovernet_notes 5-6), including the
places where diffmix's default (`diffmix.metrics.classification.type_stats`) deliberately
differs. `diffmix evaluate --compat hovernet` uses this module; the default is unchanged.

What is reproduced, on purpose:

- **Dummy point** (hovernet_notes 6): an image whose ground truth has no nucleus gets one true
  nucleus of type 0 at (0, 0); an image whose prediction has none gets one predicted nucleus of
  type 0 at (0, 0). An image empty on both sides thus contributes a "correct" pair of type 0
  (inflating F1_d and Acc), and a real nucleus within 12 px of the corner pairs with a dummy.
- **Class list**: None means `np.unique` of all true types, dummy 0 included.
- **0/0**: F1_t of a class with no paired, unpaired-true or unpaired-pred nucleus is NaN
  (numpy's 0/0); None in the `--json` output, "nan" in the table.
- **No pair at all** in the whole set: the official `np.concatenate([])` raises; here a
  `DataError` says so (there is no number to reproduce).
- F1_t keeps the official TN term, `2(TP+TN) / (2(TP+TN) + 2FP + 2FN + FP_d + FN_d)`, whose TN
  is always 0 inside the class subset; Acc is agree / paired; F1_d = 2TP / (2TP + FP + FN).

File handling is diffmix's either way (a ground-truth image without a prediction is an error,
not silently skipped as upstream's loop over the prediction folder does), and ground-truth
classes are merged when a scheme says so (upstream has the merge commented out).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from diffmix.errors import DataError
from diffmix.metrics.classification import PAIR_RADIUS, pair_coordinates

#: The official dummy nucleus of an empty side: centroid (0, 0), type 0.
DUMMY_CENTROID = np.zeros((1, 2), dtype=np.float32)
DUMMY_TYPE = np.zeros(1, dtype=np.int64)


def _side(xy: np.ndarray, types: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    types = np.asarray(types).reshape(-1)
    if types.size != xy.shape[0]:
        raise DataError(f"{what}: {types.size} types for {xy.shape[0]} centroids")
    if xy.shape[0] == 0:
        return DUMMY_CENTROID, DUMMY_TYPE  # compute_stats.py: "no instance at all"
    # compute_stats.py casts file centroids to float32 and types to int32.
    return xy.astype(np.float32), types.astype(np.int32).astype(np.int64)


def hovernet_type_stats(
    images: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    class_ids: Sequence[int] | None = None,
    radius: float = PAIR_RADIUS,
) -> dict:
    """F1_d, Acc and per-class F1 exactly as hover_net `run_nuclei_type_stat` (exhaustive).

    images: per image (true_centroids (N, 2) (x, y), true_types (N,), pred_centroids (M, 2),
        pred_types (M,)), in the order the official glob would sort the files.
    class_ids: classes to report; None = every true type present, the dummy 0 included.
    Returns {"f1_d", "acc", "f1": {class_id: float, NaN where the official value is 0/0}}.
    """
    paired_t: list[np.ndarray] = []
    paired_p: list[np.ndarray] = []
    lone_t: list[np.ndarray] = []
    lone_p: list[np.ndarray] = []
    all_true: list[np.ndarray] = []
    for k, (t_xy, t_type, p_xy, p_type) in enumerate(images):
        t_xy, t_type = _side(t_xy, t_type, f"image {k}: ground truth")
        p_xy, p_type = _side(p_xy, p_type, f"image {k}: prediction")
        pairs, un_t, un_p = pair_coordinates(t_xy, p_xy, radius)
        paired_t.append(t_type[pairs[:, 0]])
        paired_p.append(p_type[pairs[:, 1]])
        lone_t.append(t_type[un_t])
        lone_p.append(p_type[un_p])
        all_true.append(t_type)
    if not all_true:
        raise DataError("nothing to evaluate: no images")
    pt, pp = np.concatenate(paired_t), np.concatenate(paired_p)
    if pt.size == 0:
        raise DataError(
            "no true and predicted nucleus pair within 12 px in the whole set: hover_net's "
            "run_nuclei_type_stat raises here (np.concatenate of no pairs); evaluate without "
            "--compat hovernet for diffmix's defined values"
        )
    ut, up = np.concatenate(lone_t), np.concatenate(lone_p)
    tp_d, fp_d, fn_d = int(pt.size), int(up.size), int(ut.size)
    agree = int(np.count_nonzero(pt == pp))
    acc = agree / (agree + (tp_d - agree))
    f1_d = 2 * tp_d / (2 * tp_d + fp_d + fn_d)
    if class_ids is None:
        class_ids = np.unique(np.concatenate(all_true)).tolist()
    f1: dict[int, float] = {}
    for cls in class_ids:
        cls = int(cls)
        subset = (pt == cls) | (pp == cls)
        st, sp = pt[subset], pp[subset]
        tp_t = int(np.count_nonzero((st == cls) & (sp == cls)))
        tn_t = int(np.count_nonzero((st != cls) & (sp != cls)))  # always 0 inside the subset
        fp_t = int(np.count_nonzero((st != cls) & (sp == cls)))
        fn_t = int(np.count_nonzero((st == cls) & (sp != cls)))
        fp_dt = int(np.count_nonzero(up == cls))
        fn_dt = int(np.count_nonzero(ut == cls))
        num = 2 * (tp_t + tn_t)
        den = num + 2 * fp_t + 2 * fn_t + fp_dt + fn_dt
        f1[cls] = num / den if den else float("nan")
    return {"f1_d": float(f1_d), "acc": float(acc), "f1": f1}
