"""Commands of the `sdm` area."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this area's commands to the main `diffmix` app."""
