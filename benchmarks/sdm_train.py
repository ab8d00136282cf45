"""Benchmark: our SDM training step against the official one, measured in the same run.

Issue 13 item 3: `diffmix.sdm.train.train_step` (+ the EMA update and the loss read-back that
`train_sdm` does every step) against a reference written here the way the authors' code runs a
step (SDM `guided_diffusion`: `TrainLoop.run_step`, `GaussianDiffusion.training_losses`,
`MixedPrecisionTrainer._optimize_normal`, `update_ema`), on the same weights and batch:

- U-Net maths of the official modules over the same parameters: legacy QKV attention (two
  einsums, fp32 softmax) that ALWAYS checkpoints, and res-blocks that checkpoint when the
  reference's `use_checkpoint` is set (the authors' training scripts pass `--use_checkpoint True`);
- the hybrid loss as `training_losses` computes it: split, `[eps.detach(), v]`, `_vb_terms_bpd`
  through `p_mean_variance`, every schedule value gathered from float64 numpy per call;
- grads zeroed in place, `log_loss_dict` (loss means and per-quartile values read back),
  `_compute_norms` (grad and parameter norms read back per tensor), `torch.optim.AdamW` with
  torch's default implementation (the per-tensor loop on CPU), the EMA as a loop over tensors.

Data loading and label preparation are left out of both (the official loader runs in worker
processes). fp32 on both sides: the official fp16 mode casts conv weights to half, which is a
GPU mode.

Pairs at equal flags (the ratio is reference seconds / ours, median over interleaved repeats of
the CPU time of this process, which a busy shared machine disturbs far less than wall time):
- "no_checkpoint": neither side checkpoints res-blocks (official attention still recomputes);
- "checkpoint": the authors' training flags (`use_checkpoint True`) against ours with
  `use_checkpoint: selective` (same values and gradients, bit for bit, as full recomputation;
  only cheap ops are recomputed) and, for reference, ours with full recomputation;
- "bf16": ours under CPU bf16 autocast against the fp32 reference (not at parity: the loss
  differs at ~1e-4; reported for the opt-in `precision: bf16`).
Parity of the first step at equal weights and batch: loss (relative), gradients and updated
parameters (max abs difference relative to the largest reference value).

The batch's label maps (`--labels`): "nuclei" (default), the maps of built-in toy tiles, the
kind an SDM trains on, or a dataset folder (random crops of its label maps, e.g. CoNSeP Train);
"random", a class per pixel, is timed beside either as the worst case of the U-Net's
`LabelWindows` (no two 5x5 label windows alike, so SPADE's label convs run over the whole map,
as they did before the windows).

Measured on the shared 2-core machine (AMD EPYC Zen 4; small config: 32 channels x (1,2,3,4),
attention at 16 and 8, 15.7 M parameters, 64-px crops, batch 4, one thread, `--repeats 5`),
CPU seconds per step, median, 2026-12-01: ours 1.56 vs reference 2.61 (**1.67x**); authors'
flags: ours selective 1.84 vs reference 3.42 (**1.86x**), ours full 2.07 (1.65x); random labels
2.59 vs 2.67 (1.03x); bf16 1.12 (2.33x against the fp32 reference, loss 1.0e-4 off). Parity on
the nuclei batch: loss equal to the last bit, gradients 3.3e-7, update 6e-8, EMA 7e-9.
The same step on real label maps, four batches of four random 64-px crops of CoNSeP Train (as
training draws them, background and nuclei mixed; `--labels CONSEP/Train --repeats 3 --seed S`,
S = 100..103): 1.23x, 1.45x, 1.32x, 1.69x at equal flags; 1.58x, 1.83x, 1.58x, 2.03x against
the authors' flags; loss within 7.3e-8. Batches of dense tissue gain least (`LabelWindows` is
off at sizes where more than half the windows are distinct).
Activations held for backward: 483 MiB unchecked (404 with the plain convs: each distinct
window keeps its hidden vector at 9 positions), 237 selective, 54 full.

Where the time went (profile, before `LabelWindows`): convolutions were 85% of the step, at
75-90% of one core's fp32 peak in oneDNN on both sides, and SPADE's label convs alone were
about three quarters of a forward's multiply-adds in this config (FlopCounterMode). They depend
on the label map only, and a nucleus map repeats its 5x5 windows (10-18% distinct at 64 px,
28-44% at 32 in random batches of CoNSeP training crops), so the windows path evaluates them
once per distinct window, equal to float rounding. The official step's other extra work
(einsum attention, attention always recomputed, per-tensor AdamW and norm read-backs, the
loss) is ~2% of it.

    python benchmarks/sdm_train.py [--size 64] [--batch 4] [--channels 32] [--repeats 5] [--threads 1] [--labels nuclei|random]
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import math
import statistics
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from diffmix.data.io import read_dataset
from diffmix.errors import DiffMixError
from diffmix.data.toy import generate_toy_sample
from diffmix.maps.conditioning import condition_map
from diffmix.sdm.diffusion import GaussianDiffusion
from diffmix.sdm.train import ema_update, make_optimizer, train_step
from diffmix.sdm.unet import (
    AttentionBlock,
    Downsample,
    ResBlock,
    SDMResBlock,
    SPADEGroupNorm,
    UNetConfig,
    UNetModel,
    Upsample,
    timestep_embedding,
)

# --------------------------------------------------------------------------------------------
# the official U-Net maths over a UNetModel's parameters (module names are the official ones)


def _official_checkpoint(fn: Callable, args: tuple, enabled: bool):
    """guided_diffusion.nn.checkpoint: keep no activations, re-run the block in backward."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _group_norm32(norm: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """SDM's GroupNorm32: computed in float32, cast back."""
    return F.group_norm(x.float(), norm.num_groups, norm.weight, norm.bias, norm.eps).type(x.dtype)


