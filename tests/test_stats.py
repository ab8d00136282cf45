"""Bootstrap intervals (diffmix.stats) against cases computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from diffmix.errors import DataError
from diffmix.stats import bootstrap_indices, bootstrap_interval, mean_over, paired_difference, percentile_interval


def test_interval_of_a_mean_matches_the_binomial_by_hand():
    # Ten images, five scoring 0 and five 1: a resample's mean is k/10 with k ~ Binomial(10, 1/2).
    # P(k <= 1) = 11/1024 = 0.0107 < 0.025 < P(k <= 2) = 56/1024 = 0.0547, so the 2.5th
    # percentile is 0.2 and, by symmetry, the 97.5th is 0.8.
    values = mean_over([0.0] * 5 + [1.0] * 5)
    iv = bootstrap_interval(lambda s, imgs: values(imgs), 1, 10, n_boot=20_000, seed=3)
    assert iv["estimate"] == 0.5
    assert (iv["low"], iv["high"]) == (0.2, 0.8)
    assert iv["n_boot"] == 20_000 and iv["level"] == 0.95


def test_percentile_interval_reads_the_inverted_cdf():
    draws = np.arange(1, 201, dtype=float)  # 1..200: the 2.5% point is the 5th draw, 97.5% the 195th
    assert percentile_interval(draws) == (5.0, 195.0)
    assert percentile_interval(draws, level=0.5) == (50.0, 150.0)
    with pytest.raises(DataError, match="not finite"):
        percentile_interval(np.array([1.0, np.nan]))
    with pytest.raises(DataError, match="level"):
        percentile_interval(draws, level=1.0)


def test_paired_difference_cancels_image_difficulty():
    # Arm A beats arm B by exactly 0.1 on every image, whatever the image's difficulty, in
    # every seed: every paired resample gives 0.1, so the interval has zero width.
    rng = np.random.default_rng(0)
    difficulty = rng.uniform(0, 0.8, size=(3, 14))  # seeds x images
    a = lambda s, imgs: float(difficulty[s, imgs].mean() + 0.1)
    b = lambda s, imgs: float(difficulty[s, imgs].mean())
    iv = paired_difference(a, b, 3, 14, n_boot=2000)
    assert iv["estimate"] == pytest.approx(0.1)
    assert iv["low"] == pytest.approx(0.1) and iv["high"] == pytest.approx(0.1)
    # unpaired, the same two arms overlap widely: the pairing is what makes the difference visible
    ia = bootstrap_interval(lambda s, i: np.mean([a(int(x), i) for x in s]), 3, 14, n_boot=2000)
    ib = bootstrap_interval(lambda s, i: np.mean([b(int(x), i) for x in s]), 3, 14, n_boot=2000)
    assert ia["low"] < ib["high"]


def test_seeds_are_resampled_when_there_are_several():
    # The statistic depends only on the seed. A resample of three seeds draws seed 0 three
    # times with probability 1/27 = 0.037 > 0.025 (mean 0), and seed 2 three times likewise
    # (mean 2): the interval is [0, 2], the seeds' whole range.
    per_seed = np.array([0.0, 1.0, 2.0])
    iv = bootstrap_interval(lambda s, imgs: float(per_seed[s].mean()), 3, 5, n_boot=5000)
    assert iv["estimate"] == 1.0
    assert (iv["low"], iv["high"]) == (0.0, 2.0)
    # one seed: only images are resampled, the seed index is always 0
    iv1 = bootstrap_interval(lambda s, imgs: float(per_seed[s].mean()), 1, 5, n_boot=100)
    assert (iv1["low"], iv1["high"]) == (0.0, 0.0)


def test_same_seed_same_resamples_and_bad_sizes():
    a = bootstrap_indices(4, 3, np.random.default_rng(7))
    assert a.shape == (3, 4) and a.min() >= 0 and a.max() < 4
    assert np.array_equal(a, bootstrap_indices(4, 3, np.random.default_rng(7)))
    with pytest.raises(DataError, match="at least one unit"):
        bootstrap_indices(0, 3, np.random.default_rng(0))
    with pytest.raises(DataError, match="n_boot"):
        bootstrap_indices(3, 0, np.random.default_rng(0))
