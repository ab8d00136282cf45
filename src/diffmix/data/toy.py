"""Toy H&E dataset: procedurally rendered tiles whose label maps are the exact truth.

The toy dataset lets the whole pipeline (SDM training, label-map editing, downstream
HoVer-style segmentation, metrics) run on a CPU in minutes, with a class imbalance like
CoNSeP's (merged classes, `CONSEP.merged()`): 1 miscellaneous (the rare class), 2
inflammatory, 3 epithelial, 4 spindle-shaped.

How a tile is made (all in numpy, vectorised; the only Python loop is over nuclei):

1. Layout. Nuclei are placed as label geometry first: epithelial nuclei grow in clusters
   (glands: a ring around a white lumen; nests: compact touching sheets), inflammatory
   nuclei are partly scattered and partly clumped, spindle nuclei lie in the stroma oriented
   along the collagen fibres, miscellaneous nuclei are scattered. Each new nucleus may cover
   a small part of an earlier one's disk but only takes free pixels, so nuclei touch (their
   instance edges matter) while every instance stays one 4-connected component of one class.
2. Rendering. Colours come from stain concentrations through Beer-Lambert optical density
   (haematoxylin and eosin absorbance vectors, jittered per tile). The stroma is eosin with
   low-frequency noise, wavy fibre bundles and white spaces; epithelium has lilac cytoplasm.
   Nuclear stain is looked up per instance from `inst_map`, so the colour change of every
   nucleus lies exactly on its mask: pixels outside a nucleus are untouched background, and
   only the inner 1-px ring of each nucleus is softened (a lighter seam also separates
   touching nuclei, as a real boundary would).

Class appearance follows real tissue at 40x (radius ~4-12 px on a 256^2 tile):
inflammatory = small, round, dark and dense; epithelial = large, pale, vesicular (chromatin
texture, darker membrane, visible nucleolus), in clusters; spindle = thin, elongated with
tapered ends, oriented along fibres; miscellaneous = irregular lobulated outline, mid tone,
coarse mottled chromatin with a purple (eosin-mixed) cast.

Rare-class guarantee: when the miscellaneous share is > 0, every tile holds at least one
miscellaneous nucleus, so balancing always has sources; on tiles of at least 80 px that one
has its centroid >= 30 px from every border, where GradMix (spec 6a) accepts sources. On
small tiles with few nuclei this floor raises the miscellaneous share above `rare_fraction`
(e.g. 64^2 tiles hold ~2-3 nuclei); at the defaults (8 tiles of 256^2, ~39 nuclei each) the
dataset share is `rare_fraction` to within rounding (plus a nucleus the layout could not fit,
which is rare at CoNSeP density).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from scipy import ndimage

from diffmix.data.io import write_dataset
from diffmix.data.sample import NucleiSample
from diffmix.data.schemes import CONSEP
from diffmix.errors import ConfigError

MISC, INFLAMMATORY, EPITHELIAL, SPINDLE = 1, 2, 3, 4
NUM_CLASSES = 4

# Shares of the non-rare classes, roughly CoNSeP's merged proportions
# (epithelial ~35%, inflammatory ~25%, spindle ~37% of nuclei).
_BASE_SHARES = {INFLAMMATORY: 0.25, EPITHELIAL: 0.35, SPINDLE: 0.37}
DEFAULT_RARE_FRACTION = 0.035
# Expected nuclei per 10^4 pixels: CoNSeP has ~24k nuclei in 41 tiles of 1000^2 (~5.9).
DEFAULT_DENSITY = 6.0
# spec 6a: GradMix sources/targets need their centroid >= 30 px from every border.
SOURCE_MARGIN = 30


def class_weights_for(rare_fraction: float = DEFAULT_RARE_FRACTION) -> dict[int, float]:
    """Class shares {class id: share} summing to 1, with `rare_fraction` for miscellaneous."""
    if not 0.0 <= rare_fraction < 1.0:
        raise ConfigError(f"toy data: rare_fraction must be in [0, 1), got {rare_fraction}")
    rest = sum(_BASE_SHARES.values())
    weights = {MISC: float(rare_fraction)}
    for cls, share in _BASE_SHARES.items():
        weights[cls] = (1.0 - rare_fraction) * share / rest
    return weights


DEFAULT_CLASS_WEIGHTS: Mapping[int, float] = class_weights_for(DEFAULT_RARE_FRACTION)


# ----------------------------------------------------------------------------- noise fields


def _bspline_weights(n: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Cubic B-spline with knots every `scale` px, sampled at 0..n-1: for each pixel the
    first of its 4 coefficient indices (n,) and their weights (4, n)."""
    x = np.arange(n) / scale + 1.5  # pixel 0 sits between knots 1 and 2
    first = np.floor(x).astype(np.int64) - 1
    d = np.abs(x[None, :] - (first[None, :] + np.arange(4)[:, None]))
    w = np.where(d < 1, 2 / 3 - d**2 + d**3 / 2, np.where(d < 2, (2 - d) ** 3 / 6, 0.0))
    return first, w


