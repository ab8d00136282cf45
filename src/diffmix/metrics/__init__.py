"""Evaluation metrics, official-exact (hover_net compute_stats): instance and type statistics."""

from diffmix._lazy import lazy_exports

_EXPORTS = {
    "PAIR_RADIUS": "diffmix.metrics.classification",
    "instance_types_centroids": "diffmix.metrics.classification",
    "pair_coordinates": "diffmix.metrics.classification",
    "type_stats": "diffmix.metrics.classification",
    "LabelFile": "diffmix.metrics.evaluate",
    "evaluate_folders": "diffmix.metrics.evaluate",
    "evaluate_labels": "diffmix.metrics.evaluate",
    "evaluate_samples": "diffmix.metrics.evaluate",
    "format_table": "diffmix.metrics.evaluate",
    "read_label_file": "diffmix.metrics.evaluate",
    "INSTANCE_METRICS": "diffmix.metrics.instance",
    "OverlapTable": "diffmix.metrics.instance",
    "aji": "diffmix.metrics.instance",
    "aji_plus": "diffmix.metrics.instance",
    "dice": "diffmix.metrics.instance",
    "instance_metrics": "diffmix.metrics.instance",
    "overlap_table": "diffmix.metrics.instance",
    "panoptic_quality": "diffmix.metrics.instance",
    "remap_label": "diffmix.metrics.instance",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
