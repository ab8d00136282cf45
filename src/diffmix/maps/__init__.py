"""Custom label maps for DiffMix: conditioning tensor, balancing and enlarging maps, GradMix."""

from diffmix.maps.balance import BalanceReport, Swap, apply_swaps, balance_dataset, balance_plan
from diffmix.maps.conditioning import condition_batch, condition_map, instance_edges, null_condition_like
from diffmix.maps.enlarge import enlarge_dataset, enlarge_patch


def __getattr__(name: str):
    # GradMix pulls in OpenCV and scikit-image; importing them lazily keeps
    # `diffmix.maps.conditioning` (used by every training step) light to import.
    if name == "gradmix_dataset":
        from diffmix.maps.gradmix import gradmix_dataset

        return gradmix_dataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BalanceReport",
    "Swap",
    "apply_swaps",
    "balance_dataset",
    "balance_plan",
    "condition_batch",
    "condition_map",
    "enlarge_dataset",
    "enlarge_patch",
    "gradmix_dataset",
    "instance_edges",
    "null_condition_like",
]
