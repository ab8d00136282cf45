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

**One deviation in the instances (`markers="split"`, the default; `"official"` is the release):
a marker that holds several peaks of ŷ is split between them.** In step 1 the official code
labels the *dilated* inner region, so two touching nuclei whose inner regions (d <= .41 of each
nucleus's farthest distance, measured from a centroid that a flat side pushes towards the
neighbour) touch or come within 2 px of each other share one label, and the watershed cannot
separate them. On the ideal targets of every 10th CoNSeP Test tile (1,039 nuclei), 95 nuclei
share a marker with a neighbour after the dilation (31 before it). Here each connected marker
of step 1 is kept as the official code makes it (dilation and size filter included, so
fragments of one inner region 1-2 px apart still join), but when it holds two or more peaks of
ŷ of dynamic >= `PEAK_DYNAMIC` (3 levels above the saddle between them: an h-maxima transform
of ŷ, `split_markers`), it is cut between them by a watershed of -ŷ inside the marker. Two
touching ideal nuclei have their centres at level 8 and ŷ <= 5 between them, so they split; a
dip of one or two levels (one or two of the eight classifiers wrong) never splits a nucleus.

Measured (`tests/test_seg_sonnet.py`), ideal targets -> post-processing, official -> split:
CoNSeP Test, all 224 tiles of 256 px (10,330 nuclei): PQ 0.924 -> 0.955 (DQ 0.961 -> 0.989,
SQ 0.961 -> 0.966), type accuracy 0.9996 -> 1.0 (a merged pair takes one class); CoNSeP Train
(432 tiles, 18,216 nuclei): PQ 0.936 -> 0.962; the three real test patches: unchanged (1.000 /
0.988 / 0.998). On predictions of the demo's weakly trained CPU SONNETs (10 models, toy test
tiles) the mean PQ is 0.238 against the official 0.240 (dynamic 2 over-split them: 0.225); a
trained SONNET's predictions have not been measured here (no GPU). What remains on ideal
targets is SONNET's representation, not the marker step: at a contact ŷ has no valley on the
true boundary, so the watershed places it a few pixels off (every 10th tile: touching nuclei
match with mean IoU 0.92, isolated ones with 1.0), and nuclei under the 10-px marker and blob
sizes are dropped (16 of the 24 misses).

Other deviations, all on the bookkeeping side: ids are renumbered 1..N in id order (`remap_ids`;
the official `remap_label(by_size=True)` orders them by size, which no metric sees); the type
map written is the per-instance type (as for HoVer-Net here), not the official raw pixel argmax.
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
from skimage.morphology import local_maxima, reconstruction
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
#: A marker is split between peaks of ŷ that rise at least this many levels above the saddle
#: between them (their dynamic). Two ideal nuclei in one marker have centres at 8 and a saddle
#: at 5 or below (3); a dip of one or two levels (one or two of the eight ordinal classifiers
#: wrong) never splits a nucleus. 2 over-split weakly trained toy SONNETs (module docstring).
PEAK_DYNAMIC = 3
#: Marker rules of `process_np_ord`: "split" (default, module docstring) or "official".
MARKER_RULES = ("split", "official")


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


