"""User-facing errors: everything a user can cause ends as a `DiffMixError`.

The CLI prints the message (one line, naming what and where) and exits with code 2, without
a traceback. Programming errors stay ordinary exceptions so they do show a traceback.
"""

from __future__ import annotations


class DiffMixError(Exception):
    """Base class of every error a user can cause (bad path, bad file, bad config, ...)."""


class DataError(DiffMixError):
    """A dataset file or folder is missing, unreadable, or violates the data contract."""


class PairingError(DataError):
    """Images and labels of a dataset folder do not pair up by name."""


class ClassSchemeError(DataError):
    """Unknown class ids, unknown scheme, or a class merge that would be applied twice."""


class ConfigError(DiffMixError):
    """A configuration file, preset or command-line option is invalid."""


class CheckpointError(DiffMixError):
    """A checkpoint is missing, corrupt, or does not fit the model it is loaded into."""


class RunFolderError(DiffMixError):
    """A run folder holds a different run than the one being resumed."""


class OutputError(DiffMixError):
    """An output path cannot be written: a file where a folder must go, a read-only parent."""


def describe_yaml_error(exc: Exception) -> str:
    """PyYAML's error (a `yaml.YAMLError`) in one line: where (line, column, 1-based) and what.

    `str(exc)` spans several lines with a quoted excerpt of the file; a CLI error is one line.
    Here, not in `diffmix.config`, so the YAML readers of data and run folders need no pydantic;
    it reads the error's attributes, so this module needs no yaml.
    """
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}" + (f" ({context})" if context else "")
