"""HoVer-Net training targets of one patch: NP (foreground), HV (distance maps), TP (classes).

The HV map follows hover_net `models/hovernet/targets.py` `gen_instance_hv_map` exactly
(hovernet_notes 3), computed for all nuclei at once instead of one bounding box at a time:

- disconnected pieces of one id are split into separate instances first (`fix_mirror_padding`,
  4-connectivity as scipy `label`), so each piece gets its own centre;
- per instance, the centre of mass is rounded with `int(c + 0.5)` in the coordinates of the
  bounding box expanded by 2 px; the box offset is an integer, so this equals
  `floor(c + 0.5)` in image coordinates and the box itself is not needed;
- the coordinate of a pixel is `index + 1 - centre`: hover_net builds its grid with
  `np.arange(1, w + 1)`, so the zero of each map sits one pixel *before* the rounded centre
  (a quirk we keep, because it is what trained HoVer-Net checkpoints expect);
- per instance and per axis, negative values are divided by |min| and positive values by max,
  giving [-1, 1]; background is 0. Channel 0 is the horizontal (x, column) map, channel 1 the
  vertical (y, row) map.

Choices for our patches (documented deviations from the official data loader):

- hover_net gives an HV target only to instances with >= 30 px inside the *output crop*
  (`remove_small_objects(min_size=30)`), leaving smaller ones with NP = 1 and HV = 0. We keep
  the rule, with the same default of 30 px (`min_hv_area`), because it is what the official
  networks are trained on; it only matters for slivers cut by the crop edge and tiny nuclei.
  `min_hv_area=0` gives every instance its HV.
- hover_net relies on the 540 -> 270 pipeline having padded the annotation, so the box expanded
  by 2 px never leaves the array. Our patches are not padded; because the rounded centre is
  translation-invariant (see above) we get the values the padded computation would give,
  without negative slice indices.
- `fix_mirror_padding` exists to repair ids duplicated by affine interpolation; our patches
  (grid crops with contiguous ids, dihedral augmentation) seldom have disconnected ids, but a
  crop can cut a concave nucleus in two, and some source data (mirror-padded tiles) repeat ids.
  We split, as the official code does; the instance ids of the sample are left untouched,
  only the HV map sees the split.
"""

from __future__ import annotations

import numpy as np
from skimage.measure import label as _label_regions

from diffmix.errors import ConfigError, DataError

#: hover_net's area threshold (px inside the output crop) for an instance to get an HV target.
MIN_HV_AREA = 30


def _check_inst_map(inst_map: np.ndarray, what: str = "inst_map") -> np.ndarray:
    inst_map = np.asarray(inst_map)
    if inst_map.ndim != 2:
        raise DataError(f"{what} has shape {inst_map.shape}, expected HxW")
    if inst_map.dtype.kind not in "iub":
        raise DataError(f"{what} has dtype {inst_map.dtype}, expected integers")
    if inst_map.size and inst_map.min() < 0:
        raise DataError(f"{what} has negative ids (min {inst_map.min()})")
    return inst_map


def split_disconnected(inst_map: np.ndarray) -> np.ndarray:
    """Label map where every 4-connected piece of one id is its own instance (int32, 1..M).

    The effect of hover_net `fix_mirror_padding`; the numbering differs from the official one
    (raster order of each piece's first pixel), which does not matter to the HV map.
    """
    inst_map = _check_inst_map(inst_map)
    # skimage labels connected regions of equal value, so touching nuclei stay apart
    return _label_regions(inst_map.astype(np.int32), background=0, connectivity=1).astype(np.int32)


def center_crop_offsets(shape: tuple[int, int], out_size: int) -> tuple[int, int]:
    """Top-left corner of hover_net's `cropping_center`: int((H - out) * 0.5) per axis."""
    h, w = shape
    if out_size > h or out_size > w:
        raise ConfigError(f"output size {out_size} is larger than the patch ({h}x{w})")
    return int((h - out_size) * 0.5), int((w - out_size) * 0.5)


