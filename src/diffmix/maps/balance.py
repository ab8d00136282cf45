"""Balancing maps (spec 6a): GradMix label mixing that turns major nuclei into minor-class ones.

Over a whole dataset of full-size images, about 80 % of the eligible non-minor nuclei of each
image are replaced, smallest first, by the shape of a smaller minor-class nucleus (from the
same image first, then from the other images) pasted at the target's centroid. DiffMix uses
only these labels (paper 2.3); `diffmix.maps.gradmix` replays the same swaps on the pixels.

Faithful to the official `grad_mix.py` by default (same selection, ordering, first-fit source
choice, paste geometry), with spec 7 defects fixed:

- pastes are clipped at the image border instead of crashing on negative slices (spec 7.7);
- images are paired by name by the dataset reader, every draw is seeded (spec 7.6, 7.8);
- classes are merged once by the reader; this module only ever sees merged labels (spec 7.2);
- instance tables (bboxes, areas, centroids, source masks) are computed once per image, never
  re-read per target (spec 7.7, `pick_minor_index`).

Deliberate deviations, both only in corner cases the official code gets wrong:

- Clearing a target removes only the pixels that still carry its id. The official code clears
  the target's *original* mask, which also erases parts of nuclei pasted for earlier targets.
- A swap whose paste would cover every remaining pixel of another nucleus (or whose clipped
  paste is empty) is skipped and the source stays in the pool. Without this, a nucleus could
  silently vanish and the minor-class count would not rise by exactly the number of swaps.

Beyond the paper, `target_distribution` limits the number of swaps so that the dataset's
minor-class proportion approaches a requested value (see `balance_dataset`).

The parameters of a plan are one `BalanceParams` (`diffmix.maps.params`, re-exported here),
shared with GradMix, the CLI and the experiment.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
from scipy import ndimage as ndi

from diffmix.data.sample import NucleiSample, compact_ids, values_at
from diffmix.errors import ConfigError, DataError
from diffmix.maps.params import BalanceParams
from diffmix.seeds import balance_rngs

__all__ = [
    "BalanceParams",
    "BalanceReport",
    "InstanceTable",
    "Swap",
    "allocate_quota",
    "apply_swaps",
    "balance_dataset",
    "balance_plan",
    "eligible_mask",
    "instance_table",
    "paste_window",
    "swapped_type_map",
]

# spec 6a step 5.1: scipy's default structuring element, the 3x3 cross (4-connected).
CROSS = ndi.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class InstanceTable:
    """Per-instance geometry of one label map, computed in one pass over the image.

    Index k describes instance id `ids[k]`. `boxes[k]` = (r0, r1, c0, c1), half-open. Centroids
    are the mean pixel coordinate (the `inst_centroid` of CoNSeP .mat files), in pixels.
    """

    ids: np.ndarray  # int64 (n,)
    boxes: np.ndarray  # int64 (n, 4)
    areas: np.ndarray  # int64 (n,)
    cy: np.ndarray  # float64 (n,)
    cx: np.ndarray  # float64 (n,)
    classes: np.ndarray  # int64 (n,)


def instance_table(inst_map: np.ndarray, type_map: np.ndarray) -> InstanceTable:
    """Bounding boxes, areas, centroids and classes of every instance (ids ascending).

    inst_map, type_map: int HxW. One `find_objects` and three `bincount`s over the image.
    """
    inst = np.asarray(inst_map)
    # tables over the N instances present, not over 0..max id (ids may reach 2**31-1)
    ids, dense = compact_ids(inst)
    n = ids.size
    flat = dense.ravel().astype(np.int64)
    areas_all = np.bincount(flat, minlength=n + 1)
    h, w = inst.shape
    rows = np.repeat(np.arange(h, dtype=np.float64), w)
    cols = np.tile(np.arange(w, dtype=np.float64), h)
    sy = np.bincount(flat, weights=rows, minlength=n + 1)
    sx = np.bincount(flat, weights=cols, minlength=n + 1)
    cls_all = np.zeros(n + 1, dtype=np.int64)
    cls_all[flat] = np.asarray(type_map).ravel()
    slices = ndi.find_objects(dense, max_label=n)
    boxes = np.array([(s[0].start, s[0].stop, s[1].start, s[1].stop) for s in slices], dtype=np.int64).reshape(-1, 4)
    areas = areas_all[1:]
    return InstanceTable(
        ids=ids,
        boxes=boxes,
        areas=areas.astype(np.int64),
        cy=sy[1:] / areas,
        cx=sx[1:] / areas,
        classes=cls_all[1:],
    )


def eligible_mask(table: InstanceTable, shape: tuple[int, int], border: float) -> np.ndarray:
    """spec 6a step 1: centroid not within `border` px of an image edge (strict, as official)."""
    h, w = shape
    return ~((table.cy < border) | (table.cy > h - border) | (table.cx < border) | (table.cx > w - border))


def paste_window(center: float, size: int) -> int:
    """First row (or column) of a `size`-long window centred at `center` (spec 6a step 5.5).

    Official: int(round(c) - size/2) .. int(round(c) + size/2). For non-negative starts this is
    floor(round(c) - size/2) with exactly `size` cells; floor keeps that true below zero, where
    int() would shrink the window and numpy would wrap the slice (the spec 7.7 crash).
    `round` is numpy's half-to-even, as in the official code.
    """
    return math.floor(float(np.round(center)) - size / 2)


@dataclass(frozen=True)
class Swap:
    """One accepted target -> minor-class replacement, with everything needed to replay it.

    `dilated_*`: the target mask dilated twice (M_k), as a bool crop placed at (r0, c0).
    `paste_*`: the pasted source shape S after border clipping, bool crop at (r0, c0).
    `overwritten`: other instances' pixels the paste covered, as {instance id: pixels}.
    """

    target_id: int
    target_class: int
    target_centroid: tuple[float, float]  # (y, x)
    source_image: int  # index into the samples list
    source_id: int
    source_centroid: tuple[float, float]  # (y, x), in the source image
    dilated_origin: tuple[int, int]
    dilated_mask: np.ndarray
    paste_origin: tuple[int, int]
    paste_mask: np.ndarray
    overwritten: dict[int, int] = field(default_factory=dict)


@dataclass
class BalanceReport:
    """What balancing did, per image and overall; `to_json()` goes into provenance."""

    params: dict[str, Any]
    per_image: list[dict[str, Any]]
    class_counts_before: dict[int, int]
    class_counts_after: dict[int, int]
    accepted_swaps: int
    requested: dict[int, float] | None = None
    achieved: dict[int, float] = field(default_factory=dict)

    @property
    def overwritten_pixels(self) -> int:
        return int(sum(r["overwritten_pixels"] for r in self.per_image))

    @property
    def overwritten_nuclei(self) -> int:
        return int(sum(r["overwritten_nuclei"] for r in self.per_image))

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["overwritten_pixels"] = self.overwritten_pixels
        out["overwritten_nuclei"] = self.overwritten_nuclei
        for key in ("class_counts_before", "class_counts_after", "requested", "achieved"):
            if out[key] is not None:
                out[key] = {str(k): v for k, v in out[key].items()}
        return out


@dataclass(frozen=True)
class _SourcePool:
    """Eligible minor-class nuclei of one image, in id order, with their shapes cropped once."""

    image: int
    ids: np.ndarray
    areas: np.ndarray
    cy: np.ndarray
    cx: np.ndarray
    masks: list[np.ndarray]


def _source_pool(index: int, sample: NucleiSample, table: InstanceTable, minor_class: int, border: float) -> _SourcePool:
    keep = np.flatnonzero(eligible_mask(table, sample.shape, border) & (table.classes == minor_class))
    masks = []
    for k in keep:
        r0, r1, c0, c1 = table.boxes[k]
        masks.append(sample.inst_map[r0:r1, c0:c1] == table.ids[k])
    return _SourcePool(index, table.ids[keep], table.areas[keep], table.cy[keep], table.cx[keep], masks)


def _plan_image(
    index: int,
    sample: NucleiSample,
    table: InstanceTable,
    pools: Sequence[_SourcePool],
    rng: np.random.Generator,
    *,
    minor_class: int,
    fraction: float,
    border: float,
    area_ratio: float,
) -> tuple[np.ndarray, list[Swap], dict[str, Any]]:
    """All swaps of one target image, in processing order, and the resulting inst_map."""
    inst_map = sample.inst_map
    h, w = inst_map.shape
    eligible = eligible_mask(table, (h, w), border)
    # spec 6a step 3: non-minor classes listed class by class, ids ascending within a class,
    # then floor(0.8 n) drawn without replacement and sorted ascending by (undilated) area.
    major_classes = sorted(set(table.classes[eligible].tolist()) - {minor_class, 0})
    candidates = np.concatenate(
        [np.flatnonzero(eligible & (table.classes == c)) for c in major_classes] or [np.zeros(0, np.int64)]
    ).astype(np.int64)
    n_pick = int(fraction * len(candidates))
    picked = rng.choice(candidates, n_pick, replace=False) if n_pick else candidates[:0]
    picked = picked[np.argsort(table.areas[picked], kind="stable")]

    # spec 6a step 4: this image's sources first, then the other images in random order.
    others = [j for j in range(len(pools)) if j != index]
    order = [index] + [others[k] for k in rng.permutation(len(others))]
    pool_img = np.concatenate([np.full(len(pools[j].ids), j, dtype=np.int64) for j in order])
    pool_pos = np.concatenate([np.arange(len(pools[j].ids), dtype=np.int64) for j in order])
    pool_area = np.concatenate([pools[j].areas for j in order]).astype(np.float64)
    # spec 6a step 5.3: official test is `size_1 >= 2.3 * size_2`; keep the float product.
    pool_need = area_ratio * pool_area
    used = np.zeros(len(pool_area), dtype=bool)

    out = inst_map.copy()
    # pixels left of each instance, by its row in `table` (out only ever holds table.ids)
    counts = table.areas.astype(np.int64).copy()
    swaps: list[Swap] = []
    stats = dict(no_source=0, would_erase=0, clipped_away=0)

    for k in picked:
        tid = int(table.ids[k])
        r0, r1, c0, c1 = (int(v) for v in table.boxes[k])
        # dilated target M_k inside the bbox padded by the 2 dilation steps (clipped to image)
        dr0, dr1, dc0, dc1 = max(r0 - 2, 0), min(r1 + 2, h), max(c0 - 2, 0), min(c1 + 2, w)
        dilated = ndi.binary_dilation(inst_map[dr0:dr1, dc0:dc1] == tid, structure=CROSS, iterations=2)
        a1 = int(dilated.sum())
        fits = ~used & (pool_need <= a1)
        p = int(np.argmax(fits)) if fits.size else 0
        if not fits.size or not fits[p]:
            stats["no_source"] += 1
            continue
        pool = pools[int(pool_img[p])]
        pos = int(pool_pos[p])
        src_mask = pool.masks[pos]
        h2, w2 = src_mask.shape
        pr0 = paste_window(table.cy[k], h2)
        pc0 = paste_window(table.cx[k], w2)
        # spec 7.7 fix: clip the paste at the image border
        qr0, qr1, qc0, qc1 = max(pr0, 0), min(pr0 + h2, h), max(pc0, 0), min(pc0 + w2, w)
        if qr0 >= qr1 or qc0 >= qc1:
            stats["clipped_away"] += 1
            continue
        paste = src_mask[qr0 - pr0 : qr1 - pr0, qc0 - pc0 : qc1 - pc0]
        if not paste.any():
            stats["clipped_away"] += 1
            continue
        region = out[qr0:qr1, qc0:qc1]
        covered = region[paste]
        covered = covered[(covered != 0) & (covered != tid)]
        hit_ids, hit_n = np.unique(covered, return_counts=True)
        hit_rows = np.searchsorted(table.ids, hit_ids)
        if np.any(counts[hit_rows] <= hit_n):
            stats["would_erase"] += 1
            continue
        # spec 6a step 5.5: clear the target (only pixels still its own), paste, keep its id
        tbox = out[r0:r1, c0:c1]
        tbox[tbox == tid] = 0
        region[paste] = tid
        counts[hit_rows] -= hit_n
        counts[k] = int(paste.sum())
        used[p] = True
        swaps.append(
            Swap(
                target_id=tid,
                target_class=int(table.classes[k]),
                target_centroid=(float(table.cy[k]), float(table.cx[k])),
                source_image=pool.image,
                source_id=int(pool.ids[pos]),
                source_centroid=(float(pool.cy[pos]), float(pool.cx[pos])),
                dilated_origin=(dr0, dc0),
                dilated_mask=dilated,
                paste_origin=(qr0, qc0),
                paste_mask=paste.copy(),
                overwritten={int(i): int(n) for i, n in zip(hit_ids, hit_n)},
            )
        )
    info = dict(
        name=sample.name,
        eligible_targets=int(len(candidates)),
        picked_targets=int(n_pick),
        planned_swaps=len(swaps),
        skipped_no_source=stats["no_source"],
        skipped_would_erase=stats["would_erase"],
        skipped_clipped_away=stats["clipped_away"],
    )
    return out, swaps, info


def apply_swaps(inst_map: np.ndarray, swaps: Sequence[Swap]) -> np.ndarray:
    """Replay label swaps on an inst_map (int32 HxW copy returned); ids are kept (spec 6a 5.4)."""
    out = np.array(inst_map, dtype=np.int32, copy=True)
    for s in swaps:
        _apply_swap(out, s)
    return out


def _apply_swap(out: np.ndarray, s: Swap) -> None:
    r0, c0 = s.dilated_origin
    dh, dw = s.dilated_mask.shape
    box = out[r0 : r0 + dh, c0 : c0 + dw]  # the dilated box holds the whole target
    box[box == s.target_id] = 0
    q0, p0 = s.paste_origin
    ph, pw = s.paste_mask.shape
    out[q0 : q0 + ph, p0 : p0 + pw][s.paste_mask] = s.target_id


def _image_record(info: dict[str, Any], swaps: Sequence[Swap], n_minor_sources_here: int) -> dict[str, Any]:
    hit: dict[int, int] = {}
    for s in swaps:
        for i, n in s.overwritten.items():
            hit[i] = hit.get(i, 0) + n
    rec = dict(info)
    rec.update(
        accepted_swaps=len(swaps),
        sources_from_this_image=sum(1 for s in swaps if s.source_image == info["index"]),
        sources_from_other_images=sum(1 for s in swaps if s.source_image != info["index"]),
        minor_sources_in_image=n_minor_sources_here,
        overwritten_pixels=int(sum(hit.values())),
        overwritten_nuclei=len(hit),
    )
    return rec


def _counts(samples_classes: Sequence[np.ndarray], num: int) -> dict[int, int]:
    total = np.zeros(num + 1, dtype=np.int64)
    for c in samples_classes:
        total += np.bincount(c, minlength=num + 1)[: num + 1]
    return {k: int(total[k]) for k in range(1, num + 1)}


def allocate_quota(total: int, capacities: Sequence[int]) -> list[int]:
    """Split `total` swaps over images in proportion to what each can do (largest remainder).

    Never gives an image more than its capacity; lower index wins ties, so the split is
    deterministic.
    """
    caps = np.asarray(capacities, dtype=np.int64)
    cap_sum = int(caps.sum())
    if total >= cap_sum:
        return caps.tolist()
    if total <= 0 or cap_sum == 0:
        return [0] * len(caps)
    exact = total * caps / cap_sum
    quota = np.floor(exact).astype(np.int64)
    rest = total - int(quota.sum())
    order = np.lexsort((np.arange(len(caps)), -(exact - quota)))
    for k in order[:rest]:
        quota[k] += 1
    return np.minimum(quota, caps).tolist()


def balance_plan(
    samples: Sequence[NucleiSample], params: BalanceParams
) -> tuple[list[np.ndarray], list[list[Swap]], BalanceReport]:
    """The swaps of every image and their inst_maps, without building samples.

    Shared by `balance_dataset` (labels) and `gradmix_dataset` (labels + pixels), so both see
    identical labels for the same parameters. Returns (inst_maps, swaps per image, report).
    """
    samples = list(samples)
    minor_class, seed = _check_params(samples, params)
    fraction, border, area_ratio = params.fraction, params.border, params.area_ratio
    requested = None if params.target_distribution is None else dict(params.target_distribution)
    tables = [instance_table(s.inst_map, s.type_map) for s in samples]
    pools = [_source_pool(i, s, t, minor_class, border) for i, (s, t) in enumerate(zip(samples, tables))]
    # one independent stream per target image: results do not depend on processing order
    streams = balance_rngs(seed, len(samples))
    outs: list[np.ndarray] = []
    plans: list[list[Swap]] = []
    infos: list[dict[str, Any]] = []
    for i, (sample, table) in enumerate(zip(samples, tables)):
        out, swaps, info = _plan_image(
            i, sample, table, pools, streams[i],
            minor_class=minor_class, fraction=fraction, border=border, area_ratio=area_ratio,
        )
        info["index"] = i
        outs.append(out)
        plans.append(swaps)
        infos.append(info)

    num = max([s.num_classes or 0 for s in samples] + [int(t.classes.max()) if len(t.ids) else 0 for t in tables] + [minor_class])
    before = _counts([t.classes for t in tables], num)
    n_total = sum(before.values())
    if requested is not None:
        # The first q swaps of an image's plan are exactly what a run stopped after q swaps
        # makes (the walk is sequential), so truncating the plan is a faithful partial run.
        wanted = int(round(requested[minor_class] * n_total)) - before.get(minor_class, 0)
        quota = allocate_quota(wanted, [len(p) for p in plans])
        for i, q in enumerate(quota):
            if q < len(plans[i]):
                plans[i] = plans[i][:q]
                outs[i] = apply_swaps(samples[i].inst_map, plans[i])

    after_classes = []
    records = []
    for i, (table, swaps) in enumerate(zip(tables, plans)):
        cls = table.classes.copy()
        moved = np.searchsorted(table.ids, [s.target_id for s in swaps]).astype(np.int64)
        cls[moved] = minor_class
        after_classes.append(cls)
        records.append(_image_record(infos[i], swaps, len(pools[i].ids)))
    after = _counts(after_classes, num)
    accepted = sum(len(p) for p in plans)
    report = BalanceReport(
        params=dict(
            minor_class=minor_class, fraction=fraction, border=border, area_ratio=area_ratio, seed=seed,
            target_distribution=None if requested is None else {int(k): v for k, v in requested.items()},
        ),
        per_image=records,
        class_counts_before=before,
        class_counts_after=after,
        accepted_swaps=accepted,
        requested=requested,
        achieved={k: (v / n_total if n_total else 0.0) for k, v in after.items()},
    )
    return outs, plans, report


def balance_dataset(
    samples: Sequence[NucleiSample], params: BalanceParams
) -> tuple[list[NucleiSample], BalanceReport]:
    """Balancing label maps of a whole dataset (spec 6a, GradMix mixed labels).

    samples: full-size images with merged labels; the image of each output sample is the
    original, untouched (DiffMix re-synthesises it). Instance ids are kept (a swapped nucleus
    keeps its target's id); type_map is rebuilt from the inst_map and the updated classes.

    params: the plan's `BalanceParams`, with its minor class and seed set (`params.resolved`
    fills them from a scheme and a run). With a target_distribution {minor class: p}, the
    dataset gets round(p * N) - n_minor swaps in total (N nuclei, none are ever removed), split
    over images in proportion to how many swaps each can make; each image keeps the first swaps
    of its faithful plan. The report says requested vs achieved; a proportion below the current
    one makes no swaps.
    """
    outs, plans, report = balance_plan(samples, params)  # checks that the minor class is set
    result = []
    for sample, out, swaps in zip(samples, outs, plans):
        result.append(sample.replace(inst_map=out, type_map=swapped_type_map(sample, out, swaps, params.minor_class)))
    return result, report


def swapped_type_map(sample: NucleiSample, inst_out: np.ndarray, swaps: Sequence[Swap], minor_class: int) -> np.ndarray:
    """spec 6a step 6: rebuild type_map from the output inst_map and the updated classes."""
    ids, dense = compact_ids(sample.inst_map)
    classes = np.zeros(ids.size + 1, dtype=np.int32)
    classes[dense.ravel()] = sample.type_map.ravel()
    classes = classes[1:]
    if swaps:
        classes[np.searchsorted(ids, [s.target_id for s in swaps])] = minor_class
    return values_at(ids, classes, inst_out, default=0)


def _check_params(samples: Sequence[NucleiSample], params: BalanceParams) -> tuple[int, int]:
    """(minor class, seed) of a plan over `samples`; the rest of `params` validated itself."""
    if not isinstance(params, BalanceParams):
        raise ConfigError(f"balancing takes a BalanceParams, got {type(params).__name__}")
    if params.minor_class is None or params.seed is None:
        raise ConfigError("balancing needs the minor class and the seed: set them in BalanceParams, "
                          "or take a scheme's and a run's with params.resolved(minor_class, seed)")
    if not samples:
        raise DataError("balancing needs at least one sample")
    for s in samples:
        if not isinstance(s, NucleiSample):
            raise DataError(f"balancing takes NucleiSample objects, got {type(s).__name__}")
    k = samples[0].num_classes
    if k is not None and params.minor_class > k:
        raise ConfigError(f"minor class {params.minor_class} is not one of the classes 1..{k}")
    return params.minor_class, params.seed
