"""The conditioning label map of every planned patch: balancing, enlarging, or the image's own.

Balancing maps (spec 6a) are made once over the full-size images and cut on the patch grid;
enlarging maps (spec 6b) are made per grid patch of the original labels; "own" keeps each
image's labels (a re-synthesis). Also the nuclei-per-class counts the manifest records.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Sequence

import numpy as np

from diffmix.data.io import Dataset
from diffmix.data.patches import crop
from diffmix.data.sample import NucleiSample, compact_ids, remap_ids
from diffmix.data.schemes import ClassScheme
from diffmix.errors import ConfigError, DataError
from diffmix.maps.balance import BalanceParams, balance_dataset
from diffmix.maps.enlarge import enlarge_patch
from diffmix.seeds import enlarge_rng
from diffmix.synth.jobs import OWN, PatchJob


def check_map_kwargs(kind: str, kwargs: Mapping[str, Any], scheme: ClassScheme) -> None:
    """ConfigError for extra arguments of a map kind that the map function would refuse.

    `kwargs` are `BalanceParams` fields (kind "balance") or arguments of `enlarge_patch`
    ("enlarge"), used only when the first patch needs its maps, after the run folder exists.
    Here they are checked first: balancing parameters by running the plan once on an empty 8x8
    label map of the scheme (the minor class must be one of its classes), enlarging ones by
    name against the function's signature and by value through one call on an empty map.
    """
    empty = np.zeros((8, 8), dtype=np.int32)
    if kind == "balance":
        try:
            params = BalanceParams.from_json(kwargs).resolved(scheme.minor_class, 0)
            sample = NucleiSample(np.zeros((8, 8, 3), dtype=np.uint8), empty, empty, "check", scheme.num_classes)
            balance_dataset([sample], params)
        except ConfigError as exc:
            raise ConfigError(f"balance map arguments {dict(kwargs)}: {exc}") from None
        return
    fixed = {"inst_map", "type_map", "rng"}
    allowed = [n for n, p in inspect.signature(enlarge_patch).parameters.items() if n not in fixed and p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ConfigError(f"{kind} map arguments: unknown name(s) {unknown}; allowed: {allowed}")
    try:
        enlarge_patch(empty, empty, rng=np.random.default_rng(0), **dict(kwargs))
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ConfigError(f"{kind} map arguments {dict(kwargs)}: {exc}") from None


def balance_maps(dataset: Dataset, seed: int, kwargs: Mapping[str, Any]) -> tuple[list[NucleiSample], dict]:
    """spec 6a: balancing maps over the whole dataset of full-size images, and their report.

    `kwargs`: `BalanceParams` fields; the minor class defaults to the scheme's and the seed
    to the run's (a `seed` among them wins).
    """
    params = BalanceParams.from_json(kwargs).resolved(dataset.scheme.minor_class, seed)
    samples, report = balance_dataset(dataset.samples, params)
    return samples, report.to_json()


class LabelMaps:
    """The custom label patch of every job, cut lazily from the full-size maps.

    Built on a run's first missing patch (a finished folder needs no maps); balancing maps are
    computed at construction, enlarging maps patch by patch. `reports` holds what the map
    functions report, per kind, for the manifest.
    """

    def __init__(
        self,
        dataset: Dataset,
        kinds: Sequence[str],
        seed: int,
        balance_kwargs: Mapping[str, Any],
        enlarge_kwargs: Mapping[str, Any],
    ) -> None:
        self.dataset = dataset
        self.reports: dict[str, dict] = {}
        self.seed = seed
        self.enlarge_kwargs = dict(enlarge_kwargs)
        self.balanced: list[NucleiSample] | None = None
        if "balance" in kinds:
            self.balanced, self.reports["balance"] = balance_maps(dataset, seed, balance_kwargs)
        if "enlarge" in kinds:
            self.reports["enlarge"] = {"params": {"seed": seed, **self.enlarge_kwargs}}

    def original(self, job: PatchJob) -> NucleiSample:
        """The original image and labels at the job's place (y0 comes from its image, spec 4)."""
        src = self.dataset.samples[job.image_index]
        if job.whole:
            return NucleiSample(src.image, src.inst_map, src.type_map, job.name, src.num_classes)
        y, x = job.offset
        return crop(src, y, x, job.size[0], job.name)

    def custom(self, job: PatchJob) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
        """(inst_map, type_map) int32 of the job's conditioning map, ids remapped 1..N (a
        whole image keeps its ids), and a few numbers about the edit for the manifest."""
        y, x = job.offset
        sl = (slice(y, y + job.size[0]), slice(x, x + job.size[1]))
        info: dict[str, int] = {}
        if job.kind == "balance":
            assert self.balanced is not None
            full = self.balanced[job.image_index]
            inst, types = full.inst_map[sl], full.type_map[sl]
        elif job.kind == OWN:
            src = self.dataset.samples[job.image_index]
            inst, types = src.inst_map[sl], src.type_map[sl]
        else:
            # spec 6b per grid patch of the original labels, on `enlarge_dataset`'s stream,
            # made here patch by patch so the whole grid's maps are never held at once.
            src = self.dataset.samples[job.image_index]
            rng = enlarge_rng(self.seed, job.image_index, job.patch_index)
            inst, types, edit = enlarge_patch(src.inst_map[sl], src.type_map[sl], rng=rng, **self.enlarge_kwargs)
            shifts = edit.get("shifts", {})
            info = {
                "frozen": len(edit.get("frozen", [])),
                "movable": len(shifts),
                "moved": sum(1 for d in shifts.values() if tuple(d) != (0, 0)),
                "kept_in_place": len(edit.get("kept_in_place", [])),
            }
        if inst.shape != job.size:
            raise DataError(f"{job.name}: {job.kind} label map has shape {inst.shape}, expected {job.size}")
        types = np.ascontiguousarray(types, dtype=np.int32)
        if job.whole:  # nothing was cut: the labels are the image's, ids and all
            return np.ascontiguousarray(inst, dtype=np.int32), types, info
        # spec 4: the saved labels are the conditioning maps with ids remapped per patch
        return remap_ids(inst), types, info


def class_counts(inst_map: np.ndarray, type_map: np.ndarray, class_ids: Sequence[int]) -> dict[int, int]:
    """Nuclei per class of one label map (every class listed), over the instances present."""
    counts = {int(c): 0 for c in class_ids}
    ids, dense = compact_ids(inst_map)
    if not ids.size:
        return counts
    classes = np.zeros(ids.size + 1, dtype=np.int64)
    classes[dense.ravel()] = type_map.ravel()
    for cls, n in zip(*np.unique(classes[1:], return_counts=True)):
        counts[int(cls)] = counts.get(int(cls), 0) + int(n)
    return counts

