"""The `diffmix` command line: one thin command per pipeline stage.

Each area package (`data`, `metrics`, `maps`, `sdm`, `seg`, `pipeline`) owns a `cli.py`
with a `register(app)` function; this module only assembles them and turns a
`DiffMixError` into a one-line message and exit code 2.
"""

from __future__ import annotations

import sys

import typer

from diffmix.errors import DiffMixError

app = typer.Typer(
    name="diffmix",
    help="DiffMix: re-synthesise H&E patches under edited nuclei label maps to rebalance "
    "rare nucleus classes; train and evaluate the downstream segmenter.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register_all() -> None:
    from diffmix.data import cli as data_cli
    from diffmix.data import geojson_cli
    from diffmix.maps import cli as maps_cli
    from diffmix.metrics import cli as metrics_cli
    from diffmix.pipeline import cli as pipeline_cli
    from diffmix.pipeline import commands as experiment_cli
    from diffmix.sdm import cli as sdm_cli
    from diffmix.seg import cli as seg_cli

    for module in (data_cli, geojson_cli, metrics_cli, maps_cli, sdm_cli, seg_cli, pipeline_cli, experiment_cli):
        module.register(app)


_register_all()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app, print user errors without a traceback."""
    try:
        rc = app(args=argv, standalone_mode=False)
    except DiffMixError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except SystemExit:
        raise
    except Exception as exc:  # click usage errors arrive here with standalone_mode=False
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(2)
        if isinstance(exc, click.exceptions.Abort):
            typer.echo("aborted", err=True)
            sys.exit(130)
        raise
    if isinstance(rc, int) and rc:
        sys.exit(rc)
