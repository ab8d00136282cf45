"""The SDM U-Net: a label-free encoder and a SPADE-conditioned middle and decoder (spec 2).

This reproduces `guided_diffusion/unet.py` of the semantic diffusion model (Wang et al. 2022)
as DiffMix trains it: the module tree and parameter names are the official ones, so the
authors' released checkpoints load into `UNetModel` unchanged (see `diffmix.sdm.convert`).

What differs from the official code, on purpose, without changing the maths:
- attention runs through `torch.nn.functional.scaled_dot_product_attention` (fused kernels)
  instead of two einsums; the legacy QKV channel layout is kept, so the weights are the same;
- mixed precision is left to `torch.autocast` instead of casting conv weights to fp16; the plain
  GroupNorms still compute in fp32 as SDM's `GroupNorm32` does, so bf16/fp16 autocast is stable;
- gradient checkpointing uses `torch.utils.checkpoint` (use_reentrant=False) and, unlike the
  official attention blocks (which always checkpoint), only when `use_checkpoint` is set;
  `use_checkpoint: selective` keeps the outputs of the costly matmuls and convolutions and
  recomputes only the cheap rest (see `_Checkpointed`);
- the output is returned in the input's dtype (fp32 for fp32 inputs even under autocast);
- on CPU, a SPADE's label convs run once per distinct 5x5 label window instead of at every
  pixel (`LabelWindows`): nucleus label maps repeat their windows, so this removes most of
  the convs that are about three quarters of a small-config forward's multiply-adds, with the
  same values to float rounding.

For sampling with classifier-free guidance, `UNetModel.forward_guided` returns the conditional
and null-label outputs of one (x, t) at once: the label-free encoder runs once, the null label's
SPADE modulations come from a 3x3 evaluation (exact: see `SPADEGroupNorm.null_modulation`), and a
storing `SPADELabels` keeps every SPADE's (1 + gamma, beta) across the DDIM steps of one run,
since they depend on the label map only.

Shapes: x (B, in_channels, H, W) float in [-1, 1]-ish; timesteps (B,) original step 0..999
(the network always sees the original t, spec 4 respacing); y (B, label_nc, H, W) float, the
conditioning tensor of spec 1 (K+1 one-hot channels plus the instance-edge channel), all zeros
for the null label. Output (B, out_channels, H, W): eps in the first in_channels channels and the
raw variance-interpolation value v in the rest (learned sigma, spec 3).
"""

from __future__ import annotations

import math
import functools
from typing import Any, Callable, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, model_validator
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

try:  # torch >= 2.4 (pyproject allows 2.2): only `use_checkpoint: selective` needs them
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
except ImportError:  # pragma: no cover - older torch
    CheckpointPolicy = create_selective_checkpoint_contexts = None  # type: ignore[assignment,misc]

from diffmix.errors import ConfigError

NORM_GROUPS = 32  # spec 2: every GroupNorm (plain and SPADE) has 32 groups
SPADE_HIDDEN = 128  # spec 2: SPADE's shared conv maps the label to 128 channels
TIME_EMBED_MULT = 4  # time embedding width = 4 * model_channels (1024 for the paper config)


