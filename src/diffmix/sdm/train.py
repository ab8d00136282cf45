"""Two-phase SDM training (spec 3): hybrid loss, AdamW, EMA, checkpoints that resume exactly, DDP.

Phase 1 trains with the real label maps only (lr 1e-4, label drop 0); phase 2 is the
classifier-free fine-tune (lr 2e-5, each sample's label zeroed with probability 0.2), carrying
the optimiser and EMA over as the official resume does (spec 1.6, 3). Every draw of a step
(items, crops, timesteps, noise, label drop, dropout) is derived from (seed, step, rank), so
re-running the command on its run folder continues from the last checkpoint and reproduces the
uninterrupted run's losses, also under `torchrun`, where only rank 0 writes.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from diffmix.checkpoints import (
    latest_checkpoint,
    load_checkpoint,
    load_state_strict,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from diffmix.config import build_config, dump_config, load_preset, read_yaml
from diffmix.data.io import write_image
from diffmix.data.sample import NucleiSample
from diffmix.distributed import barrier, init_distributed
from diffmix.errors import CheckpointError, ConfigError, DataError
from diffmix.maps.conditioning import condition_batch
from diffmix.runs import JsonlLog, prepare_run_folder
from diffmix.sdm.data import noise_generator, preview_batch, training_batch
from diffmix.sdm.diffusion import GaussianDiffusion
from diffmix.sdm.sampler import diffmix_sample, to_uint8
from diffmix.sdm.settings import OFFICIAL, SamplerSettings, fraction_text
from diffmix.sdm.unet import UNetConfig, UNetModel
from diffmix.seeds import preview_noise_seed, sdm_dropout_seed, weights_seed

CHECKPOINT_PATTERN = "ckpt_*.safetensors"


class SDMTrainConfig(BaseModel):
    """Everything a `diffmix sdm train` run depends on; stored in the run folder's config.yaml.

    Defaults are the paper's (spec 3): batch 16, 256-px crops, AdamW wd 0, lr 1e-4 then 2e-5
    with label drop 0 then 0.2, EMA 0.9999 without warm-up. The official run length was about
    10k steps with the split not recoverable; the default splits it 7000 + 3000.
    """

    model_config = ConfigDict(extra="forbid")

    unet: UNetConfig = Field(default_factory=UNetConfig)
    crop_size: int = 256
    batch_size: int = 16
    phase1_steps: int = 7000
    phase2_steps: int = 3000
    phase1_lr: float = 1e-4
    phase2_lr: float = 2e-5
    phase1_label_drop: float = 0.0
    phase2_label_drop: float = 0.2
    weight_decay: float = 0.0
    ema_rate: float = 0.9999
    ema_warmup: bool = False  # rate min(ema_rate, (1+n)/(10+n)) after n updates; off = official
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    diffusion_steps: int = 1000
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    sample_every: int = 1000  # 0: no sample grids
    sample_count: int = 4
    sample_steps: int = OFFICIAL.steps  # preview grids: the official DDIM sampler (spec 4), the reference
    sample_start_fraction: str = fraction_text(OFFICIAL.start_fraction)
    sample_guidance_scale: float = OFFICIAL.guidance_scale
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "SDMTrainConfig":
        factor = 2 ** (len(self.unet.channel_mult) - 1)
        if self.crop_size < 1 or self.crop_size % factor:
            raise ValueError(f"crop_size {self.crop_size} must be a positive multiple of {factor} for this U-Net")
        for name in ("batch_size", "diffusion_steps", "checkpoint_every", "keep_checkpoints", "sample_count", "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("phase1_steps", "phase2_steps", "sample_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.total_steps < 1:
            raise ValueError("phase1_steps + phase2_steps must be >= 1")
        for name in ("phase1_label_drop", "phase2_label_drop"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.ema_rate < 1.0:
            raise ValueError(f"ema_rate must be in [0, 1), got {self.ema_rate}")
        if self.sample_steps > self.diffusion_steps:
            raise ValueError("sample_steps cannot exceed diffusion_steps")
        try:
            _ = self.sampler  # validates the preview settings
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    @property
    def sampler(self) -> SamplerSettings:
        """The sampler of the preview grids."""
        return SamplerSettings(steps=self.sample_steps, start_fraction=self.sample_start_fraction,
                               guidance_scale=self.sample_guidance_scale)

    @property
    def total_steps(self) -> int:
        return self.phase1_steps + self.phase2_steps

    def phase(self, step: int) -> int:
        """1 or 2 for 0-based optimiser step `step`."""
        return 1 if step < self.phase1_steps else 2


def resolve_train_config(
    preset: str | Path | None, overrides: Mapping[str, Any] | None, num_classes: int
) -> SDMTrainConfig:
    """Build the config for a dataset with K = `num_classes` merged classes.

    `unet.label_nc` is K+2 (spec 1); a preset (or override) that does not set it gets it from
    the dataset, one that sets a different value is an error rather than a silently wrong model.
    """
    raw: dict[str, Any] = {}
    if preset is not None:
        p = str(preset)
        raw = read_yaml(p) if p.endswith((".yaml", ".yml")) or Path(p).is_file() else load_preset("sdm", p)
    overrides = dict(overrides or {})
    given = (overrides.get("unet") or {}).get("label_nc", (raw.get("unet") or {}).get("label_nc"))
    if given is None:
        unet = dict(overrides.get("unet") or {})
        unet["label_nc"] = num_classes + 2
        overrides["unet"] = unet
    cfg = build_config(SDMTrainConfig, "sdm", preset, overrides)
    if cfg.unet.label_nc != num_classes + 2:
        raise ConfigError(
            f"sdm config has unet.label_nc {cfg.unet.label_nc} but the dataset has {num_classes} classes, "
            f"which need {num_classes + 2} label channels (K+1 one-hot + edges); pick the preset of this dataset"
        )
    return cfg


@dataclass
class TrainResult:
    """What a training call leaves: the run folder, the last step, and (in this process) the models."""

    out: Path
    step: int
    checkpoint: Path | None
    model: torch.nn.Module = field(repr=False)
    ema: torch.nn.Module = field(repr=False)


def _amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def make_optimizer(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (spec 3), with torch's fused kernel where the parameters' device has one.

    The fused kernel updates every tensor in one pass instead of about ten ops per parameter
    tensor (the official for-loop on CPU; foreach on CUDA), with the same update rule (values
    agree to float rounding). On devices without it, the multi-tensor (foreach) path.
    """
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def train_step(
    net: torch.nn.Module,
    opt: torch.optim.Optimizer,
    diffusion: GaussianDiffusion,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    cond: torch.Tensor,
    *,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[torch.Tensor, bool]:
    """One optimiser step of the hybrid loss (spec 3) on a prepared batch; no EMA, no logging.

    x0, noise (B, C, H, W), t (B,) schedule indices, cond (B, label_nc, H, W) (label drop already
    applied), all on the model's device. The forward runs under autocast when `amp_dtype` is
    set; the loss is always computed in float32. `scaler` (fp16 only) scales the loss and skips
    the step on overflow (spec 3). Returns (stats, ok): detached float32 [mse, vb, loss] batch
    means, and whether the step was taken (the caller updates the EMA only then).
    Kept apart from `train_sdm` so that `benchmarks/sdm_train.py` times exactly this.
    """
    x_t = diffusion.q_sample(x0, t, noise)
    with torch.autocast(x0.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        output = net(x_t, diffusion.model_timesteps(t), cond)
    terms = diffusion.losses_from_output(output, x0, x_t, t, noise)
    loss = terms["loss"].mean()
    opt.zero_grad(set_to_none=True)
    ok = True
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        scale_before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        ok = scaler.get_scale() >= scale_before  # spec 3: an overflow skips the step (and the EMA)
    else:
        loss.backward()
        opt.step()
    stats = torch.stack([terms["mse"].mean(), terms["vb"].mean(), loss]).detach().float()
    return stats, ok


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, rate: float) -> None:
    """ema <- rate * ema + (1 - rate) * model, over parameters (buffers are copied)."""
    e_params = [p for p in ema.parameters()]
    m_params = [p.detach() for p in model.parameters()]
    torch._foreach_mul_(e_params, rate)
    torch._foreach_add_(e_params, m_params, alpha=1.0 - rate)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb)


