"""Commands `diffmix export geojson` and `diffmix import geojson` (QuPath detections)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

export_app = typer.Typer(help="Write diffmix labels in other tools' formats.", no_args_is_help=True)
import_app = typer.Typer(help="Read other tools' annotations into a dataset folder.", no_args_is_help=True)


@export_app.command("geojson")
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


@import_app.command("geojson")
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
    """Add the `export` and `import` command groups to the main `diffmix` app."""
    app.add_typer(export_app, name="export")
    app.add_typer(import_app, name="import")
