"""SDM U-Net (spec 2): official parameter layout, attention maths, conditioning paths, cost."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import diffmix.sdm.unet as unet_mod
from diffmix.sdm.unet import (
    AttentionBlock,
    GroupNorm32,
    LabelWindows,
    SPADEGroupNorm,
    SPADELabels,
    UNetConfig,
    UNetModel,
    build_unet,
    count_parameters,
    estimate_flops,
    estimate_macs,
    timestep_embedding,
)

MANIFEST = Path(__file__).resolve().parents[2] / "shared" / "spec" / "sdm_state_dict_manifest.json"

# 16 px, 32 channels, two levels (16, 8), attention on the 8x8 maps with 4 heads of 16: every
# kind of block, at a cost the shared 2-core test machine can afford
TINY = dict(image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
            attention_resolutions=(8,), num_head_channels=16, label_nc=6)


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(**overrides) -> UNetConfig:
    return UNetConfig(**(TINY | overrides))


def _randomised(config: UNetConfig, seed: int = 0) -> UNetModel:
    """A model whose zero-initialised convs are made non-zero, so every path carries signal."""
    torch.manual_seed(seed)
    model = UNetModel(config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / math.sqrt(max(p[0].numel(), 1))))
    return model.eval()


def _inputs(config: UNetConfig, batch: int = 2, size: int | None = None, seed: int = 0):
    size = size or config.image_size
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, size, size, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    y = (torch.rand(batch, config.label_nc, size, size, generator=gen) > 0.7).float()
    return x, t, y


# ------------------------------------------------------------------ parameter layout


@pytest.mark.parametrize(
    "name, config",
    [
        ("consep_256", UNetConfig.paper(6)),
        ("glysac_256", UNetConfig.paper(5)),
        ("small_64", UNetConfig.small(6)),
    ],
)
def test_state_dict_equals_official_manifest(name: str, config: UNetConfig) -> None:
    if not MANIFEST.is_file():
        pytest.skip(f"state-dict manifest not found at {MANIFEST} (shared spec folder absent)")
    entry = json.loads(MANIFEST.read_text())[name]
    assert config.label_nc == entry["label_channels"]
    assert list(config.channel_mult) == entry["channel_mult"]
    model = build_unet(config, "meta")
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    official = [(k, list(v)) for k, v in entry["state_dict"].items()]
    missing = sorted(set(dict(official)) - set(dict(ours)))
    unexpected = sorted(set(dict(ours)) - set(dict(official)))
    assert not missing and not unexpected, (missing[:5], unexpected[:5])
    assert ours == official  # same names, same shapes, same order
    assert count_parameters(model) == entry["num_parameters"]


def test_paper_parameter_counts() -> None:
    consep = build_unet(UNetConfig.paper(6), "meta")
    glysac = build_unet(UNetConfig.paper(5), "meta")
    assert count_parameters(consep) == 652_256_518
    assert count_parameters(glysac) == 652_198_918
    # spec 2: about 99.5 M of them are in the SPADE layers
    spade = lambda m: sum(p.numel() for n, p in m.named_parameters() if "_norm.mlp_" in n)  # noqa: E731
    assert spade(consep) == 99_528_448
    assert spade(glysac) == 99_470_848
    # the label enters only the middle block and the decoder
    assert not any("mlp_shared" in n for n, _ in consep.named_parameters() if n.startswith("input_blocks"))


def test_tiny_config_size_matches_calibration() -> None:
    assert count_parameters(build_unet(UNetConfig.tiny(6), "meta")) == 4_904_262


# ------------------------------------------------------------------ building blocks


def _legacy_attention(qkv: torch.Tensor, n_heads: int) -> torch.Tensor:
    """SDM's QKVAttentionLegacy from its definition: heads split before q/k/v, q and k each
    scaled by ch**-1/4, softmax over keys, weighted sum of values."""
    bs, width, length = qkv.shape
    ch = width // (3 * n_heads)
    q, k, v = qkv.reshape(bs * n_heads, ch * 3, length).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale).softmax(dim=-1)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)


@pytest.mark.parametrize("channels, head_channels, spatial", [(64, 16, (8, 8)), (96, 32, (4, 6)), (32, 32, (5, 5))])
def test_sdpa_attention_equals_legacy_einsum(channels: int, head_channels: int, spatial: tuple[int, int]) -> None:
    torch.manual_seed(1)
    block = AttentionBlock(channels, head_channels)
    with torch.no_grad():
        for p in block.parameters():  # proj_out is zero-initialised: make it count
            p.copy_(torch.randn_like(p) * 0.2)
    x = torch.randn(3, channels, *spatial)
    flat = x.reshape(3, channels, -1)
    qkv = block.qkv(block.norm(flat))
    expected = (flat + block.proj_out(_legacy_attention(qkv, channels // head_channels))).reshape(x.shape)
    got = block(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert block.num_heads == channels // head_channels


def test_spade_groupnorm_matches_definition() -> None:
    torch.manual_seed(2)
    spade = SPADEGroupNorm(64, label_nc=5)
    x = torch.randn(2, 64, 8, 8) * 3 + 1
    label = torch.randn(2, 5, 32, 32)
    # nearest resize 32 -> 8 keeps every 4th pixel starting at 0
    small = label[:, :, ::4, ::4]
    groups = x.reshape(2, 32, -1)
    normed = ((groups - groups.mean(-1, keepdim=True)) / torch.sqrt(groups.var(-1, unbiased=False, keepdim=True) + 1e-5)).reshape(x.shape)
    actv = F.relu(F.conv2d(small, spade.mlp_shared[0].weight, spade.mlp_shared[0].bias, padding=1))
    gamma = F.conv2d(actv, spade.mlp_gamma.weight, spade.mlp_gamma.bias, padding=1)
    beta = F.conv2d(actv, spade.mlp_beta.weight, spade.mlp_beta.bias, padding=1)
    torch.testing.assert_close(spade(x, label), normed * (1 + gamma) + beta, atol=1e-5, rtol=1e-5)
    assert not any(n.startswith("norm.") for n, _ in spade.named_parameters())  # affine=False


def test_timestep_embedding_values() -> None:
    emb = timestep_embedding(torch.tensor([0, 7]), 8)
    assert emb.shape == (2, 8) and emb.dtype == torch.float32
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))  # [cos | sin] at t=0
    freqs = np.exp(-math.log(10000.0) * np.arange(4) / 4)
    expected = np.concatenate([np.cos(7 * freqs), np.sin(7 * freqs)])
    np.testing.assert_allclose(emb[1].numpy(), expected, atol=1e-6)
    assert timestep_embedding(torch.tensor([3.0]), 5).shape == (1, 5)  # odd width padded


def test_groupnorm32_computes_in_fp32() -> None:
    norm = GroupNorm32(32, 64)
    x = (torch.randn(2, 64, 4, 4) * 100 + 1000).bfloat16()
    out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, F.group_norm(x.float(), 32, norm.weight, norm.bias).bfloat16())


# ------------------------------------------------------------------ the network


def test_fresh_model_predicts_zero_with_learned_sigma_channels() -> None:
    config = _tiny()
    torch.manual_seed(0)
    model = UNetModel(config)
    x, t, y = _inputs(config)
    out = model(x, t, y)
    assert out.shape == (2, 6, 16, 16) and out.dtype == torch.float32
    assert torch.count_nonzero(out) == 0  # zero-initialised output conv (spec 2)
    for name in ("out.2.weight", "input_blocks.1.0.out_layers.3.weight",
                 "output_blocks.0.0.out_layers.2.weight", "middle_block.1.proj_out.weight"):
        assert torch.count_nonzero(model.state_dict()[name]) == 0, name


def test_label_enters_decoder_only() -> None:
    config = _tiny()
    model = _randomised(config)
    x, t, y1 = _inputs(config, seed=3)
    y2 = torch.zeros_like(y1)  # the null label
    encoder_outputs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, i, o: encoder_outputs.append(o)) for b in model.input_blocks]
    with torch.no_grad():
        out1, out2 = model(x, t, y1), model(x, t, y2)
    for h in hooks:
        h.remove()
    n = len(model.input_blocks)
    for a, b in zip(encoder_outputs[:n], encoder_outputs[n:]):
        assert torch.equal(a, b)  # label-free encoder
    assert (out1 - out2).abs().mean() > 1e-3  # but the output follows the label


def test_timestep_changes_output_and_batch_is_independent() -> None:
    config = _tiny()
    model = _randomised(config)
    x, t, y = _inputs(config, batch=3, seed=4)
    with torch.no_grad():
        full = model(x, t, y)
        single = model(x[1:2], t[1:2], y[1:2])
        other_t = model(x, (t + 100) % 1000, y)
        scalar_t = model(x, torch.tensor(5), y)
        per_sample_t = model(x, torch.full((3,), 5), y)
    torch.testing.assert_close(full[1:2], single, atol=1e-5, rtol=1e-4)
    assert (full - other_t).abs().mean() > 1e-4
    torch.testing.assert_close(scalar_t, per_sample_t)


def test_runs_at_other_sizes_than_image_size() -> None:
    config = _tiny()
    model = _randomised(config)
    x, t, y = _inputs(config, batch=1, size=24)
    with torch.no_grad():
        assert model(x, t, y).shape == (1, 6, 24, 24)


def test_gradient_checkpointing_gives_same_outputs_and_grads() -> None:
    config = _tiny(dropout=0.1)
    plain = _randomised(config).train()
    ckpt = UNetModel(config.model_copy(update={"use_checkpoint": True})).train()
    ckpt.load_state_dict(plain.state_dict())
    x, t, y = _inputs(config, seed=5)
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(11)  # same dropout masks; checkpointing must replay them
        model.zero_grad()
        out = model(x, t, y)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], atol=1e-6, rtol=1e-5, msg=name)
    ckpt.set_checkpointing(False)
    assert not any(getattr(m, "use_checkpoint", False) for m in ckpt.modules())


def test_bf16_autocast_forward_is_close_to_fp32() -> None:
    config = _tiny()
    model = _randomised(config)
    x, t, y = _inputs(config, seed=6)
    with torch.no_grad():
        ref = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t, y)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    rel = (low - ref).norm() / ref.norm()
    assert rel < 0.05, float(rel)


def test_conv_resampling_and_additive_time_embedding_variants() -> None:
    config = _tiny(resblock_updown=False, use_scale_shift_norm=False)
    model = _randomised(config)
    names = model.state_dict()
    assert "input_blocks.2.0.op.weight" in names  # SDM Downsample(conv) naming
    assert any(k.endswith(".conv.weight") and k.startswith("output_blocks") for k in names)
    assert names["input_blocks.1.0.emb_layers.1.weight"].shape == (32, 128)  # C, not 2C
    x, t, y = _inputs(config, seed=7)
    with torch.no_grad():
        assert model(x, t, y).shape == (2, 6, 16, 16)


def test_forward_rejects_wrong_shapes() -> None:
    config = _tiny()
    model = UNetModel(config)
    x, t, y = _inputs(config)
    with pytest.raises(ValueError, match="y must be"):
        model(x, t, y[:, :5])
    with pytest.raises(ValueError, match="divisible by 2"):
        model(x[..., :15, :15], t, y[..., :15, :15])
    with pytest.raises(ValueError, match="timesteps must be"):
        model(x, t[:1], y)
    with pytest.raises(ValueError, match="x must be"):
        model(x[:, :2], t, y)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(model_channels=40), "not divisible by the 32 GroupNorm groups"),
        (dict(attention_resolutions=(4,)), "attention resolution 4 is not a feature-map size"),
        (dict(num_head_channels=24), "not divisible by num_head_channels 24"),
        (dict(image_size=15), "not divisible by 2\\*\\*\\(levels-1\\)"),
        (dict(channel_mult=()), "channel_mult must be"),
        (dict(dropout=1.0), "dropout"),
        (dict(num_heads=4), "Extra inputs are not permitted"),
    ],
)
def test_config_validation(overrides: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        _tiny(**overrides)


def test_config_round_trips_through_json() -> None:
    config = UNetConfig.small(5)
    again = UNetConfig.model_validate(json.loads(json.dumps(config.model_dump(mode="json"))))
    assert again == config and again.attention_ds == frozenset({4, 8})
    assert UNetConfig.paper(6).attention_ds == frozenset({8, 16, 32})


# ------------------------------------------------------------------ cost


@pytest.mark.parametrize("overrides", [{}, dict(resblock_updown=False, use_scale_shift_norm=False)])
def test_flop_estimate_equals_torch_flop_counter(overrides: dict) -> None:
    config = _tiny(**overrides)
    model = UNetModel(config).eval()
    x, t, y = _inputs(config, batch=2, size=16)
    # the math SDPA backend runs as bmm's, which the counter sees (the fused CPU kernel it misses)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, y)
    assert estimate_flops(config, batch=2, image_size=16) == counter.get_total_flops()
    assert estimate_flops(config, 2) == 2 * estimate_macs(config, 2)


def test_paper_flop_estimate_equals_flop_counter_on_meta_device() -> None:
    # the full 652 M-parameter forward, shape-only (meta tensors): free, and exact
    config = UNetConfig.paper(6)
    model = build_unet(config, "meta")
    with torch.device("meta"):
        x, y = torch.empty(1, 3, 256, 256), torch.empty(1, 6, 256, 256)
        t = torch.zeros(1, dtype=torch.long)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(x, t, y)
    assert out.shape == (1, 6, 256, 256)
    assert estimate_flops(config) == counter.get_total_flops() == 3_422_560_223_232
    assert estimate_macs(config, batch=4) == 4 * estimate_macs(config)
    with pytest.raises(ValueError, match="divisible by 32"):
        estimate_macs(config, image_size=100)


# ------------------------------------------------------------------ guided pair and label reuse


@pytest.mark.parametrize("size", [(1, 1), (1, 2), (2, 2), (3, 3), (2, 7), (5, 4), (9, 9)])
def test_null_modulation_equals_convs_of_zero_label(size: tuple[int, int]) -> None:
    torch.manual_seed(7)
    spade = SPADEGroupNorm(64, label_nc=5)
    with torch.no_grad():
        for p in spade.parameters():
            p.normal_(0.0, 0.3)  # biases large enough that ReLU keeps part of the hidden vector
        hidden = F.relu(spade.mlp_shared[0].bias)
        assert 0 < torch.count_nonzero(hidden) < hidden.numel()
        like = torch.empty(2, 64, *size)
        scale, shift = spade.null_modulation(size, like)
        ref_scale, ref_shift = spade.modulation(torch.zeros(1, 5, 16, 16), size)
    assert scale.shape == shift.shape == (1, 64, *size)
    torch.testing.assert_close(scale, ref_scale, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shift, ref_shift, atol=1e-5, rtol=1e-5)
    if min(size) >= 3:  # the border ring really differs from the interior
        for edge in ((0, 1), (-1, 1), (1, 0), (1, -1), (0, 0)):
            assert (shift[..., edge[0], edge[1]] - shift[..., 1, 1]).abs().max() > 1e-3


# three levels, so the decoder has SPADEs on 1x1 and 2x2 maps at 4 px
DEEP = dict(image_size=8, channel_mult=(1, 2, 2), attention_resolutions=(2,))


@pytest.mark.parametrize("hw", [(4, 4), (8, 8), (4, 12)])
def test_forward_guided_equals_two_forwards(hw: tuple[int, int]) -> None:
    config = _tiny(**DEEP)
    model = _randomised(config, seed=8)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, *hw, generator=gen)
    y = (torch.rand(2, 6, *hw, generator=gen) > 0.6).float()
    t = torch.tensor([30, 870])
    with torch.no_grad():
        cond, null = model(x, t, y), model(x, t, torch.zeros_like(y))
        got_cond, got_null = model.forward_guided(x, t, y)
    assert got_cond.shape == got_null.shape == (2, 6, *hw)
    torch.testing.assert_close(got_cond, cond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_null, null, atol=1e-5, rtol=1e-5)
    assert (cond - null).abs().mean() > 1e-3  # the pair really differs


def test_spade_labels_reuse_modulations_across_calls() -> None:
    config = _tiny(**DEEP)
    model = _randomised(config, seed=10)
    x, t, y = _inputs(config, seed=11)
    spades = [m for m in model.modules() if isinstance(m, SPADEGroupNorm)]
    guided = SPADELabels(y, null=True)
    plain = SPADELabels(y)
    with torch.no_grad():
        for step_t in (t, (t + 321) % 1000):  # later calls read the stored modulations
            pair = model.forward_guided(x, step_t, y, labels=guided)
            torch.testing.assert_close(pair[0], model(x, step_t, y), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(pair[1], model(x, step_t, torch.zeros_like(y)), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(model(x, step_t, y, labels=plain), pair[0], atol=1e-5, rtol=1e-5)
    assert len(guided._cond) == len(guided._null) == len(plain._cond) == len(spades)
    stored = sum(a.nbytes + b.nbytes for table in (guided._cond, guided._null) for a, b in table.values())
    assert stored == model.label_cache_bytes(2, 8, 8)
    assert sum(a.nbytes + b.nbytes for a, b in plain._cond.values()) == model.label_cache_bytes(2, 8, 8, null=False)
    # the paper config's figure quoted in the sampler: 1.9 GiB per patch in bf16
    paper = build_unet(UNetConfig.paper(6), "meta")
    assert paper.label_cache_bytes(1, 256, 256, torch.bfloat16) / 2**30 == pytest.approx(1.898, abs=1e-3)


def test_spade_labels_must_belong_to_y() -> None:
    config = _tiny()
    model = _randomised(config)
    x, t, y = _inputs(config)
    with torch.no_grad(), pytest.raises(ValueError, match="this very y"):
        model.forward_guided(x, t, y, labels=SPADELabels(y.clone(), null=True))
    with torch.no_grad(), pytest.raises(ValueError, match="this very y"):
        model.forward_guided(x, t, y, labels=SPADELabels(y))
    with torch.no_grad(), pytest.raises(ValueError, match="without null rows"):
        model(x, t, y, labels=SPADELabels(y, null=True))


def test_forward_guided_with_gradients() -> None:
    config = _tiny()
    model = _randomised(config, seed=12)
    x, t, y = _inputs(config, seed=13)
    cond, null = model.forward_guided(x, t, y)
    (cond.square().mean() + null.square().mean()).backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    (model(x, t, y).square().mean() + model(x, t, torch.zeros_like(y)).square().mean()).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(fast[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


# ------------------------------------------------------------------ label windows


def _blob_labels(batch: int, label_nc: int, h: int, w: int, seed: int, cell: int = 4) -> torch.Tensor:
    """Piecewise-constant one-hot classes (cells of `cell` px, nearest-upsampled) plus the edge
    channel where the class changes: the kind of map an SDM sees, whose windows repeat."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, label_nc - 1, (batch, 1, -(-h // cell), -(-w // cell)), generator=gen).float()
    cls = F.interpolate(coarse, scale_factor=cell, mode="nearest")[:, 0, :h, :w].long()
    edge = torch.zeros(batch, 1, h, w)
    edge[:, 0, 1:] += (cls[:, 1:] != cls[:, :-1]).float()
    edge[:, 0, :, 1:] += (cls[:, :, 1:] != cls[:, :, :-1]).float()
    return torch.cat([F.one_hot(cls, label_nc - 1).permute(0, 3, 1, 2).float(), edge.clamp(max=1)], 1)


