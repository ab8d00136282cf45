"""SDM training items: a random crop plus one of the six spec-5 augmentations, drawn counter-based.

spec 5: the dataset has 6 x #images items; item i is image i // 6 under augmentation i % 6,
and every draw of an item takes a fresh uniform random crop. The official loader shuffles a
DataLoader and cycles it forever; here the item order and the crops are pure functions of
(seed, step, rank): the step's global positions index a stream of per-epoch permutations, and
the crop offsets come from a Generator seeded with (seed, step, rank) (`diffmix.seeds` names
both). So a resumed run draws exactly the items the uninterrupted run would have drawn, without
any loader state, and DDP ranks draw disjoint slices of the same stream (no item repeats
within an epoch across ranks).
Unlike the official `drop_last` DataLoader the stream runs on across epoch ends, so datasets
with fewer than batch-size items still train.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from diffmix.data.patches import augment, random_crop
from diffmix.data.sample import NucleiSample
from diffmix.errors import DataError
from diffmix.seeds import sdm_crop_rng, sdm_noise_seed, sdm_order_rng, sdm_preview_rng

NUM_AUGMENTATIONS = 6  # spec 5: identity, rot90 x1/x2/x3, flip W, flip H


def item_indices(
    num_items: int, step: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
) -> np.ndarray:
    """int64 (batch_size,) item indices this rank trains on at `step` (0-based).

    Global position p = (step * world_size + rank) * batch_size + j walks a stream made of one
    permutation of 0..num_items-1 per epoch, permutation e drawn from (seed, e).
    """
    if num_items < 1:
        raise DataError("SDM training needs at least one image")
    pos = (step * world_size + rank) * batch_size + np.arange(batch_size, dtype=np.int64)
    epochs, within = np.divmod(pos, num_items)
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        perm = sdm_order_rng(seed, epoch).permutation(num_items)
        sel = epochs == epoch
        out[sel] = perm[within[sel]]
    return out


def make_item(sample: NucleiSample, augmentation: int, crop_size: int, rng: np.random.Generator) -> NucleiSample:
    """One training item: a uniform random `crop_size` crop of `sample`, then augmentation 0..5."""
    return augment(random_crop(sample, crop_size, rng), augmentation)


@dataclass
class TrainBatch:
    """A batch of training items, ready for the network.

    image: float32 (B, 3, H, W) in [-1, 1] (spec 5: /127.5 - 1, clipped);
    inst_map: int32 (B, H, W); type_map: int64 (B, H, W) merged classes; items: (B,) indices.
    """

    image: torch.Tensor
    inst_map: torch.Tensor
    type_map: torch.Tensor
    items: np.ndarray


def image_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1] (spec 5)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return (x / 127.5 - 1.0).clamp(-1.0, 1.0)


def stack_samples(samples: Sequence[NucleiSample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image float32 (B,3,H,W) in [-1,1], inst_map int32 (B,H,W), type_map int64 (B,H,W)) of equal-size samples."""
    shapes = {s.shape for s in samples}
    if len(shapes) != 1:
        raise DataError(f"cannot batch samples of different sizes: {sorted(shapes)}")
    image = image_to_tensor(np.stack([s.image for s in samples]))
    inst = torch.from_numpy(np.stack([s.inst_map for s in samples]).astype(np.int32))
    types = torch.from_numpy(np.stack([s.type_map for s in samples]).astype(np.int64))
    return image, inst, types


def training_batch(
    samples: Sequence[NucleiSample],
    step: int,
    batch_size: int,
    crop_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> TrainBatch:
    """The batch this rank trains on at `step`: same arguments -> the same arrays, bit for bit."""
    if not samples:
        raise DataError("SDM training needs at least one image")
    small = [s.name for s in samples if min(s.shape) < crop_size]
    if small:
        raise DataError(f"images smaller than the {crop_size}-px training crop: {small[:5]}")
    items = item_indices(NUM_AUGMENTATIONS * len(samples), step, batch_size, seed, rank, world_size)
    rng = sdm_crop_rng(seed, step, rank)
    crops = [make_item(samples[i // NUM_AUGMENTATIONS], int(i % NUM_AUGMENTATIONS), crop_size, rng) for i in items]
    image, inst, types = stack_samples(crops)
    return TrainBatch(image=image, inst_map=inst, type_map=types, items=items)


def noise_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """CPU generator for a step's timesteps, noise and label-drop draws (counter-based, see module doc)."""
    return torch.Generator().manual_seed(sdm_noise_seed(seed, step, rank))


def preview_batch(samples: Sequence[NucleiSample], count: int, crop_size: int, seed: int) -> TrainBatch:
    """A fixed batch for the sample grids: `count` un-augmented crops drawn once from `seed`."""
    rng = sdm_preview_rng(seed)
    picks = [samples[i % len(samples)] for i in range(count)]
    crops = [random_crop(s, crop_size, rng) for s in picks]
    image, inst, types = stack_samples(crops)
    return TrainBatch(image=image, inst_map=inst, type_map=types, items=np.arange(count) % len(samples))
