"""Run folders: atomic writes, JSONL logs, safetensors checkpoints with RNG state, resume.

design.md contract: every long command writes one folder with the resolved `config.yaml`, a
JSONL log and safetensors checkpoints; re-running on the same folder resumes and never
silently overwrites. Nothing half-written is left behind: write a temporary name, then rename;
the temporaries a killed process leaves are deleted when its run folder is resumed.

Every file of a run folder except `log.jsonl` (which records wall-clock timings) is a function
of the run's inputs: an interrupted-then-resumed run writes the same bytes as an uninterrupted
one. So a checkpoint holds only RNG state that is itself such a function (see `rng_state`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np

from diffmix.errors import CheckpointError, OutputError, RunFolderError

if TYPE_CHECKING:  # torch is imported where it is used: `diffmix --help` must not pay for it
    import torch


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
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
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
            fh.write(json.dumps(dict(record), default=_json_default) + "\n")
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
        atomic_write_text(self.path, "".join(json.dumps(r, default=_json_default) + "\n" for r in kept))


def _flatten(prefix: str, obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace tensors in a nested structure by placeholders, collecting them in `tensors`."""
    import torch

    if isinstance(obj, torch.Tensor):
        key = prefix
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, Mapping):
        return {str(k): _flatten(f"{prefix}.{k}", v, tensors) for k, v in obj.items()} | (
            {"__intkeys__": True} if obj and all(isinstance(k, int) for k in obj) else {}
        )
    if isinstance(obj, (list, tuple)):
        return [_flatten(f"{prefix}.{i}", v, tensors) for i, v in enumerate(obj)]
    return obj


