"""Per-image instance segmentation metrics (Dice, AJI, AJI+, DQ/SQ/PQ), official-exact and fast.

The numbers are those of hover_net `metrics/stats_utils.py` (`get_dice_1`, `get_fast_aji`,
`get_fast_aji_plus`, `get_fast_pq` after `remap_label`; hovernet_notes 5), bit for bit
wherever the official code returns a number. The official code builds one full-image mask
per nucleus; here every metric is computed from one `OverlapTable`: the areas of each
instance and the intersection of every overlapping (true, pred) pair, taken from the joint
histogram of (true id, pred id) over the foreground pixels in a single pass over the image.

Conventions shared by every function here:

- `true_inst` / `pred_inst` are HxW label maps, 0 = background, any positive id = one
  nucleus. Any integer dtype, bool, or float holding integers is accepted; ids need not be
  contiguous (they are ordered as the official `remap_label` orders them: by value).
  Negative ids, fractional or non-finite floats and ids above 2**31-1 (the official code
  casts to int32 and would wrap them) raise `DataError`.
- Cases where the official code crashes or returns NaN get a defined value
  (hovernet_notes 6):
  * both maps empty: every metric is 1.0 (nothing to find and nothing found; the official
    code gives NaN for Dice and AJI+, and raises for AJI and PQ);
  * prediction empty, truth not (or the reverse): every metric is 0.0 (the official AJI
    raises `argmax of an empty sequence`; the others already give 0);
  * a map without background pixels: computed like any other map (the official
    `remap_label` raises on `list.remove(0)`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from diffmix.data.labels import as_label_map, compact_ids
from diffmix.errors import DataError

#: Metric names of `instance_metrics`, in the order of the `--json` output.
INSTANCE_METRICS: tuple[str, ...] = ("dice", "aji", "aji_plus", "dq", "sq", "pq")



def _dense_ok(n_bins: int, n_pixels: int) -> bool:
    """Whether a lookup table / histogram of n_bins is cheaper than sorting n_pixels values."""
    return n_bins <= 4 * n_pixels + (1 << 16)


@dataclass(frozen=True)
class OverlapTable:
    """Everything the instance metrics need about one (truth, prediction) pair of maps.

    Instances are indexed 0..N-1 (truth) and 0..M-1 (prediction) in increasing id order,
    i.e. index = remapped id - 1 as after the official `remap_label`.

    true_ids: (N,) int64, the original ids.      pred_ids: (M,) int64.
    true_area: (N,) int64 pixel counts.          pred_area: (M,) int64.
    true_idx, pred_idx, inter: (K,) int64, one entry per overlapping pair with its
        intersection in pixels (> 0), sorted by (true_idx, pred_idx).
    true_fg, pred_fg, both_fg: foreground pixel counts (binary Dice terms).
    """

    true_ids: np.ndarray
    pred_ids: np.ndarray
    true_area: np.ndarray
    pred_area: np.ndarray
    true_idx: np.ndarray
    pred_idx: np.ndarray
    inter: np.ndarray
    true_fg: int
    pred_fg: int
    both_fg: int

    @property
    def union(self) -> np.ndarray:
        """(K,) int64 union of each overlapping pair: |T| + |P| - |T ∩ P|."""
        return self.true_area[self.true_idx] + self.pred_area[self.pred_idx] - self.inter


def _check_maps(true_inst: np.ndarray, pred_inst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    true_inst = np.asarray(true_inst)
    pred_inst = np.asarray(pred_inst)
    if true_inst.ndim != 2 or pred_inst.ndim != 2:
        raise DataError(
            f"instance maps must be HxW, got true {true_inst.shape} and pred {pred_inst.shape}"
        )
    if true_inst.shape != pred_inst.shape:
        raise DataError(
            f"true inst_map {true_inst.shape} and pred inst_map {pred_inst.shape} differ in size"
        )
    return (
        _as_ids(true_inst, "true inst_map"),
        _as_ids(pred_inst, "pred inst_map"),
    )


def _as_ids(arr: np.ndarray, what: str) -> np.ndarray:
    """Flattened int64 ids; range checks as in `as_label_map` (int32 ids, no negatives)."""
    if arr.dtype.kind in "iu" and arr.dtype.itemsize <= 4 and arr.dtype != np.uint32:
        # int8..int32, uint8/uint16: only a negative check is needed.
        if arr.size and arr.dtype.kind == "i" and arr.min() < 0:
            raise DataError(f"{what} has negative ids (min {arr.min()})")
        return arr.reshape(-1).astype(np.int64)
    return as_label_map(arr, what, "metrics").reshape(-1).astype(np.int64)


def _compact(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids (N,), areas (N,), idx) where idx maps every pixel to 0 (background) or 1..N.

    This is the official `remap_label` (ids renumbered in increasing order), done with a
    lookup table when ids are small and with a sort otherwise (ids up to 2**31-1).
    """
    top = int(flat.max()) if flat.size else 0
    if _dense_ok(top + 1, flat.size):
        counts = np.bincount(flat, minlength=top + 1)
        counts[0] = 0
        ids = np.flatnonzero(counts)
        lut = np.zeros(top + 1, dtype=np.int64)
        lut[ids] = np.arange(1, ids.size + 1)
        return ids.astype(np.int64), counts[ids].astype(np.int64), lut[flat]
    uniq, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    if uniq[0] == 0:
        return uniq[1:], counts[1:].astype(np.int64), inverse.reshape(-1).astype(np.int64)
    return uniq, counts.astype(np.int64), inverse.reshape(-1).astype(np.int64) + 1


