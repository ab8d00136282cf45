"""Checkpoint files: safetensors holding nested state (model, EMA, optimiser, RNG) with
deterministic bytes, partial and strict loads, header-only metadata, and identity by SHA-256.

Apart from `diffmix.runs` (run folders, atomic writes, logs) because it needs torch: the
torch-free commands write run folders and JSON without paying for it.

Every file of a run folder except its JSONL logs is a function of the run's inputs, so a
checkpoint holds only RNG state that is itself such a function (see `rng_state`), and the same
state gives the same bytes (see `save_checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffmix.errors import CheckpointError
from diffmix.runs import atomic_path, json_default


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
            {"structure": structure, "meta": dict(meta or {})}, default=json_default, sort_keys=False
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
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore `rng_state()`; checkpoints of earlier versions also hold python and numpy states."""
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
