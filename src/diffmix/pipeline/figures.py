"""The report's pictures: class distributions per map kind and the sample grid of spec Fig. 2.

Functions of data only (datasets, counts, a folder): the experiment gathers and passes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from diffmix.data.io import Dataset
from diffmix.data.patches import grid_patches
from diffmix.data.schemes import ClassScheme
from diffmix.pipeline.report import class_distribution_figure, class_legend, label_rgb, sample_grid_figure

Row = list[tuple[str, "np.ndarray | None"]]


def make_figures(
    folder: Path,
    class_counts: Mapping[str, Mapping[Any, int]],
    scheme: ClassScheme,
    rows: Sequence[Row],
) -> dict[str, Path]:
    """Write `folder`/class_distribution.png and, when there are `rows`, `folder`/samples.png.

    class_counts: nuclei per class (keys may be JSON strings) of each set, by set label, as
    the experiment's results hold them. rows: `sample_rows`. Returns the written paths by name.
    """
    figures = {
        "class_distribution": class_distribution_figure(
            {k: {int(c): n for c, n in v.items()} for k, v in class_counts.items()},
            scheme,
            folder / "class_distribution.png",
        )
    }
    if rows:
        figures["samples"] = sample_grid_figure(list(rows), folder / "samples.png", legend=class_legend(scheme))
    return figures


def sample_rows(
    train: Dataset,
    synthetic: Mapping[str, Dataset],
    *,
    patch: int,
    stride: int,
    n_rows: int,
) -> list[Row]:
    """Rows of original | its labels | balancing map | DiffMix-B | enlarging map | DiffMix-E | GradMix for the
    patches whose balancing map gained the most minor-class nuclei (the interesting ones).

    train: the full-size training images, cut on the synthesis grid (`patch`, `stride`) for
    the originals. synthetic: the synthetic sets by kind ("balance", "enlarge", "gradmix");
    only patches present in every given set are shown, at most `n_rows` of them.
    """
    sets = {k: {s.name: s for s in synthetic[k]} for k in sorted(synthetic)}
    originals = {p.name: p for img in train for p in grid_patches(img, patch, stride)}
    minor = train.scheme.minor_class

    def gain(name: str) -> int:
        b = sets.get("balance", {}).get(name)
        o = originals[name]
        if b is None:
            return 0
        return sum(1 for c in b.inst_types().values() if c == minor) - sum(1 for c in o.inst_types().values() if c == minor)

    candidates = [n for n in originals if all(n in v for v in sets.values())]
    candidates.sort(key=lambda n: (-gain(n), n))
    rows = []
    for name in candidates[:n_rows]:
        o = originals[name]
        b, e, g = (sets.get(k, {}).get(name) for k in ("balance", "enlarge", "gradmix"))
        rows.append([
            ("original", o.image),
            ("original labels", label_rgb(o.inst_map, o.type_map)),
            ("balancing map", label_rgb(b.inst_map, b.type_map) if b else None),
            ("DiffMix-B", b.image if b else None),
            ("enlarging map", label_rgb(e.inst_map, e.type_map) if e else None),
            ("DiffMix-E", e.image if e else None),
            ("GradMix", g.image if g else None),
        ])
    return rows
