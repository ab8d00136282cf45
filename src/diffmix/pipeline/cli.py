"""Commands of the `pipeline` area: `diffmix synthesize`, `diffmix fidelity` and `diffmix utility`.

Each command is registered by its own function below, so later pipeline commands
(`experiment`, `demo`) add their own without touching these.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from diffmix.errors import ConfigError
from diffmix.sdm.cli import (
    ETA_OPTION,
    GUIDANCE_SCALE_OPTION,
    PASSES_OPTION,
    SOLVER_OPTION,
    SPACING_OPTION,
    START_FRACTION_OPTION,
    STEPS_OPTION,
    sampler_settings,
)


def _json_option(text: Optional[str], what: str) -> dict[str, Any]:
    """A JSON object given on the command line (e.g. --balance '{"fraction": 0.5}')."""
    if text is None:
        return {}
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what} {text!r}: not valid JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{what} {text!r}: expected a JSON object like '{{\"fraction\": 0.8}}'")
    return obj


# --------------------------------------------------------------------------- synthesize


def synthesize_cmd(
    dataset: Path = typer.Argument(..., help="Dataset folder of full-size images with labels."),
    ckpt: Path = typer.Argument(..., help="SDM checkpoint: `diffmix sdm train` output, or an authors' .pt converted by `diffmix sdm import`."),
    out: Path = typer.Argument(..., help="Output dataset folder (re-running on it resumes)."),
    maps: str = typer.Option(..., "--maps", help="Label maps: balance, enlarge, both, or own (the images' own labels)."),
    patch: int = typer.Option(256, "--patch", help="Patch size of the grid (spec 5: 256)."),
    stride: int = typer.Option(76, "--stride", help="Grid stride (spec 5: 76)."),
    steps: int = STEPS_OPTION,
    start_fraction: str = START_FRACTION_OPTION,
    guidance_scale: float = GUIDANCE_SCALE_OPTION,
    eta: float = ETA_OPTION,
    solver: str = SOLVER_OPTION,
    passes: Optional[int] = PASSES_OPTION,
    spacing: Optional[str] = SPACING_OPTION,
    batch_size: int = typer.Option(8, "--batch-size", help="Patches per sampler call."),
    seed: int = typer.Option(0, "--seed", help="Seed of the label maps and of every patch's noise."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: CUDA if available)."),
    scheme: Optional[str] = typer.Option(None, "--scheme", help="Class scheme of raw labels (consep, glysac, pannuke, YAML)."),
    max_patches: Optional[int] = typer.Option(None, "--max-patches", help="Patches per map kind, spread over the grid (default: all)."),
    weights: str = typer.Option("auto", "--weights", help="Checkpoint weights: auto (EMA if present), ema or model."),
    balance: Optional[str] = typer.Option(None, "--balance", help='Balancing parameters (BalanceParams fields) as JSON, e.g. \'{"fraction": 0.8, "border": 30}\'.'),
    enlarge: Optional[str] = typer.Option(None, "--enlarge", help='Extra enlarge_dataset arguments as JSON, e.g. \'{"no_overlap": true}\'.'),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the run summary as JSON here."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Re-synthesise grid patches under balancing/enlarging label maps (DiffMix); resumable, torchrun-aware."""
    from diffmix.data.io import read_dataset
    from diffmix.distributed import cleanup, is_main
    from diffmix.runs import check_output_file, write_json
    from diffmix.synth.run import synthesize

    from diffmix.sdm.convert import check_weights

    check_weights(weights)
    sampler = sampler_settings(steps, start_fraction, guidance_scale, eta, solver, passes, spacing)
    if json_out is not None:
        check_output_file(json_out)
    ds = read_dataset(dataset, scheme)
    try:
        report = synthesize(
            ds, ckpt, out, maps=maps, patch=patch, stride=stride, sampler=sampler,
            batch_size=batch_size, seed=seed, device=device, max_patches=max_patches,
            progress=not quiet, balance_kwargs=_json_option(balance, "--balance"),
            enlarge_kwargs=_json_option(enlarge, "--enlarge"), weights=weights,  # type: ignore[arg-type]
        )
        if is_main():
            typer.echo(f"nuclei per class in the {report.n_patches} grid patches (original labels -> custom maps):")
            typer.echo(report.counts_table(ds.scheme))
            typer.echo(
                f"{report.n_written} patches written, {report.n_skipped} already done, "
                f"{report.patches_per_second:.3f} patches/s over {report.seconds:.1f} s "
                f"({report.world_size} process(es)) -> {report.out}"
            )
            if json_out is not None:
                write_json(json_out, report.to_json())
    finally:
        cleanup()


def register_synthesize(app: typer.Typer) -> None:
    """`diffmix synthesize DATASET CKPT OUT --maps balance|enlarge|both`."""
    app.command("synthesize")(synthesize_cmd)


