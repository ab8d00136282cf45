"""Segmenters with HoVer-Net's three heads (np, hv, tp) behind one interface.

Every model here maps `images` float (B,3,H,W) in [0,1] to a dict of logits/maps:

- `np`: (B,2,h,w) logits, channel 1 = nucleus (hovernet_notes section 2);
- `hv`: (B,2,h,w) linear, channel 0 = horizontal (x, column) distance map, channel 1 = vertical
  (y, row) map, each in [-1,1] about the nucleus centroid (hover_net's order);
- `tp`: (B,K+1,h,w) logits, channel 0 = background, 1..K = the scheme's classes,

with `h = H - 2 * model.crop_margin`. `model.input_size` is the tile size the network expects
(None: any size). Training and inference (`diffmix.seg.infer`) rely only on this interface.

Four architectures (`SegModelConfig.arch`):

- `small`: a HoVer-style U-Net written here (shared encoder, three decoder heads, same padding, so
  output size = input size and `crop_margin` = 0) with configurable width/depth, so CPU runs
  train in minutes.
- `hovernet-fast`: MONAI's `HoVerNet(mode="fast")`, 256 -> 164 (`crop_margin` 46). DiffMix's
  synthetic patches are 256x256 (spec section 8 "patch-size mismatch"), which fast mode consumes
  exactly: the loss sees the centre 164x164 of every patch.
- `hovernet-original`: MONAI's `HoVerNet(mode="original")`, 270 -> 80 (`crop_margin` 95), the mode of
  the official CoNSeP checkpoints. A 256 patch is smaller than its 270 input: the training items
  (`diffmix.seg.data`) mirror-pad images by 7 px per side (labels padded with background); since only
  the centre 80x80 enters the loss, padded pixels never become targets. Larger tiles are cropped.
- `sonnet`: SONNET (`diffmix.seg.sonnet.model.SonnetNet`), 270 -> 76 (`crop_margin` 97), with the
  outputs np / ord (8 ordinal classifiers) / tp instead of np / hv / tp; its post-processing is
  `diffmix.seg.sonnet.postproc` (the model says so in `post_processing`). The SONNET-only fields
  (`input_size`, `width_coefficient`, `depth_coefficient`, `bottleneck`, `decoder_width`) are left
  out of HoVer-Net configs when dumped, so older run folders still resume.

HV channel order: MONAI's `HoVerNet` itself attaches no meaning to its two hv channels; the meaning
comes from the targets it is trained on. MONAI's own target transform (`ComputeHoVerMaps`) stacks
[horizontal (column offset), vertical (row offset)], the same order as hover_net's `gen_targets`
(ch0 = x) and as `diffmix.seg.targets.make_targets`, so weights trained by either code base keep
channel 0 = x here. (MONAI's `HoVerNetLoss` differs from hover_net in its MSGE derivative directions
and HV-MSE weight 2; see `diffmix.seg.loss`.)

MONAI's decoder upsamples bilinearly where hover_net uses nearest 2x upsampling; this is MONAI's
architecture and is kept as is. Pretrained encoder weights come only from a local file named in
the config (`pretrained`): MONAI's `pretrained_url` (which downloads) is never used.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import HoVerNet
from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator
from safetensors.torch import load_file

from diffmix.checkpoints import load_checkpoint, load_state_strict
from diffmix.errors import CheckpointError, ConfigError
from diffmix.seg.sonnet.model import SonnetNet, load_efficientnet_weights, output_size

Arch = Literal["small", "hovernet-fast", "hovernet-original", "sonnet"]

#: SegModelConfig fields that only SONNET reads (dumped only for arch sonnet).
SONNET_FIELDS = ("input_size", "width_coefficient", "depth_coefficient", "bottleneck", "decoder_width")

# hovernet_notes section 2: fast 256 -> 164, original 270 -> 80.
HOVERNET_SIZES = {"hovernet-fast": (256, 164), "hovernet-original": (270, 80)}


class SegModelConfig(BaseModel):
    """Which segmenter to build; `num_classes` (K, foreground classes) comes from the dataset."""

    model_config = ConfigDict(extra="forbid")

    arch: Arch = "small"
    num_classes: int | None = Field(default=None, ge=1, le=127)
    width: int = Field(default=16, ge=2, description="small net: channels of the first level")
    depth: int = Field(default=3, ge=1, le=6, description="small net: number of 2x downsamplings")
    max_width: int = Field(default=256, ge=2, description="small net: channel cap per level")
    pretrained: str | None = Field(
        default=None, description="hovernet/sonnet: local file with ImageNet encoder weights (no download)"
    )
    pretrained_format: Literal["auto", "preact", "torchvision"] = "auto"
    # SONNET (notes 3): the paper's values; smaller ones make the CPU preset
    input_size: int = Field(default=270, description="sonnet: input side, 16k - 2 (output = input - 194)")
    width_coefficient: float = Field(default=1.0, gt=0, le=2, description="sonnet: EfficientNet width multiplier")
    depth_coefficient: float = Field(default=1.0, gt=0, le=2, description="sonnet: EfficientNet depth multiplier")
    bottleneck: int = Field(default=1024, ge=8, description="sonnet: channels of conv_bot (f4)")
    decoder_width: int = Field(default=256, ge=8, description="sonnet: decoder channels (multiple of 8)")

    @model_validator(mode="after")
    def _sonnet_fields_only_for_sonnet(self) -> "SegModelConfig":
        stray = sorted(set(SONNET_FIELDS) & self.model_fields_set)
        if self.arch != "sonnet" and stray:
            raise ValueError(f"{', '.join(stray)} apply to arch 'sonnet' only, not {self.arch!r}")
        return self

    @model_serializer(mode="wrap")
    def _drop_sonnet_fields(self, handler: Any) -> dict[str, Any]:
        # HoVer-Net run identities (config.yaml) stay as they were before SONNET existed
        data = handler(self)
        unused = SONNET_FIELDS if self.arch != "sonnet" else ("width", "depth", "max_width", "pretrained_format")
        for name in unused:
            data.pop(name, None)
        return data


# --------------------------------------------------------------------------- small net


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class _Decoder(nn.Module):
    """One head: upsample, add the encoder skip by concatenation, conv block; 1x1 to out_ch."""

    def __init__(self, widths: list[int], out_ch: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            _conv_block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(len(widths) - 1))
        )
        self.out = nn.Conv2d(widths[0], out_ch, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        for block, skip in zip(self.blocks, reversed(feats[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = block(torch.cat([x, skip], dim=1))
        return self.out(x)


class SmallHoverNet(nn.Module):
    """HoVer-style U-Net: shared encoder, decoders np (2), hv (2), tp (K+1); output size = input size.

    Any input size works: the input is replicate-padded up to a multiple of 2**depth and the
    outputs are cropped back, so inference can tile with any window.
    """

    crop_margin = 0
    input_size: int | None = None

    def __init__(self, num_classes: int, width: int = 16, depth: int = 3, max_width: int = 256) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.depth = depth
        widths = [min(width * 2**i, max_width) for i in range(depth + 1)]
        self.stem = _conv_block(3, widths[0])
        self.down = nn.ModuleList(_conv_block(widths[i], widths[i + 1]) for i in range(depth))
        self.heads = nn.ModuleDict(
            {"np": _Decoder(widths, 2), "hv": _Decoder(widths, 2), "tp": _Decoder(widths, num_classes + 1)}
        )

    def encoder_modules(self) -> list[nn.Module]:
        return [self.stem, self.down]

    def freeze_encoder(self, frozen: bool) -> None:
        """Phase 1 of hovernet_notes section 3: encoder weights fixed, BN statistics still update."""
        for module in self.encoder_modules():
            module.requires_grad_(not frozen)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h, w = images.shape[-2:]
        m = 2**self.depth
        ph, pw = (-h) % m, (-w) % m
        x = F.pad(images, (0, pw, 0, ph), mode="replicate") if ph or pw else images
        feats = [self.stem(x)]
        for block in self.down:
            feats.append(block(F.max_pool2d(feats[-1], 2)))
        return {k: head(feats)[..., :h, :w] for k, head in self.heads.items()}


# --------------------------------------------------------------------------- MONAI HoVer-Net


class MonaiHoverNet(nn.Module):
    """MONAI `HoVerNet` with diffmix's output keys (np/hv/tp), size contract and encoder freezing."""

    def __init__(self, num_classes: int, mode: Literal["fast", "original"]) -> None:
        super().__init__()

        self.num_classes = num_classes
        self.mode = mode
        in_size, out_size = HOVERNET_SIZES[f"hovernet-{mode}"]
        self.input_size: int | None = in_size
        self.crop_margin = (in_size - out_size) // 2
        # pretrained_url stays None: MONAI would download; weights come from load_encoder_weights.
        self.net = HoVerNet(mode=mode, in_channels=3, np_out_channels=2, out_classes=num_classes + 1)

    def freeze_encoder(self, frozen: bool) -> None:
        """hovernet_notes section 3: d0's residual units and all of d1-d3 frozen; conv0, d0's
        shortcut and final BN, the bottleneck and the decoders train. BN statistics still update
        because the model stays in train mode (as the official code)."""
        blocks = self.net.res_blocks
        blocks.d0.layers.requires_grad_(not frozen)
        for name in ("d1", "d2", "d3"):
            getattr(blocks, name).requires_grad_(not frozen)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"hovernet-{self.mode} takes {self.input_size}x{self.input_size} tiles, "
                f"got {tuple(images.shape[-2:])}"
            )
        out = self.net(images)
        return {
            "np": out["nucleus_prediction"],
            "hv": out["horizontal_vertical"],
            "tp": out["type_prediction"],
        }


