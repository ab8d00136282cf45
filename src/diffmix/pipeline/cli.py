"""Commands of the `pipeline` area: `diffmix synthesize` and `diffmix fidelity`.

Each command is registered by its own function below, so later pipeline commands
(`experiment`, `demo`) add their own without touching these.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from diffmix.errors import ConfigError


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
    maps: str = typer.Option(..., "--maps", help="Label maps: balance, enlarge or both."),
    patch: int = typer.Option(256, "--patch", help="Patch size of the grid (spec 5: 256)."),
    stride: int = typer.Option(76, "--stride", help="Grid stride (spec 5: 76)."),
    steps: int = typer.Option(100, "--steps", help="DDIM steps of the respaced schedule (spec 4: 100)."),
    start_fraction: str = typer.Option("0.55", "--start-fraction", help="Share of the DDIM steps run (spec 4: 0.55)."),
    guidance_scale: float = typer.Option(1.5, "--guidance-scale", help="Classifier-free guidance s, code form (spec 4: 1.5)."),
    eta: float = typer.Option(0.0, "--eta", help="DDIM eta (spec 4: 0)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Patches per sampler call."),
    seed: int = typer.Option(0, "--seed", help="Seed of the label maps and of every patch's noise."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: CUDA if available)."),
    scheme: Optional[str] = typer.Option(None, "--scheme", help="Class scheme of raw labels (consep, glysac, pannuke, YAML)."),
    max_patches: Optional[int] = typer.Option(None, "--max-patches", help="Patches per map kind, spread over the grid (default: all)."),
    weights: str = typer.Option("auto", "--weights", help="Checkpoint weights: auto (EMA if present), ema or model."),
    balance: Optional[str] = typer.Option(None, "--balance", help='Extra balance_dataset arguments as JSON, e.g. \'{"fraction": 0.8, "border": 30}\'.'),
    enlarge: Optional[str] = typer.Option(None, "--enlarge", help='Extra enlarge_dataset arguments as JSON, e.g. \'{"no_overlap": true}\'.'),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the run summary as JSON here."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Re-synthesise grid patches under balancing/enlarging label maps (DiffMix); resumable, torchrun-aware."""
    from diffmix.data.io import read_dataset
    from diffmix.distributed import cleanup, is_main
    from diffmix.runs import write_json
    from diffmix.synth import synthesize

    if weights not in ("auto", "ema", "model"):
        raise ConfigError(f"--weights must be auto, ema or model, got {weights!r}")
    ds = read_dataset(dataset, scheme)
    try:
        report = synthesize(
            ds, ckpt, out, maps=maps, patch=patch, stride=stride, steps=steps,
            start_fraction=start_fraction, guidance_scale=guidance_scale, eta=eta,
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
    from diffmix.runs import write_json

    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    ds = read_dataset(synth, scheme)
    result = label_fidelity(ds, segmenter, device=device, batch_size=batch_size, progress=not quiet)
    typer.echo(format_fidelity(result, ds.scheme))
    if json_out is not None:
        write_json(json_out, {**result, "f1": {str(k): v for k, v in result["f1"].items()}})
        typer.echo(f"wrote {json_out}")


def register_fidelity(app: typer.Typer) -> None:
    """`diffmix fidelity SYNTH --segmenter CKPT [--json OUT]`."""
    app.command("fidelity")(fidelity_cmd)


def register(app: typer.Typer) -> None:
    """Add this area's commands to the main `diffmix` app."""
    register_synthesize(app)
    register_fidelity(app)
