"""Labels as stored: label files found by name, read, merged exactly once, ids renumbered.

The one label layer under the dataset reader (`diffmix.data.io`) and the evaluation
(`diffmix.metrics.evaluate`), so that both read a `.mat` or `.npy` the same way, decide the same
way whether raw classes still need merging, and say the same thing when a file is wrong.

- Finding: `files_by_name` lists a folder's files by name. Two naming rules exist on purpose:
  dataset folders pair `Images/NAME.png` with `Labels/NAME.mat` by stem (`stem_name`, the name
  before the last dot); evaluation pairs predictions with ground truth by the name before the
  first dot (`official_name`), as hover_net's `compute_stats.py` does (hovernet_notes 5-6), so
  `img.mat` and `img.npy` or `img.x.mat` are the same image there. `label_files` is that rule for
  a folder of label files (or a dataset root, through its `Labels/`).
- Reading: `read_mat_labels` (CoNSeP `.mat`: `inst_map` plus `type_map` and/or `inst_type` Nx1,
  `inst_centroid` Nx2 in (x, y)); `read_npy_labels` (the `.npy` layouts of `NPY_LAYOUTS`, each
  reader naming those it accepts); `read_label_maps` (one dataset label file as two maps).
- Merging once (design.md): a folder whose `dataset.json` says `merged: true` holds merged ids
  and is never merged again; `already_merged` returns that scheme and refuses a request to merge
  with another one.
- Ids: `as_label_map` (integer-valued maps to int32), `as_class_ids`, `compact_ids` /
  `remap_ids` (ids renumbered 1..N in order, hover_net's `remap_label`), `values_at`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import scipy.io

from diffmix.data.schemes import ClassScheme
from diffmix.errors import ClassSchemeError, DataError, PairingError
from diffmix.runs import read_json

LABEL_SUFFIXES = (".mat", ".npy")
DATASET_JSON = "dataset.json"

__all__ = [
    "DATASET_JSON",
    "DATASET_NPY",
    "LABEL_SUFFIXES",
    "NPY_LAYOUTS",
    "PREDICTION_NPY",
    "already_merged",
    "as_class_ids",
    "as_label_map",
    "compact_ids",
    "files_by_name",
    "find_dataset_json",
    "format_names",
    "label_files",
    "labels_to_maps",
    "official_name",
    "read_dataset_json",
    "read_label_maps",
    "read_mat_labels",
    "read_npy_labels",
    "remap_ids",
    "stem_name",
    "type_map_from_inst_type",
    "values_at",
]


# --------------------------------------------------------------------------- messages


def format_names(names: Sequence[str], limit: int = 20) -> str:
    """`a, b, c` for a message, cut after `limit` names with the total: a folder of thousands of
    unpaired files must not print them all."""
    shown = ", ".join(names[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "")


# --------------------------------------------------------------------------- finding files


def stem_name(path: Path) -> str:
    """A dataset folder's sample name: the file name before its last dot (`a.b.mat` -> `a.b`)."""
    return path.stem


def official_name(path: Path) -> str:
    """hover_net compute_stats' image name: the file name before its first dot (`a.b.mat` -> `a`)."""
    return path.name.split(".")[0]


def files_by_name(folder: Path, suffixes: tuple[str, ...], *, official: bool = False) -> dict[str, list[Path]]:
    """The files of `folder` ending in one of `suffixes` (any case), grouped by name, each group
    in sorted path order (a group of two or more is a name clash for the caller to report).

    official False (dataset folders): named by `stem_name`; dot-files (macOS `._NAME` forks)
    are skipped. official True (evaluation): named by `official_name`, regular files only, as
    compute_stats.py globs them.
    """
    if official:
        found = [f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in suffixes]
        name = official_name
    else:
        found = [p for p in folder.iterdir() if p.suffix.lower() in suffixes and not p.name.startswith(".")]
        name = stem_name
    groups: dict[str, list[Path]] = {}
    for path in sorted(found):
        groups.setdefault(name(path), []).append(path)
    return groups


