"""The SONNET network: EfficientNet-B0 encoder (stride-1 stem) and three decoders np / ord / tp (notes 3).

Input float (B, 3, N, N) in [0, 1] (no ImageNet mean/std, as the official graph: notes 9, D9),
N = `input_size` (270 in the paper). Output, the centre of the input (`crop_margin` 97 px per
side; 270 -> 76):

- `np`: (B, 2, h, w) logits, channel 1 = nucleus;
- `ord`: (B, 16, h, w) logits, pair (2k, 2k+1) = classifier k of the 8 ordinal levels,
  P_k(1) = P(level > k) (`diffmix.seg.sonnet.postproc.decode_ordinal`);
- `tp`: (B, K+1, h, w) logits, channel 0 = background.

**Encoder** (`SonnetEncoder`): MONAI's `EfficientNet` (`monai.networks.nets.EfficientNet`, the
lukemelas/TF port, TF 'SAME' padding, squeeze-excitation, drop-connect 0.2 * b / 16 in
training) with B0's block table. MONAI's stem has a fixed stride of 2 and computes its static
'SAME' paddings from the image size, so it is built for an image of 2N (so that every block's
padding is the one for the N-px map SONNET feeds it) and its stem is replaced by a stride-1
3x3 conv (zero padding 1 = 'SAME' at stride 1). The ImageNet head's BN and swish are dropped
(the official graph keeps only the 320 -> 1280 conv), and `conv_bot` (1280 -> 1024, 1x1, no bias,
no BN) is new. Skip features after blocks 0, 2, 4 and 10 (the ends of MONAI's stacks 0, 1, 2, 4)
and after conv_bot: 16@N, 24@N/2, 40@N/4, 112@N/8, 1024@N/16 (270, 135, 68, 34, 17).
BN is tensorpack's (eps 1e-5, momentum 0.9 = torch 0.1) everywhere, also in the encoder.
`width_coefficient`, `depth_coefficient`, `bottleneck` and `decoder_width` shrink the network
for CPU runs; the paper's values are 1, 1, 1024 and 256.

**Decoder** (`SonnetDecoder`, one per branch, valid convolutions unless "same"): stages S4, S3,
S2 of (1x1 CBR skip + 2x nearest upsampling, 5x5 conv, multi-scale block, BN-ReLU, 3x3 CBR),
a four-level pyramid, the f0 skip and a final 5x5 conv; the head is BN-ReLU + 1x1 conv with
bias. The centre crops (28, 83, 190 px on f2, f1, f0 for N = 270) are taken from the shapes,
so every N = 16k - 2 >= 206 works (output N - 194).

Parameter count of the paper configuration for CoNSeP (5 types): see `count_parameters` and
tests/test_seg_sonnet.py; it equals the official graph's 63,866,579.

ImageNet encoder weights come only from a local file (`load_efficientnet_weights`); nothing is
downloaded.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import EfficientNet
from safetensors.torch import load_file

from diffmix.errors import CheckpointError, ConfigError
from diffmix.seg.sonnet.targets import NUM_LEVELS

#: EfficientNet-B0's block table (notes 3) in MONAI's block-string notation:
#: repeats, kernel, stride, expansion, in -> out channels, squeeze-excitation ratio.
B0_BLOCKS = (
    "r1_k3_s11_e1_i32_o16_se0.25",
    "r2_k3_s22_e6_i16_o24_se0.25",
    "r2_k5_s22_e6_i24_o40_se0.25",
    "r3_k3_s22_e6_i40_o80_se0.25",
    "r3_k5_s11_e6_i80_o112_se0.25",
    "r4_k5_s22_e6_i112_o192_se0.25",
    "r1_k3_s11_e6_i192_o320_se0.25",
)
#: MONAI stacks whose outputs are the skip features f0..f3 (blocks 0, 2, 4, 10 of B0).
SKIP_STACKS = (0, 1, 2, 4)
#: tensorpack's BatchNorm defaults (decay 0.9, eps 1e-5), used by the official graph throughout.
BN_EPS, BN_MOMENTUM = 1.0e-5, 0.1
#: The paper's input side and the margin its valid convolutions eat on each side (270 -> 76).
INPUT_SIZE = 270
CROP_MARGIN = 97
#: Output pixels of each tile kept by the official inference (the centre 40 of 76, notes 6).
KEEP = 40


def output_size(input_size: int) -> int:
    """Side of SONNET's output for an input of `input_size` px (76 for 270).

    Valid sizes are N = 16k - 2 >= 206: then every encoder side halves exactly where the
    decoder adds an upsampled map to a skip feature, and the output is N - 194.
    """
    if input_size < 206 or input_size % 16 != 14:
        valid = ", ".join(str(16 * k - 2) for k in range(13, 20))
        raise ConfigError(f"SONNET input size must be 16k - 2 >= 206 ({valid}, ...), got {input_size}")
    return input_size - 2 * CROP_MARGIN


def _he_init_(conv: nn.Conv2d) -> None:
    """tensorpack `variance_scaling_initializer(2.0, 'fan_out', truncated normal)`: TF divides the
    std by 0.8796 (the std of a unit normal truncated at 2) and cuts at 2 std."""
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1] // conv.groups
    std = math.sqrt(2.0 / fan_out) / 0.87962566103423978
    nn.init.trunc_normal_(conv.weight, 0.0, std, -2 * std, 2 * std)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _conv(cin: int, cout: int, k: int, *, same: bool = False, dilation: int = 1, bias: bool = False) -> nn.Conv2d:
    pad = dilation * (k - 1) // 2 if same else 0
    conv = nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=bias)
    _he_init_(conv)
    return conv


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


def _br(c: int) -> nn.Sequential:
    """BN -> ReLU ("BR")."""
    return nn.Sequential(_bn(c), nn.ReLU(inplace=True))


def _cbr(cin: int, cout: int, k: int, *, same: bool = False) -> nn.Sequential:
    """conv (no bias) -> BN -> ReLU ("CBR")."""
    return nn.Sequential(_conv(cin, cout, k, same=same), _bn(cout), nn.ReLU(inplace=True))


def crop(x: torch.Tensor, n: int) -> torch.Tensor:
    """Official `crop_op`: remove n // 2 px at the top/left and n - n // 2 at the bottom/right."""
    if n == 0:
        return x
    a, b = n // 2, n - n // 2
    return x[..., a : x.shape[-2] - b, a : x.shape[-1] - b]


