"""SONNET's training loss: NP weighted CE + Dice, TP focal, ordinal NLL; self-guided re-weighting (notes 4).

All terms act on softmax probabilities clipped to [1e-7, 1 - 1e-7]; "mean" is over all
B * h * w pixels; every term has weight 1:

- NP CE: mean[-(w0 t0 log p0 + w1 t1 log p1)];
- NP Dice: hover_net's (`diffmix.seg.loss.dice_loss`, both channels, pooled over the batch);
- TP focal (gamma 1): mean[-sum_c w_c t_c (1 - q_c)^gamma log q_c];
- ordinal: mean[-sum_{k=0..7} ([k < y] log P_k(1) + [k >= y] log P_k(0))], a *sum* over the 8
  classifiers (all-zero logits give 8 ln 2 = 5.545 per pixel).

**Fixed official defect D1 (ordinal loss never added).** The released training sets
`loss_term = {'bce': 1, 'dice': 1}`, so the ordinal term is computed but never enters the total:
the `ord` decoder gets no gradient, its levels stay random and post-processing (which reads
its markers from them) fails. Here `ord` has weight 1 (`SonnetLossConfig.ord`; 0 reproduces
the release).

**Fixed official defect D4 (class weights hard-coded).** The released focal weights
[0.3, 2.2, 0.96, 0.73, 0.81] are CoNSeP's (5 entries: GLySAC's 4 types break it) and the NP
weights [0.8, 1.2] are fixed. Here both are computed from the training type maps with the
formula of the official `check_weight_loss`, w_c = (N_0 / N_c)^(1/3) rescaled to sum to C
(`class_weights`), unless given, and the training run stores them in its config.yaml.

**Self-guided phase** (phase 3): with ŷ the predicted level of the current forward (no
gradient), m(v) = 1 + 2[v = 1] + [v = 2] multiplies CE and focal per pixel: pixels the network
puts in the two outermost levels weigh x3 and x2. The ordinal term is weighted by m(y) of the
*true* level: an inconsistency of the official code (D6), reproduced as written. Dice is not
re-weighted.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from diffmix.errors import ConfigError
from diffmix.seg.loss import dice_loss
from diffmix.seg.sonnet.targets import NUM_LEVELS

EPS = 1.0e-7


class SonnetLossConfig(BaseModel):
    """Term weights (all 1; `ord: 0` is the release's defect D1), focal gamma and class weights.

    np_weights / type_weights: None = computed from the training type maps (`class_weights`)
    when training starts; the values used are written to the run's config.yaml.
    """

    model_config = ConfigDict(extra="forbid")

    np_ce: float = Field(default=1.0, ge=0)
    np_dice: float = Field(default=1.0, ge=0)
    tp_focal: float = Field(default=1.0, ge=0)
    ord: float = Field(default=1.0, ge=0, description="ordinal NLL; 0 = as released (defect D1)")
    focal_gamma: float = Field(default=1.0, ge=0)
    np_weights: list[float] | None = Field(default=None, min_length=2, max_length=2)
    type_weights: list[float] | None = None


def class_weights(pixel_counts: Sequence[int] | np.ndarray) -> list[float]:
    """Official `check_weight_loss`: w_c = (N_0 / N_c)^(1/3), rescaled so that sum(w) = C.

    pixel_counts: N_c per class c = 0..C-1 over the training type maps (0 = background).
    A class absent from the training data (N_c = 0) is never a target, so its weight cannot
    matter; it gets 0 and the others are rescaled to sum to the number of present classes.
    """
    counts = np.asarray(pixel_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size < 2 or counts[0] <= 0:
        raise ConfigError(f"class weights need background and class pixel counts, got {counts.tolist()}")
    present = counts > 0
    w = np.zeros_like(counts)
    w[present] = np.cbrt(counts[0] / counts[present])
    w *= present.sum() / w.sum()
    return [float(x) for x in w]


def self_guided_factor(levels: torch.Tensor) -> torch.Tensor:
    """m(v) = 1 + 2[v = 1] + [v = 2]: x3 on the outermost level, x2 on the next, else x1."""
    return 1.0 + 2.0 * (levels == 1).to(torch.float32) + (levels == 2).to(torch.float32)


def weighted_ce(prob: torch.Tensor, onehot: torch.Tensor, weights: torch.Tensor, pixel_w: torch.Tensor | None = None) -> torch.Tensor:
    """mean over pixels of -sum_c w_c t_c log p_c (official `categorical_crossentropy_modified`)."""
    per_pixel = -(weights.view(1, -1, 1, 1) * onehot * torch.log(prob.clamp(EPS, 1.0 - EPS))).sum(1)
    if pixel_w is not None:
        per_pixel = per_pixel * pixel_w
    return per_pixel.mean()


def focal_loss(
    prob: torch.Tensor, onehot: torch.Tensor, weights: torch.Tensor, gamma: float = 1.0, pixel_w: torch.Tensor | None = None
) -> torch.Tensor:
    """mean over pixels of -sum_c w_c t_c (1 - q_c)^gamma log q_c (official `focal_loss_modified`)."""
    q = prob.clamp(EPS, 1.0 - EPS)
    per_pixel = -(weights.view(1, -1, 1, 1) * onehot * (1.0 - q) ** gamma * torch.log(q)).sum(1)
    if pixel_w is not None:
        per_pixel = per_pixel * pixel_w
    return per_pixel.mean()


def ordinal_probs(ord_logits: torch.Tensor) -> torch.Tensor:
    """(B, 16, h, w) logits -> (B, 8, 2, h, w) softmax of each classifier's pair; [:, k, 1] = P(level > k)."""
    b, c, h, w = ord_logits.shape
    if c != 2 * NUM_LEVELS:
        raise ValueError(f"ordinal output has {c} channels, expected {2 * NUM_LEVELS}")
    return F.softmax(ord_logits.view(b, NUM_LEVELS, 2, h, w), dim=2)


def predicted_levels(ord_logits: torch.Tensor) -> torch.Tensor:
    """ŷ = sum_k argmax(P_k), int64 (B, h, w); a tie counts as "no" (as `decode_ordinal`)."""
    b, _, h, w = ord_logits.shape
    pairs = ord_logits.view(b, NUM_LEVELS, 2, h, w)
    return (pairs[:, :, 1] > pairs[:, :, 0]).sum(1)


def ordinal_nll(ord_logits: torch.Tensor, levels: torch.Tensor, pixel_w: torch.Tensor | None = None) -> torch.Tensor:
    """mean over pixels of -sum_k ([k < y] log P_k(1) + [k >= y] log P_k(0)) (official `loss_ord`)."""
    p = ordinal_probs(ord_logits).clamp(EPS, 1.0 - EPS)
    k = torch.arange(NUM_LEVELS, device=levels.device).view(1, -1, 1, 1)
    above = (k < levels.unsqueeze(1)).to(p.dtype)  # classifier k says "level > k"
    per_pixel = -(above * torch.log(p[:, :, 1]) + (1.0 - above) * torch.log(p[:, :, 0])).sum(1)
    if pixel_w is not None:
        per_pixel = per_pixel * pixel_w
    return per_pixel.mean()


def sonnet_loss(
    outputs: Mapping[str, torch.Tensor],
    targets: Mapping[str, torch.Tensor],
    config: SonnetLossConfig,
    *,
    self_guided: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of SONNET's four terms, and each unweighted term as a float (for logs).

    outputs: np (B,2,h,w), ord (B,16,h,w), tp (B,K+1,h,w) logits. targets: np, tp, ord
    (B,h,w) ints. config must hold np_weights and type_weights (training fills them in).
    self_guided: phase 3's re-weighting (module docstring).
    """
    if config.np_weights is None or config.type_weights is None:
        raise ConfigError("SONNET loss: np_weights and type_weights must be set (training computes them)")
    np_true, tp_true, ord_true = targets["np"].long(), targets["tp"].long(), targets["ord"].long()
    n_types = outputs["tp"].shape[1]
    if len(config.type_weights) != n_types:
        raise ConfigError(f"SONNET loss: {len(config.type_weights)} type weights for a {n_types}-channel tp output")
    if tp_true.numel() and int(tp_true.max()) >= n_types:
        raise ValueError(f"type target has class {int(tp_true.max())} but the model has {n_types} tp channels")
    dtype = outputs["np"].dtype
    np_w = torch.tensor(config.np_weights, dtype=dtype, device=np_true.device)
    tp_w = torch.tensor(config.type_weights, dtype=dtype, device=np_true.device)

    guide_pred = guide_true = None
    if self_guided:
        guide_pred = self_guided_factor(predicted_levels(outputs["ord"].detach())).to(dtype)
        guide_true = self_guided_factor(ord_true).to(dtype)  # D6: the true level, as released

    np_prob = F.softmax(outputs["np"], dim=1)
    np_onehot = F.one_hot(np_true, 2).permute(0, 3, 1, 2).to(dtype)
    tp_prob = F.softmax(outputs["tp"], dim=1)
    tp_onehot = F.one_hot(tp_true, n_types).permute(0, 3, 1, 2).to(dtype)
    terms = {
        "np_ce": weighted_ce(np_prob, np_onehot, np_w, guide_pred),
        "np_dice": dice_loss(np_prob, np_onehot),
        "tp_focal": focal_loss(tp_prob, tp_onehot, tp_w, config.focal_gamma, guide_pred),
        "ord": ordinal_nll(outputs["ord"], ord_true, guide_true),
    }
    total = sum(getattr(config, name) * value for name, value in terms.items())
    return total, {name: float(value.detach()) for name, value in terms.items()}
