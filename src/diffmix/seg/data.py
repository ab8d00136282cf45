"""Training items for the segmenter: mixed original + synthetic datasets -> augmented patches + targets.

An item is fully determined by (seed, epoch, position): its crop offset, dihedral element and
colour jitter come from `diffmix.seeds.item_rng(seed, epoch, position)`. Nothing about the
data stream is stateful, so a resumed run (any step, any number of ranks) draws exactly the
patches the uninterrupted run would have drawn, without saving loader state.

Mixing (the pipeline issue decides the sizes): each source is a `Dataset` with an optional
sample count. `count=None` uses every sample of the source once per epoch; `count=n` uses n
samples, drawn once per run without replacement (with replacement only beyond the source's
size), so e.g. "original + 500 synthetic patches" is one list of sources. A sample larger than
the patch contributes several random crops per epoch (`crops_of`, default by area), so large
tiles (CoNSeP 1000x1000) and small synthetic patches (256x256) weigh by their pixel area.

Patch geometry per model (see `diffmix.seg.models`): the patch is the model's `input_size`
(256 for hovernet-fast, 270 for hovernet-original) or the configured `patch_size` for the small
net; targets are centre-cropped by `crop_margin`. Sources smaller than the patch (256 synthetic
patches for a 270-input model) are mirror-padded (image reflected, labels padded with
background, so no nucleus is duplicated; the padded band lies outside the 80x80 output window).

SONNET (`targets="sonnet"`, `context=True`): the targets are NP, TP and the ordinal map
(`diffmix.seg.sonnet.targets`) instead of NP, HV, TP, and every sample is first padded by the
crop margin on each side (image mirrored, labels background), so that the output window, not
the input window, ranges over the whole sample: with 97 px of context per side a 270 input
supervises only its centre 76x76, and without the padding a 256 synthetic patch would teach
only its centre 76x76 (9 %) while a 1000 px tile would never teach its 97 px border (notes 10;
the official extraction pads 540 windows the same way). The number of crops per sample
('area') is then counted in output windows: floor(256/76)^2 = 9 per synthetic patch.

Rare classes (`repeat_threshold`, repeat-factor sampling of Gupta et al., LVIS, CVPR 2019): by
default every planned crop is equally likely. With a threshold t, f_c is the fraction of planned
entries whose sample holds a class-c nucleus, and an entry is drawn with probability
proportional to r = max(1, max over its classes of sqrt(t / f_c)) (with replacement, the epoch's
length unchanged). A class is judged present in the whole sample, which is exact for the
experiment's grid patches (one crop per sample) and coarse for large tiles.

Augmentation, one of two (`augmentation`):
- "light" (the default): the 8 dihedral flips/rotations of `diffmix.data.patches`, then colour
  jitter (brightness, contrast, saturation, each uniform in +-`colour_jitter`);
- "hovernet": HoVer-Net's official pipeline with its ranges (`diffmix.seg.augment`): affine warp
  (scale, shear, rotation, translation; nearest-neighbour, the same sampling for image and label
  maps), flips, then blur/median/noise and hue, saturation, brightness, contrast jitter.
Both draw from the item's generator, so either keeps items a pure function of (seed, epoch,
position).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from diffmix.data.io import Dataset
from diffmix.data.patches import dihedral_arrays
from diffmix.data.sample import NucleiSample
from diffmix.errors import ClassSchemeError, ConfigError
from diffmix.seeds import epoch_order_rng, item_rng, loader_seed, mix_rng
from diffmix.seg.augment import hovernet_augment
from diffmix.seg.sonnet.targets import make_sonnet_targets
from diffmix.seg.targets import make_targets


#: Training augmentations of `PatchItems` (module docstring).
AUGMENTATIONS = ("light", "hovernet")
#: Target sets of `PatchItems`: HoVer-Net's (np, hv, tp) or SONNET's (np, tp, ord).
TARGETS = ("hovernet", "sonnet")


@dataclass(frozen=True)
class Source:
    """One dataset of the training mix; `count` None = every sample once per epoch."""

    dataset: Dataset
    count: int | None = None
    label: str = ""


def crops_of(sample: NucleiSample, patch_size: int, crops: int | str = 1) -> int:
    """How many random crops one sample contributes per epoch.

    "area": floor(H / patch) * floor(W / patch), at least 1, so a 1000x1000 CoNSeP tile gives
    9 crops of 256 per epoch and a 256x256 synthetic patch gives 1: every pixel is seen about
    once per epoch, as with hover_net's pre-extracted patch lists. An int: that many per sample.
    """
    if crops == "area":
        h, w = sample.inst_map.shape
        return max(1, (h // patch_size) * (w // patch_size))
    if not isinstance(crops, int) or crops < 1:
        raise ConfigError(f"crops_per_sample must be 'area' or an integer >= 1, got {crops!r}")
    return crops


def mix_plan(
    sources: Sequence[Source], seed: int, patch_size: int | None = None, crops: int | str = 1
) -> list[tuple[int, int]]:
    """The (source index, sample index) pairs one epoch iterates over (before shuffling).

    A sample appears `crops_of(sample, patch_size, crops)` times (each time a different crop).
    """
    plan: list[tuple[int, int]] = []
    for si, src in enumerate(sources):
        n = len(src.dataset)
        if n == 0:
            raise ConfigError(f"training source {src.label or si} holds no samples")
        if src.count is None:
            plan.extend((si, i) for i in range(n))
            continue
        if src.count < 0:
            raise ConfigError(f"training source {src.label or si}: sample count must be >= 0, got {src.count}")
        rng = mix_rng(seed, si)
        reps = -(-src.count // n)  # without replacement first, repeat only past the source size
        order = np.concatenate([rng.permutation(n) for _ in range(reps)])[: src.count]
        plan.extend((si, int(i)) for i in order)
    if not plan:
        raise ConfigError("the training mix is empty (every source has count 0)")
    if crops != 1:
        if patch_size is None and crops == "area":
            raise ValueError("crops='area' needs the patch size")
        plan = [e for e in plan for _ in range(crops_of(sources[e[0]].dataset.samples[e[1]], patch_size or 1, crops))]
    return plan


def repeat_factors(sources: Sequence[Source], plan: Sequence[tuple[int, int]], threshold: float) -> np.ndarray:
    """LVIS repeat factor of every plan entry (module docstring): max(1, max_c sqrt(t / f_c))
    over the classes c present in its sample, f_c the fraction of entries holding class c."""
    if not 0 < threshold <= 1:
        raise ConfigError(f"repeat_threshold must be in (0, 1], got {threshold}")
    presence: dict[tuple[int, int], np.ndarray] = {}
    for si, i in set(plan):
        classes = np.unique(sources[si].dataset.samples[i].type_map)
        presence[(si, i)] = classes[classes > 0]
    counts: dict[int, int] = {}
    for entry in plan:
        for c in presence[entry].tolist():
            counts[c] = counts.get(c, 0) + 1
    per_class = {c: max(1.0, float(np.sqrt(threshold * len(plan) / n))) for c, n in counts.items()}
    return np.array([max([per_class[c] for c in presence[e].tolist()], default=1.0) for e in plan])


def check_schemes(sources: Sequence[Source]) -> int:
    """K shared by every source; mixing datasets of different class schemes is refused."""
    ks = {(s.dataset.scheme.name, s.dataset.scheme.num_classes) for s in sources}
    nums = {k for _, k in ks}
    if len(nums) != 1:
        raise ClassSchemeError(
            "training datasets use different class schemes "
            f"({sorted(ks)}); synthetic data must be written in the original's scheme"
        )
    return nums.pop()


def pad_to(sample: NucleiSample, size: int, context: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, inst_map, type_map) padded by `context` px on every side, then to at least
    size x size, centred: image mirrored (reflect; symmetric when the pad exceeds the image),
    labels with background."""
    h, w = sample.inst_map.shape
    ph, pw = max(0, size - h - 2 * context), max(0, size - w - 2 * context)
    if not ph and not pw and not context:
        return sample.image, sample.inst_map, sample.type_map
    pads = ((context + ph // 2, context + ph - ph // 2), (context + pw // 2, context + pw - pw // 2))
    mode = "reflect" if sum(pads[0]) < h and sum(pads[1]) < w else "symmetric"
    image = np.pad(sample.image, pads + ((0, 0),), mode=mode)
    return image, np.pad(sample.inst_map, pads), np.pad(sample.type_map, pads)


def colour_jitter(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """float32 (H,W,3) in [0,1] -> jittered copy: brightness +-s, contrast and saturation x(1+-s)."""
    if strength <= 0:
        return image
    b, c, s = rng.uniform(-strength, strength, size=3)
    out = image + b
    mean = out.mean()
    out = (out - mean) * (1.0 + c) + mean
    grey = out.mean(axis=2, keepdims=True)
    out = (out - grey) * (1.0 + s) + grey
    return np.clip(out, 0.0, 1.0).astype(np.float32)


class PatchItems(torch.utils.data.Dataset):
    """Epoch-indexed training items: `item(epoch, position)` -> dict of tensors.

    Returns image float32 (3,H,W) in [0,1], np int64 (h,w), hv float32 (2,h,w), tp int64 (h,w)
    with H = `patch_size` and h = H - 2 * `crop_margin` (`diffmix.seg.targets.make_targets`);
    with `targets="sonnet"` ord int64 (h,w) in place of hv (`make_sonnet_targets`).
    `context=True` pads every sample by `crop_margin` first (module docstring).
    As a torch Dataset it serves the epoch set by `set_epoch`, indexed by position.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        patch_size: int,
        crop_margin: int = 0,
        seed: int = 0,
        augment: bool = True,
        jitter: float = 0.1,
        samples_per_epoch: int | None = None,
        crops: int | str = 1,
        augmentation: str = "light",
        targets: str = "hovernet",
        context: bool = False,
        repeat_threshold: float | None = None,
    ) -> None:
        self.sources = list(sources)
        self.num_classes = check_schemes(self.sources)
        self.patch_size = int(patch_size)
        self.crop_margin = int(crop_margin)
        if self.patch_size - 2 * self.crop_margin <= 0:
            raise ConfigError(f"patch size {patch_size} leaves no output after cropping {crop_margin} px per side")
        if targets not in TARGETS:
            raise ConfigError(f"targets must be one of {', '.join(TARGETS)}, got {targets!r}")
        self.targets = targets
        self.context = self.crop_margin if context else 0
        # with context padding a crop is one output window of the sample
        unit = self.patch_size - 2 * self.crop_margin if context else patch_size
        self.plan = mix_plan(self.sources, seed, unit, crops)
        self.seed = int(seed)
        self.augment = augment
        if augmentation not in AUGMENTATIONS:
            raise ConfigError(f"augmentation must be one of {', '.join(AUGMENTATIONS)}, got {augmentation!r}")
        self.augmentation = augmentation
        self.jitter = float(jitter)
        self.samples_per_epoch = samples_per_epoch
        self.epoch = 0
        self._orders: dict[int, np.ndarray] = {}
        self.draw_weights = None if repeat_threshold is None else repeat_factors(self.sources, self.plan, repeat_threshold)

    def epoch_length(self) -> int:
        return self.samples_per_epoch or len(self.plan)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Plan indices of one epoch: a permutation of the plan, or `samples_per_epoch` draws
        (whole permutations concatenated, so every sample appears before any repeats); with
        repeat factors, independent draws weighted by them."""
        if epoch not in self._orders:
            rng = epoch_order_rng(self.seed, epoch)
            n = self.epoch_length()
            if self.draw_weights is not None:
                p = self.draw_weights / self.draw_weights.sum()
                self._orders = {epoch: rng.choice(len(self.plan), size=n, replace=True, p=p)}
                return self._orders[epoch]
            reps = -(-n // len(self.plan))
            self._orders = {epoch: np.concatenate([rng.permutation(len(self.plan)) for _ in range(reps)])[:n]}
        return self._orders[epoch]

    def rank_positions(self, epoch: int, rank: int = 0, world_size: int = 1) -> list[int]:
        """Positions this rank trains on in `epoch` (DistributedSampler-style: the epoch's list,
        padded by wrap-around to a multiple of world_size, dealt round-robin)."""
        n = self.epoch_length()
        per_rank = -(-n // world_size)
        positions = [p % n for p in range(per_rank * world_size)]
        return positions[rank::world_size]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.epoch_length()

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        return self.item(self.epoch, int(position))

    def item(self, epoch: int, position: int) -> dict[str, torch.Tensor]:
        order = self.epoch_order(epoch)
        si, index = self.plan[int(order[position])]
        sample = self.sources[si].dataset.samples[index]
        rng = item_rng(self.seed, epoch, position)
        size = self.patch_size
        image, inst_map, type_map = pad_to(sample, size, self.context)
        h, w = inst_map.shape
        y = int(rng.integers(0, h - size + 1))
        x = int(rng.integers(0, w - size + 1))
        if self.augment and self.augmentation == "hovernet":
            image, inst_map, type_map = hovernet_augment(image, inst_map, type_map, y, x, size, rng)
            img = image.astype(np.float32) / 255.0
        else:
            win = (slice(y, y + size), slice(x, x + size))
            image, inst_map, type_map = image[win], inst_map[win], type_map[win]
            k = int(rng.integers(0, 8)) if self.augment else 0
            image, inst_map, type_map = dihedral_arrays(k, image, inst_map, type_map)
            img = image.astype(np.float32) / 255.0
            if self.augment:
                img = colour_jitter(img, self.jitter, rng)
        out = size - 2 * self.crop_margin
        if self.targets == "sonnet":
            t = make_sonnet_targets(inst_map, type_map, out_size=out if self.crop_margin else None)
            return {
                "image": torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),
                "np": torch.from_numpy(t["np"]),
                "tp": torch.from_numpy(t["tp"]),
                "ord": torch.from_numpy(t["ord"]),
            }
        targets = make_targets(inst_map, type_map, out_size=out if self.crop_margin else None)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),
            "np": torch.from_numpy(targets["np"]).long(),
            "hv": torch.from_numpy(targets["hv"]).float(),
            "tp": torch.from_numpy(targets["tp"]).long(),
        }


class _Positions(torch.utils.data.Dataset):
    """A fixed list of positions of one epoch, as a torch Dataset (what the DataLoader walks)."""

    def __init__(self, items: PatchItems, epoch: int, positions: Sequence[int]) -> None:
        self.items, self.epoch, self.positions = items, epoch, list(positions)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items.item(self.epoch, self.positions[i])


def epoch_loader(
    items: PatchItems, epoch: int, positions: Sequence[int], batch_size: int, num_workers: int = 0
) -> torch.utils.data.DataLoader:
    """Batches over `positions` in order (drop_last, as hover_net's training loader).

    The loader gets its own generator: without one, every iterator draws its workers' base
    seed from the global torch RNG, so a run resumed mid-epoch (one more iterator) carried a
    different RNG state into its checkpoints than the uninterrupted run. Items draw from their
    own counter-based generators (`PatchItems.item`), so the base seed changes no data.
    """
    return torch.utils.data.DataLoader(
        _Positions(items, epoch, positions),
        batch_size=batch_size,
        shuffle=False,
        drop_last=True,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(loader_seed(items.seed, epoch)),
    )
