"""The semantic diffusion model of DiffMix: U-Net, diffusion maths, sampler, training (spec 1-4).

Modules: `unet` (the SDM U-Net), `convert` (authors' checkpoints), `diffusion` (schedule, posterior,
hybrid loss, respacing), `sampler` (the DiffMix partial-DDIM CFG sampler and dataset synthesis),
`data` (training items), `train` (two-phase resumable training), `cli` (`diffmix sdm ...`).
Import from the modules; this package file imports nothing heavy.
"""
