"""Importing SDM .pt checkpoints: config inference, strict checks, safetensors round trip."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from diffmix.checkpoints import load_checkpoint, save_checkpoint
from diffmix.errors import CheckpointError
from diffmix.sdm.convert import (
    check_state_dict,
    import_checkpoint,
    infer_config,
    load_unet,
    read_torch_state_dict,
)
from diffmix.sdm.unet import UNetConfig, UNetModel, build_unet

TINY = dict(image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
            attention_resolutions=(8,), num_head_channels=16, label_nc=6)
TINY_HINTS = dict(image_size=16, num_head_channels=16)


pytestmark = pytest.mark.usefixtures("one_thread")


def _random_model(config: UNetConfig, seed: int) -> UNetModel:
    torch.manual_seed(seed)
    model = UNetModel(config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():  # non-zero output convs, so outputs depend on every tensor
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / math.sqrt(max(p[0].numel(), 1))))
    return model.eval()


def _inputs(config: UNetConfig, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    s = config.image_size
    return (
        torch.randn(2, config.in_channels, s, s, generator=gen),
        torch.tensor([17, 870]),
        (torch.rand(2, config.label_nc, s, s, generator=gen) > 0.6).float(),
    )


@pytest.fixture
def authors_pt(tmp_path: Path) -> tuple[Path, UNetConfig, UNetModel]:
    """A tiny SDM saved the way the authors' TrainLoop saves it: torch.save(state_dict)."""
    config = UNetConfig(**TINY)
    model = _random_model(config, seed=0)
    path = tmp_path / "ema_0.9999_000010.pt"
    torch.save(model.state_dict(), path)
    return path, config, model


# ------------------------------------------------------------------ inference of the config


@pytest.mark.parametrize(
    "config",
    [UNetConfig.paper(6), UNetConfig.paper(5), UNetConfig.small(6), UNetConfig.small(5)],
    ids=["consep_256", "glysac_256", "small_64_6", "small_64_5"],
)
def test_infers_released_configs_from_shapes_alone(config: UNetConfig) -> None:
    state = build_unet(config, "meta").state_dict()  # shapes only, no memory
    assert infer_config(state) == config


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(num_res_blocks=2, channel_mult=(1, 2, 2), attention_resolutions=(16, 4)),
        dict(resblock_updown=False, use_scale_shift_norm=False),
        dict(channel_mult=(2,), attention_resolutions=()),
        dict(attention_resolutions=(), label_nc=3, in_channels=1, out_channels=2),
    ],
)
def test_infers_other_configs_with_hints(overrides: dict) -> None:
    config = UNetConfig(**(TINY | overrides))
    state = build_unet(config, "meta").state_dict()
    assert infer_config(state, **TINY_HINTS) == config


def test_unknown_models_need_hints() -> None:
    state = build_unet(UNetConfig(**TINY), "meta").state_dict()
    with pytest.raises(CheckpointError, match="pass image_size"):
        infer_config(state)
    with pytest.raises(CheckpointError, match="pass num_head_channels"):
        infer_config(state, image_size=16)
    with pytest.raises(CheckpointError, match="not divisible by num_head_channels 48"):
        infer_config(state, image_size=16, num_head_channels=48)


# ------------------------------------------------------------------ round trip


def test_import_round_trip_reproduces_the_model(authors_pt, tmp_path: Path) -> None:
    src, config, model = authors_pt
    dst = tmp_path / "sdm.safetensors"
    got = import_checkpoint(src, dst, **TINY_HINTS)
    assert got == config
    state, meta = load_checkpoint(dst)
    assert list(state["model"]) == list(model.state_dict())  # model order
    assert UNetConfig.model_validate(meta["unet_config"]) == config
    assert meta["source"]["name"] == src.name and len(meta["source"]["sha256"]) == 64
    assert meta["source"]["num_parameters"] == sum(p.numel() for p in model.parameters())

    loaded, loaded_config = load_unet(dst)
    assert loaded_config == config and not loaded.training
    assert all(p.requires_grad and p.device.type == "cpu" for p in loaded.parameters())
    x, t, y = _inputs(config)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))


def test_import_accepts_wrappers_ddp_prefix_and_fp16(authors_pt, tmp_path: Path) -> None:
    src, config, model = authors_pt
    sd = model.state_dict()
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v.half() for k, v in sd.items()}, "step": 3}, wrapped)
    dst = tmp_path / "w.safetensors"
    assert import_checkpoint(wrapped, dst, **TINY_HINTS) == config
    state, _ = load_checkpoint(dst)
    assert all(v.dtype == torch.float32 for v in state["model"].values())
    torch.testing.assert_close(state["model"]["out.2.weight"], sd["out.2.weight"].half().float())


def test_import_refuses_to_overwrite(authors_pt, tmp_path: Path) -> None:
    src, config, _ = authors_pt
    dst = tmp_path / "sdm.safetensors"
    dst.write_bytes(b"keep me")
    with pytest.raises(CheckpointError, match="already exists"):
        import_checkpoint(src, dst, **TINY_HINTS)
    assert dst.read_bytes() == b"keep me"
    assert import_checkpoint(src, dst, overwrite=True, **TINY_HINTS) == config


# ------------------------------------------------------------------ wrong or corrupt files


class _NotATensor:  # pickled into a .pt, refused by weights_only=True
    pass


def _expect_error(path: Path, tmp_path: Path, match: str, **hints) -> None:
    dst = tmp_path / "out.safetensors"
    with pytest.raises(CheckpointError, match=match) as info:
        import_checkpoint(path, dst, **(TINY_HINTS | hints))
    assert str(path) in str(info.value)
    assert not dst.exists()  # nothing half-written
    assert not list(tmp_path.glob(".out*"))


