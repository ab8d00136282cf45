"""Commands of the `sdm` area: train an SDM, synthesise under label maps, import official weights.

The sampler options live here, beside `sdm sample`, and `diffmix synthesize` (`diffmix.synth.cli`)
uses the same ones. CLI convention: top-level `<name>_cmd` functions, `register(app)` only
attaches them, library modules imported inside the command bodies (see `diffmix.data.cli` and
docs/architecture.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from diffmix._cli import add_group
from diffmix.sdm.settings import DEFAULT_PASSES, DEFAULTS, SOLVERS, SamplerSettings, fraction_text, sampler_settings

def train_cmd(
    dataset: Path = typer.Argument(..., help="Dataset folder (Images/ + Labels/) of full training images."),
    out: Path = typer.Argument(..., help="Run folder; re-running on it resumes from its last checkpoint."),
    preset: str = typer.Option("cpu-tiny", help="Preset name (cpu-tiny, paper-consep, paper-glysac) or a YAML file."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Phase-1 (pretraining) steps."),
    phase2_steps: Optional[int] = typer.Option(None, "--phase2-steps", help="Phase-2 (CFG fine-tune) steps."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Items per step and process."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Steps between checkpoints."),
    sample_every: Optional[int] = typer.Option(None, "--sample-every", help="Steps between sample grids (0: none)."),
    seed: Optional[int] = typer.Option(None, help="Seed of every draw (weights, items, crops, noise)."),
    scheme: Optional[str] = typer.Option(None, help="Class scheme of a raw dataset without dataset.json."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or cuda:N (default: CUDA when available)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Train an SDM on DATASET into OUT (two phases; run under torchrun for DDP)."""
    from diffmix.data.io import read_dataset
    from diffmix.distributed import cleanup, init_distributed
    from diffmix.runs import check_output_folder
    from diffmix.sdm.train import resolve_train_config, train_sdm

    check_output_folder(out)
    data = read_dataset(dataset, scheme)
    overrides: dict[str, Any] = {
        "phase1_steps": steps,
        "phase2_steps": phase2_steps,
        "batch_size": batch_size,
        "checkpoint_every": checkpoint_every,
        "sample_every": sample_every,
        "seed": seed,
    }
    cfg = resolve_train_config(preset, overrides, data.scheme.num_classes)
    try:
        result = train_sdm(
            data.samples,
            data.scheme.num_classes,
            out,
            cfg,
            device=device,
            run_info={"dataset": str(Path(dataset).resolve())},
            progress=progress,
        )
        if init_distributed(device).is_main:
            typer.echo(f"sdm: {result.out} at step {result.step}; checkpoint {result.checkpoint}")
    finally:
        cleanup()


# Options of the sampler, shared by `sdm sample` and `diffmix synthesize`; their defaults are
# `diffmix.sdm.settings.DEFAULTS` (each written once, there).
STEPS_OPTION: Any = typer.Option(
    DEFAULTS.steps, "--steps", help="Respaced schedule ddim<N> (spec 4: 100); with the start fraction it fixes the start time.")
START_FRACTION_OPTION: Any = typer.Option(
    fraction_text(DEFAULTS.start_fraction), "--start-fraction",
    help="Start at index floor(steps x fraction) - 1 of that schedule (spec 4: 0.55, i.e. t = 540 of 1000).")
GUIDANCE_SCALE_OPTION: Any = typer.Option(
    DEFAULTS.guidance_scale, "--guidance-scale", help="Classifier-free guidance s, code form eps_u + s(eps_c - eps_u) (spec 4: 1.5).")
ETA_OPTION: Any = typer.Option(DEFAULTS.eta, "--eta", help="DDIM eta (spec 4: 0; DDIM only).")
SOLVER_OPTION: Any = typer.Option(
    DEFAULTS.solver, "--solver",
    help=f"Solver: {', '.join(SOLVERS)} (ddim with the default passes is the official 55-step sampler; docs/solvers.md).")
PASSES_OPTION: Any = typer.Option(
    None, "--passes", show_default=False,
    help="Guided network passes from the start time to t = 0 (default: "
         + ", ".join(f"{n if n is not None else 'every respaced step (55)'} for {s}" for s, n in DEFAULT_PASSES.items())
         + ").")
