"""Segmenter interface: output keys/shapes, crop margins, encoder freezing, local-only pretrained
weights (checked against MONAI's own key remapping), checkpoint round trip."""

from __future__ import annotations

import re

import pytest
import torch

from diffmix.checkpoints import save_checkpoint
from diffmix.errors import CheckpointError, ConfigError
from diffmix.seg.models import (
    MonaiHoverNet,
    SegModelConfig,
    SmallHoverNet,
    build_segmenter,
    load_encoder_weights,
    load_segmenter,
)


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch):
    """Any attempt of MONAI to download weights fails the test."""
    import monai.networks.nets.hovernet as hv

    def refuse(*args, **kwargs):
        raise AssertionError("MONAI download_url was called")

    monkeypatch.setattr(hv, "download_url", refuse)


def small(num_classes: int = 4, **kw) -> SmallHoverNet:
    torch.manual_seed(0)
    return build_segmenter({"arch": "small", "num_classes": num_classes, **kw})


@pytest.mark.parametrize("h,w", [(32, 32), (36, 44), (17, 64)])
def test_small_net_output_size_equals_input_size(h, w):
    model = small(num_classes=3, width=4, depth=3).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, h, w))
    assert set(out) == {"np", "hv", "tp"}
    assert out["np"].shape == (2, 2, h, w)
    assert out["hv"].shape == (2, 2, h, w)
    assert out["tp"].shape == (2, 4, h, w)  # K + 1 (background)
    assert model.crop_margin == 0 and model.input_size is None


def test_small_net_width_and_depth_are_configurable():
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(small(width=4, depth=2)) < n(small(width=8, depth=2)) < n(small(width=8, depth=3))
    assert len(small(width=4, depth=4).down) == 4


def test_small_net_freeze_encoder_blocks_encoder_gradients_only():
    model = small(width=4, depth=2)
    model.freeze_encoder(True)
    out = model(torch.rand(2, 3, 16, 16))
    sum(v.sum() for v in out.values()).backward()
    for name, p in model.named_parameters():
        if name.startswith(("stem", "down")):
            assert p.grad is None, name
        else:
            assert p.grad is not None, name
    model.freeze_encoder(False)
    assert all(p.requires_grad for p in model.parameters())


def test_build_segmenter_config_errors():
    with pytest.raises(ConfigError, match="num_classes"):
        build_segmenter({"arch": "small"})
    with pytest.raises(ConfigError, match="HoVer-Net encoders only"):
        build_segmenter({"arch": "small", "num_classes": 2, "pretrained": "x.pth"})
    with pytest.raises(Exception, match="extra"):
        SegModelConfig.model_validate({"arch": "small", "widht": 3})


