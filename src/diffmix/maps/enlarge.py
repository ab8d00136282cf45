"""Enlarging maps (spec 6b): per patch, nuclei away from the border move by small random shifts.

Recovered from the deleted compiled DiffMix loader (spec 6b): on each 256x256 grid patch,
nuclei with a pixel in the 32-px frame stay ("frozen"); every other nucleus is translated by
integers drawn from [-15, 14] on each axis, each axis's shift kept with probability 0.3. The
frozen nuclei are written first, then the movers in ascending id order, later writes winning,
so a mover can cover parts of a frozen nucleus or of an earlier mover (faithful default).

Choices, all documented in spec 6b:

- A nucleus's class is its own merged class (the recommended clean choice); the snapshot read
  classes from the GradMix map, mixing balancing into enlarging.
- Ids are remapped to 1..N after moving (the snapshot did not), so the maps satisfy the
  project's label contract; fragments of overwritten nuclei stay, as in the snapshot.
- Pixels pushed off the patch are dropped. With the paper's frame and shift range this never
  happens (movers stay within [17, 238]); it only matters for custom settings.
- `no_overlap` (beyond the paper): a shift is rejected when the moved mask would overlap or
  8-neighbour-touch another nucleus, or leave the patch; up to `max_tries` draws, else the
  nucleus stays in place. Nuclei not yet placed count at their original position, so a
  nucleus that falls back in place never meets a newcomer. It creates no touching pairs.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy import ndimage as ndi

from diffmix.data.patches import grid_offsets, patch_name
from diffmix.data.sample import NucleiSample, compact_ids
from diffmix.errors import ConfigError, DataError
from diffmix.seeds import enlarge_rng

SQUARE = np.ones((3, 3), dtype=bool)


def _draw(rng: np.random.Generator, n: int, shift_range: tuple[int, int], keep_prob: float) -> np.ndarray:
    """(n, 2) int64 shifts (dy, dx): uniform integers in shift_range, each axis kept w.p. keep_prob."""
    lo, hi = shift_range
    shifts = rng.integers(lo, hi + 1, size=(n, 2))
    # spec 6b step 3: an axis's shift survives when a uniform draw exceeds 0.7
    keep = rng.random((n, 2)) > 1.0 - keep_prob
    return shifts * keep


def enlarge_patch(
    inst_map: np.ndarray,
    type_map: np.ndarray,
    *,
    rng: np.random.Generator,
    frame: int = 32,
    shift_range: tuple[int, int] = (-15, 14),
    keep_prob: float = 0.3,
    no_overlap: bool = False,
    max_tries: int = 10,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Enlarging map of one label patch (spec 6b).

    inst_map, type_map: int HxW (merged classes, one class per instance). Returns int32 HxW
    (inst_map, type_map) with ids remapped to 1..N, and `info`:
      `frozen`: ids (after the step-1 remap 1..N of the input) touching the frame;
      `shifts`: {id: (dy, dx)} for every movable nucleus, the shift actually applied;
      `kept_in_place`: movable ids whose every draw was rejected (no_overlap only);
      `id_map`: {input-remapped id: output id} for the nuclei that survive.
    """
    # Views of a larger map (a grid patch sliced from a full image) are not C-contiguous;
    # everything below indexes flat pixel positions, so take a C-ordered copy first.
    inst0 = np.ascontiguousarray(inst_map)
    types0 = np.ascontiguousarray(type_map)
    if inst0.ndim != 2 or inst0.shape != types0.shape:
        raise DataError(f"enlarging needs equal HxW inst and type maps, got {inst0.shape} and {types0.shape}")
    lo, hi = (int(v) for v in shift_range)
    if lo > hi:
        raise ConfigError(f"shift range must be (low, high) with low <= high, got {shift_range}")
    if not 0.0 <= keep_prob <= 1.0:
        raise ConfigError(f"keep probability must be in [0, 1], got {keep_prob}")
    if frame < 0 or max_tries < 1:
        raise ConfigError(f"frame must be >= 0 and max_tries >= 1, got {frame} and {max_tries}")
    h, w = inst0.shape
    # spec 6b step 1: ids 1..N in the patch
    inst, _ = _remap(inst0)
    n = int(inst.max(initial=0))
    cls = np.zeros(n + 1, dtype=np.int32)
    cls[inst.ravel()] = types0.ravel()
    cls[0] = 0
    boxes = ndi.find_objects(inst, max_label=n)
    ids = np.arange(1, n + 1)
    # spec 6b step 2: a pixel in rows/cols < frame or >= size - frame freezes the nucleus
    frozen = np.array(
        [b[0].start < frame or b[0].stop > h - frame or b[1].start < frame or b[1].stop > w - frame for b in boxes],
        dtype=bool,
    )
    movers = ids[~frozen]

    if no_overlap:
        out, shifts, fallback = _place_without_touching(inst, boxes, movers, rng, (lo, hi), keep_prob, max_tries)
    else:
        drawn = _draw(rng, len(movers), (lo, hi), keep_prob)
        shifts = {int(i): (int(s[0]), int(s[1])) for i, s in zip(movers, drawn)}
        out = _place_faithful(inst, frozen, drawn)
        fallback = []
    out_types = cls[out]
    final, present = _remap(out)
    info = dict(
        frozen=[int(i) for i in ids[frozen]],
        shifts=shifts,
        kept_in_place=fallback,
        id_map={int(i): k + 1 for k, i in enumerate(present)},
    )
    return final, out_types.astype(np.int32), info