def label_files(folder: str | Path) -> dict[str, Path]:
    """Label files of a folder keyed by the name before the first dot (official matching).

    A diffmix dataset folder (with `Labels/`) is read from its `Labels/`. Two files with
    the same name (`a.mat` and `a.npy`, or `a.x.mat`) are an error.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    groups = files_by_name(folder, LABEL_SUFFIXES, official=True)
    if not groups and (folder / "Labels").is_dir():
        return label_files(folder / "Labels")
    clashes = [paths[:2] for paths in groups.values() if len(paths) > 1]
    if clashes:  # the clash met first in sorted order
        first, second = min(clashes, key=lambda pair: pair[1])
        raise PairingError(f"{folder}: {first.name} and {second.name} both give image {official_name(first)!r}")
    if not groups:
        raise DataError(f"{folder}: no .mat or .npy label files")
    return {name: paths[0] for name, paths in groups.items()}


# --------------------------------------------------------------------------- merging once


def read_dataset_json(root: str | Path) -> dict[str, Any] | None:
    """The `dataset.json` of `root` (class scheme, `merged`, provenance), or None when absent."""
    path = Path(root) / DATASET_JSON
    meta = read_json(path, "dataset description")
    if meta is None:
        return None
    if not isinstance(meta, dict) or "scheme" not in meta:
        raise DataError(f"{path}: not a diffmix dataset description (no 'scheme')")
    return meta


def find_dataset_json(folder: Path) -> tuple[dict[str, Any] | None, Path]:
    """(dataset.json's content or None, the folder holding it) for a folder of label files: its
    own, or for a `Labels/` folder its dataset root's (evaluation may be pointed at either)."""
    for root in (folder, folder.parent) if folder.name == "Labels" else (folder,):
        meta = read_dataset_json(root)
        if meta is not None:
            return meta, root
    return None, folder


def already_merged(root: Path, meta: Mapping[str, Any] | None, requested: ClassScheme | None) -> ClassScheme | None:
    """The scheme `root`'s labels were merged with, when its dataset.json says they are merged
    (stored as written, see `ClassScheme.merged`); None when they are raw.

    design.md: a class merge is applied exactly once, ever. So merged labels must not be merged
    again, and a request to merge them with a scheme of another name is refused (ClassSchemeError
    naming `root`): their ids mean the stored scheme's merged classes.
    """
    if meta is None or not meta.get("merged", False):
        return None
    stored = ClassScheme.from_json(meta["scheme"], where=str(root / DATASET_JSON))
    if requested is not None and requested.name != stored.name:
        raise ClassSchemeError(
            f"{root}: labels are already merged with scheme {stored.name!r}; "
            f"merging them again with {requested.name!r} would apply a class merge twice"
        )
    return stored


# --------------------------------------------------------------------------- ids


def as_label_map(arr: np.ndarray, what: str, where: str) -> np.ndarray:
    """Cast an integer-valued label map to int32, refusing floats with fractions and overflow."""
    arr = np.asarray(arr)
    if arr.dtype == bool:
        return arr.astype(np.int32)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise DataError(f"{where}: {what} has non-integer values (dtype {arr.dtype})")
    elif arr.dtype.kind not in "iu":
        raise DataError(f"{where}: {what} has dtype {arr.dtype}, expected integers")
    if arr.size and (arr.min() < 0):
        raise DataError(f"{where}: {what} has negative ids (min {arr.min()})")
    if arr.size and arr.max() > np.iinfo(np.int32).max:
        raise DataError(f"{where}: {what} has ids above 2**31-1 (max {arr.max()})")
    return arr.astype(np.int32, copy=False)


def as_class_ids(arr: np.ndarray, where: str, what: str) -> np.ndarray:
    """Raw class ids (a type map or an `inst_type` list) as int64, refusing fractions, non-numbers
    and negatives: what `ClassScheme.merge_type_map` can look up."""
    arr = np.asarray(arr)
    if arr.dtype.kind == "f" and (not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr))):
        raise DataError(f"{where}: {what} has non-integer class ids")
    if arr.dtype.kind not in "iufb":
        raise DataError(f"{where}: {what} has dtype {arr.dtype}, expected integers")
    if arr.size and arr.min() < 0:
        raise DataError(f"{where}: {what} has negative class ids")
    return arr.astype(np.int64)