def test_missing_garbage_and_truncated_files(authors_pt, tmp_path: Path) -> None:
    src, _, _ = authors_pt
    _expect_error(tmp_path / "nope.pt", tmp_path, "checkpoint not found")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    _expect_error(garbage, tmp_path, "not a readable PyTorch checkpoint")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    _expect_error(truncated, tmp_path, "not a readable PyTorch checkpoint")


def test_files_that_are_not_state_dicts(tmp_path: Path) -> None:
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"w": _NotATensor()}, unsafe)
    _expect_error(unsafe, tmp_path, "weights_only=True")
    a_list = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], a_list)
    _expect_error(a_list, tmp_path, "holds a list, not a model state dict")
    mixed = tmp_path / "mixed.pt"
    torch.save({"a.weight": torch.zeros(2), "step": 5}, mixed)
    _expect_error(mixed, tmp_path, r"non-tensor entries \['step'\]")
    other = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(2, 2)}, other)
    _expect_error(other, tmp_path, "not an SDM U-Net state dict")
    ints = tmp_path / "ints.pt"
    torch.save({"time_embed.0.weight": torch.zeros(4, 1, dtype=torch.long)}, ints)
    _expect_error(ints, tmp_path, "non-floating-point")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda sd: sd.pop("out.2.bias"), r"1 missing \(out.2.bias\)"),
        (lambda sd: sd.update({"extra.weight": torch.zeros(3)}), r"1 unexpected \(extra.weight\)"),
        (lambda sd: sd.update({"middle_block.1.qkv.bias": torch.zeros(7)}), r"1 tensor\(s\) of another shape \(checkpoint vs model: middle_block.1.qkv.bias \(7,\) vs \(192,\)\)"),
        (lambda sd: sd["output_blocks.0.0.in_norm.mlp_beta.bias"].__setitem__(0, float("nan")), "NaN or infinite"),
    ],
    ids=["missing", "unexpected", "shape", "nan"],
)
def test_state_dicts_that_do_not_fit(authors_pt, tmp_path: Path, edit, match: str) -> None:
    _, _, model = authors_pt
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    edit(sd)
    path = tmp_path / "edited.pt"
    torch.save(sd, path)
    _expect_error(path, tmp_path, match)


def test_read_torch_state_dict_returns_plain_names(authors_pt) -> None:
    src, _, model = authors_pt
    state = read_torch_state_dict(src)
    assert list(state) == list(model.state_dict())
    check_state_dict(state, UNetConfig(**TINY))
    with pytest.raises(CheckpointError, match="does not fit"):
        check_state_dict(state, UNetConfig(**(TINY | dict(label_nc=5))))


# ------------------------------------------------------------------ training checkpoints


def test_load_unet_prefers_ema_of_a_training_checkpoint(tmp_path: Path) -> None:
    config = UNetConfig(**(TINY | dict(use_checkpoint=True)))
    raw, ema = _random_model(config, seed=1), _random_model(config, seed=2)
    path = tmp_path / "ckpt_000005.safetensors"
    save_checkpoint(
        path,
        {"model": raw.state_dict(), "ema": ema.state_dict(), "step": 5},
        meta={"unet_config": config.model_dump(mode="json")},
    )
    x, t, y = _inputs(config, seed=3)
    with torch.no_grad():
        auto, _ = load_unet(path)
        assert torch.equal(auto(x, t, y), ema(x, t, y))
        forced, got_config = load_unet(path, weights="model")
        assert torch.equal(forced(x, t, y), raw(x, t, y))
    assert got_config == config

    only_model = tmp_path / "only_model.safetensors"
    save_checkpoint(only_model, {"model": raw.state_dict()}, meta={"unet_config": config.model_dump(mode="json")})
    with torch.no_grad():
        assert torch.equal(load_unet(only_model)[0](x, t, y), raw(x, t, y))
    with pytest.raises(CheckpointError, match="holds no 'ema' weights"):
        load_unet(only_model, weights="ema")


def test_load_unet_errors(tmp_path: Path) -> None:
    config = UNetConfig(**TINY)
    sd = _random_model(config, seed=4).state_dict()
    no_config = tmp_path / "no_config.safetensors"
    save_checkpoint(no_config, {"model": sd}, meta={})
    with pytest.raises(CheckpointError, match="no U-Net config"):
        load_unet(no_config)
    bad_config = tmp_path / "bad_config.safetensors"
    save_checkpoint(bad_config, {"model": sd}, meta={"unet_config": {**config.model_dump(mode="json"), "heads": 3}})
    with pytest.raises(CheckpointError, match="config is invalid"):
        load_unet(bad_config)
    mismatch = tmp_path / "mismatch.safetensors"
    save_checkpoint(mismatch, {"model": sd}, meta={"unet_config": (config.model_dump(mode="json") | {"label_nc": 5})})
    with pytest.raises(CheckpointError, match=r"does not fit the SDM U-Net.*tensor\(s\) of another shape"):
        load_unet(mismatch)
    with pytest.raises(CheckpointError, match="not found"):
        load_unet(tmp_path / "absent.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(no_config.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a readable safetensors checkpoint"):
        load_unet(corrupt)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"  # weights without any diffmix metadata
    save_file({k: v.contiguous() for k, v in sd.items()}, str(plain))
    with pytest.raises(CheckpointError, match="no U-Net config"):
        load_unet(plain)
