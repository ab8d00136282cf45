"""The semantic diffusion model of DiffMix: U-Net, diffusion maths, sampler, training (spec 1-4).

Modules: `unet` (the SDM U-Net), `convert` (authors' checkpoints; `load_sdm`, the sampling loader),
`diffusion` (schedule, posterior, hybrid loss, respacing), `settings` (`SamplerSettings`, every
sampler default), `solvers` (schedules; DDIM, DPM-Solver++(2M), UniPC), `sampler` (guidance as a
denoiser wrapper, `diffmix_sample`), `data` (training items), `train` (two-phase resumable
training), `cli` (`diffmix sdm ...`; `sdm sample` runs `diffmix.synth`).
Import from the modules; this package file imports nothing heavy.
"""
