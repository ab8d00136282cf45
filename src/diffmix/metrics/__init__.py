"""Evaluation metrics, official-exact (hover_net compute_stats): instance and type statistics."""

from diffmix.metrics.classification import (
    PAIR_RADIUS,
    instance_types_centroids,
    pair_coordinates,
    type_stats,
)
from diffmix.metrics.evaluate import (
    LabelFile,
    evaluate_folders,
    evaluate_labels,
    evaluate_samples,
    format_table,
    read_label_file,
)
from diffmix.metrics.instance import (
    INSTANCE_METRICS,
    OverlapTable,
    aji,
    aji_plus,
    dice,
    instance_metrics,
    overlap_table,
    panoptic_quality,
    remap_label,
)

__all__ = [
    "INSTANCE_METRICS",
    "PAIR_RADIUS",
    "LabelFile",
    "OverlapTable",
    "aji",
    "aji_plus",
    "dice",
    "evaluate_folders",
    "evaluate_labels",
    "evaluate_samples",
    "format_table",
    "instance_metrics",
    "instance_types_centroids",
    "overlap_table",
    "pair_coordinates",
    "panoptic_quality",
    "read_label_file",
    "remap_label",
    "type_stats",
]