def _resample(x: torch.Tensor, mode: str | None) -> torch.Tensor:
    """SDM Upsample/Downsample without conv: nearest x2, 2x2 average pool."""
    if mode == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    if mode == "down":
        return F.avg_pool2d(x, kernel_size=2, stride=2)
    return x


def _spade(m: SPADEGroupNorm, x: torch.Tensor, segmap: torch.Tensor) -> torch.Tensor:
    x = F.group_norm(x, m.norm.num_groups, eps=m.norm.eps)
    segmap = F.interpolate(segmap, size=x.shape[2:], mode="nearest")
    actv = F.relu(F.conv2d(segmap, m.mlp_shared[0].weight, m.mlp_shared[0].bias, padding=1))
    gamma = F.conv2d(actv, m.mlp_gamma.weight, m.mlp_gamma.bias, padding=1)
    beta = F.conv2d(actv, m.mlp_beta.weight, m.mlp_beta.bias, padding=1)
    return x * (1 + gamma) + beta


def _conv(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, conv.weight, conv.bias, padding=conv.padding)


def _skip(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x if isinstance(m, torch.nn.Identity) else _conv(m, x)


def _emb_out(m: torch.nn.Module, emb: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    lin = m.emb_layers[1]
    out = F.linear(F.silu(emb), lin.weight, lin.bias).type(dtype)[:, :, None, None]
    return torch.chunk(out, 2, dim=1)


def _res_block(m: ResBlock, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    h = F.silu(_group_norm32(m.in_layers[0], x))
    h, x = _resample(h, m.resample), _resample(x, m.resample)
    h = _conv(m.in_layers[2], h)
    scale, shift = _emb_out(m, emb, h.dtype)
    h = _group_norm32(m.out_layers[0], h) * (1 + scale) + shift
    h = _conv(m.out_layers[3], F.dropout(F.silu(h), m.out_layers[2].p, m.training))
    return _skip(m.skip_connection, x) + h


def _sdm_block(m: SDMResBlock, x: torch.Tensor, cond: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    h = F.silu(_spade(m.in_norm, x, cond))
    h, x = _resample(h, m.resample), _resample(x, m.resample)
    h = _conv(m.in_layers[1], h)
    scale, shift = _emb_out(m, emb, h.dtype)
    h = _spade(m.out_norm, h, cond) * (1 + scale) + shift
    h = _conv(m.out_layers[2], F.dropout(F.silu(h), m.out_layers[1].p, m.training))
    return _skip(m.skip_connection, x) + h


def _attention(m: AttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """AttentionBlock._forward with QKVAttentionLegacy: heads split before q/k/v, q and k each
    scaled by ch**-1/4, two einsums, softmax in float32."""
    b, c, *spatial = x.shape
    x = x.reshape(b, c, -1)
    qkv = F.conv1d(_group_norm32(m.norm, x), m.qkv.weight, m.qkv.bias)
    bs, width, length = qkv.shape
    ch = width // (3 * m.num_heads)
    q, k, v = qkv.reshape(bs * m.num_heads, ch * 3, length).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)
    h = F.conv1d(a, m.proj_out.weight, m.proj_out.bias)
    return (x + h).reshape(b, c, *spatial)


def reference_forward(model: UNetModel, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor,
                      use_checkpoint: bool) -> torch.Tensor:
    """The official `UNetModel.forward` on `model`'s parameters (attention always checkpointed)."""
    def run(seq: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
        for layer in seq:
            if isinstance(layer, SDMResBlock):
                h = _official_checkpoint(lambda a, c, e, m=layer: _sdm_block(m, a, c, e), (h, y, emb), use_checkpoint)
            elif isinstance(layer, ResBlock):
                h = _official_checkpoint(lambda a, e, m=layer: _res_block(m, a, e), (h, emb), use_checkpoint)
            elif isinstance(layer, AttentionBlock):
                h = _official_checkpoint(lambda a, m=layer: _attention(m, a), (h,), True)
            elif isinstance(layer, (Downsample, Upsample)):
                raise NotImplementedError("the reference covers resblock_updown=True (the SDM config)")
            else:
                h = _conv(layer, h)
        return h

    lin1, lin2 = model.time_embed[0], model.time_embed[2]
    t_emb = timestep_embedding(timesteps, model.config.model_channels)  # same sinusoid as SDM's nn.py
    emb = F.linear(F.silu(F.linear(t_emb, lin1.weight, lin1.bias)), lin2.weight, lin2.bias)
    hs = []
    h = x
    for block in model.input_blocks:
        h = run(block, h)
        hs.append(h)
    h = run(model.middle_block, h)
    for block in model.output_blocks:
        h = run(block, torch.cat([h, hs.pop()], dim=1))
    norm, conv = model.out[0], model.out[2]
    return _conv(conv, F.silu(_group_norm32(norm, h)))


# --------------------------------------------------------------------------------------------
# the official hybrid loss (guided_diffusion.gaussian_diffusion), schedule in float64 numpy


class OfficialSchedule:
    """The arrays `GaussianDiffusion.__init__` of guided-diffusion computes for a linear schedule."""

    def __init__(self, steps: int = 1000) -> None:
        scale = 1000 / steps
        betas = np.linspace(scale * 0.0001, scale * 0.02, steps, dtype=np.float64)
        alphas = 1.0 - betas
        acp = np.cumprod(alphas, axis=0)
        acp_prev = np.append(1.0, acp[:-1])
        self.betas = betas
        self.sqrt_alphas_cumprod = np.sqrt(acp)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - acp)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / acp)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / acp - 1)
        posterior_variance = betas * (1.0 - acp_prev) / (1.0 - acp)
        self.posterior_log_variance_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(acp_prev) / (1.0 - acp)
        self.posterior_mean_coef2 = (1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp)


def _extract(arr: np.ndarray, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    res = torch.from_numpy(arr).to(device=t.device)[t].float()
    while len(res.shape) < len(shape):
        res = res[..., None]
    return res.expand(shape)


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(1, x.ndim)))


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + ((mean1 - mean2) ** 2) * torch.exp(-logvar2))