def _spade_and_grads(spade: SPADEGroupNorm, x: torch.Tensor, label) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    out = spade(x, label)
    return out, list(torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum(),
                                         [x, *spade.parameters()]))


@pytest.mark.parametrize("hw, binary", [((16, 16), True), ((7, 5), True), ((1, 1), True), ((2, 9), True),
                                        ((12, 16), False)])
def test_label_windows_equal_the_convs_over_the_map(hw, binary, monkeypatch) -> None:
    """SPADE through its distinct 5x5 label windows = SPADE's convs over the whole map (values
    and every gradient, to float rounding), at the borders, on maps smaller than a window, and
    for labels that are not 0/1 (grouped by `torch.unique` instead of the packed ids)."""
    torch.manual_seed(3)
    spade = SPADEGroupNorm(64, label_nc=6)
    with torch.no_grad():
        for p in spade.parameters():
            p.normal_(0.0, 0.2)
    y = _blob_labels(3, 6, *hw, seed=4)
    if not binary:
        y = y * 0.7 + 0.1
    x = torch.randn(3, 64, *hw, generator=torch.Generator().manual_seed(5))
    monkeypatch.setattr(unet_mod, "WINDOW_SHARE_MAX", 1.0)
    windows = LabelWindows(y)
    found = windows.at(hw)
    assert found is not None and found.index.shape == (3 * hw[0] * hw[1],)
    assert found.taps.shape[0] == int(found.index.max()) + 1 <= 3 * hw[0] * hw[1]
    got, got_grads = _spade_and_grads(spade, x, windows)
    want, want_grads = _spade_and_grads(spade, x, y)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    for g, r in zip(got_grads, want_grads):
        torch.testing.assert_close(g, r, atol=1e-5 * max(r.abs().max().item(), 1e-3), rtol=1e-4)