def crop_to(x: torch.Tensor, size: int) -> torch.Tensor:
    return crop(x, x.shape[-1] - size)


def up(x: torch.Tensor, factor: int) -> torch.Tensor:
    return F.interpolate(x, scale_factor=factor, mode="nearest")


# --------------------------------------------------------------------------- encoder


class SonnetEncoder(nn.Module):
    """EfficientNet-B0 trunk from MONAI with SONNET's changes (stride-1 stem, no head BN/swish,
    conv_bot); returns the five skip features [f0, f1, f2, f3, f4]."""

    def __init__(
        self,
        input_size: int = INPUT_SIZE,
        *,
        width_coefficient: float = 1.0,
        depth_coefficient: float = 1.0,
        bottleneck: int = 1024,
        drop_connect_rate: float = 0.2,
    ) -> None:
        super().__init__()

        # built for a 2N image: after MONAI's stride-2 stem every block sees the N-px map
        # SONNET's stride-1 stem gives, so its static 'SAME' paddings are the right ones
        trunk = EfficientNet(
            list(B0_BLOCKS),
            spatial_dims=2,
            in_channels=3,
            num_classes=1,
            width_coefficient=width_coefficient,
            depth_coefficient=depth_coefficient,
            dropout_rate=0.0,
            image_size=2 * input_size,
            norm=("batch", {"eps": BN_EPS, "momentum": BN_MOMENTUM}),
            drop_connect_rate=drop_connect_rate,
        )
        stem_out = trunk._conv_stem.out_channels
        self.stem = nn.Conv2d(3, stem_out, 3, stride=1, padding=1, bias=False)
        # MONAI's (TF) initialisation of the stem it replaces: normal(0, sqrt(2 / fan_out))
        nn.init.normal_(self.stem.weight, 0.0, math.sqrt(2.0 / (9 * stem_out)))
        self.bn0 = trunk._bn0
        self.blocks = trunk._blocks
        self.conv_head = trunk._conv_head
        self.act = nn.SiLU()
        head_out = self.conv_head.out_channels
        self.conv_bot = _conv(head_out, bottleneck, 1)
        stacks = [stack[len(stack) - 1] for stack in self.blocks]
        self.channels = [stacks[i].out_channels for i in SKIP_STACKS] + [bottleneck]

    def trunk_modules(self) -> list[nn.Module]:
        """The ImageNet part (stem, its BN, blocks, head conv): frozen in phase 1; conv_bot is not."""
        return [self.stem, self.bn0, self.blocks, self.conv_head]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.act(self.bn0(self.stem(x)))
        feats = []
        for i, stack in enumerate(self.blocks):
            x = stack(x)
            if i in SKIP_STACKS:
                feats.append(x)
        # notes 3: the ImageNet head's BN and swish are dropped, conv_bot follows directly
        feats.append(self.conv_bot(self.conv_head(x)))
        return feats


