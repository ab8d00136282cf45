"""A synthesis run: the planned patches sampled batch by batch into a resumable dataset folder.

Reproducibility and resumption. Each patch's initial noise comes from its own generator
seeded by `patch_seed(seed, source image name, patch index, map kind)` (the one noise-seeding
rule of synthesis), so which batch, process or run
computes a patch does not change its noise. Batches are fixed chunks of each rank's patch
list; a chunk with any patch missing is recomputed whole (same composition, hence the same
float arithmetic), and only its missing patches are written. So a run killed at any point
and re-run gives exactly the bytes of an uninterrupted run with the same batch size and
process count. (Other batch sizes give the same noise; the network's batched convolutions
may then differ in the last float bit, which can move a pixel by one grey level.) Each
patch's image and labels are written atomically and its manifest record last: a patch
counts as done only when its record exists, so no half-written patch is ever kept. Under
`torchrun`, rank r takes every world_size-th patch; rank 0 merges the records into
`manifest.json` after a barrier.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from diffmix.checkpoints import file_sha256
from diffmix.data.io import Dataset, read_dataset, write_dataset_json, write_sample
from diffmix.data.sample import NucleiSample
from diffmix.data.schemes import ClassScheme
from diffmix.distributed import barrier, init_distributed
from diffmix.errors import CheckpointError, ConfigError, DataError
from diffmix.maps.conditioning import condition_batch
from diffmix.runs import JsonlLog, check_output_folder, prepare_run_folder
from diffmix.sdm.convert import check_weights, load_sdm
from diffmix.sdm.data import image_to_tensor
from diffmix.sdm.sampler import diffmix_sample, to_uint8
from diffmix.sdm.settings import DEFAULTS, SamplerSettings
from diffmix.sdm.solvers import sampling_schedule
from diffmix.synth.jobs import MapsChoice, PatchJob, maps_list, plan_jobs
from diffmix.synth.labels import LabelMaps, check_map_kwargs, class_counts
from diffmix.synth.manifest import (
    MANIFEST,
    add_counts,
    dataset_fingerprint,
    is_done,
    known_records,
    merge_manifest,
    patch_record,
    read_manifest,
    write_record,
)


@dataclass
class SynthReport:
    """What a synthesis run made; `to_json()` is what `diffmix synthesize --json` writes.

    class_counts_before[kind]: nuclei per class in the ORIGINAL label patches at the planned
    grid positions; class_counts_after[kind]: in the custom label patches that became the
    synthetic patches' labels (nuclei cut by a patch border count in every patch they touch,
    as downstream training sees them); these and `map_reports` are filled on rank 0 only.
    n_written / n_skipped / patches_per_second cover all processes under torchrun: patches
    computed in this run over the longest rank's wall time (label maps included).
    """

    out: Path
    maps: list[str]
    n_patches: int
    n_written: int
    n_skipped: int
    seconds: float
    patches_per_second: float
    class_counts_before: dict[str, dict[int, int]]
    class_counts_after: dict[str, dict[int, int]]
    dataset_class_counts: dict[int, int]
    map_reports: dict[str, dict] = field(default_factory=dict)
    world_size: int = 1

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["out"] = str(self.out)
        for key in ("class_counts_before", "class_counts_after"):
            out[key] = {kind: {str(c): n for c, n in v.items()} for kind, v in out[key].items()}
        out["dataset_class_counts"] = {str(c): n for c, n in self.dataset_class_counts.items()}
        return out

    def counts_table(self, scheme: ClassScheme | None = None) -> str:
        """Nuclei per class before -> after, one line per map kind (what the CLI prints)."""
        classes = sorted({c for v in self.class_counts_before.values() for c in v}
                         | {c for v in self.class_counts_after.values() for c in v})
        name = (lambda c: scheme.class_name(c)) if scheme is not None else (lambda c: str(c))
        width = max([len(name(c)) for c in classes] + [5])
        lines = [f"{'class':<{width}}  " + "  ".join(f"{k + ' before':>15} {k + ' after':>14}" for k in self.maps)]
        for c in classes:
            cells = "  ".join(
                f"{self.class_counts_before[k].get(c, 0):>15d} {self.class_counts_after[k].get(c, 0):>14d}"
                for k in self.maps
            )
            lines.append(f"{name(c):<{width}}  {cells}")
        return "\n".join(lines)


def _job_noise(job: PatchJob) -> torch.Tensor:
    """The initial noise of one patch, (3, H, W) float32 from its own CPU generator."""
    gen = torch.Generator().manual_seed(job.seed)
    return torch.randn((3, *job.size), generator=gen)


def chunks(jobs: Sequence[PatchJob], batch_size: int) -> list[list[PatchJob]]:
    """Fixed batches of a rank's jobs: consecutive jobs of one size, at most batch_size each.

    Grid jobs share one size, so these are plain chunks; whole images of other sizes start a
    new batch. The composition depends on the plan only, never on what is already done.
    """
    out: list[list[PatchJob]] = []
    for job in jobs:
        if out and len(out[-1]) < batch_size and out[-1][0].size == job.size:
            out[-1].append(job)
        else:
            out.append([job])
    return out


def _sample_chunk(
    model: torch.nn.Module,
    diffusion: Any,
    chunk: Sequence[PatchJob],
    y0: torch.Tensor,
    cond: torch.Tensor,
    sampler: SamplerSettings,
) -> np.ndarray:
    """uint8 (B, H, W, 3) synthetic images of one chunk."""
    with torch.inference_mode():
        if sampler.eta == 0:
            noise = torch.stack([_job_noise(job) for job in chunk])
            return to_uint8(diffmix_sample(model, y0, cond, sampler, noise=noise, diffusion=diffusion))
        # eta > 0 draws fresh noise at every step from one generator per sampler call, so each
        # patch runs alone with its own generator: results stay independent of batching.
        outs = []
        for k, job in enumerate(chunk):
            gen = torch.Generator().manual_seed(job.seed)
            noise = torch.randn((1, 3, *job.size), generator=gen)
            x = diffmix_sample(model, y0[k : k + 1], cond[k : k + 1], sampler, noise=noise, generator=gen,
                               diffusion=diffusion)
            outs.append(to_uint8(x))
        return np.concatenate(outs)


def synthesize(
    dataset: Dataset | str | Path,
    ckpt: str | Path,
    out: str | Path,
    *,
    maps: MapsChoice = "both",
    patch: int | None = 256,
    stride: int = 76,
    sampler: SamplerSettings = DEFAULTS,
    batch_size: int = 8,
    seed: int = 0,
    device: str | torch.device | None = None,
    max_patches: int | None = None,
    progress: bool = True,
    balance_kwargs: Mapping[str, Any] | None = None,
    enlarge_kwargs: Mapping[str, Any] | None = None,
    scheme: str | ClassScheme | None = None,
    weights: Literal["auto", "ema", "model"] = "auto",
    generator_name: str = "diffmix synthesize",
) -> SynthReport:
    """Make a synthetic dataset folder at `out` from `dataset` and an SDM checkpoint.

    dataset: a `Dataset` or a dataset folder (read with `scheme`), full-size images with
        merged labels. ckpt: a `diffmix sdm train` checkpoint, or an authors' `.pt` converted by
        `diffmix sdm import`.
    maps: "balance" (spec 6a), "enlarge" (spec 6b), "both" (names then end in the kind) or
        "own" (each image's own labels: a re-synthesis, what `diffmix sdm sample` makes).
    patch, stride: the grid (spec 5: 256 at 76); patch must suit the U-Net's downsampling.
        patch=None takes whole images instead (one job per image, named after it, ids kept).
    sampler: solver, schedule, start and guidance (`diffmix.sdm.settings.SamplerSettings`;
        guidance_scale is the code's s, paper s + 1), run on the checkpoint's own schedule.
    batch_size: patches per sampler call. seed: drives the label maps and every patch's noise.
    device: None = CUDA when available (this rank's GPU under torchrun), else CPU.
    max_patches: per map kind, spread over the grid (None = the whole grid).
    balance_kwargs: the `BalanceParams` fields that are set (e.g. {"fraction": 0.8, "border": 30});
        minor_class defaults to the scheme's and seed to `seed`. A mapping, not the type: the
        run identity records exactly what was set. enlarge_kwargs: extra arguments of
        `enlarge_dataset`.
    weights: "auto" (EMA when the checkpoint has it, spec 3: sampling uses the EMA), "ema"
        or "model" (the raw weights; useful while a short run's EMA is still near its init).

    Re-running on the same folder resumes (finished patches are skipped); a folder made with
    other data, checkpoint or settings is refused (RunFolderError). batch_size, device and
    max_patches are not part of that identity (see this module's docstring for exactness).
    `generator_name` is the command recorded in dataset.json's provenance.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if not isinstance(sampler, SamplerSettings):
        raise ConfigError(f"sampler must be a SamplerSettings, got {type(sampler).__name__}")
    check_weights(weights)
    kinds = maps_list(maps)
    if not isinstance(dataset, Dataset):
        dataset = read_dataset(dataset, scheme)
    if not dataset.samples:
        raise DataError(f"{dataset.root or 'dataset'}: no images to synthesise from")
    out = Path(out)
    balance_kwargs = dict(balance_kwargs or {})
    enlarge_kwargs = dict(enlarge_kwargs or {})
    # the settings as manifests and the run identity record them (weights: which tensors)
    sampler_json = {**sampler.to_json(), "weights": weights}
    # Everything a mistake can break is checked before the run folder is made (design.md:
    # nothing half-written), so a corrected command never meets "a different run" there.
    check_output_folder(out)
    scheme_obj = dataset.scheme
    num_classes = scheme_obj.num_classes
    for kind, kwargs in (("balance", balance_kwargs), ("enlarge", enlarge_kwargs)):
        if kind in kinds:
            check_map_kwargs(kind, kwargs, scheme_obj)
    jobs = plan_jobs(dataset, maps, patch=patch, stride=stride, seed=seed, max_patches=max_patches)

    info = init_distributed(None if device is None else str(device))
    ckpt = Path(ckpt)
    ckpt_sha = file_sha256(ckpt)
    model, diffusion = load_sdm(ckpt, info.device, weights)
    _check_model(model, num_classes, patch, ckpt, dataset)
    sampling_schedule(diffusion, sampler)  # e.g. more passes than network steps to the start

    config = {
        "dataset_sha256": dataset_fingerprint(dataset),
        "scheme": scheme_obj.name,
        "checkpoint_sha256": ckpt_sha,
        "maps": kinds,
        "patch": None if patch is None else int(patch),
        "stride": None if patch is None else int(stride),
        "seed": int(seed),
        "sampler": sampler_json,
        "balance": balance_kwargs,
        "enlarge": enlarge_kwargs,
    }
    provenance = {
        "generator": generator_name,
        "source_dataset": str(dataset.root) if dataset.root is not None else None,
        "checkpoint": str(ckpt),
        "checkpoint_sha256": ckpt_sha,
        "manifest": MANIFEST,
        **{k: v for k, v in config.items() if k not in ("checkpoint_sha256",)},
    }
    if info.is_main:
        # also deletes the temporaries of a run killed mid-write; no process writes yet
        prepare_run_folder(out, config, kind="synthesize")
        # written first so a partial folder already reads as merged labels, never re-merged
        write_dataset_json(out, scheme_obj, provenance)
    barrier()
    if not info.is_main:
        prepare_run_folder(out, config, kind="synthesize", clean=False)

    label_args = (dataset, kinds, seed, balance_kwargs, enlarge_kwargs)
    labels: LabelMaps | None = None  # built on first need: a finished folder needs no maps

    my_jobs = jobs[info.rank :: info.world_size]
    records = known_records(out)
    done_before = sum(is_done(out, j.name, records) for j in my_jobs)
    log = JsonlLog(out / "log.jsonl")
    bar = tqdm(total=len(my_jobs), initial=done_before, unit="patch", desc="synthesize",
               disable=not (progress and info.is_main))
    written = 0
    t_start = time.perf_counter()
    for chunk in chunks(my_jobs, batch_size):
        missing = [j for j in chunk if not is_done(out, j.name, records)]
        if not missing:
            continue
        t0 = time.perf_counter()
        if labels is None:
            labels = LabelMaps(*label_args)
        originals = [labels.original(j) for j in chunk]
        customs = [labels.custom(j) for j in chunk]
        # contiguous NCHW: image_to_tensor's permuted view would reach the convs channels-last
        y0 = image_to_tensor(np.stack([o.image for o in originals])).contiguous().to(info.device)
        cond = condition_batch(
            np.stack([c[0] for c in customs]), np.stack([c[1] for c in customs]), num_classes
        ).to(info.device)
        images = _sample_chunk(model, diffusion, chunk, y0, cond, sampler)
        for k, job in enumerate(chunk):
            if job not in missing:
                continue
            inst, types, edit = customs[k]
            sample = NucleiSample(images[k], inst, types, job.name, num_classes)
            write_sample(out, sample)
            record = patch_record(
                job, sampler=sampler_json, checkpoint_sha256=ckpt_sha,
                counts_before=class_counts(originals[k].inst_map, originals[k].type_map, scheme_obj.class_ids),
                counts_after=class_counts(inst, types, scheme_obj.class_ids), edit=edit,
            )
            # written last: the patch counts as done only once its files are complete
            write_record(out, record)
            records[job.name] = record
            written += 1
        bar.update(len(missing))
        log.write({"rank": info.rank, "patches": len(missing), "batch": len(chunk),
                   "seconds": round(time.perf_counter() - t0, 4)})
    bar.close()
    seconds = time.perf_counter() - t_start

    totals = torch.tensor([written, done_before, seconds], dtype=torch.float64)
    if info.distributed:
        sums = totals[:2].to(info.device)  # nccl reduces GPU tensors only
        longest = totals[2:].to(info.device)
        dist.all_reduce(sums)
        dist.all_reduce(longest, op=dist.ReduceOp.MAX)
        totals = torch.cat([sums, longest]).cpu()
    n_written, n_skipped, seconds = int(totals[0]), int(totals[1]), float(totals[2])

    before = {k: {int(c): 0 for c in scheme_obj.class_ids} for k in kinds}
    after = {k: {int(c): 0 for c in scheme_obj.class_ids} for k in kinds}
    reports: dict[str, Any] = labels.reports if labels is not None else {}
    if info.is_main:
        if labels is None:
            previous = read_manifest(out)
            reports = dict((previous or {}).get("map_reports") or {})
            if any(k not in reports for k in kinds):  # e.g. other ranks did all the work
                reports = LabelMaps(*label_args).reports
        manifest = merge_manifest(out, jobs, config, provenance, reports)
        reports = manifest["map_reports"]
        planned = {j.name for j in jobs}
        for rec in manifest["patches"]:
            if rec["name"] in planned:
                add_counts(before[rec["map_kind"]], rec["class_counts_before"])
                add_counts(after[rec["map_kind"]], rec["class_counts"])
        write_dataset_json(out, scheme_obj, provenance)
        log.write({"event": "done", "patches": len(jobs), "written": n_written, "skipped": n_skipped,
                   "seconds": round(seconds, 3), "world_size": info.world_size})
    barrier()
    return SynthReport(
        out=out,
        maps=kinds,
        n_patches=len(jobs),
        n_written=n_written,
        n_skipped=n_skipped,
        seconds=seconds,
        patches_per_second=(n_written / seconds) if seconds > 0 and n_written else 0.0,
        class_counts_before=before,
        class_counts_after=after,
        dataset_class_counts=dataset.class_counts(),
        map_reports=reports,
        world_size=info.world_size,
    )


def _check_model(model: torch.nn.Module, num_classes: int, patch: int | None, ckpt: Path, dataset: Dataset) -> None:
    """The U-Net must take this scheme's K+2 label channels and the patches' (or, with
    patch=None, every whole image's) height and width."""
    cfg = _model_config(model)
    if cfg is None:
        return
    label_nc = getattr(cfg, "label_nc", None)
    if label_nc is not None and label_nc != num_classes + 2:
        raise CheckpointError(
            f"{ckpt}: the SDM takes {label_nc} label channels but the dataset's scheme has "
            f"{num_classes} classes ({num_classes + 2} channels); was it trained on another scheme?"
        )
    mult = getattr(cfg, "channel_mult", None)
    if not mult:
        return
    factor = 2 ** (len(mult) - 1)  # the U-Net halves H and W len(mult) - 1 times
    if patch is not None:
        if patch % factor:
            raise ConfigError(f"patch size {patch} is not divisible by {factor}, the SDM U-Net's total downsampling")
        return
    bad = [f"{s.name} ({s.shape[0]}x{s.shape[1]})" for s in dataset.samples if s.shape[0] % factor or s.shape[1] % factor]
    if bad:
        raise DataError(
            f"{dataset.root or 'dataset'}: {len(bad)} image(s) have a side not divisible by {factor}, the U-Net's "
            f"total downsampling of {ckpt}: {', '.join(bad[:5])}; crop or pad them to a multiple of {factor}"
        )


def _model_config(model: torch.nn.Module) -> Any:
    return getattr(model, "config", None)
