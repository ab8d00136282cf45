"""SONNET (Doan et al., JBHI 2022), the paper's second downstream network, beside HoVer-Net.

Modules: `targets` (NP, TP and the 8-level ordinal distance map), `model` (EfficientNet-B0
encoder from MONAI with a stride-1 stem, three decoders), `loss` (weighted CE + Dice, focal,
ordinal NLL, self-guided re-weighting), `postproc` (ordinal markers -> watershed -> instances,
inner-pixel type vote). Training, tiled inference, run folders and metrics are the shared
ones of `diffmix.seg`; `../shared/spec/sonnet_notes.md` is the reference ("notes N" below).
"""
