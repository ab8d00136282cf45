"""Utility of synthetic data: does adding its nuclei help a classifier type REAL nuclei?

The fast inner loop of the CoNSeP study (docs/study.md). Label fidelity (`diffmix.fidelity`)
asks whether a synthetic image shows the nuclei its map says; utility asks the question that
matters downstream, per class and in minutes on a CPU: a small nucleus-type classifier is
trained on crops around ground-truth nuclei (RGB + that nucleus's instance mask, so the
segmentation is given and only the class is learned) from real training images, with or
without the nuclei of a synthetic set, for the same number of optimiser steps, and scored on
every nucleus of real test images. If synthetic rare-class nuclei look like the rare class,
its F1 rises; if they are noise with a rare-class label, the classifier learns a prior shift
at best. The control arm "real, class-balanced" separates the two: it sees only real nuclei,
drawn so that every class is equally likely, i.e. the same prior shift with no new pixels.

Intervals: each arm is trained with several seeds; scores are computed from per-image
confusion matrices, so `diffmix.stats` resamples test images (and seeds) for 95% intervals
of each arm and of paired differences against the real-only arm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from diffmix.data.io import Dataset
from diffmix.data.schemes import ClassScheme
from diffmix.errors import DataError
from diffmix.metrics.classification import instance_types_centroids
from diffmix.stats import N_BOOT, format_interval, paired_difference, run_mean_interval

__all__ = [
    "NucleusCrops",
    "UtilitySettings",
    "nucleus_crops",
    "NucleusClassifier",
    "train_classifier",
    "predict",
    "scores_from_confusion",
    "utility_study",
    "format_utility",
]

REAL = "real"
REAL_BALANCED = "real, class-balanced"


@dataclass(frozen=True)
class UtilitySettings:
    """Everything that determines a utility classifier (same for every arm of a study)."""

    crop: int = 32  # px around the centroid: a CoNSeP nucleus at 40x is 8-30 px across
    width: int = 16  # channels of the first block (x2, x4 deeper): ~100 k parameters
    steps: int = 1500  # optimiser steps per classifier, whatever the pool size
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4


@dataclass
class NucleusCrops:
    """Crops around nuclei: `crops` uint8 (N, 4, S, S) (RGB + the nucleus's mask, 0/255),
    `labels` int64 (N,) merged class ids, `image` int64 (N,) index into `names`."""

    crops: np.ndarray
    labels: np.ndarray
    image: np.ndarray
    names: list[str]

    def __len__(self) -> int:
        return int(self.labels.size)

    @staticmethod
    def concat(parts: Sequence["NucleusCrops"]) -> "NucleusCrops":
        names: list[str] = []
        images = []
        for p in parts:
            images.append(p.image + len(names))
            names += p.names
        return NucleusCrops(
            np.concatenate([p.crops for p in parts]),
            np.concatenate([p.labels for p in parts]),
            np.concatenate(images),
            names,
        )


def nucleus_crops(samples: Sequence, size: int = 32, classes: Sequence[int] | None = None) -> NucleusCrops:
    """Crops of `size` x `size` px centred on every nucleus of `samples` (NucleiSample).

    The image is reflect-padded so nuclei at borders get full crops (a 64-px synthetic patch
    is mostly border); the mask channel marks the nucleus itself, so the classifier is told
    which of the nuclei in the crop to type. classes: keep only nuclei of these class ids.
    """
    if size < 8 or size % 2:
        raise DataError(f"crop size must be even and >= 8, got {size}")
    half = size // 2
    crops, labels, image = [], [], []
    names = []
    for k, s in enumerate(samples):
        ids, xy, types = instance_types_centroids(s.inst_map, s.type_map)
        names.append(s.name)
        if ids.size == 0:
            continue
        img = np.pad(s.image, ((half, half), (half, half), (0, 0)), mode="reflect")
        inst = np.pad(s.inst_map, half)
        keep = np.ones(ids.size, bool) if classes is None else np.isin(types, list(classes))
        for i in np.flatnonzero(keep):
            cy, cx = int(round(xy[i, 1])) + half, int(round(xy[i, 0])) + half
            window = (slice(cy - half, cy + half), slice(cx - half, cx + half))
            crop = np.empty((4, size, size), np.uint8)
            crop[:3] = img[window].transpose(2, 0, 1)
            crop[3] = (inst[window] == ids[i]) * np.uint8(255)
            crops.append(crop)
            labels.append(int(types[i]))
            image.append(k)
    if not crops:
        return NucleusCrops(np.zeros((0, 4, size, size), np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int64), names)
    return NucleusCrops(np.stack(crops), np.asarray(labels, np.int64), np.asarray(image, np.int64), names)


class NucleusClassifier(nn.Module):
    """A small CNN on (B, 4, S, S) crops in [0, 1] -> (B, K) logits for classes 1..K."""

    def __init__(self, num_classes: int, width: int = 16) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        w = width
        self.features = nn.Sequential(
            *block(4, w), *block(w, w), nn.MaxPool2d(2),
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w), *block(4 * w, 4 * w), nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def _dihedral(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each crop under its own random element of the dihedral group (nuclei have no up)."""
    n = x.shape[0]
    flips = torch.randint(0, 2, (3, n), generator=g).bool()
    x = torch.where(flips[0, :, None, None, None], x.flip(-1), x)
    x = torch.where(flips[1, :, None, None, None], x.flip(-2), x)
    return torch.where(flips[2, :, None, None, None], x.transpose(-1, -2), x)


def train_classifier(
    pool: NucleusCrops,
    num_classes: int,
    settings: UtilitySettings,
    seed: int,
    *,
    balanced: bool = False,
    progress: Callable[[int], None] | None = None,
) -> NucleusClassifier:
    """Train on `pool` for `settings.steps` steps of batches drawn with replacement.

    balanced: draw every class with equal probability (then uniformly within it), instead of
    every nucleus with equal probability. All draws come from `seed`.
    """
    if len(pool) == 0:
        raise DataError("no nuclei to train the utility classifier on")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = NucleusClassifier(num_classes, settings.width)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, settings.lr, total_steps=settings.steps, pct_start=0.1)
    if balanced:
        present, counts = np.unique(pool.labels, return_counts=True)
        weight = 1.0 / counts[np.searchsorted(present, pool.labels)]
        p = weight / weight.sum()
    else:
        p = None
    crops = torch.from_numpy(pool.crops)
    targets = torch.from_numpy(pool.labels - 1)
    model.train()
    for step in range(settings.steps):
        idx = torch.from_numpy(rng.choice(len(pool), settings.batch_size, replace=True, p=p))
        x = _dihedral(crops[idx].float().div_(255.0), g)
        loss = nn.functional.cross_entropy(model(x), targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress(step)
    model.eval()
    return model


@torch.inference_mode()
def predict(model: NucleusClassifier, crops: NucleusCrops, batch_size: int = 512) -> np.ndarray:
    """Predicted class ids (1..K) of every crop."""
    out = []
    for i in range(0, len(crops), batch_size):
        x = torch.from_numpy(crops.crops[i : i + batch_size]).float().div_(255.0)
        out.append(model(x).argmax(1).numpy() + 1)
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def confusion_per_image(truth: NucleusCrops, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(n_images, K, K) int64: [image, true class - 1, predicted class - 1] counts."""
    k = num_classes
    flat = (truth.image * k + (truth.labels - 1)) * k + (pred - 1)
    return np.bincount(flat, minlength=len(truth.names) * k * k).reshape(len(truth.names), k, k)


def scores_from_confusion(conf: np.ndarray, class_ids: Sequence[int]) -> dict[str, Any]:
    """Accuracy, per-class F1 = 2TP / (2TP + FP + FN) and their mean (macro F1) from a K x K
    confusion matrix (rows true). A class never true nor predicted has F1 1 (nothing missed,
    nothing wrongly claimed), as in the segmentation type statistics."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    fp = conf.sum(0) - tp
    fn = conf.sum(1) - tp
    den = 2 * tp + fp + fn
    f1 = np.where(den > 0, 2 * tp / np.where(den > 0, den, 1), 1.0)
    total = conf.sum()
    return {
        "acc": float(tp.sum() / total) if total else 1.0,
        "f1": {int(c): float(v) for c, v in zip(class_ids, f1)},
        "macro_f1": float(f1.mean()),
    }


def _metric(conf: np.ndarray, class_ids: Sequence[int], key: str) -> Callable[[int, np.ndarray], float]:
    """Statistic (seed, image indices) -> score on those images, from (seeds, images, K, K)."""
    if key.startswith("f1_"):
        cls = int(key[3:])
        return lambda s, imgs: scores_from_confusion(conf[s, imgs].sum(0), class_ids)["f1"][cls]
    return lambda s, imgs: scores_from_confusion(conf[s, imgs].sum(0), class_ids)[key]


def utility_study(
    train: Dataset,
    test: Dataset,
    synthetic: Mapping[str, Dataset],
    *,
    settings: UtilitySettings = UtilitySettings(),
    seeds: Sequence[int] = (0, 1, 2),
    balanced_control: bool = True,
    n_boot: int = N_BOOT,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one classifier per (arm, seed) and score it on every nucleus of `test`.

    train: real training images (all their nuclei). test: real images to score on.
    synthetic: label -> synthetic dataset whose nuclei are ADDED to the real ones (arm
        "real + label"); their class ids must be the scheme's.
    Returns {"arms": {arm: {"mean": scores, "seeds": [scores], "intervals": {metric:
    interval}}}, "differences": {arm: {metric: paired interval of arm - real}},
    "recognition": {"classifier": arm, "sets": {"real test" | label: {"recall": {class: share
    of that class's nuclei the real-data classifier types as it, over seeds}, "n": nuclei}}},
    "n_train": {arm: nuclei per class}, "n_test": nuclei per class, "n_test_images", "settings",
    "seeds"}: no wall-clock times, so the same inputs give the same bytes.
    Metrics: acc, macro_f1 and f1_<class id>.
    """
    scheme: ClassScheme = train.scheme
    for label, ds in [("test", test), *synthetic.items()]:
        if ds.scheme.class_ids != scheme.class_ids:
            raise DataError(f"{label} uses classes {ds.scheme.class_ids}, the training set {scheme.class_ids}")
    if not seeds:
        raise DataError("give at least one seed")
    class_ids = list(scheme.class_ids)
    k = len(class_ids)
    if class_ids != list(range(1, k + 1)):
        raise DataError(f"class ids must be 1..K, got {class_ids}")
    real = nucleus_crops(train.samples, settings.crop)
    truth = nucleus_crops(test.samples, settings.crop)
    if len(truth) == 0:
        raise DataError("the test set has no nuclei")
    pools: dict[str, tuple[NucleusCrops, bool]] = {REAL: (real, False)}
    if balanced_control:
        pools[REAL_BALANCED] = (real, True)
    synth_crops = {label: nucleus_crops(ds.samples, settings.crop) for label, ds in synthetic.items()}
    for label, crops in synth_crops.items():
        pools[f"{REAL} + {label}"] = (NucleusCrops.concat([real, crops]), False)
    # Recognition: the real-only classifier (class-balanced when that arm runs, so the rare
    # class is predicted at all) types each synthetic set's nuclei; per-class recall against
    # the map's class says whether the SDM drew nuclei that look like their class, next to
    # the same classifier's recall on real test nuclei.
    judge = REAL_BALANCED if balanced_control else REAL
    recognised: dict[str, list[np.ndarray]] = {label: [] for label in ["real test", *synth_crops]}

    def count(c: NucleusCrops) -> dict[int, int]:
        return {cls: int(np.count_nonzero(c.labels == cls)) for cls in class_ids}

    confusions: dict[str, np.ndarray] = {}
    total = len(pools) * len(seeds) * settings.steps
    with tqdm(total=total, desc="utility", unit="step", disable=not progress) as bar:
        for arm, (pool, balanced) in pools.items():
            per_seed = []
            for seed in seeds:
                model = train_classifier(pool, k, settings, seed, balanced=balanced, progress=lambda _: bar.update())
                test_pred = predict(model, truth)
                per_seed.append(confusion_per_image(truth, test_pred, k))
                if arm == judge:
                    recognised["real test"].append(per_seed[-1].sum(0))
                    for label, crops in synth_crops.items():
                        recognised[label].append(confusion_per_image(crops, predict(model, crops), k).sum(0))
            confusions[arm] = np.stack(per_seed)

    metrics = ["acc", "macro_f1"] + [f"f1_{c}" for c in class_ids]
    n_s, n_i = len(seeds), len(truth.names)
    result: dict[str, Any] = {"arms": {}, "differences": {}}
    for arm, conf in confusions.items():
        per_seed_scores = [scores_from_confusion(c.sum(0), class_ids) for c in conf]
        intervals = {m: run_mean_interval(_metric(conf, class_ids, m), n_s, n_i, n_boot=n_boot) for m in metrics}
        result["arms"][arm] = {
            "mean": {m: intervals[m]["estimate"] for m in metrics},
            "seeds": per_seed_scores,
            "intervals": intervals,
        }
        if arm != REAL:
            result["differences"][arm] = {
                m: paired_difference(_metric(conf, class_ids, m), _metric(confusions[REAL], class_ids, m), n_s, n_i,
                                     n_boot=n_boot)
                for m in metrics
            }
    result["recognition"] = {"classifier": judge, "sets": {}}
    for label, confs in recognised.items():
        conf = np.sum(confs, axis=0)
        true_n = conf.sum(1)
        recall = np.where(true_n > 0, np.diag(conf) / np.maximum(true_n, 1), np.nan)
        result["recognition"]["sets"][label] = {
            "recall": {int(c): (None if np.isnan(r) else float(r)) for c, r in zip(class_ids, recall)},
            "n": {int(c): int(n) // len(seeds) for c, n in zip(class_ids, true_n)},
        }
    result["n_train"] = {arm: count(pool) for arm, (pool, _) in pools.items()}
    result["n_test"] = count(truth)
    result["n_test_images"] = n_i
    result["settings"] = settings.__dict__.copy()
    result["seeds"] = [int(s) for s in seeds]
    return result


def format_utility(result: Mapping[str, Any], scheme: ClassScheme) -> str:
    """Two plain-text tables: each arm's scores with 95% intervals, then arm - real."""
    metrics = [("acc", "Acc"), ("macro_f1", "macro F1")] + [
        (f"f1_{c}", f"F1 {scheme.class_name(c)}") for c in scheme.class_ids
    ]
    width = max(len(a) for a in result["arms"]) + 2
    lines = [f"{'arm':<{width}}" + "".join(f"{h:>24}" for _, h in metrics)]
    for arm, r in result["arms"].items():
        lines.append(f"{arm:<{width}}" + "".join(f"{format_interval(r['intervals'][m]):>24}" for m, _ in metrics))
    lines.append("")
    lines.append(f"{'difference vs real':<{width}}" + "".join(f"{h:>24}" for _, h in metrics))
    for arm, d in result["differences"].items():
        lines.append(f"{arm:<{width}}" + "".join(f"{format_interval(d[m], True):>24}" for m, _ in metrics))
    rec = result.get("recognition")
    if rec:
        lines.append("")
        lines.append(f"{'recognised as their class':<{width}}" + "".join(
            f"{'recall ' + scheme.class_name(c):>24}" for c in scheme.class_ids))
        for label, r in rec["sets"].items():
            cells = []
            for c in scheme.class_ids:
                v = r["recall"].get(c, r["recall"].get(str(c)))
                cells.append(f"{'-' if v is None else f'{v:.3f}'} (n={r['n'].get(c, r['n'].get(str(c)))})")
            lines.append(f"{label:<{width}}" + "".join(f"{x:>24}" for x in cells))
        lines.append(f"(by the '{rec['classifier']}' classifier, trained on real nuclei only)")
    n = result["n_test"]
    lines.append(
        f"(95% intervals over {result['n_test_images']} test images and {len(result['seeds'])} seeds; "
        f"test nuclei per class: {', '.join(f'{scheme.class_name(c)} {n[c]}' for c in scheme.class_ids)})"
    )
    return "\n".join(lines)
