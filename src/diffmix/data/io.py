"""Dataset folders on disk: read CoNSeP/GLySAC/PanNuke/generic layouts, write diffmix datasets.

Layouts read (`read_dataset`):
- CoNSeP layout: `Images/NAME.{png,tif,tiff,jpg,jpeg}` + `Labels/NAME.{mat,npy}`, paired by NAME
  (GLySAC is the same with `.tif` images). `.mat` labels hold `inst_map` and `type_map` or
  `inst_type`; `.npy` labels are (inst, type) stacked as 2xHxW or HxWx2.
- A flat folder of `NAME.png` + `NAME.npy` (inst, type stacked), or of HoVer-Net training
  patches `NAME.npy` (HxWx5: RGB, inst, type).
- PanNuke: `images.npy` (N,H,W,3) + `masks.npy` (N,H,W,6: per-class instance ids, background)
  anywhere below the folder.
Any folder written by diffmix carries `dataset.json` (class scheme, `merged: true`, provenance):
its labels are already merged and are never merged again.

Label files are found, read and merged-once by `diffmix.data.labels` (shared with the
evaluation); this module pairs them with images, builds samples and writes datasets.
`read_mat_labels` and `read_dataset_json` are re-exported from there.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import scipy.io
import tifffile
from PIL import Image

from diffmix.data.labels import (
    DATASET_JSON,
    LABEL_SUFFIXES,
    already_merged,
    as_label_map,
    files_by_name,
    format_names,
    read_dataset_json,
    read_label_maps,
    read_mat_labels,
    remap_ids,
    values_at,
)
from diffmix.data.sample import NucleiSample, inst_centroids, validation_problems
from diffmix.data.schemes import CONSEP, PANNUKE, ClassScheme, get_scheme
from diffmix.errors import DataError, PairingError
from diffmix.runs import atomic_path, atomic_write_bytes, atomic_write_text

_MAT_HEADER = b"MATLAB 5.0 MAT-file, written by diffmix".ljust(116, b" ")
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
FORMAT_VERSION = 1

__all__ = [
    "Dataset",
    "read_dataset",
    "scan_dataset",
    "write_dataset",
    "write_sample",
    "write_dataset_json",
    "read_dataset_json",
    "read_image",
    "write_image",
    "read_mat_labels",
    "write_mat_labels",
    "write_hovernet_npy",
    "atomic_path",
]


# --------------------------------------------------------------------------- images


#: PIL modes of more than 8 bits per pixel. Converting them to RGB clips every value above 255,
#: which turned a 16-bit PNG into a white image that segmented to no nuclei; they are refused.
_WIDE_PIL_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _refuse_wide_mode(path: Path, mode: str) -> None:
    if mode in _WIDE_PIL_MODES:
        raise DataError(
            f"{path}: {'32-bit' if mode in ('I', 'F') else '16-bit'} greyscale image (mode {mode}); "
            "diffmix reads 8-bit RGB H&E images: convert it to 8 bits per channel first"
        )


def check_image_file(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image file read from its header, or the DataError `read_image` would raise
    for a file it refuses (missing, not an image, more than 8 bits per channel).

    Cheap (no pixels are decoded), so a command can check every input before it creates its
    output folder; a file whose pixel data is truncated is still only found by `read_image`.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                dtype, shape = np.dtype(page.dtype), tuple(page.shape)
            if dtype != np.uint8:
                raise DataError(
                    f"{path}: image has dtype {dtype}; diffmix reads 8-bit RGB H&E images: "
                    "convert it to 8 bits per channel first"
                )
            return int(shape[0]), int(shape[1])

        with Image.open(path) as im:
            _refuse_wide_mode(path, im.mode)
            w, h = im.size
            return int(h), int(w)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: image not found") from None
    except Exception as exc:  # PIL and tifffile raise many types on foreign files
        raise DataError(f"{path}: unreadable image ({exc})") from None


def read_image(path: str | Path) -> np.ndarray:
    """An RGB uint8 HxWx3 array from PNG/JPEG/TIFF.

    Conversion rules: alpha is dropped; 8-bit greyscale is expanded to three equal channels;
    palette, bilevel and other 8-bit colour modes are converted to RGB. Images of more than
    8 bits per channel (16-bit or float PNG/TIFF) are refused with a DataError: their range
    (12-bit data in 16 bits, float in [0, 1] or not) is not knowable from the file, so any
    scaling rule would silently darken or clip some of them; convert them to 8 bits first.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            arr = np.asarray(tifffile.imread(path))
        else:
            with Image.open(path) as im:
                _refuse_wide_mode(path, im.mode)
                if im.mode not in ("RGB", "RGBA", "L", "LA"):
                    im = im.convert("RGB")
                arr = np.asarray(im)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: image not found") from None
    except Exception as exc:  # PIL and tifffile raise many types on corrupt files
        raise DataError(f"{path}: unreadable image ({exc})") from None
    if arr.dtype != np.uint8:
        raise DataError(
            f"{path}: image has dtype {arr.dtype}; diffmix reads 8-bit RGB H&E images: "
            "convert it to 8 bits per channel first"
        )
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (2, 3, 4):
        raise DataError(f"{path}: image has shape {arr.shape}, expected HxWx3 RGB")
    if arr.shape[2] == 2:  # grey + alpha
        arr = np.repeat(arr[:, :, :1], 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3])


