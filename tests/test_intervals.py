"""Headline intervals of the experiment (diffmix.pipeline.intervals) on hand-made evaluations."""

from __future__ import annotations

import pytest

from diffmix.errors import DataError
from diffmix.pipeline.intervals import headline_intervals, run_statistic


def _eval(pq: list[float], counts: list[list[int]]) -> dict:
    names = [f"img{i}" for i in range(len(pq))]
    return {
        "per_image": {n: {"pq": v} for n, v in zip(names, pq)},
        "type_counts": {"class_ids": [1, 2], "per_image": dict(zip(names, counts))},
    }


# per image: tp_d fp_d fn_d agree | class 1: tp fp fn fp_d fn_d | class 2: tp fp fn fp_d fn_d
A = [[4, 0, 0, 4, 2, 0, 0, 0, 0, 2, 0, 0, 0, 0], [2, 1, 1, 1, 0, 1, 1, 0, 1, 1, 0, 0, 1, 0]]
B = [[4, 0, 0, 2, 0, 0, 2, 0, 0, 2, 2, 0, 0, 0], [2, 1, 1, 1, 0, 1, 1, 0, 1, 1, 0, 0, 1, 0]]


def test_pooled_f1_and_pq_statistics_by_hand():
    f1 = run_statistic([_eval([0.5, 0.7], A)], "f1_1", [1, 2])
    # class 1 over both images: TP 2, FP 1, FN 1, unpaired pred 0, unpaired true 1
    # -> 2*2 / (2*2 + 2*1 + 2*1 + 0 + 1) = 4/9
    assert f1(0, [0, 1]) == pytest.approx(4 / 9)
    assert f1(0, [0, 0]) == pytest.approx(1.0)  # image 0 twice: TP 4, nothing wrong
    pq = run_statistic([_eval([0.5, 0.7], A)], "pq", [1, 2])
    assert pq(0, [0, 1]) == pytest.approx(0.6) and pq(0, [1, 1]) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="unknown statistic"):
        run_statistic([_eval([0.5], A[:1])], "dice", [1, 2])


def test_paired_pq_difference_is_exact_when_one_arm_is_shifted():
    evals = {
        "baseline": [_eval([0.5, 0.7], B), _eval([0.4, 0.6], B)],
        "diffmix": [_eval([0.55, 0.75], A), _eval([0.45, 0.65], A)],
    }
    iv = headline_intervals(evals, [1, 2], 1, n_boot=500)
    d = iv["differences"]["diffmix - baseline"]["pq"]
    assert (d["estimate"], d["low"], d["high"]) == pytest.approx((0.05, 0.05, 0.05))
    f = iv["differences"]["diffmix - baseline"]["f1_1"]
    # baseline class 1: TP 0, FP 1, FN 3, fn_d 1 -> 0; diffmix 4/9 (both runs alike)
    assert f["estimate"] == pytest.approx(4 / 9)
    assert f["low"] <= f["estimate"] <= f["high"]
    assert iv["arms"]["baseline"]["pq"]["estimate"] == pytest.approx(0.55)
    assert list(iv["differences"]) == ["diffmix - baseline"]  # no GradMix arm was run
    assert iv["n_runs"] == 2 and iv["n_images"] == 2


def test_mismatched_runs_or_missing_counts_are_errors():
    with pytest.raises(DataError, match="different numbers of runs"):
        headline_intervals({"baseline": [_eval([0.5, 0.7], B)], "diffmix": []}, [1, 2], 1)
    old = _eval([0.5, 0.7], B)
    del old["type_counts"]
    with pytest.raises(DataError, match="per-image type counts"):
        run_statistic([old], "f1_1", [1, 2])
    other = _eval([0.5], B[:1])
    with pytest.raises(DataError, match="different test images"):
        run_statistic([_eval([0.5, 0.7], B), other], "pq", [1, 2])
