"""Named random streams: every seed derivation of diffmix, in one table.

A run has one user seed; each part of it that draws gets its own stream, so that (a) adding
or reordering draws in one part never shifts another part's numbers, and (b) one unit of work
(a patch, a training item, a step) can be redone alone (on resume, in another process, on
another rank) and draw exactly what it drew in the uninterrupted run. So every stream is a pure
function of the run seed and the unit's coordinates, never of how many draws came before
(design.md: same inputs + same seed = same bytes out).

Legacy keys. These derivations predate this module and are kept bit for bit: they decide every
output and every run identity already on disk (synthetic datasets, checkpoints, experiment
folders that resume). So each named stream maps to its legacy key, tags included: the primes
7919 and 104729 of the segmenter's data, the stream numbers 0..4 of SDM training, the SHA-256
of synthesis noise. `tests/test_seeds.py` pins every stream to its legacy formula and to the
numbers it draws.

======================  =====================================  ==============================================
stream                  key (legacy)                           drawn by
======================  =====================================  ==============================================
patch noise             SHA-256 of JSON [seed, source name,    synthesis: a patch's start noise and eta > 0
``patch_seed``          patch index, map kind], low 63 bits    step noise (torch.Generator); by name, so
                                                               independent of planning, batching, subsets
enlarge maps            default_rng([seed, image, patch])      maps enlarge / DiffMix-E: one patch's shifts
``enlarge_rng``                                                and drops (spec 6b), also in synth's maps
balance maps            SeedSequence(seed).spawn(N)[image]     maps balance / DiffMix-B / GradMix: one target
``balance_rngs``                                               image's swaps (spec 6a)
folds                   default_rng([seed, 1])                 experiment: the k-fold shuffle of images
``fold_rng``
held-out split          default_rng([seed, 2])                 experiment: the test images held out of a
``held_out_rng``                                               training folder without a test split
segmenter run           seed + fold + seed_index * folds       experiment: one segmenter run's seed (fold f,
``segmenter_seed``                                             training seed s); seed_index 0 gives seed + f
utility run             seed + seed_index                      experiment: one utility-study classifier
``utility_seed``
segmenter mix           default_rng([seed, 7919, source])      seg: which samples a counted source lends
``mix_rng``                                                    to the run (once per run)
epoch order             default_rng([seed, 104729, epoch])     seg: one epoch's order of the plan (or its
``epoch_order_rng``                                            repeat-factor draws)
training item           default_rng([seed, epoch, position])   seg: one item's crop, flips/warp, jitter
``item_rng``
loader                  (seed * 1_000_003 + epoch) % 2**63     seg: the DataLoader's torch.Generator (worker
``loader_seed``                                                base seeds only: items draw from item_rng)
SDM item order          default_rng([seed, 0, epoch])          SDM training: one epoch's permutation of items
``sdm_order_rng``
SDM step streams        SeedSequence([seed, tag, step, rank])  SDM training, per step and rank; tag 1 crops
``sdm_step_seed``       .generate_state(2) as 63 bits          (``sdm_crop_rng``), 2 timesteps/noise/label
                                                               drop (``sdm_noise_seed``), 3 preview crops
                                                               (``sdm_preview_rng``, step 0 rank 0), 4 the
                                                               global torch RNG for dropout
                                                               (``sdm_dropout_seed``)
initial weights         the run seed itself                    SDM and segmenter training: torch.manual_seed
``weights_seed``                                               before building the network
preview noise           the run seed itself                    SDM training: the sample grids' start noise
``preview_noise_seed``                                         (torch.Generator)
======================  =====================================  ==============================================

Why the streams are independent: numpy's SeedSequence hashes the whole key, so keys that differ
anywhere give unrelated generators; the spawned balance streams carry a spawn key (assembled
entropy [seed, 0, 0, 0, image], five words, a length no list key here has); the SDM step seeds
are 4-word keys turned into integers; patch noise is a SHA-256, seeding torch, not numpy.

Overlaps inherited from the legacy keys (kept: re-keying would change every output above):
- SeedSequence pads keys with zeros, so keys differing only by trailing zeros are one stream:
  [s] = [s, 0] = [s, 0, 0]. Hence ``fold_rng(s)`` = ``enlarge_rng(s, 1, 0)`` =
  ``item_rng(s, 1, 0)`` and ``held_out_rng(s)`` = ``enlarge_rng(s, 2, 0)`` = ``item_rng(s, 2, 0)``.
- ``enlarge_rng(s, i, k)`` and ``item_rng(s, i, k)`` have the same key form: the same numbers when
  a segmenter run's seed equals the maps' seed and (epoch, position) = (image, patch). In an
  experiment the fold-0 segmenter of training seed 0 runs with the experiment seed, which also
  seeds DiffMix-E's maps; the shared numbers drive unrelated choices (a crop offset and flip
  there, a nucleus shift and drop here), so no data is repeated, but those draws are not
  independent. Likewise ``sdm_order_rng(s, e)`` = ``item_rng(s, 0, e)`` = ``enlarge_rng(s, 0, e)``
  (different commands), and ``mix_rng(s, j)`` = ``item_rng(s, 7919, j)``,
  ``epoch_order_rng(s, e)`` = ``item_rng(s, 104729, e)`` (only in runs of 7919+ epochs).
- Initial weights (the global torch RNG) and preview noise (a torch.Generator) both start from
  the run seed, so they read one Mersenne Twister sequence (as uniforms vs normals).
- Run seeds are sums, so neighbouring configurations share runs: experiment seed 0 fold 1 trains
  the segmenter that experiment seed 1 fold 0 trains.
Not listed: functions that take a seed and draw from it alone (the toy dataset, bootstrap
intervals in `diffmix.stats`, the utility classifier) seed their generators with it directly, as
design.md asks; the utility classifier seeds the global torch RNG and a torch.Generator with the
same value, so those two read one sequence too.
A new stream should take a key no legacy key can produce: `default_rng([seed, TAG, ...])` with a
fresh TAG of 2**31 or more (no count of epochs, images or patches reaches it), listed here.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

__all__ = [
    "SDM_CROP",
    "SDM_DROPOUT",
    "SDM_NOISE",
    "SDM_PREVIEW",
    "balance_rngs",
    "enlarge_rng",
    "epoch_order_rng",
    "fold_rng",
    "held_out_rng",
    "item_rng",
    "loader_seed",
    "mix_rng",
    "patch_seed",
    "preview_noise_seed",
    "sdm_crop_rng",
    "sdm_dropout_seed",
    "sdm_noise_seed",
    "sdm_order_rng",
    "sdm_preview_rng",
    "sdm_step_seed",
    "segmenter_seed",
    "utility_seed",
    "weights_seed",
]

# Tags of the SDM training streams (legacy `sdm.data` stream numbers; 0 is the item order).
SDM_ORDER, SDM_CROP, SDM_NOISE, SDM_PREVIEW, SDM_DROPOUT = 0, 1, 2, 3, 4
# Tags of the segmenter's data streams (legacy primes, see the module docstring).
_SEG_MIX, _SEG_EPOCH_ORDER = 7919, 104729
# Tags of the experiment's splits (legacy).
_FOLDS, _HELD_OUT = 1, 2


# --------------------------------------------------------------------------- synthesis and maps


def patch_seed(seed: int, source: str, patch_index: int, kind: str) -> int:
    """A 63-bit torch seed for one synthesized patch, from (run seed, source image name, patch
    index, map kind).

    Derived by SHA-256 of the four values, so it does not depend on the order in which
    patches are planned, batched or split over processes, and the image is identified by its
    name (stable when the dataset is subset), not by its position.
    """
    key = json.dumps([int(seed), str(source), int(patch_index), str(kind)]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1)


def enlarge_rng(seed: int, image_index: int, patch_index: int) -> np.random.Generator:
    """The stream of one enlarging map (spec 6b): grid patch `patch_index` of image `image_index`,
    so a patch's map does not depend on how many other patches are made."""
    return np.random.default_rng([seed, image_index, patch_index])