def compact_ids(inst_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, dense): the instance ids present and the map renumbered to 1..N.

    inst_map: non-negative integer HxW (any id up to 2**31-1). Returns `ids` int64 (N,),
    ascending, 0 excluded, and `dense` int32 of inst_map's shape where ids[k] became k + 1
    (0 stays 0). Per-instance tables indexed by `dense` have N + 1 entries: tables indexed by
    the raw id have max-id + 1 entries, 16 GiB for one nucleus labelled 2**31-1. A bincount
    is used when the largest id is small next to the map (the common case), a sort otherwise.
    """
    inst = np.asarray(inst_map)
    if inst.size == 0 or int(inst.max()) <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(inst.shape, dtype=np.int32)
    top = int(inst.max())
    if top <= 4 * inst.size + 4096:  # a table of `top` entries costs no more than the map
        flat = inst.ravel().astype(np.int64, copy=False)
        present = np.flatnonzero(np.bincount(flat, minlength=top + 1)[1:]) + 1
        lut = np.zeros(top + 1, dtype=np.int32)
        lut[present] = np.arange(1, present.size + 1, dtype=np.int32)
        return present.astype(np.int64), lut[flat].reshape(inst.shape)
    uniq, inverse = np.unique(inst, return_inverse=True)
    dense = inverse.reshape(inst.shape).astype(np.int32)
    if uniq[0] == 0:
        return uniq[1:].astype(np.int64), dense
    return uniq.astype(np.int64), dense + 1


def values_at(ids: np.ndarray, values: np.ndarray, query: np.ndarray, default: int = 0) -> np.ndarray:
    """`values[k]` where `query == ids[k]`, else `default`: a lookup keyed by sorted `ids`.

    Replaces `lut = zeros(max_id + 1); lut[ids] = values; lut[query]`, whose size is the
    largest id rather than the number of instances (see `compact_ids`).
    """
    ids = np.asarray(ids)
    values = np.asarray(values)
    query = np.asarray(query)
    if ids.size == 0:
        return np.full(query.shape, default, dtype=values.dtype)
    pos = np.clip(np.searchsorted(ids, query), 0, ids.size - 1)
    return np.where(ids[pos] == query, values[pos], default).astype(values.dtype, copy=False)


def remap_ids(inst_map: np.ndarray) -> np.ndarray:
    """Renumber instance ids to 1..N keeping their order (hover_net `remap_label`), int32."""
    inst_map = np.asarray(inst_map)
    ids = np.unique(inst_map)
    ids = ids[ids > 0]
    if ids.size == 0:
        return np.zeros(inst_map.shape, dtype=np.int32)
    if ids[0] == 1 and ids[-1] == ids.size:
        return inst_map.astype(np.int32, copy=False)
    lut_keys = np.concatenate([[0], ids])
    pos = np.searchsorted(lut_keys, inst_map)
    return pos.astype(np.int32)


# --------------------------------------------------------------------------- reading files


def read_mat_labels(path: str | Path) -> dict[str, np.ndarray]:
    """The label arrays of a CoNSeP-style `.mat`: the keys present among `inst_map`, `type_map`,
    `inst_type` (flattened to (N,)) and `inst_centroid` ((N, 2), x then y).

    `inst_map` is required; a corrupt or foreign file raises DataError naming it.
    """
    path = Path(path)
    try:
        mat = scipy.io.loadmat(path)
    except FileNotFoundError:
        raise DataError(f"{path}: label file not found") from None
    except Exception as exc:  # scipy raises ValueError, MatReadError, TypeError ... on bad files
        raise DataError(f"{path}: corrupt or unreadable .mat file ({exc})") from None
    if "inst_map" not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(f"{path}: no 'inst_map' in .mat (keys: {keys})")
    out: dict[str, np.ndarray] = {"inst_map": np.asarray(mat["inst_map"])}
    if "type_map" in mat:
        out["type_map"] = np.asarray(mat["type_map"])
    if "inst_type" in mat:
        out["inst_type"] = np.asarray(mat["inst_type"]).reshape(-1)
    if "inst_centroid" in mat:
        try:
            cen = np.asarray(mat["inst_centroid"], dtype=np.float64)
            cen = cen.reshape(-1, 2) if cen.size else np.zeros((0, 2))
        except (TypeError, ValueError):
            raise DataError(f"{path}: inst_centroid must be an Nx2 array of numbers (x, y)") from None
        bad = np.flatnonzero(~np.isfinite(cen).all(axis=1))
        if bad.size:  # found here, where the file is known, not later as "image 1" of a list
            raise DataError(
                f"{path}: inst_centroid has {bad.size} row(s) with NaN or infinite values "
                f"(0-based rows {bad[:5].tolist()})"
            )
        out["inst_centroid"] = cen
    return out


#: `.npy` label layouts by name, with the words messages use for them. They are recognised in
#: this order, so a shape that fits two (2xHx5, 2xHx2) reads as the first its reader accepts.
NPY_LAYOUTS = {
    "patch": "HxWx5 patches",  # HoVer-Net training patch: R, G, B, inst, type
    "stacked": "2xHxW",  # inst, type
    "channels": "HxWx2 (inst, type)",
    "inst": "HxW",  # instance map only: no class information
}
#: What a dataset folder's `.npy` may be (each sample needs classes; patches carry their image).
DATASET_NPY = ("stacked", "channels", "patch")
#: What `diffmix evaluate` reads from `.npy` (a prediction may lack classes).
PREDICTION_NPY = ("inst", "channels")


def _fits(shape: tuple[int, ...], layout: str) -> bool:
    if layout == "inst":
        return len(shape) == 2
    if len(shape) != 3:
        return False
    return {"patch": shape[2] == 5, "stacked": shape[0] == 2, "channels": shape[2] == 2}[layout]


def read_npy_labels(
    path: str | Path, layouts: Sequence[str]
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(inst, type or None, image or None) from a `.npy` in one of `layouts` (`NPY_LAYOUTS` names).

    Arrays are returned as stored (callers cast them with their own checks); the image of an
    HxWx5 patch is uint8 after checking its range. A shape outside `layouts` raises DataError
    listing them.
    """
    path = Path(path)
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:  # OSError, ValueError, EOFError (empty file) ...
        raise DataError(f"{path}: unreadable .npy file ({exc})") from None
    where = str(path)
    layout = next((name for name in NPY_LAYOUTS if name in layouts and _fits(arr.shape, name)), None)
    if layout == "patch":
        image = arr[:, :, :3]
        if image.min() < 0 or image.max() > 255:
            raise DataError(f"{where}: RGB channels of a HxWx5 patch are outside 0..255")
        return arr[:, :, 3], arr[:, :, 4], np.ascontiguousarray(image.astype(np.uint8))
    if layout == "stacked":
        return arr[0], arr[1], None
    if layout == "channels":
        return arr[:, :, 0], arr[:, :, 1], None
    if layout == "inst":
        return arr, None, None
    words = [NPY_LAYOUTS[name] for name in layouts]
    raise DataError(f"{where}: .npy labels must be {', '.join(words[:-1])} or {words[-1]}, got {arr.shape}")



