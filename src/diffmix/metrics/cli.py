"""Commands of the `metrics` area: `diffmix evaluate`.

CLI convention: top-level `<name>_cmd` functions, `register(app)` only attaches them, library
modules imported inside the command bodies (see `diffmix.data.cli` and docs/architecture.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from diffmix.errors import ConfigError


def _parse_classes(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--classes {text!r}: expected comma-separated integers like 1,2,3,4") from None
    if not ids or any(i <= 0 for i in ids) or len(set(ids)) != len(ids):
        raise ConfigError(f"--classes {text!r}: expected distinct positive class ids like 1,2,3,4")
    return ids


def _check_classes_known(class_ids: list[int], true: Path) -> None:
    """--classes ids must exist in the ground truth's scheme when its dataset.json names one.

    A class with no nucleus on either side scores F1 = 1.0 (metrics/classification.py), so a
    mistyped id would otherwise print a perfect score for a class that does not exist.
    """
    from diffmix.data.labels import find_dataset_json
    from diffmix.data.schemes import ClassScheme

    # the dataset root's dataset.json also governs `--true DATASET/Labels` (as evaluation's merge does)
    meta, root = find_dataset_json(Path(true)) if Path(true).is_dir() else (None, Path(true))
    if meta is None:
        return
    scheme = ClassScheme.from_json(meta["scheme"], where=f"{root}/dataset.json")
    # --classes merges nothing: the ids are those the label files hold, merged or raw
    known = sorted(scheme.classes) if meta.get("merged", False) else sorted(scheme.raw_to_merged)
    unknown = [c for c in class_ids if c not in known]
    if unknown:
        state = "merged" if meta.get("merged", False) else "raw"
        raise ConfigError(
            f"--classes: class id(s) {unknown} are not in the ground truth's {state} classes {known} "
            f"(scheme {scheme.name!r}, {root}/dataset.json)"
        )


def evaluate_cmd(
    pred: Path = typer.Option(..., "--pred", help="Folder of predicted labels (.mat or .npy)."),
    true: Path = typer.Option(..., "--true", help="Folder of ground-truth labels (.mat or .npy)."),
    scheme: Optional[str] = typer.Option(
        None,
        "--scheme",
        help="Class scheme (consep, glysac, pannuke or a YAML file): gives the class list and "
        "merges raw ground-truth classes (not if dataset.json says they are merged).",
    ),
    classes: Optional[str] = typer.Option(
        None, "--classes", help="Explicit class list, e.g. 1,2,3,4; merges nothing."
    ),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON here."),
    compat: Optional[str] = typer.Option(
        None, "--compat", help="hovernet: type statistics exactly as hover_net's run_nuclei_type_stat "
        "(dummy (0,0) nucleus of type 0 for an image without nuclei, NaN for 0/0)."
    ),
    pannuke: bool = typer.Option(False, "--pannuke", help="Also PanNuke's mPQ and bPQ (per class, per tissue)."),
    conic: bool = typer.Option(False, "--conic", help="Also CoNIC's mPQ+ and per-class PQ (pooled over images)."),
    tissues: Optional[Path] = typer.Option(
        None, "--tissues", help="Tissue of each image for --pannuke: .json {name: tissue}, .csv name,tissue, "
        "or PanNuke's types.npy."
    ),
) -> None:
    """Dice, AJI, AJI+, DQ/SQ/PQ per image and pooled type F1 (official HoVer-Net numbers)."""
    from diffmix.data.schemes import get_scheme
    from diffmix.metrics.evaluate import evaluate_folders, format_table, to_json
    from diffmix.metrics.panoptic import format_panoptic
    from diffmix.runs import atomic_write_text, check_output_file

    if scheme is not None and classes is not None:
        raise ConfigError("give --scheme or --classes, not both")
    if json_out is not None:
        check_output_file(json_out)
    class_ids = _parse_classes(classes) if classes is not None else None
    if class_ids is not None:
        _check_classes_known(class_ids, true)
    resolved = get_scheme(scheme) if scheme is not None else None
    result = evaluate_folders(
        pred, true, scheme=resolved, class_ids=class_ids, compat=compat, pannuke=pannuke, conic=conic, tissues=tissues
    )
    typer.echo(format_table(result, resolved))
    if compat is not None:
        typer.echo(f"  (type statistics: --compat {compat})")
    if pannuke or conic:
        typer.echo("\n" + format_panoptic(result, resolved.classes if resolved is not None else None))
    if scheme is None and classes is None:
        typer.echo("  (classes: those present in the ground truth; pass --scheme or --classes)")
    if json_out is not None:
        atomic_write_text(json_out, to_json(result))
        typer.echo(f"wrote {json_out}")


def register(app: typer.Typer) -> None:
    """Attach `evaluate` to `app`."""
    app.command("evaluate")(evaluate_cmd)
