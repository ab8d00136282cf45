"""SONNET's training targets of one patch: NP, TP and the 8-level ordinal distance map (notes 2).

The ordinal map follows the official `loader/augs.py:GenInstanceOrd` step by step:

1. every 4-connected piece of one id becomes its own instance (`split_disconnected`, the
   effect of `_fix_mirror_padding`);
2. instances with fewer than `min_area` (7) pixels *inside the output crop* get no level;
3. per kept instance, on its full shape in the input patch: the centre c is the centroid with
   each coordinate **truncated** (`int(m01/m00), int(m10/m00)`: cv2 moments), the distance of
   every pixel to c is divided by the instance's largest one, d in [0, 1] (0 at c); c may lie
   outside a concave nucleus, and a 1-px instance gives 0/0 = NaN;
4. `ordinal_levels`: L(d) = 1 + #{j in 1..7 : d <= LUT[j]} with the hand-rounded
   "distance-decreasing discretisation" LUT = [1, .83, .68, .54, .41, .29, .19, .09, 0]
   (t_k = 2^(k/8) - 1 rounded, `EXACT_LUT` unrounded), compared in float32; NaN gives 0.
   Level 1 is the rim, 8 the centre (d <= .09): the levels are finest near the centre.

**Fixed official defect D2 (background at ordinal level 8).** The released code writes the
distance map as zeros outside the kept instances and then discretises *every* pixel, so the
background and the dropped tiny objects get L(0) = 8, the centre level. Post-processing takes
ŷ > 4 as markers, so the whole background becomes one marker that, after the 1-px dilation,
reaches into every nucleus rim and hands all nuclei one shared label: fed its own ideal
targets, the released post-processing finds 8/20, 9/47 and 30/58 nuclei on the three real test
patches (PQ 0.40 / 0.23 / 0.53). Here the background and dropped objects get level 0
(`background=0`, the default); `background=8` reproduces the release (tests pin both).

Small objects (< `min_area` px in the crop) keep NP = 1 and their TP class (notes 9, D8).
NP is derived from the *type* map (type > 0), as the official graph does, not from inst_map.
"""

from __future__ import annotations

import numpy as np

from diffmix.errors import DataError
from diffmix.seg.targets import _check_inst_map, center_crop_offsets, split_disconnected

#: The official hand-rounded thresholds of `gen_ord` (notes 2.4), from d = 1 down to d = 0.
ORD_LUT = np.array([1.0, 0.83, 0.68, 0.54, 0.41, 0.29, 0.19, 0.09, 0.0], dtype=np.float32)
#: The same thresholds unrounded: 2^(k/8) - 1 for k = 8..0 (notes 9, D7; .2968 and .1892
#: where the official LUT has .29 and .19).
EXACT_LUT = (2.0 ** (np.arange(8, -1, -1) / 8.0) - 1.0).astype(np.float32)
#: Ordinal levels of a nucleus (1 = rim .. 8 = centre); 0 is the background.
NUM_LEVELS = 8
#: Instances with fewer pixels than this inside the output crop get no ordinal level
#: (official `remove_small_objects(min_size=7)`).
MIN_ORD_AREA = 7
#: Background level of the released code (defect D2); diffmix uses 0.
OFFICIAL_BACKGROUND = 8


def ordinal_levels(d: np.ndarray, lut: np.ndarray = ORD_LUT) -> np.ndarray:
    """Level L(d) = 1 + #{j in 1..7 : d <= lut[j]} of normalised distances d (official `gen_ord`).

    d: float array, 0 at the nucleus centre, 1 at its farthest pixel; NaN gives 0.
    lut: 9 decreasing thresholds from 1 to 0 (`ORD_LUT` or `EXACT_LUT`); only lut[1..7] are
        compared, in float32 as the official code does.
    Returns int64 levels of the shape of d: 1 on (lut[1], 1], ..., 8 on [0, lut[7]].
    """
    lut = np.asarray(lut, dtype=np.float32)
    if lut.shape != (NUM_LEVELS + 1,) or np.any(np.diff(lut) >= 0):
        raise ValueError(f"lut must hold {NUM_LEVELS + 1} decreasing thresholds, got {lut}")
    d32 = np.asarray(d, dtype=np.float32)
    levels = np.ones(d32.shape, dtype=np.int64)
    for threshold in lut[1:-1]:
        levels += d32 <= threshold  # NaN compares False: counted nowhere
    levels[np.isnan(d32)] = 0
    return levels


