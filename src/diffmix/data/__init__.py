"""Data layer: `NucleiSample`, class schemes, dataset folders, patches, the toy dataset."""

from diffmix.data.io import Dataset, read_dataset, scan_dataset, write_dataset
from diffmix.data.sample import NucleiSample, inst_centroids, remap_ids
from diffmix.data.schemes import CONSEP, GLYSAC, PANNUKE, ClassScheme, get_scheme

__all__ = [
    "CONSEP",
    "GLYSAC",
    "PANNUKE",
    "ClassScheme",
    "Dataset",
    "NucleiSample",
    "get_scheme",
    "inst_centroids",
    "read_dataset",
    "remap_ids",
    "scan_dataset",
    "write_dataset",
]