def ema_rate_at(cfg: SDMTrainConfig, updates_done: int) -> float:
    """spec 3: a fixed 0.9999; with `ema_warmup`, min(rate, (1+n)/(10+n)) so short runs get a usable EMA."""
    if not cfg.ema_warmup:
        return cfg.ema_rate
    return min(cfg.ema_rate, (1.0 + updates_done) / (10.0 + updates_done))


def _prune_checkpoints(out: Path, keep: int) -> None:
    found = sorted(out.glob(CHECKPOINT_PATTERN), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    for p in found[:-keep]:
        p.unlink(missing_ok=True)


_PALETTE = np.array(
    [[0, 0, 0], [255, 255, 0], [255, 0, 0], [0, 160, 255], [0, 220, 0], [255, 0, 255], [255, 128, 0], [128, 128, 255]],
    dtype=np.uint8,
)


def label_rgb(type_map: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) picture of a label map: one colour per class, instance edges white."""
    rgb = _PALETTE[np.asarray(type_map) % len(_PALETTE)].copy()
    rgb[np.asarray(edges, dtype=bool)] = 255
    return rgb


def sample_grid(
    models: Sequence[torch.nn.Module],
    y0: torch.Tensor,
    inst_map: torch.Tensor,
    type_map: torch.Tensor,
    num_classes: int,
    *,
    settings: SamplerSettings,
    seed: int,
    diffusion: GaussianDiffusion,
    amp_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """uint8 picture with one row per tile: label | y0 | one synthesis per model.

    Row i re-synthesises y0 of tile i under the label map of tile i+1 (cyclically), so the
    grid shows whether the model follows the label rather than copying y0.
    """
    device = next(models[0].parameters()).device
    inst_map, type_map = inst_map.roll(1, 0), type_map.roll(1, 0)
    cond = condition_batch(inst_map.to(device), type_map.to(device), num_classes)
    y0 = y0.to(device)
    columns = [np.stack([label_rgb(t, c[-1]) for t, c in zip(type_map.numpy(), cond.cpu().numpy())]), to_uint8(y0)]
    noise = torch.randn(y0.shape, generator=torch.Generator().manual_seed(preview_noise_seed(seed))).to(device)
    for model in models:
        was_training = model.training
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            x = diffmix_sample(model, y0, cond, settings, noise=noise, diffusion=diffusion)
        model.train(was_training)
        columns.append(to_uint8(x.float()))
    b, h, w, _ = columns[0].shape
    scale = max(1, 128 // max(h, w))
    gap = 2
    grid = np.full((b * (h * scale + gap) - gap, len(columns) * (w * scale + gap) - gap, 3), 255, dtype=np.uint8)
    for r in range(b):
        for c, col in enumerate(columns):
            tile = col[r].repeat(scale, 0).repeat(scale, 1)
            y, x = r * (h * scale + gap), c * (w * scale + gap)
            grid[y : y + h * scale, x : x + w * scale] = tile
    return grid


def train_sdm(
    samples: Sequence[NucleiSample],
    num_classes: int,
    out: str | Path,
    cfg: SDMTrainConfig,
    *,
    device: str | None = None,
    run_info: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train (or resume training) an SDM on full images `samples` into the run folder `out`.

    `num_classes` is K (merged classes); the label maps have K+2 channels. `run_info` (e.g. the
    dataset path) is stored with the config so a re-run on another dataset is refused. Under
    `torchrun` every rank calls this; rank 0 writes the folder, checkpoints, log and grids.
    Returns the folder, the final step and the trained model and EMA of this process.
    """
    if cfg.unet.label_nc != num_classes + 2:
        raise ConfigError(f"unet.label_nc {cfg.unet.label_nc} does not fit K={num_classes} classes (needs {num_classes + 2})")
    if not samples:
        raise DataError("SDM training needs at least one image")
    small = [s.name for s in samples if min(s.shape) < cfg.crop_size]
    if small:  # found here, not at step 0 after the run folder was made
        raise DataError(f"images smaller than the {cfg.crop_size}-px training crop: {small[:5]}")
    info = init_distributed(device)  # an unusable device fails here, before the folder exists
    dev = info.device
    run_cfg = {"train": dump_config(cfg), **dict(run_info or {}), "num_classes": int(num_classes), "world_size": info.world_size}
    if info.is_main:
        out, resuming = prepare_run_folder(out, run_cfg, kind="sdm-train")
    barrier()
    if not info.is_main:
        out, resuming = prepare_run_folder(out, run_cfg, kind="sdm-train", clean=False)
    out = Path(out)

    torch.manual_seed(weights_seed(cfg.seed))  # same initial weights on every rank
    model = UNetModel(cfg.unet).to(dev)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = make_optimizer(model.parameters(), cfg.phase1_lr, cfg.weight_decay)
    amp_dtype = _amp_dtype(cfg.precision, dev)
    use_scaler = amp_dtype == torch.float16
    scaler = torch.amp.GradScaler(dev.type, init_scale=2.0**20, enabled=use_scaler)  # spec 3: log2 scale starts at 20

    start, ema_updates = 0, 0
    ckpt = latest_checkpoint(out, CHECKPOINT_PATTERN) if resuming else None
    if ckpt is not None:
        state, meta = load_checkpoint(ckpt)
        load_state_strict(model, state.get("model"), str(ckpt), "this run's U-Net")
        load_state_strict(ema, state.get("ema"), str(ckpt), "this run's EMA U-Net")
        try:
            opt.load_state_dict(state["optimizer"])
            if use_scaler and "scaler" in state:
                scaler.load_state_dict(state["scaler"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{ckpt}: does not fit this run ({exc})") from None
        set_rng_state(state["rng"])
        start, ema_updates = int(meta["step"]), int(meta["ema_updates"])

    log = JsonlLog(out / "log.jsonl")
    if info.is_main:
        log.truncate_after(start)
    barrier()

    net: torch.nn.Module = model
    if info.distributed:
        net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    diffusion = GaussianDiffusion.linear(cfg.diffusion_steps)
    preview = preview_batch(samples, cfg.sample_count, cfg.crop_size, cfg.seed) if info.is_main else None

    def save(step: int) -> Path:
        path = out / f"ckpt_{step:07d}.safetensors"
        tensors = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(), "rng": rng_state()}
        if use_scaler:
            tensors["scaler"] = scaler.state_dict()
        meta = {
            "step": step,
            "phase": cfg.phase(step - 1),
            "ema_updates": ema_updates,
            "ema_rate": cfg.ema_rate,
            "unet_config": cfg.unet.model_dump(mode="json"),
            "num_classes": int(num_classes),
            "train_config": dump_config(cfg),
            "world_size": info.world_size,
        }
        save_checkpoint(path, tensors, meta)
        _prune_checkpoints(out, cfg.keep_checkpoints)
        return path

    bar = tqdm(total=cfg.total_steps, initial=start, disable=not (progress and info.is_main), desc="sdm train")
    last_ckpt = ckpt
    model.train()
    tick = time.perf_counter()
    for step in range(start, cfg.total_steps):
        phase = cfg.phase(step)
        lr = cfg.phase1_lr if phase == 1 else cfg.phase2_lr
        drop = cfg.phase1_label_drop if phase == 1 else cfg.phase2_label_drop
        for group in opt.param_groups:
            group["lr"] = lr

        batch = training_batch(samples, step, cfg.batch_size, cfg.crop_size, cfg.seed, info.rank, info.world_size)
        gen = noise_generator(cfg.seed, step, info.rank)
        t = torch.randint(0, diffusion.num_timesteps, (cfg.batch_size,), generator=gen)
        noise = torch.randn(batch.image.shape, generator=gen)
        keep = (torch.rand(cfg.batch_size, generator=gen) >= drop).float()  # spec 1.5: zero the whole map
        torch.manual_seed(sdm_dropout_seed(cfg.seed, step, info.rank))

        x0, noise, t = batch.image.to(dev), noise.to(dev), t.to(dev)
        cond = condition_batch(batch.inst_map.to(dev), batch.type_map.to(dev), num_classes)
        cond = cond * keep.to(dev).view(-1, 1, 1, 1)
        stats, ok = train_step(net, opt, diffusion, x0, t, noise, cond, amp_dtype=amp_dtype,
                               scaler=scaler if use_scaler else None)
        if ok:
            ema_update(ema, model, ema_rate_at(cfg, ema_updates))
            ema_updates += 1

        if info.distributed:
            torch.distributed.all_reduce(stats)
            stats /= info.world_size
        mse, vb, total = stats.cpu().tolist()
        done = step + 1
        if info.is_main:
            now = time.perf_counter()
            log.write({"step": done, "phase": phase, "lr": lr, "mse": mse, "vb": vb, "loss": total,
                       "skipped": not ok, "sec_per_step": round(now - tick, 4)})
            tick = now
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}", phase=phase)
            if done % cfg.checkpoint_every == 0 or done == cfg.total_steps:
                last_ckpt = save(done)
            if cfg.sample_every and (done % cfg.sample_every == 0 or done == cfg.total_steps):
                grid = sample_grid(
                    [model, ema], preview.image, preview.inst_map, preview.type_map, num_classes,
                    settings=cfg.sampler, seed=cfg.seed, diffusion=diffusion,
                    amp_dtype=amp_dtype,
                )
                write_image(out / "samples" / f"step_{done:07d}.png", grid)
        if done % cfg.checkpoint_every == 0 or done == cfg.total_steps or (
            cfg.sample_every and done % cfg.sample_every == 0
        ):
            barrier()
    bar.close()
    final = latest_checkpoint(out, CHECKPOINT_PATTERN) if info.is_main else last_ckpt
    return TrainResult(out=out, step=max(start, cfg.total_steps), checkpoint=final, model=model, ema=ema)


__all__ = [
    "SDMTrainConfig",
    "TrainResult",
    "resolve_train_config",
    "train_sdm",
    "make_optimizer",
    "train_step",
    "ema_update",
    "ema_rate_at",
    "sample_grid",
    "label_rgb",
]