def test_label_windows_group_exactly_the_equal_windows() -> None:
    """The packed ids give the same grouping as `torch.unique` over the unfolded windows."""
    y = _blob_labels(2, 6, 24, 20, seed=6)
    z = F.pad(torch.cat([y, torch.ones(2, 1, 24, 20)], 1), (2, 2, 2, 2))
    rows = F.unfold(z, 5).transpose(1, 2).reshape(-1, 7 * 25)
    want = torch.unique(rows, dim=0, return_inverse=True)[1]
    got = unet_mod._binary_window_ids(z)
    assert got is not None and int(got.max()) == int(want.max())
    pairs = torch.unique(torch.stack([got, want], 1), dim=0)  # a bijection between the two labellings
    assert pairs.shape[0] == int(want.max()) + 1
    assert unet_mod._binary_window_ids(torch.zeros(1, 32, 5, 5)) is None  # more channels than key bits


def test_label_windows_stay_off_where_windows_do_not_repeat(monkeypatch) -> None:
    """A class per pixel (no two windows alike) and `WINDOW_SHARE_MAX = 0` take the plain convs."""
    noisy = (torch.rand(2, 6, 16, 16, generator=torch.Generator().manual_seed(7)) > 0.5).float()
    assert LabelWindows(noisy).at((16, 16)) is None
    blobs = _blob_labels(2, 6, 32, 32, seed=8, cell=8)
    found = LabelWindows(blobs).at((32, 32))
    assert found is not None and found.taps.shape[0] < 0.5 * 2 * 32 * 32
    monkeypatch.setattr(unet_mod, "WINDOW_SHARE_MAX", 0.0)
    assert LabelWindows(blobs).at((32, 32)) is None


