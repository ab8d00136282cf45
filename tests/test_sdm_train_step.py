"""The SDM training step: parity with the official step, selective checkpointing, fused AdamW.

The official step is the reference of `benchmarks/sdm_train.py` (the authors' U-Net maths with
legacy attention and their checkpointing, `training_losses`, AdamW, EMA loop), loaded from there
so that the benchmark's ratio and this parity are about the same code.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import load_benchmark
from torch.utils._python_dispatch import TorchDispatchMode

from diffmix.sdm.diffusion import GaussianDiffusion
from diffmix.sdm.train import make_optimizer, train_step
import diffmix.sdm.unet as unet_mod
from diffmix.sdm.unet import SELECTIVE_MIN_MACS, UNetConfig

bench = load_benchmark("sdm_train")

# Two levels, attention on the 8x8 level, 16-px crops: every block kind of the SDM U-Net (plain,
# SPADE, up/down, attention, skip convs) in a step of a fraction of a second.
TINY = UNetConfig(image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(8,), num_head_channels=32, label_nc=6)


@pytest.mark.parametrize("seed", [0, 6])
@pytest.mark.parametrize("flags", [(False, None), (True, "selective"), (True, True)],
                         ids=["no-checkpoint", "official-checkpoint-vs-selective", "both-full-checkpoint"])
@pytest.mark.parametrize("windows", [1.0, 0.0], ids=["label-windows", "plain-convs"])
def test_first_step_equals_the_official_step(seed: int, flags, windows: float, monkeypatch) -> None:
    """Same weights, same batch (nuclei label maps; one t = 0: the decoder-NLL branch): the
    loss agrees to 1.2e-7 relative (float32 rounding of a value near 2), the gradients to float
    rounding, our fused AdamW update equals the official AdamW applied to our gradients, the
    EMA the official loop. With SPADE through its label windows at every size and without."""
    monkeypatch.setattr(unet_mod, "WINDOW_SHARE_MAX", windows)
    official_checkpoint, ours_checkpoint = flags
    p = bench.parity(TINY, 2, seed, official_checkpoint, ours_checkpoint)
    assert p["loss_reference"] > 0.5  # a real, non-trivial loss (weights are randomised)
    assert p["loss_rel_diff"] <= 1.2e-7
    assert p["mse_rel_diff"] <= 1.2e-7 and p["vb_rel_diff"] <= 1e-6
    assert p["grad_max_rel_diff"] <= 1e-4
    assert p["update_max_abs_diff_vs_official_adamw"] <= 1e-7  # params ~1: a few float32 ulps
    assert p["ema_max_abs_diff_after_step"] <= 1e-7


def test_reference_is_sensitive_to_what_it_checks() -> None:
    """The parity harness would see a changed loss: dropping the VLB term or the detach."""
    base = bench.randomised(TINY, 0)
    x0, t, noise, cond = bench.batch(2, 16, 6, 1)
    sched = bench.OfficialSchedule()
    out = bench.reference_forward(base, bench.GaussianDiffusion.linear().q_sample(x0, t, noise), t, cond, False)
    ref = bench.reference_losses(sched, lambda x, ts: out, x0, t, noise)
    ours = GaussianDiffusion.linear().losses_from_output(out, x0, GaussianDiffusion.linear().q_sample(x0, t, noise), t, noise)
    assert torch.allclose(ours["loss"], ref["loss"], rtol=1e-6, atol=0)
    assert (ref["vb"].abs() > 1e-4).all()  # the VLB part is not negligible here
    assert not torch.allclose(ours["mse"], ref["loss"], rtol=1e-6, atol=0)


class _ConvCounter(TorchDispatchMode):
    """Counts convolutions by MACs per output element (in/groups x kh x kw)."""

    def __init__(self) -> None:
        super().__init__()
        self.macs: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func == torch.ops.aten.convolution.default:
            w = args[1]
            self.macs.append(w.shape[1] * w.shape[2] * w.shape[3])
        return func(*args, **(kwargs or {}))


def _grads_and_backward_convs(checkpointing, labels: str = "random") -> tuple[torch.Tensor, list[int], float]:
    model = bench.randomised(TINY, 3)
    model.set_checkpointing(checkpointing)
    x0, t, noise, cond = bench.batch(2, 16, 6, 4, labels)
    diffusion = GaussianDiffusion.linear()
    x_t = diffusion.q_sample(x0, t, noise)
    loss = diffusion.losses_from_output(model(x_t, diffusion.model_timesteps(t), cond), x0, x_t, t, noise)["loss"].mean()
    counter = _ConvCounter()
    with counter:  # convolutions run during backward = recomputed ones
        loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]), counter.macs, loss.item()


def test_selective_checkpointing_recomputes_only_cheap_convs_with_equal_gradients() -> None:
    none_grads, none_recomputed, none_loss = _grads_and_backward_convs(False)
    full_grads, full_recomputed, full_loss = _grads_and_backward_convs(True)
    sel_grads, sel_recomputed, sel_loss = _grads_and_backward_convs("selective")
    assert none_recomputed == []
    # full: every conv of every checkpointed block runs again, the costly ones included
    assert max(full_recomputed) >= 9 * 64 and len(full_recomputed) > 20
    # selective: only the cheap convs run again: SPADE's shared label convs (label_nc 6 x 3 x 3
    # = 54 MACs per output) and the 1x1 skips over 64 and 96 channels of this tiny net
    assert set(sel_recomputed) == {54, 64, 96}
    assert all(m < SELECTIVE_MIN_MACS for m in sel_recomputed)
    assert len(sel_recomputed) < len(full_recomputed)
    # recomputation is deterministic: the same loss and gradients, bit for bit
    assert none_loss == full_loss == sel_loss
    assert torch.equal(none_grads, full_grads) and torch.equal(none_grads, sel_grads)


def test_checkpointing_with_label_windows_gives_equal_gradients(monkeypatch) -> None:
    """Windows found in the forward are reused by the recomputation: bit-equal gradients, and
    no SPADE label conv (54 MACs per output) runs in backward any more."""
    monkeypatch.setattr(unet_mod, "WINDOW_SHARE_MAX", 1.0)
    none_grads, none_recomputed, none_loss = _grads_and_backward_convs(False, "nuclei")
    full_grads, _, full_loss = _grads_and_backward_convs(True, "nuclei")
    sel_grads, sel_recomputed, sel_loss = _grads_and_backward_convs("selective", "nuclei")
    assert none_recomputed == [] and 54 not in sel_recomputed
    assert none_loss == full_loss == sel_loss
    assert torch.equal(none_grads, full_grads) and torch.equal(none_grads, sel_grads)


def test_selective_checkpointing_holds_less_than_none_more_than_full() -> None:
    base = bench.randomised(TINY, 0)
    data = bench.batch(4, 16, 6, 1)
    held = {flag: bench.activation_bytes(base, *data, flag) for flag in (False, "selective", True)}
    if held[False] is None:
        pytest.skip("heap statistics need glibc")
    assert held[True] < held["selective"] < held[False]


def test_selective_is_a_config_value() -> None:
    assert UNetConfig(use_checkpoint="selective").use_checkpoint == "selective"
    assert UNetConfig().model_dump(mode="json")["use_checkpoint"] is False  # run identities unchanged
    with pytest.raises(ValueError):
        UNetConfig(use_checkpoint="sometimes")


def test_make_optimizer_is_fused_adamw_with_the_official_update() -> None:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(37, 5)), torch.nn.Parameter(torch.randn(11))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = make_optimizer(params, 1e-3, 0.01)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True
    official = torch.optim.AdamW(twins, lr=1e-3, weight_decay=0.01)
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        for p, q in zip(params, twins):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        official.step()
    for p, q in zip(params, twins):
        assert torch.allclose(p, q, rtol=0, atol=1e-6)
        assert not torch.equal(p, p.new_zeros(p.shape))


def test_train_step_takes_one_step_of_the_hybrid_loss() -> None:
    model = bench.randomised(TINY, 1)
    before = copy.deepcopy(model)
    opt = make_optimizer(model.parameters(), 1e-4, 0.0)
    diffusion = GaussianDiffusion.linear()
    x0, t, noise, cond = bench.batch(2, 16, 6, 2)
    with torch.no_grad():
        expected = diffusion.training_losses(before, x0, t, cond, noise)
    stats, ok = train_step(model, opt, diffusion, x0, t, noise, cond)
    assert ok and stats.dtype == torch.float32 and not stats.requires_grad
    assert stats.tolist() == pytest.approx([expected[k].mean().item() for k in ("mse", "vb", "loss")], rel=1e-6)
    moved = [(a - b).abs().max().item() for a, b in zip(model.parameters(), before.parameters())]
    assert max(moved) == pytest.approx(1e-4, rel=0.01)  # Adam's first step moves by ~lr


def test_benchmark_label_maps_from_a_dataset_folder(tmp_path) -> None:
    """`--labels DIR`: random crops of the folder's label maps as one-hot + edge maps; a folder
    that is not a dataset, or one with another class count, is a one-line exit."""
    from diffmix.data.toy import write_toy_dataset

    folder = write_toy_dataset(tmp_path / "toy", n_images=2, size=64, seed=0)
    x0, t, noise, cond = bench.batch(3, 32, 6, 0, str(folder))
    assert cond.shape == (3, 6, 32, 32) and x0.shape == (3, 3, 32, 32)
    assert torch.equal(cond[:, :5].sum(1), torch.ones(3, 32, 32))  # one class per pixel
    assert torch.equal(cond, bench.batch(3, 32, 6, 0, str(folder))[3])  # the seed fixes the crops
    with pytest.raises(SystemExit, match="--labels: .*not found"):
        bench.batch(3, 32, 6, 0, str(tmp_path / "missing"))
    with pytest.raises(SystemExit, match="4 classes, the U-Net takes 5"):
        bench.batch(3, 32, 7, 0, str(folder))


def test_benchmark_reports_ratios_and_parity_at_tiny_size() -> None:
    """`benchmarks/sdm_train.py` end to end, at a size that takes seconds."""
    args = bench.argparse.Namespace(size=16, batch=2, channels=32, repeats=1, seed=0, labels="nuclei")
    report = bench.run(args)
    assert set(report["speedup"]) == {"no_checkpoint", "checkpoint_selective", "checkpoint_full", "bf16_vs_fp32_reference",
                                      "no_checkpoint_random_labels"}
    assert all(v > 0 for v in report["speedup"].values())
    assert set(report["cpu_seconds"]) == {"ours", "reference", "ours_selective_checkpoint", "ours_full_checkpoint",
                                          "reference_checkpoint", "ours_bf16", "ours_random_labels",
                                          "reference_random_labels"}
    assert report["labels"] == "nuclei"
    assert all(p["loss_rel_diff"] <= 1.2e-7 for p in report["parity"].values())
    assert 0 < report["bf16_loss_rel_diff"] < 1e-2


def test_train_sdm_with_selective_checkpointing_logs_the_same_losses(tmp_path) -> None:
    """`unet.use_checkpoint: selective` through the whole training loop: same logged losses as
    no checkpointing (recomputation is exact), run folders kept apart by their config."""
    import json

    from diffmix.data.toy import write_toy_dataset
    from diffmix.data.io import read_dataset
    from diffmix.sdm.train import SDMTrainConfig, train_sdm

    data = read_dataset(write_toy_dataset(tmp_path / "toy", n_images=2, size=32, seed=0))
    unet = TINY.model_dump() | {"label_nc": data.scheme.num_classes + 2}
    losses = {}
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for flag in (False, "selective"):
            cfg = SDMTrainConfig(unet=unet | {"use_checkpoint": flag}, crop_size=16, batch_size=2, phase1_steps=2,
                                 phase2_steps=1, checkpoint_every=3, sample_every=0, seed=5)
            out = tmp_path / f"run-{flag}"
            train_sdm(list(data), data.scheme.num_classes, out, cfg, device="cpu", progress=False)
            records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if x.strip()]
            losses[flag] = [r["loss"] for r in records]
    finally:
        torch.set_num_threads(old)
    assert len(losses[False]) == 3 and losses[False] == losses["selective"]
