"""The study's headline numbers: paired 95% bootstrap intervals of arm differences (docs/study.md).

From each segmenter run's evaluation (per-image PQ and per-image type counts, so pooled
statistics can be recomputed on any resample of the test images), for the rare class's F1 and
PQ: every arm's value with its interval, and the paired differences DiffMix - baseline and
DiffMix - GradMix (or whichever of those arms were run). Runs (folds x seeds) are paired by
index (run r of one arm has the same fold and segmenter seed as run r of the other) and both
arms see the same resampled test images.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from diffmix.errors import DataError
from diffmix.metrics.classification import stats_from_counts
from diffmix.stats import N_BOOT, paired_difference, run_mean_interval

#: (arm, reference arm) pairs reported, when both arms were run.
COMPARISONS: tuple[tuple[str, str], ...] = (
    ("diffmix", "baseline"),
    ("diffmix", "gradmix"),
    ("diffmix_b", "baseline"),
    ("gradmix", "baseline"),
)


def run_statistic(evals: Sequence[Mapping[str, Any]], key: str, class_ids: Sequence[int]) -> Callable[[int, np.ndarray], float]:
    """statistic(run index, test image indices) of one arm's runs: "pq" (mean of per-image PQ)
    or "f1_<class>" (pooled F1 of that class, official formula, from the per-image counts)."""
    names = list(evals[0]["per_image"])
    for ev in evals:
        if list(ev["per_image"]) != names:
            raise DataError("runs of the experiment were evaluated on different test images")
    if key == "pq":
        pq = np.array([[ev["per_image"][n]["pq"] for n in names] for ev in evals], dtype=np.float64)
        return lambda r, imgs: float(pq[r, imgs].mean())
    if not key.startswith("f1_"):
        raise ValueError(f"unknown statistic {key!r}")
    cls = int(key[3:])
    for ev in evals:
        if "type_counts" not in ev or ev["type_counts"]["class_ids"] != [int(c) for c in class_ids]:
            raise DataError("an evaluation lacks per-image type counts for the scheme's classes; re-run it")
    counts = np.array([[ev["type_counts"]["per_image"][n] for n in names] for ev in evals], dtype=np.int64)
    return lambda r, imgs: stats_from_counts(counts[r, imgs].sum(axis=0), class_ids)["f1"][cls]


def headline_intervals(
    evals: Mapping[str, Sequence[Mapping[str, Any]]],
    class_ids: Sequence[int],
    minor_class: int,
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict[str, Any]:
    """{"metrics": [...], "arms": {arm: {metric: interval}}, "differences": {"a - b": {metric:
    interval}}, "n_runs", "n_images"}; intervals as `diffmix.stats.bootstrap_interval`."""
    metrics = [f"f1_{minor_class}", "pq"]
    runs = {len(v) for v in evals.values()}
    if len(runs) != 1:
        raise DataError(f"arms have different numbers of runs: { {a: len(v) for a, v in evals.items()} }")
    n_runs = runs.pop()
    n_images = len(next(iter(evals.values()))[0]["per_image"])
    stats = {arm: {m: run_statistic(v, m, class_ids) for m in metrics} for arm, v in evals.items()}
    out: dict[str, Any] = {"metrics": metrics, "arms": {}, "differences": {}, "n_runs": n_runs, "n_images": n_images}
    for arm, by_metric in stats.items():
        out["arms"][arm] = {
            m: run_mean_interval(f, n_runs, n_images, n_boot=n_boot, seed=seed) for m, f in by_metric.items()
        }
    for a, b in COMPARISONS:
        if a in stats and b in stats:
            out["differences"][f"{a} - {b}"] = {
                m: paired_difference(stats[a][m], stats[b][m], n_runs, n_images, n_boot=n_boot, seed=seed)
                for m in metrics
            }
    return out
