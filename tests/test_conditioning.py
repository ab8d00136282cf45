"""The SDM conditioning tensor (spec 1): one-hot + instance edges, numpy == torch, null label."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffmix.errors import DataError
from diffmix.maps.conditioning import condition_batch, condition_map, instance_edges, null_condition_like


def random_maps(rng: np.random.Generator, b: int, h: int, w: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Blocky random instance maps (touching nuclei, nuclei on the border) with one class each."""
    inst = rng.integers(0, 6, size=(b, h // 4, w // 4)).repeat(4, axis=1).repeat(4, axis=2)
    inst = inst * (rng.random((b, h, w)) > 0.05)  # holes make irregular shapes
    cls_of = rng.integers(1, k + 1, size=(b, 6))
    types = np.where(inst > 0, np.take_along_axis(cls_of, inst.reshape(b, -1), 1).reshape(b, h, w), 0)
    return inst.astype(np.int32), types.astype(np.int32)


def test_numpy_and_batched_torch_are_identical():
    rng = np.random.default_rng(0)
    inst, types = random_maps(rng, 4, 32, 40, k=4)
    ours = condition_batch(torch.from_numpy(inst), torch.from_numpy(types), 4)
    stacked = np.stack([condition_map(i, t, 4) for i, t in zip(inst, types)])
    assert ours.dtype == torch.float32 and stacked.dtype == np.float32
    assert ours.shape == (4, 6, 32, 40)
    assert np.array_equal(ours.numpy(), stacked)
    # (B, 1, H, W) inputs, as the official loader stores them, give the same tensor
    again = condition_batch(torch.from_numpy(inst[:, None]), torch.from_numpy(types[:, None]), 4)
    assert torch.equal(again, ours)


def test_edges_hand_computed_single_nucleus():
    inst = np.zeros((5, 6), np.int32)
    inst[1:3, 2:4] = 7  # a 2x2 nucleus
    expected = np.array(
        [
            [0, 0, 1, 1, 0, 0],
            [0, 1, 1, 1, 1, 0],
            [0, 1, 1, 1, 1, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 0, 0, 0, 0],
        ],
        dtype=bool,
    )
    assert np.array_equal(instance_edges(inst), expected)


def test_edges_touching_nuclei_both_sides_and_no_border_edge():
    inst = np.array(
        [
            [1, 1, 2, 2],
            [1, 1, 2, 2],
            [0, 0, 0, 0],
        ],
        dtype=np.int32,
    )
    edges = instance_edges(inst)
    # the 1|2 boundary marks both columns 1 and 2; the nucleus/background boundary marks rows 1 and 2;
    # the image border (row 0, columns 0 and 3 of row 0) creates nothing by itself
    expected = np.array(
        [
            [0, 1, 1, 0],
            [1, 1, 1, 1],
            [1, 1, 1, 1],
        ],
        dtype=bool,
    )
    assert np.array_equal(edges, expected)
    # a nucleus filling the whole image has no edge at all
    assert not instance_edges(np.full((4, 4), 3, np.int32)).any()
    # background next to background never is an edge
    assert not instance_edges(np.zeros((4, 4), np.int32)).any()


def test_one_hot_channels_and_edge_channel_position():
    inst = np.array([[0, 1], [2, 2]], np.int32)
    types = np.array([[0, 3], [1, 1]], np.int32)
    cond = condition_map(inst, types, num_classes=3)
    assert cond.shape == (5, 2, 2)
    # exactly one active one-hot channel per pixel; channel 0 is background
    assert np.array_equal(cond[:4].sum(0), np.ones((2, 2)))
    assert cond[0, 0, 0] == 1 and cond[3, 0, 1] == 1 and cond[1, 1, 0] == 1 and cond[1, 1, 1] == 1
    assert not cond[2].any()
    # edge channel last: (0,0)-(0,1) differ, (0,0)-(1,0) differ, (0,1)-(1,1) differ; (1,0)-(1,1) same id
    assert np.array_equal(cond[4], np.array([[1, 1], [1, 1]], np.float32))
    # CoNSeP: 6 channels, GLySAC: 5 (spec 1.4)
    assert condition_map(inst, np.minimum(types, 3), 4).shape[0] == 6
    assert condition_map(inst, np.minimum(types, 3), 3).shape[0] == 5


def test_null_label_is_all_zero_and_distinguishable():
    rng = np.random.default_rng(1)
    inst, types = random_maps(rng, 2, 16, 16, k=3)
    cond = condition_batch(inst, types, 3)
    null = null_condition_like(cond)
    assert null.shape == cond.shape and null.dtype == cond.dtype
    assert torch.count_nonzero(null) == 0
    # every real map has one active one-hot channel per pixel, the null label none
    assert torch.all(cond[:, :4].sum(1) == 1)


def test_bad_inputs_raise_data_error():
    inst = np.zeros((4, 4), np.int32)
    with pytest.raises(DataError, match="outside 0..3"):
        condition_map(inst, np.full((4, 4), 4, np.int32), 3)
    with pytest.raises(DataError, match="equal HxW"):
        condition_map(inst, np.zeros((4, 5), np.int32), 3)
    with pytest.raises(DataError, match="outside 0..3"):
        condition_batch(inst[None], np.full((1, 4, 4), 4, np.int32), 3)
    with pytest.raises(DataError, match=r"\(B, H, W\)"):
        condition_batch(inst, inst, 3)
