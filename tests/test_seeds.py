"""Every named stream of `diffmix.seeds` pinned to its legacy key and to the numbers it draws.

A change of any derivation changes synthetic datasets, checkpoints and the identity of runs on
disk, so each stream is checked twice: against the legacy formula written out here, and against
literal draws (computed with the code before `diffmix.seeds` existed).
"""

from __future__ import annotations

import hashlib
import itertools
import json

import numpy as np
import pytest

from diffmix import seeds

S = 11  # a seed; (3, 5) as coordinates: no trailing zeros, which SeedSequence pads (module doc)


def draws(rng: np.random.Generator) -> list[int]:
    return rng.integers(0, 2**32, 3).tolist()


def legacy_step_seed(seed: int, step: int, rank: int, stream: int) -> int:
    state = np.random.SeedSequence([seed, stream, step, rank]).generate_state(2, np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def test_patch_noise_is_the_sha256_of_its_four_parts() -> None:
    key = json.dumps([S, "img_007", 3, "balance"]).encode()
    legacy = int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1)
    assert seeds.patch_seed(S, "img_007", 3, "balance") == legacy == 7289237809891886295
    assert 0 <= seeds.patch_seed(2**40, "x", 0, "own") < 2**63


@pytest.mark.parametrize(
    ("stream", "legacy", "literal"),
    [
        (lambda: seeds.enlarge_rng(S, 3, 5), lambda: np.random.default_rng([S, 3, 5]),
         [4258306222, 3685665805, 1919742327]),
        (lambda: seeds.balance_rngs(S, 3)[2], lambda: np.random.default_rng(np.random.SeedSequence(S).spawn(3)[2]),
         [1493007543, 717780345, 3664544658]),
        (lambda: seeds.fold_rng(S), lambda: np.random.default_rng([S, 1]), [1386094690, 869261617, 1000971475]),
        (lambda: seeds.held_out_rng(S), lambda: np.random.default_rng([S, 2]), [572092297, 3853996005, 2958031526]),
        (lambda: seeds.mix_rng(S, 3), lambda: np.random.default_rng([S, 7919, 3]), [207578374, 2679079347, 2854906266]),
        (lambda: seeds.epoch_order_rng(S, 5), lambda: np.random.default_rng([S, 104729, 5]),
         [532002848, 3487872215, 1125779777]),
        (lambda: seeds.item_rng(S, 5, 3), lambda: np.random.default_rng([S, 5, 3]), [3781242214, 1156529930, 1435497551]),
        (lambda: seeds.sdm_order_rng(S, 5), lambda: np.random.default_rng([S, 0, 5]),
         [2408610705, 2505125861, 1658224799]),
        (lambda: seeds.sdm_crop_rng(S, 5, 1), lambda: np.random.default_rng(legacy_step_seed(S, 5, 1, 1)),
         [1709740783, 1928348170, 3028521000]),
        (lambda: seeds.sdm_preview_rng(S), lambda: np.random.default_rng(legacy_step_seed(S, 0, 0, 3)),
         [296380924, 2246557388, 257102340]),
    ],
    ids=["enlarge", "balance", "folds", "held_out", "mix", "epoch_order", "item", "sdm_order", "sdm_crop", "sdm_preview"],
)
def test_numpy_streams_keep_their_legacy_keys(stream, legacy, literal) -> None:
    assert draws(stream()) == draws(legacy()) == literal


def test_balance_streams_are_the_spawned_children() -> None:
    rngs = seeds.balance_rngs(S, 4)
    children = np.random.SeedSequence(S).spawn(4)
    assert len(rngs) == 4 and seeds.balance_rngs(S, 0) == []
    assert [draws(r) for r in rngs] == [draws(np.random.default_rng(c)) for c in children]


