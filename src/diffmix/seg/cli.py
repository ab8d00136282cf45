"""Commands of the `seg` area: `diffmix seg train` and `diffmix seg infer`.

CLI convention: top-level `<name>_cmd` functions, `register(app)` only attaches them, library
modules imported inside the command bodies (see `diffmix.data.cli` and docs/architecture.md).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, List, Optional

import typer

from diffmix._cli import add_group
from diffmix.errors import ConfigError

_COUNT = re.compile(r"^(?P<path>.+)@(?P<count>\d+)$")


def parse_dataset_arg(text: str) -> tuple[str, int | None]:
    """`PATH` or `PATH@COUNT` (COUNT samples of that dataset per epoch plan).

    A trailing `@digits` is read as a count only when PATH itself is not an existing path,
    so folders whose names end in '@123' still work.
    """
    m = _COUNT.match(text)
    if m and not Path(text).exists():
        return m["path"], int(m["count"])
    return text, None


def train_cmd(
    out: Path = typer.Argument(..., help="Run folder (created; re-running on it resumes)."),
    train: List[str] = typer.Option(..., "--train", help="Original dataset folder (repeatable; PATH@N for N samples)."),
    extra: Optional[List[str]] = typer.Option(
        None, "--extra", help="Extra (synthetic) dataset folder, repeatable; PATH@N uses N samples of it."
    ),
    preset: str = typer.Option(
        "cpu-tiny", help="cpu-tiny, hovernet-fast, hovernet-original, sonnet, sonnet-cpu-tiny, or a YAML file."
    ),
    epochs: Optional[int] = typer.Option(None, help="Epochs of each phase (all of them)."),
    phase1_epochs: Optional[int] = typer.Option(None, help="Epochs of phase 1 (encoder frozen)."),
    phase2_epochs: Optional[int] = typer.Option(None, help="Epochs of phase 2 (all trained)."),
    phase3_epochs: Optional[int] = typer.Option(None, help="Epochs of phase 3 (SONNET: self-guided)."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size per process (both phases)."),
    samples_per_epoch: Optional[int] = typer.Option(None, help="Patches per epoch (default: every planned crop once, see crops_per_sample)."),
    seed: Optional[int] = typer.Option(None, help="Seed of initialisation and of the patch stream."),
    pretrained: Optional[Path] = typer.Option(None, help="Local ImageNet encoder weights (HoVer-Net and SONNET presets)."),
    msge: Optional[str] = typer.Option(None, help="MSGE derivatives: paper (default) or official."),
    augmentation: Optional[str] = typer.Option(
        None, help="light (dihedral + colour jitter) or hovernet (the official affine/blur/colour pipeline); "
        "default: the preset's."
    ),
    checkpoint_every: Optional[int] = typer.Option(None, help="Checkpoint every N steps (default: every epoch)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: CUDA when available)."),
    num_workers: int = typer.Option(0, help="DataLoader worker processes."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Train HoVer-Net, SONNET or the small net on original [+ synthetic] datasets (the official phases)."""
    from diffmix.distributed import is_main
    from diffmix.runs import check_output_folder
    from diffmix.seg.train import resolve_config, train_segmenter

    check_output_folder(out)
    overrides: dict[str, Any] = {
        "phase1_epochs": epochs if phase1_epochs is None else phase1_epochs,
        "phase2_epochs": epochs if phase2_epochs is None else phase2_epochs,
        "phase3_epochs": phase3_epochs,
        "batch_size": batch_size,
        "batch_size_phase2": batch_size,
        "samples_per_epoch": samples_per_epoch,
        "seed": seed,
        "checkpoint_every": checkpoint_every,
        "augmentation": augmentation,
    }
    if pretrained is not None:
        overrides["model"] = {"pretrained": str(pretrained)}
    if msge is not None:
        if msge not in ("paper", "official"):
            raise ConfigError(f"--msge must be 'paper' or 'official', got {msge!r}")
        overrides["loss"] = {"msge": msge}
    cfg = resolve_config(preset, overrides, epochs=epochs)
    preset_name = preset if not preset.endswith((".yaml", ".yml")) else str(Path(preset).resolve())
    final = train_segmenter(
        [parse_dataset_arg(t) for t in train],
        out,
        cfg,
        extra=[parse_dataset_arg(e) for e in extra or []],
        preset=preset_name,
        device=device,
        num_workers=num_workers,
        num_threads=threads,
        progress=progress,
    )
    if is_main():
        typer.echo(f"checkpoint: {final}")

def infer_cmd(
    ckpt: Path = typer.Argument(..., help="Checkpoint of `diffmix seg train` (final.safetensors)."),
    images: Path = typer.Argument(..., help="Folder of images (or a dataset root with Images/)."),
    out: Path = typer.Argument(..., help="Output run folder: Labels/*.mat (CoNSeP) + Overlay/*.png."),
    tile: Optional[int] = typer.Option(None, help="Tile side (default: the model's input size)."),
    overlap: Optional[int] = typer.Option(None, help="Output pixels shared by neighbouring tiles."),
    batch_size: int = typer.Option(4, help="Tiles per forward pass."),
    device: str = typer.Option("cpu", help="cpu, cuda, ..."),
    logit_adjust: float = typer.Option(
        0.0, "--logit-adjust", min=0.0,
        help="Post-hoc logit adjustment tau: divide the type probabilities by the training mix's "
        "class prior ** tau (1 = balanced-error rule; 0 = off, the official vote).",
    ),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Tiled inference + the checkpoint network's post-processing (HoVer-Net or SONNET); writes what
    `diffmix evaluate` reads."""
    from diffmix.runs import check_output_folder
    from diffmix.seg.infer import infer_folder

    check_output_folder(out)
    summary = infer_folder(
        ckpt, images, out, tile=tile, overlap=overlap, batch_size=batch_size, device=device,
        logit_adjust=logit_adjust, progress=progress,
    )
    typer.echo(
        f"{summary.get('done', 0)} image(s) segmented, {summary.get('skipped', 0)} already done, "
        f"{summary.get('nuclei', 0)} nuclei -> {summary.get('out', out)}"
    )


def register(app: typer.Typer) -> None:
    """Attach the `seg` group (train, infer) to `app`."""
    add_group(app, "seg", "Downstream nuclei segmentation + classification (HoVer-Net, SONNET, small HoVer-style net).",
              {"train": train_cmd, "infer": infer_cmd})