def _unflatten(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        intkeys = obj.get("__intkeys__", False)
        return {
            (int(k) if intkeys else k): _unflatten(v, tensors)
            for k, v in obj.items()
            if k != "__intkeys__"
        }
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


#: The safetensors metadata key of a `save_checkpoint` file: JSON {"structure": ..., "meta": ...}.
#: Files of earlier versions hold the two under "diffmix_structure" and "diffmix_meta".
_METADATA_KEY = "diffmix"


def _read_metadata(metadata: Mapping[str, str]) -> tuple[Any, dict[str, Any]] | None:
    """(structure, meta) of a `save_checkpoint` file's metadata; None for a plain state dict."""
    if _METADATA_KEY in metadata:
        both = json.loads(metadata[_METADATA_KEY])
        return both["structure"], dict(both.get("meta") or {})
    if "diffmix_structure" in metadata:
        return json.loads(metadata["diffmix_structure"]), json.loads(metadata.get("diffmix_meta", "{}"))
    return None


def save_checkpoint(path: str | Path, state: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> None:
    """Save nested state (model/EMA/optimiser state dicts, RNG states, step) as one safetensors file.

    Tensors go into the safetensors body under dotted keys; the structure and every non-tensor
    value go into its JSON metadata, so an optimiser state dict round-trips exactly.

    The same state and meta give the same bytes: the metadata is one key (`_METADATA_KEY`)
    because safetensors keeps metadata in a hash map whose order changes from process to
    process, so two keys made two runs with identical tensors write different files.
    """
    import torch

    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    structure = _flatten("state", dict(state), tensors)
    # safetensors refuses shared storage; clone tensors that alias each other.
    seen: dict[int, str] = {}
    for key, tensor in list(tensors.items()):
        ptr = tensor.untyped_storage().data_ptr() if tensor.numel() else -id(tensor)
        if ptr in seen:
            tensors[key] = tensor.clone()
        seen[ptr] = key
    metadata = {
        _METADATA_KEY: json.dumps(
            {"structure": structure, "meta": dict(meta or {})}, default=_json_default, sort_keys=False
        )
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_checkpoint(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    only: Sequence[str] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Inverse of `save_checkpoint`: (nested state, meta). Corrupt files raise CheckpointError.

    `only` names top-level entries to read (e.g. ["ema"]): the other tensors are never loaded,
    which matters for paper-size checkpoints whose optimiser state is several GB. A plain
    safetensors state dict (imported weights) comes back as {"model": tensors}.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as fh:
            parsed = _read_metadata(fh.metadata() or {})
            if parsed is None:
                if only is not None and "model" not in only:
                    return {}, {}
                return {"model": {k: fh.get_tensor(k) for k in fh.keys()}}, {}
            structure, meta = parsed
            if only is not None:
                structure = {k: v for k, v in structure.items() if k in set(only)}
            needed = _tensor_keys(structure)
            tensors = {k: fh.get_tensor(k) for k in needed}
    except Exception as exc:  # safetensors raises several unrelated types on bad files
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({exc})") from None
    return _unflatten(structure, tensors), meta


def state_dict_mismatch(expected: Mapping[str, Any], got: Mapping[str, Any], listed: int = 3) -> str | None:
    """A one-line summary of how state dict `got` differs from `expected`, or None if it fits.

    `load_state_dict`'s own error lists every mismatched tensor (134 lines for weights of
    another model size); this names how many are missing, unexpected or mis-shaped and the
    first few of each, with both shapes.
    """
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    wrong = [
        f"{k} {tuple(got[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in got and tuple(got[k].shape) != tuple(expected[k].shape)
    ]
    parts = []
    if wrong:
        parts.append(f"{len(wrong)} tensor(s) of another shape (checkpoint vs model: {', '.join(wrong[:listed])})")
    if missing:
        parts.append(f"{len(missing)} missing ({', '.join(missing[:listed])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:listed])})")
    return "; ".join(parts) or None


def load_state_strict(module: torch.nn.Module, state: Any, where: str, what: str = "this model") -> None:
    """`module.load_state_dict(state)`, or a one-line CheckpointError naming `where` (see
    `state_dict_mismatch`) when the tensors do not fit: weights of another model size or kind."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{where}: holds no state dict for {what}")
    problem = state_dict_mismatch(module.state_dict(), state)
    if problem:
        raise CheckpointError(f"{where}: weights do not fit {what}: {problem}")
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as exc:  # e.g. dtypes; names and shapes fit
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise CheckpointError(f"{where}: weights do not fit {what}: {first[:300]}") from None


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file (a checkpoint's identity in run configs and provenance), read in
    4 MiB chunks; CheckpointError when it does not exist."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while block := fh.read(chunk):
                digest.update(block)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    return digest.hexdigest()


def checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The metadata of a `save_checkpoint` file, read from its header only (no tensors)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as fh:
            parsed = _read_metadata(fh.metadata() or {})
            return parsed[1] if parsed is not None else {}
    except Exception as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({exc})") from None


def _tensor_keys(structure: Any) -> list[str]:
    """Every tensor key a flattened structure refers to."""
    if isinstance(structure, dict):
        if set(structure) == {"__tensor__"}:
            return [structure["__tensor__"]]
        return [k for v in structure.values() for k in _tensor_keys(v)]
    if isinstance(structure, list):
        return [k for v in structure for k in _tensor_keys(v)]
    return []


def rng_state() -> dict[str, Any]:
    """The global RNGs the training loops draw from: torch CPU, and CUDA when present.

    The loops seed torch from the run's seed, so these states are the same at a given step of
    an interrupted and of an uninterrupted run. Python's `random` and numpy's global RNG are
    left out on purpose: diffmix never draws from them (every draw takes a seed or Generator,
    design.md), and the interpreter seeds them from the OS, so storing them made two runs with
    the same seed write different checkpoint bytes.
    """
    import torch

    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore `rng_state()`; checkpoints of earlier versions also hold python and numpy states."""
    import torch

    if "python" in state:
        random.setstate(_py_state_from_json(json.loads(state["python"])))
    if "numpy" in state:
        np.random.set_state(_np_state_from_json(json.loads(state["numpy"])))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py_state_to_json(st: tuple) -> list:
    return [st[0], list(st[1]), st[2]]


def _py_state_from_json(obj: list) -> tuple:
    return (obj[0], tuple(obj[1]), obj[2])


def _np_state_to_json(st: tuple) -> list:
    return [st[0], st[1].tolist(), int(st[2]), int(st[3]), float(st[4])]


def _np_state_from_json(obj: list) -> tuple:
    return (obj[0], np.asarray(obj[1], dtype=np.uint32), obj[2], obj[3], obj[4])


def generator_state(gen: np.random.Generator) -> str:
    """A numpy Generator's state as a JSON string (for checkpoint metadata)."""
    return json.dumps(gen.bit_generator.state, default=_json_default)


def set_generator_state(gen: np.random.Generator, state: str) -> None:
    gen.bit_generator.state = json.loads(state)


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
    import yaml

    out = check_output_folder(out)
    cfg_path = out / "config.yaml"
    wanted = {"kind": kind, **json.loads(json.dumps(dict(config), default=_json_default))}
    if cfg_path.exists():
        try:
            existing = yaml.safe_load(cfg_path.read_text())
        except yaml.YAMLError as exc:
            from diffmix.config import describe_yaml_error

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


def latest_checkpoint(folder: str | Path, pattern: str = "ckpt_*.safetensors") -> Path | None:
    """The checkpoint with the highest step number in `folder` (names end in _<step>)."""
    best: tuple[int, Path] | None = None
    for p in Path(folder).glob(pattern):
        try:
            step = int(p.stem.rsplit("_", 1)[1])
        except (IndexError, ValueError):
            continue
        if best is None or step > best[0]:
            best = (step, p)
    return best[1] if best else None