SPACING_OPTION: Any = typer.Option(
    None, "--spacing", help="Grid of --passes: time or logsnr (default: time for ddim, logsnr for dpmpp-2m and unipc).")


def sampler_from_options(steps: int, start_fraction: str, guidance_scale: float, eta: float, solver: str,
                         passes: Optional[int], spacing: Optional[str] = None) -> SamplerSettings:
    """The `SamplerSettings` of the sampler options, an unset `--passes` being the solver's
    default budget (ConfigError, exit 2, for a bad value)."""
    return sampler_settings(solver, passes, steps=steps, start_fraction=start_fraction,
                            guidance_scale=guidance_scale, eta=eta, spacing=spacing)


def sample_cmd(
    ckpt: Path = typer.Argument(..., help="A `sdm train` checkpoint or an imported official checkpoint."),
    maps: Path = typer.Option(..., "--maps", help="Dataset folder: images are the y0 patches, labels the maps to follow."),
    out: Path = typer.Option(..., "--out", help="Output dataset folder (a synthesis run folder: re-running on it resumes)."),
    steps: int = STEPS_OPTION,
    start_fraction: str = START_FRACTION_OPTION,
    guidance_scale: float = GUIDANCE_SCALE_OPTION,
    eta: float = ETA_OPTION,
    solver: str = SOLVER_OPTION,
    passes: Optional[int] = PASSES_OPTION,
    spacing: Optional[str] = SPACING_OPTION,
    batch_size: int = typer.Option(8, "--batch-size", help="Images per sampler call (each runs as 2x for CFG)."),
    seed: int = typer.Option(0, help="Seed of the start noise (per image: its name, `diffmix.seeds.patch_seed`)."),
    weights: str = typer.Option("auto", help="auto (EMA when present, the official choice), ema or model."),
    scheme: Optional[str] = typer.Option(None, help="Class scheme of a raw maps dataset without dataset.json."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or cuda:N (default: CUDA when available)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Re-synthesise every image of MAPS, whole, under its own label maps; write a dataset folder to OUT.

    This is `diffmix synthesize` with the map kind "own" and whole images: the same model
    loader, schedule (the checkpoint's), noise rule, run folder and manifest.
    """
    from diffmix.data.io import read_dataset
    from diffmix.distributed import cleanup, is_main
    from diffmix.runs import check_output_folder
    from diffmix.synth.jobs import OWN
    from diffmix.synth.run import synthesize

    sampler = sampler_from_options(steps, start_fraction, guidance_scale, eta, solver, passes, spacing)
    check_output_folder(out)
    data = read_dataset(maps, scheme)
    try:
        report = synthesize(
            data, ckpt, out, maps=OWN, patch=None, sampler=sampler, batch_size=batch_size, seed=seed,
            device=device, progress=progress, weights=weights, generator_name="diffmix sdm sample",  # type: ignore[arg-type]
        )
        if is_main():
            typer.echo(f"sdm sample: {report.n_written} image(s) written, {report.n_skipped} already done "
                       f"({sampler.describe()}) -> {report.out}")
    finally:
        cleanup()


def import_cmd(
    src: Path = typer.Argument(..., help="Official SDM/DiffMix checkpoint (.pt), read with weights_only=True."),
    dst: Path = typer.Argument(..., help="Output .safetensors file."),
    image_size: Optional[int] = typer.Option(
        None, "--image-size", help="Training image size, for U-Nets whose channel_mult is not an SDM default."
    ),
    num_head_channels: Optional[int] = typer.Option(
        None, "--num-head-channels", help="Channels per attention head, if not SDM's 64 (not readable from shapes)."
    ),
) -> None:
    """Convert an authors' released SDM checkpoint into a safetensors file `sdm sample` loads."""
    from diffmix.runs import check_output_file
    from diffmix.sdm.convert import import_checkpoint

    check_output_file(dst)
    config = import_checkpoint(src, dst, image_size=image_size, num_head_channels=num_head_channels)
    typer.echo(f"sdm import: wrote {dst} (label_nc {config.label_nc}, image_size {config.image_size})")


def register(app: typer.Typer) -> None:
    """Attach the `sdm` group (train, sample, import) to `app`."""
    add_group(app, "sdm", "Semantic diffusion model: train (two phases, resumable, DDP), DiffMix sampling, "
              "checkpoint import.", {"train": train_cmd, "sample": sample_cmd, "import": import_cmd})
