"""Synthesis: custom label maps + a trained SDM -> a synthetic dataset folder with a manifest.

The DiffMix data path of paper section 2.3 and spec 4-6, as one resumable, batched command:

1. label maps (`labels`): balancing maps (spec 6a) are made on the full-size images, then cut
   on the patch grid; enlarging maps (spec 6b) are made per grid patch of the original labels;
   the "own" kind keeps each image's own labels (`diffmix sdm sample` is this path with "own"
   maps and whole images);
2. patches (`jobs`) on the spec 5 grid (256 px at stride 76 by default; any size/stride works,
   and the SDM may have been trained on smaller crops, since the U-Net is fully convolutional),
   or whole images (`patch=None`, one job per image, named after it), each with its own seed;
3. y0 = the ORIGINAL image patch at the same offset (spec 4: the noise start is the real
   patch, not the label-edited one);
4. the DiffMix sampler (`diffmix.sdm.sampler`: partial start, classifier-free guidance, the
   solver and schedule of a `SamplerSettings`) on the checkpoint's own diffusion schedule,
   batch by batch (`run`, which also states the reproducibility and resumption contract);
5. a dataset folder in the foundation format: `Images/NAME.png` (synthesised), `Labels/NAME.mat`
   (the custom maps, ids remapped 1..N per grid patch; whole images keep theirs), `dataset.json`,
   and `manifest.json` (`manifest`: per patch, source image, offset, map kind, seed, sampler
   settings, checkpoint sha256).

Names resolve lazily from their modules, so reading a manifest or planning jobs does not
import torch.
"""

from diffmix._lazy import lazy_exports

_EXPORTS = {
    "MapsChoice": "diffmix.synth.jobs",
    "MAP_KINDS": "diffmix.synth.jobs",
    "OWN": "diffmix.synth.jobs",
    "PatchJob": "diffmix.synth.jobs",
    "patch_seed": "diffmix.seeds",
    "plan_jobs": "diffmix.synth.jobs",
    "check_map_kwargs": "diffmix.synth.labels",
    "MANIFEST": "diffmix.synth.manifest",
    "RECORDS_DIR": "diffmix.synth.manifest",
    "FORMAT": "diffmix.synth.manifest",
    "FORMAT_VERSION": "diffmix.synth.manifest",
    "dataset_fingerprint": "diffmix.synth.manifest",
    "read_manifest": "diffmix.synth.manifest",
    "source_images": "diffmix.synth.manifest",
    "SynthReport": "diffmix.synth.run",
    "synthesize": "diffmix.synth.run",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "MAP_KINDS",
    "OWN",
    "PatchJob",
    "SynthReport",
    "patch_seed",
    "dataset_fingerprint",
    "plan_jobs",
    "synthesize",
    "read_manifest",
]