def test_checkpoint_round_trip(tmp_path):
    model = small(width=4, depth=2)
    model.train()
    model(torch.rand(4, 3, 16, 16))  # move BN running statistics away from their init
    cfg = SegModelConfig(arch="small", num_classes=4, width=4, depth=2)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, {"model": model.state_dict()}, {"num_classes": 4, "model": cfg.model_dump(), "preset": "x"})
    loaded, meta = load_segmenter(path)
    assert meta["preset"] == "x" and meta["num_classes"] == 4
    assert not loaded.training
    x = torch.rand(1, 3, 24, 24)
    model.eval()
    with torch.no_grad():
        a, b = model(x), loaded(x)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_load_segmenter_refuses_foreign_files(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_checkpoint(path, {"model": {"w": torch.zeros(2)}}, {"something": 1})
    with pytest.raises(CheckpointError, match="not a diffmix segmenter"):
        load_segmenter(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_segmenter(tmp_path / "missing.safetensors")
    cfg = SegModelConfig(arch="small", num_classes=4, width=4, depth=2)
    save_checkpoint(path, {"model": {"w": torch.zeros(2)}}, {"num_classes": 4, "model": cfg.model_dump()})
    with pytest.raises(CheckpointError, match="do not fit"):
        load_segmenter(path)


# --------------------------------------------------------------------------- MONAI HoVer-Net


@pytest.fixture(scope="module")
def fast_net() -> MonaiHoverNet:
    torch.manual_seed(0)
    return build_segmenter({"arch": "hovernet-fast", "num_classes": 4})


def test_hovernet_geometry_both_modes(fast_net):
    assert fast_net.input_size == 256 and fast_net.crop_margin == 46  # 256 -> 164
    orig = build_segmenter({"arch": "hovernet-original", "num_classes": 2})
    assert orig.input_size == 270 and orig.crop_margin == 95  # 270 -> 80
    assert orig.net.type_prediction.output_features[-1].conv.out_channels == 3
    with pytest.raises(ValueError, match="270x270"):
        orig(torch.rand(1, 3, 256, 256))


def test_hovernet_freeze_matches_official_phase1(fast_net):
    fast_net.freeze_encoder(True)
    grads = {n: p.requires_grad for n, p in fast_net.named_parameters()}
    assert not any(v for n, v in grads.items() if n.startswith("net.res_blocks.d0.layers."))
    for block in ("d1", "d2", "d3"):
        assert not any(v for n, v in grads.items() if n.startswith(f"net.res_blocks.{block}."))
    # hovernet_notes 3: conv0, d0's shortcut and final BN, the bottleneck and decoders still train.
    for prefix in ("net.conv0.", "net.res_blocks.d0.shortcut.", "net.res_blocks.d0.bna_block.",
                   "net.bottleneck.", "net.nucleus_prediction.", "net.horizontal_vertical.", "net.type_prediction."):
        assert all(v for n, v in grads.items() if n.startswith(prefix)), prefix
    fast_net.freeze_encoder(False)
    assert all(p.requires_grad for p in fast_net.parameters())


def _to_preact_name(key: str) -> str | None:
    """MONAI HoVerNet encoder name -> hover_net ImageNet-ResNet50-Preact name (test oracle)."""
    if key.startswith("conv0.conv."):
        return "conv0./." + key[len("conv0.conv."):]
    if key.startswith("conv0.bn."):
        return key
    if m := re.match(r"^res_blocks\.(d\d)\.layers\.denselayer_(\d+)\.layers\.(.+)$", key):
        return f"{m[1]}.units.{m[2]}.{m[3]}"
    if m := re.match(r"^res_blocks\.(d\d)\.bna_block\.(.+)$", key):
        return f"{m[1]}.blk_bna.{m[2]}"
    if m := re.match(r"^res_blocks\.(d\d)\.shortcut\.(.+)$", key):
        return f"{m[1]}.shortcut.{m[2]}"
    return None


def test_pretrained_preact_file_loads_like_monai_remap(fast_net, tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(1)
    target = fast_net.net.state_dict()
    desc = {}
    for key, value in target.items():
        name = _to_preact_name(key)
        if name is not None:
            desc[name] = torch.randn(value.shape, generator=g).to(value.dtype) if value.is_floating_point() else value
    # hover_net's file name is ImageNet-ResNet50-Preact_pytorch.tar; MONAI looks for this name
    # in the torch hub folder, so one file serves both loaders.
    path = tmp_path / "preact-resnet50.pth"
    torch.save({"desc": desc}, path)

    # Oracle: MONAI's own remapping of the same file (its download step neutralised).
    import monai.networks.nets.hovernet as hv

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(hv, "download_url", lambda *a, **k: None)
    monai_mapped = hv._remap_preact_resnet_model("unused")

    model = fast_net
    counts = load_encoder_weights(model, path)
    loaded = model.net.state_dict()
    encoder = [k for k in loaded if k.startswith(("conv0.", "res_blocks."))]
    assert counts["loaded"] == len(encoder) == counts["encoder_total"]
    for key, value in monai_mapped.items():
        if key in loaded:
            assert torch.equal(loaded[key], value), key
    assert set(k for k in monai_mapped if k in loaded) == set(encoder)


def test_pretrained_torchvision_file_matches_monai_adaptation(fast_net, tmp_path, monkeypatch):
    target = fast_net.net.state_dict()
    g = torch.Generator().manual_seed(2)
    tv = {"conv1.weight": torch.randn(64, 3, 7, 7, generator=g), "fc.weight": torch.randn(10, 2048, generator=g)}
    for stat in ("weight", "bias", "running_mean", "running_var"):
        tv[f"bn1.{stat}"] = torch.rand(64, generator=g)
    for layer, units in enumerate((3, 4, 6, 3), start=1):
        d = f"res_blocks.d{layer - 1}"
        for u in range(units):
            for c in (1, 2, 3):
                shape = target[f"{d}.layers.denselayer_{u}.layers.conv{c}.weight"].shape
                tv[f"layer{layer}.{u}.conv{c}.weight"] = torch.randn(shape, generator=g)
            for bn, width_key in ((1, "conv1/bn"), (2, "conv2/bn")):
                n = target[f"{d}.layers.denselayer_{u}.layers.{width_key}.weight"].shape[0]
                for stat in ("weight", "bias", "running_mean", "running_var"):
                    tv[f"layer{layer}.{u}.bn{bn}.{stat}"] = torch.rand(n, generator=g)
            n3 = target[f"{d}.bna_block.bn.weight"].shape[0]
            for stat in ("weight", "bias", "running_mean", "running_var"):
                tv[f"layer{layer}.{u}.bn3.{stat}"] = torch.rand(n3, generator=g)
        tv[f"layer{layer}.0.downsample.0.weight"] = torch.randn(target[f"{d}.shortcut.weight"].shape, generator=g)
        for stat in ("weight", "bias", "running_mean", "running_var"):
            tv[f"layer{layer}.0.downsample.1.{stat}"] = torch.rand(target[f"{d}.bna_block.bn.weight"].shape, generator=g)
    path = tmp_path / "resnet50.pth"
    torch.save(tv, path)

    import monai.networks.nets.hovernet as hv

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(hv, "download_url", lambda *a, **k: None)
    monai_mapped = hv._remap_standard_resnet_model("unused")

    model = fast_net
    counts = load_encoder_weights(model, path, "torchvision")
    loaded = model.net.state_dict()
    usable = {k: v for k, v in monai_mapped.items() if k in loaded and loaded[k].shape == v.shape}
    assert counts["loaded"] == len(usable) > 200
    for key, value in usable.items():
        assert torch.equal(loaded[key], value), key


def test_pretrained_missing_or_wrong_file_is_checkpoint_error(fast_net, tmp_path):
    model = fast_net
    with pytest.raises(CheckpointError, match="not found.*never downloads"):
        build_segmenter({"arch": "hovernet-fast", "num_classes": 4, "pretrained": str(tmp_path / "nope.tar")})
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="not a readable weights file"):
        load_encoder_weights(model, garbage)
    unrelated = tmp_path / "unrelated.pth"
    torch.save({"foo.weight": torch.zeros(3)}, unrelated)
    with pytest.raises(CheckpointError, match="no tensor matches"):
        load_encoder_weights(model, unrelated)
    wrong = tmp_path / "wrong.pth"
    torch.save({"desc": {"conv0./.weight": torch.zeros(64, 3, 5, 5)}}, wrong)
    with pytest.raises(CheckpointError, match="shape"):
        load_encoder_weights(model, wrong)


@pytest.mark.slow
@pytest.mark.parametrize("arch,size,out", [("hovernet-fast", 256, 164), ("hovernet-original", 270, 80)])
def test_hovernet_one_training_step(arch, size, out):
    """MONAI HoVer-Net builds and takes one optimiser step with the diffmix loss (both modes)."""
    from diffmix.seg.loss import hover_loss

    torch.manual_seed(0)
    model = build_segmenter({"arch": arch, "num_classes": 4})
    model.train()
    model.freeze_encoder(True)
    images = torch.rand(2, 3, size, size)
    targets = {"np": (torch.rand(2, out, out) > 0.5).long(), "hv": torch.rand(2, 2, out, out) * 2 - 1}
    targets["tp"] = targets["np"] * 3
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    outputs = model(images)
    assert outputs["np"].shape == (2, 2, out, out) and outputs["tp"].shape == (2, 5, out, out)
    assert size - 2 * model.crop_margin == out
    loss, _ = hover_loss(outputs, targets)
    before = model.net.conv0.conv.weight.detach().clone()
    frozen_before = model.net.res_blocks.d1.shortcut.weight.detach().clone()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, model.net.conv0.conv.weight)
    assert torch.equal(frozen_before, model.net.res_blocks.d1.shortcut.weight)
