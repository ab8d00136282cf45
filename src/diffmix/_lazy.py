"""Lazy package exports (PEP 562): `from diffmix.data import read_dataset` still works, but
importing a package no longer imports its heavy modules (numpy/scipy/torch), so the CLI starts
without them and only the command that runs pays for what it uses."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` resolving each exported name from its module on first use."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    return __getattr__