def balance_rngs(seed: int, count: int) -> list[np.random.Generator]:
    """One stream per target image of a balancing plan (spec 6a), so an image's swaps do not
    depend on the order in which images are processed."""
    return [np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(count)]


# --------------------------------------------------------------------------- experiment


def fold_rng(seed: int) -> np.random.Generator:
    """The k-fold shuffle of an experiment's training images."""
    return np.random.default_rng([seed, _FOLDS])


def held_out_rng(seed: int) -> np.random.Generator:
    """The choice of test images held out of a training folder that has no test split."""
    return np.random.default_rng([seed, _HELD_OUT])


def segmenter_seed(seed: int, fold: int, seed_index: int, folds: int) -> int:
    """The seed of one segmenter run of an experiment: fold `fold`, training seed `seed_index`
    of each fold. Training seed 0 keeps the single-seed rule seed + fold."""
    return seed + fold + seed_index * folds


def utility_seed(seed: int, seed_index: int) -> int:
    """The seed of the utility study's `seed_index`-th classifier."""
    return seed + seed_index


# --------------------------------------------------------------------------- segmenter data


def mix_rng(seed: int, source_index: int) -> np.random.Generator:
    """Which samples a counted training source contributes (drawn once per run)."""
    return np.random.default_rng([seed, _SEG_MIX, source_index])


