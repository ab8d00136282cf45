"""Run folders: resume by `config.yaml` identity, atomic writes, output-path checks, JSONL logs.

design.md contract: every long command writes one folder with the resolved `config.yaml`, a
JSONL log and safetensors checkpoints; re-running on the same folder resumes and never
silently overwrites. Nothing half-written is left behind: write a temporary name, then rename;
the temporaries a killed process leaves are deleted when its run folder is resumed.

Torch-free, so the commands that never touch a network (maps, gradmix, evaluate, toy data)
use it without importing torch; the checkpoint files of a run folder are `diffmix.checkpoints`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import yaml

from diffmix.errors import DataError, OutputError, RunFolderError, describe_yaml_error

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temporary name keeps the suffix so writers that infer the format from it still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


# `atomic_path`'s temporaries, mkstemp(prefix=".STEM.", suffix=".tmpSUFFIX"): hidden names that
# end in ".tmp" or ".tmp.EXT". diffmix never gives a file such a name, and only folders holding
# a diffmix config.yaml are cleaned.
_TEMPORARY = re.compile(r"^\..+\.tmp(\.[A-Za-z0-9]+)?$")


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporaries of `atomic_path` that a killed writer left in `folder` (recursively).

    Only safe while no process writes into `folder`: call it when a run is resumed, before its
    work starts (rank 0 alone under torchrun). Returns the deleted paths.
    """
    removed = []
    for root, _, files in os.walk(folder):
        for name in files:
            if _TEMPORARY.match(name):
                path = Path(root) / name
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or ".")


def check_output_folder(path: str | Path) -> Path:
    """Fail early (OutputError) when the folder `path` could not be created or written.

    Checks what a run would only meet at its first write, after minutes of work: `path` is a
    file; a parent on the way is a file; the deepest existing folder is not writable.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: exists and is a file, not a folder; choose another output folder")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise OutputError(f"{path}: cannot be created, {base} is a file")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write in {base} (permission denied or read-only)")
    return path


def check_output_file(path: str | Path) -> Path:
    """Fail early (OutputError) when the file `path` could not be written (see `check_output_folder`)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name")
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise OutputError(f"{path}: cannot be written, {base} is a file")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{path}: not writable (permission denied or read-only)")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write in {base} (permission denied or read-only)")
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n")


def read_json(path: str | Path, what: str) -> Any | None:
    """A JSON file's content, or None when the file does not exist; a DataError naming the file
    and `what` it should hold when it cannot be read or parsed."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable {what} ({exc})") from None


def json_default(obj: Any) -> Any:
    """`json.dumps` default of every diffmix JSON file: numpy scalars and arrays, paths."""
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class JsonlLog:
    """Append-only JSON-lines log; `truncate_after(step)` drops records a resumed run will redo."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: Mapping[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(dict(record), default=json_default) + "\n")
            fh.flush()

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a kill: everything after it is unreliable
        return out

    def truncate_after(self, step: int, key: str = "step") -> None:
        """Keep only records with `record[key] <= step` (and records without the key)."""
        kept = [r for r in self.records() if r.get(key, -1) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r, default=json_default) + "\n" for r in kept))


def prepare_run_folder(
    out: str | Path, config: Mapping[str, Any], kind: str, *, clean: bool = True
) -> tuple[Path, bool]:
    """Create `out` with `config.yaml`, or check an existing one holds the same run.

    Returns (folder, resuming). A folder holding a different config (or another kind of run)
    raises RunFolderError instead of being overwritten. Call it once every input and option
    is validated, so a mistake never leaves a folder that the corrected command would then
    refuse as "a different run". When resuming with `clean`, the temporaries of a killed
    write are deleted (`remove_temporaries`); under torchrun only rank 0 may clean.
    """
    out = check_output_folder(out)
    cfg_path = out / "config.yaml"
    wanted = {"kind": kind, **json.loads(json.dumps(dict(config), default=json_default))}
    if cfg_path.exists():
        try:
            existing = yaml.safe_load(cfg_path.read_text())
        except yaml.YAMLError as exc:
            raise RunFolderError(f"{cfg_path}: unreadable ({describe_yaml_error(exc)})") from None
        if existing != wanted:
            diff = sorted(
                k for k in set(existing or {}) | set(wanted) if (existing or {}).get(k) != wanted.get(k)
            )
            raise RunFolderError(
                f"{out}: holds a different run (config differs in {diff}); "
                "use a new output folder or delete this one"
            )
        if clean:
            remove_temporaries(out)
        return out, True
    if out.exists() and any(out.iterdir()):
        raise RunFolderError(f"{out}: exists, is not empty and holds no diffmix config.yaml")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg_path, yaml.safe_dump(wanted, sort_keys=False))
    return out, False
