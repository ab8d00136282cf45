"""Type statistics: centroid pairing, pooled F1_d / Acc / per-class F1, empty cases."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from diffmix.errors import DataError
from diffmix.metrics import instance_types_centroids, pair_coordinates, type_stats


def pts(*xy):
    return np.array(xy, dtype=np.float64).reshape(-1, 2)


def test_exactly_12_px_is_a_match_and_just_over_is_not():
    pairs, ut, up = pair_coordinates(pts((0, 0), (100, 100)), pts((12, 0), (100, 112.01)))
    assert pairs.tolist() == [[0, 0]]
    assert ut.tolist() == [1] and up.tolist() == [1]
    pairs, _, _ = pair_coordinates(pts((50, 50)), pts((50, 62)))  # 12 px along y
    assert pairs.tolist() == [[0, 0]]
    pairs, _, _ = pair_coordinates(pts((0, 0)), pts((12, 1)))  # sqrt(145) > 12
    assert pairs.shape == (0, 2)


def test_pairing_minimises_total_distance_not_greedy():
    # Greedy nearest-first pairs (8,0)-(6,0) and leaves (0,0)/(16,0) 16 px apart (one pair);
    # Munkres pairs (0,0)-(6,0) and (8,0)-(16,0): two pairs within 12 px.
    pairs, ut, up = pair_coordinates(pts((0, 0), (8, 0)), pts((6, 0), (16, 0)))
    assert pairs.tolist() == [[0, 0], [1, 1]]
    assert ut.size == 0 and up.size == 0


def test_pairing_is_optimal_on_random_small_sets():
    rng = np.random.default_rng(7)
    for _ in range(60):
        n, m = (int(v) for v in rng.integers(0, 5, size=2))
        a, b = rng.uniform(0, 30, (n, 2)), rng.uniform(0, 30, (m, 2))
        pairs, ut, up = pair_coordinates(a, b)
        assert sorted(pairs[:, 0].tolist() + ut.tolist()) == list(range(n))
        assert sorted(pairs[:, 1].tolist() + up.tolist()) == list(range(m))
        # brute force over every maximal assignment: the official pairing is the one of
        # least total distance (unique for random points), then pairs over 12 px dropped.
        d = np.hypot(*(a.astype(np.float32)[:, None, :] - b.astype(np.float32)[None, :, :]).transpose(2, 0, 1))
        if n <= m:
            options = [list(zip(range(n), cols)) for cols in itertools.permutations(range(m), n)]
        else:
            options = [list(zip(rows, range(m))) for rows in itertools.permutations(range(n), m)]
        best = min(options, key=lambda o: sum(d[i, j] for i, j in o))
        expected = sorted([i, j] for i, j in best if d[i, j] <= 12)
        assert sorted(pairs.tolist()) == expected


def test_pooled_statistics_hand_computed():
    images = [
        # A: two pairs ((1,1) and true 2 / pred 1), an unpaired true 3 and an unpaired pred 2.
        (pts((10, 10), (50, 50), (100, 100)), [1, 2, 3], pts((12, 10), (50, 55), (200, 200)), [1, 1, 2]),
        # B: empty prediction: an unpaired true 2.
        (pts((30, 30)), [2], np.zeros((0, 2)), []),
        # C: empty truth: an unpaired pred 3.
        (np.zeros((0, 2)), [], pts((5, 5)), [3]),
        # D: both empty: contributes nothing (upstream would add a fake correct pair).
        (np.zeros((0, 2)), [], np.zeros((0, 2)), []),
    ]
    out = type_stats(images, class_ids=[1, 2, 3, 4])
    # TP_d 2, FP_d 2, FN_d 2.
    assert out["f1_d"] == 4 / 8
    assert out["acc"] == 1 / 2
    # class 1: paired (1,1) TP, (2,1) FP -> 2 / (2 + 2)
    # class 2: paired (2,1) FN, unpaired pred 2 and unpaired true 2 -> 0 / (2 + 1 + 1)
    # class 3: unpaired true 3 (A) and unpaired pred 3 (C) -> 0 / 2
    # class 4: nowhere -> defined 1.0
    assert out["f1"] == {1: 0.5, 2: 0.0, 3: 0.0, 4: 1.0}
    assert type_stats(images[:3], class_ids=[1, 2, 3, 4]) == out


def test_per_class_f1_official_weighting():
    # 3 pairs of class 1 correct, 1 pair true 1 predicted 2, 1 unpaired true 1, 2 unpaired pred 1.
    t = pts((0, 0), (40, 0), (80, 0), (120, 0), (160, 0), (300, 300))
    p = pts((1, 0), (41, 0), (81, 0), (121, 0), (500, 500), (600, 600), (161, 200))
    out = type_stats([(t, [1, 1, 1, 1, 1, 1], p, [1, 1, 1, 2, 1, 1, 1])], class_ids=[1, 2])
    # pairs: 4 (the 5th true at (160,0) is 200 px from its nearest pred); unpaired true 2,
    # unpaired pred 3. F1_1 = 2*3 / (2*3 + 2*0 + 2*1 + 3 + 2) = 6 / 13.
    assert out["f1"][1] == 6 / 13
    # class 2: the one pair true 1 / pred 2 is an FP for class 2: 0 / (0 + 2)
    assert out["f1"][2] == 0.0
    assert out["acc"] == 3 / 4
    assert out["f1_d"] == 8 / (8 + 3 + 2)


def test_no_nuclei_anywhere_and_no_pairs():
    empty = (np.zeros((0, 2)), [], np.zeros((0, 2)), [])
    assert type_stats([empty, empty], class_ids=[1, 2]) == {"f1_d": 1.0, "acc": 1.0, "f1": {1: 1.0, 2: 1.0}}
    assert type_stats([], class_ids=[1]) == {"f1_d": 1.0, "acc": 1.0, "f1": {1: 1.0}}
    lone = (pts((0, 0)), [1], np.zeros((0, 2)), [])
    assert type_stats([lone], class_ids=[1, 2]) == {"f1_d": 0.0, "acc": 0.0, "f1": {1: 0.0, 2: 1.0}}


def test_type_vectors_nx1_and_1xn_and_validation():
    t, p = pts((0, 0), (50, 50)), pts((1, 1), (51, 51))
    a = type_stats([(t, np.array([[1], [2]]), p, np.array([[1, 2]]))], class_ids=[1, 2])
    assert a == {"f1_d": 1.0, "acc": 1.0, "f1": {1: 1.0, 2: 1.0}}
    with pytest.raises(DataError, match="2 centroids"):
        type_stats([(t, [1, 2, 3], p, [1, 2])], class_ids=[1])
    with pytest.raises(DataError, match="Nx2"):
        type_stats([(np.zeros((2, 3)), [1, 2], p, [1, 2])], class_ids=[1])
    with pytest.raises(DataError, match="finite"):
        type_stats([(pts((np.nan, 0), (1, 1)), [1, 2], p, [1, 2])], class_ids=[1])
    with pytest.raises(DataError, match="non-integer"):
        type_stats([(t, [1.5, 2], p, [1, 2])], class_ids=[1])


def test_centroids_are_float32_as_upstream():
    # 12 + 1e-7 is 12 in float32 (official casts to float32), so this is a match.
    pairs, _, _ = pair_coordinates(pts((0, 0)), pts((12 + 1e-7, 0)))
    assert pairs.tolist() == [[0, 0]]


def test_instance_types_centroids_majority_and_xy_order():
    inst = np.array(
        [
            [0, 5, 5, 0, 0],
            [0, 5, 5, 0, 9],
            [0, 0, 0, 0, 9],
        ]
    )
    types = np.array(
        [
            [0, 2, 3, 0, 0],
            [0, 3, 0, 0, 0],
            [0, 0, 0, 0, 0],
        ]
    )
    ids, xy, t = instance_types_centroids(inst, types)
    assert ids.tolist() == [5, 9]
    assert xy.tolist() == [[1.5, 0.5], [4.0, 1.5]]  # (x = column, y = row)
    # id 5: votes {0: 1, 2: 1, 3: 2} -> 3; id 9: only background class -> 0
    assert t.tolist() == [3, 0]
    tie = np.array([[0, 2, 3, 0, 0], [0, 3, 2, 0, 0], [0, 0, 0, 0, 0]])
    assert instance_types_centroids(inst, tie)[2].tolist() == [2, 0]  # tie -> smaller id
    ids, xy, t = instance_types_centroids(np.zeros((3, 3), np.int32))
    assert ids.size == 0 and xy.shape == (0, 2) and t.size == 0