def test_integer_seeds_keep_their_legacy_formulas() -> None:
    assert seeds.loader_seed(S, 5) == (S * 1_000_003 + 5) % 2**63 == 11000038
    assert seeds.loader_seed(2**62, 1) == (2**62 * 1_000_003 + 1) % 2**63
    assert seeds.sdm_step_seed(S, 5, 1, 2) == legacy_step_seed(S, 5, 1, 2) == 6946170868141524852
    assert seeds.sdm_noise_seed(S, 5, 1) == legacy_step_seed(S, 5, 1, 2)
    assert seeds.sdm_dropout_seed(S, 5, 1) == legacy_step_seed(S, 5, 1, 4) == 5606366681220702903
    assert (seeds.SDM_CROP, seeds.SDM_NOISE, seeds.SDM_PREVIEW, seeds.SDM_DROPOUT) == (1, 2, 3, 4)
    assert seeds.segmenter_seed(S, 2, 0, 3) == S + 2  # one training seed: seed + fold
    assert seeds.segmenter_seed(S, 2, 1, 3) == S + 2 + 3
    assert seeds.utility_seed(S, 2) == S + 2
    assert seeds.weights_seed(S) == S and seeds.preview_noise_seed(S) == S


def test_streams_are_distinct() -> None:
    numpy_streams = {
        "enlarge": seeds.enlarge_rng(S, 3, 5),
        "balance": seeds.balance_rngs(S, 4)[3],
        "folds": seeds.fold_rng(S),
        "held_out": seeds.held_out_rng(S),
        "mix": seeds.mix_rng(S, 3),
        "epoch_order": seeds.epoch_order_rng(S, 5),
        "item": seeds.item_rng(S, 3, 4),
        "sdm_order": seeds.sdm_order_rng(S, 5),
        "sdm_crop": seeds.sdm_crop_rng(S, 3, 5),
        "sdm_preview": seeds.sdm_preview_rng(S),
        "plain seed": np.random.default_rng(S),
    }
    first = {name: tuple(draws(rng)) for name, rng in numpy_streams.items()}
    assert len(set(first.values())) == len(first), first
    tags = [seeds.sdm_step_seed(S, 3, 5, tag) for tag in range(5)]
    assert len(set(tags)) == 5
    # each stream varies with each of its coordinates
    for make in (lambda a, b: seeds.enlarge_rng(a, b, 5), lambda a, b: seeds.enlarge_rng(a, 3, b),
                 lambda a, b: seeds.item_rng(a, b, 5), lambda a, b: seeds.mix_rng(a, b),
                 lambda a, b: seeds.epoch_order_rng(a, b), lambda a, b: seeds.sdm_order_rng(a, b)):
        values = {tuple(draws(make(a, b))) for a, b in itertools.product((S, S + 1), (3, 4))}
        assert len(values) == 4
    assert len({seeds.sdm_noise_seed(s, t, r) for s, t, r in itertools.product((1, 2), (0, 1), (0, 1))}) == 8
    assert len({seeds.patch_seed(S, n, i, k) for n in ("a", "b") for i in (0, 1) for k in ("balance", "enlarge")}) == 8


def test_documented_legacy_overlaps() -> None:
    """The overlaps the module docstring lists, so that the list stays true."""
    same = lambda a, b: draws(a) == draws(b)  # noqa: E731
    assert same(seeds.fold_rng(S), seeds.enlarge_rng(S, 1, 0)) and same(seeds.fold_rng(S), seeds.item_rng(S, 1, 0))
    assert same(seeds.held_out_rng(S), seeds.item_rng(S, 2, 0))
    assert same(seeds.enlarge_rng(S, 3, 5), seeds.item_rng(S, 3, 5))
    assert same(seeds.sdm_order_rng(S, 5), seeds.item_rng(S, 0, 5))
    assert same(seeds.mix_rng(S, 3), seeds.item_rng(S, 7919, 3))
    assert same(seeds.epoch_order_rng(S, 5), seeds.item_rng(S, 104729, 5))