def overlap_table(true_inst: np.ndarray, pred_inst: np.ndarray) -> OverlapTable:
    """Areas and pairwise intersections of two HxW instance maps, in one pass.

    The intersection of every (true, pred) pair is the count of foreground pixels carrying
    that pair of ids: a histogram of key = t * (M + 1) + p over pixels where both are
    foreground. No per-nucleus mask is ever built, so the cost is O(H*W + N*M) at worst
    and O(H*W) in practice.
    """
    t_flat, p_flat = _check_maps(true_inst, pred_inst)
    true_ids, true_area, t_idx = _compact(t_flat)
    pred_ids, pred_area, p_idx = _compact(p_flat)
    t_fg = t_idx > 0
    p_fg = p_idx > 0
    both = t_fg & p_fg
    stride = pred_ids.size + 1
    keys = t_idx[both] * stride + p_idx[both]
    n_bins = (true_ids.size + 1) * stride
    if _dense_ok(n_bins, t_flat.size):
        hist = np.bincount(keys, minlength=n_bins)
        pair_keys = np.flatnonzero(hist)
        inter = hist[pair_keys].astype(np.int64)
    else:
        pair_keys, inter = np.unique(keys, return_counts=True)
        inter = inter.astype(np.int64)
    return OverlapTable(
        true_ids=true_ids,
        pred_ids=pred_ids,
        true_area=true_area,
        pred_area=pred_area,
        true_idx=(pair_keys // stride - 1).astype(np.int64),
        pred_idx=(pair_keys % stride - 1).astype(np.int64),
        inter=inter,
        true_fg=int(np.count_nonzero(t_fg)),
        pred_fg=int(np.count_nonzero(p_fg)),
        both_fg=int(keys.size),
    )


def remap_label(inst_map: np.ndarray) -> np.ndarray:
    """Renumber instance ids to 1..N keeping their order (official `remap_label`, by_size=False).

    Returns int32 HxW. Unlike the official function, a map without background pixels is
    fine (the official one raises on `list.remove(0)`), and ids keep their value order
    whatever the input dtype.
    """
    arr = np.asarray(inst_map)
    if arr.ndim != 2:
        raise DataError(f"inst_map must be HxW, got shape {arr.shape}")
    # checked as the metrics check maps, then renumbered by the label layer's one compaction
    return compact_ids(_as_ids(arr, "inst_map").reshape(arr.shape))[1]


# ---------------------------------------------------------------- the metrics, from a table


def _dice(table: OverlapTable) -> float:
    denom = table.true_fg + table.pred_fg
    if denom == 0:
        return 1.0  # both empty: defined as perfect (official: 0/0 = NaN)
    # get_dice_1: 2.0 * sum(inter) / sum(denom), in that order.
    return 2.0 * table.both_fg / denom


def _aji_iou(table: OverlapTable) -> np.ndarray:
    # spec (hovernet_notes 5): AJI and AJI+ rank pairs by inter / (union + 1e-6); the epsilon
    # is part of the official numbers (it breaks exact IoU ties toward the larger union).
    return table.inter.astype(np.float64) / (table.union.astype(np.float64) + 1.0e-6)


def _aji_from_pairs(table: OverlapTable, pair_rows: np.ndarray) -> float:
    """AJI-style score for the chosen overlapping pairs (rows of the table).

    Each chosen pair adds its intersection to the numerator and its union to the
    denominator; a prediction chosen by k truths counts its area k times (official AJI).
    Truths in no pair and predictions in no pair add their areas to the denominator.
    All terms are integers, so the float64 result equals the official one exactly.
    """
    n_true, n_pred = table.true_ids.size, table.pred_ids.size
    if n_true == 0 and n_pred == 0:
        return 1.0  # both empty: defined as perfect (official: NaN or an exception)
    t = table.true_idx[pair_rows]
    p = table.pred_idx[pair_rows]
    inter = int(table.inter[pair_rows].sum())
    union = int(table.union[pair_rows].sum())
    true_used = np.zeros(n_true, dtype=bool)
    true_used[t] = True
    pred_used = np.zeros(n_pred, dtype=bool)
    pred_used[p] = True
    union += int(table.true_area[~true_used].sum()) + int(table.pred_area[~pred_used].sum())
    return float(inter) / float(union)


def _aji(table: OverlapTable) -> float:
    if table.inter.size == 0:
        return _aji_from_pairs(table, np.zeros(0, dtype=np.int64))
    iou = _aji_iou(table)
    # Per truth, the prediction with the largest IoU, lowest pred index on ties (np.argmax
    # over a dense row, where non-overlapping predictions hold 0). Predictions may be reused.
    order = np.lexsort((table.pred_idx, -iou, table.true_idx))
    t_sorted = table.true_idx[order]
    first = np.ones(order.size, dtype=bool)
    first[1:] = t_sorted[1:] != t_sorted[:-1]
    return _aji_from_pairs(table, order[first])


def _aji_plus(table: OverlapTable) -> float:
    n_true, n_pred = table.true_ids.size, table.pred_ids.size
    if table.inter.size == 0:
        return _aji_from_pairs(table, np.zeros(0, dtype=np.int64))
    iou = _aji_iou(table)
    # The official code runs Munkres on the full dense N x M matrix of -IoU (zeros where
    # nothing overlaps). Its choice among equally good assignments depends on that exact
    # matrix, so it is built the same way here (rows = truths, columns = predictions).
    dense = np.zeros((n_true, n_pred), dtype=np.float64)
    dense[table.true_idx, table.pred_idx] = iou
    rows, cols = linear_sum_assignment(-dense)
    keep = dense[rows, cols] > 0.0
    rows, cols = rows[keep], cols[keep]
    # Map the chosen (row, col) cells back to table entries (the table is sorted by key).
    keys = table.true_idx * n_pred + table.pred_idx
    pair_rows = np.searchsorted(keys, rows.astype(np.int64) * n_pred + cols)
    return _aji_from_pairs(table, pair_rows)


def _pq(table: OverlapTable, match_iou: float = 0.5) -> tuple[float, float, float]:
    n_true, n_pred = table.true_ids.size, table.pred_ids.size
    if n_true == 0 and n_pred == 0:
        return 1.0, 1.0, 1.0  # both empty: defined as perfect (official: ZeroDivisionError)
    # get_fast_pq: plain IoU, no epsilon; a pair must have IoU > 0.5 strictly. Above 0.5 a
    # pairing is necessarily one-to-one, so no assignment is needed.
    iou = table.inter / table.union
    matched = iou > match_iou
    # The table is sorted by truth index, which is the order of np.nonzero in the official
    # code, so the float sum below adds the same numbers in the same order.
    paired_iou = iou[matched]
    tp = int(paired_iou.size)
    fp = n_pred - tp
    fn = n_true - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = float(paired_iou.sum()) / (tp + 1.0e-6)  # spec: SQ's +1e-6, a perfect SQ is 0.999999000001
    return dq, sq, dq * sq


# ---------------------------------------------------------------- public functions


def dice(true_inst: np.ndarray, pred_inst: np.ndarray) -> float:
    """Binary Dice 2|T∩P| / (|T|+|P|) of the foregrounds (official `get_dice_1`).

    Both maps empty: 1.0 (official: NaN).
    """
    return _dice(overlap_table(true_inst, pred_inst))


def aji(true_inst: np.ndarray, pred_inst: np.ndarray) -> float:
    """Aggregated Jaccard Index, MoNuSeg version (official `get_fast_aji`).

    Each truth is paired with the prediction of largest inter/(union+1e-6) (lowest id on
    ties; a prediction may serve several truths); truths overlapping nothing stay unpaired.
    AJI = Σ paired inter / (Σ paired union + Σ unpaired truth areas + Σ unused pred areas).
    Empty prediction: 0.0 (official: raises). Both empty: 1.0.
    """
    return _aji(overlap_table(true_inst, pred_inst))


def aji_plus(true_inst: np.ndarray, pred_inst: np.ndarray) -> float:
    """AJI+ (official `get_fast_aji_plus`): AJI with a one-to-one Munkres pairing.

    Pairs maximise the total inter/(union+1e-6) (scipy `linear_sum_assignment` on the dense
    truth x prediction matrix, as the official code); pairs with no overlap are dropped.
    That dense matrix (N*M float64, 4 MB for 700 x 700 nuclei) is kept on purpose: scipy's
    choice among equally good assignments depends on it, and matching the official choice
    is what makes the numbers identical. Both empty: 1.0 (official: NaN).
    """
    return _aji_plus(overlap_table(true_inst, pred_inst))


def panoptic_quality(
    true_inst: np.ndarray, pred_inst: np.ndarray, match_iou: float = 0.5
) -> tuple[float, float, float]:
    """(DQ, SQ, PQ) with pairs of IoU > match_iou (official `get_fast_pq`, match_iou >= 0.5).

    DQ = TP / (TP + FP/2 + FN/2); SQ = Σ matched IoU / (TP + 1e-6); PQ = DQ * SQ.
    An IoU of exactly 0.5 is not a match. Both empty: (1.0, 1.0, 1.0) (official: raises).
    """
    if match_iou < 0.5:
        raise ValueError(
            "match_iou below 0.5 needs an assignment step (official Munkres branch), "
            "which diffmix does not implement; the paper's setting is 0.5"
        )
    return _pq(overlap_table(true_inst, pred_inst), match_iou)


def instance_metrics(true_inst: np.ndarray, pred_inst: np.ndarray) -> dict[str, float]:
    """All per-image instance metrics from one overlap table.

    Returns {"dice", "aji", "aji_plus", "dq", "sq", "pq"} as Python floats, equal to the
    official hover_net values after `remap_label` wherever those are numbers (see the
    module docstring for the empty-map conventions).
    """
    table = overlap_table(true_inst, pred_inst)
    dq, sq, pq = _pq(table)
    return {
        "dice": float(_dice(table)),
        "aji": float(_aji(table)),
        "aji_plus": float(_aji_plus(table)),
        "dq": float(dq),
        "sq": float(sq),
        "pq": float(pq),
    }