def _approx_cdf(x):
    return 0.5 * (1.0 + torch.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * torch.pow(x, 3))))


def _discretized_loglik(x, means, log_scales):
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))


def reference_losses(sched: OfficialSchedule, model_fn: Callable, x_start, t, noise) -> dict[str, torch.Tensor]:
    """`training_losses` for LEARNED_RANGE variance, epsilon prediction and loss_type MSE."""
    x_t = (_extract(sched.sqrt_alphas_cumprod, t, x_start.shape) * x_start
           + _extract(sched.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)
    model_output = model_fn(x_t, t)
    c = x_t.shape[1]
    model_output, model_var_values = torch.split(model_output, c, dim=1)
    frozen_out = torch.cat([model_output.detach(), model_var_values], dim=1)

    # _vb_terms_bpd(model=lambda *_: frozen_out, clip_denoised=False)
    true_mean = (_extract(sched.posterior_mean_coef1, t, x_t.shape) * x_start
                 + _extract(sched.posterior_mean_coef2, t, x_t.shape) * x_t)
    true_log_variance = _extract(sched.posterior_log_variance_clipped, t, x_t.shape)
    eps, var_values = torch.split(frozen_out, c, dim=1)  # p_mean_variance
    min_log = _extract(sched.posterior_log_variance_clipped, t, x_t.shape)
    max_log = _extract(np.log(sched.betas), t, x_t.shape)
    frac = (var_values + 1) / 2
    model_log_variance = frac * max_log + (1 - frac) * min_log
    _ = torch.exp(model_log_variance)  # model_variance, computed and unused by the VLB
    pred_xstart = (_extract(sched.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                   - _extract(sched.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)
    model_mean = (_extract(sched.posterior_mean_coef1, t, x_t.shape) * pred_xstart
                  + _extract(sched.posterior_mean_coef2, t, x_t.shape) * x_t)
    kl = _mean_flat(_normal_kl(true_mean, true_log_variance, model_mean, model_log_variance)) / np.log(2.0)
    nll = -_discretized_loglik(x_start, model_mean, 0.5 * model_log_variance)
    nll = _mean_flat(nll) / np.log(2.0)
    vb = torch.where(t == 0, nll, kl)
    mse = _mean_flat((noise - model_output) ** 2)
    return {"mse": mse, "vb": vb, "loss": mse + vb}


class ReferenceTrainer:
    """One official `TrainLoop.run_step` (use_fp16 False, microbatch = batch, uniform sampler)."""

    def __init__(self, model: UNetModel, use_checkpoint: bool, lr: float = 1e-4, ema_rate: float = 0.9999) -> None:
        self.model = model
        self.use_checkpoint = use_checkpoint
        self.params = list(model.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)  # torch's default implementation
        self.ema_params = [p.detach().clone() for p in self.params]
        self.ema_rate = ema_rate
        self.sched = OfficialSchedule()
        self.logged: dict[str, list[float]] = {}

    def step(self, x0, t, noise, cond) -> dict[str, torch.Tensor]:
        for p in self.params:  # fp16_util.zero_grad
            if p.grad is not None:
                p.grad.detach_()
                p.grad.zero_()
        weights = torch.ones(t.shape[0])
        losses = reference_losses(self.sched, lambda x, ts: reference_forward(self.model, x, ts, cond, self.use_checkpoint),
                                  x0, t, noise)
        loss = (losses["loss"] * weights).mean()
        for key, values in losses.items():  # log_loss_dict
            self.logged.setdefault(key, []).append((values * weights).mean().item())
            for sub_t, sub_loss in zip(t.cpu().numpy(), (values * weights).detach().cpu().numpy()):
                self.logged.setdefault(f"{key}_q{int(4 * sub_t / 1000)}", []).append(float(sub_loss))
        loss.backward()
        grad_norm = param_norm = 0.0  # _compute_norms, logged every step
        for p in self.params:
            with torch.no_grad():
                param_norm += torch.norm(p, p=2, dtype=torch.float32).item() ** 2
                if p.grad is not None:
                    grad_norm += torch.norm(p.grad, p=2, dtype=torch.float32).item() ** 2
        self.logged.setdefault("grad_norm", []).append(math.sqrt(grad_norm))
        self.opt.step()
        for targ, src in zip(self.ema_params, self.params):  # nn.update_ema
            targ.detach().mul_(self.ema_rate).add_(src, alpha=1 - self.ema_rate)
        return losses


class OurTrainer:
    """What `train_sdm` runs per step once the batch is on the device: `train_step`, the EMA
    update and the read-back of the three logged loss values."""

    def __init__(self, model: UNetModel, lr: float = 1e-4, ema_rate: float = 0.9999,
                 amp_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.ema = copy.deepcopy(model).requires_grad_(False)
        self.opt = make_optimizer(model.parameters(), lr, 0.0)
        self.diffusion = GaussianDiffusion.linear()
        self.ema_rate = ema_rate
        self.amp_dtype = amp_dtype

    def step(self, x0, t, noise, cond) -> list[float]:
        stats, ok = train_step(self.model, self.opt, self.diffusion, x0, t, noise, cond, amp_dtype=self.amp_dtype)
        if ok:
            ema_update(self.ema, self.model, self.ema_rate)
        return stats.cpu().tolist()


# --------------------------------------------------------------------------------------------
# the benchmark


def small_config(size: int, channels: int, label_nc: int = 6) -> UNetConfig:
    """The authors' 64-px SDM shape (mults 1,2,3,4, two res-blocks, attention at size/4 and
    size/8, heads of 32) at `channels` base width (design.md calibration: 32 -> 15.7 M parameters)."""
    return UNetConfig(image_size=size, model_channels=channels, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
                      attention_resolutions=(size // 4, size // 8), num_head_channels=32, label_nc=label_nc)


def randomised(config: UNetConfig, seed: int) -> UNetModel:
    """A model with every weight non-zero (zero-initialised output convs would make eps = 0 and
    hide differences in everything before them)."""
    torch.manual_seed(seed)
    model = UNetModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.train()


LABELS = ("nuclei", "random")


def batch(b: int, size: int, label_nc: int, seed: int, labels: str = "nuclei") -> tuple[torch.Tensor, ...]:
    """x0, t, noise, cond: a random image batch, timesteps (one of them 0: the decoder-NLL
    branch) and a one-hot + edge label map: "nuclei", the label maps of built-in toy tiles
    (`diffmix.data.toy`: nuclei of 4-12 px radius, what an SDM trains on); "random", a class
    drawn per pixel and 10% edge pixels (no two label windows alike: the worst case of the
    U-Net's `LabelWindows`, whose convs then run over the whole map); or a dataset folder, whose
    label maps give `b` random crops (background and nuclei as training draws them)."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(b, 3, size, size, generator=gen) * 2 - 1
    t = torch.randint(0, 1000, (b,), generator=gen)
    t[0] = 0
    noise = torch.randn(x0.shape, generator=gen)
    if labels != "random":
        rng = np.random.default_rng(seed)
        maps = _nuclei_maps(b, size, label_nc, rng) if labels == "nuclei" else _dataset_maps(labels, b, size, label_nc, rng)
        cond = torch.from_numpy(np.stack([condition_map(inst, types, label_nc - 2) for inst, types in maps]))
        return x0, t, noise, cond
    cls = torch.randint(0, label_nc - 1, (b, size, size), generator=gen)
    edges = (torch.rand(b, 1, size, size, generator=gen) < 0.1).float()
    cond = torch.cat([F.one_hot(cls, label_nc - 1).permute(0, 3, 1, 2).float(), edges], 1)
    return x0, t, noise, cond


def _nuclei_maps(b: int, size: int, label_nc: int, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """(inst_map, type_map) of `b` toy tiles."""
    if label_nc < 6:
        raise SystemExit(f"nuclei labels have 4 classes: label_nc must be >= 6, got {label_nc}")
    return [(s.inst_map, s.type_map) for s in (generate_toy_sample(size, rng, f"tile{i}") for i in range(b))]


def _dataset_maps(folder: str, b: int, size: int, label_nc: int,
                  rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """(inst_map, type_map) of `b` random size x size crops of a dataset folder's labels."""
    try:
        data = read_dataset(folder)
    except DiffMixError as exc:
        raise SystemExit(f"--labels: {exc}") from None
    if data.scheme.num_classes != label_nc - 2:
        raise SystemExit(f"{folder}: {data.scheme.num_classes} classes, the U-Net takes {label_nc - 2}")
    maps = []
    for _ in range(b):
        s = data[int(rng.integers(len(data)))]
        y, x = (int(rng.integers(0, n - size + 1)) for n in s.inst_map.shape)
        maps.append((s.inst_map[y:y + size, x:x + size], s.type_map[y:y + size, x:x + size]))
    return maps


def parity(config: UNetConfig, b: int, seed: int, use_checkpoint: bool | str = False,
           ours_checkpoint: bool | str | None = None, labels: str = "nuclei") -> dict:
    """First step of ours and of the reference from equal weights and batch.

    Loss terms (relative difference), gradients (max abs difference over all of them relative to
    the largest reference gradient: a per-tensor ratio is meaningless where a gradient is zero in
    exact arithmetic, e.g. the key bias of attention, whose rounding noise both sides get), our
    optimiser's update against the official AdamW applied to OUR gradients (the update divides
    by sqrt(v) + 1e-8, so first-step updates of near-zero gradients are sign noise and only an
    update from equal gradients can be compared), and the EMA after the step.
    """
    base = randomised(config, seed)
    ours_model, ref_model = copy.deepcopy(base), copy.deepcopy(base)
    ours_model.set_checkpointing(use_checkpoint if ours_checkpoint is None else ours_checkpoint)
    x0, t, noise, cond = batch(b, config.image_size, config.label_nc, seed + 1, labels)
    ref = ReferenceTrainer(ref_model, bool(use_checkpoint))
    ref_losses = ref.step(x0, t, noise, cond)
    ours = OurTrainer(ours_model)
    stats = ours.step(x0, t, noise, cond)

    ours_grads = torch.cat([p.grad.flatten() for p in ours_model.parameters()])
    ref_grads = torch.cat([p.grad.flatten() for p in ref_model.parameters()])
    official_opt_model = copy.deepcopy(base)
    for p, q in zip(official_opt_model.parameters(), ours_model.parameters()):
        p.grad = q.grad.clone()
    torch.optim.AdamW(official_opt_model.parameters(), lr=1e-4, weight_decay=0.0).step()
    update_diff = max((a - b_).abs().max().item()
                      for a, b_ in zip(ours_model.parameters(), official_opt_model.parameters()))
    rel = {key: abs(value - ref_losses[key].mean().item()) / abs(ref_losses[key].mean().item())
           for key, value in zip(("mse", "vb", "loss"), stats)}
    return {
        "loss_ours": stats[2],
        "loss_reference": ref_losses["loss"].mean().item(),
        "loss_rel_diff": rel["loss"],
        "mse_rel_diff": rel["mse"],
        "vb_rel_diff": rel["vb"],
        "grad_max_rel_diff": (ours_grads - ref_grads).abs().max().item() / ref_grads.abs().max().item(),
        "update_max_abs_diff_vs_official_adamw": update_diff,
        "ema_max_abs_diff_after_step": max((a - b_).abs().max().item() for a, b_ in
                                           zip(ours.ema.parameters(), ref.ema_params)),
    }


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_bytes() -> int | None:
    """Bytes the C heap has handed out (glibc `mallinfo2`: in-use arena + mmapped blocks), or
    None where glibc is not the allocator. torch's CPU allocator takes tensors from malloc and
    caches nothing, so a difference of two readings is the tensors created and still alive."""
    try:
        libc = ctypes.CDLL(None)
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    info = fn()
    return int(info.uordblks + info.hblkhd)


def activation_bytes(model: UNetModel, x0, t, noise, cond, use_checkpoint: bool | str) -> int | None:
    """Memory a training forward leaves alive for the backward (saved activations, checkpoint
    inputs, selectively kept outputs): heap in use after the loss minus before the forward."""
    model = copy.deepcopy(model)
    model.set_checkpointing(use_checkpoint)
    diffusion = GaussianDiffusion.linear()
    gc.collect()
    before = _heap_bytes()
    if before is None:
        return None
    x_t = diffusion.q_sample(x0, t, noise)
    out = model(x_t, diffusion.model_timesteps(t), cond)
    loss = diffusion.losses_from_output(out, x0, x_t, t, noise)["loss"].mean()
    held = _heap_bytes() - before
    loss.backward()  # frees the graph (and checks it was a working one)
    return held


def timing(config: UNetConfig, b: int, seed: int, repeats: int, labels: str = "nuclei") -> dict:
    """Seconds per step of each variant: median over `repeats` interleaved rounds, after one
    warm-up step each. CPU time of this process (the step runs on this thread's cores only) and
    wall time."""
    base = randomised(config, seed)
    data = batch(b, config.image_size, config.label_nc, seed + 1, labels)
    random_data = batch(b, config.image_size, config.label_nc, seed + 1, "random")

    def ours(checkpointing: bool | str, amp: torch.dtype | None = None, data=data) -> Callable[[], object]:
        model = copy.deepcopy(base)
        model.set_checkpointing(checkpointing)
        trainer = OurTrainer(model, amp_dtype=amp)
        return lambda: trainer.step(*data)

    def reference(checkpointing: bool, data=data) -> Callable[[], object]:
        trainer = ReferenceTrainer(copy.deepcopy(base), checkpointing)
        return lambda: trainer.step(*data)

    variants = {
        "ours": ours(False),
        "reference": reference(False),
        "ours_selective_checkpoint": ours("selective"),
        "ours_full_checkpoint": ours(True),
        "reference_checkpoint": reference(True),
        "ours_bf16": ours(False, torch.bfloat16),
        "ours_random_labels": ours(False, data=random_data),
        "reference_random_labels": reference(False, data=random_data),
    }
    for fn in variants.values():
        fn()
    cpu = {name: [] for name in variants}
    wall = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            c0, w0 = time.process_time(), time.perf_counter()
            fn()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    return {
        "cpu_seconds": {k: round(statistics.median(v), 4) for k, v in cpu.items()},
        "wall_seconds": {k: round(statistics.median(v), 4) for k, v in wall.items()},
        "cpu_seconds_all": {k: [round(x, 4) for x in v] for k, v in cpu.items()},
    }


def run(args: argparse.Namespace) -> dict:
    config = small_config(args.size, args.channels)
    seed = args.seed
    x0, t, noise, cond = batch(args.batch, args.size, config.label_nc, seed + 1, args.labels)
    base = randomised(config, seed)
    par = {
        "no_checkpoint": parity(config, args.batch, seed, labels=args.labels),
        "checkpoint_selective_vs_official": parity(config, args.batch, seed, True, "selective", args.labels),
        "no_checkpoint_random_labels": parity(config, args.batch, seed, labels="random"),
    }
    memory = {name: activation_bytes(base, x0, t, noise, cond, flag)
              for name, flag in (("none", False), ("selective", "selective"), ("full", True))}
    times = timing(config, args.batch, seed, args.repeats, args.labels)
    sec = times["cpu_seconds"]
    ratios = {
        "no_checkpoint": sec["reference"] / sec["ours"],
        "checkpoint_selective": sec["reference_checkpoint"] / sec["ours_selective_checkpoint"],
        "checkpoint_full": sec["reference_checkpoint"] / sec["ours_full_checkpoint"],
        "bf16_vs_fp32_reference": sec["reference"] / sec["ours_bf16"],
        "no_checkpoint_random_labels": sec["reference_random_labels"] / sec["ours_random_labels"],
    }
    bf16 = OurTrainer(copy.deepcopy(base), amp_dtype=torch.bfloat16).step(x0, t, noise, cond)[2]
    fp32 = par["no_checkpoint"]["loss_reference"]
    return {
        "benchmark": "sdm training step",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "config": config.model_dump(mode="json"),
        "batch": args.batch,
        "labels": args.labels,
        "repeats": args.repeats,
        "parity": par,
        "bf16_loss_rel_diff": abs(bf16 - fp32) / abs(fp32),
        "activation_mib": {k: None if v is None else round(v / 2**20, 1) for k, v in memory.items()},
        **times,
        "speedup": {k: round(v, 3) for k, v in ratios.items()},
        "target_speedup": 1.3,
        "parity_loss_rel_tol": 1.2e-7,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (0: torch's default; 1 avoids OpenMP oversubscription on a shared machine)")
    ap.add_argument("--labels", default="nuclei",
                    help="label maps of the timed batch: nuclei (toy tiles, what an SDM trains on), random (a class "
                         "per pixel) or a dataset folder (random crops of its labels, e.g. a CoNSeP Train folder)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(run(args)))


if __name__ == "__main__":
    main()