def write_image(path: str | Path, image: np.ndarray) -> None:
    """Write an RGB uint8 image atomically (format from the suffix: png, tif, jpg)."""
    path = Path(path)
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"{path}: refusing to write image of shape {image.shape} dtype {image.dtype}")
    with atomic_path(path) as tmp:
        if path.suffix.lower() in (".tif", ".tiff"):
            tifffile.imwrite(tmp, image)
        else:
            Image.fromarray(image).save(tmp, format="PNG" if path.suffix.lower() == ".png" else None)


# --------------------------------------------------------------------------- labels


def write_mat_labels(path: str | Path, inst_map: np.ndarray, type_map: np.ndarray) -> None:
    """Write a CoNSeP `.mat` atomically: `inst_map`, `type_map`, `inst_type` Nx1 and
    `inst_centroid` Nx2 (x, y), both in instance-id order (row k = k-th smallest id).

    `inst_type` is stored Nx1 because a 1-D array would be saved as 1xN, which hover_net's
    `[:, 0]` misreads (hovernet_notes 6). Ids are kept as they are, so write-then-read is exact.
    """
    inst_map = np.asarray(inst_map, dtype=np.int32)
    type_map = np.asarray(type_map, dtype=np.int32)
    cen = inst_centroids(inst_map)
    ids = np.array(sorted(cen), dtype=np.int64)
    types = np.zeros(ids.size, dtype=np.int32)
    if ids.size:
        fg = inst_map > 0
        types[np.searchsorted(ids, inst_map[fg])] = type_map[fg]
    centroid = np.array([cen[int(i)] for i in ids], dtype=np.float64).reshape(-1, 2)
    buffer = io.BytesIO()
    scipy.io.savemat(
        buffer,
        {"inst_map": inst_map, "type_map": type_map, "inst_type": types.reshape(-1, 1), "inst_centroid": centroid},
        do_compression=True,
    )
    data = bytearray(buffer.getvalue())
    # The MAT-5 header's 116 text bytes carry the write time; a fixed text makes the same
    # labels give the same bytes (design.md: same inputs + same seed = same bytes out).
    data[:116] = _MAT_HEADER
    atomic_write_bytes(path, bytes(data))


def write_hovernet_npy(path: str | Path, sample: NucleiSample) -> None:
    """A HoVer-Net training patch: HxWx5 int32 [R, G, B, inst, type], written atomically."""
    arr = np.concatenate(
        [sample.image.astype(np.int32), remap_ids(sample.inst_map)[..., None], sample.type_map[..., None]],
        axis=2,
    )
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, arr)


# --------------------------------------------------------------------------- datasets


