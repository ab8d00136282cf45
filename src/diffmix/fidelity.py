"""Label fidelity: how well a segmenter trained on real data recovers a synthetic set's label maps.

The pathology analogue of SDM's mIoU metric (issue 7 item 2): a synthetic patch is only a good
training example if its image shows the nuclei its label map says it has. A downstream model
trained on REAL data is run over the synthetic images and its instances and classes are scored
against the conditioning maps (the synthetic dataset's labels) with the official metrics
(`diffmix.metrics`: per-image Dice/AJI/DQ/SQ/PQ averaged, type Acc and per-class F1 pooled).
Any dataset folder works: DiffMix-B/E patches, GradMix patches, or real data as a reference
(where it measures the segmenter itself, which bounds what a synthetic set can reach).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from diffmix.data.io import Dataset, read_dataset
from diffmix.data.schemes import ClassScheme
from diffmix.distributed import resolve_device
from diffmix.errors import ClassSchemeError
from diffmix.metrics import evaluate_samples
from diffmix.seg.infer import segment_image
from diffmix.seg.models import load_segmenter

__all__ = ["score_fidelity", "label_fidelity", "format_fidelity"]

FIDELITY_KEYS = ("pq", "dq", "sq", "dice", "aji", "acc", "f1_d")


def score_fidelity(
    label_pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    pred_pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    class_ids: Sequence[int],
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Score predicted (inst_map, type_map) pairs against the conditioning label maps.

    label_pairs / pred_pairs: aligned lists of int HxW maps with merged class ids.
    Returns {"pq", "dq", "sq", "dice", "aji": per-image means (official), "acc", "f1_d",
    "f1": {class_id: F1} pooled over images (official), "n_images", "per_image": {name:
    instance metrics}}. Labels scored against themselves give PQ = Acc = F1 = 1.
    """
    result = evaluate_samples(label_pairs, pred_pairs, class_ids, names)
    mean, types = result["mean"], result["type"]
    return {
        "pq": mean["pq"],
        "dq": mean["dq"],
        "sq": mean["sq"],
        "dice": mean["dice"],
        "aji": mean["aji"],
        "acc": types["acc"],
        "f1_d": types["f1_d"],
        "f1": {int(c): float(v) for c, v in types["f1"].items()},
        "n_images": result["n_images"],
        "per_image": result["per_image"],
    }


def label_fidelity(
    synth_dataset: Dataset | str | Path,
    segmenter_ckpt: str | Path,
    *,
    device: str | torch.device | None = None,
    batch_size: int = 4,
    tile: int | None = None,
    scheme: str | ClassScheme | None = None,
    progress: bool = True,
    keep_unmarked: bool = False,
) -> dict[str, Any]:
    """Run a trained segmenter over a (synthetic) dataset's images; score it against its labels.

    synth_dataset: a `Dataset` or a dataset folder (e.g. the output of `diffmix synthesize`).
    segmenter_ckpt: a `diffmix seg train` checkpoint, trained on real data of the same scheme.
    device: None = CUDA when available, else CPU. batch_size, tile: tiled inference
        (`diffmix.seg.infer.predict_image`); the default tile is the network's own size.
    keep_unmarked: post-processing option of `diffmix.seg.postproc.postprocess`.
    Returns `score_fidelity`'s dict plus "segmenter" and "dataset" (paths, when known).
    """
    if not isinstance(synth_dataset, Dataset):
        synth_dataset = read_dataset(synth_dataset, scheme)

    device = resolve_device(device)
    model, meta = load_segmenter(segmenter_ckpt, device)
    k_model = int(meta["num_classes"])
    k_data = synth_dataset.scheme.num_classes
    if k_model != k_data:
        raise ClassSchemeError(
            f"{segmenter_ckpt}: the segmenter predicts {k_model} classes but "
            f"{synth_dataset.root or 'the dataset'} uses scheme {synth_dataset.scheme.name!r} "
            f"with {k_data}; score it with a segmenter trained on the same classes"
        )
    labels, preds, names = [], [], []
    for sample in tqdm(synth_dataset.samples, desc="fidelity", unit="image", disable=not progress):
        inst_map, type_map, _ = segment_image(
            model, sample.image, tile=tile, batch_size=batch_size, device=device, keep_unmarked=keep_unmarked
        )
        labels.append((sample.inst_map, sample.type_map))
        preds.append((inst_map, type_map))
        names.append(sample.name)
    result = score_fidelity(labels, preds, synth_dataset.scheme.class_ids, names)
    result["segmenter"] = str(segmenter_ckpt)
    result["dataset"] = str(synth_dataset.root) if synth_dataset.root is not None else None
    return result


def format_fidelity(result: dict[str, Any], scheme: ClassScheme | None = None) -> str:
    """A short two-line table: PQ DQ SQ Dice AJI Acc and F1 per class (class names when known)."""

    def fmt(v: Any) -> str:
        return "  n/a" if v is None else f"{v:.4f}"

    heads = ["PQ", "DQ", "SQ", "Dice", "AJI", "Acc"]
    vals = [result["pq"], result["dq"], result["sq"], result["dice"], result["aji"], result["acc"]]
    for cls, v in sorted(result["f1"].items()):
        name = scheme.class_name(cls) if scheme is not None else str(cls)
        heads.append(f"F1[{name}]")
        vals.append(v)
    widths = [max(len(h), 6) for h in heads]
    head = "  ".join(f"{h:>{w}}" for h, w in zip(heads, widths))
    row = "  ".join(f"{fmt(v):>{w}}" for v, w in zip(vals, widths))
    return f"{head}\n{row}\n({result['n_images']} images)"
