"""HoVer-Net's training loss: NP = CE + Dice, HV = MSE + MSGE, TP = CE + Dice (hovernet_notes section 3).

Defaults follow the official PyTorch code (vqdang/hover_net `models/hovernet/utils.py` and
`opt.py`): every weight 1 (the TF original and MONAI's `HoVerNetLoss` use HV-MSE weight 2);
softmax first, then a categorical CE on probabilities clamped to [1e-7, 1-1e-7], and a Dice
summed over channels (background included), each channel pooled over the whole batch with
smoothing 1e-3.

MSGE, the cross-derivative quirk (hovernet_notes section 3): hover_net builds its 5x5 "Sobel"
kernels from `torch.meshgrid(h_range, v_range)`, whose default 'ij' indexing makes `kernel_h`
vary along rows. It therefore penalises d(x-map)/d(row) and d(y-map)/d(col), not the
d(x-map)/d(x) and d(y-map)/d(y) the paper describes (the TF original does the same).
`msge="official"` reproduces that; `msge="paper"` takes the derivative of each map along its own
axis, which is what the paper states, what MONAI's `HoVerNetLoss` computes, and what
post-processing actually uses (Sobel of h along x, of v along y, hovernet_notes section 4).
diffmix defaults to `paper` (design.md: where the official code has a defect, do the correct
thing and say so); choose `official` to train exactly as hover_net does.

Type class weights (`type_weights`, not in HoVer-Net): the official TP cross-entropy weighs
every pixel alike, so a class covering 0.2% of the pixels (CoNSeP's miscellaneous in 64-px
patches) contributes almost nothing to the gradient. `type_weights` multiplies the TP CE term
of class c by w_c (background included), a per-pixel weighted mean as SONNET's
`categorical_crossentropy_modified`; `"data"` asks the trainer for SONNET's rule computed from
the run's own training mix, w_c = (N_background / N_c)^(1/3) rescaled to sum to the number of
classes (`diffmix.seg.sonnet.loss.class_weights`). The Dice term is unchanged. None (default)
is the official loss.
"""

from __future__ import annotations

from typing import Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

MsgeMode = Literal["official", "paper"]


class LossConfig(BaseModel):
    """Term weights (official PyTorch defaults: all 1) and the MSGE derivative convention."""

    model_config = ConfigDict(extra="forbid")

    np_ce: float = Field(default=1.0, ge=0)
    np_dice: float = Field(default=1.0, ge=0)
    hv_mse: float = Field(default=1.0, ge=0)
    hv_msge: float = Field(default=1.0, ge=0)
    tp_ce: float = Field(default=1.0, ge=0)
    tp_dice: float = Field(default=1.0, ge=0)
    msge: MsgeMode = "paper"
    type_weights: list[float] | Literal["data"] | None = Field(
        default=None,
        description="TP cross-entropy weight per class (background first); 'data' = SONNET's rule from "
        "the training mix; None = official (unweighted)",
    )


