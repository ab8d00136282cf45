"""Patches: the fixed sampling grid of spec 5, random crops, and the augmentation groups.

Every patch is a new validated `NucleiSample` whose instance ids are renumbered 1..N in the
patch (spec 5: `remap_label` per patch); nuclei cut by the patch border are kept partially.
"""

from __future__ import annotations

import numpy as np

from diffmix.data.sample import NucleiSample, remap_ids
from diffmix.errors import DataError


def grid_offsets(height: int, width: int, size: int = 256, stride: int = 76) -> list[tuple[int, int]]:
    """Top-left (y, x) offsets of the patch grid, row-major (patch_idx = row * ncols + col).

    spec 5: 256-px patches at stride 76 give offsets {0, 76, ..., 684} on a 1000-px axis, i.e.
    100 patches per image; the last 60 px are never used, as in the official grid.
    """
    if size <= 0 or stride <= 0:
        raise DataError(f"patch size and stride must be positive, got {size} and {stride}")
    if height < size or width < size:
        raise DataError(f"image of {height}x{width} is smaller than the {size}-px patch")
    ys = range(0, height - size + 1, stride)
    xs = range(0, width - size + 1, stride)
    return [(y, x) for y in ys for x in xs]


def crop(sample: NucleiSample, y: int, x: int, size: int, name: str | None = None) -> NucleiSample:
    """The size x size patch at (y, x), ids renumbered 1..N."""
    h, w = sample.shape
    if not (0 <= y <= h - size and 0 <= x <= w - size):
        raise DataError(f"{sample.name}: patch ({y}, {x}) of size {size} leaves the {h}x{w} image")
    sl = (slice(y, y + size), slice(x, x + size))
    return NucleiSample(
        np.ascontiguousarray(sample.image[sl]),
        remap_ids(sample.inst_map[sl]),
        np.ascontiguousarray(sample.type_map[sl]),
        name if name is not None else f"{sample.name}_y{y}_x{x}",
        sample.num_classes,
    )


def patch_name(name: str, index: int) -> str:
    """spec 4: synthetic patches are named `<image basename>_<patch_idx:03d>`."""
    return f"{name}_{index:03d}"


def split_patch_name(name: str) -> tuple[str, int]:
    """(image name, patch index) of a `patch_name`; DataError when `name` is not one."""
    image, _, index = name.rpartition("_")
    if not image or len(index) < 3 or not (index.isascii() and index.isdigit()):
        raise DataError(f"{name!r} is not a grid patch name (<image>_<index, 3+ digits>)")
    return image, int(index)


def grid_patches(sample: NucleiSample, size: int = 256, stride: int = 76) -> list[NucleiSample]:
    """All grid patches of one image, in patch_idx order, named `<name>_<idx:03d>`."""
    h, w = sample.shape
    return [
        crop(sample, y, x, size, patch_name(sample.name, i))
        for i, (y, x) in enumerate(grid_offsets(h, w, size, stride))
    ]


def random_crop(sample: NucleiSample, size: int, rng: np.random.Generator) -> NucleiSample:
    """A uniform random size x size crop. Offsets span [0, H - size] inclusive (spec 7.11:
    the official loader's off-by-one that never draws the last two offsets is fixed)."""
    h, w = sample.shape
    if h < size or w < size:
        raise DataError(f"{sample.name}: image of {h}x{w} is smaller than the {size}-px crop")
    y = int(rng.integers(0, h - size + 1))
    x = int(rng.integers(0, w - size + 1))
    return crop(sample, y, x, size, sample.name)


def _transform(arr: np.ndarray, rot: int, flip_w: bool, flip_h: bool) -> np.ndarray:
    out = np.rot90(arr, rot, axes=(0, 1)) if rot % 4 else arr
    if flip_w:
        out = out[:, ::-1]
    if flip_h:
        out = out[::-1]
    return np.ascontiguousarray(out)


# spec 5: 0 identity, 1..3 rot90 k times in the (H, W) plane, 4 flip along W, 5 flip along H.
_SPEC_AUGMENTATIONS = [(0, False, False), (1, False, False), (2, False, False), (3, False, False),
                       (0, True, False), (0, False, True)]
# The full dihedral group D4: the four rotations, then each rotation followed by a W-flip.
_DIHEDRAL = [(k, False, False) for k in range(4)] + [(k, True, False) for k in range(4)]


def _apply(sample: NucleiSample, rot: int, flip_w: bool, flip_h: bool) -> NucleiSample:
    return NucleiSample(
        _transform(sample.image, rot, flip_w, flip_h),
        _transform(sample.inst_map, rot, flip_w, flip_h),
        _transform(sample.type_map, rot, flip_w, flip_h),
        sample.name,
        sample.num_classes,
    )


def augment(sample: NucleiSample, k: int) -> NucleiSample:
    """The k-th of the 6 SDM training augmentations of spec 5 (k in 0..5)."""
    if not 0 <= k < 6:
        raise ValueError(f"augmentation index must be in 0..5, got {k}")
    return _apply(sample, *_SPEC_AUGMENTATIONS[k])


def dihedral(sample: NucleiSample, k: int) -> NucleiSample:
    """The k-th element of the 8-element dihedral group (k in 0..7): rot90^(k mod 4), then a
    W-flip when k >= 4."""
    if not 0 <= k < 8:
        raise ValueError(f"dihedral index must be in 0..7, got {k}")
    return _apply(sample, *_DIHEDRAL[k])


def dihedral_arrays(k: int, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Apply dihedral element k to several HxW[xC] arrays at once (no validation; hot loops)."""
    if not 0 <= k < 8:
        raise ValueError(f"dihedral index must be in 0..7, got {k}")
    return tuple(_transform(a, *_DIHEDRAL[k]) for a in arrays)