@dataclass
class Dataset:
    """Validated samples with their (merged) class scheme and where they came from."""

    samples: list[NucleiSample]
    scheme: ClassScheme
    root: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[NucleiSample]:
        return iter(self.samples)

    def __getitem__(self, index: int) -> NucleiSample:
        return self.samples[index]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.samples]

    def by_name(self, name: str) -> NucleiSample:
        for s in self.samples:
            if s.name == name:
                return s
        raise DataError(f"{self.root or 'dataset'}: no sample named {name!r}")

    def class_counts(self) -> dict[int, int]:
        """Nuclei per merged class over the whole dataset (every class of the scheme listed)."""
        counts = {c: 0 for c in self.scheme.class_ids}
        for s in self.samples:
            for cls, n in s.class_counts().items():
                counts[cls] = counts.get(cls, 0) + n
        return counts


def _resolve_scheme(
    root: Path, meta: dict[str, Any] | None, scheme: str | Path | ClassScheme | None, default: ClassScheme | None
) -> tuple[ClassScheme, bool]:
    """(scheme whose merged classes the samples will carry, whether raw labels must be merged).

    Merged folders keep their stored scheme (`already_merged`); raw ones merge with the requested
    scheme, else the one their dataset.json names, else the layout's default.
    """
    requested = get_scheme(scheme) if scheme is not None else None
    stored = already_merged(root, meta, requested)
    if stored is not None:
        return stored.merged(), False
    if meta is not None and requested is None:
        requested = ClassScheme.from_json(meta["scheme"], where=str(root / DATASET_JSON))
    if requested is None:
        requested = default if default is not None else CONSEP
    return requested, True


def _pair_files(root: Path) -> tuple[list[tuple[str, Path | None, Path]], str]:
    """(name, image path or None, label path) triples sorted by name, and the layout found."""
    images_dir, labels_dir = root / "Images", root / "Labels"
    if images_dir.is_dir() != labels_dir.is_dir():
        have, missing = ("Images", "Labels") if images_dir.is_dir() else ("Labels", "Images")
        raise PairingError(f"{root}: has {have}/ but no {missing}/ folder")
    layout = "consep" if images_dir.is_dir() else "flat"
    image_folder, label_folder = (images_dir, labels_dir) if layout == "consep" else (root, root)
    image_groups = files_by_name(image_folder, IMAGE_SUFFIXES)
    label_groups = files_by_name(label_folder, LABEL_SUFFIXES)
    dupes = [sorted(n for n, paths in groups.items() if len(paths) > 1) for groups in (image_groups, label_groups)]
    if dupes[0] or dupes[1]:
        raise PairingError(f"{root}: several files share a name: {format_names(dupes[0] + dupes[1])}")
    images = {n: paths[0] for n, paths in image_groups.items()}
    labels = {n: paths[0] for n, paths in label_groups.items()}
    if layout == "flat" and not images and labels and all(p.suffix == ".npy" for p in labels.values()):
        # HoVer-Net HxWx5 patches carry their image (.mat labels never do: they are unpaired)
        return [(n, None, labels[n]) for n in sorted(labels)], "hovernet-npy"
    lonely_images = sorted(set(images) - set(labels))
    lonely_labels = sorted(set(labels) - set(images))
    if lonely_images or lonely_labels:
        parts = []
        if lonely_images:
            parts.append(f"images without labels: {format_names(lonely_images)}")
        if lonely_labels:
            parts.append(f"labels without images: {format_names(lonely_labels)}")
        raise PairingError(f"{root}: " + "; ".join(parts))
    if not images:
        raise DataError(f"{root}: no images found (expected Images/ + Labels/, or image + .npy pairs)")
    return [(n, images[n], labels[n]) for n in sorted(images)], layout


def _find_pannuke(root: Path) -> tuple[Path, Path] | None:
    if (root / "images.npy").is_file() and (root / "masks.npy").is_file():
        return root / "images.npy", root / "masks.npy"
    images = sorted(root.rglob("images.npy"))
    masks = sorted(root.rglob("masks.npy"))
    if len(images) == 1 and len(masks) == 1:
        return images[0], masks[0]
    if images or masks:
        raise DataError(f"{root}: expected exactly one PanNuke images.npy and masks.npy, found {len(images)} and {len(masks)}")
    return None