def sobel_kernels(size: int = 5, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """hover_net's (size x size) derivative kernels (kernel_x, kernel_y), each float (size, size).

    kernel_x[r, c] = dc / (dr^2 + dc^2) with offsets dr, dc in -size//2..size//2: it responds to
    change along columns (x); kernel_y is its transpose (change along rows, y). Used with
    `F.conv2d` (cross-correlation), so an increasing ramp gives a positive response.
    """
    if size % 2 != 1:
        raise ValueError(f"sobel kernel size must be odd, got {size}")
    r = torch.arange(-(size // 2), size // 2 + 1, dtype=dtype)
    dr, dc = torch.meshgrid(r, r, indexing="ij")
    denom = dr * dr + dc * dc + 1.0e-15
    return dc / denom, dr / denom


def hv_gradients(hv: torch.Tensor, msge: MsgeMode = "paper") -> torch.Tensor:
    """(B,2,h,w) derivatives of the HV maps as the MSGE uses them.

    paper: [d(x-map)/dx, d(y-map)/dy]. official: [d(x-map)/d(row), d(y-map)/d(col)]
    (hover_net's 'ij' meshgrid quirk, see module docstring). Zero padding of 2, as hover_net.
    """
    kx, ky = sobel_kernels(5, dtype=hv.dtype)
    kx, ky = kx.to(hv.device), ky.to(hv.device)
    if msge == "official":
        k_for_x, k_for_y = ky, kx
    elif msge == "paper":
        k_for_x, k_for_y = kx, ky
    else:
        raise ValueError(f"msge must be 'official' or 'paper', got {msge!r}")
    gx = F.conv2d(hv[:, 0:1], k_for_x.view(1, 1, 5, 5), padding=2)
    gy = F.conv2d(hv[:, 1:2], k_for_y.view(1, 1, 5, 5), padding=2)
    return torch.cat([gx, gy], dim=1)


def msge_loss(pred_hv: torch.Tensor, true_hv: torch.Tensor, focus: torch.Tensor, msge: MsgeMode = "paper") -> torch.Tensor:
    """Mean squared gradient error over pixels where `focus` (B,h,w, true NP) is 1, both channels."""
    focus = focus.to(pred_hv.dtype)[:, None].expand(-1, 2, -1, -1)
    diff = hv_gradients(pred_hv, msge) - hv_gradients(true_hv, msge)
    return (focus * diff * diff).sum() / (focus.sum() + 1.0e-8)


def xentropy_loss(prob: torch.Tensor, true_onehot: torch.Tensor, weights: Sequence[float] | None = None) -> torch.Tensor:
    """hover_net's categorical CE on softmax probabilities (B,C,h,w) clamped at 1e-7, mean over
    pixels; with `weights` (one per channel) the term of class c is multiplied by w_c."""
    prob = prob.clamp(1e-7, 1.0 - 1e-7)
    per_class = true_onehot * torch.log(prob)
    if weights is not None:
        if len(weights) != prob.shape[1]:
            raise ValueError(f"{len(weights)} class weights for {prob.shape[1]} channels")
        per_class = per_class * torch.as_tensor(weights, dtype=prob.dtype, device=prob.device).view(1, -1, 1, 1)
    return -per_class.sum(dim=1).mean()


def dice_loss(prob: torch.Tensor, true_onehot: torch.Tensor, smooth: float = 1.0e-3) -> torch.Tensor:
    """hover_net's Dice: per channel 1-(2*sum(p*t)+s)/(sum(p)+sum(t)+s), pooled over batch and
    pixels, summed over channels (background included)."""
    dims = (0, 2, 3)
    inter = (prob * true_onehot).sum(dims)
    total = prob.sum(dims) + true_onehot.sum(dims)
    return (1.0 - (2.0 * inter + smooth) / (total + smooth)).sum()


def hover_loss(
    outputs: Mapping[str, torch.Tensor],
    targets: Mapping[str, torch.Tensor],
    config: LossConfig | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of the six HoVer-Net terms, and each unweighted term as a float (for logs).

    outputs: model dict (np (B,2,h,w) logits, hv (B,2,h,w), tp (B,K+1,h,w) logits).
    targets: np (B,h,w) int 0/1, hv (B,2,h,w) float, tp (B,h,w) int class ids.
    """
    cfg = config or LossConfig()
    np_true = targets["np"].long()
    np_prob = F.softmax(outputs["np"], dim=1)
    np_onehot = F.one_hot(np_true, 2).permute(0, 3, 1, 2).to(np_prob.dtype)
    terms = {
        "np_ce": xentropy_loss(np_prob, np_onehot),
        "np_dice": dice_loss(np_prob, np_onehot),
        "hv_mse": F.mse_loss(outputs["hv"], targets["hv"].to(outputs["hv"].dtype)),
        "hv_msge": msge_loss(outputs["hv"], targets["hv"].to(outputs["hv"].dtype), np_true, cfg.msge),
    }
    if "tp" in outputs and "tp" in targets:
        n_types = outputs["tp"].shape[1]
        tp_true = targets["tp"].long()
        if tp_true.numel() and int(tp_true.max()) >= n_types:
            raise ValueError(f"type target has class {int(tp_true.max())} but the model has {n_types} tp channels")
        tp_prob = F.softmax(outputs["tp"], dim=1)
        tp_onehot = F.one_hot(tp_true, n_types).permute(0, 3, 1, 2).to(tp_prob.dtype)
        if cfg.type_weights == "data":
            raise ValueError("loss.type_weights 'data' must be resolved from the training mix before training")
        terms["tp_ce"] = xentropy_loss(tp_prob, tp_onehot, cfg.type_weights)
        terms["tp_dice"] = dice_loss(tp_prob, tp_onehot)
    total = sum(getattr(cfg, name) * value for name, value in terms.items())
    return total, {name: float(value.detach()) for name, value in terms.items()}
