"""HoVer-Net loss terms against hand-computed values; the MSGE derivative convention is pinned."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffmix.seg.loss import (
    LossConfig,
    dice_loss,
    hover_loss,
    hv_gradients,
    msge_loss,
    sobel_kernels,
    xentropy_loss,
)


def ramps(h: int, w: int, a: float, b: float) -> torch.Tensor:
    """(1,2,h,w): channel 0 = a * column index (an x-map), channel 1 = b * row index (a y-map)."""
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    return torch.stack([a * cols, b * rows])[None]


def interior(h: int, w: int, border: int = 2) -> torch.Tensor:
    focus = torch.zeros(1, h, w, dtype=torch.long)
    focus[:, border:-border, border:-border] = 1
    return focus


def test_sobel_kernel_values_match_hover_net_formula():
    kx, ky = sobel_kernels(5)
    # hover_net: kernel = offset / (dr^2 + dc^2); centre 0; x responds along columns.
    assert kx[2, 3].item() == pytest.approx(1.0)  # dr=0, dc=1
    assert kx[2, 4].item() == pytest.approx(0.5)  # dr=0, dc=2
    assert kx[0, 4].item() == pytest.approx(2 / 8)  # dr=-2, dc=2
    assert kx[2, 2].item() == 0.0
    assert torch.equal(ky, kx.T)
    # Sum over the 24 off-centre cells of dc^2/(dr^2+dc^2) is 12 (half of 24 by symmetry): a unit
    # ramp along x gives a response of exactly 12.
    grad = hv_gradients(ramps(9, 9, 1.0, 1.0), "paper")
    assert grad[0, 0, 4, 4].item() == pytest.approx(12.0)
    assert grad[0, 1, 4, 4].item() == pytest.approx(12.0)
    with pytest.raises(ValueError):
        sobel_kernels(4)


def test_msge_paper_vs_official_on_hand_made_hv_map():
    """x-map varying along columns, y-map along rows (a correct HV map): the paper MSGE sees the
    full gradients, hover_net's official cross-derivative MSGE sees none of them."""
    a, b = 0.1, 0.2
    true_hv = ramps(12, 12, a, b)
    pred_hv = torch.zeros_like(true_hv)
    focus = interior(12, 12)
    paper = msge_loss(pred_hv, true_hv, focus, "paper").item()
    official = msge_loss(pred_hv, true_hv, focus, "official").item()
    assert paper == pytest.approx(((12 * a) ** 2 + (12 * b) ** 2) / 2, rel=1e-9)
    assert official == pytest.approx(0.0, abs=1e-12)
    # Swap the axes (x-map varying along rows): now only the official convention responds.
    swapped = true_hv.flip(1)  # channel 0 = b * rows, channel 1 = a * cols
    assert msge_loss(pred_hv, swapped, focus, "official").item() == pytest.approx(((12 * b) ** 2 + (12 * a) ** 2) / 2)
    assert msge_loss(pred_hv, swapped, focus, "paper").item() == pytest.approx(0.0, abs=1e-12)


def test_msge_default_is_paper_and_config_switches_it():
    assert LossConfig().msge == "paper"
    true_hv = ramps(12, 12, 0.1, 0.2).float()
    targets = {"np": interior(12, 12), "hv": true_hv, "tp": interior(12, 12)}
    outputs = {"np": torch.zeros(1, 2, 12, 12), "hv": torch.zeros(1, 2, 12, 12), "tp": torch.zeros(1, 3, 12, 12)}
    _, terms_default = hover_loss(outputs, targets)
    _, terms_official = hover_loss(outputs, targets, LossConfig(msge="official"))
    assert terms_default["hv_msge"] == pytest.approx(((1.2) ** 2 + (2.4) ** 2) / 2, rel=1e-5)
    assert terms_official["hv_msge"] == pytest.approx(0.0, abs=1e-6)