def ordinal_map(
    inst_map: np.ndarray,
    out_size: int | None = None,
    *,
    background: int = 0,
    lut: np.ndarray = ORD_LUT,
    min_area: int = MIN_ORD_AREA,
) -> np.ndarray:
    """The ordinal distance-level map of a patch, centre-cropped to `out_size` (notes 2).

    inst_map: HxW integer label map of the input-size patch (0 = background); each
        instance's shape, centre and largest distance are taken from the whole patch.
    out_size: side of the network output (76 for the 270 input); None keeps the patch.
    background: level of background pixels and of instances too small to get one: 0 (the
        fix of defect D2, see the module docstring) or 8 (the released code).
    min_area: instances with fewer pixels inside the crop get `background`.
    Returns int64 (h, w) levels in 0..8.
    """
    inst_map = _check_inst_map(inst_map)
    if not 0 <= background <= NUM_LEVELS:
        raise DataError(f"background level must be in 0..{NUM_LEVELS}, got {background}")
    h, w = inst_map.shape
    if out_size is None:
        y0, x0, oh, ow = 0, 0, h, w
    else:
        y0, x0 = center_crop_offsets((h, w), out_size)
        oh = ow = out_size
    out = np.full((oh, ow), background, dtype=np.int64)
    pieces = split_disconnected(inst_map)
    n = int(pieces.max()) if pieces.size else 0
    if n == 0:
        return out

    crop = pieces[y0 : y0 + oh, x0 : x0 + ow]
    crop_area = np.bincount(crop.ravel().astype(np.int64), minlength=n + 1)
    keep = crop_area >= min_area
    keep[0] = False
    if not keep.any():
        return out

    rows, cols = np.nonzero(pieces)
    ids = pieces[rows, cols].astype(np.int64)
    sel = keep[ids]
    rows, cols, ids = rows[sel], cols[sel], ids[sel]
    area = np.bincount(ids, minlength=n + 1).astype(np.float64)
    safe = np.maximum(area, 1.0)
    # cv2 moments m01/m00, m10/m00 truncated by int() (notes 2.3, D8): not rounded
    cy = np.floor(np.bincount(ids, weights=rows, minlength=n + 1) / safe).astype(np.int64)
    cx = np.floor(np.bincount(ids, weights=cols, minlength=n + 1) / safe).astype(np.int64)
    dist = np.hypot(rows - cy[ids], cols - cx[ids])
    far = np.zeros(n + 1, dtype=np.float64)
    np.maximum.at(far, ids, dist)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = dist / far[ids]  # 0/0 = NaN for a 1-px instance -> level 0, as released
    levels = ordinal_levels(d, lut)

    inside = (rows >= y0) & (rows < y0 + oh) & (cols >= x0) & (cols < x0 + ow)
    out[rows[inside] - y0, cols[inside] - x0] = levels[inside]
    return out


def make_sonnet_targets(
    inst_map: np.ndarray,
    type_map: np.ndarray,
    out_size: int | None = None,
    *,
    background: int = 0,
    lut: np.ndarray = ORD_LUT,
    min_area: int = MIN_ORD_AREA,
) -> dict[str, np.ndarray]:
    """NP, TP and ordinal targets of one patch, centre-cropped to the network's output size.

    inst_map, type_map: HxW integer maps of the input-size patch, type_map with merged class
        ids (0 = background). out_size: output side (76 for SONNET's 270 input; None keeps the
        patch). background, lut, min_area: see `ordinal_map`.
    Returns {"np": int64 (h, w) 0/1 from type > 0, "tp": int64 (h, w), "ord": int64 (h, w) 0..8}.
    """
    inst_map = _check_inst_map(inst_map)
    type_map = _check_inst_map(type_map, "type_map")
    if type_map.shape != inst_map.shape:
        raise DataError(f"type_map shape {type_map.shape} != inst_map shape {inst_map.shape}")
    ord_map = ordinal_map(inst_map, out_size, background=background, lut=lut, min_area=min_area)
    tp_map = type_map.astype(np.int64)
    if out_size is not None:
        y0, x0 = center_crop_offsets(inst_map.shape, out_size)
        tp_map = tp_map[y0 : y0 + out_size, x0 : x0 + out_size]
    return {
        "np": np.ascontiguousarray((tp_map > 0).astype(np.int64)),
        "tp": np.ascontiguousarray(tp_map),
        "ord": np.ascontiguousarray(ord_map),
    }
