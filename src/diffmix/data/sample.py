"""`NucleiSample`: one H&E image with its nuclei instance and class maps, validated.

The data contract of design.md: `image` uint8 HxWx3 RGB, `inst_map` int32 HxW (0 =
background), `type_map` int32 HxW with merged class ids (0 = background, 1..K); every
instance has exactly one class. Violations raise `DataError` naming the sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffmix.data.labels import as_label_map, compact_ids, remap_ids, values_at
from diffmix.errors import DataError

# Label-map helpers live in `diffmix.data.labels` (the label layer under this contract); they
# stay importable from here, where they were first written and are still imported from.
__all__ = [
    "NucleiSample",
    "as_label_map",
    "compact_ids",
    "inst_centroids",
    "instance_classes",
    "remap_ids",
    "validation_problems",
    "values_at",
]


def instance_classes(inst_map: np.ndarray, type_map: np.ndarray) -> dict[int, set[int]]:
    """The set of class ids found under each instance id (one set per id present)."""
    fg = inst_map > 0
    ids = inst_map[fg].astype(np.int64)
    classes = type_map[fg].astype(np.int64)
    if ids.size == 0:
        return {}
    # One 1-D unique over a combined key is several times faster than unique(axis=1).
    base = int(classes.max()) + 1 if classes.size and classes.max() >= 0 else 1
    keys = np.unique(ids * base + classes)
    out: dict[int, set[int]] = {}
    for inst_id, cls in zip((keys // base).tolist(), (keys % base).tolist()):
        out.setdefault(inst_id, set()).add(cls)
    return out


def validation_problems(
    image: np.ndarray | None,
    inst_map: np.ndarray,
    type_map: np.ndarray,
    num_classes: int | None = None,
) -> list[str]:
    """Every contract violation of one sample, as short messages (empty list = valid).

    Used both to fail fast on construction and by `diffmix inspect`, which reports all of
    them instead of stopping at the first.
    """
    problems: list[str] = []
    if image is not None:
        if image.ndim != 3 or image.shape[2] != 3:
            problems.append(f"image has shape {image.shape}, expected HxWx3 RGB")
        elif image.dtype != np.uint8:
            problems.append(f"image has dtype {image.dtype}, expected uint8")
    if inst_map.ndim != 2:
        problems.append(f"inst_map has shape {inst_map.shape}, expected HxW")
        return problems
    if type_map.shape != inst_map.shape:
        problems.append(f"type_map shape {type_map.shape} != inst_map shape {inst_map.shape}")
        return problems
    if image is not None and image.ndim == 3 and image.shape[:2] != inst_map.shape:
        problems.append(f"image size {image.shape[:2]} != label size {inst_map.shape}")
    if inst_map.size and inst_map.min() < 0:
        problems.append(f"inst_map has negative ids (min {inst_map.min()})")
    if type_map.size and type_map.min() < 0:
        problems.append(f"type_map has negative class ids (min {type_map.min()})")
    if problems:
        return problems
    if num_classes is not None and type_map.size and type_map.max() > num_classes:
        bad = sorted(int(c) for c in np.unique(type_map) if c > num_classes)
        problems.append(f"class ids {bad} outside the scheme's 1..{num_classes}")
    if np.any((type_map > 0) & (inst_map == 0)):
        problems.append("type_map has classes on background pixels (inst_map == 0)")
    classes = instance_classes(inst_map, type_map)
    mixed = sorted(i for i, c in classes.items() if len(c) > 1)
    if mixed:
        problems.append(f"instances {mixed[:10]} have more than one class")
    untyped = sorted(i for i, c in classes.items() if c == {0})
    if untyped:
        problems.append(f"instances {untyped[:10]} have class 0 (background)")
    return problems


@dataclass(frozen=True, eq=False)
class NucleiSample:
    """An image with nuclei labels; construction validates the data contract.

    `num_classes` (K) enables the class-range check; leave it None for unknown schemes.
    Arrays are stored as given after dtype normalisation; treat them as read-only.
    """

    image: np.ndarray
    inst_map: np.ndarray
    type_map: np.ndarray
    name: str
    num_classes: int | None = None

    def __post_init__(self) -> None:
        where = self.name or "<unnamed sample>"
        image = np.asarray(self.image)
        if image.dtype != np.uint8:
            raise DataError(f"{where}: image has dtype {image.dtype}, expected uint8")
        inst = as_label_map(self.inst_map, "inst_map", where)
        types = as_label_map(self.type_map, "type_map", where)
        problems = validation_problems(image, inst, types, self.num_classes)
        if problems:
            raise DataError(f"{where}: {'; '.join(problems)}")
        object.__setattr__(self, "image", image)
        object.__setattr__(self, "inst_map", inst)
        object.__setattr__(self, "type_map", types)

    @property
    def shape(self) -> tuple[int, int]:
        return self.inst_map.shape  # type: ignore[return-value]

    def inst_ids(self) -> np.ndarray:
        """Sorted instance ids present (background excluded)."""
        ids = np.unique(self.inst_map)
        return ids[ids > 0]

    def inst_types(self) -> dict[int, int]:
        """Class of every instance, keyed by instance id (in id order)."""
        return {i: next(iter(c)) for i, c in sorted(instance_classes(self.inst_map, self.type_map).items())}

    def inst_centroids(self) -> dict[int, tuple[float, float]]:
        """Centroid (x, y) of every instance: the mean pixel coordinate, in id order."""
        return inst_centroids(self.inst_map)

    def class_counts(self) -> dict[int, int]:
        """Number of nuclei per class id present."""
        counts: dict[int, int] = {}
        for cls in self.inst_types().values():
            counts[cls] = counts.get(cls, 0) + 1
        return counts

    def replace(self, **changes) -> "NucleiSample":
        """A new validated sample with some fields replaced."""
        fields = dict(
            image=self.image,
            inst_map=self.inst_map,
            type_map=self.type_map,
            name=self.name,
            num_classes=self.num_classes,
        )
        fields.update(changes)
        return NucleiSample(**fields)


def inst_centroids(inst_map: np.ndarray) -> dict[int, tuple[float, float]]:
    """Centroid (x, y) = mean column, mean row of each instance's pixels, in id order."""
    ys, xs = np.nonzero(inst_map)
    ids = inst_map[ys, xs].astype(np.int64)
    if ids.size == 0:
        return {}
    uniq, inv, counts = np.unique(ids, return_inverse=True, return_counts=True)
    sx = np.bincount(inv, weights=xs)
    sy = np.bincount(inv, weights=ys)
    return {int(i): (float(sx[k] / counts[k]), float(sy[k] / counts[k])) for k, i in enumerate(uniq)}