def _remap(inst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids renumbered 1..N keeping their order, int32; the original ids present, ascending).

    `diffmix.data.sample.compact_ids`: no table sized by the largest id.
    """
    present, dense = compact_ids(inst)
    return dense, present


def _place_faithful(inst: np.ndarray, frozen: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """spec 6b step 4-5: frozen copied, then movers in ascending id, later writes winning."""
    h, w = inst.shape
    is_frozen = np.concatenate([[False], frozen])
    is_mover = np.concatenate([[False], ~frozen])
    out = np.where(is_frozen[inst], inst, 0).astype(np.int32)
    ys, xs = np.nonzero(is_mover[inst])
    if ys.size == 0:
        return out
    mid = inst[ys, xs]
    shift_of = np.zeros((len(is_mover), 2), dtype=np.int64)
    shift_of[np.flatnonzero(is_mover)] = shifts
    ty, tx = ys + shift_of[mid, 0], xs + shift_of[mid, 1]
    inside = (ty >= 0) & (ty < h) & (tx >= 0) & (tx < w)
    lin, mid = ty[inside] * w + tx[inside], mid[inside]
    # later (larger) ids overwrite earlier ones: keep the largest mover id per pixel
    order = np.lexsort((mid, lin))
    lin, mid = lin[order], mid[order]
    last = np.append(lin[1:] != lin[:-1], True)
    out[lin[last] // w, lin[last] % w] = mid[last]  # 2-D indices: correct for any memory layout
    return out


def _place_without_touching(
    inst: np.ndarray,
    boxes: Sequence[tuple[slice, slice] | None],
    movers: np.ndarray,
    rng: np.random.Generator,
    shift_range: tuple[int, int],
    keep_prob: float,
    max_tries: int,
) -> tuple[np.ndarray, dict[int, tuple[int, int]], list[int]]:
    """Movers one by one in id order; a shift whose moved mask (8-neighbourhood included)
    meets any other nucleus (placed, frozen, or not yet moved) or the patch edge is redrawn."""
    h, w = inst.shape
    occ = inst.copy()
    shifts: dict[int, tuple[int, int]] = {}
    fallback: list[int] = []
    for i in movers.tolist():
        sl = boxes[i - 1]
        r0, c0 = sl[0].start, sl[1].start
        mask = inst[sl] == i
        occ[sl][mask] = 0
        halo = ndi.binary_dilation(np.pad(mask, 1), structure=SQUARE)
        mh, mw = halo.shape
        chosen = None
        for _ in range(max_tries):
            dy, dx = (int(v) for v in _draw(rng, 1, shift_range, keep_prob)[0])
            if dy == 0 and dx == 0:
                chosen = (0, 0)
                break
            y0, x0 = r0 - 1 + dy, c0 - 1 + dx
            # the moved mask itself must stay on the patch; its halo may hang over the edge
            if r0 + dy < 0 or c0 + dx < 0 or r0 + dy + mask.shape[0] > h or c0 + dx + mask.shape[1] > w:
                continue
            cy0, cx0 = max(y0, 0), max(x0, 0)
            cy1, cx1 = min(y0 + mh, h), min(x0 + mw, w)
            sub = halo[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
            if not np.any(occ[cy0:cy1, cx0:cx1][sub]):
                chosen = (dy, dx)
                break
        if chosen is None:
            fallback.append(i)
            chosen = (0, 0)
        dy, dx = chosen
        occ[r0 + dy : r0 + dy + mask.shape[0], c0 + dx : c0 + dx + mask.shape[1]][mask] = i
        shifts[i] = chosen
    return occ, shifts, fallback


def enlarge_dataset(
    samples: Sequence[NucleiSample],
    *,
    patch: int = 256,
    stride: int = 76,
    seed: int = 0,
    no_overlap: bool = False,
    frame: int = 32,
    shift_range: tuple[int, int] = (-15, 14),
    keep_prob: float = 0.3,
    max_tries: int = 10,
) -> list[NucleiSample]:
    """Enlarging maps of every grid patch of every image (spec 5 grid, spec 6b maps).

    Returns one NucleiSample per grid patch, named `<name>_<idx:03d>` in patch_idx order as
    `diffmix.data.patches.grid_patches` does; its image is the original patch, untouched.
    Patch (i, idx) draws from its own stream seeded by (seed, sample index i, idx)
    (`diffmix.seeds.enlarge_rng`), so a patch's map does not depend on how many other patches
    are made.
    """
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    out: list[NucleiSample] = []
    for i, sample in enumerate(samples):
        h, w = sample.shape
        for idx, (y, x) in enumerate(grid_offsets(h, w, patch, stride)):
            sl = (slice(y, y + patch), slice(x, x + patch))
            rng = enlarge_rng(seed, i, idx)
            # enlarge_patch remaps the crop's ids itself (spec 5/6b step 1)
            inst, types, _ = enlarge_patch(
                sample.inst_map[sl], sample.type_map[sl], rng=rng, frame=frame, shift_range=shift_range,
                keep_prob=keep_prob, no_overlap=no_overlap, max_tries=max_tries,
            )
            image = np.ascontiguousarray(sample.image[sl])
            out.append(NucleiSample(image, inst, types, patch_name(sample.name, idx), sample.num_classes))
    return out
