"""The DiffMix sampler: partial DDIM from a noised original patch under a new label map, with CFG.

spec 4, in the k-diffusion style: one function, no hidden state, the network is any callable
`model(x (B,3,H,W), t (B,) original steps, y (B,K+2,H,W)) -> (B,>=3,H,W)` whose first three
output channels are the predicted noise (the learned-variance channels are ignored by DDIM).
A `UNetModel` takes a faster path with the same results: its label-free encoder runs once for
the conditional/null pair, the null label's SPADEs come from a 3x3 evaluation, and every SPADE
modulation of the (fixed) label map is computed once per run instead of once per step.
`synthesize` / `synthesize_dataset` apply it to (y0 patch, label map) datasets for `sdm sample`.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from diffmix.data.sample import NucleiSample
from diffmix.errors import CheckpointError, ConfigError, DataError
from diffmix.sdm.diffusion import GaussianDiffusion
from diffmix.sdm.unet import SPADELabels, UNetModel

Model = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def start_index(steps: int, start_fraction: str | float | Fraction) -> int:
    """Index of the first DDIM step: floor(steps * start_fraction) - 1, in exact integers.

    spec 4: ddim_percent 55 of 100 steps gives n = 55, start index 54 (original t = 540). The
    fraction is read exactly from its decimal text (0.55 -> 11/20), so no float product can
    floor to the wrong side (the official code multiplies floats).
    """
    try:
        frac = start_fraction if isinstance(start_fraction, Fraction) else Fraction(str(start_fraction))
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"start_fraction {start_fraction!r} is not a number") from None
    if not 0 < frac <= 1:
        raise ConfigError(f"start_fraction must be in (0, 1], got {start_fraction}")
    if steps < 1:
        raise ConfigError(f"DDIM needs at least one step, got {steps}")
    n = (steps * frac.numerator) // frac.denominator
    if n < 1:
        raise ConfigError(f"start_fraction {start_fraction} of {steps} steps leaves no step to run")
    return n - 1


def diffmix_sample(
    model: Model,
    y0: torch.Tensor,
    cond: torch.Tensor,
    *,
    steps: int = 100,
    start_fraction: str | float | Fraction = "0.55",
    guidance_scale: float = 1.5,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    diffusion: GaussianDiffusion | None = None,
    progress: bool = False,
    label_cache: bool | None = None,
) -> torch.Tensor:
    """Re-synthesise `y0` under the label map `cond`; returns x_0 in [-1, 1], shaped like y0.

    y0: (B, 3, H, W) original patches in [-1, 1]; cond: (B, K+2, H, W) conditioning maps.
    `diffusion` is the full schedule (default: linear, T=1000), respaced here to "ddim<steps>".

    spec 4, step by step:
      - start at i0 = floor(steps * start_fraction) - 1 (t = 540 for the defaults) and noise y0
        ONCE: y = sqrt(abar_i0) y0 + sqrt(1 - abar_i0) noise (`noise` given, or drawn from
        `generator`);
      - each step runs the conditional and the null-label (all-zero) pass as ONE batched
        forward of size 2B and combines eps = eps_u + s (eps_c - eps_u), s = `guidance_scale`.
        This is the code form; the paper's Eq. 7, eps_c + s_paper (eps_c - eps_u), is the same
        with s_paper = s - 1, so the paper's "s = 1.5" run is s_paper = 0.5. As in the official
        code, guidance is applied only when s > 1; otherwise only the conditional pass runs;
      - DDIM: x0 = clip((y - sqrt(1-abar) eps) / sqrt(abar), -1, 1), eps re-derived from the
        clipped x0, then y = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z with
        sigma = eta sqrt((1-abar_prev)/(1-abar)) sqrt(1 - abar/abar_prev) and abar_{-1} = 1, so
        the last step returns x0 itself.
    The per-step scalars are float64 numbers; tensors keep y0's dtype and device.

    When `model` is a `UNetModel`, each step calls `UNetModel.forward_guided` (encoder once,
    null-label SPADEs from a 3x3 evaluation; plain `forward` when s <= 1) with one
    `SPADELabels` for the whole run: the label map is the same at every step, so with
    `label_cache` every SPADE's (1 + gamma, beta) is computed at the first step and reused.
    None (default) caches when `UNetModel.label_cache_bytes` fits `label_cache_budget(device)`;
    False recomputes them at every step (least memory). Results equal the plain two-pass loop up
    to float rounding (benchmarks/sdm.py checks 1e-4 and measures the speed-up).
    """
    if y0.dim() != 4 or cond.dim() != 4 or y0.shape[0] != cond.shape[0] or y0.shape[2:] != cond.shape[2:]:
        raise ConfigError(f"y0 (B,3,H,W) and cond (B,K+2,H,W) must agree, got {tuple(y0.shape)} and {tuple(cond.shape)}")
    diffusion = diffusion or GaussianDiffusion.linear()
    spaced = diffusion.respace(f"ddim{steps}") if steps != diffusion.num_timesteps else diffusion
    i0 = start_index(spaced.num_timesteps, start_fraction)
    acp = spaced.alphas_cumprod
    b = y0.shape[0]
    cond = cond.to(dtype=y0.dtype, device=y0.device)
    guided = guidance_scale > 1.0
    y_in = torch.cat([cond, torch.zeros_like(cond)]) if guided and not isinstance(model, UNetModel) else cond

    if noise is None:
        noise = torch.randn(y0.shape, generator=generator, dtype=y0.dtype, device="cpu" if generator is None else generator.device)
    noise = noise.to(dtype=y0.dtype, device=y0.device)
    x = math.sqrt(acp[i0]) * y0 + math.sqrt(1.0 - acp[i0]) * noise

    labels = None
    if isinstance(model, UNetModel):
        if label_cache is None:
            need = model.label_cache_bytes(b, y0.shape[2], y0.shape[3], _compute_dtype(y0), null=guided)
            label_cache = need <= label_cache_budget(y0.device)
        labels = SPADELabels(cond, null=guided, store=label_cache)

    indices = range(i0, -1, -1)
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc="DDIM", leave=False)
    c = y0.shape[1]
    for i in indices:
        if labels is not None:  # UNetModel: encoder shared by the pair, SPADE modulations reused
            t = torch.full((b,), int(spaced.timesteps[i]), dtype=torch.long, device=y0.device)
            if guided:
                out_c, out_u = model.forward_guided(x, t, cond, labels=labels)
                out = torch.cat([out_c[:, :c], out_u[:, :c]]).to(y0.dtype)
            else:
                out = model(x, t, cond, labels=labels)[:, :c].to(y0.dtype)
        else:
            t = torch.full((b * (2 if guided else 1),), int(spaced.timesteps[i]), dtype=torch.long, device=y0.device)
            x_in = torch.cat([x, x]) if guided else x
            out = model(x_in, t, y_in)[:, :c].to(y0.dtype)
        if guided:
            eps_c, eps_u = out[:b], out[b:]
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        else:
            eps = out
        a = float(acp[i])
        a_prev = float(acp[i - 1]) if i > 0 else 1.0
        x0 = ((x - math.sqrt(1.0 - a) * eps) / math.sqrt(a)).clamp(-1.0, 1.0)
        eps = (x / math.sqrt(a) - x0) / math.sqrt(1.0 / a - 1.0)
        sigma = eta * math.sqrt((1.0 - a_prev) / (1.0 - a)) * math.sqrt(1.0 - a / a_prev)
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1.0 - a_prev - sigma**2, 0.0)) * eps
        if sigma > 0 and i > 0:
            z = torch.randn(y0.shape, generator=generator, dtype=y0.dtype, device="cpu" if generator is None else generator.device)
            x = x + sigma * z.to(y0.device)
    return x


def label_cache_budget(device: torch.device) -> int:
    """Bytes `diffmix_sample` may spend on stored SPADE modulations by default: half the free
    memory of a CUDA device (the paper config needs 1.9 GiB per patch in bf16), 2 GiB elsewhere."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    return 2 * 2**30


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype convolutions produce for x: the autocast dtype where autocast is on."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) samples in [-1, 1] -> uint8 (B, H, W, 3): (x+1)/2*255 rounded half up, clamped.

    spec 4 post-processing; round-half-up is floor(v + 0.5), not torch.round's half-to-even.
    """
    v = torch.floor((x.detach().float().cpu() + 1.0) / 2.0 * 255.0 + 0.5).clamp(0, 255)
    return v.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


# ------------------------------------------------------------------------------------------
# applying the sampler to a dataset of (y0 patch, label map) pairs


def load_sampling_model(
    path: str | Path, device: str | torch.device = "cpu", weights: str = "auto"
) -> tuple[torch.nn.Module, int]:
    """(U-Net in eval mode, label_nc) from a `sdm train` checkpoint or an imported official file.

    `weights`: "auto" takes the EMA when the file has one (the official choice, spec 3), else
    the raw weights; "ema" or "model" force one. Only those tensors are read from disk
    (`diffmix.sdm.convert.load_unet`), not the optimiser state of a training checkpoint.
    """
    from diffmix.sdm.convert import load_unet

    if weights not in ("auto", "ema", "model"):
        raise ConfigError(f"weights must be auto, ema or model, got {weights!r}")
    model, config = load_unet(path, device, weights)
    return model, config.label_nc


def synthesize(
    model: Model,
    samples: Sequence[NucleiSample],
    num_classes: int,
    *,
    steps: int = 100,
    start_fraction: str | float | Fraction = "0.55",
    guidance_scale: float = 1.5,
    eta: float = 0.0,
    batch_size: int = 8,
    seed: int = 0,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> list[NucleiSample]:
    """Re-synthesise each sample's image under its own label maps; labels are kept as they are.

    Each sample is a (y0 patch, custom label map) pair. Patch i's start noise comes from a
    generator seeded with (seed, i), so the output does not depend on `batch_size` (up to
    float rounding of batched convolutions); eta > 0 noise is drawn per batch.
    """
    from diffmix.maps.conditioning import condition_batch
    from diffmix.sdm.data import stack_samples

    device = torch.device(device)
    out: list[NucleiSample] = []
    order = list(range(len(samples)))
    batches = [order[i : i + batch_size] for i in range(0, len(order), max(1, batch_size))]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="sdm sample")
    for idx in batches:
        group = [samples[i] for i in idx]
        y0, inst, types = stack_samples(group)
        cond = condition_batch(inst, types, num_classes).to(device)
        noise = torch.stack(
            [torch.randn(y0.shape[1:], generator=torch.Generator().manual_seed(_patch_seed(seed, i))) for i in idx]
        )
        gen = torch.Generator().manual_seed(_patch_seed(seed, idx[0]) ^ 0x5EED)
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            x = diffmix_sample(model, y0.to(device), cond, steps=steps, start_fraction=start_fraction,
                               guidance_scale=guidance_scale, eta=eta, noise=noise, generator=gen)
        images = to_uint8(x)
        out.extend(NucleiSample(img, s.inst_map, s.type_map, s.name, s.num_classes) for img, s in zip(images, group))
    return out


def _patch_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint32)[0])


def synthesize_dataset(
    ckpt: str | Path,
    maps: str | Path,
    out: str | Path,
    *,
    steps: int = 100,
    start_fraction: str = "0.55",
    guidance_scale: float = 1.5,
    eta: float = 0.0,
    batch_size: int = 8,
    seed: int = 0,
    weights: str = "auto",
    scheme: str | None = None,
    device: str | None = None,
    progress: bool = False,
) -> Path:
    """`diffmix sdm sample`: read the maps dataset, synthesise, write a dataset folder with provenance."""
    from diffmix.data.io import read_dataset, write_dataset

    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    start_index(steps, start_fraction)  # fail on a bad fraction before loading anything
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: exists and is not empty; choose a new output folder")
    from diffmix.distributed import resolve_device

    dev = resolve_device(device)
    data = read_dataset(maps, scheme)
    model, label_nc = load_sampling_model(ckpt, dev, weights)
    k = data.scheme.num_classes
    if label_nc != k + 2:
        raise CheckpointError(
            f"{ckpt}: model takes {label_nc} label channels but {maps} has {k} classes ({k + 2} channels)"
        )
    mult = getattr(getattr(model, "config", None), "channel_mult", None)
    if mult:  # the U-Net halves H and W len(mult) - 1 times and concatenates skips back
        factor = 2 ** (len(mult) - 1)
        bad = [f"{s.name} ({s.shape[0]}x{s.shape[1]})" for s in data.samples if s.shape[0] % factor or s.shape[1] % factor]
        if bad:
            raise DataError(
                f"{maps}: {len(bad)} map(s) have a side not divisible by {factor}, the U-Net's total "
                f"downsampling of {ckpt}: {', '.join(bad[:5])}; crop or pad them to a multiple of {factor}"
            )
    samples = synthesize(
        model, data.samples, k, steps=steps, start_fraction=start_fraction, guidance_scale=guidance_scale,
        eta=eta, batch_size=batch_size, seed=seed, device=dev,
        amp_dtype=torch.bfloat16 if dev.type == "cuda" else None, progress=progress,
    )
    provenance = {
        "generator": "diffmix sdm sample",
        "checkpoint": str(Path(ckpt).resolve()),
        "weights": weights,
        "maps": str(Path(maps).resolve()),
        "steps": steps,
        "start_fraction": str(start_fraction),
        "start_t": int(GaussianDiffusion.linear().respace(f"ddim{steps}").timesteps[start_index(steps, start_fraction)]),
        "guidance_scale": guidance_scale,
        "eta": eta,
        "seed": seed,
    }
    return Path(write_dataset(out, samples, data.scheme, provenance=provenance))
