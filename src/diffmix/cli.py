"""The `diffmix` command line: one thin command per pipeline stage.

Each area package (`data`, `metrics`, `maps`, `sdm`, `seg`, `synth`, `pipeline`) owns a
`cli.py` whose commands are top-level functions and whose `register(app)` only attaches them;
this module assembles them and is the one place where a user's mistake becomes a message:
`main` turns a `DiffMixError`, a usage error of the argument parser and an error of the
environment (a path that cannot be written, a file where a folder is needed) into one line
`error: <what>: <why>` on stderr and exit code 2. Anything else is a bug and keeps its
traceback. The CLI modules import no numpy, scipy or torch at their top (their commands import
the library inside their bodies), so `diffmix --help` starts in the time of typer alone.
"""

from __future__ import annotations

import errno
import sys
from typing import NoReturn, Optional

import typer

from diffmix import __version__
from diffmix.data import cli as data_cli
from diffmix.errors import DiffMixError
from diffmix.maps import cli as maps_cli
from diffmix.metrics import cli as metrics_cli
from diffmix.pipeline import cli as pipeline_cli
from diffmix.sdm import cli as sdm_cli
from diffmix.seg import cli as seg_cli
from diffmix.synth import cli as synth_cli

app = typer.Typer(
    name="diffmix",
    help="DiffMix: re-synthesise H&E patches under edited nuclei label maps to rebalance "
    "rare nucleus classes; train and evaluate the downstream segmenter.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# The order fixes `diffmix --help`'s: commands first, then groups, each in the order attached.
for _area in (data_cli, metrics_cli, maps_cli, sdm_cli, seg_cli, synth_cli, pipeline_cli):
    _area.register(app)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"diffmix {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """DiffMix: re-synthesise H&E patches under edited nuclei label maps to rebalance rare
    nucleus classes; train and evaluate the downstream segmenter."""


def _parser_exception_types() -> tuple[type[BaseException], type[BaseException]]:
    """(ClickException, UsageError) of the click that typer runs on.

    typer >= 0.29 vendors click as `typer._click` and no longer installs `click`; older typer
    uses the real one. Both are reachable through the public `typer.BadParameter`, so the
    classes are taken from its MRO instead of importing either package by name.
    """
    mro = typer.BadParameter.__mro__
    click_exc = next(c for c in mro if c.__name__ == "ClickException")
    usage = next(c for c in mro if c.__name__ == "UsageError")
    return click_exc, usage


def _one_line(text: str) -> str:
    """A message on one line: library messages are, but wrapped exceptions may not be."""
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _fail(what: str, why: str) -> NoReturn:
    typer.echo(f"error: {_one_line(what)}: {_one_line(why)}" if what else f"error: {_one_line(why)}", err=True)
    sys.exit(2)


def _os_error_where(exc: OSError) -> str:
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    return " -> ".join(names)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app; user and environment errors end in one line.

    Exit codes: 0 success, 1 a command's own negative answer (e.g. `inspect` found problems),
    2 a user or environment error (`error: <what>: <why>` on stderr, no traceback), 130 ^C.
    """
    click_exc, usage_error = _parser_exception_types()
    try:
        rc = app(args=argv, prog_name="diffmix", standalone_mode=False)
    except DiffMixError as exc:
        _fail("", str(exc))
    except SystemExit:
        raise
    except KeyboardInterrupt:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except click_exc as exc:  # the parser's errors arrive here with standalone_mode=False
        if type(exc).__name__ == "NoArgsIsHelpError":  # `diffmix sdm` alone: the help text
            exc.show()  # type: ignore[attr-defined]
            sys.exit(2)
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else "diffmix"
        hint = f" (see '{where} --help')" if isinstance(exc, usage_error) else ""
        _fail(where, exc.format_message() + hint)  # type: ignore[attr-defined]
    except OSError as exc:
        if exc.errno == errno.EPIPE:  # `diffmix inspect ... | head`: the reader left
            sys.exit(1)
        if exc.errno is None:
            raise  # not an error of the file system: a bug, keep the traceback
        _fail(_os_error_where(exc), exc.strerror or str(exc))
    if isinstance(rc, int) and rc:
        sys.exit(rc)
