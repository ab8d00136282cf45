"""Import the authors' released SDM checkpoints (.pt) into safetensors; load U-Nets (and schedules) back.

The released DiffMix checkpoints (`ema_0.9999_010000.pt` CoNSeP, `ema_0.9999_010200.pt` GLySAC,
spec 3) are plain `torch.save` state dicts of SDM's `UNetModel`, without the flags that built
it. `import_checkpoint` reads one with `torch.load(weights_only=True)` (never unpickling
arbitrary objects, design.md), infers the `UNetConfig` from the tensor shapes, checks that every
tensor fits that model by name and shape (strict), and writes a safetensors file whose metadata
holds the config, so `load_unet` can rebuild the model from the file alone. `load_sdm` is the
one loader sampling uses: that U-Net and the diffusion schedule the checkpoint was trained with.

What the shapes cannot tell, and how it is resolved:
- the image size, needed only to express attention levels as feature-map sizes: SDM picks
  `channel_mult` from the image size (script_util.create_model), so the default multipliers give
  it back; otherwise pass `image_size`;
- the head width of attention (the qkv weights are the same for any head split): taken from
  the configs whose manifests we hold (spec 2: 64 for the paper config, 32 for the 64-px one);
  otherwise pass `num_head_channels`. A wrong guess would load silently and compute garbage,
  so unknown models are refused instead of guessed.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from pydantic import ValidationError
from torch import Tensor

from diffmix.checkpoints import checkpoint_meta, file_sha256, load_checkpoint, save_checkpoint, state_dict_mismatch
from diffmix.errors import CheckpointError, ConfigError
from diffmix.sdm.diffusion import GaussianDiffusion
from diffmix.sdm.unet import UNetConfig, UNetModel, build_unet

# SDM script_util.create_model: the default channel_mult of each image size
DEFAULT_CHANNEL_MULT_SIZES: dict[tuple[int, ...], int] = {
    (1, 1, 2, 2, 4, 4): 256,
    (1, 1, 2, 3, 4): 128,
    (1, 2, 3, 4): 64,
}

# Head widths of the configs in spec/sdm_state_dict_manifest.json, keyed by
# (model_channels, channel_mult): the paper config (both datasets) and the 64-px config.
KNOWN_HEAD_CHANNELS: dict[tuple[int, tuple[int, ...]], int] = {
    (256, (1, 1, 2, 2, 4, 4)): 64,
    (64, (1, 2, 3, 4)): 32,
}

_WRAPPER_KEYS = ("state_dict", "model", "ema")
_MAX_LISTED = 5


def read_torch_state_dict(src: str | Path) -> dict[str, Tensor]:
    """Read a `torch.save`d state dict safely (weights_only=True), as name -> CPU tensor.

    Accepts a plain state dict (what SDM saves), one wrapped under "state_dict"/"model"/"ema",
    and DDP's "module." prefix. Anything else raises CheckpointError saying what the file holds.
    """
    src = Path(src)
    if not src.is_file():
        raise CheckpointError(f"{src}: checkpoint not found")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise beside our own error
            warnings.simplefilter("ignore")
            obj = torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{src}: refused by torch.load(weights_only=True): the file holds Python objects, not "
            f"only tensors, and is not loaded for safety ({first})"
        ) from None
    except Exception as exc:  # zip/EOF/format errors arrive as several unrelated types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{src}: not a readable PyTorch checkpoint ({first})") from None

    if isinstance(obj, Mapping) and not _is_tensor_mapping(obj):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping) and _is_tensor_mapping(obj[key]):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"{src}: holds a {type(obj).__name__}{' (empty)' if isinstance(obj, Mapping) else ''}, "
            "not a model state dict (name -> tensor)"
        )
    bad = [str(k) for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{src}: not a model state dict: non-tensor entries {bad[:_MAX_LISTED]}")
    state = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in state):  # saved from a DDP-wrapped model
        state = {k[len("module."):]: v for k, v in state.items()}
    not_float = [k for k, v in state.items() if not v.is_floating_point()]
    if not_float:
        raise CheckpointError(f"{src}: non-floating-point tensors {not_float[:_MAX_LISTED]} in a U-Net state dict")
    return state


def _is_tensor_mapping(obj: Mapping[Any, Any]) -> bool:
    return bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def _block_indices(state: Mapping[str, Tensor], prefix: str) -> list[int]:
    pattern = re.compile(rf"^{prefix}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in state if (m := pattern.match(k))})


def infer_config(
    state: Mapping[str, Tensor],
    *,
    image_size: int | None = None,
    num_head_channels: int | None = None,
    source: str = "checkpoint",
) -> UNetConfig:
    """The `UNetConfig` an SDM U-Net state dict was built with, read off its tensor shapes.

    model_channels from the time embedding, in/out/label channels from the stem, head and SPADE
    convs, num_res_blocks from where the first decoder up-sampler sits, channel_mult from each
    level's first res-block, attention levels from the `qkv` weights, resblock_updown from the
    down-sampler's kind, use_scale_shift_norm from the FiLM width. Works on meta tensors too.
    """

    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise CheckpointError(f"{source}: not an SDM U-Net state dict (no {key!r})")
        return tuple(state[key].shape)

    te0 = shape("time_embed.0.weight")
    model_channels = te0[1]
    if te0[0] != 4 * model_channels:
        raise CheckpointError(f"{source}: time embedding {te0} is not (4*C, C) as in SDM")
    stem = shape("input_blocks.0.0.weight")
    in_channels, ch0 = stem[1], stem[0]
    out_channels = shape("out.2.weight")[0]
    label_nc = shape("middle_block.0.in_norm.mlp_shared.0.weight")[1]

    n_in = len(_block_indices(state, "input_blocks"))
    out_idx = _block_indices(state, "output_blocks")
    n_out = len(out_idx)
    if n_out == 0 or out_idx != list(range(n_out)):
        raise CheckpointError(f"{source}: output_blocks are missing or not numbered 0..N-1")

    def has_upsampler(k: int) -> bool:
        return any(
            re.match(rf"^output_blocks\.{k}\.[1-9]\d*\.(in_norm\.|conv\.weight)", key) for key in state
        )

    first_up = next((k for k in range(n_out) if has_upsampler(k)), None)
    num_res_blocks = (n_out - 1) if first_up is None else first_up
    per_level = num_res_blocks + 1
    levels = n_out // per_level
    if num_res_blocks < 1 or n_out != levels * per_level or n_in != levels * per_level:
        raise CheckpointError(
            f"{source}: block structure does not fit an SDM U-Net "
            f"({n_in} input blocks, {n_out} output blocks, up-sampler after block {first_up})"
        )

    channel_mult = []
    for level in range(levels):
        width = shape(f"input_blocks.{1 + level * per_level}.0.in_layers.2.weight")[0]
        if width % model_channels:
            raise CheckpointError(
                f"{source}: level {level} width {width} is not a multiple of model_channels "
                f"{model_channels} (fractional channel multipliers are not supported)"
            )
        channel_mult.append(width // model_channels)
    if channel_mult[0] * model_channels != ch0:
        raise CheckpointError(f"{source}: stem width {ch0} differs from level-0 width {channel_mult[0] * model_channels}")
    mult = tuple(channel_mult)

    resblock_updown = True
    if levels > 1:
        down = f"input_blocks.{per_level}.0"
        if f"{down}.op.weight" in state:
            resblock_updown = False
        elif f"{down}.in_layers.2.weight" not in state:
            raise CheckpointError(f"{source}: no down-sampler found at {down}")
    film = shape("input_blocks.1.0.emb_layers.1.weight")[0]
    use_scale_shift_norm = film == 2 * mult[0] * model_channels

    attention_levels = [
        level for level in range(levels) if f"input_blocks.{1 + level * per_level}.1.qkv.weight" in state
    ]

    if image_size is None:
        image_size = DEFAULT_CHANNEL_MULT_SIZES.get(mult)
        if image_size is None:
            raise CheckpointError(
                f"{source}: cannot tell the training image size of a U-Net with channel_mult {mult} "
                "(not an SDM default); pass image_size"
            )
    if num_head_channels is None:
        num_head_channels = KNOWN_HEAD_CHANNELS.get((model_channels, mult))
        if num_head_channels is None:
            raise CheckpointError(
                f"{source}: the attention head width of a U-Net with {model_channels} channels x "
                f"{mult} is not known (the weights do not record it); pass num_head_channels"
            )
    try:
        return UNetConfig(
            image_size=image_size,
            in_channels=in_channels,
            model_channels=model_channels,
            out_channels=out_channels,
            num_res_blocks=num_res_blocks,
            attention_resolutions=tuple(image_size // 2**level for level in attention_levels),
            channel_mult=mult,
            num_head_channels=num_head_channels,
            label_nc=label_nc,
            resblock_updown=resblock_updown,
            use_scale_shift_norm=use_scale_shift_norm,
        )
    except ValidationError as exc:
        reason = exc.errors()[0]["msg"] if exc.errors() else str(exc)
        raise CheckpointError(f"{source}: inferred U-Net config is invalid: {reason}") from None


def check_state_dict(state: Mapping[str, Tensor], config: UNetConfig, source: str = "checkpoint") -> None:
    """Strict fit of `state` to `UNetModel(config)`: same names, same shapes, else CheckpointError
    listing the missing, unexpected and mis-shaped names (a few of each)."""
    problem = state_dict_mismatch(build_unet(config, "meta").state_dict(), state, listed=_MAX_LISTED)
    if problem:
        raise CheckpointError(f"{source}: does not fit the SDM U-Net it describes: {problem}")


def import_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    image_size: int | None = None,
    num_head_channels: int | None = None,
    overwrite: bool = False,
) -> UNetConfig:
    """Convert an authors' SDM `.pt` state dict into a diffmix safetensors checkpoint.

    The output holds {"model": state dict} (fp32, in the model's parameter order) and metadata
    {"unet_config": ..., "source": {...}} with the source's name and sha256. Returns the
    inferred config. Refuses to replace an existing `dst` unless `overwrite`.
    """
    src, dst = Path(src), Path(dst)
    if dst.exists() and not overwrite:
        raise CheckpointError(f"{dst}: already exists; choose another output path or remove it")
    if dst.exists() and dst.resolve() == src.resolve():
        raise CheckpointError(f"{dst}: the output must differ from the input checkpoint")
    state = read_torch_state_dict(src)
    config = infer_config(state, image_size=image_size, num_head_channels=num_head_channels, source=str(src))
    check_state_dict(state, config, source=str(src))
    order = list(build_unet(config, "meta").state_dict())
    weights: dict[str, Tensor] = {}
    for key in order:
        tensor = state[key].float()
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{src}: tensor {key!r} holds NaN or infinite values (corrupt or diverged)")
        weights[key] = tensor
    meta = {
        "unet_config": config.model_dump(mode="json"),
        "source": {
            "name": src.name,
            "path": str(src.resolve()),
            "sha256": file_sha256(src),
            "format": "torch.save state dict of SDM guided_diffusion.unet.UNetModel",
            "num_parameters": sum(t.numel() for t in weights.values()),
        },
    }
    save_checkpoint(dst, {"model": weights}, meta=meta)
    return config


WEIGHTS: tuple[str, ...] = ("auto", "ema", "model")


def check_weights(weights: str) -> None:
    """ConfigError unless `weights` names a choice of `load_unet`: "auto" (EMA when the file
    has it, else the raw weights; spec 3: sampling uses the EMA), "ema" or "model"."""
    if weights not in WEIGHTS:
        raise ConfigError(f"weights must be auto, ema or model, got {weights!r}")


def load_unet(
    path: str | Path, device: str | torch.device = "cpu", weights: str = "auto"
) -> tuple[UNetModel, UNetConfig]:
    """Rebuild the U-Net stored in a diffmix safetensors checkpoint, in eval mode on `device`.

    Reads files written by `import_checkpoint` and training checkpoints whose metadata holds
    "unet_config" and whose state holds "ema" and/or "model" state dicts (name -> tensor).
    `weights`: "auto" prefers EMA (what sampling uses, spec 3), "ema" or "model" force one.
    """
    check_weights(weights)
    path = Path(path)
    order = ("ema", "model") if weights == "auto" else (weights,)
    chosen, tensors, meta = _read_weights(path, order)
    if "unet_config" not in meta:
        raise CheckpointError(
            f"{path}: no U-Net config in its metadata; import an authors' .pt with "
            "`diffmix sdm import` first, or pass a diffmix SDM training checkpoint"
        )
    try:
        config = UNetConfig.model_validate(meta["unet_config"])
    except ValidationError as exc:
        reason = exc.errors()[0]["msg"] if exc.errors() else str(exc)
        raise CheckpointError(f"{path}: its U-Net config is invalid: {reason}") from None
    if chosen is None:
        raise CheckpointError(f"{path}: holds no {' or '.join(repr(k) for k in order)} weights")
    check_state_dict(tensors, config, source=f"{path} [{chosen}]")
    model = build_unet(config, "meta")
    # assign=True adopts the loaded tensors instead of first allocating random weights
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True, assign=True)
    return model.to(device).eval(), config


def _read_weights(
    path: Path, order: tuple[str, ...]
) -> tuple[str | None, dict[str, Tensor], dict[str, Any]]:
    """(name of the first of `order` present, its tensors, checkpoint meta), reading only those
    tensors: a paper-size training checkpoint also holds the raw weights and two Adam moments
    (4x the EMA's 2.6 GB), which sampling never needs."""
    meta: dict[str, Any] = {}
    for name in order:
        state, meta = load_checkpoint(path, only=[name])
        tensors = state.get(name)
        if isinstance(tensors, Mapping) and _is_tensor_mapping(tensors):
            return name, dict(tensors), meta
    return None, {}, meta




def load_sdm(
    path: str | Path, device: str | torch.device = "cpu", weights: str = "auto"
) -> tuple[UNetModel, GaussianDiffusion]:
    """(U-Net in eval mode, its full diffusion schedule) for sampling: the one model loader.

    The U-Net comes from `load_unet`. The schedule is the checkpoint's own: a `diffmix sdm
    train` checkpoint records its `diffusion_steps` (linear betas over that many steps, spec 3);
    a file without a training config (an imported authors' checkpoint) gets the official
    T = 1000. Torch `.pt` files are refused with the command that converts them.
    """
    path = Path(path)
    check_weights(weights)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.suffix.lower() in (".pt", ".pth"):
        raise CheckpointError(
            f"{path}: a torch .pt checkpoint; convert it once with `diffmix sdm import {path} OUT.safetensors` "
            "and synthesise from OUT.safetensors"
        )
    model, _ = load_unet(path, device, weights=weights)
    train_config = checkpoint_meta(path).get("train_config") or {}
    return model, GaussianDiffusion.linear(int(train_config.get("diffusion_steps", 1000)))


__all__ = [
    "read_torch_state_dict",
    "infer_config",
    "check_state_dict",
    "import_checkpoint",
    "load_unet",
    "load_sdm",
    "check_weights",
    "WEIGHTS",
    "DEFAULT_CHANNEL_MULT_SIZES",
    "KNOWN_HEAD_CHANNELS",
]
