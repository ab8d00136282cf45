"""Segmenter training: HoVer-Net's two phases on original + synthetic patches, resumable, DDP-ready.

The regime follows the official PyTorch code (hovernet_notes section 3):

- phase 1 trains with the encoder frozen (`freeze_encoder_phase1`), phase 2 trains everything,
  continuing from phase 1's weights; each phase has its own Adam(lr 1e-4, betas 0.9/0.999) and a
  StepLR (x0.1) stepped once per epoch, stepping at `lr_step_fraction` (1/2) of the phase's epochs,
  i.e. epoch 25 of 50 in the official configuration;
- the loss is `diffmix.seg.loss.hover_loss` (NP CE+Dice, HV MSE+MSGE, TP CE+Dice, weights 1).

Run folder (design.md): `config.yaml` (the resolved config and the training sources), `log.jsonl`
(one record per step: losses, lr, phase), `ckpt_<step>.safetensors` (model, optimiser, scheduler,
position in the data stream, RNG states; written atomically at the end of every epoch, or every
`checkpoint_every` steps) and `final.safetensors` (model + metadata, what `load_segmenter` and
`diffmix seg infer` read). Re-running on the same folder resumes from the newest checkpoint and
continues exactly as the uninterrupted run would have (the data stream is a pure function of
(seed, epoch, position), see `diffmix.seg.data`); a folder holding another run is refused.

Under `torchrun`, every rank trains on its share of each epoch's patches (DistributedSampler
style; `batch_size` is per process, as hover_net's per-GPU batch), gradients are averaged by
DistributedDataParallel, and rank 0 alone writes the folder. No validation split is used (the
official configuration validates on the test set); the returned checkpoint is the last one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, model_serializer

from diffmix.config import build_config, dump_config
from diffmix.data.io import Dataset, read_dataset
from diffmix.errors import ConfigError
from diffmix.seg.data import PatchItems, Source, check_schemes, epoch_loader
from diffmix.seg.loss import LossConfig, hover_loss
from diffmix.seg.models import HOVERNET_SIZES, SegModelConfig, build_segmenter

FINAL_NAME = "final.safetensors"
LOG_NAME = "log.jsonl"


class SegTrainConfig(BaseModel):
    """Everything that determines the trained weights (runtime options such as the device,
    loader workers and threads are arguments of `train_segmenter`, not part of the run)."""

    model_config = ConfigDict(extra="forbid")

    model: SegModelConfig = SegModelConfig()
    loss: LossConfig = LossConfig()
    patch_size: int | None = Field(
        default=None, ge=8, description="small net: training crop side; hovernet: fixed to its input size"
    )
    phase1_epochs: int = Field(default=50, ge=0)
    phase2_epochs: int = Field(default=50, ge=0)
    freeze_encoder_phase1: bool = True
    batch_size: int = Field(default=16, ge=1, description="phase 1, per process")
    batch_size_phase2: int = Field(default=4, ge=1, description="phase 2, per process")
    lr: float = Field(default=1.0e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    lr_step_fraction: float = Field(default=0.5, gt=0, le=1)
    lr_gamma: float = Field(default=0.1, gt=0, le=1)
    samples_per_epoch: int | None = Field(
        default=None, ge=1, description="patches per epoch; None = every planned crop once"
    )
    crops_per_sample: Literal["area"] | int = Field(
        default="area", description="random crops of one sample per epoch: 'area' = floor(H/P)*floor(W/P)"
    )
    augment: bool = True
    augmentation: Literal["light", "hovernet"] = Field(
        default="light",
        description="light: dihedral + colour jitter; hovernet: the official affine/flip/blur/colour "
        "pipeline with its ranges (diffmix.seg.augment)",
    )
    colour_jitter: float = Field(default=0.1, ge=0, le=0.5, description="light augmentation only")
    seed: int = 0
    checkpoint_every: int | None = Field(default=None, ge=1, description="steps; None = end of every epoch")
    keep_checkpoints: int = Field(default=2, ge=1)

    @model_serializer(mode="wrap")
    def _drop_default_augmentation(self, handler: Any) -> dict[str, Any]:
        # The run identity (config.yaml) leaves out `augmentation` at its default, so run folders
        # written before the option existed still resume instead of being "a different run".
        data = handler(self)
        if data.get("augmentation") == "light":
            data.pop("augmentation")
        return data


def resolve_config(preset: str | Path | None = "cpu-tiny", overrides: Mapping[str, Any] | None = None) -> SegTrainConfig:
    """A shipped preset (cpu-tiny, hovernet-fast, hovernet-original) or YAML file, plus overrides."""
    return build_config(SegTrainConfig, "seg", preset, overrides)


def _as_source(obj: Any, default_count: int | None = None) -> Source:
    count = default_count
    if isinstance(obj, Source):
        return obj
    if isinstance(obj, tuple):
        obj, count = obj
    ds = obj if isinstance(obj, Dataset) else read_dataset(obj)
    label = str(Path(ds.root).resolve()) if ds.root is not None else f"<in-memory {len(ds)} samples>"
    return Source(ds, None if count is None else int(count), label)


def _steps_per_epoch(items: PatchItems, world: int, batch: int) -> int:
    return len(items.rank_positions(0, 0, world)) // batch


def _phase_of(epoch: int, cfg: SegTrainConfig) -> int:
    return 1 if epoch < cfg.phase1_epochs else 2


class _Phase:
    """Optimiser + scheduler (+ DDP wrapper) of one training phase."""

    def __init__(self, model: torch.nn.Module, cfg: SegTrainConfig, phase: int, dist_device: torch.device | None) -> None:
        self.phase = phase
        model.freeze_encoder(phase == 1 and cfg.freeze_encoder_phase1)
        epochs = cfg.phase1_epochs if phase == 1 else cfg.phase2_epochs
        # hovernet_notes 3: a fresh Adam per phase, StepLR(25 of 50 epochs), stepped per epoch.
        self.optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
        step_size = max(1, round(cfg.lr_step_fraction * epochs))
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=step_size, gamma=cfg.lr_gamma)
        self.batch_size = cfg.batch_size if phase == 1 else cfg.batch_size_phase2
        self.module = model
        if dist_device is not None:
            from torch.nn.parallel import DistributedDataParallel

            ids = [dist_device.index] if dist_device.type == "cuda" else None
            self.module = DistributedDataParallel(model, device_ids=ids)


def train_segmenter(
    train_datasets: Any,
    out: str | Path,
    config: SegTrainConfig | Mapping[str, Any] | None = None,
    extra: Sequence[Any] = (),
    *,
    preset: str | None = None,
    device: str | None = None,
    num_workers: int = 0,
    num_threads: int | None = None,
    progress: bool = True,
) -> Path:
    """Train (or resume) a segmenter in run folder `out`; returns the final checkpoint path.

    train_datasets: one or several original datasets (a `Dataset`, a folder path, or a
        `(dataset_or_path, count)` pair); extra: synthetic datasets in the same forms (a plain
        dataset contributes every sample, a pair `count` samples per epoch plan).
    config: a SegTrainConfig or dict (default: preset `cpu-tiny`); `preset` is recorded in the
        checkpoint metadata only. `model.num_classes` is taken from the datasets' class scheme.
    """
    from tqdm import tqdm

    from diffmix.distributed import barrier, init_distributed
    from diffmix.runs import (
        JsonlLog,
        latest_checkpoint,
        load_checkpoint,
        load_state_strict,
        prepare_run_folder,
        rng_state,
        save_checkpoint,
        set_rng_state,
    )

    if config is None:
        cfg = resolve_config("cpu-tiny")
        preset = preset or "cpu-tiny"
    elif isinstance(config, SegTrainConfig):
        cfg = config
    else:
        cfg = build_config(SegTrainConfig, "seg", None, config)
    if num_threads:
        torch.set_num_threads(num_threads)

    if isinstance(train_datasets, (Dataset, str, Path, tuple, Source)):
        train_datasets = [train_datasets]
    sources = [_as_source(d) for d in train_datasets] + [_as_source(d) for d in extra]
    if not sources:
        raise ConfigError("no training dataset given")
    num_classes = check_schemes(sources)
    if cfg.model.num_classes is not None and cfg.model.num_classes != num_classes:
        raise ConfigError(
            f"model.num_classes is {cfg.model.num_classes} but the datasets' scheme has {num_classes} classes"
        )
    model_cfg = cfg.model.model_copy(update={"num_classes": num_classes})

    if cfg.model.arch == "small":
        patch_size, margin = cfg.patch_size or 64, 0
    else:
        in_size, out_size = HOVERNET_SIZES[cfg.model.arch]
        if cfg.patch_size not in (None, in_size):
            raise ConfigError(f"{cfg.model.arch} takes {in_size}-px patches; patch_size {cfg.patch_size} cannot be used")
        patch_size, margin = in_size, (in_size - out_size) // 2

    info = init_distributed(device)  # an unusable device fails here, before the folder exists
    dist_device = info.device if info.distributed else None
    run_identity = {
        "config": dump_config(cfg),
        "sources": [{"dataset": s.label, "count": s.count} for s in sources],
    }
    out = Path(out)

    meta = {
        "kind": "seg",
        "num_classes": num_classes,
        "model": dump_config(model_cfg),
        "preset": preset,
        "scheme": sources[0].dataset.scheme.name,
        "class_names": {int(k): v for k, v in sources[0].dataset.scheme.classes.items()},
        "patch_size": patch_size,
        "crop_margin": margin,
    }
    final_path = out / FINAL_NAME

    items = PatchItems(
        sources, patch_size, margin, seed=cfg.seed, augment=cfg.augment,
        jitter=cfg.colour_jitter, samples_per_epoch=cfg.samples_per_epoch, crops=cfg.crops_per_sample,
        augmentation=cfg.augmentation,
    )
    total_epochs = cfg.phase1_epochs + cfg.phase2_epochs
    for phase, bs in ((1, cfg.batch_size), (2, cfg.batch_size_phase2)):
        epochs = cfg.phase1_epochs if phase == 1 else cfg.phase2_epochs
        if epochs and _steps_per_epoch(items, info.world_size, bs) == 0:
            raise ConfigError(
                f"phase {phase}: {items.epoch_length()} patches per epoch over {info.world_size} process(es) "
                f"give no full batch of {bs}; lower the batch size or raise samples_per_epoch"
            )
    steps_total = sum(
        _steps_per_epoch(items, info.world_size, cfg.batch_size if _phase_of(e, cfg) == 1 else cfg.batch_size_phase2)
        for e in range(total_epochs)
    )

    # Everything a mistake can break is checked above or here (the pretrained encoder file is
    # read while building), before the run folder is made: a folder is only left by a run.
    resumable = out.is_dir() and (final_path.is_file() or latest_checkpoint(out) is not None)
    torch.manual_seed(cfg.seed)
    model = build_segmenter(model_cfg, load_pretrained=not resumable)
    model.to(info.device)

    if info.is_main:
        prepare_run_folder(out, run_identity, kind="seg-train")
    barrier()
    if not info.is_main:  # only checks: the folder exists
        prepare_run_folder(out, run_identity, kind="seg-train", clean=False)
    if final_path.is_file():
        return final_path
    ckpt = latest_checkpoint(out)
    log = JsonlLog(out / LOG_NAME)

    epoch, start_batch, step = 0, 0, 0
    saved: dict[str, Any] | None = None
    if ckpt is not None:
        saved, _ = load_checkpoint(ckpt, map_location="cpu")
        load_state_strict(model, saved.get("model"), str(ckpt), "this run's model")
        pos = saved["progress"]
        epoch, start_batch, step = int(pos["epoch"]), int(pos["batch"]), int(pos["step"])
        set_rng_state(saved["rng"])
        if info.is_main:
            log.truncate_after(step)
    barrier()

    def save(next_epoch: int, next_batch: int, ph: _Phase) -> None:
        if not info.is_main:
            return
        state = {
            "model": model.state_dict(),
            "optimizer": ph.optimizer.state_dict(),
            "scheduler": ph.scheduler.state_dict(),
            "rng": rng_state(),
            "progress": {"epoch": next_epoch, "batch": next_batch, "step": step, "phase": ph.phase},
        }
        save_checkpoint(out / f"ckpt_{step:08d}.safetensors", state, {**meta, "step": step})
        olds = sorted(out.glob("ckpt_*.safetensors"))[: -cfg.keep_checkpoints]
        for old in olds:
            old.unlink(missing_ok=True)

    bar = tqdm(total=steps_total, initial=step, disable=not (progress and info.is_main), desc="seg train", unit="step")
    ph: _Phase | None = None
    t_last = time.perf_counter()
    for ep in range(epoch, total_epochs):
        phase = _phase_of(ep, cfg)
        if ph is None or ph.phase != phase:
            ph = _Phase(model, cfg, phase, dist_device)
            if saved is not None and int(saved["progress"]["phase"]) == phase:
                ph.optimizer.load_state_dict(saved["optimizer"])
                ph.scheduler.load_state_dict(saved["scheduler"])
            saved = None
        model.train()
        positions = items.rank_positions(ep, info.rank, info.world_size)
        n_batches = len(positions) // ph.batch_size
        first = start_batch if ep == epoch else 0
        loader = epoch_loader(items, ep, positions[first * ph.batch_size :], ph.batch_size, num_workers)
        lr = ph.optimizer.param_groups[0]["lr"]
        for b, batch in enumerate(loader, start=first):
            batch = {k: v.to(info.device, non_blocking=True) for k, v in batch.items()}
            outputs = ph.module(batch.pop("image"))
            loss, terms = hover_loss(outputs, batch, cfg.loss)
            ph.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            ph.optimizer.step()
            step += 1
            values = torch.tensor([float(loss.detach())] + list(terms.values()), dtype=torch.float64)
            if info.distributed:
                values = values.to(info.device)
                torch.distributed.all_reduce(values)
                values = values.cpu() / info.world_size
            if info.is_main:
                now = time.perf_counter()
                record = {"step": step, "epoch": ep, "phase": phase, "lr": lr, "loss": float(values[0])}
                record.update({k: float(v) for k, v in zip(terms, values[1:].tolist())})
                record["sec"] = round(now - t_last, 4)
                t_last = now
                log.write(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", phase=phase)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and b + 1 < n_batches:
                save(ep, b + 1, ph)
        ph.scheduler.step()
        save(ep + 1, 0, ph)
    bar.close()

    if info.is_main:
        save_checkpoint(final_path, {"model": model.state_dict()}, {**meta, "step": step})
    barrier()
    return final_path
