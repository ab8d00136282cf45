"""Post-processing: hover_net watershed behaviour, majority-vote types, and the targets ->
post-processing round trip on toy and real label maps (issue 6 acceptance)."""

from __future__ import annotations

import numpy as np
import pytest

from diffmix.data.io import read_mat_labels
from diffmix.errors import DataError
from diffmix.metrics import evaluate_samples, instance_metrics
from diffmix.seg.postproc import instance_types, postprocess, process_np_hv
from diffmix.seg.targets import hv_map, make_targets


def ideal_maps(inst_map: np.ndarray, type_map: np.ndarray, num_types: int):
    """What a perfect network would output: NP = 0/1, HV = the targets, TP one-hot."""
    t = make_targets(inst_map, type_map)
    tp = np.eye(num_types, dtype=np.float32)[t["tp"]].transpose(2, 0, 1)
    return t["np"].astype(np.float32), t["hv"], tp


def square_pair() -> np.ndarray:
    inst = np.zeros((48, 48), np.int32)
    inst[10:30, 8:22] = 1
    inst[10:30, 22:36] = 2  # touches 1 along a vertical edge
    return inst


def test_touching_nuclei_are_split_exactly():
    inst = square_pair()
    out = process_np_hv((inst > 0).astype(np.float32), hv_map(inst))
    np.testing.assert_array_equal(out, inst)
    assert out.dtype == np.int32


def test_np_threshold_is_inclusive_at_half():
    inst = np.zeros((40, 40), np.int32)
    inst[10:26, 12:28] = 1
    hv = hv_map(inst)
    assert process_np_hv(np.where(inst > 0, 0.5, 0.0), hv).max() == 1
    assert process_np_hv(np.where(inst > 0, np.nextafter(np.float32(0.5), 0), 0.0), hv).max() == 0


def test_thin_blob_dropped_unless_keep_unmarked():
    inst = np.zeros((40, 60), np.int32)
    inst[20:23, 10:40] = 1  # 3 px thick: its marker does not survive the 5x5 opening
    inst[5:17, 45:57] = 2  # an ordinary nucleus
    np_prob, hv = (inst > 0).astype(np.float32), hv_map(inst)
    official = process_np_hv(np_prob, hv)
    assert official.max() == 1 and np.array_equal(official > 0, inst == 2)
    kept = process_np_hv(np_prob, hv, keep_unmarked=True)
    assert kept.max() == 2
    assert instance_metrics(inst, kept)["pq"] > 0.99


def test_blobs_under_ten_pixels_are_removed():
    inst = np.zeros((30, 30), np.int32)
    inst[2:5, 2:5] = 1  # 9 px
    inst[20:22, 20:25] = 2  # 10 px
    out = process_np_hv((inst > 0).astype(np.float32), hv_map(inst), keep_unmarked=True)
    assert out[3, 3] == 0
    assert out.max() == 1 and np.array_equal(out > 0, inst == 2)


def test_empty_and_constant_maps():
    z = np.zeros((32, 32), np.float32)
    assert not process_np_hv(z, np.zeros((2, 32, 32), np.float32)).any()
    inst_map, type_map, info = postprocess(z, np.zeros((2, 32, 32)), np.zeros((3, 32, 32)))
    assert not inst_map.any() and not type_map.any() and info == {}


def test_ids_contiguous_in_id_order():
    inst = np.zeros((64, 64), np.int32)
    inst[4:18, 4:18] = 7
    inst[30:46, 30:46] = 3
    inst[40:56, 4:20] = 12
    out, _, info = postprocess((inst > 0).astype(np.float32), hv_map(inst), (inst > 0).astype(np.int32))
    assert sorted(np.unique(out)) == [0, 1, 2, 3]
    assert sorted(info) == [1, 2, 3]
    assert instance_metrics(inst, out)["pq"] > 0.99


