"""Synthesis: custom label maps + a trained SDM -> a synthetic dataset folder with a manifest.

The DiffMix data path of paper section 2.3 and spec 4-6, as one resumable, batched command:

1. label maps: balancing maps (spec 6a) are made on the full-size images, then cut on the
   patch grid; enlarging maps (spec 6b) are made per grid patch of the original labels; the
   "own" kind keeps each image's own labels (`diffmix sdm sample` is this path with "own" maps
   and whole images);
2. patches on the spec 5 grid (256 px at stride 76 by default; any size/stride works, and the
   SDM may have been trained on smaller crops, since the U-Net is fully convolutional), or
   whole images (`patch=None`, one job per image, named after it);
3. y0 = the ORIGINAL image patch at the same offset (spec 4: the noise start is the real
   patch, not the label-edited one);
4. the DiffMix sampler (`diffmix.sdm.sampler`: partial start, classifier-free guidance, the
   solver and schedule of a `SamplerSettings`) on the checkpoint's own diffusion schedule;
5. a dataset folder in the foundation format: `Images/NAME.png` (synthesised), `Labels/NAME.mat`
   (the custom maps, ids remapped 1..N per grid patch; whole images keep theirs), `dataset.json`,
   and `manifest.json` (per patch: source image, offset, map kind, seed, sampler settings,
   checkpoint sha256).

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

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch

from diffmix.data.io import Dataset, read_dataset, write_dataset_json, write_sample
from diffmix.data.patches import crop, grid_offsets, patch_name
from diffmix.data.sample import NucleiSample, compact_ids, remap_ids
from diffmix.data.schemes import ClassScheme
from diffmix.errors import CheckpointError, ConfigError, DataError
from diffmix.runs import JsonlLog, atomic_write_text, file_sha256, prepare_run_folder, write_json
from diffmix.sdm.convert import check_weights, load_sdm
from diffmix.sdm.data import image_to_tensor
from diffmix.sdm.settings import DEFAULTS, SamplerSettings

MapsChoice = Literal["balance", "enlarge", "both", "own"]
MAP_KINDS: tuple[str, ...] = ("balance", "enlarge")  # what "both" means
OWN = "own"  # each image's own labels: re-synthesis of the original (`diffmix sdm sample`)
MANIFEST = "manifest.json"
RECORDS_DIR = "manifest.d"  # per-patch records of an unfinished run, merged into MANIFEST
FORMAT = "diffmix-synth-manifest"
FORMAT_VERSION = 1

__all__ = [
    "MAP_KINDS",
    "OWN",
    "PatchJob",
    "SynthReport",
    "patch_seed",
    "dataset_fingerprint",
    "plan_jobs",
    "synthesize",
    "read_manifest",
]


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class PatchJob:
    """One synthetic patch to make: where its y0 and labels come from and its noise seed."""

    name: str
    source: str  # source image name
    image_index: int  # index of the source image in the dataset
    patch_index: int  # row-major grid index (spec 5: patch_idx = row * ncols + col)
    offset: tuple[int, int]  # top-left (y, x) in the source image
    kind: str  # "balance", "enlarge" or "own"
    seed: int  # seed of this patch's torch.Generator (initial noise, and eta > 0 step noise)
    size: tuple[int, int]  # (height, width): the grid's patch, or a whole image
    whole: bool = False  # a whole image (patch=None): nothing is cut, labels keep their ids


def patch_seed(seed: int, source: str, patch_index: int, kind: str) -> int:
    """A 63-bit seed from (run seed, source image name, patch index, map kind).

    Derived by SHA-256 of the four values, so it does not depend on the order in which
    patches are planned, batched or split over processes, and the image is identified by its
    name (stable when the dataset is subset), not by its position.
    """
    key = json.dumps([int(seed), str(source), int(patch_index), str(kind)]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1)


def _maps_list(maps: str) -> list[str]:
    if maps == "both":
        return list(MAP_KINDS)
    if maps in MAP_KINDS or maps == OWN:
        return [maps]
    raise ConfigError(f"--maps must be one of balance, enlarge, both, own; got {maps!r}")


def _job_name(source: str, index: int | None, kind: str, both: bool) -> str:
    # spec 4: `<image basename>_<patch_idx:03d>` (a whole image keeps its name); with both map
    # kinds in one folder the kind is appended so the B and E patch of one position do not collide.
    base = source if index is None else patch_name(source, index)
    return f"{base}_{kind}" if both else base


def _spread(n: int, k: int | None) -> list[int]:
    """k indices spread evenly over range(n) (all of them when k is None or >= n)."""
    if k is not None and k < 1:
        # 0 used to plan nothing and exit successfully having made nothing
        raise ConfigError(f"max_patches must be >= 1 (or unset for the whole grid), got {k}")
    if k is None or k >= n:
        return list(range(n))
    return [(i * n) // k for i in range(k)]


def plan_jobs(
    dataset: Dataset,
    maps: MapsChoice,
    *,
    patch: int | None = 256,
    stride: int = 76,
    seed: int = 0,
    max_patches: int | None = None,
) -> list[PatchJob]:
    """Every patch of a synthesis run, in a fixed order: map kind, image, grid index.

    `patch=None` makes one job per whole image (patch index 0, named after the image).
    `max_patches` keeps that many patches per map kind, spread evenly over the plan (so a
    small run still draws from every image), instead of the whole grid.
    """
    kinds = _maps_list(maps)
    jobs: list[PatchJob] = []
    for kind in kinds:
        per_kind: list[PatchJob] = []
        for i, sample in enumerate(dataset.samples):
            h, w = sample.shape
            cells = [(0, 0)] if patch is None else grid_offsets(h, w, patch, stride)
            for k, (y, x) in enumerate(cells):
                per_kind.append(
                    PatchJob(
                        name=_job_name(sample.name, None if patch is None else k, kind, len(kinds) > 1),
                        source=sample.name,
                        image_index=i,
                        patch_index=k,
                        offset=(y, x),
                        kind=kind,
                        seed=patch_seed(seed, sample.name, k, kind),
                        size=(h, w) if patch is None else (patch, patch),
                        whole=patch is None,
                    )
                )
        jobs.extend(per_kind[j] for j in _spread(len(per_kind), max_patches))
    if not jobs:
        sizes = sorted({s.shape for s in dataset.samples})
        raise DataError(
            f"{dataset.root or 'dataset'}: no {patch}-px grid patch fits in its images (sizes {sizes[:5]}); "
            "use a smaller patch size"
        )
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"synthetic patch names collide ({dupes[:5]}); rename the source images")
    return jobs


# --------------------------------------------------------------------------- label maps


def check_map_kwargs(kind: str, kwargs: Mapping[str, Any], scheme: ClassScheme) -> None:
    """ConfigError for extra arguments of a map kind that the map function would refuse.

    `kwargs` are passed on to `balance_dataset` (kind "balance") or `enlarge_patch` ("enlarge"),
    but only when the first patch needs its maps, after the run folder exists. Here the names
    are checked against the function's signature and the values by running it once on an
    empty 8x8 label map, which goes through the same validation as the real call.
    """
    import inspect

    from diffmix.maps.balance import balance_dataset
    from diffmix.maps.enlarge import enlarge_patch

    func, fixed = (balance_dataset, {"samples"}) if kind == "balance" else (enlarge_patch, {"inst_map", "type_map", "rng"})
    allowed = [n for n, p in inspect.signature(func).parameters.items() if n not in fixed and p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ConfigError(f"{kind} map arguments: unknown name(s) {unknown}; allowed: {allowed}")
    empty = np.zeros((8, 8), dtype=np.int32)
    try:
        if kind == "balance":
            sample = NucleiSample(np.zeros((8, 8, 3), dtype=np.uint8), empty, empty, "check", scheme.num_classes)
            balance_dataset([sample], **{"minor_class": scheme.minor_class, **dict(kwargs)})
        else:
            enlarge_patch(empty, empty, rng=np.random.default_rng(0), **dict(kwargs))
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ConfigError(f"{kind} map arguments {dict(kwargs)}: {exc}") from None


def _balance_maps(dataset: Dataset, seed: int, kwargs: Mapping[str, Any]) -> tuple[list[NucleiSample], dict]:
    """spec 6a: balancing maps over the whole dataset of full-size images."""
    from diffmix.maps.balance import balance_dataset

    kw = {"minor_class": dataset.scheme.minor_class, "seed": seed, **dict(kwargs)}
    samples, report = balance_dataset(dataset.samples, **kw)
    return samples, report.to_json() if hasattr(report, "to_json") else dict(report)


class _Labels:
    """The custom label patch of every job, cut lazily from the full-size maps."""

    def __init__(
        self,
        dataset: Dataset,
        kinds: Sequence[str],
        seed: int,
        balance_kwargs: Mapping[str, Any],
        enlarge_kwargs: Mapping[str, Any],
    ) -> None:
        self.dataset = dataset
        self.reports: dict[str, dict] = {}
        self.seed = seed
        self.enlarge_kwargs = dict(enlarge_kwargs)
        self.balanced: list[NucleiSample] | None = None
        if "balance" in kinds:
            self.balanced, self.reports["balance"] = _balance_maps(dataset, seed, balance_kwargs)
        if "enlarge" in kinds:
            self.reports["enlarge"] = {"params": {"seed": seed, **self.enlarge_kwargs}}

    def original(self, job: PatchJob) -> NucleiSample:
        src = self.dataset.samples[job.image_index]
        if job.whole:
            return NucleiSample(src.image, src.inst_map, src.type_map, job.name, src.num_classes)
        y, x = job.offset
        return crop(src, y, x, job.size[0], job.name)

    def custom(self, job: PatchJob) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
        """(inst_map, type_map) int32 of the job's conditioning map, ids remapped 1..N (a
        whole image keeps its ids), and a few numbers about the edit for the manifest."""
        y, x = job.offset
        sl = (slice(y, y + job.size[0]), slice(x, x + job.size[1]))
        info: dict[str, int] = {}
        if job.kind == "balance":
            assert self.balanced is not None
            full = self.balanced[job.image_index]
            inst, types = full.inst_map[sl], full.type_map[sl]
        elif job.kind == OWN:
            src = self.dataset.samples[job.image_index]
            inst, types = src.inst_map[sl], src.type_map[sl]
        else:
            # spec 6b per grid patch of the original labels. The stream is the one
            # `enlarge_dataset` documents, default_rng([seed, image index, patch index]), made
            # here patch by patch so the whole grid's maps are never held at once.
            from diffmix.maps.enlarge import enlarge_patch

            src = self.dataset.samples[job.image_index]
            rng = np.random.default_rng([self.seed, job.image_index, job.patch_index])
            inst, types, edit = enlarge_patch(src.inst_map[sl], src.type_map[sl], rng=rng, **self.enlarge_kwargs)
            shifts = edit.get("shifts", {})
            info = {
                "frozen": len(edit.get("frozen", [])),
                "movable": len(shifts),
                "moved": sum(1 for d in shifts.values() if tuple(d) != (0, 0)),
                "kept_in_place": len(edit.get("kept_in_place", [])),
            }
        if inst.shape != job.size:
            raise DataError(f"{job.name}: {job.kind} label map has shape {inst.shape}, expected {job.size}")
        types = np.ascontiguousarray(types, dtype=np.int32)
        if job.whole:  # nothing was cut: the labels are the image's, ids and all
            return np.ascontiguousarray(inst, dtype=np.int32), types, info
        # spec 4: the saved labels are the conditioning maps with ids remapped per patch
        return remap_ids(inst), types, info


def _class_counts(inst_map: np.ndarray, type_map: np.ndarray, class_ids: Sequence[int]) -> dict[int, int]:
    """Nuclei per class of one label map (every class listed), over the instances present."""
    counts = {int(c): 0 for c in class_ids}
    ids, dense = compact_ids(inst_map)
    if not ids.size:
        return counts
    classes = np.zeros(ids.size + 1, dtype=np.int64)
    classes[dense.ravel()] = type_map.ravel()
    for cls, n in zip(*np.unique(classes[1:], return_counts=True)):
        counts[int(cls)] = counts.get(int(cls), 0) + int(n)
    return counts


def _add(total: dict[int, int], counts: Mapping[Any, int]) -> None:
    for k, v in counts.items():
        total[int(k)] = total.get(int(k), 0) + int(v)


# --------------------------------------------------------------------------- model


def dataset_fingerprint(dataset: Dataset) -> str:
    """Hex SHA-256 over every sample's name, image and label arrays (in dataset order).

    Identifies the source data in the run config, so a folder started from other images is
    never resumed with these (paths can move; contents are what matters).
    """
    h = hashlib.sha256()
    for s in dataset.samples:
        h.update(s.name.encode() + b"\0" + repr(s.shape).encode())
        for arr in (s.image, s.inst_map, s.type_map):
            h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _model_config(model: torch.nn.Module) -> Any:
    return getattr(model, "config", None)


# --------------------------------------------------------------------------- report


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


# --------------------------------------------------------------------------- run folder


def _record_path(out: Path, name: str) -> Path:
    return out / RECORDS_DIR / f"{name}.json"


def read_manifest(out: str | Path) -> dict[str, Any] | None:
    """The `manifest.json` of a synthetic dataset folder, or None when there is none yet."""
    path = Path(out) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path}: not a diffmix synthesis manifest")
    return manifest


def source_images(dataset: Dataset) -> dict[str, str]:
    """The training image each patch of a derived dataset was cut from, by patch name.

    Synthetic sets record it in their manifest; grid patches without one (GradMix folders)
    are named `<image>_<index>`, so the name without its last `_` part is the image.
    """
    records = {}
    if dataset.root is not None:
        manifest = read_manifest(dataset.root)
        if manifest is not None:
            records = {rec["name"]: rec["source_image"] for rec in manifest.get("patches", [])}
    return {name: records.get(name, name.rsplit("_", 1)[0]) for name in dataset.names}


def _known_records(out: Path) -> dict[str, dict[str, Any]]:
    """Every finished patch's record: the merged manifest plus records not merged yet."""
    records: dict[str, dict[str, Any]] = {}
    manifest = read_manifest(out)
    if manifest is not None:
        for rec in manifest.get("patches", []):
            records[rec["name"]] = rec
    folder = out / RECORDS_DIR
    if folder.is_dir():
        for p in sorted(folder.glob("*.json")):
            try:
                rec = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                continue  # cannot happen with atomic writes; redo the patch if it does
            records[rec["name"]] = rec
    return records