def test_msge_only_counts_focus_pixels():
    true_hv = ramps(12, 12, 0.1, 0.2)
    pred_hv = torch.zeros_like(true_hv)
    pred_hv[:, :, 0:2, :] = 5.0  # garbage in the border band outside the focus
    focus = torch.zeros(1, 12, 12, dtype=torch.long)
    focus[:, 6:9, 4:9] = 1  # at least 2 px away from the garbage rows (kernel radius 2)
    assert msge_loss(pred_hv, true_hv, focus).item() == pytest.approx(((1.2) ** 2 + (2.4) ** 2) / 2)


def test_uniform_prediction_ce_and_dice_hand_values():
    """Zero logits = probability 1/C everywhere: CE = log C; Dice per channel from the counts."""
    tp = torch.tensor([[[0, 0, 1], [2, 2, 0]]])  # (1,2,3): counts 3, 1, 2
    onehot = torch.nn.functional.one_hot(tp, 3).permute(0, 3, 1, 2).float()
    prob = torch.full((1, 3, 2, 3), 1 / 3)
    assert xentropy_loss(prob, onehot).item() == pytest.approx(math.log(3), rel=1e-6)
    s = 1e-3
    expected = sum(1 - (2 * n / 3 + s) / (6 / 3 + n + s) for n in (3, 1, 2))
    assert dice_loss(prob, onehot).item() == pytest.approx(expected, rel=1e-6)


def test_perfect_prediction_is_near_zero_and_ce_is_clamped():
    tp = torch.tensor([[[0, 1], [1, 0]]])
    onehot = torch.nn.functional.one_hot(tp, 2).permute(0, 3, 1, 2).float()
    assert xentropy_loss(onehot, onehot).item() == pytest.approx(-math.log(1 - 1e-7), abs=5e-8)  # float32 rounding of 1-1e-7
    assert dice_loss(onehot, onehot).item() == pytest.approx(0.0, abs=1e-9)
    # Confidently wrong: clamped at 1e-7, so the CE is -log(1e-7), not infinite.
    assert xentropy_loss(1 - onehot, onehot).item() == pytest.approx(-math.log(1e-7), rel=1e-6)


def test_hover_loss_weights_and_terms():
    g = torch.Generator().manual_seed(0)
    outputs = {"np": torch.randn(2, 2, 8, 8, generator=g), "hv": torch.randn(2, 2, 8, 8, generator=g),
               "tp": torch.randn(2, 5, 8, 8, generator=g)}
    np_t = (torch.rand(2, 8, 8, generator=g) > 0.5).long()
    targets = {"np": np_t, "hv": torch.rand(2, 2, 8, 8, generator=g) * 2 - 1, "tp": np_t * 3}
    total, terms = hover_loss(outputs, targets)
    assert set(terms) == {"np_ce", "np_dice", "hv_mse", "hv_msge", "tp_ce", "tp_dice"}
    assert total.item() == pytest.approx(sum(terms.values()), rel=1e-6)  # official: all weights 1
    weights = LossConfig(np_ce=2.0, hv_mse=0.0, tp_dice=0.5)
    total_w, terms_w = hover_loss(outputs, targets, weights)
    expected = sum(terms.values()) + terms["np_ce"] - terms["hv_mse"] - 0.5 * terms["tp_dice"]
    assert total_w.item() == pytest.approx(expected, rel=1e-6)
    assert terms["hv_mse"] == pytest.approx(torch.mean((outputs["hv"] - targets["hv"]) ** 2).item(), rel=1e-6)
    bad = dict(targets, tp=np_t * 7)
    with pytest.raises(ValueError, match="tp channels"):
        hover_loss(outputs, bad)


def test_loss_gradients_reach_every_head():
    outputs = {k: torch.zeros(1, c, 8, 8, requires_grad=True) for k, c in (("np", 2), ("hv", 2), ("tp", 3))}
    rng = np.random.default_rng(0)
    np_t = torch.from_numpy((rng.random((1, 8, 8)) > 0.5).astype(np.int64))
    targets = {"np": np_t, "hv": torch.from_numpy(rng.uniform(-1, 1, (1, 2, 8, 8)).astype(np.float32)), "tp": np_t * 2}
    total, _ = hover_loss(outputs, targets)
    total.backward()
    for k, t in outputs.items():
        assert t.grad is not None and t.grad.abs().sum() > 0, k
