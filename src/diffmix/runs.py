"""Run folders: atomic writes, JSONL logs, safetensors checkpoints with RNG state, resume.

design.md contract: every long command writes one folder with the resolved `config.yaml`, a
JSONL log and safetensors checkpoints; re-running on the same folder resumes and never
silently overwrites. Nothing half-written is left behind: write a temporary name, then rename.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from diffmix.errors import CheckpointError, RunFolderError


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


def save_checkpoint(path: str | Path, state: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> None:
    """Save nested state (model/EMA/optimiser state dicts, RNG states, step) as one safetensors file.

    Tensors go into the safetensors body under dotted keys; the structure and every non-tensor
    value go into its JSON metadata, so an optimiser state dict round-trips exactly.
    """
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
        "diffmix_structure": json.dumps(structure, default=_json_default),
        "diffmix_meta": json.dumps(dict(meta or {}), default=_json_default),
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
            metadata = fh.metadata() or {}
            if "diffmix_structure" not in metadata:
                if only is not None and "model" not in only:
                    return {}, {}
                return {"model": {k: fh.get_tensor(k) for k in fh.keys()}}, {}
            structure = json.loads(metadata["diffmix_structure"])
            meta = json.loads(metadata.get("diffmix_meta", "{}"))
            if only is not None:
                structure = {k: v for k, v in structure.items() if k in set(only)}
            needed = _tensor_keys(structure)
            tensors = {k: fh.get_tensor(k) for k in needed}
    except Exception as exc:  # safetensors raises several unrelated types on bad files
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({exc})") from None
    return _unflatten(structure, tensors), meta


def checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The metadata of a `save_checkpoint` file, read from its header only (no tensors)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return json.loads((fh.metadata() or {}).get("diffmix_meta", "{}"))
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
    """Every RNG the training loops draw from (python, numpy global, torch CPU and CUDA)."""
    state: dict[str, Any] = {
        "python": json.dumps(_py_state_to_json(random.getstate())),
        "numpy": json.dumps(_np_state_to_json(np.random.get_state())),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(_py_state_from_json(json.loads(state["python"])))
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


def prepare_run_folder(out: str | Path, config: Mapping[str, Any], kind: str) -> tuple[Path, bool]:
    """Create `out` with `config.yaml`, or check an existing one holds the same run.

    Returns (folder, resuming). A folder holding a different config (or another kind of run)
    raises RunFolderError instead of being overwritten.
    """
    import yaml

    out = Path(out)
    cfg_path = out / "config.yaml"
    wanted = {"kind": kind, **json.loads(json.dumps(dict(config), default=_json_default))}
    if cfg_path.exists():
        try:
            existing = yaml.safe_load(cfg_path.read_text())
        except yaml.YAMLError as exc:
            raise RunFolderError(f"{cfg_path}: unreadable ({exc})") from None
        if existing != wanted:
            diff = sorted(
                k for k in set(existing or {}) | set(wanted) if (existing or {}).get(k) != wanted.get(k)
            )
            raise RunFolderError(
                f"{out}: holds a different run (config differs in {diff}); "
                "use a new output folder or delete this one"
            )
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