def _is_done(out: Path, name: str, records: Mapping[str, Any]) -> bool:
    return (
        name in records
        and (out / "Images" / f"{name}.png").is_file()
        and (out / "Labels" / f"{name}.mat").is_file()
    )


def _job_noise(job: PatchJob) -> torch.Tensor:
    """The initial noise of one patch, (3, H, W) float32 from its own CPU generator."""
    gen = torch.Generator().manual_seed(job.seed)
    return torch.randn((3, *job.size), generator=gen)


def _chunks(jobs: Sequence[PatchJob], batch_size: int) -> list[list[PatchJob]]:
    """Fixed batches of a rank's jobs: consecutive jobs of one size, at most batch_size each.

    Grid jobs share one size, so these are plain chunks; whole images of other sizes start a
    new batch. The composition depends on the plan only, never on what is already done.
    """
    chunks: list[list[PatchJob]] = []
    for job in jobs:
        if chunks and len(chunks[-1]) < batch_size and chunks[-1][0].size == job.size:
            chunks[-1].append(job)
        else:
            chunks.append([job])
    return chunks


def _sample_chunk(
    model: torch.nn.Module,
    diffusion: Any,
    chunk: Sequence[PatchJob],
    y0: torch.Tensor,
    cond: torch.Tensor,
    sampler: SamplerSettings,
) -> np.ndarray:
    """uint8 (B, H, W, 3) synthetic images of one chunk."""
    from diffmix.sdm.sampler import diffmix_sample, to_uint8

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
    balance_kwargs / enlarge_kwargs: extra arguments of `balance_dataset` / `enlarge_dataset`
        (e.g. {"fraction": 0.8, "border": 30}); minor_class defaults to the scheme's.
    weights: "auto" (EMA when the checkpoint has it, spec 3: sampling uses the EMA), "ema"
        or "model" (the raw weights; useful while a short run's EMA is still near its init).

    Re-running on the same folder resumes (finished patches are skipped); a folder made with
    other data, checkpoint or settings is refused (RunFolderError). batch_size, device and
    max_patches are not part of that identity (see the module docstring for exactness).
    `generator_name` is the command recorded in dataset.json's provenance.
    """
    from diffmix.distributed import barrier, init_distributed
    from diffmix.maps.conditioning import condition_batch

    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if not isinstance(sampler, SamplerSettings):
        raise ConfigError(f"sampler must be a SamplerSettings, got {type(sampler).__name__}")
    check_weights(weights)
    kinds = _maps_list(maps)
    if not isinstance(dataset, Dataset):
        dataset = read_dataset(dataset, scheme)
    if not dataset.samples:
        raise DataError(f"{dataset.root or 'dataset'}: no images to synthesise from")
    out = Path(out)
    balance_kwargs = dict(balance_kwargs or {})
    enlarge_kwargs = dict(enlarge_kwargs or {})
    # the settings as manifests and the run identity record them (weights: which tensors)
    sampler_json = {**sampler.to_json(), "weights": weights}
    from diffmix.runs import check_output_folder

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
    from diffmix.sdm.solvers import sampling_schedule

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
    labels: _Labels | None = None  # built on first need: a finished folder needs no maps

    my_jobs = jobs[info.rank :: info.world_size]
    chunks = _chunks(my_jobs, batch_size)
    records = _known_records(out)
    done_before = sum(_is_done(out, j.name, records) for j in my_jobs)
    log = JsonlLog(out / "log.jsonl")
    from tqdm.auto import tqdm

    bar = tqdm(total=len(my_jobs), initial=done_before, unit="patch", desc="synthesize",
               disable=not (progress and info.is_main))
    written = 0
    t_start = time.perf_counter()
    for chunk in chunks:
        missing = [j for j in chunk if not _is_done(out, j.name, records)]
        if not missing:
            continue
        t0 = time.perf_counter()
        if labels is None:
            labels = _Labels(*label_args)
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
            record = {
                "name": job.name,
                "image": f"Images/{job.name}.png",
                "labels": f"Labels/{job.name}.mat",
                "source_image": job.source,
                "source_index": job.image_index,
                "patch_index": job.patch_index,
                "offset": list(job.offset),
                "size": list(job.size) if job.whole else job.size[0],
                "map_kind": job.kind,
                "seed": job.seed,
                "sampler": sampler_json,
                "checkpoint_sha256": ckpt_sha,
                "class_counts_before": _str_keys(_class_counts(originals[k].inst_map, originals[k].type_map, scheme_obj.class_ids)),
                "class_counts": _str_keys(_class_counts(inst, types, scheme_obj.class_ids)),
                "edit": edit,
            }
            # written last: the patch counts as done only once its files are complete
            atomic_write_text(_record_path(out, job.name), json.dumps(record, indent=1) + "\n")
            records[job.name] = record
            written += 1
        bar.update(len(missing))
        log.write({"rank": info.rank, "patches": len(missing), "batch": len(chunk),
                   "seconds": round(time.perf_counter() - t0, 4)})
    bar.close()
    seconds = time.perf_counter() - t_start

    totals = torch.tensor([written, done_before, seconds], dtype=torch.float64)
    if info.distributed:
        import torch.distributed as dist

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
                reports = _Labels(*label_args).reports
        manifest = _merge_manifest(out, jobs, config, provenance, reports)
        reports = manifest["map_reports"]
        planned = {j.name for j in jobs}
        for rec in manifest["patches"]:
            if rec["name"] in planned:
                _add(before[rec["map_kind"]], rec["class_counts_before"])
                _add(after[rec["map_kind"]], rec["class_counts"])
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


def _str_keys(counts: Mapping[int, int]) -> dict[str, int]:
    return {str(k): int(v) for k, v in counts.items()}


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


def _order_key(jobs: Sequence[PatchJob]) -> Any:
    position = {j.name: i for i, j in enumerate(jobs)}

    def key(rec: Mapping[str, Any]) -> tuple:
        kind = rec.get("map_kind", "")
        kinds = (*MAP_KINDS, OWN)
        kind_rank = kinds.index(kind) if kind in kinds else len(kinds)
        return (0, position[rec["name"]], "") if rec["name"] in position else (
            1, kind_rank, str(rec.get("source_image")), int(rec.get("patch_index", 0)), rec["name"])

    return key


def _merge_manifest(
    out: Path,
    jobs: Sequence[PatchJob],
    config: Mapping[str, Any],
    provenance: Mapping[str, Any],
    map_reports: Mapping[str, Any],
) -> dict[str, Any]:
    """Merge every per-patch record into `manifest.json` (atomic), then drop the merged records.

    Every planned patch must have a record by now (all ranks passed the barrier); patches of
    earlier runs with another `max_patches` stay listed, since their files are in the folder.
    """
    records = _known_records(out)
    missing = [j.name for j in jobs if not _is_done(out, j.name, records)]
    if missing:
        raise DataError(f"{out}: {len(missing)} planned patches were not written (e.g. {missing[:5]})")
    patches = sorted(records.values(), key=_order_key(jobs))
    totals_before: dict[str, dict[int, int]] = {}
    totals_after: dict[str, dict[int, int]] = {}
    edits: dict[str, dict[str, int]] = {}
    for rec in patches:
        _add(totals_before.setdefault(rec["map_kind"], {}), rec["class_counts_before"])
        _add(totals_after.setdefault(rec["map_kind"], {}), rec["class_counts"])
        for key, n in (rec.get("edit") or {}).items():
            kind_edits = edits.setdefault(rec["map_kind"], {})
            kind_edits[key] = kind_edits.get(key, 0) + int(n)
    map_reports = {k: dict(v) for k, v in map_reports.items()}
    for kind, totals in edits.items():  # e.g. enlarge: nuclei frozen / movable / moved
        map_reports.setdefault(kind, {})["totals"] = totals
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": dict(config),
        "provenance": dict(provenance),
        "n_patches": len(patches),
        "class_counts_before": {k: _str_keys(v) for k, v in totals_before.items()},
        "class_counts_after": {k: _str_keys(v) for k, v in totals_after.items()},
        "map_reports": dict(map_reports),
        "patches": patches,
    }
    write_json(out / MANIFEST, manifest)
    folder = out / RECORDS_DIR
    if folder.is_dir():
        for p in folder.iterdir():
            p.unlink(missing_ok=True)
        folder.rmdir()
    return manifest