# --------------------------------------------------------------------------- pretrained encoders

_PREACT_UNIT = re.compile(r"^d(\d)\.units\.(\d+)\.(.+)$")
_PREACT_BNA = re.compile(r"^d(\d)\.blk_bna\.(.+)$")
_PREACT_SHORTCUT = re.compile(r"^d(\d)\.shortcut\.(.+)$")
_TV_BLOCK = re.compile(r"^layer(\d)\.(\d+)\.(.+)$")


def _preact_key(key: str) -> str | None:
    """hover_net `ImageNet-ResNet50-Preact_pytorch.tar` ('desc') names -> MONAI HoVerNet names.

    hover_net's conv0 is a Sequential whose conv is named '/', its units keep the layer names
    MONAI copied ('preact/bn', 'conv1', 'conv1/bn', ...).
    """
    if key.startswith("conv0./."):
        return "conv0.conv." + key[len("conv0./.") :]
    if key.startswith("conv0.bn."):
        return key
    if m := _PREACT_UNIT.match(key):
        return f"res_blocks.d{m[1]}.layers.denselayer_{m[2]}.layers.{m[3]}"
    if m := _PREACT_BNA.match(key):
        return f"res_blocks.d{m[1]}.bna_block.{m[2]}"
    if m := _PREACT_SHORTCUT.match(key):
        return f"res_blocks.d{m[1]}.shortcut.{m[2]}"
    return None