def _smooth_noise(shape: tuple[int, int], scale: float, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-std noise with features ~`scale` px, float32.

    A cubic B-spline surface over random coefficients on a grid of spacing `scale`,
    evaluated separably with 4 taps per axis. Elementwise numpy only: no BLAS, whose
    thread count would change the float sums (same seed -> same bytes) and which stalls
    when the cores are shared.
    """
    h, w = shape
    gh, gw = int(math.ceil(h / scale)) + 4, int(math.ceil(w / scale)) + 4
    coef = rng.standard_normal((gh, gw))
    fy, wy = _bspline_weights(h, scale)
    fx, wx = _bspline_weights(w, scale)
    rows = sum(wy[k][:, None] * coef[fy + k] for k in range(4))  # (h, gw)
    field = sum(wx[k][None, :] * rows[:, fx + k] for k in range(4))  # (h, w)
    field = field - field.mean()
    std = field.std()
    return (field / std if std > 0 else field).astype(np.float32)


def _fine_noise(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-std white noise blurred by `sigma` px: chromatin grain, float32."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    std = field.std()
    return (field / std if std > 0 else field).astype(np.float32)


# ----------------------------------------------------------------------------- nucleus shapes


def _shape_params(cls: int, rng: np.random.Generator) -> dict[str, Any]:
    """Semi-axes (px), end sharpness and outline harmonics of one nucleus of class `cls`.

    `a` is the semi-axis along the orientation, `b` across it; `p` < 2 tapers the ends
    (spindles); harmonics perturb the outline radius by `amp * cos(k * t + phase)`.
    """
    if cls == INFLAMMATORY:
        a = rng.uniform(4.3, 6.2)
        b, p, amps = a * rng.uniform(0.85, 1.0), 2.0, (0.03, 0.03)
    elif cls == EPITHELIAL:
        a = rng.uniform(8.5, 12.5)
        b, p, amps = a * rng.uniform(0.65, 0.9), 2.0, (0.04, 0.04)
    elif cls == SPINDLE:
        a = rng.uniform(9.0, 14.0)
        b, p, amps = rng.uniform(2.3, 3.3), 1.4, (0.03, 0.02)
    elif cls == MISC:
        a = rng.uniform(7.0, 10.5)
        b, p = a * rng.uniform(0.7, 0.95), 2.0
        amps = tuple(rng.uniform(0.06, 0.13, size=4))  # lobulated, irregular outline
    else:
        raise ValueError(f"unknown toy class {cls}")
    ks = np.arange(2, 2 + len(amps))
    return {
        "cls": cls,
        "a": float(a),
        "b": float(b),
        "p": p,
        "k": ks,
        "amp": np.asarray(amps, dtype=np.float64),
        "phase": rng.uniform(0, 2 * np.pi, size=len(amps)),
    }


def _rasterize(
    params: Mapping[str, Any], cy: float, cx: float, angle: float
) -> tuple[int, int, np.ndarray]:
    """Pixels of one nucleus: (y0, x0, bool mask) of its bounding box (may exceed the tile).

    A pixel belongs to the nucleus when its centre satisfies
    |u/a|^p + |v/b|^2 <= r(t)^2, with (u, v) the rotated offset and r(t) the perturbed
    outline radius at polar angle t; r > 0 everywhere, so the shape is star-shaped.
    """
    a, b, p = params["a"], params["b"], params["p"]
    reach = a * (1.0 + float(np.sum(params["amp"]))) + 1.0
    y0, x0 = int(math.floor(cy - reach)), int(math.floor(cx - reach))
    y1, x1 = int(math.ceil(cy + reach)) + 1, int(math.ceil(cx + reach)) + 1
    dy = (np.arange(y0, y1) - cy)[:, None]
    dx = (np.arange(x0, x1) - cx)[None, :]
    c, s = math.cos(angle), math.sin(angle)
    u = (dx * c + dy * s) / a
    v = (-dx * s + dy * c) / b
    t = np.arctan2(v, u)
    r = 1.0 + sum(
        amp * np.cos(k * t + phase)
        for amp, k, phase in zip(params["amp"], params["k"], params["phase"])
    )
    inside = np.abs(u) ** p + v**2 <= r**2
    return y0, x0, inside


# ----------------------------------------------------------------------------- layout


class _Canvas:
    """Label maps under construction plus the placement rule shared by every class."""

    def __init__(self, size: int, forbid: np.ndarray) -> None:
        self.size = size
        self.inst_map = np.zeros((size, size), dtype=np.int32)
        self.type_map = np.zeros((size, size), dtype=np.int32)
        self.forbid = forbid  # white lumen / spaces where no nucleus may sit
        self.records: list[dict[str, Any]] = []
        self.min_area = 8

    def place(
        self, params: Mapping[str, Any], cy: float, cx: float, angle: float, max_overlap: float
    ) -> bool:
        """Add a nucleus if it fits; returns whether it was added.

        It may overlap earlier nuclei by up to `max_overlap` of its own in-tile area (it then
        takes only the free pixels, so it touches them), must not sit on forbidden pixels,
        must keep at least `min_area` pixels and 60% of its in-tile area, and must stay one
        4-connected component.
        """
        y0, x0, mask = _rasterize(params, cy, cx, angle)
        n = self.size
        ya, xa = max(y0, 0), max(x0, 0)
        yb, xb = min(y0 + mask.shape[0], n), min(x0 + mask.shape[1], n)
        if ya >= yb or xa >= xb:
            return False
        full_area = int(mask.sum())
        mask = mask[ya - y0 : yb - y0, xa - x0 : xb - x0]
        area = int(mask.sum())
        if area < max(self.min_area, 0.4 * full_area):
            return False
        if (mask & self.forbid[ya:yb, xa:xb]).sum() > 0.05 * area:
            return False
        occupied = self.inst_map[ya:yb, xa:xb] > 0
        if (mask & occupied).sum() > max_overlap * area:
            return False
        new = mask & ~occupied
        if new.sum() < max(self.min_area, 0.6 * area):
            return False
        _, n_parts = ndimage.label(new)
        if n_parts != 1:
            return False
        inst_id = len(self.records) + 1
        self.inst_map[ya:yb, xa:xb][new] = inst_id
        self.type_map[ya:yb, xa:xb][new] = params["cls"]
        self.records.append({"cls": params["cls"], "cy": cy, "cx": cx, "a": params["a"], "b": params["b"]})
        return True


def _place_scattered(
    canvas: _Canvas,
    cls: int,
    count: int,
    rng: np.random.Generator,
    angle_at: Callable[[float, float], float],
    allowed: np.ndarray | None = None,
    max_overlap: float = 0.08,
    tries: int = 60,
) -> None:
    """Place `count` nuclei of `cls` at uniform positions (restricted to `allowed` if given)."""
    n = canvas.size
    if allowed is not None and allowed.any():
        ys, xs = np.nonzero(allowed)
    else:
        ys = xs = None
    for _ in range(count):
        params = _shape_params(cls, rng)
        for _ in range(tries):
            if ys is not None:
                k = rng.integers(ys.size)
                cy, cx = ys[k] + rng.uniform(-0.5, 0.5), xs[k] + rng.uniform(-0.5, 0.5)
            else:
                cy, cx = rng.uniform(-2, n + 2), rng.uniform(-2, n + 2)
            if canvas.place(params, cy, cx, angle_at(cy, cx), max_overlap):
                break


def _grow_cluster(
    canvas: _Canvas,
    cls: int,
    count: int,
    centre: tuple[float, float],
    rng: np.random.Generator,
    max_overlap: float,
    tries: int = 40,
) -> int:
    """Eden growth: each nucleus is put against a random earlier member, so members touch.

    Returns how many were placed (a crowded tile can place fewer).
    """
    members: list[tuple[float, float, float]] = []  # (cy, cx, mean radius)
    placed = 0
    for _ in range(count):
        params = _shape_params(cls, rng)
        r_new = 0.5 * (params["a"] + params["b"])
        for attempt in range(tries):
            if not members:  # seed near the centre, wandering off if that spot is taken
                spread = 3.0 + 2.0 * attempt
                cy, cx = centre[0] + rng.normal(0, spread), centre[1] + rng.normal(0, spread)
            else:
                my, mx, mr = members[rng.integers(len(members))]
                phi = rng.uniform(0, 2 * np.pi)
                d = mr + r_new - rng.uniform(0.5, 2.5)  # edge to edge, pressed together
                cy, cx = my + d * math.sin(phi), mx + d * math.cos(phi)
            if canvas.place(params, cy, cx, rng.uniform(0, np.pi), max_overlap):
                members.append((cy, cx, r_new))
                placed += 1
                break
    return placed


def _grow_gland(
    canvas: _Canvas,
    count: int,
    centre: tuple[float, float],
    ring: float,
    rng: np.random.Generator,
) -> int:
    """Epithelial nuclei side by side on a ring around a lumen, long axes radial (columnar)."""
    placed, theta = 0, rng.uniform(0, 2 * np.pi)
    swept = 0.0
    while placed < count and swept < 2 * np.pi:
        params = _shape_params(EPITHELIAL, rng)
        radius = ring + rng.normal(0, 1.0)
        cy, cx = centre[0] + radius * math.sin(theta), centre[1] + radius * math.cos(theta)
        if canvas.place(params, cy, cx, theta + rng.normal(0, 0.15), max_overlap=0.15):
            placed += 1
        step = (2 * params["b"] - rng.uniform(0.5, 1.5)) / ring  # neighbours touch
        theta += step
        swept += step
    return placed


def _fibre_field(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Collagen fibres: (fibre intensity 0..1 float32, local fibre direction angle in radians).

    Wavy parallel bands: the phase is a projection onto a tile-wide normal plus a smooth warp;
    fibres run perpendicular to the phase gradient, which also orients spindle nuclei.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    phi = rng.uniform(0, np.pi)
    warp = 12.0 * _smooth_noise((size, size), 48.0, rng)
    proj = xx * math.cos(phi) + yy * math.sin(phi) + warp
    period = rng.uniform(6.0, 10.0)
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * proj / period + 0.6 * _smooth_noise((size, size), 14.0, rng))
    # Bands break up along their length (short, staggered fibres) and gather in bundles.
    along = _smooth_noise((size, size), 5.0, rng)
    bundles = 1.0 / (1.0 + np.exp(-2.0 * (_smooth_noise((size, size), 30.0, rng) + 0.2)))
    fibres = (wave**4) * np.clip(0.5 + 0.5 * along, 0.0, 1.0) * bundles
    gy, gx = np.gradient(proj)
    direction = np.arctan2(gy, gx) + np.pi / 2  # along the bands
    return fibres.astype(np.float32), direction.astype(np.float32)


# ----------------------------------------------------------------------------- rendering


# Absorbance per unit stain (R, G, B): haematoxylin (Ruifrok & Johnston) and an eosin vector
# fitted to pink stroma; Beer-Lambert: RGB = 255 * exp(-(c_H * H + c_E * E)).
_H_VECTOR = np.array([0.65, 0.70, 0.29])
_E_VECTOR = np.array([0.15, 0.95, 0.32])

# Per-class nuclear stain: (haematoxylin base, eosin, grain amplitude, mottle amplitude, rim).
_NUCLEUS_LOOK = {
    INFLAMMATORY: (2.80, 0.15, 0.05, 0.00, 0.00),
    EPITHELIAL: (1.15, 0.12, 0.25, 0.00, 0.60),
    SPINDLE: (2.05, 0.15, 0.08, 0.00, 0.00),
    MISC: (1.65, 0.45, 0.05, 0.30, 0.20),
}


def _stain_vectors(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-tile jittered H and E absorbance vectors (stain variation between slides)."""
    h = np.clip(_H_VECTOR + rng.normal(0, 0.03, 3), 0.05, None)
    e = np.clip(_E_VECTOR + rng.normal(0, 0.03, 3), 0.05, None)
    return h, e


def _render(
    canvas: _Canvas,
    fibres: np.ndarray,
    lumen: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """The RGB uint8 tile of a finished canvas; nuclear colour confined to `inst_map` > 0."""
    n = canvas.size
    shape = (n, n)
    inst, types = canvas.inst_map, canvas.type_map
    fg = inst > 0

    # Background stain: eosin stroma with fibres and low-frequency variation.
    low = _smooth_noise(shape, 30.0, rng)
    e_bg = 0.40 + 0.08 * low + 0.45 * fibres + 0.04 * _fine_noise(shape, 1.0, rng)
    h_bg = 0.08 + 0.03 * _smooth_noise(shape, 20.0, rng)

    # Epithelial cytoplasm: lilac sheet within ~7 px of epithelial nuclei, ragged edge.
    epi = types == EPITHELIAL
    if epi.any():
        dist = ndimage.distance_transform_edt(~epi)
        reach = 7.0 + 2.5 * _smooth_noise(shape, 8.0, rng)
        cyto = np.clip((reach - dist) / 2.0, 0.0, 1.0).astype(np.float32)
        mottle = 0.05 * _fine_noise(shape, 1.5, rng)
        h_bg = h_bg * (1 - cyto) + (0.36 + mottle) * cyto
        e_bg = e_bg * (1 - cyto) + (0.42 + mottle) * cyto
    # White spaces and lumens: little stain left.
    clear = np.clip(lumen.astype(np.float32), 0.0, 1.0)
    e_bg = e_bg * (1 - 0.9 * clear)
    h_bg = h_bg * (1 - 0.8 * clear)
    e_bg = ndimage.gaussian_filter(e_bg, 0.7)
    h_bg = ndimage.gaussian_filter(h_bg, 0.7)

    # Nuclear stain, looked up per instance (row 0 = background, unused) and computed on
    # foreground pixels only.
    look = np.zeros((len(canvas.records) + 1, 5), dtype=np.float32)
    for i, rec in enumerate(canvas.records, start=1):
        look[i] = _NUCLEUS_LOOK[rec["cls"]]
    look[1:, 0] *= rng.uniform(0.88, 1.12, size=len(canvas.records))  # nucleus-to-nucleus
    grain = _fine_noise(shape, 0.7, rng)
    mottle = _fine_noise(shape, 1.6, rng)

    # Boundary ring = nucleus pixels with a 4-neighbour of another id (background or a
    # touching nucleus); depth = distance (px) inside the ring, for the membrane.
    pad = np.pad(inst, 1, mode="edge")
    ring = fg & (
        (pad[:-2, 1:-1] != inst)
        | (pad[2:, 1:-1] != inst)
        | (pad[1:-1, :-2] != inst)
        | (pad[1:-1, 2:] != inst)
    )
    depth = ndimage.distance_transform_edt(fg & ~ring).astype(np.float32)  # 0 on the ring

    ys, xs = np.nonzero(fg)
    per_px = look[inst[ys, xs]]  # (n_fg, 5)
    d = depth[ys, xs]
    membrane = np.exp(-((d - 1.3) ** 2) / 1.2) * (d > 0)
    m = mottle[ys, xs]
    # Texture multiplies the stain; clipped so no nucleus gets white holes.
    texture = np.clip(1 + per_px[:, 2] * grain[ys, xs] + per_px[:, 3] * m, 0.55, 1.6)
    h_nuc = per_px[:, 0] * texture + per_px[:, 4] * membrane
    e_nuc = per_px[:, 1] * np.clip(1 + 0.5 * m, 0.5, 1.5)
    # Nucleoli: a small dark, slightly eosinophilic spot in each epithelial nucleus.
    spot = _nucleoli(canvas, depth, rng)[ys, xs]
    h_nuc += 1.5 * spot
    e_nuc += 0.4 * spot

    # Composite: outside nuclei the background is untouched; the ring is the 1-px soft edge.
    alpha = np.where(ring[ys, xs], np.float32(0.6), np.float32(1.0))
    h, e = h_bg.astype(np.float32), e_bg.astype(np.float32)
    h[ys, xs] = (1 - alpha) * h[ys, xs] + alpha * h_nuc
    e[ys, xs] = (1 - alpha) * e[ys, xs] + alpha * e_nuc
    np.clip(h, 0.0, None, out=h)
    np.clip(e, 0.0, None, out=e)

    hv, ev = _stain_vectors(rng)
    od = h[..., None] * hv.astype(np.float32) + e[..., None] * ev.astype(np.float32)
    od += 0.012 * rng.standard_normal((n, n, 3), dtype=np.float32)
    rgb = 255.0 * np.exp(-np.clip(od, 0.0, None))
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _nucleoli(canvas: _Canvas, depth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Nucleolus strength map (H, W) float32 in 0..1: one Gaussian spot (sigma ~1 px) per
    epithelial nucleus, off-centre, at least 2.5 px inside the edge and clipped to its mask."""
    inst = canvas.inst_map
    spot = np.zeros(inst.shape, dtype=np.float32)
    for i, rec in enumerate(canvas.records, start=1):
        if rec["cls"] != EPITHELIAL:
            continue
        ys, xs = _pixels_of(inst, i, rec)
        inner = depth[ys, xs] >= 2.5
        if not inner.any():
            continue
        ys, xs = ys[inner], xs[inner]
        ty = rec["cy"] + rng.normal(0, 0.25 * rec["b"])
        tx = rec["cx"] + rng.normal(0, 0.25 * rec["b"])
        k = int(np.argmin((ys - ty) ** 2 + (xs - tx) ** 2))
        y0, x0, sigma = int(ys[k]), int(xs[k]), rng.uniform(0.8, 1.2)
        ya, xa = max(y0 - 3, 0), max(x0 - 3, 0)
        wy = np.arange(ya, min(y0 + 4, inst.shape[0]))[:, None]
        wx = np.arange(xa, min(x0 + 4, inst.shape[1]))[None, :]
        dot = np.exp(-((wy - y0) ** 2 + (wx - x0) ** 2) / (2 * sigma**2))
        window = spot[ya : ya + wy.shape[0], xa : xa + wx.shape[1]]
        window += dot * (inst[ya : ya + wy.shape[0], xa : xa + wx.shape[1]] == i)
    return spot


def _pixels_of(inst: np.ndarray, i: int, rec: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates of instance `i`, searched only in the box its shape can reach."""
    reach = int(math.ceil(rec["a"] * 1.6)) + 2
    n = inst.shape[0]
    y0, x0 = max(int(rec["cy"]) - reach, 0), max(int(rec["cx"]) - reach, 0)
    y1, x1 = min(int(rec["cy"]) + reach + 1, n), min(int(rec["cx"]) + reach + 1, n)
    ys, xs = np.nonzero(inst[y0:y1, x0:x1] == i)
    return ys + y0, xs + x0


# ----------------------------------------------------------------------------- public API


def _draw_counts(
    size: int, rng: np.random.Generator, class_weights: Mapping[int, float], density: float
) -> dict[int, int]:
    """Nuclei per class for one tile: Poisson total, multinomial split, >= 1 rare if weighted."""
    weights = np.array([float(class_weights.get(c, 0.0)) for c in range(1, NUM_CLASSES + 1)])
    if np.any(weights < 0) or weights.sum() <= 0:
        raise ConfigError(f"toy data: class_weights must be >= 0 and not all 0, got {dict(class_weights)}")
    total = int(rng.poisson(density * size * size / 1e4))
    counts = rng.multinomial(total, weights / weights.sum())
    out = {c: int(counts[c - 1]) for c in range(1, NUM_CLASSES + 1)}
    if weights[MISC - 1] > 0 and out[MISC] == 0:
        out[MISC] = 1  # rare-class guarantee (module docstring)
    return out


def generate_toy_sample(
    size: int,
    rng: np.random.Generator,
    name: str,
    *,
    class_weights: Mapping[int, float] = DEFAULT_CLASS_WEIGHTS,
    density: float = DEFAULT_DENSITY,
    class_counts: Mapping[int, int] | None = None,
) -> NucleiSample:
    """One toy H&E tile with exact labels, merged CoNSeP classes 1..4 (`num_classes=4`).

    Args:
        size: tile side in pixels (square tile); nuclei keep their 40x size (radius ~4-12 px)
            whatever the tile size.
        rng: the only source of randomness; the same generator state gives the same tile.
        name: sample name.
        class_weights: {class id: weight} for the per-class split of a Poisson number of
            nuclei (mean `density * size^2 / 1e4`); ignored when `class_counts` is given.
            With a miscellaneous weight > 0 the tile gets at least one miscellaneous nucleus.
        density: expected nuclei per 10^4 pixels (CoNSeP: ~6).
        class_counts: exact {class id: count} to place instead of drawing them.

    Returns a validated `NucleiSample`: image uint8 (size, size, 3), inst_map int32 with
    contiguous ids 1..N, type_map int32 in 0..4. A very crowded request can place fewer
    nuclei than asked (each gets 60 position tries); the rare class is placed first.
    """
    if size < 8:
        raise ConfigError(f"toy data: tile size must be >= 8 px, got {size}")
    if density < 0:
        raise ConfigError(f"toy data: density must be >= 0, got {density}")
    counts = (
        {c: int(class_counts.get(c, 0)) for c in range(1, NUM_CLASSES + 1)}
        if class_counts is not None
        else _draw_counts(size, rng, class_weights, density)
    )
    if any(v < 0 for v in counts.values()):
        raise ConfigError(f"toy data: class_counts must be >= 0, got {dict(class_counts or {})}")

    shape = (size, size)
    fibres, fibre_dir = _fibre_field(size, rng)
    # White spaces between tissue (~6% of the tile), lumens are added by glands.
    ragged = _smooth_noise(shape, 28.0, rng) + 0.3 * _smooth_noise(shape, 5.0, rng)
    lumen = np.clip((ragged - 1.7) / 0.25, 0.0, 1.0)
    canvas = _Canvas(size, lumen > 0.3)

    def fibre_angle(cy: float, cx: float) -> float:
        y = min(max(int(cy), 0), size - 1)
        x = min(max(int(cx), 0), size - 1)
        return float(fibre_dir[y, x]) + rng.normal(0, 0.15)

    def any_angle(cy: float, cx: float) -> float:
        return float(rng.uniform(0, np.pi))

    # The rare class goes first so crowding never removes the balancing sources. spec 6a:
    # GradMix ignores nuclei whose centroid is within 30 px of a border, so the first one
    # sits at least 30 px inside wherever the tile is large enough to allow it.
    n_misc = counts[MISC]
    if n_misc and size >= 2 * SOURCE_MARGIN + 20:  # 80 px
        m = SOURCE_MARGIN + 4  # an irregular outline moves the centroid off the centre
        inner = np.zeros(shape, dtype=bool)
        inner[m : size - m, m : size - m] = True
        _place_scattered(canvas, MISC, 1, rng, any_angle, allowed=inner & ~canvas.forbid, tries=200)
        n_misc -= 1
    _place_scattered(canvas, MISC, n_misc, rng, any_angle, max_overlap=0.08, tries=200)

    # Epithelium: glands (ring around a lumen) on roomy tiles, otherwise compact nests; what
    # a cluster cannot hold goes to the next one, a crowded tile scatters the rest.
    remaining = counts[EPITHELIAL]
    n_clusters = int(math.ceil(remaining / 14)) if remaining else 0
    yy, xx = np.mgrid[0:size, 0:size]
    for j in range(n_clusters + 3):
        if remaining <= 0:
            break
        quota = int(math.ceil(remaining / max(n_clusters - j, 1)))
        centre = (rng.uniform(0.15, 0.85) * size, rng.uniform(0.15, 0.85) * size)
        ring = rng.uniform(20.0, 30.0)
        if size >= 128 and quota >= 8 and rng.random() < 0.5:
            lumen_r = ring - 9.0 + rng.normal(0, 1.0)
            gland_lumen = ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) <= lumen_r**2
            canvas.forbid = canvas.forbid | gland_lumen
            lumen = np.maximum(lumen, gland_lumen.astype(np.float32))
            remaining -= _grow_gland(canvas, quota, centre, ring, rng)
        else:
            remaining -= _grow_cluster(canvas, EPITHELIAL, quota, centre, rng, max_overlap=0.2)
    if remaining > 0:
        _place_scattered(canvas, EPITHELIAL, remaining, rng, any_angle, max_overlap=0.2)

    # Spindle nuclei in the stroma, away from the epithelium, along the fibres.
    epi = canvas.type_map == EPITHELIAL
    stroma = ~canvas.forbid & (ndimage.distance_transform_edt(~epi) > 10 if epi.any() else True)
    stroma = np.broadcast_to(stroma, shape)
    _place_scattered(canvas, SPINDLE, counts[SPINDLE], rng, fibre_angle, allowed=stroma, max_overlap=0.1)

    # Inflammatory: ~40% in small clumps (touching), the rest scattered.
    n_inf = counts[INFLAMMATORY]
    clumped = int(round(0.4 * n_inf))
    while clumped > 0:
        k = min(clumped, int(rng.integers(3, 7)))
        centre = (rng.uniform(0, size), rng.uniform(0, size))
        _grow_cluster(canvas, INFLAMMATORY, k, centre, rng, max_overlap=0.15)
        clumped -= k
    placed_inf = sum(1 for r in canvas.records if r["cls"] == INFLAMMATORY)
    _place_scattered(canvas, INFLAMMATORY, n_inf - placed_inf, rng, any_angle, max_overlap=0.1)

    image = _render(canvas, fibres, lumen, rng)
    return NucleiSample(
        image=image,
        inst_map=canvas.inst_map,
        type_map=canvas.type_map,
        name=name,
        num_classes=NUM_CLASSES,
    )


def _dataset_counts(
    n_images: int, size: int, rng: np.random.Generator, rare_fraction: float, density: float
) -> list[dict[int, int]]:
    """Per-tile class counts whose dataset totals hit the class shares exactly.

    The dataset total is a sum of Poisson draws; class totals are its largest-remainder
    split by `class_weights_for(rare_fraction)`; each class total is spread over the tiles
    with tile-specific (gamma-jittered) weights, so tiles differ in composition like real
    fields of view. Miscellaneous: one per tile first when `rare_fraction` > 0, the rest spread.
    """
    weights = class_weights_for(rare_fraction)
    total = int(rng.poisson(density * size * size / 1e4, size=n_images).sum())
    exact = np.array([weights[c] * total for c in range(1, NUM_CLASSES + 1)])
    totals = np.floor(exact).astype(int)
    order = np.argsort(-(exact - totals), kind="stable")
    totals[order[: total - totals.sum()]] += 1
    per_tile = [{c: 0 for c in range(1, NUM_CLASSES + 1)} for _ in range(n_images)]
    for c in range(1, NUM_CLASSES + 1):
        t = int(totals[c - 1])
        if c == MISC and rare_fraction > 0:
            for tile in per_tile:
                tile[MISC] = 1
            t = max(t - n_images, 0)
        if t == 0:
            continue
        tile_w = rng.gamma(3.0, 1.0, size=n_images)
        for i, k in enumerate(rng.multinomial(t, tile_w / tile_w.sum())):
            per_tile[i][c] += int(k)
    return per_tile


def generate_toy_samples(
    n_images: int = 8,
    size: int = 256,
    seed: int = 0,
    *,
    rare_fraction: float = DEFAULT_RARE_FRACTION,
    density: float = DEFAULT_DENSITY,
) -> list[NucleiSample]:
    """The toy dataset: `n_images` tiles named `toy_000`, ... (merged CoNSeP classes, K=4).

    Class shares over the dataset: miscellaneous `rare_fraction` (raised to one per tile
    when > 0, see module docstring), the rest split epithelial 35 : inflammatory 25 :
    spindle 37. `density` is expected nuclei per 10^4 pixels. Same arguments -> identical
    arrays (one `numpy.random.Generator` seeded with `seed`, tiles drawn in order).
    """
    if n_images < 1:
        raise ConfigError(f"toy data: n_images must be >= 1, got {n_images}")
    if density < 0:
        raise ConfigError(f"toy data: density must be >= 0, got {density}")
    rng = np.random.default_rng(seed)
    plan = _dataset_counts(n_images, size, rng, rare_fraction, density)
    return [
        generate_toy_sample(size, rng, f"toy_{i:03d}", class_counts=counts, density=density)
        for i, counts in enumerate(plan)
    ]


def write_toy_dataset(
    out: str | Path,
    n_images: int = 8,
    size: int = 256,
    seed: int = 0,
    **kw: Any,
) -> Path:
    """Generate the toy dataset and write it as a dataset folder (CoNSeP layout) at `out`.

    Keyword arguments go to `generate_toy_samples` (`rare_fraction`, `density`); all of
    them are recorded in the provenance of `dataset.json`. Returns the folder path.
    """
    samples = generate_toy_samples(n_images, size, seed, **kw)
    provenance = {
        "generator": "diffmix toy-data",
        "seed": int(seed),
        "n_images": int(n_images),
        "size": int(size),
        "rare_fraction": float(kw.get("rare_fraction", DEFAULT_RARE_FRACTION)),
        "density": float(kw.get("density", DEFAULT_DENSITY)),
    }
    return Path(write_dataset(out, samples, CONSEP.merged(), provenance=provenance))
