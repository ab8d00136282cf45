"""The five-arm DiffMix experiment (paper Table 1): one config, every stage cached in one folder.

Stages, each skipped when its output is already in OUT (so a re-run does only what is missing):
  data      the training and fixed test sets (a user's folders, or the toy dataset)
  sdm       one SDM trained on all training images (resumes inside its run folder)
  synth     balancing and enlarging maps re-synthesised by the SDM; GradMix images
  seg       per arm and fold, a downstream segmenter on original (+ synthetic) patches
  eval      per arm and fold, inference on the test set and the official metrics
  fidelity  a baseline segmenter scored against the maps each synthetic set was made for
  utility   (optional) a nucleus classifier trained with/without each synthetic set's nuclei
  report    Table 1 (mean ± std over runs = folds x seeds), paired 95% intervals, figures, results.json
Arms (spec 8): baseline = original patches; GradMix = + GradMix patches; DiffMix-B / -E =
+ balancing / enlarging patches; DiffMix = + both. Synthetic set sizes are fractions of the fold's
N original patches and the epochs per arm keep total iterations equal (100 / 75 / 50 by default).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from diffmix.checkpoints import checkpoint_meta, latest_checkpoint
from diffmix.config import build_config, dump_config
from diffmix.data.io import Dataset, read_dataset, write_dataset
from diffmix.data.patches import grid_patches
from diffmix.data.sample import NucleiSample
from diffmix.data.schemes import CONSEP, ClassScheme
from diffmix.data.toy import generate_toy_samples
from diffmix.distributed import resolve_device
from diffmix.errors import ConfigError, DataError
from diffmix.fidelity import label_fidelity
from diffmix.maps.gradmix import gradmix_dataset
from diffmix.maps.params import BalanceParams
from diffmix.metrics.evaluate import evaluate_labels, field_metrics, labels_from_maps
from diffmix.pipeline.figures import make_figures, sample_rows
from diffmix.pipeline.intervals import headline_intervals
from diffmix.pipeline.report import fold_row, summarise, write_report
from diffmix.runs import JsonlLog, prepare_run_folder, write_json
from diffmix.sdm.settings import DEFAULTS as SAMPLER
from diffmix.sdm.settings import SamplerSettings, fraction_text, sampler_settings
from diffmix.sdm.train import resolve_train_config, train_sdm
from diffmix.seeds import fold_rng, held_out_rng, segmenter_seed, utility_seed
from diffmix.seg.data import Source
from diffmix.seg.infer import segment_image
from diffmix.seg.models import load_segmenter
from diffmix.seg.train import FINAL_NAME, SegTrainConfig, mix_type_prior, resolve_config, train_segmenter
from diffmix.synth.jobs import plan_jobs
from diffmix.synth.labels import check_map_kwargs
from diffmix.synth.manifest import source_images
from diffmix.synth.run import synthesize
from diffmix.utility import UtilitySettings, utility_study

#: What the toy demo can and cannot show (issue 10 item 5), printed and in its report.
TOY_CAVEAT = (
    "The toy demo checks that the whole pipeline runs end to end on procedural tiles; with a few "
    "dozen rare-class test nuclei and a tiny CPU budget it cannot show whether DiffMix helps the "
    "rare class. The measured effect on real tissue (CoNSeP) is in docs/results.md."
)

Arm = Literal["baseline", "gradmix", "diffmix_b", "diffmix_e", "diffmix"]
ARMS: tuple[str, ...] = ("baseline", "gradmix", "diffmix_b", "diffmix_e", "diffmix")
# Which synthetic sets each arm adds, and how the arm's synthetic budget is shared among them.
ARM_SETS: dict[str, tuple[str, ...]] = {
    "baseline": (),
    "gradmix": ("gradmix",),
    "diffmix_b": ("balance",),
    "diffmix_e": ("enlarge",),
    "diffmix": ("balance", "enlarge"),
}


class ToySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_train: int = Field(default=12, ge=2)
    n_test: int = Field(default=4, ge=1)
    size: int = Field(default=128, ge=64)
    seed: int = 0
    rare_fraction: float = Field(default=0.035, ge=0.0, le=0.5)


class DataSpec(BaseModel):
    """Either `toy`, or a `train` folder with a `test` folder (or `test_fraction` of train held out)."""

    model_config = ConfigDict(extra="forbid")
    train: str | None = None
    test: str | None = None
    test_fraction: float = Field(default=0.25, gt=0.0, lt=1.0)
    scheme: str | None = None
    toy: ToySpec | None = None

    @model_validator(mode="after")
    def _check(self) -> "DataSpec":
        if (self.toy is None) == (self.train is None):
            raise ValueError("give exactly one of data.toy and data.train")
        return self


class SDMStage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    preset: str = "paper-consep"
    overrides: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str | None = None  # an existing SDM (imported or trained): skip SDM training


class SynthStage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    patch: int = Field(default=256, ge=8)
    stride: int = Field(default=76, ge=1)
    # the sampler (defaults: diffmix.sdm.settings.DEFAULTS: spec 4's start and guidance, UniPC
    # with its default passes; `solver: ddim` alone is the official 55-step run)
    steps: int = Field(default=SAMPLER.steps, ge=1)
    start_fraction: str = fraction_text(SAMPLER.start_fraction)
    guidance_scale: float = SAMPLER.guidance_scale
    eta: float = Field(default=SAMPLER.eta, ge=0.0)
    solver: str = SAMPLER.solver
    passes: int | None = Field(default=None, ge=1)
    spacing: str | None = None  # grid of the passes: time, logsnr (None: the solver's own)
    batch_size: int = Field(default=8, ge=1)
    # Patches per map kind, spread evenly over the grid of every image (None = the whole grid):
    # what a CPU run can afford; each fold still draws from its own training images.
    max_patches: int | None = Field(default=None, ge=1)
    # The BalanceParams fields that are set, for DiffMix-B's maps and GradMix alike (validated
    # into BalanceParams, kept as written: config.yaml, the run identity, records exactly them).
    balance: dict[str, Any] = Field(default_factory=dict)
    enlarge: dict[str, Any] = Field(default_factory=dict)  # extra enlarge_dataset arguments

    @model_validator(mode="after")
    def _sampler_settings(self) -> "SynthStage":
        try:
            self.sampler()  # a bad combination is refused when the config loads, with its place
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    @field_validator("balance")
    @classmethod
    def _balance_params(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            BalanceParams.from_json(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None  # pydantic adds where: synthesis.balance
        return value

    def sampler(self) -> SamplerSettings:
        """These settings as the sampler takes them (ConfigError for a bad combination)."""
        return sampler_settings(self.solver, self.passes, steps=self.steps, start_fraction=self.start_fraction,
                                guidance_scale=self.guidance_scale, eta=self.eta, spacing=self.spacing)

    def balance_params(self, minor_class: int, seed: int) -> BalanceParams:
        """`balance` as BalanceParams, an unset minor class and seed taken from the scheme and run."""
        return BalanceParams.from_json(self.balance).resolved(minor_class, seed)

    @model_serializer(mode="wrap")
    def _drop_default_solver(self, handler: Any) -> dict[str, Any]:
        # config.yaml (the run identity) leaves out `solver: ddim` and unset passes/spacing, so
        # experiment folders made before solvers existed (all DDIM, every step) still resume.
        # Another solver's budget is written out resolved: `solver: unipc` meant every step
        # before it had a default budget, so such a folder must not resume as a 5-pass run.
        data = handler(self)
        if data.get("solver") == "ddim":
            data.pop("solver")
        elif data.get("passes") is None:
            data["passes"] = self.sampler().passes
        for name in ("passes", "spacing"):
            if data.get(name) is None:
                data.pop(name, None)
        return data


#: The downstream networks an experiment can train (spec 8, Table 1: HoVer-Net and SONNET).
#: "hovernet" is the HoVer-Net family (HoVer-Net fast / original, or the small HoVer-style
#: CPU net): HV maps and hover_net's post-processing; "sonnet" is SONNET (ordinal maps).
NETWORKS: tuple[str, ...] = ("hovernet", "sonnet")
NETWORK_LABELS: dict[str, str] = {"hovernet": "HoVer-Net", "sonnet": "SONNET"}
#: Segmenter preset of a network that `seg.networks` does not configure.
DEFAULT_NETWORK_PRESETS: dict[str, str] = {"hovernet": "hovernet-fast", "sonnet": "sonnet"}


class NetworkStage(BaseModel):
    """One more downstream network's segmenter (`seg.networks.<name>`): a seg preset with
    overrides, like HoVer-Net's `seg.preset` / `seg.overrides`."""

    model_config = ConfigDict(extra="forbid")
    preset: str
    overrides: dict[str, Any] = Field(default_factory=dict)
    # Total epochs per arm for this network (None = the experiment's `epochs`): a CPU demo can
    # give a slow network a fixed `samples_per_epoch` and the same epochs for every arm (equal
    # optimiser steps per arm, as consep-cpu does), fewer than the other network's.
    epochs: dict[str, int] | None = None
    # Output pixels shared by neighbouring inference tiles (even); None = the network's own
    # (SONNET: keep the centre 40 of each 76-px output, as the official inference; 0 keeps all 76).
    infer_overlap: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _even_overlap(self) -> "NetworkStage":
        if self.infer_overlap is not None and self.infer_overlap % 2:
            raise ValueError(f"infer_overlap must be even (each tile keeps its centre), got {self.infer_overlap}")
        return self