def _torchvision_key(key: str) -> str | None:
    """torchvision ResNet-50 names -> MONAI HoVerNet names (post-activation BNs shifted onto the
    next unit's pre-activation BN, as MONAI's `adapt_standard_resnet` does)."""
    if key.startswith("conv1."):
        return "conv0.conv." + key[len("conv1.") :]
    if key.startswith("bn1."):
        return "conv0.bn." + key[len("bn1.") :]
    m = _TV_BLOCK.match(key)
    if not m:
        return None
    block, unit, rest = int(m[1]) - 1, int(m[2]), m[3]
    base = f"res_blocks.d{block}"
    if rest.startswith("downsample.0."):
        return f"{base}.shortcut." + rest[len("downsample.0.") :]
    if rest.startswith("downsample.1."):
        return f"{base}.bna_block.bn." + rest[len("downsample.1.") :]
    if m2 := re.match(r"^conv(\d)\.(.+)$", rest):
        return f"{base}.layers.denselayer_{unit}.layers.conv{m2[1]}.{m2[2]}"
    if m2 := re.match(r"^bn([12])\.(.+)$", rest):
        return f"{base}.layers.denselayer_{unit}.layers.conv{m2[1]}/bn.{m2[2]}"
    if m2 := re.match(r"^bn3\.(.+)$", rest):
        return f"{base}.layers.denselayer_{unit + 1}.layers.preact/bn.{m2[1]}"
    return None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise beside our own error
        warnings.simplefilter("ignore")
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for wrapper in ("desc", "state_dict", "model"):
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_encoder_weights(
    model: MonaiHoverNet, path: str | Path, fmt: Literal["auto", "preact", "torchvision"] = "auto"
) -> dict[str, int]:
    """Load ImageNet encoder weights from a local file into a MONAI HoVer-Net; never downloads.

    Accepts hover_net's Preact-ResNet50 checkpoint (`ImageNet-ResNet50-Preact_pytorch.tar`, the
    official initialisation of hovernet_notes section 2) or a torchvision ResNet-50 state dict
    (`.pth`/`.pt`/`.safetensors`). Returns counts {"loaded", "encoder_total"}.
    A missing or unreadable file, or one whose tensors do not fit, raises CheckpointError.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"{path}: pretrained encoder weights not found (give a local file; diffmix never downloads)"
        )
    try:
        state = _read_state_dict(path)
    except CheckpointError:
        raise
    except Exception as exc:  # torch.load raises many types on foreign or corrupt files
        # its messages run to dozens of lines (weights_only advice); the first one says what failed
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        raise CheckpointError(
            f"{path}: not a readable weights file ({type(exc).__name__}: {first[:200]}); "
            "give a state dict of tensors (.pth/.pt saved with torch.save, or .safetensors)"
        ) from None
    if fmt == "auto":
        fmt = "preact" if any(k.startswith(("conv0.", "d0.units")) for k in state) else "torchvision"
    mapper = _preact_key if fmt == "preact" else _torchvision_key
    target = model.net.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        new = mapper(key)
        if new is None or new not in target:
            continue
        if target[new].shape != tensor.shape:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(tensor.shape)}, the encoder's {new} needs "
                f"{tuple(target[new].shape)} (not a ResNet-50 {fmt} checkpoint?)"
            )
        mapped[new] = tensor.to(target[new].dtype)
    encoder_keys = [k for k in target if k.startswith(("conv0.", "res_blocks."))]
    if not mapped:
        raise CheckpointError(
            f"{path}: no tensor matches the HoVer-Net encoder as a {fmt} ResNet-50 "
            f"({len(state)} tensors read, e.g. {sorted(state)[:3]})"
        )
    model.net.load_state_dict({**target, **mapped})
    return {"loaded": len(mapped), "encoder_total": len(encoder_keys)}


# --------------------------------------------------------------------------- build / load


def build_segmenter(config: SegModelConfig | Mapping[str, Any], load_pretrained: bool = True) -> nn.Module:
    """A freshly initialised segmenter (seed torch before calling for reproducible weights).

    `load_pretrained=False` skips the encoder file, for models whose weights come from a
    diffmix checkpoint next.
    """
    cfg = config if isinstance(config, SegModelConfig) else SegModelConfig.model_validate(dict(config))
    if cfg.num_classes is None:
        raise ConfigError("model.num_classes is not set (it normally comes from the dataset's class scheme)")
    if cfg.arch == "small":
        if cfg.pretrained:
            raise ConfigError("model.pretrained applies to the HoVer-Net encoders only (and SONNET's), not arch 'small'")
        model: nn.Module = SmallHoverNet(cfg.num_classes, cfg.width, cfg.depth, cfg.max_width)
    elif cfg.arch == "sonnet":
        output_size(cfg.input_size)  # a bad size fails before anything is built
        if cfg.pretrained and load_pretrained and not Path(cfg.pretrained).expanduser().is_file():
            raise CheckpointError(
                f"{cfg.pretrained}: ImageNet EfficientNet-B0 weights not found "
                "(give a local file; diffmix never downloads)"
            )
        model = SonnetNet(
            cfg.num_classes,
            input_size=cfg.input_size,
            width_coefficient=cfg.width_coefficient,
            depth_coefficient=cfg.depth_coefficient,
            bottleneck=cfg.bottleneck,
            decoder_width=cfg.decoder_width,
        )
        if cfg.pretrained and load_pretrained:
            load_efficientnet_weights(model, cfg.pretrained)
    else:
        if cfg.pretrained and load_pretrained and not Path(cfg.pretrained).expanduser().is_file():
            # fail before building a 37 M-parameter network
            raise CheckpointError(
                f"{cfg.pretrained}: pretrained encoder weights not found "
                "(give a local file; diffmix never downloads)"
            )
        model = MonaiHoverNet(cfg.num_classes, mode="fast" if cfg.arch == "hovernet-fast" else "original")
        if cfg.pretrained and load_pretrained:
            load_encoder_weights(model, cfg.pretrained, cfg.pretrained_format)
    model.config = cfg  # type: ignore[assignment]
    return model


def load_segmenter(ckpt_path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode on `device`, meta) from a checkpoint written by `train_segmenter`.

    meta holds "num_classes", "model" (the SegModelConfig dict) and "preset" at least.
    """
    state, meta = load_checkpoint(ckpt_path)
    if "model" not in meta or "num_classes" not in meta or not isinstance(state.get("model"), Mapping):
        raise CheckpointError(f"{ckpt_path}: not a diffmix segmenter checkpoint (no model config in its metadata)")
    cfg = SegModelConfig.model_validate({**meta["model"], "num_classes": meta["num_classes"]})
    model = build_segmenter(cfg, load_pretrained=False)
    load_state_strict(model, state["model"], str(ckpt_path), f"the {cfg.arch} segmenter its metadata describes")
    model.to(device).eval()
    return model, meta
