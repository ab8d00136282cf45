"""GradMix images (spec 6a, pixel part): the paper's comparison arm, labels plus synthesised pixels.

For every swap planned by `diffmix.maps.balance` (identical labels for the same seed), the
target nucleus is removed from the running image by Telea inpainting of its dilated mask,
a window of the source image around the source nucleus (nucleus pixels pulled half-way to
the target image's mean nuclear colour) is blended in with chessboard-distance weights on
the ring between the pasted nucleus and the dilated target, and the ring is median-smoothed.
Follows the original GradMix notebook (inpainting active; the DiffMix copy disables it).

Kept from the official code on purpose (faithful by default, spec 6a):

- The blend is applied twice with uint8 truncation after each product, so the net weight of
  the source on the ring is 1 - (1 - w)^2 (`double_blend=False` blends once).
- Median smoothing uses disk(1) for R and G but disk(5) for B.
- The working copy C starts from the *original* target image each time, not the running one.
- Geometry: the source window is centred on the source centroid and placed on the dilated
  target's bbox, while the label S is pasted with `paste_window` at the rounded target
  centroid; for odd sizes and off-centre bboxes the two differ by up to a pixel, so the
  pasted pixels and the pasted label can be misaligned by one pixel, as in the official code.

Fixed or guarded (spec 7.7):

- Source windows that leave the source image are clipped: the part of the target's dilated
  bbox with no source pixels keeps the original target image there.
- The ring weights divide by max(d - 1) over the ring; when that is 0 (or the ring is
  empty) the weight is 1 instead of the official 0/0 = NaN.
- Mean nuclear colour: a channel with no nonzero nucleus pixel gets 0 instead of 0/0.
- Every step works on a crop around the swap (8 px margin, enough for the 5-px inpainting
  radius and the disk(5) median), so only pixels of the dilated target and the pasted
  source can change; the official code filters the whole image per target.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import disk

from diffmix.data.sample import NucleiSample
from diffmix.maps.balance import BalanceReport, Swap, balance_plan, paste_window, swapped_type_map
from diffmix.maps.params import BalanceParams

MARGIN = 8


def mean_nuclear_colour(image: np.ndarray, inst_map: np.ndarray) -> np.ndarray:
    """spec 6a step 2: per-channel mean over nucleus pixels, counting only nonzero values.

    image uint8 HxWx3, inst_map int HxW -> float64 (3,). A channel without any nonzero
    nucleus value gets 0 (the official code divides by zero there).
    """
    fg = inst_map > 0
    vals = image[fg].astype(np.float64)  # (n, 3)
    total = vals.sum(axis=0)
    count = (vals > 0).sum(axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), 0.0)


def ring_weights(paste: np.ndarray, union: np.ndarray) -> np.ndarray:
    """spec 6a step 5: float32 weights, 1 on the pasted nucleus S, 0 outside U = M | S, and on
    the ring R = U \\ S: 1 - (d - 1) / max_R(d - 1) with d the chessboard distance to S.

    paste, union: bool crops holding all of S (chessboard paths stay inside a rectangle, so
    the distances equal the full-image ones). A zero max_R(d - 1) gives weight 1 on R.
    """
    w = np.zeros(paste.shape, dtype=np.float32)
    ring = union & ~paste
    if ring.any():
        d = ndi.distance_transform_cdt(~paste, metric="chessboard").astype(np.float32)
        dd = d[ring] - 1
        top = float(dd.max())
        w[ring] = 1 - dd / top if top > 0 else 1.0
    w[paste] = 1.0
    return w


def _source_window(src_image: np.ndarray, src_inst_map: np.ndarray, source_id: int, colour: np.ndarray,
                   center: tuple[float, float], h1: int, w1: int) -> tuple[np.ndarray, np.ndarray]:
    """The h1 x w1 window of the harmonised source image centred at the rounded source centroid.

    Returns (uint8 h1 x w1 x 3 window, bool h1 x w1 validity); cells off the source image are
    invalid (spec 7.7 fix: the official slice crashes there).
    """
    hs, ws = src_inst_map.shape
    r0, c0 = paste_window(center[0], h1), paste_window(center[1], w1)
    qr0, qr1, qc0, qc1 = max(r0, 0), min(r0 + h1, hs), max(c0, 0), min(c0 + w1, ws)
    window = np.zeros((h1, w1, 3), dtype=np.uint8)
    valid = np.zeros((h1, w1), dtype=bool)
    if qr0 < qr1 and qc0 < qc1:
        part = src_image[qr0:qr1, qc0:qc1].copy()
        nuc = src_inst_map[qr0:qr1, qc0:qc1] == source_id
        # spec 6a step 2: (pixel + mean colour) / 2, assigned into uint8 (truncation)
        part[nuc] = ((part[nuc].astype(np.float64) + colour) / 2).astype(np.uint8)
        window[qr0 - r0 : qr1 - r0, qc0 - c0 : qc1 - c0] = part
        valid[qr0 - r0 : qr1 - r0, qc0 - c0 : qc1 - c0] = True
    return window, valid


def synthesise_swap(
    frame: np.ndarray,
    original: np.ndarray,
    swap: Swap,
    src_image: np.ndarray,
    src_inst_map: np.ndarray,
    colour: np.ndarray,
    *,
    inpaint: bool = True,
    inpaint_radius: int = 5,
    double_blend: bool = True,
) -> None:
    """Apply one swap's pixel synthesis to `frame` (uint8 HxWx3, modified in place).

    original: the untouched target image (the working copy C starts from it, as official).
    """
    h, w = frame.shape[:2]
    dr0, dc0 = swap.dilated_origin
    dh, dw = swap.dilated_mask.shape
    pr0, pc0 = swap.paste_origin
    ph, pw = swap.paste_mask.shape
    # union box of M_k and S, plus a margin for the inpainting and median neighbourhoods
    b0, b1 = max(min(dr0, pr0) - MARGIN, 0), min(max(dr0 + dh, pr0 + ph) + MARGIN, h)
    a0, a1 = max(min(dc0, pc0) - MARGIN, 0), min(max(dc0 + dw, pc0 + pw) + MARGIN, w)
    bh, bw = b1 - b0, a1 - a0
    M = np.zeros((bh, bw), dtype=bool)
    M[dr0 - b0 : dr0 - b0 + dh, dc0 - a0 : dc0 - a0 + dw] = swap.dilated_mask
    S = np.zeros((bh, bw), dtype=bool)
    S[pr0 - b0 : pr0 - b0 + ph, pc0 - a0 : pc0 - a0 + pw] = swap.paste_mask
    U = M | S
    R = U & ~S
    F = frame[b0:b1, a0:a1].copy()

    # spec 6a pixel step 1: remove the target by Telea inpainting (radius 5) of M_k
    if inpaint:
        filled = cv2.inpaint(np.ascontiguousarray(F), M.astype(np.uint8), inpaint_radius, cv2.INPAINT_TELEA)
        F[M] = filled[M]

    # step 3: C = original image with the dilated bbox replaced by the harmonised source window
    C = original[b0:b1, a0:a1].copy()
    rows, cols = np.nonzero(swap.dilated_mask)
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1  # bbox_1 of M_k
    window, valid = _source_window(
        src_image, src_inst_map, swap.source_id, colour, swap.source_centroid, int(y1 - y0), int(x1 - x0)
    )
    cbox = C[dr0 - b0 + y0 : dr0 - b0 + y1, dc0 - a0 + x0 : dc0 - a0 + x1]
    cbox[valid] = window[valid]

    # steps 4-6: weights on the ring, blend (twice, uint8 truncation after each product)
    wt = ring_weights(S, U)[..., None]
    Cf, Ff = C.astype(np.float32), F.astype(np.float32)
    F1 = F.copy()
    F1[S] = C[S]
    F1[R] = (Cf * wt)[R].astype(np.uint8) + (Ff * (1 - wt))[R].astype(np.uint8)
    if double_blend:
        F1 = (Cf * wt).astype(np.uint8) + (F1.astype(np.float32) * (1 - wt)).astype(np.uint8)

    # step 7: median R, G with disk(1) and B with disk(5); only the ring takes smoothed values
    smooth = np.stack(
        [ndi.median_filter(F1[..., c], footprint=disk(r), mode="nearest") for c, r in enumerate((1, 1, 5))],
        axis=-1,
    )
    F1[R] = smooth[R]
    frame[b0:b1, a0:a1] = F1


def gradmix_dataset(
    samples: Sequence[NucleiSample],
    params: BalanceParams,
    *,
    inpaint: bool = True,
    inpaint_radius: int = 5,
    double_blend: bool = True,
) -> tuple[list[NucleiSample], BalanceReport]:
    """GradMix images and labels of a whole dataset (spec 6a, labels and pixels).

    Labels are exactly `balance_dataset`'s for the same `params` (minor class and seed set).
    Images are the originals with every swap synthesised in the plan's order; pixels outside
    the union of the dilated targets and the pasted sources are unchanged. Source pixels always
    come from the original (not already mixed) source image, as the official code re-reads them.
    inpaint, inpaint_radius, double_blend: the pixel steps (see the module docstring).
    """
    samples = list(samples)
    outs, plans, report = balance_plan(samples, params)  # checks that the minor class is set
    minor_class = params.minor_class
    result = []
    for sample, out, swaps in zip(samples, outs, plans):
        frame = sample.image.copy()
        colour = mean_nuclear_colour(sample.image, sample.inst_map)
        for swap in swaps:
            src = samples[swap.source_image]
            synthesise_swap(
                frame, sample.image, swap, src.image, src.inst_map, colour,
                inpaint=inpaint, inpaint_radius=inpaint_radius, double_blend=double_blend,
            )
        result.append(
            sample.replace(image=frame, inst_map=out, type_map=swapped_type_map(sample, out, swaps, minor_class))
        )
    report.params.update(inpaint=inpaint, inpaint_radius=inpaint_radius, double_blend=double_blend)
    return result, report