class SegStage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    preset: str = "hovernet-fast"  # the "hovernet" network's segmenter
    overrides: dict[str, Any] = Field(default_factory=dict)
    patch: int = Field(default=256, ge=8)  # original training patches (HoVer-Net extract_patches)
    stride: int = Field(default=164, ge=1)
    infer_batch_size: int = Field(default=4, ge=1)
    # hover_net drops blobs whose marker does not survive the 5x5 opening (nuclei thinner than
    # ~5 px); True keeps each as its own instance (diffmix.seg.postproc). Official: False.
    keep_unmarked: bool = False
    # Post-hoc logit adjustment of the type probabilities at evaluation (tau; 0 = off, the
    # official vote): each run's prior is its own training mix's (diffmix.seg.postproc.prior_adjusted).
    logit_adjust: float = Field(default=0.0, ge=0)
    # Segmenters of the other downstream networks, by name (`NETWORKS`); a network listed in
    # `downstream` without an entry here uses DEFAULT_NETWORK_PRESETS. Every network trains on
    # the same original patches (`patch`, `stride`) and synthetic sets: SONNET pads each patch
    # with mirrored context itself (diffmix.seg.data), as it does the synthetic patches.
    networks: dict[str, NetworkStage] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_networks(self) -> "SegStage":
        for name in self.networks:
            if name == "hovernet":
                raise ValueError("HoVer-Net's segmenter is seg.preset / seg.overrides, not seg.networks.hovernet")
            if name not in NETWORKS:
                raise ValueError(f"unknown network {name!r} in seg.networks; known: {', '.join(NETWORKS)}")
        return self

    @model_serializer(mode="wrap")
    def _drop_empty_networks(self, handler: Any) -> dict[str, Any]:
        # Run identity (config.yaml): a HoVer-Net-only experiment dumps what it did before
        # `networks` existed, so its run folders still resume.
        data = handler(self)
        if not data.get("networks"):
            data.pop("networks", None)
        if not data.get("logit_adjust"):
            data.pop("logit_adjust", None)
        return data


