"""The report's pictures: class distributions per map kind and the sample grid of spec Fig. 2."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from diffmix.data.patches import grid_patches
from diffmix.pipeline.report import class_distribution_figure, class_legend, label_rgb, sample_grid_figure

if TYPE_CHECKING:
    from diffmix.pipeline.experiment import Experiment


def make_figures(exp: "Experiment", results: Mapping[str, Any]) -> dict[str, Path]:
    """Write figures/class_distribution.png and figures/samples.png; returns their paths."""
    train, _ = exp.datasets()
    folder = exp.out / "figures"
    figures = {
        "class_distribution": class_distribution_figure(
            {k: {int(c): n for c, n in v.items()} for k, v in results["class_counts"].items()},
            train.scheme,
            folder / "class_distribution.png",
        )
    }
    rows = sample_rows(exp)
    if rows:
        figures["samples"] = sample_grid_figure(rows, folder / "samples.png", legend=class_legend(train.scheme))
    return figures


def sample_rows(exp: "Experiment") -> list[list[tuple[str, np.ndarray | None]]]:
    """Rows of original | its labels | balancing map | DiffMix-B | enlarging map | DiffMix-E | GradMix for the
    patches whose balancing map gained the most minor-class nuclei (the interesting ones)."""
    train, _ = exp.datasets()
    arms = exp.cfg.arms
    wanted = {k for a in arms for k in {"diffmix_b": ("balance",), "diffmix_e": ("enlarge",),
                                         "diffmix": ("balance", "enlarge"), "gradmix": ("gradmix",)}.get(a, ())}
    sets = {k: {s.name: s for s in exp.synthetic(k)} for k in sorted(wanted)}
    s = exp.cfg.synthesis
    originals = {p.name: p for img in train for p in grid_patches(img, s.patch, s.stride)}
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
    for name in candidates[: exp.cfg.sample_rows]:
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