# --------------------------------------------------------------------------- decoder


class MultiScaleBlock(nn.Module):
    """Four dilated branches on c (w ch, side s) concatenated with crop8(c): w + w/2 ch at side s - 8.

    Each branch is BN-ReLU -> 1x1 CBR (w -> w/2) -> conv (w/2 -> w/8) with (kernel, dilation)
    (3, 1), (5, 1), (3, 2), (5, 2), cropped to s - 8. `last_br` adds BN-ReLU after the last
    branch (the official S4 block only).
    """

    SPECS = ((3, 1), (5, 1), (3, 2), (5, 2))

    def __init__(self, width: int, last_br: bool = False) -> None:
        super().__init__()
        hidden, out = width // 2, width // 8
        branches = []
        for i, (k, d) in enumerate(self.SPECS):
            layers = [_br(width), _cbr(width, hidden, 1), _conv(hidden, out, k, dilation=d)]
            if last_br and i == len(self.SPECS) - 1:
                layers.append(_br(out))
            branches.append(nn.Sequential(*layers))
        self.branches = nn.ModuleList(branches)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        side = c.shape[-1] - 8
        return torch.cat([crop_to(c, side)] + [crop_to(b(c), side) for b in self.branches], dim=1)


class _Stage(nn.Module):
    """a = 1x1 CBR(skip) [cropped] + up2(deeper); conv5; multi-scale; BN-ReLU; 3x3 CBR."""

    def __init__(self, skip_ch: int, width: int, *, last_br: bool = False, same_out: bool = False) -> None:
        super().__init__()
        self.skip = _cbr(skip_ch, width, 1)
        self.conva = _conv(width, width, 5)
        self.ms = MultiScaleBlock(width, last_br=last_br)
        ms_out = width + 4 * (width // 8)
        self.out = nn.Sequential(_br(ms_out), _cbr(ms_out, width, 3, same=same_out))

    def forward(self, skip: torch.Tensor, deeper: torch.Tensor) -> torch.Tensor:
        deeper = up(deeper, 2)
        a = crop_to(self.skip(skip), deeper.shape[-1]) + deeper
        return self.out(self.ms(self.conva(a)))


class SonnetDecoder(nn.Module):
    """One of SONNET's three decoders (notes 3), ending in BN-ReLU + 1x1 conv to `out_ch`."""

    def __init__(self, channels: list[int], out_ch: int, width: int = 256) -> None:
        super().__init__()
        f0, f1, f2, f3, f4 = channels
        half = width // 2
        self.s5 = _cbr(f4, width, 1)
        self.s4 = _Stage(f3, width, last_br=True)
        self.s3 = _Stage(f2, width)
        self.s2 = _Stage(f1, width, same_out=True)
        self.p1 = nn.Sequential(_cbr(width, half, 5, same=True), _cbr(half, half, 5, same=True))
        self.p2 = nn.Sequential(_cbr(width, half, 5), _cbr(half, half, 3))
        self.p3 = nn.Sequential(_cbr(width, half, 5), _cbr(half, half, 5))
        self.p4 = nn.Sequential(_cbr(width, half, 5), _cbr(half, half, 5))
        self.merge = nn.Sequential(_cbr(4 * half, width, 5, same=True), _cbr(width, width, 5, same=True))
        self.skip0 = _cbr(f0, width, 1)
        self.p0 = _conv(width, half, 5)
        self.head = nn.Sequential(_br(half), _conv(half, out_ch, 1, bias=True))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        f0, f1, f2, f3, f4 = feats
        u5 = self.s5(f4)
        u4 = self.s4(f3, u5)
        u3 = self.s3(f2, u4)
        u2 = self.s2(f1, u3)
        pyramid = [
            self.p1(u2),
            up(self.p2(u3), 2),
            up(self.p3(crop(u4, 2)), 4),
            up(self.p4(crop(u5, 4)), 8),
        ]
        x = up(self.merge(torch.cat(pyramid, dim=1)), 2)
        x = x + self.skip0(crop_to(f0, x.shape[-1]))
        return self.head(self.p0(x))


# --------------------------------------------------------------------------- network


class SonnetNet(nn.Module):
    """SONNET: shared EfficientNet-B0 encoder, decoders np (2), ord (16), tp (K+1)."""

    #: `diffmix.seg.infer` post-processes these outputs with `postprocess_sonnet`.
    post_processing = "sonnet"

    def __init__(
        self,
        num_classes: int,
        *,
        input_size: int = INPUT_SIZE,
        width_coefficient: float = 1.0,
        depth_coefficient: float = 1.0,
        bottleneck: int = 1024,
        decoder_width: int = 256,
        drop_connect_rate: float = 0.2,
    ) -> None:
        super().__init__()
        if decoder_width < 8 or decoder_width % 8:
            raise ConfigError(f"SONNET decoder_width must be a multiple of 8 (>= 8), got {decoder_width}")
        out = output_size(input_size)
        self.num_classes = num_classes
        self.input_size: int | None = input_size
        self.crop_margin = (input_size - out) // 2
        # official inference keeps the centre 40 of each 76-px output tile (step 40)
        self.default_overlap = max(0, out - KEEP)
        self.encoder = SonnetEncoder(
            input_size,
            width_coefficient=width_coefficient,
            depth_coefficient=depth_coefficient,
            bottleneck=bottleneck,
            drop_connect_rate=drop_connect_rate,
        )
        ch = self.encoder.channels
        self.decoders = nn.ModuleDict(
            {
                "np": SonnetDecoder(ch, 2, decoder_width),
                "ord": SonnetDecoder(ch, 2 * NUM_LEVELS, decoder_width),
                "tp": SonnetDecoder(ch, num_classes + 1, decoder_width),
            }
        )

    def freeze_encoder(self, frozen: bool) -> None:
        """Phase 1 (notes 4): stem, blocks and head conv get no gradient; conv_bot, decoders and
        heads train. BN statistics still update and drop-connect stays on (train mode)."""
        for module in self.encoder.trunk_modules():
            module.requires_grad_(not frozen)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"SONNET takes {self.input_size}x{self.input_size} tiles, got {tuple(images.shape[-2:])}"
            )
        feats = self.encoder(images)
        return {name: dec(feats) for name, dec in self.decoders.items()}


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable-parameter counts (BN running statistics excluded, as TF counts variables)."""
    def n(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    out = {"total": n(model)}
    if isinstance(model, SonnetNet):
        enc = model.encoder
        out["encoder_trunk"] = sum(n(m) for m in enc.trunk_modules())
        out["conv_bot"] = n(enc.conv_bot)
        for name, dec in model.decoders.items():
            out[f"decoder_{name}"] = n(dec)
            out[f"head_{name}"] = n(dec.head)
    return out


# --------------------------------------------------------------------------- ImageNet weights

_FLAT_BLOCK = re.compile(r"^_blocks\.(\d+)\.(.+)$")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.suffix == ".npz":
        raise CheckpointError(
            f"{path}: the official TensorFlow .npz is not read (its variable names were never "
            "published); give a PyTorch EfficientNet-B0 state dict instead (efficientnet_pytorch / "
            "MONAI 'efficientnet-b0-355c32eb.pth' names, .pth/.pt/.safetensors)"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _encoder_key(key: str, block_stack: list[tuple[int, int]]) -> str | None:
    """efficientnet_pytorch / MONAI names -> `SonnetEncoder` names (None: not part of the trunk).

    efficientnet_pytorch numbers blocks flat (`_blocks.7.`), MONAI nests them in stacks
    (`_blocks.3.7.`); the head BN (`_bn1`) and classifier (`_fc`) have no place in SONNET.
    """
    if key.startswith("_conv_stem."):
        return "stem." + key[len("_conv_stem.") :]
    if key.startswith("_bn0."):
        return "bn0." + key[len("_bn0.") :]
    if key.startswith("_conv_head."):
        return "conv_head." + key[len("_conv_head.") :]
    m = _FLAT_BLOCK.match(key)
    if m:
        flat = int(m[1])
        rest = m[2]
        if re.match(r"^\d+\.", rest):  # MONAI's nested form: _blocks.<stack>.<flat>.
            flat_str, rest = rest.split(".", 1)
            flat = int(flat_str)
        if flat >= len(block_stack):
            return None
        stack, _ = block_stack[flat]
        return f"blocks.{stack}.{flat}.{rest}"
    return None


def load_efficientnet_weights(model: SonnetNet, path: str | Path) -> dict[str, int]:
    """Load ImageNet EfficientNet-B0 weights from a local file into SONNET's encoder; never downloads.

    Accepts a PyTorch state dict with efficientnet_pytorch names (`_conv_stem.weight`,
    `_blocks.N....`, the file MONAI itself would download: `efficientnet-b0-355c32eb.pth`) or
    MONAI `EfficientNet` names, as `.pth`/`.pt` (read with weights_only) or `.safetensors`.
    The stride-2 ImageNet stem is loaded into SONNET's stride-1 stem (same shape, notes 9 D9).
    Returns {"loaded", "encoder_total"} tensor counts. A missing file, an unreadable one, or
    one whose tensors do not fit raises CheckpointError.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"{path}: ImageNet EfficientNet-B0 weights not found (give a local file; diffmix never downloads)"
        )
    try:
        state = _read_weights(path)
    except CheckpointError:
        raise
    except Exception as exc:  # torch.load raises many types on foreign or corrupt files
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        raise CheckpointError(
            f"{path}: not a readable weights file ({type(exc).__name__}: {first[:200]})"
        ) from None
    enc = model.encoder
    block_stack = [(s, int(name)) for s, stack in enumerate(enc.blocks) for name, _ in stack.named_children()]
    target = enc.state_dict()
    trunk_keys = [k for k in target if not k.startswith("conv_bot.")]
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        new = _encoder_key(key, block_stack)
        if new is None or new not in target:
            continue
        if target[new].shape != tensor.shape:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(tensor.shape)}, SONNET's encoder {new} needs "
                f"{tuple(target[new].shape)} (not EfficientNet-B0 weights, or a narrowed SONNET?)"
            )
        mapped[new] = tensor.to(target[new].dtype)
    if not mapped:
        raise CheckpointError(
            f"{path}: no tensor matches SONNET's EfficientNet-B0 encoder "
            f"({len(state)} tensors read, e.g. {sorted(state)[:3]})"
        )
    missing = [k for k in trunk_keys if k not in mapped and not k.endswith("num_batches_tracked")]
    if missing:
        raise CheckpointError(
            f"{path}: {len(missing)} encoder tensors missing from the file (e.g. {missing[:3]}); "
            "give a complete EfficientNet-B0 state dict"
        )
    enc.load_state_dict({**target, **mapped})
    return {"loaded": len(mapped), "encoder_total": len(trunk_keys)}
