"""Rare-class options of the segmenter: repeat-factor sampling and TP class weights.

Both exist so that a class covering 4% of the patches and 0.2% of the pixels (CoNSeP's
miscellaneous in 64-px patches) gets a gradient; both are off by default, and with them off a
run's identity (config.yaml) is what it was before the options existed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml

from diffmix.data.io import Dataset
from diffmix.data.sample import NucleiSample
from diffmix.data.schemes import CONSEP
from diffmix.errors import ConfigError
from diffmix.seg.data import PatchItems, Source, mix_plan, repeat_factors
from diffmix.seg.loss import LossConfig, hover_loss, xentropy_loss
from diffmix.seg.sonnet.loss import class_weights
from diffmix.seg.train import SegTrainConfig, train_segmenter
from diffmix.config import dump_config

SCHEME = CONSEP.merged()


def _patch(name: str, classes: list[int], size: int = 16) -> NucleiSample:
    """A patch with one 4x4 nucleus per listed class."""
    inst = np.zeros((size, size), np.int32)
    types = np.zeros((size, size), np.int32)
    for k, c in enumerate(classes):
        inst[1 + 5 * k : 5 + 5 * k, 1:5] = k + 1
        types[1 + 5 * k : 5 + 5 * k, 1:5] = c
    image = np.full((size, size, 3), 200, np.uint8)
    return NucleiSample(name=name, image=image, inst_map=inst, type_map=types)


@pytest.fixture()
def four() -> Dataset:
    # class 1 in one patch of four, class 3 in every patch
    return Dataset([_patch("a", [1, 3]), _patch("b", [3]), _patch("c", [3]), _patch("d", [3, 2])], SCHEME)


def test_repeat_factors_by_hand(four):
    plan = mix_plan([Source(four)], seed=0)
    # t = 1: f_1 = 1/4 -> sqrt(4) = 2; f_2 = 1/4 -> 2; f_3 = 1 -> 1
    assert repeat_factors([Source(four)], plan, 1.0).tolist() == [2.0, 1.0, 1.0, 2.0]
    # t = 0.25: sqrt(0.25 / 0.25) = 1 -> no entry repeated
    assert repeat_factors([Source(four)], plan, 0.25).tolist() == [1.0] * 4
    assert repeat_factors([Source(four)], plan, 0.5)[0] == pytest.approx(math.sqrt(2))
    with pytest.raises(ConfigError, match="repeat_threshold"):
        repeat_factors([Source(four)], plan, 0.0)


def test_repeat_factor_draws_follow_the_factors_and_stay_pure(four):
    items = PatchItems([Source(four)], 16, seed=1, samples_per_epoch=6000, repeat_threshold=1.0)
    order = items.epoch_order(0)
    freq = np.bincount(order, minlength=4) / len(order)
    assert freq == pytest.approx([2 / 6, 1 / 6, 1 / 6, 2 / 6], abs=0.02)
    again = PatchItems([Source(four)], 16, seed=1, samples_per_epoch=6000, repeat_threshold=1.0)
    assert np.array_equal(again.epoch_order(0), order)
    assert not np.array_equal(items.epoch_order(1), order)
    plain = PatchItems([Source(four)], 16, seed=1, samples_per_epoch=8)
    assert sorted(plain.epoch_order(0).tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]  # uniform: permutations


def test_weighted_type_cross_entropy_by_hand():
    prob = torch.tensor([0.5, 0.25, 0.25]).view(1, 3, 1, 1).repeat(1, 1, 1, 2)
    prob[0, :, 0, 1] = torch.tensor([0.25, 0.5, 0.25])
    onehot = torch.zeros(1, 3, 1, 2)
    onehot[0, 0, 0, 0] = 1  # pixel 1: background, p = 0.5
    onehot[0, 1, 0, 1] = 1  # pixel 2: class 1, p = 0.5
    plain = float(xentropy_loss(prob, onehot))
    weighted = float(xentropy_loss(prob, onehot, [0.5, 3.0, 1.0]))
    assert plain == pytest.approx(math.log(2))
    assert weighted == pytest.approx((0.5 * math.log(2) + 3.0 * math.log(2)) / 2)
    with pytest.raises(ValueError, match="2 class weights for 3 channels"):
        xentropy_loss(prob, onehot, [1.0, 1.0])


def test_hover_loss_weights_only_the_type_ce():
    torch.manual_seed(0)
    outputs = {"np": torch.randn(2, 2, 8, 8), "hv": torch.randn(2, 2, 8, 8), "tp": torch.randn(2, 5, 8, 8)}
    targets = {"np": torch.randint(0, 2, (2, 8, 8)), "hv": torch.randn(2, 2, 8, 8), "tp": torch.randint(0, 5, (2, 8, 8))}
    _, plain = hover_loss(outputs, targets)
    _, ones = hover_loss(outputs, targets, LossConfig(type_weights=[1.0] * 5))
    _, heavy = hover_loss(outputs, targets, LossConfig(type_weights=[2.0] * 5))
    assert ones == pytest.approx(plain)
    assert heavy["tp_ce"] == pytest.approx(2 * plain["tp_ce"])
    assert {k: v for k, v in heavy.items() if k != "tp_ce"} == pytest.approx({k: v for k, v in plain.items() if k != "tp_ce"})
    with pytest.raises(ValueError, match="resolved"):
        hover_loss(outputs, targets, LossConfig(type_weights="data"))


def test_defaults_leave_the_run_identity_unchanged():
    dumped = dump_config(SegTrainConfig())
    assert "repeat_threshold" not in dumped and "type_weights" not in dumped["loss"]
    set_ = dump_config(SegTrainConfig.model_validate({"repeat_threshold": 0.5, "loss": {"type_weights": [1, 2, 3, 4, 5]}}))
    assert set_["repeat_threshold"] == 0.5 and set_["loss"]["type_weights"] == [1, 2, 3, 4, 5]


TINY = {
    "model": {"arch": "small", "width": 4, "depth": 2}, "patch_size": 16, "phase1_epochs": 1, "phase2_epochs": 1,
    "batch_size": 4, "batch_size_phase2": 4, "samples_per_epoch": 8, "seed": 0,
}


def test_type_weights_from_the_training_mix_are_recorded(four, tmp_path):
    out = tmp_path / "run"
    train_segmenter(four, out, {**TINY, "repeat_threshold": 1.0, "loss": {"type_weights": "data"}},
                    progress=False, num_threads=1)
    cfg = yaml.safe_load((out / "config.yaml").read_text())["config"]
    pixels = np.zeros(5, np.int64)
    for s in four:
        pixels += np.bincount(s.type_map.ravel(), minlength=5)
    assert cfg["repeat_threshold"] == 1.0
    assert cfg["loss"]["type_weights"] == pytest.approx(class_weights(pixels))
    assert cfg["loss"]["type_weights"][1] > cfg["loss"]["type_weights"][3]  # rarer class, larger weight
    with pytest.raises(ConfigError, match="type_weights has 3 entries"):
        train_segmenter(four, tmp_path / "bad", {**TINY, "loss": {"type_weights": [1.0, 1.0, 1.0]}}, progress=False)
    assert not (tmp_path / "bad").exists()


def test_prior_adjusted_type_probabilities_by_hand():
    from diffmix.errors import DataError
    from diffmix.seg.postproc import instance_types, prior_adjusted

    tp = np.array([0.2, 0.5, 0.3], np.float32).reshape(3, 1, 1)
    out = prior_adjusted(tp, [0.8, 0.15, 0.05], 1.0)
    # 0.5 / 0.15 = 3.333, 0.3 / 0.05 = 6; renormalised to the nucleus mass 0.8; background kept
    assert out[:, 0, 0] == pytest.approx([0.2, 0.8 * (10 / 3) / (10 / 3 + 6), 0.8 * 6 / (10 / 3 + 6)], rel=1e-6)
    assert np.array_equal(prior_adjusted(tp, [0.8, 0.15, 0.05], 0.0), tp)
    assert prior_adjusted(tp, [0.8, 0.2, 0.0], 1.0)[2, 0, 0] == 0.0  # never a target: left out
    with pytest.raises(DataError, match="2 entries for 3"):
        prior_adjusted(tp, [0.5, 0.5], 1.0)
    # the instance vote follows: a nucleus whose pixels lean to the common class flips to the rare one
    inst = np.ones((1, 1), np.int32)
    assert instance_types(inst, tp)[0][0, 0] == 1
    assert instance_types(inst, out)[0][0, 0] == 2


def test_checkpoint_records_its_type_prior_and_seg_infer_adjusts_with_it(four, tmp_path):
    import subprocess
    import sys

    from diffmix.data.io import write_dataset
    from diffmix.checkpoints import load_checkpoint, save_checkpoint

    final = train_segmenter(four, tmp_path / "run", TINY, progress=False, num_threads=1)
    state, meta = load_checkpoint(final)
    pixels = sum(np.bincount(s.type_map.ravel(), minlength=5) for s in four)
    assert meta["type_prior"] == pytest.approx((pixels / pixels.sum()).tolist())
    images = write_dataset(tmp_path / "data", four.samples, SCHEME)

    def infer(ckpt, out, *extra):
        return subprocess.run([sys.executable, "-m", "diffmix", "seg", "infer", str(ckpt), str(images), str(out),
                               "--no-progress", *extra], capture_output=True, text=True)

    done = infer(final, tmp_path / "adj", "--logit-adjust", "1")
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load((tmp_path / "adj" / "config.yaml").read_text())["logit_adjust"] == 1.0
    assert infer(final, tmp_path / "neg", "--logit-adjust", "-1").returncode == 2
    # a checkpoint written before the prior was recorded: a one-line error, no folder
    old = tmp_path / "old.safetensors"
    save_checkpoint(old, state, {k: v for k, v in meta.items() if k != "type_prior"})
    failed = infer(old, tmp_path / "old-out", "--logit-adjust", "1")
    assert failed.returncode != 0 and "no type prior recorded" in failed.stderr
    assert "Traceback" not in failed.stderr and not (tmp_path / "old-out").exists()
    assert infer(old, tmp_path / "old-plain").returncode == 0  # without adjustment it still works