def pannuke_masks_to_maps(mask: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(inst_map, type_map) from one PanNuke mask (H,W,6): channels 0..4 hold per-class
    instance ids (class = channel + 1), channel 5 is background. Instances are numbered
    class by class, each id in id order, so ids that repeat across channels stay distinct."""
    if mask.ndim != 3 or mask.shape[2] != 6:
        raise DataError(f"{where}: PanNuke mask has shape {mask.shape}, expected HxWx6")
    h, w = mask.shape[:2]
    inst = np.zeros((h, w), dtype=np.int32)
    types = np.zeros((h, w), dtype=np.int32)
    next_id = 1
    for ch in range(5):
        layer = as_label_map(mask[:, :, ch], f"masks channel {ch}", where)
        ids = np.unique(layer)
        ids = ids[ids > 0]
        if ids.size == 0:
            continue
        fg = layer > 0
        inst[fg] = values_at(ids.astype(np.int64), np.arange(next_id, next_id + ids.size, dtype=np.int32), layer[fg])
        types[fg] = ch + 1
        next_id += ids.size
    return remap_ids(inst), types


def _read_pannuke(root: Path, images_path: Path, masks_path: Path, scheme: ClassScheme) -> Dataset:
    try:
        images = np.load(images_path, mmap_mode="r")
        masks = np.load(masks_path, mmap_mode="r")
    except Exception as exc:
        raise DataError(f"{images_path.parent}: unreadable PanNuke arrays ({exc})") from None
    if images.ndim != 4 or images.shape[3] != 3 or masks.shape[:3] != images.shape[:3]:
        raise DataError(
            f"{root}: PanNuke images {images.shape} and masks {masks.shape} do not agree (N,H,W,3 / N,H,W,6)"
        )
    samples = []
    for i in range(images.shape[0]):
        where = f"{images_path}[{i}]"
        img = np.asarray(images[i])
        if img.min() < 0 or img.max() > 255:
            raise DataError(f"{where}: pixel values outside 0..255")
        inst, types = pannuke_masks_to_maps(np.asarray(masks[i]), where)
        samples.append(
            NucleiSample(np.ascontiguousarray(img.astype(np.uint8)), inst, types, f"pannuke_{i:05d}", scheme.num_classes)
        )
    return Dataset(samples, scheme, root, {"layout": "pannuke"})


def _load_pair(
    name: str, image_path: Path | None, label_path: Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, inst_map, raw type_map) of one pair; errors name the offending file."""
    inst, types, embedded = read_label_maps(label_path)
    image = read_image(image_path) if image_path is not None else embedded
    if image is None:
        raise DataError(f"{label_path}: holds labels only and no image is beside it "
                        "(a folder without images takes HoVer-Net HxWx5 .npy patches)")
    if image.shape[:2] != inst.shape:
        raise DataError(
            f"{label_path}: label size {inst.shape} does not match image "
            f"{image_path or label_path} size {image.shape[:2]}"
        )
    return image, inst, types


def scan_dataset(
    path: str | Path, scheme: str | Path | ClassScheme | None = None
) -> tuple[Dataset, list[str]]:
    """Read what can be read and collect every problem instead of stopping at the first.

    Returns the valid samples and one message per problem (file and what is wrong); used by
    `diffmix inspect`. Folder-level problems (no such folder, unpaired files) still raise.
    """
    return _read(path, scheme, strict=False)


def read_dataset(path: str | Path, scheme: str | Path | ClassScheme | None = None) -> Dataset:
    """Read and validate a dataset folder; the first problem raises a DataError naming the file.

    `scheme` (name, YAML path or ClassScheme) says how raw class ids merge. It is ignored for
    folders diffmix wrote (already merged, `dataset.json`) unless it names a different scheme,
    which raises: a merge is applied exactly once. Raw folders default to `consep`, HoVer-Net
    HxWx5 patches to merged CoNSeP classes (they are merged when extracted), PanNuke arrays
    to `pannuke`.
    """
    dataset, _ = _read(path, scheme, strict=True)
    return dataset


def _read(path: str | Path, scheme: str | Path | ClassScheme | None, strict: bool) -> tuple[Dataset, list[str]]:
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    meta = read_dataset_json(root)
    pannuke = _find_pannuke(root) if meta is None and not (root / "Images").is_dir() else None
    if pannuke is not None:
        resolved, _ = _resolve_scheme(root, None, scheme, PANNUKE)
        return _read_pannuke(root, *pannuke, resolved), []
    pairs, layout = _pair_files(root)
    # HoVer-Net training patches carry merged types already (extract_patches.py merges).
    default = CONSEP.merged() if layout == "hovernet-npy" else CONSEP
    resolved, must_merge = _resolve_scheme(root, meta, scheme, default)
    merged_scheme = resolved.merged() if must_merge else resolved
    samples: list[NucleiSample] = []
    problems: list[str] = []
    for name, image_path, label_path in pairs:
        try:
            image, inst, raw_types = _load_pair(name, image_path, label_path)
            types = resolved.merge_type_map(raw_types, str(label_path)) if must_merge else raw_types
            issues = validation_problems(image, inst, types, merged_scheme.num_classes)
            if issues:
                raise DataError(f"{label_path}: {'; '.join(issues)}")
            samples.append(NucleiSample(image, inst, types, name, merged_scheme.num_classes))
        except DataError as exc:
            if strict:
                raise
            problems.append(str(exc))
    info = dict(meta or {})
    info.setdefault("layout", layout)
    return Dataset(samples, merged_scheme, root, info), problems


def write_dataset_json(
    root: str | Path, scheme: ClassScheme, provenance: Mapping[str, Any] | None = None
) -> None:
    """Write `dataset.json`: the merged class scheme, `merged: true`, and provenance."""
    meta = {
        "format": "diffmix-dataset",
        "version": FORMAT_VERSION,
        "merged": True,
        "scheme": scheme.merged().to_json(),
        "provenance": dict(provenance or {}),
    }
    atomic_write_text(Path(root) / DATASET_JSON, json.dumps(meta, indent=2, default=str) + "\n")


def write_sample(root: str | Path, sample: NucleiSample, image_suffix: str = ".png") -> None:
    """Write one sample into a CoNSeP-layout folder (image, then labels; each file atomic)."""
    root = Path(root)
    write_image(root / "Images" / f"{sample.name}{image_suffix}", sample.image)
    write_mat_labels(root / "Labels" / f"{sample.name}.mat", sample.inst_map, sample.type_map)


def write_dataset(
    path: str | Path,
    samples: Iterable[NucleiSample],
    scheme: ClassScheme,
    provenance: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
    image_suffix: str = ".png",
) -> Path:
    """Write a whole dataset folder atomically: built under a temporary name, then renamed.

    An existing non-empty folder is an error unless `overwrite` (then it is replaced only after
    the new one is complete). Labels must already be merged to `scheme`'s classes.
    """
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise DataError(f"{out}: exists and is not empty; choose a new output folder")
    samples = list(samples)
    names = [s.name for s in samples]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"{out}: several samples share a name: {format_names(dupes)}")
    bad = [n for n in names if not n or "/" in n or "\\" in n or n.startswith(".")]
    if bad:
        raise DataError(f"{out}: sample names unusable as file names: {format_names(bad)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for sample in samples:
            problems = validation_problems(sample.image, sample.inst_map, sample.type_map, scheme.num_classes)
            if problems:
                raise DataError(f"{sample.name}: {'; '.join(problems)}")
            write_sample(tmp, sample, image_suffix)
        (tmp / "Images").mkdir(exist_ok=True)
        (tmp / "Labels").mkdir(exist_ok=True)
        write_dataset_json(tmp, scheme, provenance)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
