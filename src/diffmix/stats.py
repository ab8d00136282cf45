"""Bootstrap intervals for study results: over test images, and over seeds then images.

The study's headline (docs/study.md) is a *paired* difference between two arms evaluated on the
same test images: rare-class F1 (pooled over images, so it is a ratio of summed counts, not a
mean of per-image values) and PQ (a mean of per-image values). Resampling whole images keeps the
nuclei of one image together (they are not independent); resampling the same images for both
arms keeps the pairing, so image-to-image difficulty cancels out of the difference. With several
seeds per arm, the two-level bootstrap first resamples seeds (training runs), then images, and
averages the statistic over the resampled seeds: its interval covers run-to-run noise as well.

Intervals are percentile intervals (the 2.5th and 97.5th percentiles of the bootstrap
distribution for 95%); statistics are functions of per-unit arrays, so a resample is an index
array and a statistic is computed once per resample.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from diffmix.errors import DataError

__all__ = ["bootstrap_indices", "percentile_interval", "bootstrap_interval", "paired_difference", "run_mean_interval",
           "format_interval", "mean_over"]

#: Resamples per interval: the 2.5% tail then holds 250 draws, enough for two stable digits.
N_BOOT = 10_000


def bootstrap_indices(n_units: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n_units) int64 indices: each row draws n_units units with replacement."""
    if n_units < 1:
        raise DataError("a bootstrap needs at least one unit (test image, seed)")
    if n_boot < 1:
        raise DataError(f"n_boot must be >= 1, got {n_boot}")
    return rng.integers(0, n_units, size=(n_boot, n_units), dtype=np.int64)


def percentile_interval(draws: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central `level` percentile interval of bootstrap draws (NaN draws are an error:
    a statistic undefined on some resample must be defined by its caller)."""
    draws = np.asarray(draws, dtype=np.float64)
    if not 0.0 < level < 1.0:
        raise DataError(f"level must be in (0, 1), got {level}")
    if draws.size == 0 or not np.all(np.isfinite(draws)):
        raise DataError("bootstrap draws are empty or not finite")
    # rounded: (1 - 0.95) / 2 is 0.025000000000000022 in floats, which would move the lower
    # end one draw up (the 6th of 200 instead of the 5th)
    tail = round((1.0 - level) / 2.0, 12)
    lo, hi = np.quantile(draws, [tail, 1.0 - tail], method="inverted_cdf")
    return float(lo), float(hi)


Statistic = Callable[[np.ndarray], float]


def bootstrap_interval(
    stat: Callable[[np.ndarray, np.ndarray], float],
    n_seeds: int,
    n_images: int,
    *,
    n_boot: int = N_BOOT,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Estimate and interval of a statistic of (seed indices, image indices).

    stat(seeds, images): the statistic on the resampled seeds (int array, length n_seeds) and
        images (int array, length n_images), e.g. the mean over `seeds` of an arm's rare-class
        F1 pooled over `images`. With one seed, only images are resampled.
    Returns {"estimate": stat on all units, "low", "high": the percentile interval,
    "n_boot", "level"}. The same `seed` gives the same resamples, so two statistics bootstrapped
    with the same seed and unit counts are resampled identically (paired).
    """
    rng = np.random.default_rng(seed)
    images = bootstrap_indices(n_images, n_boot, rng)
    seeds = bootstrap_indices(n_seeds, n_boot, rng) if n_seeds > 1 else np.zeros((n_boot, 1), dtype=np.int64)
    draws = np.array([stat(s, i) for s, i in zip(seeds, images)], dtype=np.float64)
    estimate = float(stat(np.arange(n_seeds), np.arange(n_images)))
    low, high = percentile_interval(draws, level)
    return {"estimate": estimate, "low": low, "high": high, "n_boot": int(n_boot), "level": float(level)}


def paired_difference(
    stat_a: Callable[[int, np.ndarray], float],
    stat_b: Callable[[int, np.ndarray], float],
    n_seeds: int,
    n_images: int,
    **kwargs: float | int,
) -> dict[str, float]:
    """Interval of (arm A - arm B) for a per-run statistic, paired by seed and test image.

    stat_a(s, images) / stat_b(s, images): the statistic of seed s's run of each arm on the
    given image indices. Seed s of A is paired with seed s of B (same segmenter seed and data
    order), and both see the same resampled images. kwargs: `bootstrap_interval`'s options.
    """

    return run_mean_interval(lambda s, images: stat_a(s, images) - stat_b(s, images), n_seeds, n_images, **kwargs)


def run_mean_interval(
    stat: Callable[[int, np.ndarray], float], n_seeds: int, n_images: int, **kwargs: float | int
) -> dict[str, float]:
    """Interval of one arm's statistic averaged over its runs: stat(s, images) is seed s's
    run on the given image indices; each resample averages it over the resampled seeds."""

    def mean(seeds: np.ndarray, images: np.ndarray) -> float:
        return float(np.mean([stat(int(s), images) for s in seeds]))

    return bootstrap_interval(mean, n_seeds, n_images, **kwargs)  # type: ignore[arg-type]


def format_interval(iv: Mapping[str, float], signed: bool = False) -> str:
    """'0.123 [0.100, 0.150]' (signed: '+0.023 [-0.010, +0.050]') for tables and summaries."""
    fmt = "{:+.3f}" if signed else "{:.3f}"
    return f"{fmt.format(iv['estimate'])} [{fmt.format(iv['low'])}, {fmt.format(iv['high'])}]"


def mean_over(values: Sequence[float] | np.ndarray) -> Statistic:
    """A statistic that averages per-unit values (e.g. per-image PQ) over the resampled units."""
    arr = np.asarray(values, dtype=np.float64)
    return lambda idx: float(arr[idx].mean())
