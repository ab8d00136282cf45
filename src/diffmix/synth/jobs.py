"""The plan of a synthesis run: which patches it makes, their names, and each one's noise seed.

A plan is a pure function of the dataset and a few settings (map kinds, grid, seed,
`max_patches`), fixed before anything is computed, so every process of a run and every re-run
of it agrees on the patches, their order and their seeds (spec 4-5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from diffmix.data.io import Dataset
from diffmix.data.patches import grid_offsets, patch_name
from diffmix.errors import ConfigError, DataError
from diffmix.seeds import patch_seed

MapsChoice = Literal["balance", "enlarge", "both", "own"]
MAP_KINDS: tuple[str, ...] = ("balance", "enlarge")  # what "both" means
OWN = "own"  # each image's own labels: re-synthesis of the original (`diffmix sdm sample`)


@dataclass(frozen=True)
class PatchJob:
    """One synthetic patch to make: where its y0 and labels come from and its noise seed."""

    name: str
    source: str  # source image name
    image_index: int  # index of the source image in the dataset
    patch_index: int  # row-major grid index (spec 5: patch_idx = row * ncols + col)
    offset: tuple[int, int]  # top-left (y, x) in the source image
    kind: str  # "balance", "enlarge" or "own"
    seed: int  # seed of this patch's torch.Generator (initial noise, and eta > 0 step noise)
    size: tuple[int, int]  # (height, width): the grid's patch, or a whole image
    whole: bool = False  # a whole image (patch=None): nothing is cut, labels keep their ids


def maps_list(maps: str) -> list[str]:
    """The map kinds of a `maps` choice ("both" is balance and enlarge); ConfigError otherwise."""
    if maps == "both":
        return list(MAP_KINDS)
    if maps in MAP_KINDS or maps == OWN:
        return [maps]
    raise ConfigError(f"--maps must be one of balance, enlarge, both, own; got {maps!r}")


def job_name(source: str, index: int | None, kind: str, both: bool) -> str:
    """The file name (without extension) of one synthetic patch."""
    # spec 4: `<image basename>_<patch_idx:03d>` (a whole image keeps its name); with both map
    # kinds in one folder the kind is appended so the B and E patch of one position do not collide.
    base = source if index is None else patch_name(source, index)
    return f"{base}_{kind}" if both else base


def spread(n: int, k: int | None) -> list[int]:
    """k indices spread evenly over range(n) (all of them when k is None or >= n)."""
    if k is not None and k < 1:
        # 0 used to plan nothing and exit successfully having made nothing
        raise ConfigError(f"max_patches must be >= 1 (or unset for the whole grid), got {k}")
    if k is None or k >= n:
        return list(range(n))
    return [(i * n) // k for i in range(k)]


def plan_jobs(
    dataset: Dataset,
    maps: MapsChoice,
    *,
    patch: int | None = 256,
    stride: int = 76,
    seed: int = 0,
    max_patches: int | None = None,
) -> list[PatchJob]:
    """Every patch of a synthesis run, in a fixed order: map kind, image, grid index.

    `patch=None` makes one job per whole image (patch index 0, named after the image).
    `max_patches` keeps that many patches per map kind, spread evenly over the plan (so a
    small run still draws from every image), instead of the whole grid.
    """
    kinds = maps_list(maps)
    jobs: list[PatchJob] = []
    for kind in kinds:
        per_kind: list[PatchJob] = []
        for i, sample in enumerate(dataset.samples):
            h, w = sample.shape
            cells = [(0, 0)] if patch is None else grid_offsets(h, w, patch, stride)
            for k, (y, x) in enumerate(cells):
                per_kind.append(
                    PatchJob(
                        name=job_name(sample.name, None if patch is None else k, kind, len(kinds) > 1),
                        source=sample.name,
                        image_index=i,
                        patch_index=k,
                        offset=(y, x),
                        kind=kind,
                        seed=patch_seed(seed, sample.name, k, kind),
                        size=(h, w) if patch is None else (patch, patch),
                        whole=patch is None,
                    )
                )
        jobs.extend(per_kind[j] for j in spread(len(per_kind), max_patches))
    if not jobs:
        sizes = sorted({s.shape for s in dataset.samples})
        raise DataError(
            f"{dataset.root or 'dataset'}: no {patch}-px grid patch fits in its images (sizes {sizes[:5]}); "
            "use a smaller patch size"
        )
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"synthetic patch names collide ({dupes[:5]}); rename the source images")
    return jobs
