"""Commands of the `pipeline` area: `diffmix fidelity`, `utility`, `experiment` and `demo`.

Label fidelity and utility score synthetic sets (their library modules are `diffmix.fidelity`
and `diffmix.utility`); the experiment runs every stage, those two included, for the five arms.
CLI convention: top-level `<name>_cmd` functions, `register(app)` only attaches them, library
modules imported inside the command bodies (see `diffmix.data.cli` and docs/architecture.md).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from diffmix.errors import ConfigError


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
        from diffmix.pipeline.experiment import validation_split  # only --folds pays for the experiment

        train_ds, test_ds, sets = validation_split(real, sets, folds, fold)
    else:
        train_ds, test_ds = real, read_dataset(test, scheme)
    result = utility_study(train_ds, test_ds, sets, settings=settings, seeds=seed_list,
                           balanced_control=control, progress=not quiet)
    typer.echo(format_utility(result, real.scheme))
    if json_out is not None:
        write_json(json_out, result)
        typer.echo(f"wrote {json_out}")


def experiment_cmd(
    config: str = typer.Argument(..., help="Experiment YAML, or a preset: demo, paper-consep, paper-glysac."),
    out: Path = typer.Argument(..., help="Run folder; re-running on it does only what is missing."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """The paper's five arms (baseline, GradMix, DiffMix-B, DiffMix-E, DiffMix) over k folds -> report."""
    from diffmix.pipeline.experiment import load_experiment_config, run_experiment
    from diffmix.pipeline.report import rare_class_summary

    t0 = time.perf_counter()
    results, paths = run_experiment(load_experiment_config(config), out, device=device, progress=not quiet)
    typer.echo("\n".join(rare_class_summary(results)))
    typer.echo(f"report: {paths['html']} ({time.perf_counter() - t0:.0f} s)")


def demo_cmd(
    out: Path = typer.Option(Path("demo_run"), help="Run folder (re-running resumes)."),
    data: Optional[Path] = typer.Option(None, help="Run on this dataset folder instead of the toy data."),
    scheme: Optional[str] = typer.Option(None, help="Class scheme of --data (consep, glysac, pannuke, YAML)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda ... (default: cuda if available)."),
    seed: int = typer.Option(0, help="Seed of every stage."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Toy data -> cpu-tiny SDM -> maps -> synthesis -> five arms -> report, on a laptop CPU."""
    from diffmix.pipeline.experiment import TOY_CAVEAT, run_demo
    from diffmix.pipeline.report import rare_class_summary

    t0 = time.perf_counter()
    results, paths = run_demo(out, data=data, scheme=scheme, device=device, seed=seed, progress=not quiet)
    typer.echo("")
    typer.echo("\n".join(rare_class_summary(results)))
    if data is None:
        typer.echo(TOY_CAVEAT)
    typer.echo(f"report: {paths['html'].resolve()} ({time.perf_counter() - t0:.0f} s)")


def register(app: typer.Typer) -> None:
    """Attach `fidelity`, `utility`, `experiment` and `demo` to `app` (in the order `--help` lists them)."""
    app.command("fidelity")(fidelity_cmd)
    app.command("utility")(utility_cmd)
    app.command("experiment")(experiment_cmd)
    app.command("demo")(demo_cmd)
