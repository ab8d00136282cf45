"""Custom label maps for DiffMix: conditioning tensor, balancing and enlarging maps, GradMix."""

from diffmix._lazy import lazy_exports

_EXPORTS = {
    "BalanceParams": "diffmix.maps.params",
    "BalanceReport": "diffmix.maps.balance",
    "Swap": "diffmix.maps.balance",
    "apply_swaps": "diffmix.maps.balance",
    "balance_dataset": "diffmix.maps.balance",
    "balance_plan": "diffmix.maps.balance",
    "condition_batch": "diffmix.maps.conditioning",
    "condition_map": "diffmix.maps.conditioning",
    "instance_edges": "diffmix.maps.conditioning",
    "null_condition_like": "diffmix.maps.conditioning",
    "enlarge_dataset": "diffmix.maps.enlarge",
    "enlarge_patch": "diffmix.maps.enlarge",
    "gradmix_dataset": "diffmix.maps.gradmix",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
