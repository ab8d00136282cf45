"""SONNET post-processing: NP probability + predicted ordinal level -> instances, inner-pixel type vote.

`process_np_ord` follows the official `postproc/post_sonnet.py:proc_np_ord` (notes 6), all
labelling, dilation and watershed 4-connected:

1. markers: ŷ > 4 (the inner levels 5..8), one binary dilation with the 3x3 cross, labelled,
   objects < 10 px removed;
2. blobs: NP probability >= 0.5, labelled, objects < 10 px removed, binarised;
3. the marker *labels* (computed before masking) times the blob mask;
4. watershed of -ŷ from those markers inside the blobs; blob pixels no marker reaches stay 0.

`instance_types_inner` is the official `process.py` vote: the majority of the per-pixel type
argmax over the instance's inner pixels (ŷ >= 5) only, ties to the lower id; if background
wins, the runner-up is taken only when its count exceeds half the winner's; an instance with no
inner pixel gets type 0 (notes 9, D12: it still counts as a detection).

Deviations, all on the bookkeeping side: ids are renumbered 1..N in id order (`remap_ids`; the
official `remap_label(by_size=True)` orders them by size, which no metric sees); the type map
written is the per-instance type (as for HoVer-Net here), not the official raw pixel argmax.
`keep_unmarked=True` (off by default) makes every blob without a marker one more instance, the
same option as HoVer-Net's post-processing (`diffmix.seg.postproc`).

Defect D2 (background at ordinal level 8, see `diffmix.seg.sonnet.targets`) shows here: with
a background of 8 the whole background passes ŷ > 4, and step 3's labels come from the
dilated background component, which touches every nucleus rim.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.ndimage import binary_dilation, generate_binary_structure
from scipy.ndimage import label as _label
from skimage.segmentation import watershed

from diffmix.data.sample import inst_centroids, remap_ids
from diffmix.errors import DataError
from diffmix.seg.postproc import MIN_SIZE, NP_THRESHOLD, _add_unmarked, _type_votes, remove_small
from diffmix.seg.sonnet.targets import NUM_LEVELS

#: ŷ above this marks a nucleus interior (levels 5..8, d <= 0.41); the type vote uses ŷ >= 5.
MARKER_LEVEL = 4
INNER_LEVEL = 5
#: The runner-up replaces a background winner only above this share of the winner's votes.
RUNNER_UP_RATIO = 0.5


def decode_ordinal(ord_logits: np.ndarray) -> np.ndarray:
    """Predicted level ŷ = Σ_k argmax(P_k) of the 8 ordinal classifiers (notes 1), int64.

    ord_logits: float (16, H, W) (or (B, 16, H, W)): pair (2k, 2k+1) are classifier k's
    logits, P_k(1) = P(level > k). A tie counts as "no" (argmax takes the first maximum).
    """
    ord_logits = np.asarray(ord_logits)
    if ord_logits.ndim < 3 or ord_logits.shape[-3] != 2 * NUM_LEVELS:
        raise DataError(f"ordinal logits have shape {ord_logits.shape}, expected ({2 * NUM_LEVELS}, H, W)")
    pairs = ord_logits.reshape(ord_logits.shape[:-3] + (NUM_LEVELS, 2) + ord_logits.shape[-2:])
    return (pairs[..., 1, :, :] > pairs[..., 0, :, :]).sum(axis=-3).astype(np.int64)


def _check_levels(np_prob: np.ndarray, ord_level: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    np_prob = np.asarray(np_prob, dtype=np.float32)
    ord_level = np.asarray(ord_level)
    if np_prob.ndim != 2 or ord_level.shape != np_prob.shape:
        raise DataError(f"np_prob {np_prob.shape} and ord_level {ord_level.shape} must both be (H, W)")
    if ord_level.size and (np.nanmin(ord_level) < 0 or np.nanmax(ord_level) > NUM_LEVELS):
        raise DataError(f"ordinal levels must lie in 0..{NUM_LEVELS}, got {ord_level.min()}..{ord_level.max()}")
    return np_prob, np.rint(ord_level).astype(np.int64)


def process_np_ord(np_prob: np.ndarray, ord_level: np.ndarray, *, keep_unmarked: bool = False) -> np.ndarray:
    """Instances from the nuclear-pixel probability and the predicted ordinal level (`proc_np_ord`).

    np_prob: float (H, W) foreground probability. ord_level: (H, W) predicted level ŷ in
    0..8 (`decode_ordinal`). keep_unmarked: False (official) leaves blobs without a marker
    unlabelled; True makes each such blob (>= 10 px) an instance.
    Returns int32 (H, W), ids 1..N in id order (0 = background).
    """
    np_prob, level = _check_levels(np_prob, ord_level)
    if np_prob.size == 0:
        return np.zeros(np_prob.shape, dtype=np.int32)
    cross = generate_binary_structure(2, 1)

    marker = binary_dilation(level > MARKER_LEVEL, structure=cross, iterations=1)
    marker = remove_small(_label(marker, structure=cross)[0], MIN_SIZE)

    blb = remove_small(_label(np_prob >= NP_THRESHOLD, structure=cross)[0], MIN_SIZE) > 0
    if not blb.any():
        return np.zeros(np_prob.shape, dtype=np.int32)

    # notes 6.3: the labels come from the unmasked markers (this is where D2 bites)
    markers = marker * blb
    inst_map = watershed(-level, markers=markers, mask=blb, connectivity=1)
    if keep_unmarked:
        inst_map = _add_unmarked(inst_map, blb.astype(np.int32))
    return remap_ids(inst_map)


def instance_types_inner(
    inst_map: np.ndarray, tp: np.ndarray, ord_level: np.ndarray
) -> tuple[np.ndarray, dict[int, dict[str, Any]]]:
    """One class per instance by the official inner-pixel vote (`process.py`, notes 6).

    inst_map: int (H, W), 0 = background. tp: float (C, H, W) type probabilities (channel 0 =
    background) or an int (H, W) argmax. ord_level: (H, W) predicted level; only pixels with
    ŷ >= 5 vote. A background winner gives way to the runner-up if that has more than half its
    votes; no inner pixel gives type 0.
    Returns (type_map int32 (H, W), {id: {"type", "type_prob" (winner's share of the inner
    votes, 0 without any), "area", "centroid" (x, y)}}) in id order.
    """
    inst_map = np.asarray(inst_map)
    if inst_map.ndim != 2:
        raise DataError(f"inst_map has shape {inst_map.shape}, expected HxW")
    votes, n_types = _type_votes(inst_map, tp)
    level = np.asarray(ord_level)
    if level.shape != inst_map.shape:
        raise DataError(f"ord_level {level.shape} does not match inst_map {inst_map.shape}")
    ids = np.unique(inst_map)
    ids = ids[ids > 0]
    type_map = np.zeros(inst_map.shape, dtype=np.int32)
    if ids.size == 0:
        return type_map, {}

    fg = inst_map > 0
    area = np.bincount(np.searchsorted(ids, inst_map[fg]), minlength=ids.size)
    inner = fg & (level >= INNER_LEVEL)
    idx = np.searchsorted(ids, inst_map[inner])
    counts = np.bincount(idx * n_types + votes[inner], minlength=ids.size * n_types).reshape(ids.size, n_types)
    winner = np.argmax(counts, axis=1)  # first maximum: ties go to the lower id
    if n_types > 1:
        runner = np.argmax(counts[:, 1:], axis=1) + 1
        top = counts[np.arange(ids.size), winner]
        switch = (winner == 0) & (counts[np.arange(ids.size), runner] > RUNNER_UP_RATIO * top)
        winner = np.where(switch, runner, winner)
    total = counts.sum(axis=1)
    share = np.where(total > 0, counts[np.arange(ids.size), winner] / np.maximum(total, 1), 0.0)

    lut = np.zeros(int(ids[-1]) + 1, dtype=np.int32)
    lut[ids] = winner
    type_map[fg] = lut[inst_map[fg]]
    centroids = inst_centroids(inst_map)
    info = {
        int(i): {"type": int(winner[k]), "type_prob": float(share[k]), "area": int(area[k]),
                 "centroid": centroids[int(i)]}
        for k, i in enumerate(ids)
    }
    return type_map, info


def postprocess_sonnet(
    np_prob: np.ndarray, ord_level: np.ndarray, tp: np.ndarray, *, keep_unmarked: bool = False
) -> tuple[np.ndarray, np.ndarray, dict[int, dict[str, Any]]]:
    """Instances and their classes from SONNET's three outputs of one image.

    np_prob: float (H, W); ord_level: (H, W) predicted levels 0..8; tp: float (C, H, W)
    probabilities or int (H, W) argmax. Returns (inst_map int32 ids 1..N, type_map int32,
    inst_info as `instance_types_inner`).
    """
    inst_map = process_np_ord(np_prob, ord_level, keep_unmarked=keep_unmarked)
    type_map, info = instance_types_inner(inst_map, tp, ord_level)
    return inst_map, type_map, info
