"""Instance metrics: hand-computed values on tiny maps, conventions, and a 200-pair property test."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from diffmix.errors import DataError
from diffmix.metrics import (
    aji,
    aji_plus,
    dice,
    instance_metrics,
    overlap_table,
    panoptic_quality,
    remap_label,
)

EPS_SQ = 1.0e-6


def rows(*lines: str) -> np.ndarray:
    """A label map from strings, one character per pixel: '.' = 0, '1'-'9', 'a'-'z' = 10+."""
    table = {".": 0, **{str(d): d for d in range(10)}, **{c: 10 + i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}}
    return np.array([[table[c] for c in line] for line in lines], dtype=np.int32)


# ---------------------------------------------------------------- hand-computed cases


def test_perfect_match_has_official_sq_epsilon():
    m = rows("11..22", "11..22", "......")
    out = instance_metrics(m, m)
    assert out["dice"] == 1.0 and out["aji"] == 1.0 and out["aji_plus"] == 1.0 and out["dq"] == 1.0
    # spec: SQ = sum IoU / (TP + 1e-6), so a perfect SQ is 2 / 2.000001, not 1.
    assert out["sq"] == 2.0 / (2 + EPS_SQ)
    assert out["pq"] == out["sq"]
    assert out["sq"] != 1.0


def test_touching_nuclei_with_shifted_boundary():
    true = rows("111222", "111222")
    pred = rows("111122", "111122")
    # inter: (t1,p1)=6, (t2,p1)=2, (t2,p2)=4; areas t 6,6; p 8,4
    # unions: 8, 12, 6; PQ IoU 6/8 and 4/6 match, 2/12 does not.
    out = instance_metrics(true, pred)
    assert out["dice"] == 1.0
    assert out["dq"] == 1.0
    assert out["sq"] == pytest.approx((6 / 8 + 4 / 6) / (2 + EPS_SQ), abs=1e-15)
    assert out["aji"] == 10 / 14  # t1->p1 (6/8), t2->p2 (4/6 > 2/12)
    assert out["aji_plus"] == 10 / 14


def test_split_nucleus_with_iou_exactly_half_is_not_a_pq_match():
    true = rows("5555", "5555")
    pred = rows("3399", "3399")
    dq, sq, pq = panoptic_quality(true, pred)
    assert (dq, sq, pq) == (0.0, 0.0, 0.0)  # IoU 4/8 = 0.5 exactly: not > 0.5
    # AJI: the truth takes one half (inter 4, union 8), the other half adds 4 to the union.
    assert aji(true, pred) == 4 / 12
    assert aji_plus(true, pred) == 4 / 12
    assert dice(true, pred) == 1.0


def test_split_nucleus_with_a_matching_part():
    true = rows("11111", "11111")
    pred = rows("22233", "22233")
    dq, sq, pq = panoptic_quality(true, pred)
    # IoU 6/10 matches, 4/10 does not: TP 1, FP 1, FN 0.
    assert dq == 1 / (1 + 0.5)
    assert sq == 0.6 / (1 + EPS_SQ)
    assert pq == dq * sq


def test_merged_nuclei_aji_counts_reused_prediction_twice():
    true = rows("1122", "1122")
    pred = rows("7777", "7777")
    # Each truth: inter 4, union 8 with the one prediction (IoU 0.5: no PQ match).
    # AJI reuses the prediction: (4 + 4) / (8 + 8). AJI+ pairs once: 4 / (8 + 4 unpaired truth).
    assert aji(true, pred) == 8 / 16
    assert aji_plus(true, pred) == 4 / 12
    assert panoptic_quality(true, pred) == (0.0, 0.0, 0.0)


def test_aji_argmax_tie_goes_to_lowest_pred_id():
    # T1 (cols 2-5) overlaps P_a (cols 0-3) and P_b (cols 4-7) by 2 px, union 6 each: a tie.
    # T2 (cols 6-9) overlaps P_b only. Lowest id wins the tie.
    true = np.array([[0, 0, 1, 1, 1, 1, 2, 2, 2, 2]], dtype=np.int32)
    low_a = np.array([[2, 2, 2, 2, 9, 9, 9, 9, 0, 0]], dtype=np.int32)
    # T1 -> P_a (id 2), T2 -> P_b: (2 + 2) / (6 + 6)
    assert aji(true, low_a) == 4 / 12
    low_b = np.array([[9, 9, 9, 9, 2, 2, 2, 2, 0, 0]], dtype=np.int32)
    # T1 -> P_b (now id 2) together with T2: (2 + 2) / (6 + 6 + 4 unused P_a)
    assert aji(true, low_b) == 4 / 16
    assert aji_plus(true, low_a) == aji_plus(true, low_b) == 4 / 12


def test_aji_epsilon_breaks_exact_iou_tie_toward_larger_union():
    # T (6 px) vs P1 (2 px inside T): IoU 2/6; vs P2 (4 px in T + 6 outside): IoU 4/12.
    # Exact IoUs tie; inter/(union + 1e-6) favours P2 (hovernet_notes 6, e22).
    true = np.array([[1] * 6 + [0] * 6])
    pred = np.array([[1, 1] + [2] * 10])
    assert aji(true, pred) == 4 / (12 + 2)  # P2 paired, P1 (2 px) unused
    assert aji(true, pred) != 2 / (6 + 10)  # what the exact-IoU argmax would give
    assert panoptic_quality(true, pred) == (0.0, 0.0, 0.0)


def test_iou_just_above_half_matches():
    true = np.array([[1, 1, 1, 1, 1, 0, 0, 0, 0]])
    pred = np.array([[0, 4, 4, 4, 4, 4, 4, 0, 0]])  # inter 4, union 7: 4/7 > 0.5
    dq, sq, pq = panoptic_quality(true, pred)
    assert dq == 1.0 and sq == (4 / 7) / (1 + EPS_SQ)


def test_non_contiguous_and_large_ids_equal_remapped_result():
    true = rows("11.22.", "11.22.", "......", ".333..")
    pred = rows("1..22.", "11.22.", "......", "..33..")
    big_true = np.where(true == 1, 2**31 - 1, np.where(true == 2, 7, np.where(true == 3, 40000, 0)))
    big_pred = np.where(pred == 1, 5, np.where(pred == 2, 2**31 - 2, np.where(pred == 3, 1, 0)))
    # ids keep their value order; remapping does not change any metric
    assert remap_label(big_true).tolist() == np.where(true == 1, 3, np.where(true == 2, 1, np.where(true == 3, 2, 0))).tolist()
    assert instance_metrics(big_true, big_pred) == instance_metrics(remap_label(big_true), remap_label(big_pred))
    table = overlap_table(big_true, big_pred)
    assert table.true_ids.tolist() == [7, 40000, 2**31 - 1]
    assert table.pred_ids.tolist() == [1, 5, 2**31 - 2]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.int64, np.uint64, np.float64, np.float32])
def test_input_dtypes_give_identical_results(dtype):
    true = rows("111222", "111222", "..33..")
    pred = rows("111122", "111122", "...3..")
    expected = instance_metrics(true, pred)
    assert instance_metrics(true.astype(dtype), pred.astype(dtype)) == expected
    assert instance_metrics(true.astype(bool), pred.astype(bool))["dice"] == expected["dice"]


def test_invalid_inputs_raise_data_error():
    good = rows("11", "11")
    with pytest.raises(DataError, match="non-integer"):
        instance_metrics(good + 0.5, good)
    with pytest.raises(DataError, match="negative"):
        instance_metrics(good, -good)
    with pytest.raises(DataError, match="2\\*\\*31-1"):
        instance_metrics(good.astype(np.int64) * 2**31, good)
    with pytest.raises(DataError, match="differ in size"):
        instance_metrics(good, rows("111", "111"))
    with pytest.raises(DataError, match="HxW"):
        instance_metrics(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)))
    with pytest.raises(DataError, match="non-integer"):
        instance_metrics(np.where(good > 0, np.nan, 0), good)


# ---------------------------------------------------------------- empty and degenerate maps


def test_both_empty_is_perfect():
    z = np.zeros((4, 5), np.int32)
    assert instance_metrics(z, z) == {k: 1.0 for k in ("dice", "aji", "aji_plus", "dq", "sq", "pq")}


def test_empty_prediction_scores_zero_without_crashing():
    true = rows("11.2", "11.2")
    z = np.zeros_like(true)
    assert instance_metrics(true, z) == {k: 0.0 for k in ("dice", "aji", "aji_plus", "dq", "sq", "pq")}
    assert instance_metrics(z, true) == {k: 0.0 for k in ("dice", "aji", "aji_plus", "dq", "sq", "pq")}


def test_maps_without_background():
    true = rows("1111", "1111")
    pred = rows("2233", "2233")
    out = instance_metrics(true, pred)
    assert out["dice"] == 1.0 and out["aji"] == 4 / 12 and out["dq"] == 0.0
    full = rows("1122", "1122")
    assert instance_metrics(full, full)["aji"] == 1.0
    assert remap_label(rows("5599", "5599")).tolist() == [[1, 1, 2, 2], [1, 1, 2, 2]]


def test_disjoint_nuclei_all_unpaired():
    true = rows("11....", "11....")
    pred = rows("....22", "....22")
    out = instance_metrics(true, pred)
    assert out == {"dice": 0.0, "aji": 0.0, "aji_plus": 0.0, "dq": 0.0, "sq": 0.0, "pq": 0.0}


def test_match_iou_below_half_is_refused():
    with pytest.raises(ValueError, match="0.5"):
        panoptic_quality(rows("1"), rows("1"), match_iou=0.3)


# ---------------------------------------------------------------- property test


def straightforward_metrics(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """The definitions of hovernet_notes 5, one boolean mask per nucleus, no shortcuts."""
    t_ids = sorted(int(i) for i in np.unique(true) if i != 0)
    p_ids = sorted(int(i) for i in np.unique(pred) if i != 0)
    if not t_ids and not p_ids:
        return {k: 1.0 for k in ("dice", "aji", "aji_plus", "dq", "sq", "pq")}
    t_masks = [true == i for i in t_ids]
    p_masks = [pred == i for i in p_ids]
    n, m = len(t_ids), len(p_ids)
    inter = np.zeros((n, m))
    union = np.zeros((n, m))
    for a, tm in enumerate(t_masks):
        for b, pm in enumerate(p_masks):
            inter[a, b] = np.logical_and(tm, pm).sum()
            union[a, b] = np.logical_or(tm, pm).sum()
    fg_t, fg_p = true > 0, pred > 0
    out = {"dice": 2.0 * np.logical_and(fg_t, fg_p).sum() / (fg_t.sum() + fg_p.sum())}

    def aji_value(pairs):
        num = sum(inter[a, b] for a, b in pairs)
        den = sum(union[a, b] for a, b in pairs)
        used_t = {a for a, _ in pairs}
        used_p = {b for _, b in pairs}
        den += sum(t_masks[a].sum() for a in range(n) if a not in used_t)
        den += sum(p_masks[b].sum() for b in range(m) if b not in used_p)
        return num / den

    eps_iou = np.where(inter > 0, inter / (union + 1.0e-6), 0.0)
    aji_pairs = []
    for a in range(n):
        if m and eps_iou[a].max() > 0:
            best = max(range(m), key=lambda b: (eps_iou[a, b], -b))
            aji_pairs.append((a, best))
    out["aji"] = aji_value(aji_pairs)
    plus_pairs = []
    if n and m:
        r, c = linear_sum_assignment(-eps_iou)
        plus_pairs = [(a, b) for a, b in zip(r, c) if eps_iou[a, b] > 0]
    out["aji_plus"] = aji_value(plus_pairs)
    iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    matches = [(a, b) for a in range(n) for b in range(m) if iou[a, b] > 0.5]
    tp = len(matches)
    fp, fn = m - tp, n - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = sum(iou[a, b] for a, b in matches) / (tp + 1e-6)
    out.update(dq=dq, sq=sq, pq=dq * sq)
    return {k: float(v) for k, v in out.items()}


def random_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Small maps with touching/overlapping rectangles, splits, merges, shifts, empties."""
    h, w = rng.integers(6, 20, size=2)

    def paint(n: int, ids: np.ndarray) -> np.ndarray:
        m = np.zeros((h, w), np.int64)
        for k in range(n):
            y, x = rng.integers(0, h), rng.integers(0, w)
            m[y : y + rng.integers(1, 7), x : x + rng.integers(1, 7)] = ids[k]
        return m

    def ids(n: int) -> np.ndarray:
        pool = rng.choice([20, 100, 2**31 - 1], p=[0.5, 0.3, 0.2])
        return rng.choice(np.arange(1, pool + 1), size=n, replace=False) if pool < 1e6 else rng.integers(1, pool, size=n)

    n_true = int(rng.integers(0, 8))
    true = paint(n_true, ids(max(n_true, 1)))
    mode = rng.integers(0, 4)
    if mode == 0:  # independent prediction
        n_pred = int(rng.integers(0, 8))
        pred = paint(n_pred, ids(max(n_pred, 1)))
    else:  # perturbed truth: shift, relabel, split some, merge some, drop some
        pred = np.roll(true, (int(rng.integers(-1, 2)), int(rng.integers(-1, 2))), axis=(0, 1))
        uniq = [u for u in np.unique(pred) if u != 0]
        new = ids(2 * len(uniq) + 2)
        out = np.zeros_like(pred)
        for k, u in enumerate(uniq):
            r = rng.random()
            if r < 0.15:
                continue
            mask = pred == u
            if r < 0.35:
                ys, xs = np.nonzero(mask)
                cut = xs >= np.median(xs)
                out[ys[cut], xs[cut]] = new[2 * k]
                out[ys[~cut], xs[~cut]] = new[2 * k + 1]
            elif r < 0.5 and k > 0:
                out[mask] = new[2 * (k - 1)]
            else:
                out[mask] = new[2 * k]
        pred = out
    return true, pred


def test_property_agrees_with_straightforward_definitions():
    rng = np.random.default_rng(20231008)
    kinds = {"empty_true": 0, "empty_pred": 0, "both": 0}
    dtypes = [np.int32, np.int64, np.uint32, np.float64]
    for trial in range(200):
        true, pred = random_pair(rng)
        kinds["empty_true"] += int(not true.any())
        kinds["empty_pred"] += int(not pred.any())
        kinds["both"] += int(not true.any() and not pred.any())
        dtype = dtypes[trial % len(dtypes)]
        if dtype is not np.int64 and max(true.max(), pred.max()) > np.iinfo(np.int32).max:
            dtype = np.int64
        ours = instance_metrics(true.astype(dtype), pred.astype(dtype))
        ref = straightforward_metrics(true, pred)
        for key, value in ref.items():
            assert abs(ours[key] - value) <= 1e-12, (trial, key, ours[key], value)
            if key in ("dice", "aji", "aji_plus", "dq"):
                assert ours[key] == value, (trial, key)  # ratios of integers: exact
    # the generator must actually exercise the empty cases
    assert kinds["empty_true"] > 0 and kinds["empty_pred"] > 0