# --------------------------------------------------------------------------- fidelity


def fidelity_cmd(
    synth: Path = typer.Argument(..., help="Dataset folder to score (a synthetic set, GradMix patches, ...)."),
    segmenter: Path = typer.Option(..., "--segmenter", help="Segmenter checkpoint trained on real data (`diffmix seg train`)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON here."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda ... (default: CUDA if available)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Tiles per network call."),
    scheme: Optional[str] = typer.Option(None, "--scheme", help="Class scheme of raw labels (folders diffmix wrote know theirs)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Label fidelity: PQ, type Acc and per-class F1 of a real-data segmenter against the label maps."""
    from diffmix.data.io import read_dataset
    from diffmix.fidelity import format_fidelity, label_fidelity
    from diffmix.runs import check_output_file, write_json

    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if json_out is not None:
        check_output_file(json_out)
    ds = read_dataset(synth, scheme)
    result = label_fidelity(ds, segmenter, device=device, batch_size=batch_size, progress=not quiet)
    typer.echo(format_fidelity(result, ds.scheme))
    if json_out is not None:
        write_json(json_out, {**result, "f1": {str(k): v for k, v in result["f1"].items()}})
        typer.echo(f"wrote {json_out}")


def register_fidelity(app: typer.Typer) -> None:
    """`diffmix fidelity SYNTH --segmenter CKPT [--json OUT]`."""
    app.command("fidelity")(fidelity_cmd)


# --------------------------------------------------------------------------- utility


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected comma-separated integers like 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: give one or more distinct integers")
    return seeds


def utility_cmd(
    synth: list[Path] = typer.Argument(None, help="Synthetic dataset folders whose nuclei are added (one arm each)."),
    train: Path = typer.Option(..., "--train", help="Real training dataset (full images with labels)."),
    test: Optional[Path] = typer.Option(None, "--test", help="Real dataset to score on (or use --folds/--fold)."),
    folds: int = typer.Option(0, "--folds", help="Score on validation fold --fold of --train split into this many parts, instead of --test."),
    fold: int = typer.Option(0, "--fold", help="Which validation fold (0-based) with --folds."),
    seeds: str = typer.Option("0,1,2", "--seeds", help="Classifier seeds per arm (comma-separated)."),
    steps: int = typer.Option(800, "--steps", help="Optimiser steps per classifier (the same for every arm)."),
    crop: int = typer.Option(32, "--crop", help="Crop side around each nucleus, px."),
    width: int = typer.Option(12, "--width", help="Channels of the classifier's first block."),
    control: bool = typer.Option(True, "--control/--no-control", help="Add the real-only arm with class-balanced sampling."),
    scheme: Optional[str] = typer.Option(None, "--scheme", help="Class scheme of raw labels (folders diffmix wrote know theirs)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON here."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Utility: per-class F1 of a nucleus classifier on real nuclei, trained on real +/- synthetic nuclei."""
    from diffmix.data.io import read_dataset
    from diffmix.runs import check_output_file, write_json
    from diffmix.utility import UtilitySettings, format_utility, utility_study

    if json_out is not None:
        check_output_file(json_out)  # before minutes of training, not after
    seed_list = _seed_list(seeds)
    if steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    if (test is None) == (folds == 0):
        raise ConfigError("give either --test DATASET or --folds K --fold F (validation on --train)")
    if folds and not 0 <= fold < folds:
        raise ConfigError(f"--fold must be in 0..{folds - 1}, got {fold}")
    settings = UtilitySettings(crop=crop, width=width, steps=steps)  # validated by nucleus_crops
    real = read_dataset(train, scheme)
    sets = {}
    for folder in synth or []:
        label = folder.name
        if label in sets:
            raise ConfigError(f"two synthetic sets are named {label!r}; give folders with distinct names")
        sets[label] = read_dataset(folder, scheme)
    if folds:
        from diffmix.pipeline.experiment import validation_split

        train_ds, test_ds, sets = validation_split(real, sets, folds, fold)
    else:
        train_ds, test_ds = real, read_dataset(test, scheme)
    result = utility_study(train_ds, test_ds, sets, settings=settings, seeds=seed_list,
                           balanced_control=control, progress=not quiet)
    typer.echo(format_utility(result, real.scheme))
    if json_out is not None:
        write_json(json_out, result)
        typer.echo(f"wrote {json_out}")


def register_utility(app: typer.Typer) -> None:
    """`diffmix utility [SYNTH ...] --train DATASET --test DATASET`."""
    app.command("utility")(utility_cmd)


def register(app: typer.Typer) -> None:
    """Add this area's commands to the main `diffmix` app."""
    register_synthesize(app)
    register_fidelity(app)
    register_utility(app)