def hv_map(
    inst_map: np.ndarray,
    *,
    min_hv_area: int = 0,
    crop_size: int | None = None,
) -> np.ndarray:
    """Horizontal and vertical distance maps of every nucleus, hover_net style.

    inst_map: HxW integer label map, 0 = background (ids need not be contiguous).
    min_hv_area: instances (after splitting disconnected pieces) with fewer pixels than this
        inside the centre crop of `crop_size` (the whole map when None) get HV = 0, as in
        hover_net (which uses 30 and its output crop; `make_targets` passes both).
    Returns float32 (2, H, W): channel 0 horizontal (x) map, channel 1 vertical (y) map,
    values in [-1, 1], 0 on background.
    """
    inst_map = _check_inst_map(inst_map)
    h, w = inst_map.shape
    out = np.zeros((2, h, w), dtype=np.float32)
    pieces = split_disconnected(inst_map)
    n = int(pieces.max()) if pieces.size else 0
    if n == 0:
        return out

    rows, cols = np.nonzero(pieces)
    ids = pieces[rows, cols].astype(np.int64)
    area = np.bincount(ids, minlength=n + 1).astype(np.float64)

    keep = np.ones(n + 1, dtype=bool)
    keep[0] = False
    if min_hv_area > 0:
        if crop_size is None:
            crop_area = area
        else:
            y0, x0 = center_crop_offsets((h, w), crop_size)
            crop = pieces[y0 : y0 + crop_size, x0 : x0 + crop_size]
            crop_area = np.bincount(crop.ravel().astype(np.int64), minlength=n + 1)
        # skimage remove_small_objects(min_size=30) drops objects with < 30 px
        keep &= crop_area >= min_hv_area
    sel = keep[ids]
    rows, cols, ids = rows[sel], cols[sel], ids[sel]
    if ids.size == 0:
        return out

    safe_area = np.maximum(area, 1.0)
    com_y = np.bincount(ids, weights=rows, minlength=n + 1) / safe_area
    com_x = np.bincount(ids, weights=cols, minlength=n + 1) / safe_area
    # int(c + 0.5) in box coordinates == floor(c + 0.5) in image coordinates (integer offset)
    cy = np.floor(com_y + 0.5).astype(np.int64)
    cx = np.floor(com_x + 0.5).astype(np.int64)
    # hover_net's grid is arange(1, w + 1) - centre: the zero sits one pixel before the centre
    for ch, coord, centre in ((0, cols, cx), (1, rows, cy)):
        val = (coord.astype(np.int64) + 1 - centre[ids]).astype(np.float32)
        neg_min = np.zeros(n + 1, dtype=np.float32)
        np.minimum.at(neg_min, ids, val)
        pos_max = np.zeros(n + 1, dtype=np.float32)
        np.maximum.at(pos_max, ids, val)
        neg = val < 0
        pos = val > 0
        val[neg] /= -neg_min[ids[neg]]
        val[pos] /= pos_max[ids[pos]]
        out[ch, rows, cols] = val
    return out


def make_targets(
    inst_map: np.ndarray,
    type_map: np.ndarray,
    out_size: int | None = None,
    *,
    min_hv_area: int = MIN_HV_AREA,
) -> dict[str, np.ndarray]:
    """NP, HV and TP targets of one patch, centre-cropped to the network's output size.

    inst_map, type_map: HxW integer maps of the (input-size) patch; type_map holds merged
        class ids (0 = background). HV shapes are taken from the whole patch, the crop is
        applied afterwards, as hover_net `gen_targets` does.
    out_size: side of the network output (164 for fast mode on 256 input, 80 for original on
        270); None keeps the full patch (the small fully-convolutional net).
    Returns {"np": int64 (h, w) 0/1, "hv": float32 (2, h, w), "tp": int64 (h, w) class ids}.
    """
    inst_map = _check_inst_map(inst_map)
    type_map = _check_inst_map(type_map, "type_map")
    if type_map.shape != inst_map.shape:
        raise DataError(f"type_map shape {type_map.shape} != inst_map shape {inst_map.shape}")
    hv = hv_map(inst_map, min_hv_area=min_hv_area, crop_size=out_size)
    np_map = (inst_map > 0).astype(np.int64)
    tp_map = type_map.astype(np.int64)
    if out_size is not None:
        y0, x0 = center_crop_offsets(inst_map.shape, out_size)
        win = (slice(y0, y0 + out_size), slice(x0, x0 + out_size))
        np_map = np_map[win]
        tp_map = tp_map[win]
        hv = hv[(slice(None),) + win]
    return {
        "np": np.ascontiguousarray(np_map),
        "hv": np.ascontiguousarray(hv),
        "tp": np.ascontiguousarray(tp_map),
    }