class UtilityStage(BaseModel):
    """The utility classifier (diffmix.utility) trained on the training images' nuclei with and
    without each synthetic set, scored on the test nuclei; defaults are `diffmix utility`'s."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(default=800, ge=1)
    width: int = Field(default=12, ge=1)
    crop: int = Field(default=32, ge=8)
    seeds: int = Field(default=3, ge=1)
    balanced_control: bool = True


class ExperimentConfig(BaseModel):
    """The whole experiment; stored in OUT/config.yaml, so a different config is a different run."""

    model_config = ConfigDict(extra="forbid")
    name: str = "experiment"
    seed: int = 0
    data: DataSpec
    folds: int = Field(default=5, ge=1)
    # Segmenter runs per (arm, fold) with different training seeds (init, data order,
    # augmentation); the SDM and the synthetic sets are drawn once. Tables average over all
    # runs; intervals resample runs and test images (docs/study.md).
    seeds: int = Field(default=1, ge=1)
    arms: list[Arm] = Field(default_factory=lambda: list(ARMS))
    sdm: SDMStage = Field(default_factory=SDMStage)
    synthesis: SynthStage = Field(default_factory=SynthStage)
    # spec 8: "the same numbers of synthesized patches"; totals 2N (GradMix, DiffMix), ~1.33N (B, E).
    synthetic_fraction: dict[str, float] = Field(
        default_factory=lambda: {"gradmix": 1.0, "diffmix_b": 1 / 3, "diffmix_e": 1 / 3, "diffmix": 1.0}
    )
    # spec 8: equal total iterations: baseline 100 epochs, B/E 75, GradMix and DiffMix 50.
    epochs: dict[str, int] = Field(
        default_factory=lambda: {"baseline": 100, "diffmix_b": 75, "diffmix_e": 75, "gradmix": 50, "diffmix": 50}
    )
    seg: SegStage = Field(default_factory=SegStage)
    # The downstream networks trained for every arm, fold and seed (Table 1 has one block per
    # network); the first one also scores label fidelity.
    downstream: list[str] = Field(default_factory=lambda: ["hovernet"], min_length=1)
    # The other datasets' headline numbers, computed per run and shown beside Table 1:
    # "pannuke" (PanNuke mPQ, bPQ), "conic" (CoNIC / Lizard mPQ+); diffmix.metrics.panoptic.
    # None = by the class scheme (`extra_metrics_for`); [] = none.
    extra_metrics: list[Literal["pannuke", "conic"]] | None = None
    fidelity: bool = True
    utility: UtilityStage | None = None
    sample_rows: int = Field(default=3, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "ExperimentConfig":
        missing = [a for a in self.arms if a not in self.epochs]
        if missing:
            raise ValueError(f"epochs has no entry for arms {missing}")
        missing = [a for a in self.arms if a != "baseline" and a not in self.synthetic_fraction]
        if missing:
            raise ValueError(f"synthetic_fraction has no entry for arms {missing}")
        if len(set(self.arms)) != len(self.arms):
            raise ValueError("arms are listed twice")
        unknown = [n for n in self.downstream if n not in NETWORKS]
        if unknown:
            raise ValueError(f"unknown downstream network(s) {unknown}; known: {', '.join(NETWORKS)}")
        if len(set(self.downstream)) != len(self.downstream):
            raise ValueError("downstream lists a network twice")
        for name, net in self.seg.networks.items():
            missing = [a for a in self.arms if net.epochs is not None and a not in net.epochs]
            if missing:
                raise ValueError(f"seg.networks.{name}.epochs has no entry for arms {missing}")
        if self.extra_metrics is not None and len(set(self.extra_metrics)) != len(self.extra_metrics):
            raise ValueError("extra_metrics lists a metric twice")
        return self

    def extra_metrics_for(self, scheme: ClassScheme) -> list[str]:
        """The extra metrics of an experiment on `scheme`: `extra_metrics` when given, else
        PanNuke's mPQ/bPQ for the pannuke scheme and CoNIC's mPQ+ for a scheme whose name says
        Lizard or CoNIC (a YAML scheme named e.g. `lizard`), nothing for CoNSeP and GLySAC."""
        if self.extra_metrics is not None:
            return list(self.extra_metrics)
        name = scheme.name.lower()
        if name == "pannuke":
            return ["pannuke"]
        if "lizard" in name or "conic" in name:
            return ["conic"]
        return []

    @model_serializer(mode="wrap")
    def _drop_default_downstream(self, handler: Any) -> dict[str, Any]:
        # HoVer-Net alone is what every experiment ran before `downstream` existed: leaving the
        # defaults out of config.yaml keeps those run folders resumable (same identity).
        data = handler(self)
        if data.get("downstream") == ["hovernet"]:
            data.pop("downstream")
        if data.get("extra_metrics") is None:  # the scheme's default, as before the option
            data.pop("extra_metrics", None)
        return data

    def network(self, name: str) -> NetworkStage:
        """The segmenter settings of downstream network `name` (HoVer-Net's are seg.preset /
        seg.overrides; others come from seg.networks or DEFAULT_NETWORK_PRESETS)."""
        if name == "hovernet":
            return NetworkStage(preset=self.seg.preset, overrides=self.seg.overrides)
        if name in self.seg.networks:
            return self.seg.networks[name]
        return NetworkStage(preset=DEFAULT_NETWORK_PRESETS[name])

    def network_epochs(self, name: str) -> dict[str, int]:
        """Total epochs per arm of network `name`."""
        own = self.network(name).epochs
        return dict(own) if own is not None else dict(self.epochs)


def load_experiment_config(path_or_preset: str | Path, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """A YAML file or a shipped preset name (`demo`, `paper-consep`, `paper-glysac`)."""
    return build_config(ExperimentConfig, "experiment", path_or_preset, overrides)


# --------------------------------------------------------------------------- small helpers


def fold_splits(names: Sequence[str], folds: int, seed: int) -> list[list[str]]:
    """Training image names of each fold: k-fold over the (seeded, shuffled) training images,
    fold f trains on every image outside its f-th part. One fold trains on all images."""
    names = sorted(names)
    if folds == 1:
        return [list(names)]
    if folds > len(names):
        raise ConfigError(f"{folds} folds need at least {folds} training images, have {len(names)}")
    order = fold_rng(seed).permutation(len(names))
    parts = np.array_split(order, folds)
    return [sorted(names[i] for j, p in enumerate(parts) if j != f for i in p) for f in range(folds)]


def validation_split(
    real: Dataset, synthetic: Mapping[str, Dataset], folds: int, fold: int, seed: int = 0
) -> tuple[Dataset, Dataset, dict[str, Dataset]]:
    """(training part, validation part, synthetic sets cut from the training part only) of
    fold `fold` of `fold_splits(real, folds, seed)`. Synthetic patches re-synthesised from a
    validation image are dropped, so no validation image is seen through its re-synthesis
    (docs/study.md: choices are made on these folds, never on the test set)."""
    if not 0 <= fold < folds:
        raise ConfigError(f"fold must be in 0..{folds - 1}, got {fold}")
    keep = set(fold_splits(real.names, folds, seed)[fold])
    train = _subset(real, [s for s in real if s.name in keep], f"fold {fold} training part")
    val = _subset(real, [s for s in real if s.name not in keep], f"fold {fold} validation part")
    restricted = {}
    for label, ds in synthetic.items():
        src = source_images(ds)
        restricted[label] = _subset(ds, [s for s in ds if src[s.name] in keep], f"{label}, fold {fold} training part")
        if not len(restricted[label]):
            raise DataError(f"{ds.root}: no patch comes from the training images of fold {fold}")
    return train, val, restricted


def arm_epochs(total: int) -> dict[str, int]:
    """Split an arm's epochs over HoVer-Net's two phases (half frozen encoder, half all)."""
    return {"phase1_epochs": total // 2, "phase2_epochs": total - total // 2}


def split_epochs(total: int, proportions: Sequence[int]) -> list[int]:
    """`total` epochs over phases in proportion to `proportions` (a preset's own phase epochs):
    floors first, then one more epoch to the largest remainders (ties to the earlier phase).
    SONNET's 50/25/25 gives 100 -> 50/25/25, 75 -> 37/19/19, 50 -> 25/13/12."""
    weights = [max(0, int(p)) for p in proportions]
    if total < 0:
        raise ConfigError(f"epochs must be >= 0, got {total}")
    if not weights or sum(weights) == 0:
        raise ConfigError("the preset's phases have no epochs to take proportions from")
    exact = [total * w / sum(weights) for w in weights]
    out = [int(math.floor(x)) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out


#: Overrides that describe a schedule in the two-phase shorthand (`seg.train.resolve_config`).
_SCHEDULE_KEYS = ("phase1_epochs", "phase2_epochs", "phase3_epochs", "batch_size", "batch_size_phase2")


def arm_seg_config(preset: str, overrides: Mapping[str, Any], total: int, seed: int) -> SegTrainConfig:
    """The segmenter config of one arm: `preset` + `overrides`, its schedule stretched to
    `total` epochs, seeded with `seed`.

    A two-phase (HoVer-Net) preset gets `arm_epochs` (half / half, as before phases existed,
    so HoVer-Net run identities are unchanged). A preset with an explicit `phases` list
    (SONNET) keeps its phases and their proportions (`split_epochs`), each phase's lr step
    scaled with it (SONNET's "1e-5 after epoch 25 of 50" stays at half the phase, as
    HoVer-Net's `lr_step_fraction` does).
    """
    first = {**overrides, "seed": seed}
    base = resolve_config(preset, first, drop_none=False)
    if base.phases is None:
        return resolve_config(preset, {**first, **arm_epochs(total)}, drop_none=False)
    old = [p.epochs for p in base.phases]
    phases = []
    for spec, epochs in zip(base.phases, split_epochs(total, old)):
        row = spec.model_dump()
        row["epochs"] = epochs
        if spec.lr_step_epochs is not None and spec.epochs:
            row["lr_step_epochs"] = max(1, round(spec.lr_step_epochs * epochs / spec.epochs))
        phases.append(row)
    rest = {k: v for k, v in first.items() if k not in _SCHEDULE_KEYS}
    return resolve_config(preset, {**rest, "phases": phases}, drop_none=False)


def _subset(dataset: Dataset, keep: Sequence[NucleiSample], label: str) -> Dataset:
    return Dataset(list(keep), dataset.scheme, None, {"subset_of": str(dataset.root), "label": label})


def _timed(log: JsonlLog, stage: str, t0: float, **info: Any) -> None:
    log.write({"stage": stage, "seconds": round(time.perf_counter() - t0, 2), **info})


# --------------------------------------------------------------------------- the experiment


class Experiment:
    """One run folder; each stage method returns its (cached) result."""

    def __init__(self, config: ExperimentConfig, out: str | Path, *, device: str | None = None, progress: bool = True) -> None:
        self.cfg = config
        self.device = device
        self.progress = progress
        self._train: Dataset | None = None
        self._test: Dataset | None = None
        self._synthetic: dict[str, Dataset] = {}
        self._sources: dict[str, dict[str, str]] = {}
        self._t_read = 0.0
        self._check()  # every input, before a folder exists: a mistake leaves nothing behind
        self.out, self.resuming = prepare_run_folder(out, dump_config(config), kind="experiment")
        self.log = JsonlLog(self.out / "stages.jsonl")

    def _check(self) -> None:
        """Raise the error each later stage would raise, now: device, data, SDM, synthesis
        and segmenter configs of every arm (a typo would otherwise surface hours in)."""
        if self.device is not None:
            resolve_device(self.device)
        cfg = self.cfg
        if cfg.data.toy is None:
            t0 = time.perf_counter()
            self._train, self._test = self._user_datasets()
            self._t_read = time.perf_counter() - t0
            scheme = self._train.scheme
        else:
            scheme = CONSEP
        if cfg.sdm.checkpoint:
            path = Path(cfg.sdm.checkpoint)
            if not path.is_file():
                raise ConfigError(f"sdm.checkpoint {path} does not exist")

            label_nc = (checkpoint_meta(path).get("unet_config") or {}).get("label_nc")
            if label_nc is not None and int(label_nc) != scheme.num_classes + 2:
                raise ConfigError(f"sdm.checkpoint {path} was trained for {int(label_nc) - 2} classes, "
                                  f"the data has {scheme.num_classes} ({scheme.name})")
        elif any(k in ("balance", "enlarge") for a in cfg.arms for k in ARM_SETS[a]):
            resolve_train_config(cfg.sdm.preset, {"seed": cfg.seed, **cfg.sdm.overrides}, scheme.num_classes)
        s = cfg.synthesis
        s.sampler()
        kinds = {k for a in cfg.arms for k in ARM_SETS[a]}
        for kind, kwargs in (("balance", s.balance), ("enlarge", s.enlarge)):
            if kind in kinds or (kind == "balance" and "gradmix" in kinds):  # GradMix balances with them too
                check_map_kwargs(kind, kwargs, scheme)
        for name in cfg.downstream:
            net = cfg.network(name)
            where = "seg settings" if name == "hovernet" else f"seg.networks.{name}"
            for arm in cfg.arms:
                try:
                    seg_cfg = arm_seg_config(net.preset, net.overrides, cfg.network_epochs(name)[arm], cfg.seed)
                except ConfigError as exc:
                    # the HoVer-Net wording stays as it was (scripts and tests match on it)
                    label = f"{where} of arm {arm}" if name == "hovernet" else f"{where}, arm {arm}"
                    raise ConfigError(f"{label}: {exc}") from None
                is_sonnet = seg_cfg.model.arch == "sonnet"
                if is_sonnet != (name == "sonnet"):
                    raise ConfigError(
                        f"{where}: preset {net.preset!r} builds a {seg_cfg.model.arch!r} network, which is "
                        f"not {NETWORK_LABELS[name]}" + (" (SONNET presets: sonnet, sonnet-cpu-tiny)" if name == "sonnet"
                                                         else " (HoVer-style presets: hovernet-fast, hovernet-original, cpu-tiny)")
                    )

    # ---- data
    def _user_datasets(self) -> tuple[Dataset, Dataset]:
        """The training and test sets of `data.train` (and `data.test`, or a held-out part)."""
        spec = self.cfg.data
        full = read_dataset(spec.train, spec.scheme)
        if spec.test is not None:
            test = read_dataset(spec.test, spec.scheme)
            if test.scheme.name != full.scheme.name:
                raise DataError(f"train ({full.scheme.name}) and test ({test.scheme.name}) use different schemes")
            return full, test
        names = sorted(full.names)
        n_test = max(1, int(round(spec.test_fraction * len(names))))
        if n_test >= len(names):
            raise DataError(f"{spec.train}: too few images ({len(names)}) to hold out a test set")
        held = set(held_out_rng(self.cfg.seed).choice(names, n_test, replace=False).tolist())
        train = _subset(full, [s for s in full if s.name not in held], "train")
        test = _subset(full, [s for s in full if s.name in held], "test")
        train.root, test.root = full.root, full.root
        return train, test

    def datasets(self) -> tuple[Dataset, Dataset]:
        if self._train is not None and self._test is not None:
            if self._t_read and not self.resuming:
                _timed(self.log, "data", time.perf_counter() - self._t_read, n_train=len(self._train), n_test=len(self._test))
                self._t_read = 0.0
            return self._train, self._test
        spec = self.cfg.data
        t0 = time.perf_counter()
        if spec.toy is not None:
            train_dir, test_dir = self.out / "data" / "train", self.out / "data" / "test"
            toy = spec.toy
            if not train_dir.exists() or not test_dir.exists():
                samples = generate_toy_samples(
                    toy.n_train + toy.n_test, toy.size, toy.seed, rare_fraction=toy.rare_fraction
                )

                prov = {"generator": "diffmix toy-data", **toy.model_dump()}
                if not train_dir.exists():
                    write_dataset(train_dir, samples[: toy.n_train], CONSEP, prov | {"split": "train"})
                if not test_dir.exists():
                    write_dataset(test_dir, samples[toy.n_train :], CONSEP, prov | {"split": "test"})
            train, test = read_dataset(train_dir), read_dataset(test_dir)
        else:
            train, test = self._user_datasets()
        self._train, self._test = train, test
        if not self.resuming:
            _timed(self.log, "data", t0, n_train=len(train), n_test=len(test))
        return train, test

    # ---- SDM
    def sdm_checkpoint(self) -> Path:
        if self.cfg.sdm.checkpoint:
            path = Path(self.cfg.sdm.checkpoint)
            if not path.is_file():
                raise ConfigError(f"sdm.checkpoint {path} does not exist")
            return path

        train, _ = self.datasets()
        out = self.out / "sdm"
        done = out / "DONE"
        overrides = {"seed": self.cfg.seed, **self.cfg.sdm.overrides}  # an explicit sdm seed wins
        cfg = resolve_train_config(self.cfg.sdm.preset, overrides, train.scheme.num_classes)
        if not done.exists():
            t0 = time.perf_counter()
            train_sdm(train.samples, train.scheme.num_classes, out, cfg, device=self.device,
                      run_info={"dataset": str(train.root)}, progress=self.progress)
            done.write_text("ok\n")
            _timed(self.log, "sdm", t0, steps=cfg.total_steps)

        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise DataError(f"{out}: SDM training left no checkpoint")
        return ckpt

    # ---- synthetic sets
    def synthetic(self, kind: str) -> Dataset:
        """The synthetic dataset of one kind: 'balance', 'enlarge' (SDM) or 'gradmix' (made once,
        read once: folds, fidelity, counts and figures all use the same in-memory copy)."""
        if kind not in self._synthetic:
            self._synthetic[kind] = self._make_synthetic(kind)
        return self._synthetic[kind]

    def _make_synthetic(self, kind: str) -> Dataset:
        train, _ = self.datasets()
        out = self.out / "synth" / kind
        if kind == "gradmix":
            if not out.exists():
                t0 = time.perf_counter()
                s = self.cfg.synthesis
                # the same balancing plan as DiffMix-B's maps (spec 6a): same settings, same seed
                params = s.balance_params(train.scheme.minor_class, self.cfg.seed)
                images, report = gradmix_dataset(train.samples, params)
                patches = [p for img in images for p in grid_patches(img, s.patch, s.stride)]
                if s.max_patches is not None:
                    # the same grid positions as the SDM sets: every arm draws its synthetic
                    # patches from a pool of the same size and places (docs/study.md)
                    keep = {j.name for j in plan_jobs(train, "balance", patch=s.patch, stride=s.stride,
                                                      seed=self.cfg.seed, max_patches=s.max_patches)}
                    patches = [p for p in patches if p.name in keep]
                write_dataset(out, patches, train.scheme, {"kind": "gradmix", "seed": self.cfg.seed,
                                                          "patch": s.patch, "stride": s.stride})
                _timed(self.log, "gradmix", t0, patches=len(patches))
            return read_dataset(out)
        if not (out / "DONE").exists():
            s = self.cfg.synthesis
            t0 = time.perf_counter()
            synthesize(
                train, self.sdm_checkpoint(), out, maps=kind, patch=s.patch, stride=s.stride, sampler=s.sampler(),
                batch_size=s.batch_size, seed=self.cfg.seed, device=self.device, progress=self.progress,
                max_patches=s.max_patches,
                balance_kwargs=s.balance or None, enlarge_kwargs=s.enlarge or None,
            )
            (out / "DONE").write_text("ok\n")
            _timed(self.log, f"synth-{kind}", t0)
        return read_dataset(out)

    def source_image(self, kind: str, sample_name: str) -> str:
        """The training image a synthetic patch was cut from (`synth.manifest.source_images`)."""
        if kind not in self._sources:
            self._sources[kind] = source_images(self.synthetic(kind))
        return self._sources[kind][sample_name]

    # ---- downstream
    def original_patches(self, names: Sequence[str]) -> Dataset:
        train, _ = self.datasets()
        keep = set(names)
        s = self.cfg.seg
        patches = [p for img in train if img.name in keep for p in grid_patches(img, s.patch, s.stride)]
        return _subset(train, patches, "original patches")

    def run_name(self, fold: int, seed: int) -> str:
        """Folder name of one segmenter run: `fold<f>`, or `fold<f>-seed<s>` with several seeds."""
        return f"fold{fold}" if self.cfg.seeds == 1 else f"fold{fold}-seed{seed}"

    def network_folder(self, stage: str, network: str) -> Path:
        """`OUT/<stage>` (seg, eval) of one network: `OUT/<stage>/<network>` when the experiment
        trains anything but HoVer-Net alone; a HoVer-Net-only experiment keeps the layout it had
        before `downstream` existed (`OUT/seg/<arm>/...`), so its run folders still resume."""
        if self.cfg.downstream == ["hovernet"]:
            return self.out / stage
        return self.out / stage / network

    def segmenter(self, arm: str, fold: int, fold_names: Sequence[str], seed: int = 0, network: str = "hovernet") -> Path:
        out = self.network_folder("seg", network) / arm / self.run_name(fold, seed)
        final = out / FINAL_NAME
        if final.exists():
            return final
        original, extra = self.training_sources(arm, fold, fold_names)
        net = self.cfg.network(network)
        run_seed = segmenter_seed(self.cfg.seed, fold, seed, self.cfg.folds)
        cfg = arm_seg_config(net.preset, net.overrides, self.cfg.network_epochs(network)[arm], run_seed)
        t0 = time.perf_counter()
        path = train_segmenter(original, out, cfg, extra=extra,
                               preset=net.preset, device=self.device, progress=self.progress)
        _timed(self.log, "seg", t0, network=network, arm=arm, fold=fold, seed=seed, n_original=len(original.dataset),
               n_synthetic={src.label: src.count for src in extra})
        return path

    def training_sources(self, arm: str, fold: int, fold_names: Sequence[str]) -> tuple[Source, list[Source]]:
        """(original patches, synthetic sources with their counts) of one arm's training mix."""
        original = self.original_patches(fold_names)
        n = len(original)
        extra: list[Source] = []
        sets = ARM_SETS[arm]
        if sets:
            budget = int(round(self.cfg.synthetic_fraction[arm] * n))
            shares = [budget // len(sets) + (1 if i < budget % len(sets) else 0) for i in range(len(sets))]
            keep = set(fold_names)
            for kind, count in zip(sets, shares):
                synth = self.synthetic(kind)
                own = [p for p in synth if self.source_image(kind, p.name) in keep]
                if not own:
                    raise DataError(f"no {kind} patches come from the training images of fold {fold}")
                extra.append(Source(_subset(synth, own, kind), count, kind))
        return Source(original, None, "original"), extra

    def type_prior(self, arm: str, fold: int, ckpt: Path) -> list[float]:
        """The class prior of a run's training mix, for logit adjustment: the checkpoint's
        record, or (checkpoints written before it was recorded) recounted from the same mix."""
        recorded = checkpoint_meta(ckpt).get("type_prior")
        if recorded is not None:
            return [float(x) for x in recorded]
        train, _ = self.datasets()
        names = fold_splits(train.names, self.cfg.folds, self.cfg.seed)[fold]
        original, extra = self.training_sources(arm, fold, names)
        return mix_type_prior([original, *extra], train.scheme.num_classes, 0)

    def evaluation(self, arm: str, fold: int, ckpt: Path, seed: int = 0, network: str = "hovernet") -> dict[str, Any]:
        """The official metrics of one segmenter run on the test set (`diffmix evaluate`'s
        structure), plus the extra metrics of the scheme ("pannuke", "conic"); cached."""
        _, test = self.datasets()
        extras = self.cfg.extra_metrics_for(test.scheme)
        path = self.network_folder("eval", network) / arm / f"{self.run_name(fold, seed)}.json"
        if path.exists():
            cached = json.loads(path.read_text())
            # evaluations before intervals existed lack the counts; before extra metrics, those
            if "type_counts" in cached and all(k in cached for k in extras):
                return cached
        t0 = time.perf_counter()
        model, _ = load_segmenter(ckpt, device=self.device or "cpu")
        overlap = self.cfg.network(network).infer_overlap
        tau = self.cfg.seg.logit_adjust
        prior = self.type_prior(arm, fold, ckpt) if tau else None
        preds = []
        for sample in test:
            inst, types, _ = segment_image(model, sample.image, batch_size=self.cfg.seg.infer_batch_size,
                                           overlap=overlap, device=self.device,
                                           keep_unmarked=self.cfg.seg.keep_unmarked,
                                           type_prior=prior, logit_adjust=tau)
            preds.append((inst, types))
        true = [labels_from_maps(s.name, s.inst_map, s.type_map) for s in test]
        pred = [labels_from_maps(s.name, inst, types) for s, (inst, types) in zip(test, preds)]
        result = evaluate_labels(true, pred, test.scheme.class_ids)
        if extras:
            field_metrics(result, true, pred, test.scheme.class_ids, pannuke="pannuke" in extras,
                          conic="conic" in extras)
        write_json(path, result)
        _timed(self.log, "eval", t0, network=network, arm=arm, fold=fold, seed=seed)
        return result

    def fidelity(self, ckpt: Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        labels = {"balance": "DiffMix-B maps", "enlarge": "DiffMix-E maps", "gradmix": "GradMix"}
        wanted = [k for k in ("balance", "enlarge", "gradmix") if any(k in ARM_SETS[a] for a in self.cfg.arms)]
        for kind in wanted:
            path = self.out / "fidelity" / f"{kind}.json"
            if not path.exists():
                result = label_fidelity(self.synthetic(kind), ckpt, device=self.device, progress=self.progress,
                                        batch_size=self.cfg.seg.infer_batch_size, keep_unmarked=self.cfg.seg.keep_unmarked)
                result.pop("per_image", None)
                write_json(path, result)
            out[labels[kind]] = json.loads(path.read_text())
        return out

    def utility(self) -> dict[str, Any]:
        """The utility classifier on the training images' nuclei +/- each synthetic set's,
        scored on the test nuclei (diffmix.utility); cached in utility.json."""
        path = self.out / "utility.json"
        if path.exists():
            return json.loads(path.read_text())
        spec = self.cfg.utility
        assert spec is not None
        train, test = self.datasets()
        labels = {"balance": "DiffMix-B", "enlarge": "DiffMix-E", "gradmix": "GradMix"}
        kinds = [k for k in labels if any(k in ARM_SETS[a] for a in self.cfg.arms)]
        t0 = time.perf_counter()
        result = utility_study(
            train, test, {labels[k]: self.synthetic(k) for k in kinds},
            settings=UtilitySettings(crop=spec.crop, width=spec.width, steps=spec.steps),
            seeds=[utility_seed(self.cfg.seed, s) for s in range(spec.seeds)], balanced_control=spec.balanced_control,
            progress=self.progress,
        )
        write_json(path, result)
        _timed(self.log, "utility", t0)
        return json.loads(path.read_text())  # the JSON form (string keys), as a cached read gives

    # ---- everything
    def run(self) -> dict[str, Any]:
        train, test = self.datasets()
        splits = fold_splits(train.names, self.cfg.folds, self.cfg.seed)
        networks: dict[str, Any] = {}
        baseline_ckpt: Path | None = None
        for network in self.cfg.downstream:
            arms: dict[str, Any] = {}
            evals: dict[str, list[dict[str, Any]]] = {}
            for arm in self.cfg.arms:
                folds = []
                evals[arm] = []
                for f, names in enumerate(splits):
                    for s in range(self.cfg.seeds):
                        ckpt = self.segmenter(arm, f, names, s, network)
                        if baseline_ckpt is None and arm == "baseline" and f == 0:
                            baseline_ckpt = ckpt  # the first network's: label fidelity
                        evaluation = self.evaluation(arm, f, ckpt, s, network)
                        evals[arm].append(evaluation)
                        folds.append(fold_row(evaluation))
                arms[arm] = {"folds": folds, "summary": summarise(folds)}
            networks[network] = {
                "label": NETWORK_LABELS[network],
                "preset": self.cfg.network(network).preset,
                "arms": arms,
                "intervals": headline_intervals(evals, train.scheme.class_ids, train.scheme.minor_class),
            }
        results: dict[str, Any] = {
            "name": self.cfg.name,
            "dataset": str(train.root),
            "scheme": train.scheme.to_json(),
            "folds": len(splits),
            "seeds": self.cfg.seeds,
            "n_train_images": len(train),
            "n_test_images": len(test),
            "downstream": list(self.cfg.downstream),
            "networks": networks,
            "class_counts": self.class_counts(),
            "config": dump_config(self.cfg),
        }
        if self.cfg.fidelity and baseline_ckpt is not None and any(ARM_SETS[a] for a in self.cfg.arms):
            results["fidelity"] = self.fidelity(baseline_ckpt)
            results["fidelity_network"] = self.cfg.downstream[0]
        if self.cfg.utility is not None and any(ARM_SETS[a] for a in self.cfg.arms):
            results["utility"] = self.utility()
        return results

    def class_counts(self) -> dict[str, dict[int, int]]:
        """Nuclei per class in the original patches and in each synthetic set, counted over the
        same grid patches (the ones synthesised; patches overlap, so each is counted as a patch)."""
        train, _ = self.datasets()
        s = self.cfg.synthesis
        names = {"balance": "balancing maps", "enlarge": "enlarging maps", "gradmix": "GradMix"}
        kinds = [k for k in names if any(k in ARM_SETS[a] for a in self.cfg.arms)]
        sets = {k: self.synthetic(k) for k in kinds}
        grid = [p for img in train for p in grid_patches(img, s.patch, s.stride)]
        sdm_sets = [sets[k] for k in kinds if k != "gradmix"]
        keep = set(sdm_sets[0].names) if sdm_sets else {p.name for p in grid}
        counts = {"original": _subset(train, [p for p in grid if p.name in keep], "grid").class_counts()}
        for kind in kinds:
            counts[names[kind]] = _subset(sets[kind], [p for p in sets[kind] if p.name in keep], kind).class_counts()
        return counts


def run_experiment(
    config: ExperimentConfig, out: str | Path, *, device: str | None = None, progress: bool = True
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Run (or finish) the experiment in `out` and write the report; returns (results, report paths)."""
    exp = Experiment(config, out, device=device, progress=progress)
    results = exp.run()
    train, _ = exp.datasets()
    s = config.synthesis
    kinds = sorted({k for a in config.arms for k in ARM_SETS[a]})
    rows = sample_rows(train, {k: exp.synthetic(k) for k in kinds}, patch=s.patch, stride=s.stride,
                       n_rows=config.sample_rows)
    figures = make_figures(exp.out / "figures", results["class_counts"], train.scheme, rows)
    notes = [
        "Instance metrics are per-image means over the test set; Acc and F are pooled over it "
        "(HoVer-Net compute_stats conventions, 12-px centroid pairing).",
        "DiffMix-B/E/DiffMix and GradMix add synthetic patches to all original patches; epochs per arm "
        f"{ {a: config.epochs[a] for a in config.arms} } keep total iterations comparable (spec 8).",
    ]
    for name in config.downstream:
        if config.network(name).epochs is not None:
            notes.append(f"{NETWORK_LABELS[name]} trains its own epochs per arm "
                         f"{ {a: config.network_epochs(name)[a] for a in config.arms} } (seg.networks.{name}).")
    if "sonnet" in config.downstream:
        notes.append("SONNET is post-processed as its official code does (ordinal markers, watershed, inner-pixel "
                     "type vote), except that a marker holding several peaks of the ordinal map is split between "
                     "them (diffmix.seg.sonnet.postproc).")
    rare = []
    if config.seg.overrides.get("repeat_threshold") is not None:
        rare.append(f"patches holding rare classes drawn more often (repeat-factor sampling, threshold "
                    f"{config.seg.overrides['repeat_threshold']})")
    if (config.seg.overrides.get("loss") or {}).get("type_weights") is not None:
        rare.append("the type cross-entropy weighted per class (loss.type_weights)")
    if config.seg.logit_adjust:
        rare.append(f"type probabilities divided by each run's training-mix class prior ** {config.seg.logit_adjust} "
                    "before the vote (post-hoc logit adjustment; not applied to label fidelity)")
    if rare:
        notes.append("Every arm's HoVer-Net segmenter is trained and evaluated with the same rare-class options: "
                     + "; ".join(rare) + ".")
    extras = config.extra_metrics_for(train.scheme)
    if "pannuke" in extras:
        notes.append("bPQ and mPQ are PanNuke's (per image: class-agnostic PQ, and the mean of the per-class PQ over "
                     "the classes the image has; then means over images, one tissue), a mean over runs like "
                     "the other columns (diffmix.metrics.panoptic).")
    if "conic" in extras:
        notes.append("mPQ+ is CoNIC's: per class, matches and IoUs pooled over all test images, then the mean of "
                     "the per-class PQ over every class of the scheme (diffmix.metrics.panoptic).")
    if config.data.toy is not None:
        notes.insert(0, TOY_CAVEAT)
    paths = write_report(exp.out, results, train.scheme, figures, notes)
    return results, paths


def run_demo(
    out: Path, *, data: Path | None = None, scheme: str | None = None, device: str | None = None,
    seed: int = 0, progress: bool = True,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """The `demo` experiment preset on the built-in toy data, or on a user's dataset folder."""
    overrides: dict[str, Any] = {"seed": seed}
    if data is not None:
        overrides["data"] = {"train": str(data), "scheme": scheme, "toy": None}
    elif scheme is not None:
        raise ConfigError("--scheme goes with --data (the toy data uses merged CoNSeP classes)")
    cfg = load_experiment_config("demo", overrides)
    return run_experiment(cfg, out, device=device, progress=progress)