class UNetConfig(BaseModel):
    """Everything that shapes the SDM U-Net (spec 2 table); defaults are the paper config.

    `attention_resolutions` are feature-map sizes, as SDM's `--attention_resolutions` flag
    gives them (32,16,8 at image_size 256 means downsample factors 8, 16, 32). `image_size`
    only serves to turn them into downsample factors: the network itself runs at any H, W
    divisible by 2**(len(channel_mult)-1).
    """

    model_config = ConfigDict(extra="forbid")

    image_size: int = 256
    in_channels: int = 3
    model_channels: int = 256
    out_channels: int = 6  # 2*in_channels: eps and the learned-sigma interpolation v
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    num_head_channels: int = 64
    label_nc: int = 6  # K+2: K+1 one-hot channels (background included) + instance edges
    dropout: float = 0.0
    # True: recompute each block in backward (official training); "selective": recompute only
    # the cheap ops (norms, activations, label convs), keep conv/matmul outputs (`_Checkpointed`)
    use_checkpoint: bool | Literal["selective"] = False
    resblock_updown: bool = True
    use_scale_shift_norm: bool = True

    @classmethod
    def paper(cls, label_nc: int) -> "UNetConfig":
        """The authors' 256-px config (spec 2): label_nc 6 for CoNSeP, 5 for GLySAC."""
        return cls(label_nc=label_nc)

    @classmethod
    def small(cls, label_nc: int = 6) -> "UNetConfig":
        """SDM's 64-px config (the manifest's `small_64`): 64 channels x (1,2,3,4), heads of 32."""
        return cls(
            image_size=64,
            model_channels=64,
            channel_mult=(1, 2, 3, 4),
            attention_resolutions=(16, 8),
            num_head_channels=32,
            label_nc=label_nc,
        )

    @classmethod
    def tiny(cls, label_nc: int = 6) -> "UNetConfig":
        """A CPU-sized model (design.md calibration: ~4.9 M parameters at label_nc 6).

        32 channels x (1,2,2), one res-block per level, attention on the 8x8 maps of 32-px tiles.
        It learns the label conditioning of simple synthetic nuclei within a few CPU minutes.
        """
        return cls(
            image_size=32,
            model_channels=32,
            channel_mult=(1, 2, 2),
            num_res_blocks=1,
            attention_resolutions=(8,),
            num_head_channels=32,
            label_nc=label_nc,
        )

    @model_validator(mode="after")
    def _check(self) -> "UNetConfig":
        for name in ("image_size", "in_channels", "model_channels", "out_channels",
                     "num_res_blocks", "num_head_channels", "label_nc"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult must be a non-empty tuple of ints >= 1, got {self.channel_mult}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for mult in self.channel_mult:
            width = mult * self.model_channels
            if width % NORM_GROUPS:
                raise ValueError(
                    f"channel width {width} (model_channels {self.model_channels} x mult {mult}) "
                    f"is not divisible by the {NORM_GROUPS} GroupNorm groups"
                )
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by 2**(levels-1) = {factor}"
            )
        level_ds = {2**level: level for level in range(len(self.channel_mult))}
        for res in self.attention_resolutions:
            ds = self.image_size // res if res > 0 and self.image_size % res == 0 else None
            if ds not in level_ds:
                sizes = sorted((self.image_size // d for d in level_ds), reverse=True)
                raise ValueError(
                    f"attention resolution {res} is not a feature-map size of this U-Net "
                    f"(image_size {self.image_size}: sizes {sizes})"
                )
            width = self.channel_mult[level_ds[ds]] * self.model_channels
            if width % self.num_head_channels:
                raise ValueError(
                    f"attention width {width} at resolution {res} is not divisible by "
                    f"num_head_channels {self.num_head_channels}"
                )
        deepest = self.channel_mult[-1] * self.model_channels
        if deepest % self.num_head_channels:
            raise ValueError(
                f"middle-block attention width {deepest} is not divisible by "
                f"num_head_channels {self.num_head_channels}"
            )
        return self

    @property
    def attention_ds(self) -> frozenset[int]:
        """Downsample factors (1, 2, 4, ...) whose levels carry attention."""
        return frozenset(self.image_size // r for r in self.attention_resolutions)

    @property
    def time_embed_dim(self) -> int:
        return TIME_EMBED_MULT * self.model_channels


# --------------------------------------------------------------------------------------------
# building blocks


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (B,) -> (B, dim) float32, [cos | sin] as SDM orders it.

    Frequencies are max_period**(-i/half) for i < half = dim // 2; an odd dim gets a zero column.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 and cast back: SDM's `normalization`, safe under bf16/fp16."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type(x.dtype)


def _zero(module: nn.Module) -> nn.Module:
    """Zero a module's parameters: spec 2's zero-initialised output convs (each block starts as
    the identity, the whole network starts by predicting 0)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _norm(channels: int) -> GroupNorm32:
    return GroupNorm32(NORM_GROUPS, channels)


class SPADEGroupNorm(nn.Module):
    """Spatially-adaptive GroupNorm (spec 2): norm(x) * (1 + gamma(label)) + beta(label).

    The norm has no affine parameters; the label (B, label_nc, h, w) is resized to x's size by
    nearest-neighbour interpolation, so every block sees it at its own resolution. It runs in the
    tensor's dtype, as in SDM (autocast computes group_norm in fp32 anyway).

    `label` may also be a `SPADELabels`, which supplies (1 + gamma, beta) computed once per label
    batch (and, for the all-zero null label, from a 3x3 evaluation): see `modulation` and
    `null_modulation`. `ds` is the block's downsample factor (set by `UNetModel`; it sizes
    `UNetModel.label_cache_bytes`).
    """

    def __init__(self, channels: int, label_nc: int) -> None:
        super().__init__()
        self.channels = channels
        self.ds = 1
        self.norm = nn.GroupNorm(NORM_GROUPS, channels, affine=False)  # eps 1e-5
        self.mlp_shared = nn.Sequential(
            nn.Conv2d(label_nc, SPADE_HIDDEN, kernel_size=3, padding=1), nn.ReLU()
        )
        self.mlp_gamma = nn.Conv2d(SPADE_HIDDEN, channels, kernel_size=3, padding=1)
        self.mlp_beta = nn.Conv2d(SPADE_HIDDEN, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor, label: "Tensor | SPADELabels | LabelWindows") -> Tensor:
        if isinstance(label, SPADELabels):
            return label.modulate(self, self.norm(x))
        x = self.norm(x)
        scale, shift = self.label_modulation(label, (x.shape[-2], x.shape[-1]))
        return x * scale + shift

    def label_modulation(self, label: "Tensor | LabelWindows", size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """(1 + gamma, beta) of a label at `size`: per distinct label window when `label` is a
        `LabelWindows` whose windows repeat enough there, else the convs over the whole map."""
        found = label.at(size) if isinstance(label, LabelWindows) else None
        if found is not None:
            return self.window_modulation(found, size)
        return self.modulation(label.y if isinstance(label, LabelWindows) else label, size)

    def modulation(self, label: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """(1 + gamma, beta), each (B, C, h, w), of the label (B, label_nc, H, W) at size (h, w).

        They depend on the label only, not on x or t: a sampler can compute them once per label
        batch and reuse them at every DDIM step (this is 72% of a forward's FLOPs in the
        benchmark config, 35% in the paper config).
        """
        actv = self.mlp_shared(F.interpolate(label, size=size, mode="nearest"))
        return 1 + self.mlp_gamma(actv), self.mlp_beta(actv)

    def window_modulation(self, windows: "LabelWindowSet", size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """(1 + gamma, beta), each (B, C, h, w) at `size` = (h, w), from the distinct label
        windows of `LabelWindows.at`: the two 3x3 convs evaluated once per distinct 5x5 window,
        as two matrix products (the shared conv at the window's 3x3 inner positions, zeroed
        where they fall outside the map as the gamma/beta convs' zero padding does; gamma and
        beta as one product), then laid out at every pixel.
        Equal to the convs over the whole map up to float summation order, with gradients to
        every SPADE weight through the same values."""
        shared = self.mlp_shared[0]
        # (U, 9 inner positions, label_nc * 9) @ (label_nc * 9, hidden): the shared conv's taps;
        # masked before the ReLU (the same values for a 0/1 mask), so backward keeps one copy
        actv = F.relu(F.linear(windows.taps, shared.weight.flatten(1), shared.bias) * windows.inside)
        # gamma | beta over the 3x3 hidden taps, ordered (position, channel) like `actv`
        weight = torch.cat([self.mlp_gamma.weight, self.mlp_beta.weight]).permute(0, 2, 3, 1).flatten(1)
        bias = torch.cat([self.mlp_gamma.bias, self.mlp_beta.bias])
        gamma_beta = F.linear(actv.flatten(1), weight, bias)  # (U, 2C)
        (h, w), c = size, self.channels
        b = windows.index.numel() // (h * w)
        per_window = torch.cat([1 + gamma_beta[:, :c], gamma_beta[:, c:]], 1)  # rounded as 1 + conv
        per_pixel = per_window.t().index_select(1, windows.index).view(2 * c, b, h, w).transpose(0, 1)
        return per_pixel[:, :c], per_pixel[:, c:]

    def null_modulation(self, size: tuple[int, int], like: Tensor) -> tuple[Tensor, Tensor]:
        """(1 + gamma, beta), each (1, C, h, w), of the all-zero null label, in `like`'s dtype/device.

        Why this is exact: the shared conv of an all-zero label (zero padding) is its bias at
        every pixel, so after ReLU the hidden map is one constant vector. A 3x3 zero-padded conv
        of a constant map only depends on which taps fall inside the map: one value for the
        interior, others on the 1-px border ring (edges, corners). Evaluating the convs on a
        min(h, 3) x min(w, 3) map gives every distinct value (maps of size 1 and 2 are their own
        small map), and indexing rows/cols [0, 1, ..., 1, 2] lays them out at (h, w). Equal to
        `modulation(zeros, size)` up to float summation order.
        """
        h, w = size
        hidden = like.new_zeros(1, self.mlp_shared[0].in_channels, min(h, 3), min(w, 3))
        actv = self.mlp_shared(hidden)
        rows, cols = _ring_index(h, like.device), _ring_index(w, like.device)
        scale = (1 + self.mlp_gamma(actv))[:, :, rows][:, :, :, cols]
        shift = self.mlp_beta(actv)[:, :, rows][:, :, :, cols]
        return scale, shift


def _ring_index(n: int, device: torch.device) -> Tensor:
    """Row (or column) of the <=3-long small map that position i of an n-long map equals:
    0 for the first, 2 for the last, 1 in between (n <= 3: the identity)."""
    if n <= 3:
        return torch.arange(n, device=device)
    idx = torch.ones(n, dtype=torch.long, device=device)
    idx[0], idx[-1] = 0, 2
    return idx


def label_cache_budget(device: torch.device) -> int:
    """Bytes `UNetModel.conditioned` may spend on stored SPADE modulations by default: half the
    free memory of a CUDA device (the paper config needs 1.9 GiB per patch in bf16), 2 GiB elsewhere."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    return 2 * 2**30


#: `LabelWindows` takes the per-window path at a feature size only when the distinct 5x5 label
#: windows are at most this share of its pixels: a distinct window costs the shared conv at 9
#: positions instead of 1, so with (nearly) every window distinct the plain convs are cheaper.
#: 0 turns the shortcut off.
WINDOW_SHARE_MAX = 0.5
#: Devices the shortcut runs on. Measured on CPU only (`benchmarks/sdm_train.py`); on CUDA the
#: grouping's `torch.unique` and sizes read back to the host would stall the launch queue at
#: every decoder size, a trade no session has measured yet, so CUDA keeps the plain convs.
WINDOW_DEVICES = frozenset({"cpu"})


class LabelWindowSet(NamedTuple):
    """The distinct 5x5 label windows at one feature size (`LabelWindows.at`)."""

    taps: Tensor  # (U, 9, label_nc * 9): the 3x3 label patch under each inner position of a window
    inside: Tensor  # (U, 9, 1): 1 where that inner position lies inside the map
    index: Tensor  # (B h w,): each pixel's window, row-major over (b, y, x)


class LabelWindows:
    """A label batch with its distinct 5x5 windows per feature size: SPADE's shortcut for
    piecewise-constant label maps, exact up to float summation order.

    Why it holds: a SPADE's (1 + gamma, beta) at a pixel is a function of the label's 5x5
    window around it (a 3x3 conv, ReLU, a 3x3 conv; zero padding), and of which of its
    positions lie inside the map. Nucleus label maps are one-hot classes plus thin edges, so
    most windows repeat: in four random batches of four 64-px CoNSeP training crops, 10-18% of
    the windows are distinct at 64 px, 28-44% at 32, 41-68% at 16. `at` finds them once per size;
    every SPADE at that size evaluates its convs once per distinct window
    (`SPADEGroupNorm.window_modulation`) and gathers. The label is a float one-hot map in
    training (any values work; more distinct values only mean fewer repeats).
    """

    def __init__(self, y: Tensor) -> None:
        self.y = y
        self._at: dict[tuple[int, int], LabelWindowSet | None] = {}

    def at(self, size: tuple[int, int]) -> LabelWindowSet | None:
        """The distinct windows of the label resized to `size` (nearest); None when they are
        more than `WINDOW_SHARE_MAX` of the pixels. Label-only and cached, so a checkpointed
        block's recomputation finds them again."""
        if size not in self._at:
            found = None
            if WINDOW_SHARE_MAX > 0 and self.y.device.type in WINDOW_DEVICES:  # not meta: no values there
                with torch.no_grad():
                    found = _distinct_windows(F.interpolate(self.y, size=size, mode="nearest"))
            self._at[size] = found
        return self._at[size]


#: Bits per key chunk of `_binary_window_ids`: a chunk is below 2^31, so a dense id (below
#: 2^32) times 2^31 plus a chunk stays below 2^63.
_KEY_BITS = 31


def _binary_window_ids(z: Tensor) -> Tensor | None:
    """Dense ids (N,) of the 5x5 windows of a 0/1 map z (B, C, h + 4, w + 4), row-major over
    (b, y, x), equal exactly for equal windows; None when C > 31 or N >= 2^32.

    Integer arithmetic only (no rounding on any device): each pixel's C bits become one code,
    the 25 codes of a window are packed a few at a time into chunks below 2^31, and the chunks
    are folded in one by one, each fold a 1-D `torch.unique` of id x 2^31 + chunk. About 4x
    faster than `torch.unique` over the unfolded (N, C x 25) rows (13 vs 53 ms for a 64-px
    batch of 4, one thread)."""
    b, c, hp, wp = z.shape
    h, w = hp - 4, wp - 4
    if c > _KEY_BITS or b * h * w >= 2**32:
        return None
    powers = torch.pow(2, torch.arange(c, device=z.device, dtype=torch.int64)).view(1, c, 1, 1)
    code = (z.to(torch.int64) * powers).sum(1)  # (B, h + 4, w + 4), below 2^C
    per_chunk = _KEY_BITS // c
    offsets = [(dy, dx) for dy in range(5) for dx in range(5)]
    ids = torch.zeros(b * h * w, dtype=torch.int64, device=z.device)
    for start in range(0, len(offsets), per_chunk):
        chunk = torch.zeros(b, h, w, dtype=torch.int64, device=z.device)
        for slot, (dy, dx) in enumerate(offsets[start:start + per_chunk]):
            chunk += code[:, dy:dy + h, dx:dx + w] * 2 ** (c * slot)
        ids = torch.unique(ids * 2**_KEY_BITS + chunk.flatten(), return_inverse=True)[1]
    return ids


def _distinct_windows(lab: Tensor) -> LabelWindowSet | None:
    """`LabelWindows.at` for a label already at its size: its windows with the inside-the-map
    channel appended (zero outside), grouped exactly (`_binary_window_ids` for 0/1 labels,
    `torch.unique` over the unfolded rows otherwise)."""
    b, c, h, w = lab.shape
    z = F.pad(torch.cat([lab, lab.new_ones(b, 1, h, w)], 1), (2, 2, 2, 2))
    n = b * h * w
    index = _binary_window_ids(z) if bool(((z == 0) | (z == 1)).all()) else None
    if index is not None:
        count = int(index.max()) + 1
        if count > WINDOW_SHARE_MAX * n:
            return None
        first = torch.empty(count, dtype=torch.long, device=z.device)
        first.scatter_(0, index, torch.arange(n, device=z.device))  # one pixel of each window
        offsets = torch.arange(5, device=z.device)
        ys, xs = (first // w) % h, first % w
        windows = z[(first // (h * w))[:, None, None], :, (ys[:, None] + offsets)[:, :, None],
                    (xs[:, None] + offsets)[:, None, :]].permute(0, 3, 1, 2)  # (U, c + 1, 5, 5)
    else:
        rows = F.unfold(z, 5).transpose(1, 2).reshape(n, (c + 1) * 25)
        windows, index = torch.unique(rows, dim=0, return_inverse=True)
        if windows.shape[0] > WINDOW_SHARE_MAX * n:
            return None
        windows = windows.view(-1, c + 1, 5, 5)
    taps = F.unfold(windows[:, :c].contiguous(), 3).transpose(1, 2).contiguous()  # (U, 9, c * 9)
    inside = windows[:, c, 1:4, 1:4].reshape(-1, 9, 1).contiguous()
    return LabelWindowSet(taps, inside, index)


class SPADELabels:
    """The label side of a middle + decoder pass, with every SPADE's (1 + gamma, beta) reused.

    Rows are the conditional maps y (B rows), followed, when `null` is set, by B rows of the
    all-zero null label (classifier-free guidance; spec 4) whose modulations come from
    `SPADEGroupNorm.null_modulation` (a 3x3 evaluation, broadcast over the batch). With `store`
    the modulations are kept after their first use, so later calls with the same y (the DDIM
    steps of one sampling run) skip the SPADE convs entirely; `UNetModel.label_cache_bytes` says
    what that holds. Meant for inference: the stored tensors belong to the weights of the
    first call, so make a new one when the weights or y change.
    """

    def __init__(self, y: Tensor, *, null: bool = False, store: bool = True) -> None:
        if y.ndim != 4:
            raise ValueError(f"y must be (B, label_nc, H, W), got {tuple(y.shape)}")
        self.y = y
        self.null = null
        self.store = store
        self._cond: dict[tuple[nn.Module, int, int], tuple[Tensor, Tensor]] = {}
        self._null: dict[tuple[nn.Module, int, int], tuple[Tensor, Tensor]] = {}
        self._windows: dict[torch.dtype, LabelWindows] = {}  # y's distinct windows, per compute dtype

    @property
    def rows(self) -> int:
        """Batch size of the features this label set conditions: B, or 2B with the null rows."""
        return self.y.shape[0] * (2 if self.null else 1)

    def _get(self, table: dict, spade: SPADEGroupNorm, n: Tensor, null: bool) -> tuple[Tensor, Tensor]:
        key = (spade, n.shape[-2], n.shape[-1])
        mod = table.get(key)
        if mod is None:
            size = (n.shape[-2], n.shape[-1])
            mod = spade.null_modulation(size, n) if null else self._modulation(spade, size, n.dtype)
            if self.store:
                table[key] = mod
        return mod

    def _modulation(self, spade: SPADEGroupNorm, size: tuple[int, int], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """y's (1 + gamma, beta) at `size`, y's windows found once per compute dtype."""
        windows = self._windows.get(dtype)
        if windows is None:
            windows = self._windows[dtype] = LabelWindows(self.y.to(dtype))
        return spade.label_modulation(windows, size)

    def modulate(self, spade: SPADEGroupNorm, n: Tensor) -> Tensor:
        """n (rows, C, h, w), the normalised features -> n * (1 + gamma) + beta, row by row."""
        if n.shape[0] != self.rows:
            raise ValueError(f"features have {n.shape[0]} rows, the labels {self.rows}")
        scale, shift = self._get(self._cond, spade, n, null=False)
        if not self.null:
            return torch.addcmul(shift, n, scale)
        b = self.y.shape[0]
        null_scale, null_shift = self._get(self._null, spade, n, null=True)
        if torch.is_grad_enabled():  # out= does not record gradients
            return torch.cat([torch.addcmul(shift, n[:b], scale), torch.addcmul(null_shift, n[b:], null_scale)])
        out = torch.empty_like(n)
        torch.addcmul(shift, n[:b], scale, out=out[:b])
        torch.addcmul(null_shift, n[b:], null_scale, out=out[b:])
        return out


def _resample(x: Tensor, mode: str | None) -> Tensor:
    """Parameter-free resampling of res-block up/down: nearest x2 up, 2x2 average-pool down."""
    if mode == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    if mode == "down":
        return F.avg_pool2d(x, kernel_size=2, stride=2)
    return x


# Selective checkpointing keeps an op's output when recomputing it costs at least this many
# multiply-adds per output element. SPADE's shared label conv (label_nc x 3 x 3 = 54 at
# label_nc 6) falls below and is recomputed: its 128-channel output is the largest activation of
# a decoder block and the cheapest to redo. Every other conv of the U-Net (>= 32 channels x 3 x 3,
# or a 1x1 skip over >= 128 channels) is kept.
SELECTIVE_MIN_MACS = 128


def _selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    """`use_checkpoint: selective`: save the outputs of the costly ops, recompute everything else.

    Measured with `benchmarks/sdm_train.py` (64-px small config, batch 4, one CPU thread): full
    recomputation adds 29% to a step, this policy 4-14% (two runs on a shared machine), and it
    holds half the activations of an unchecked step (197 vs 398 MiB; full recomputation: 48).
    The norms, activations, products and label convs between the saved ops are redone.
    """
    if op in _MATMUL_OPS:
        return CheckpointPolicy.MUST_SAVE
    if op == torch.ops.aten.convolution.default:
        weight = args[1]  # (out, in / groups, kh, kw): one output element costs in/groups*kh*kw MACs
        if weight.shape[1] * math.prod(weight.shape[2:]) >= SELECTIVE_MIN_MACS:
            return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


_MATMUL_OPS = frozenset(
    getattr(torch.ops.aten, name).default
    for name in (
        "mm", "addmm", "bmm", "baddbmm",
        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    )
    if hasattr(torch.ops.aten, name)
)


class _Checkpointed(nn.Module):
    """Runs `_forward` under activation checkpointing when enabled and gradients are recorded.

    `use_checkpoint` True recomputes the whole block in backward (least memory, one more forward
    of compute: the official behaviour); "selective" recomputes only what `_selective_policy`
    does not keep. Both give the same values and gradients as no checkpointing, bit for bit.
    """

    use_checkpoint: bool | str = False

    def forward(self, *args: Tensor) -> Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            if self.use_checkpoint == "selective":
                if create_selective_checkpoint_contexts is None:
                    raise ConfigError(f"use_checkpoint: selective needs torch >= 2.4, this is {torch.__version__}")
                contexts = functools.partial(create_selective_checkpoint_contexts, _selective_policy)
                return _torch_checkpoint(self._forward, *args, use_reentrant=False, context_fn=contexts)
            return _torch_checkpoint(self._forward, *args, use_reentrant=False)
        return self._forward(*args)

    def _forward(self, *args: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class ResBlock(_Checkpointed):
    """Plain residual block of the encoder (spec 2): GroupNorm32 with affine, no label.

    h = conv(SiLU(GN(x))) [resampled between activation and conv]; h = GN(h)*(1+scale)+shift
    from the time embedding; h = conv0(Dropout(SiLU(h))) with conv0 zero-initialised; out =
    skip(x) + h, skip an identity or a 1x1 conv.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int,
        dropout: float,
        use_scale_shift_norm: bool,
        resample: str | None = None,
        use_checkpoint: bool | str = False,
    ) -> None:
        super().__init__()
        self.resample = resample
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            _norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels),
        )
        self.out_layers = nn.Sequential(
            _norm(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers[:-1](x)
        # spec 2 step 7: resample both h (after norm+activation, before the conv) and x
        h = self.in_layers[-1](_resample(h, self.resample))
        x = _resample(x, self.resample)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class SDMResBlock(_Checkpointed):
    """Label-conditioned residual block of the middle and decoder (spec 2): both norms SPADE.

    h = conv(SiLU(SPADE_in(x, y))) [resampled before the conv]; h = SPADE_out(h, y)*(1+scale)
    + shift; h = conv0(Dropout(SiLU(h))), conv0 zero-initialised; out = skip(x) + h.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int,
        label_nc: int,
        dropout: float,
        use_scale_shift_norm: bool,
        resample: str | None = None,
        use_checkpoint: bool | str = False,
    ) -> None:
        super().__init__()
        self.resample = resample
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_norm = SPADEGroupNorm(channels, label_nc)
        self.in_layers = nn.Sequential(nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels),
        )
        self.out_norm = SPADEGroupNorm(out_channels, label_nc)
        self.out_layers = nn.Sequential(
            nn.SiLU(),
            nn.Dropout(p=dropout),
            _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def _forward(self, x: Tensor, label: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers[0](self.in_norm(x, label))
        h = self.in_layers[1](_resample(h, self.resample))
        x = _resample(x, self.resample)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_norm(h, label) * (1 + scale) + shift
        else:
            h = self.out_norm(h + emb_out, label)
        return self.skip_connection(x) + self.out_layers(h)


class AttentionBlock(_Checkpointed):
    """Self-attention over all positions with heads of `num_head_channels` (spec 2).

    Parameters keep SDM's legacy QKV layout: `qkv` is a 1x1 Conv1d to 3C channels ordered
    head-major, [q_h | k_h | v_h] per head (`QKVAttentionLegacy`: heads are split before q/k/v).
    SDM scales q and k each by ch**-1/4 before the product, which is the standard 1/sqrt(ch)
    of `scaled_dot_product_attention`; the softmax and weighted sum are the same maths.
    """

    def __init__(self, channels: int, num_head_channels: int, use_checkpoint: bool | str = False) -> None:
        super().__init__()
        if channels % num_head_channels:
            raise ValueError(f"{channels} channels do not split into heads of {num_head_channels}")
        self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.norm = _norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def _forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        t, heads = x.shape[-1], self.num_heads
        # The 1x1 Conv1d weights applied as linears in a (B, T, C) layout: q, k, v then come out
        # with unit stride along the head channels, which SDPA's CPU kernels need to be fast
        # (measured 3.5x faster than feeding it strided views of the (B, 3C, T) conv output).
        qkv = F.linear(self.norm(x).transpose(1, 2), self.qkv.weight[..., 0], self.qkv.bias)
        # spec 2 legacy order: channels are head-major, [q_h | k_h | v_h] within each head
        q, k, v = qkv.view(b, t, heads, 3, c // heads).permute(3, 0, 2, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, ch)
        a = F.linear(a.transpose(1, 2).reshape(b, t, c), self.proj_out.weight[..., 0], self.proj_out.bias)
        return (x + a.transpose(1, 2)).reshape(b, c, *spatial)


class Downsample(nn.Module):
    """Strided 3x3 conv down-sampler, used only when `resblock_updown` is False (SDM conv_resample)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv, used only when `resblock_updown` is False (SDM conv_resample)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers, each given what it needs: SDM blocks (h, label, emb), res-blocks
    (h, emb), anything else h alone. Keeps SDM's `<blocks>.i.j` parameter names."""

    def forward(self, h: Tensor, label: "Tensor | SPADELabels | None", emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, SDMResBlock):
                h = layer(h, label, emb)
            elif isinstance(layer, ResBlock):
                h = layer(h, emb)
            else:
                h = layer(h)
        return h


# --------------------------------------------------------------------------------------------
# the network


class UNetModel(nn.Module):
    """The SDM U-Net (spec 2). `forward(x, timesteps, y)` -> (B, out_channels, H, W);
    `forward_guided(x, timesteps, y)` -> (conditional, null-label) outputs for sampling.

    Module tree (names equal the official ones): `time_embed`, `input_blocks` (stem conv, then per
    level `num_res_blocks` ResBlocks [+ attention] and a down-sampling ResBlock except at the last
    level), `middle_block` (SDMResBlock, attention, SDMResBlock), `output_blocks` (per level in
    reverse, `num_res_blocks + 1` SDMResBlocks on [features | encoder skip] [+ attention], an
    up-sampling SDMResBlock after the last one except at level 0), `out` (GroupNorm32, SiLU,
    zero-initialised conv).
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config
        mc, emb_dim = cfg.model_channels, cfg.time_embed_dim
        attention_ds = cfg.attention_ds

        def res(ch_in: int, ch_out: int, resample: str | None = None) -> ResBlock:
            return ResBlock(ch_in, emb_dim, ch_out, cfg.dropout, cfg.use_scale_shift_norm,
                            resample, cfg.use_checkpoint)

        def sdm(ch_in: int, ch_out: int, resample: str | None = None) -> SDMResBlock:
            block = SDMResBlock(ch_in, emb_dim, ch_out, cfg.label_nc, cfg.dropout,
                                cfg.use_scale_shift_norm, resample, cfg.use_checkpoint)
            block.in_norm.ds = ds  # `ds` of the enclosing loop: the block's feature-map factor
            block.out_norm.ds = ds // 2 if resample == "up" else ds
            return block

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, cfg.num_head_channels, cfg.use_checkpoint)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        ch = cfg.channel_mult[0] * mc
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))]
        )
        skip_chans = [ch]
        ds = 1
        last = len(cfg.channel_mult) - 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * mc)]
                ch = mult * mc
                if ds in attention_ds:
                    layers.append(attn(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != last:
                down = res(ch, ch, "down") if cfg.resblock_updown else Downsample(ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        # spec 2: the label enters in the middle block and the decoder only
        self.middle_block = TimestepEmbedSequential(sdm(ch, ch), attn(ch), sdm(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [sdm(ch + skip_chans.pop(), mult * mc)]
                ch = mult * mc
                if ds in attention_ds:
                    layers.append(attn(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(sdm(ch, ch, "up") if cfg.resblock_updown else Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            _norm(ch), nn.SiLU(), _zero(nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        )

    def set_checkpointing(self, enabled: bool | Literal["selective"]) -> None:
        """Set activation checkpointing of every res-block and attention block: off (False), full
        recomputation (True) or selective ("selective"; see `_Checkpointed`)."""
        for module in self.modules():
            if isinstance(module, _Checkpointed):
                module.use_checkpoint = enabled

    def _check(self, x: Tensor, timesteps: Tensor, y: Tensor) -> Tensor:
        """Validate shapes; returns timesteps as (B,)."""
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        b, _, height, width = x.shape
        factor = 2 ** (len(cfg.channel_mult) - 1)
        if height % factor or width % factor:
            raise ValueError(f"H, W = {height}, {width} must be divisible by {factor} for this U-Net")
        if tuple(y.shape) != (b, cfg.label_nc, height, width):
            raise ValueError(
                f"y must be (B, label_nc, H, W) = {(b, cfg.label_nc, height, width)}, got {tuple(y.shape)}"
            )
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(b)
        if tuple(timesteps.shape) != (b,):
            raise ValueError(f"timesteps must be (B,) = ({b},), got {tuple(timesteps.shape)}")
        return timesteps

    def _encode(self, x: Tensor, timesteps: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Time embedding (B, emb) and the encoder's skip features (spec 2: no label here)."""
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels))
        h = x
        skips = []
        for block in self.input_blocks:
            h = block(h, None, emb)  # spec 2: encoder blocks take no label
            skips.append(h)
        return emb, skips

    def _decode(self, skips: list[Tensor], label: Tensor | SPADELabels, emb: Tensor, rows: int) -> Tensor:
        """Middle block and decoder on `rows` rows; skips/emb with fewer rows are tiled to match."""
        def tile(t: Tensor) -> Tensor:
            return t if t.shape[0] == rows else t.repeat(rows // t.shape[0], *([1] * (t.ndim - 1)))

        emb = tile(emb)
        h = self.middle_block(tile(skips[-1]), label, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, tile(skips.pop())], dim=1), label, emb)
        return self.out(h)

    def forward(
        self, x: Tensor, timesteps: Tensor, y: Tensor, *, labels: SPADELabels | None = None
    ) -> Tensor:
        """x (B, in_channels, H, W), timesteps (B,) original steps, y (B, label_nc, H, W).

        Returns (B, out_channels, H, W) in x's dtype: eps then the variance value v.
        `labels`: a `SPADELabels(y)` kept across calls with the same y reuses the SPADE
        modulations computed at the first call (same result, fewer convs).
        """
        timesteps = self._check(x, timesteps, y)
        if labels is not None and (labels.y is not y or labels.null):
            raise ValueError("labels must be SPADELabels(y) of this very y, without null rows")
        emb, skips = self._encode(x, timesteps)
        label = labels if labels is not None else LabelWindows(y.to(x.dtype))
        return self._decode(skips, label, emb, x.shape[0]).to(x.dtype)

    def forward_guided(
        self, x: Tensor, timesteps: Tensor, y: Tensor, *, labels: SPADELabels | None = None
    ) -> tuple[Tensor, Tensor]:
        """The conditional and the null-label (all-zero y) outputs for the same x and t, at once.

        Equal to `(forward(x, t, y), forward(x, t, zeros_like(y)))` up to float rounding, for
        less work (spec 4's classifier-free guidance pair): the encoder and the time embedding
        are label-free (spec 2), so they run once on the B inputs; the middle block and decoder
        run on 2B rows, where the null rows' SPADEs use the 3x3 evaluation of
        `SPADEGroupNorm.null_modulation` instead of full-size convs of zeros. Pass a
        `SPADELabels(y, null=True)` kept across calls with the same y (the DDIM steps of one
        run) to compute every SPADE modulation only once.

        Returns (out_cond, out_null), each (B, out_channels, H, W) in x's dtype.
        """
        timesteps = self._check(x, timesteps, y)
        if labels is None:
            labels = SPADELabels(y, null=True, store=False)
        elif labels.y is not y or not labels.null:
            raise ValueError("labels must be SPADELabels(y, null=True) of this very y")
        b = x.shape[0]
        emb, skips = self._encode(x, timesteps)
        out = self._decode(skips, labels, emb, 2 * b).to(x.dtype)
        return out[:b], out[b:]

    def conditioned(
        self, y: Tensor, *, null: bool = False, label_cache: bool | None = None
    ) -> Callable[[Tensor, Tensor], Tensor]:
        """`f(x, t)` = forward(x, t, y) for a label map y fixed across calls (the steps of one
        sampling run); with `null`, the 2B rows [forward(x, t, y); forward(x, t, 0)] that
        classifier-free guidance needs, through `forward_guided`. This is how the U-Net offers
        its fast path to any sampler (`diffmix.sdm.sampler.conditioned`).

        One `SPADELabels` serves every call; with `label_cache` it keeps each SPADE's
        (1 + gamma, beta) after the first call. None: cache when `label_cache_bytes` fits
        `label_cache_budget` (in the dtype autocast will compute in); False: recompute.
        """
        if label_cache is None:
            kind = y.device.type
            dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else y.dtype
            need = self.label_cache_bytes(y.shape[0], y.shape[2], y.shape[3], dtype, null=null)
            label_cache = need <= label_cache_budget(y.device)
        labels = SPADELabels(y, null=null, store=label_cache)
        if null:
            return lambda x, t: torch.cat(self.forward_guided(x, t, y, labels=labels))
        return lambda x, t: self(x, t, y, labels=labels)

    def label_cache_bytes(self, batch: int, height: int, width: int, dtype: torch.dtype = torch.float32,
                          null: bool = True) -> int:
        """Bytes a storing `SPADELabels` holds for a (batch, label_nc, height, width) label:
        (1 + gamma, beta) per decoder SPADE, B rows for y plus one row for the null label."""
        rows = batch + (1 if null else 0)
        item = torch.empty((), dtype=dtype).element_size()
        return sum(
            2 * rows * m.channels * (height // m.ds) * (width // m.ds) * item
            for m in self.modules() if isinstance(m, SPADEGroupNorm)
        )


# --------------------------------------------------------------------------------------------
# size and cost


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (all of them; the U-Net has no frozen ones)."""
    return sum(p.numel() for p in model.parameters())


def estimate_macs(config: UNetConfig, batch: int = 1, image_size: int | None = None) -> int:
    """Analytic multiply-accumulate count of one forward pass of `UNetModel(config)`.

    Counts convolutions, linears and the two attention matmuls (QK^T and AV); biases,
    norms, activations and resampling are left out (they are memory-bound, not MAC-bound).
    `image_size` defaults to `config.image_size`; square inputs.
    """
    cfg = config
    size = cfg.image_size if image_size is None else image_size
    factor = 2 ** (len(cfg.channel_mult) - 1)
    if size % factor:
        raise ValueError(f"image_size {size} is not divisible by {factor}")
    mc, emb_dim = cfg.model_channels, cfg.time_embed_dim
    attention_ds = cfg.attention_ds
    film = 2 if cfg.use_scale_shift_norm else 1

    def conv(c_in: int, c_out: int, k: int, s: int) -> int:
        return c_in * c_out * k * k * s * s

    def spade(c: int, s: int) -> int:
        return conv(cfg.label_nc, SPADE_HIDDEN, 3, s) + 2 * conv(SPADE_HIDDEN, c, 3, s)

    def block(c_in: int, c_out: int, s_in: int, s_out: int, label: bool) -> int:
        macs = conv(c_in, c_out, 3, s_out) + emb_dim * film * c_out + conv(c_out, c_out, 3, s_out)
        if c_in != c_out:
            macs += conv(c_in, c_out, 1, s_out)
        if label:
            macs += spade(c_in, s_in) + spade(c_out, s_out)
        return macs

    def attention(c: int, s: int) -> int:
        t = s * s
        return 3 * c * c * t + c * c * t + 2 * t * t * c

    total = mc * emb_dim + emb_dim * emb_dim
    ch = cfg.channel_mult[0] * mc
    total += conv(cfg.in_channels, ch, 3, size)
    skip_chans = [ch]
    ds, s = 1, size
    last = len(cfg.channel_mult) - 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            total += block(ch, mult * mc, s, s, label=False)
            ch = mult * mc
            if ds in attention_ds:
                total += attention(ch, s)
            skip_chans.append(ch)
        if level != last:
            total += block(ch, ch, s, s // 2, False) if cfg.resblock_updown else conv(ch, ch, 3, s // 2)
            skip_chans.append(ch)
            ds, s = ds * 2, s // 2
    total += 2 * block(ch, ch, s, s, label=True) + attention(ch, s)
    for level, mult in reversed(list(enumerate(cfg.channel_mult))):
        for i in range(cfg.num_res_blocks + 1):
            total += block(ch + skip_chans.pop(), mult * mc, s, s, label=True)
            ch = mult * mc
            if ds in attention_ds:
                total += attention(ch, s)
            if level and i == cfg.num_res_blocks:
                total += block(ch, ch, s, 2 * s, True) if cfg.resblock_updown else conv(ch, ch, 3, 2 * s)
                ds, s = ds // 2, s * 2
    total += conv(ch, cfg.out_channels, 3, size)
    return batch * total


def estimate_flops(config: UNetConfig, batch: int = 1, image_size: int | None = None) -> int:
    """Floating-point operations of one forward pass: 2 x `estimate_macs` (one multiply plus one
    add per MAC, the convention of `torch.utils.flop_counter`). Divide by seconds for FLOP/s."""
    return 2 * estimate_macs(config, batch, image_size)


def build_unet(config: UNetConfig, device: str | torch.device = "cpu") -> UNetModel:
    """`UNetModel(config)` created directly on `device` (use "meta" to inspect shapes for free)."""
    with torch.device(device):
        return UNetModel(config)


def unet_summary(config: UNetConfig) -> dict[str, Any]:
    """Parameter count and forward cost at the config's image size, for logs and benchmarks."""
    model = build_unet(config, "meta")
    return {
        "parameters": count_parameters(model),
        "forward_gflops_per_sample": estimate_flops(config) / 1e9,
    }


__all__: list[str] = [
    "UNetConfig",
    "UNetModel",
    "ResBlock",
    "SDMResBlock",
    "SPADEGroupNorm",
    "SPADELabels",
    "label_cache_budget",
    "AttentionBlock",
    "GroupNorm32",
    "timestep_embedding",
    "count_parameters",
    "estimate_macs",
    "estimate_flops",
    "build_unet",
    "unet_summary",
]