def split_markers(markers: np.ndarray, level: np.ndarray, dynamic: int = PEAK_DYNAMIC) -> np.ndarray:
    """Cut every labelled marker that holds several peaks of ŷ between them (module docstring).

    markers: int (H, W) labels (0 = none). level: int (H, W) ŷ. Peaks are the tops of the domes
    of ŷ that rise at least `dynamic` levels above the saddle to any higher dome (h-maxima with
    h = dynamic - 1, 4-connected); for ideal targets, one per nucleus at its level-8 centre. A
    marker holding k >= 2 peaks becomes k markers by a watershed of -ŷ from the peaks inside
    it. Returns int32 labels 1..N (markers with fewer than two peaks keep their pixels).
    """
    cross = generate_binary_structure(2, 1)
    if not markers.any():
        return np.zeros(markers.shape, dtype=np.int32)
    # The h-maxima transform: regional maxima of the reconstruction of ŷ - h under ŷ. Each dome
    # of ŷ that rises more than h above the saddle to any higher dome gives one connected peak;
    # a dome with a shallower dip inside stays one peak (skimage's `h_maxima` returns the pixels
    # >= h above that reconstruction instead, which a one-level dip cuts in two).
    if dynamic < 1:
        raise ValueError(f"dynamic must be >= 1 level, got {dynamic}")
    height = level.astype(np.float64)
    # reconstructing ŷ - (dynamic - 1) keeps apart exactly the domes of dynamic >= `dynamic`
    domes = reconstruction(height - (dynamic - 1), height, method="dilation", footprint=cross)
    top = local_maxima(domes, connectivity=1, allow_borders=True)
    peaks = _label(top & (markers > 0), structure=cross)[0]
    # peaks per marker, from the (marker, peak) pairs that occur: a marker with two or more is
    # cut; one watershed cuts them all, since markers are separate 4-connected components
    both = (markers > 0) & (peaks > 0)
    pairs = np.unique(np.stack([markers[both], peaks[both]]).astype(np.int64), axis=1)
    ids, n_peaks = np.unique(pairs[0], return_counts=True)
    cut = np.isin(markers, ids[n_peaks >= 2])
    out = remap_ids(np.where(cut, 0, markers)).astype(np.int32)
    if cut.any():
        parts = remap_ids(watershed(-level, markers=np.where(cut, peaks, 0), mask=cut, connectivity=1))
        out[cut] = parts[cut] + out.max()
    return out


def process_np_ord(
    np_prob: np.ndarray, ord_level: np.ndarray, *, keep_unmarked: bool = False, markers: str = "split"
) -> np.ndarray:
    """Instances from the nuclear-pixel probability and the predicted ordinal level (`proc_np_ord`).

    np_prob: float (H, W) foreground probability. ord_level: (H, W) predicted level ŷ in
    0..8 (`decode_ordinal`). keep_unmarked: False (official) leaves blobs without a marker
    unlabelled; True makes each such blob (>= 10 px) an instance. markers: "split" (default)
    cuts a marker holding several peaks of ŷ between them (`split_markers`, module docstring);
    "official" keeps the release's markers.
    Returns int32 (H, W), ids 1..N in id order (0 = background).
    """
    if markers not in MARKER_RULES:
        raise ValueError(f"markers must be one of {', '.join(MARKER_RULES)}, got {markers!r}")
    np_prob, level = _check_levels(np_prob, ord_level)
    if np_prob.size == 0:
        return np.zeros(np_prob.shape, dtype=np.int32)
    cross = generate_binary_structure(2, 1)

    marker = _label(binary_dilation(level > MARKER_LEVEL, structure=cross, iterations=1), structure=cross)[0]
    marker = remove_small(marker, MIN_SIZE)
    if markers == "split":  # after the official size filter: a cut never drops a nucleus
        marker = split_markers(marker, level)

    blb = remove_small(_label(np_prob >= NP_THRESHOLD, structure=cross)[0], MIN_SIZE) > 0
    if not blb.any():
        return np.zeros(np_prob.shape, dtype=np.int32)

    # notes 6.3: the labels come from the unmasked markers (this is where D2 bites)
    seeds = marker * blb
    inst_map = watershed(-level, markers=seeds, mask=blb, connectivity=1)
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
    np_prob: np.ndarray, ord_level: np.ndarray, tp: np.ndarray, *, keep_unmarked: bool = False,
    markers: str = "split",
) -> tuple[np.ndarray, np.ndarray, dict[int, dict[str, Any]]]:
    """Instances and their classes from SONNET's three outputs of one image.

    np_prob: float (H, W); ord_level: (H, W) predicted levels 0..8; tp: float (C, H, W)
    probabilities or int (H, W) argmax; keep_unmarked, markers: as `process_np_ord`.
    Returns (inst_map int32 ids 1..N, type_map int32, inst_info as `instance_types_inner`).
    """
    inst_map = process_np_ord(np_prob, ord_level, keep_unmarked=keep_unmarked, markers=markers)
    type_map, info = instance_types_inner(inst_map, tp, ord_level)
    return inst_map, type_map, info
