"""The DiffMix sampler: a noised original patch, re-synthesised under a new label map with CFG.

spec 4, as small pure functions (no file I/O; `diffmix.synth` applies them to datasets):

- `guided(model, cond, s)` turns a network into a `Denoiser`, `(x, t) -> eps`: classifier-free
  guidance eps_u + s (eps_c - eps_u) around the conditional and null-label (all-zero) passes.
  A network that offers `conditioned(y, null=..., label_cache=...)` (the SDM `UNetModel` does:
  encoder once per pair, cached SPADE modulations) supplies the passes itself; any other
  callable `model(x, t, y) -> (B, >=C, H, W)` is run on the stacked [cond; null] batch;
- the schedule is the checkpoint's own diffusion, respaced, and the partial start a slice of
  it (`diffmix.sdm.solvers`);
- `diffmix_sample` noises y0 once at the start and hands denoiser, x and schedule to the solver
  chosen in `SamplerSettings` (DDIM by default, exactly the official sampler).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from diffmix.errors import ConfigError
from diffmix.sdm.diffusion import GaussianDiffusion
from diffmix.sdm.settings import DEFAULTS, SamplerSettings, start_index
from diffmix.sdm.solvers import SOLVER_FUNCTIONS, Denoiser, Schedule, noised_start, sampling_schedule

Model = Callable[[Tensor, Tensor, Tensor], Tensor]

__all__ = [
    "Model",
    "SamplerSettings",
    "conditioned",
    "diffmix_sample",
    "guided",
    "start_index",
    "to_uint8",
]


def conditioned(model: Model, cond: Tensor, *, null: bool, label_cache: bool | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    """`f(x, t)` = the network's output under the fixed label map `cond` (B rows); with `null`,
    2B rows: those, then the null label's (spec 1.5: all zeros) for the same x and t.

    A model with a `conditioned` method provides its own (faster) f; `label_cache` is passed on
    as a hint (None: the model decides). Otherwise f runs `model` once on the stacked batch.
    """
    offer = getattr(model, "conditioned", None)
    if callable(offer):
        return offer(cond, null=null, label_cache=label_cache)
    if not null:
        return lambda x, t: model(x, t, cond)
    y_in = torch.cat([cond, torch.zeros_like(cond)])
    return lambda x, t: model(torch.cat([x, x]), torch.cat([t, t]), y_in)


def guided(model: Model, cond: Tensor, guidance_scale: float, *, channels: int = 3,
           label_cache: bool | None = None) -> Denoiser:
    """The classifier-free guided noise prediction as a `Denoiser` (spec 4 step 2).

    eps = eps_u + s (eps_c - eps_u) in the code form (paper s = code s - 1), computed from ONE
    call of the pair per step; as in the official code the null pass runs only when s > 1,
    otherwise eps is the conditional pass alone. Only the first `channels` output channels
    (the noise) are used: DDIM ignores the learned variance.
    """
    use_null = guidance_scale > 1.0
    f = conditioned(model, cond, null=use_null, label_cache=label_cache)
    b = cond.shape[0]

    def denoise(x: Tensor, t: int) -> Tensor:
        steps = torch.full((b,), int(t), dtype=torch.long, device=x.device)
        out = f(x, steps)[:, :channels].to(x.dtype)
        if not use_null:
            return out
        eps_c, eps_u = out[:b], out[b:]
        return eps_u + guidance_scale * (eps_c - eps_u)

    return denoise


def diffmix_sample(
    model: Model,
    y0: Tensor,
    cond: Tensor,
    settings: SamplerSettings = DEFAULTS,
    *,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    diffusion: GaussianDiffusion | None = None,
    label_cache: bool | None = None,
) -> Tensor:
    """Re-synthesise `y0` under the label map `cond`; returns x_0 in [-1, 1], shaped like y0.

    y0: (B, 3, H, W) original patches in [-1, 1]; cond: (B, K+2, H, W) conditioning maps.
    `diffusion`: the checkpoint's full schedule (default: spec 3's linear T = 1000).
    y0 is noised ONCE at the start point, sqrt(abar) y0 + sqrt(1 - abar) noise, with `noise`
    given or drawn from `generator`; then the solver of `settings` integrates to clean data
    under `guided`. DDIM with eta > 0 also draws its step noise from `generator`.
    The per-step scalars are float64 numbers; tensors keep y0's dtype and device.
    `label_cache`: passed to a model's `conditioned` (the U-Net: reuse every SPADE modulation
    of the fixed label map across steps; None decides by memory, False recomputes them).
    """
    if y0.dim() != 4 or cond.dim() != 4 or y0.shape[0] != cond.shape[0] or y0.shape[2:] != cond.shape[2:]:
        raise ConfigError(f"y0 (B,3,H,W) and cond (B,K+2,H,W) must agree, got {tuple(y0.shape)} and {tuple(cond.shape)}")
    schedule: Schedule = sampling_schedule(diffusion or GaussianDiffusion.linear(), settings)
    if noise is None:
        device = "cpu" if generator is None else generator.device
        noise = torch.randn(y0.shape, generator=generator, dtype=y0.dtype, device=device)
    x = noised_start(y0, noise.to(dtype=y0.dtype, device=y0.device), schedule)
    cond = cond.to(dtype=y0.dtype, device=y0.device)
    denoiser = guided(model, cond, settings.guidance_scale, channels=y0.shape[1], label_cache=label_cache)
    solver = SOLVER_FUNCTIONS[settings.solver]
    extra: dict[str, Any] = {"eta": settings.eta, "generator": generator} if settings.solver == "ddim" else {}
    return solver(denoiser, x, schedule, **extra)


def to_uint8(x: Tensor) -> np.ndarray:
    """(B, 3, H, W) samples in [-1, 1] -> uint8 (B, H, W, 3): (x+1)/2*255 rounded half up, clamped.

    spec 4 post-processing; round-half-up is floor(v + 0.5), not torch.round's half-to-even.
    """
    v = torch.floor((x.detach().float().cpu() + 1.0) / 2.0 * 255.0 + 0.5).clamp(0, 255)
    return v.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
