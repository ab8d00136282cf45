"""Custom label maps for DiffMix: conditioning tensor, balancing and enlarging maps, GradMix."""

from diffmix.maps.conditioning import condition_batch, condition_map, instance_edges, null_condition_like

__all__ = ["condition_batch", "condition_map", "instance_edges", "null_condition_like"]
