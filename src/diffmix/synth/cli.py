"""Commands of the `synth` area: `diffmix synthesize` (label maps + SDM -> synthetic dataset).

`diffmix sdm sample` is the same path with the map kind "own" (`diffmix.sdm.cli`), and both take
the sampler options defined there. CLI convention: top-level `<name>_cmd` functions,
`register(app)` only attaches them, library modules imported inside the command bodies (see
`diffmix.data.cli` and docs/architecture.md).
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
    sampler_from_options,
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
    from diffmix.sdm.convert import check_weights
    from diffmix.synth.run import synthesize

    check_weights(weights)
    sampler = sampler_from_options(steps, start_fraction, guidance_scale, eta, solver, passes, spacing)
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
            typer.echo(f"sampler: {sampler.describe()}")
            typer.echo(
                f"{report.n_written} patches written, {report.n_skipped} already done, "
                f"{report.patches_per_second:.3f} patches/s over {report.seconds:.1f} s "
                f"({report.world_size} process(es)) -> {report.out}"
            )
            if json_out is not None:
                write_json(json_out, report.to_json())
    finally:
        cleanup()


def register(app: typer.Typer) -> None:
    """Attach `synthesize` to `app`."""
    app.command("synthesize")(synthesize_cmd)
