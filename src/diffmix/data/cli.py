"""Commands of the data area: `diffmix inspect`, `toy-data`, `export geojson`, `import geojson`.

The CLI convention of every area (docs/architecture.md): each command is a top-level function
`<name>_cmd` whose parameters are its typer options, so it can be imported and called;
`register(app)` only attaches the commands (building the area's sub-apps). Library modules are
imported inside the command bodies, on purpose: `diffmix --help` and each command's start pay
only for what that command runs (numpy, scipy or torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from diffmix._cli import add_group

if TYPE_CHECKING:
    from diffmix.data.io import Dataset


def imbalance_table(dataset: Dataset) -> list[tuple[int, str, int, float]]:
    """(class id, name, nuclei, proportion) per class of the scheme, in id order."""
    counts = dataset.class_counts()
    total = sum(counts.values())
    return [
        (cls, dataset.scheme.class_name(cls), counts.get(cls, 0), counts.get(cls, 0) / total if total else 0.0)
        for cls in dataset.scheme.class_ids
    ]


def format_inspection(dataset: Dataset, problems: list[str]) -> str:
    """The human-readable report of `diffmix inspect`."""
    lines = [f"dataset: {dataset.root}", f"scheme:  {dataset.scheme.name} (K={dataset.scheme.num_classes}, "
             f"minor class {dataset.scheme.minor_class} {dataset.scheme.class_name(dataset.scheme.minor_class)})"]
    sizes: dict[tuple[int, int], int] = {}
    for s in dataset:
        sizes[s.shape] = sizes.get(s.shape, 0) + 1
    size_text = ", ".join(f"{h}x{w} ({n})" for (h, w), n in sorted(sizes.items())) or "-"
    lines.append(f"images:  {len(dataset)} valid; sizes {size_text}")
    lines.append("")
    lines.append(f"{'id':>3}  {'class':<16}{'nuclei':>8}  {'share':>7}")
    table = imbalance_table(dataset)
    for cls, name, n, share in table:
        mark = "  <- minor" if cls == dataset.scheme.minor_class else ""
        lines.append(f"{cls:>3}  {name:<16}{n:>8}  {share:>7.2%}{mark}")
    lines.append(f"{'':>3}  {'total':<16}{sum(r[2] for r in table):>8}")
    lines.append("")
    if problems:
        lines.append(f"{len(problems)} problem(s):")
        lines.extend(f"  - {p}" for p in problems)
    else:
        lines.append("no problems found")
    return "\n".join(lines)


def inspect_cmd(
    dataset: Path = typer.Argument(..., help="Dataset folder (CoNSeP layout, flat .png+.npy, or PanNuke)."),
    scheme: Optional[str] = typer.Option(
        None, help="Class scheme for raw labels: consep, glysac, pannuke or a YAML file "
        "(default: the folder's dataset.json, else consep)."
    ),
) -> None:
    """Per-class nucleus counts (the imbalance table), image sizes and every validation problem."""
    from diffmix.data.io import scan_dataset

    ds, problems = scan_dataset(dataset, scheme)
    typer.echo(format_inspection(ds, problems))
    if problems:
        raise typer.Exit(1)


def toy_data_cmd(
    out: Path = typer.Argument(..., help="Output dataset folder (must not exist or be empty)."),
    n_images: int = typer.Option(8, min=1, help="Number of tiles."),
    size: int = typer.Option(256, min=64, help="Tile side in pixels."),
    seed: int = typer.Option(0, help="Random seed: same seed, same bytes."),
    rare_fraction: float = typer.Option(
        0.035, min=0.0, max=0.5, help="Share of nuclei in the rare class 1 (miscellaneous)."
    ),
) -> None:
    """Write a procedurally generated H&E-like dataset (CoNSeP layout, merged 4 classes)."""
    from diffmix.data.toy import write_toy_dataset
    from diffmix.runs import check_output_folder

    check_output_folder(out)
    path = write_toy_dataset(out, n_images=n_images, size=size, seed=seed, rare_fraction=rare_fraction)
    typer.echo(f"wrote {n_images} toy tiles to {path}")


def export_geojson_cmd(
    src: Path = typer.Argument(..., help="Dataset folder, or a folder of predicted .mat labels (diffmix seg infer OUT)."),
    out: Path = typer.Argument(..., help="Output folder for NAME.geojson files (must not exist or be empty)."),
    scheme: Optional[str] = typer.Option(
        None, help="Class scheme (consep, glysac, pannuke or YAML); default: the folder's dataset.json, else consep."
    ),
) -> None:
    """One QuPath FeatureCollection per image: a detection polygon per nucleus, class name and colour."""
    from diffmix.data.geojson import export_geojson

    summary = export_geojson(src, out, scheme)
    typer.echo(f"wrote {summary['images']} GeoJSON file(s), {summary['nuclei']} nuclei, to {summary['out']}")


def import_geojson_cmd(
    geojson: Path = typer.Argument(..., help="A .geojson file (as QuPath exports it) or a folder of them."),
    images: Path = typer.Argument(..., help="The image file, or a folder of images paired by name."),
    out: Path = typer.Argument(..., help="Output dataset folder (must not exist or be empty)."),
    scheme: str = typer.Option("consep", help="Class scheme whose class names the classifications use."),
    default_class: Optional[str] = typer.Option(None, help="Class name for unclassified nuclei (default: an error)."),
    include_annotations: bool = typer.Option(
        False, help="Also read QuPath annotations as nuclei (default: detections and cells only)."
    ),
) -> None:
    """Rasterise GeoJSON nuclei into a dataset folder (pixels whose centre is inside a polygon)."""
    from diffmix.data.geojson import import_geojson

    summary = import_geojson(
        geojson, images, out, scheme, default_class=default_class, include_annotations=include_annotations
    )
    note = f"; skipped {summary['skipped']} feature(s) of other object types" if summary["skipped"] else ""
    if summary["empty"]:
        note += f"; {summary['empty']} nucleus polygon(s) covered no pixel centre"
    typer.echo(f"wrote {summary['images']} image(s), {summary['nuclei']} nuclei, to {summary['out']}{note}")


def register(app: typer.Typer) -> None:
    """Attach `inspect`, `toy-data` and the `export` / `import` groups (GeoJSON) to `app`."""
    app.command("inspect")(inspect_cmd)
    app.command("toy-data")(toy_data_cmd)
    add_group(app, "export", "Write diffmix labels in other tools' formats.", {"geojson": export_geojson_cmd})
    add_group(app, "import", "Read other tools' annotations into a dataset folder.", {"geojson": import_geojson_cmd})