@pytest.mark.parametrize("checkpointing", [False, "selective", True])
def test_unet_with_label_windows_equals_the_plain_convs(checkpointing, monkeypatch) -> None:
    """The whole U-Net, training (forward + backward, every checkpointing mode) and the guided
    sampling pass, with windows at every decoder size against windows off."""
    config = _tiny(**DEEP)
    model = _randomised(config, seed=14).train()
    model.set_checkpointing(checkpointing)
    gen = torch.Generator().manual_seed(15)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    t = torch.tensor([30, 870])
    y = _blob_labels(2, 6, 16, 16, seed=16)
    runs = {}
    calls = []
    window_modulation = SPADEGroupNorm.window_modulation
    monkeypatch.setattr(SPADEGroupNorm, "window_modulation",
                        lambda self, *a: calls.append(self) or window_modulation(self, *a))
    for share in (1.0, 0.0):
        monkeypatch.setattr(unet_mod, "WINDOW_SHARE_MAX", share)
        model.zero_grad()
        out = model(x, t, y)
        out.square().mean().backward()
        with torch.no_grad():
            guided = model.forward_guided(x, t, y, labels=SPADELabels(y, null=True))
        runs[share] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, guided)
        if share:  # every decoder SPADE took its windows, in training and in the guided pass
            spades = {m for m in model.modules() if isinstance(m, SPADEGroupNorm)}
            assert set(calls) == spades
    (out, grads, guided), (ref_out, ref_grads, ref_guided) = runs[1.0], runs[0.0]
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-5 * max(ref_grads[name].abs().max().item(), 1e-3),
                                   rtol=1e-4, msg=name)
    for a, b in zip(guided, ref_guided):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