def type_map_from_inst_type(inst_map: np.ndarray, inst_type: np.ndarray, where: str) -> np.ndarray:
    """Paint per-instance classes into a type map.

    `inst_type` lists one class per instance in id order. With contiguous ids that is the
    CoNSeP convention `inst_type[id - 1]`; with gaps (crops of larger maps) row k belongs to
    the k-th smallest id present. Longer tables indexed by id (ids that vanished) also work.
    """
    inst_type = np.asarray(inst_type).reshape(-1).astype(np.int64)
    ids = np.unique(inst_map)
    ids = ids[ids > 0]
    if ids.size == inst_type.size:
        # keyed by the sorted ids, not a table over 0..max id (ids may reach 2**31-1)
        return values_at(ids, inst_type, inst_map.astype(np.int64), default=0).astype(np.int32)
    elif ids.size == 0 or ids.max() <= inst_type.size:
        lut = np.concatenate([[0], inst_type])
    else:
        raise DataError(
            f"{where}: inst_map has {ids.size} instances (max id {int(ids.max())}) "
            f"but inst_type has {inst_type.size} entries"
        )
    return lut[inst_map.astype(np.int64)].astype(np.int32)


def labels_to_maps(labels: Mapping[str, np.ndarray], where: str) -> tuple[np.ndarray, np.ndarray]:
    """(inst_map, type_map) int32 from a label dict: `type_map` if present, else `inst_type`."""
    inst = as_label_map(labels["inst_map"], "inst_map", where)
    if inst.ndim != 2:
        raise DataError(f"{where}: inst_map has shape {inst.shape}, expected HxW")
    if "type_map" in labels:
        types = as_label_map(labels["type_map"], "type_map", where)
    elif "inst_type" in labels:
        types = type_map_from_inst_type(inst, as_label_map(labels["inst_type"], "inst_type", where), where)
    else:
        raise DataError(f"{where}: labels have neither 'type_map' nor 'inst_type'")
    return inst, types


def read_label_maps(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(inst_map int32, raw type_map int32, embedded image or None) of one dataset label file:
    a `.mat` (`labels_to_maps`) or a `.npy` in a `DATASET_NPY` layout (a HoVer-Net patch brings
    its uint8 image). Classes are as stored: merging is the caller's (`already_merged`)."""
    path = Path(path)
    if path.suffix.lower() == ".mat":
        inst, types = labels_to_maps(read_mat_labels(path), str(path))
        return inst, types, None
    inst_raw, type_raw, image = read_npy_labels(path, DATASET_NPY)
    assert type_raw is not None  # every DATASET_NPY layout holds classes
    return as_label_map(inst_raw, "inst_map", str(path)), as_label_map(type_raw, "type_map", str(path)), image