def test_majority_vote_rules():
    inst = np.zeros((4, 12), np.int32)
    tp = np.zeros((4, 12), np.int32)
    inst[0, 0:3] = 1
    tp[0, 0:3] = [2, 2, 3]  # plain majority -> 2
    inst[1, 0:4] = 2
    tp[1, 0:4] = [0, 0, 0, 1]  # majority 0, another type exists -> 1
    inst[2, 0:3] = 3  # only 0 -> stays 0, as hover_net
    inst[3, 0:4] = 4
    tp[3, 0:4] = [3, 3, 2, 2]  # tie -> lower id
    inst[1, 6:12] = 5
    tp[1, 6:12] = [0, 0, 0, 4, 4, 1]  # majority 0, second is 4 (2 votes) over 1 (1 vote)
    type_map, info = instance_types(inst, tp)
    assert {i: d["type"] for i, d in info.items()} == {1: 2, 2: 1, 3: 0, 4: 2, 5: 4}
    assert info[1]["type_prob"] == pytest.approx(2 / 3)
    assert info[2]["type_prob"] == pytest.approx(1 / 4)
    assert info[5]["area"] == 6
    assert info[1]["centroid"] == pytest.approx((1.0, 0.0))  # (x, y)
    assert info[5]["centroid"] == pytest.approx((8.5, 1.0))
    np.testing.assert_array_equal(type_map[1, 6:12], 4)
    assert not type_map[inst == 0].any()
    # probabilities give the same vote as their argmax
    probs = np.eye(5, dtype=np.float32)[tp].transpose(2, 0, 1) * 0.6 + 0.08
    type_map_p, info_p = instance_types(inst, probs)
    np.testing.assert_array_equal(type_map_p, type_map)
    assert {i: d["type"] for i, d in info_p.items()} == {i: d["type"] for i, d in info.items()}


def test_input_errors():
    with pytest.raises(DataError, match="must be"):
        process_np_hv(np.zeros((8, 8)), np.zeros((2, 8, 9)))
    with pytest.raises(DataError, match="does not match"):
        instance_types(np.zeros((8, 8), np.int32), np.zeros((3, 8, 9)))
    with pytest.raises(DataError, match="argmax"):
        instance_types(np.zeros((8, 8), np.int32), np.zeros((8, 8), np.float32))


# --------------------------------------------------------------------------- round trip


@pytest.fixture(scope="module")
def toy_tiles():
    from diffmix.data.toy import generate_toy_samples

    return generate_toy_samples(8, 256, seed=0)


def round_trip(pairs, num_types: int, class_ids, keep_unmarked: bool) -> dict:
    preds = []
    for inst, types in pairs:
        inst_map, type_map, _ = postprocess(*ideal_maps(inst, types, num_types), keep_unmarked=keep_unmarked)
        preds.append((inst_map, type_map))
    return evaluate_samples(pairs, preds, class_ids)


def test_round_trip_toy(toy_tiles):
    pairs = [(s.inst_map, s.type_map) for s in toy_tiles]
    assert sum(int(s.inst_map.max()) for s in toy_tiles) > 100
    # keep_unmarked: measured PQ 0.972, F1_d 0.985, Acc 1.0 (toy seed 0, 8 tiles); the
    # remaining misses are merges of clumped small nuclei under the 21-px Sobel, so the
    # detection F1 gets a little slack below the classification accuracy
    res = round_trip(pairs, 5, (1, 2, 3, 4), keep_unmarked=True)
    assert res["mean"]["pq"] >= 0.95
    assert res["type"]["f1_d"] >= 0.97
    assert res["type"]["acc"] >= 0.98
    # hover_net exactly: thin (spindle) nuclei lose their marker; measured PQ 0.936
    official = round_trip(pairs, 5, (1, 2, 3, 4), keep_unmarked=False)
    assert 0.85 <= official["mean"]["pq"] < res["mean"]["pq"]
    assert official["type"]["acc"] >= 0.98


def test_round_trip_real_patches(shared_data):
    pairs = []
    for k in (1, 2, 3):
        labels = read_mat_labels(shared_data / "real_he_labeled" / f"patch{k}.mat")
        pairs.append((labels["inst_map"], labels["type_map"]))
    # class ids present in the data: 1, 2, 3, 5; measured PQ 1.0 / 0.989 / 1.0,
    # F1_d 0.996, Acc 1.0, per-class F1 >= 0.992
    res = round_trip(pairs, 6, (1, 2, 3, 5), keep_unmarked=True)
    per_image = res["per_image"]
    pqs = [v["pq"] for v in (per_image.values() if isinstance(per_image, dict) else per_image)]
    assert min(pqs) >= 0.95
    assert res["type"]["f1_d"] >= 0.98 and res["type"]["acc"] >= 0.98
    assert min(res["type"]["f1"].values()) >= 0.98
    # hover_net exactly: nuclei cut to slivers by the patch border are dropped; measured
    # PQ 0.889 / 0.919 / 0.926
    official = round_trip(pairs, 6, (1, 2, 3, 5), keep_unmarked=False)
    assert 0.85 <= official["mean"]["pq"] < res["mean"]["pq"]
