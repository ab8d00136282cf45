"""Figure of HoVer-Net's training augmentation (diffmix.seg.augment.hovernet_augment) on a real patch.

Usage: augmentation_figure.py [DATASET [OUT]]
  DATASET: a dataset folder (default ../shared/data/real_he_labeled); its image with the most
           classes is used (ties: the first by name).
  OUT:     the PNG (default docs/figures/augmentation.png).

A 3x3 grid: the unaugmented 128x128 centre crop, then the same window augmented with seeds 0..7
(one numpy Generator per item, as diffmix.seg.data seeds them). Every panel is the image with
the instance contours drawn in the class colours of the report (diffmix.pipeline.report); each
title gives the item's shape parameters. Before drawing, the script checks what the figure is
meant to show: the same seed gives the same bytes, every label id of an augmented patch is an
id of the source with its source class (no interpolated ids, one class per instance), and
background pixels have no class. The PNG is palette-quantised to stay small.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np

from diffmix.data.io import read_dataset
from diffmix.pipeline.report import CLASS_COLOURS, class_legend
from diffmix.seg.augment import draw_shape_params, hovernet_augment

ROOT = Path(__file__).resolve().parents[1]
SIZE = 128  # output window; the source patch (256 px) holds the whole rotated window
SEEDS = range(8)
UPSCALE = 2  # nearest-neighbour, so the pixels (and the 1-px contours) stay visible


def contours(image: np.ndarray, inst: np.ndarray, types: np.ndarray) -> np.ndarray:
    """The image with each instance's inner boundary painted in its class colour."""
    from skimage.segmentation import find_boundaries

    out = image.copy()
    edge = find_boundaries(inst, mode="inner") & (inst > 0)
    out[edge] = CLASS_COLOURS[np.clip(types[edge], 0, len(CLASS_COLOURS) - 1)]
    return out


def check(sample, y: int, x: int) -> list[tuple[str, np.ndarray]]:
    """The panels (title, RGB) after checking seeds, ids and classes; prints what was checked."""
    cls_of = sample.inst_types()
    crop = (slice(y, y + SIZE), slice(x, x + SIZE))
    panels = [("no augmentation (centre crop)", contours(sample.image[crop], sample.inst_map[crop], sample.type_map[crop]))]
    for seed in SEEDS:
        a = hovernet_augment(sample.image, sample.inst_map, sample.type_map, y, x, SIZE, np.random.default_rng(seed))
        b = hovernet_augment(sample.image, sample.inst_map, sample.type_map, y, x, SIZE, np.random.default_rng(seed))
        assert all(np.array_equal(u, v) for u, v in zip(a, b)), f"seed {seed}: not reproducible"
        img, inst, types = a
        ids = set(np.unique(inst).tolist()) - {0}
        assert ids <= set(cls_of), f"seed {seed}: ids not in the source: {sorted(ids - set(cls_of))}"
        for i in ids:
            assert set(np.unique(types[inst == i]).tolist()) == {cls_of[i]}, f"seed {seed}: instance {i}"
        assert not types[inst == 0].any(), f"seed {seed}: class on background"
        p = draw_shape_params(np.random.default_rng(seed), SIZE)  # the first draws of the item
        flips = "+".join(k for k, f in (("LR", p["flip_lr"]), ("UD", p["flip_ud"])) if p[f"flip_{k.lower()}"]) or "none"
        title = (f"seed {seed}: rot {p['rotate']:+.0f}°, shear {p['shear']:+.1f}°\n"
                 f"scale {p['scale'][0]:.2f}x{p['scale'][1]:.2f}, flip {flips}")
        print(f"seed {seed}: same bytes twice; {len(ids)} instances, ids in the source, classes kept; "
              f"{title.split(': ', 1)[1].replace(chr(10), ', ')}")
        panels.append((title, contours(img, inst, types)))
    return panels


def main(argv: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from PIL import Image

    dataset = Path(argv[0]) if argv else ROOT.parent / "shared" / "data" / "real_he_labeled"
    out = Path(argv[1]) if len(argv) > 1 else ROOT / "docs" / "figures" / "augmentation.png"
    ds = read_dataset(dataset)
    sample = max(ds, key=lambda s: len(set(np.unique(s.type_map).tolist()) - {0}))
    h, w = sample.inst_map.shape
    y, x = (h - SIZE) // 2, (w - SIZE) // 2
    print(f"{dataset}: {sample.name} ({h}x{w}, {len(sample.inst_types())} nuclei), window {SIZE} at (y={y}, x={x})")
    panels = check(sample, y, x)

    fig, axes = plt.subplots(3, 3, figsize=(9.2, 10.6), dpi=90, layout="constrained")
    for ax, (title, rgb) in zip(axes.flat, panels):
        ax.imshow(np.repeat(np.repeat(rgb, UPSCALE, 0), UPSCALE, 1), interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
    legend = [Patch(facecolor=np.array(c) / 255, edgecolor="0.3", label=n) for n, c in class_legend(ds.scheme)]
    fig.legend(handles=legend, loc="outside lower center", ncol=len(legend), frameon=False, fontsize=9,
               title="contour colour = class", title_fontsize=9)
    fig.suptitle(f"HoVer-Net training augmentation, {SIZE}x{SIZE} window of {sample.name} "
                 f"(affine, flips, blur/noise, colour jitter)", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    # 256-colour palette: the same picture at a fraction of the bytes
    Image.open(buf).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main(sys.argv[1:])