def epoch_order_rng(seed: int, epoch: int) -> np.random.Generator:
    """The order in which one epoch visits the training plan."""
    return np.random.default_rng([seed, _SEG_EPOCH_ORDER, epoch])


def item_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
    """One training item's crop offset, dihedral element or warp, and colour jitter."""
    return np.random.default_rng([seed, epoch, position])


def loader_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's DataLoader generator (worker base seeds; no data is drawn from it)."""
    return (int(seed) * 1_000_003 + int(epoch)) % 2**63


# --------------------------------------------------------------------------- SDM training


def sdm_order_rng(seed: int, epoch: int) -> np.random.Generator:
    """One epoch's permutation of SDM training items."""
    return np.random.default_rng([int(seed), SDM_ORDER, int(epoch)])


def sdm_step_seed(seed: int, step: int, rank: int, stream: int) -> int:
    """A 63-bit seed derived from (seed, step, rank, stream tag) by numpy's SeedSequence hashing."""
    state = np.random.SeedSequence([int(seed), int(stream), int(step), int(rank)]).generate_state(2, np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def sdm_crop_rng(seed: int, step: int, rank: int) -> np.random.Generator:
    """The crop offsets of one SDM training step on one rank."""
    return np.random.default_rng(sdm_step_seed(seed, step, rank, SDM_CROP))


def sdm_noise_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one SDM step's timesteps, noise and label-drop draws on one rank."""
    return sdm_step_seed(seed, step, rank, SDM_NOISE)


def sdm_preview_rng(seed: int) -> np.random.Generator:
    """The crops of the fixed preview batch (drawn once per run)."""
    return np.random.default_rng(sdm_step_seed(seed, 0, 0, SDM_PREVIEW))


def sdm_dropout_seed(seed: int, step: int, rank: int) -> int:
    """The global torch RNG's seed for one SDM step's dropout on one rank."""
    return sdm_step_seed(seed, step, rank, SDM_DROPOUT)


def weights_seed(seed: int) -> int:
    """The global torch seed set before a network is built (its initial weights): the run seed."""
    return seed


def preview_noise_seed(seed: int) -> int:
    """The start noise of SDM training's sample grids: the run seed."""
    return seed
