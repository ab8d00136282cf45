"""diffmix: DiffMix (Oh & Jeong, MICCAI 2023) as an installable, tested package.

Semantic diffusion re-synthesis of H&E patches under edited nuclei label maps, the label-map
editors (balancing and enlarging), downstream HoVer-style training and official-exact metrics.
"""

__version__ = "0.1.0"
