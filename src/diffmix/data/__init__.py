"""Data layer: `NucleiSample`, class schemes, dataset folders, patches, the toy dataset."""

from diffmix._lazy import lazy_exports

_EXPORTS = {
    "Dataset": "diffmix.data.io",
    "read_dataset": "diffmix.data.io",
    "scan_dataset": "diffmix.data.io",
    "write_dataset": "diffmix.data.io",
    "NucleiSample": "diffmix.data.sample",
    "inst_centroids": "diffmix.data.sample",
    "remap_ids": "diffmix.data.labels",
    "CONSEP": "diffmix.data.schemes",
    "GLYSAC": "diffmix.data.schemes",
    "PANNUKE": "diffmix.data.schemes",
    "ClassScheme": "diffmix.data.schemes",
    "get_scheme": "diffmix.data.schemes",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
