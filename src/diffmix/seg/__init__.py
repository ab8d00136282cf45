"""Downstream nuclei segmentation + classification: HoVer-Net targets, models, loss, training, inference.

Modules: `targets` (NP/HV/TP maps), `models` (small HoVer-style net, MONAI HoVer-Net fast/original;
`build_segmenter`, `load_segmenter`), `loss` (`hover_loss`), `data` (training patches from mixed
original + synthetic datasets), `train` (`train_segmenter`, `SegTrainConfig`), `infer` and
`postproc` (tiled prediction, hover_net post-processing), `cli` (`diffmix seg train|infer`).
`sonnet` holds SONNET's own parts (ordinal targets, network, loss, post-processing); it trains
and infers through the same `data`, `train` and `infer`.
"""
