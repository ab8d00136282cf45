"""The one helper the area CLI modules share: a command group, built the same way everywhere."""

from __future__ import annotations

from typing import Callable, Mapping

import typer


def add_group(app: typer.Typer, name: str, help: str, commands: Mapping[str, Callable[..., None]]) -> None:
    """Attach `diffmix NAME COMMAND ...` to `app`: a sub-app holding `commands` ({name: command
    function}, in `--help` order) that prints its help when called without a command."""
    group = typer.Typer(help=help, no_args_is_help=True)
    for command_name, function in commands.items():
        group.command(command_name)(function)
    app.add_typer(group, name=name)
