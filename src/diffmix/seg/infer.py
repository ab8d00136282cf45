"""Tiled inference of a HoVer-style network over whole images, then post-processing once.

Geometry (hovernet_notes 4, generalised). A network takes tiles of T x T pixels and returns
maps of O x O = (T - 2 * crop_margin) pixels, centred on the tile. Of every output tile we
keep only its central S x S part, S = O - overlap, and place the kept parts side by side
with stride S; the image is reflect-padded so that the kept parts tile it exactly. So every
output pixel is computed with at least `crop_margin + overlap // 2` pixels of real or
reflected context on each side:

- HoVer-Net (valid convolutions, crop_margin 95 for original 270 -> 80 and 46 for fast
  256 -> 164) already has full context at every output pixel: hover_net uses overlap 0
  (output tiles side by side, step = output size, reflect padding of (270 - 80) / 2); that is
  the default here too.
- A fully convolutional net with 'same' padding (crop_margin 0) sees zero padding near its
  tile edges, so its outputs there differ from a whole-image pass; keeping only the centre
  (default overlap = tile // 4, i.e. 32 px of context each side of a 256 tile) makes every
  kept pixel lie far from a tile edge, and with S a multiple of the network's total stride
  (the default 192 = 6 x 32) strided nets see the same pixel phase in every tile.

- SONNET (crop_margin 97, 270 -> 76) keeps the centre 40 x 40 of every output tile, step 40,
  as its official inference does (notes 6): its `default_overlap` is 36.

The stitched NP / HV / TP maps of the whole image are then post-processed in one go
(`postproc.postprocess`), as hover_net does, so nuclei on tile seams are never cut.
`tile=None` on a net without a fixed input size runs the whole image as one tile.

SONNET returns an ordinal map instead of HV maps: `predict_maps` stitches whatever maps a
network returns (np, tp, and hv or ord, the ordinal decoded per tile to its level ŷ), and
`segment_image` post-processes with the model's own `post_processing` ("sonnet":
`diffmix.seg.sonnet.postproc`; HoVer-style nets: `postproc.postprocess`), so `seg infer`
picks the right one from the checkpoint.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from skimage.segmentation import find_boundaries
from tqdm import tqdm

from diffmix.data.io import check_image_file, read_image, write_image, write_mat_labels
from diffmix.data.schemes import CONTOUR_COLOURS
from diffmix.distributed import resolve_device
from diffmix.errors import CheckpointError, ConfigError, DataError
from diffmix.runs import JsonlLog, prepare_run_folder
from diffmix.seg.models import load_segmenter
from diffmix.seg.postproc import postprocess, prior_adjusted
from diffmix.seg.sonnet.loss import predicted_levels
from diffmix.seg.sonnet.postproc import postprocess_sonnet
from diffmix.seg.sonnet.targets import NUM_LEVELS

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")

#: Side lengths of whole-image passes of fully convolutional nets are rounded up to this,
#: so that nets with up to 5 stride-2 stages accept them (the padding is cropped away).
SIZE_MULTIPLE = 32

#: A net without a fixed input size runs an image in one pass up to this side; larger images
#: are tiled with `LARGE_IMAGE_TILE` (same result with the default overlap, bounded memory).
WHOLE_IMAGE_MAX = 2048
LARGE_IMAGE_TILE = 1024


def _default_overlap(model: Any, side: int, margin: int) -> int:
    """0 for nets with a crop margin (hover_net), tile // 4 rounded to even for 'same'-padded
    nets; a model's own `default_overlap` (SONNET: 36, the official keep-40) wins."""
    own = getattr(model, "default_overlap", None)
    if own is not None:
        return int(own)
    return 0 if margin > 0 else 2 * ((side - 2 * margin) // 8)


def _model_geometry(model: Any) -> tuple[int, int | None]:
    margin = int(getattr(model, "crop_margin", 0) or 0)
    input_size = getattr(model, "input_size", None)
    if margin < 0:
        raise ConfigError(f"model crop_margin {margin} is negative")
    return margin, (int(input_size) if input_size is not None else None)


def tile_plan(
    image_shape: tuple[int, int],
    *,
    crop_margin: int,
    tile: tuple[int, int],
    overlap: int,
) -> tuple[tuple[int, int, int, int], list[tuple[int, int]], tuple[int, int]]:
    """Reflect padding and tile offsets that cover an image with the central parts of tiles.

    image_shape: (H, W). tile: (Th, Tw) network input size. crop_margin: (T - O) // 2 of the
    network. overlap: output pixels shared by neighbouring output tiles (even, < O).
    Returns (pad (top, bottom, left, right), offsets [(y, x)] of the tiles in the padded
    image, kept size (Sh, Sw)). Tile (y, x) provides image pixels [y, y + Sh) x [x, x + Sw).
    """
    h, w = image_shape
    th, tw = tile
    oh, ow = th - 2 * crop_margin, tw - 2 * crop_margin
    if oh <= 0 or ow <= 0:
        raise ConfigError(f"tile {th}x{tw} is too small for the network's crop margin {crop_margin}")
    if overlap < 0 or overlap % 2:
        raise ConfigError(f"overlap must be an even number >= 0, got {overlap}")
    sh, sw = oh - overlap, ow - overlap
    if sh <= 0 or sw <= 0:
        raise ConfigError(f"overlap {overlap} leaves nothing of the {oh}x{ow} output tiles")
    context = crop_margin + overlap // 2
    ny, nx = max(1, math.ceil(h / sh)), max(1, math.ceil(w / sw))
    pad = (context, ny * sh - h + context, context, nx * sw - w + context)
    offsets = [(iy * sh, ix * sw) for iy in range(ny) for ix in range(nx)]
    return pad, offsets, (sh, sw)


def check_tiling(model: Any, tile: int | None, overlap: int | None, batch_size: int) -> None:
    """ConfigError for tiling options no image could be segmented with (see `predict_image`).

    The same checks `predict_image` makes per image, made once up front so that a bad option
    fails before a run folder is created rather than at the first image.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if tile is not None and tile < 1:
        raise ConfigError(f"tile must be >= 1 px, got {tile}")
    if overlap is not None and (overlap < 0 or overlap % 2):
        raise ConfigError(f"overlap must be an even number >= 0, got {overlap}")
    margin, input_size = _model_geometry(model)
    if input_size is not None and tile is not None and tile != input_size:
        raise ConfigError(f"this network takes {input_size}-px tiles; got tile={tile}")
    side = tile if tile is not None else input_size
    if side is not None:
        default = _default_overlap(model, side, margin)
        tile_plan((side, side), crop_margin=margin, tile=(side, side), overlap=default if overlap is None else overlap)


def _resolve_device(model: Any, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return resolve_device(device)
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def predict_image(
    model: Any,
    image: np.ndarray,
    *,
    tile: int | None = None,
    overlap: int | None = None,
    batch_size: int = 4,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stitched HoVer-Net outputs over a whole image: (np_prob, hv, tp_prob); see `predict_maps`."""
    maps = predict_maps(model, image, tile=tile, overlap=overlap, batch_size=batch_size, device=device)
    if "hv" not in maps:
        raise ConfigError("this network returns no HV maps (a SONNET?): use predict_maps or segment_image")
    return maps["np"], maps["hv"], maps["tp"]


@torch.inference_mode()
def predict_maps(
    model: Any,
    image: np.ndarray,
    *,
    tile: int | None = None,
    overlap: int | None = None,
    batch_size: int = 4,
    device: str | torch.device | None = None,
) -> dict[str, np.ndarray]:
    """Stitched network outputs over a whole image of any size.

    model: callable on float (B, 3, T, T) in [0, 1] returning {"np": (B, 2, O, O) logits,
        "hv": (B, 2, O, O) (or SONNET's "ord": (B, 16, O, O) logits), "tp": (B, C, O, O)
        logits}, with attributes `crop_margin`
        ((T - O) // 2) and `input_size` (T, or None for any size). It runs in eval mode (a
        model in training mode is switched for the call and switched back: batch statistics
        would make every tile depend on its batch); it is moved to `device` when one is given.
    image: uint8 (H, W, 3) RGB.
    tile: input tile side; must equal `model.input_size` when that is set (None takes it).
        None for a net without a fixed input size runs the whole image in one pass (tiles of
        `LARGE_IMAGE_TILE` above `WHOLE_IMAGE_MAX` px, to bound memory).
    overlap: output pixels shared by neighbouring tiles (even); None = the model's
        `default_overlap` if it has one (SONNET: 36), else 0 for nets with a crop margin
        (hover_net), tile // 4 rounded to even for 'same'-padded nets, and 64 px of context
        (32 a side) around a whole-image pass.
    Returns {"np": np_prob float32 (H, W), "tp": tp_prob float32 (C, H, W), and "hv": float32
    (2, H, W) or "ord": the decoded ordinal level float32 (H, W) in 0..8}.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataError(f"image has shape {image.shape} dtype {image.dtype}, expected uint8 HxWx3")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    h, w = image.shape[:2]
    margin, input_size = _model_geometry(model)
    if input_size is not None:
        if tile is not None and tile != input_size:
            raise ConfigError(f"this network takes {input_size}-px tiles; got tile={tile}")
        tile = input_size
    elif tile is None and max(h, w) > WHOLE_IMAGE_MAX:
        tile = LARGE_IMAGE_TILE
    if tile is not None:
        if overlap is None:
            overlap = _default_overlap(model, tile, margin)
        tile_hw = (tile, tile)
    else:
        # one pass: a single tile whose kept part covers the image, rounded up for strides
        if overlap is None:
            overlap = 64
        keep_h = math.ceil(h / SIZE_MULTIPLE) * SIZE_MULTIPLE
        keep_w = math.ceil(w / SIZE_MULTIPLE) * SIZE_MULTIPLE
        tile_hw = (keep_h + overlap + 2 * margin, keep_w + overlap + 2 * margin)
    pad, offsets, (sh, sw) = tile_plan((h, w), crop_margin=margin, tile=tile_hw, overlap=overlap)
    top, bottom, left, right = pad
    padded = np.pad(image, ((top, bottom), (left, right), (0, 0)), mode="reflect")

    dev = _resolve_device(model, device)
    if device is not None and hasattr(model, "to"):
        model.to(dev)
    was_training = bool(getattr(model, "training", False))
    if was_training:
        model.eval()
    try:
        return _run_tiles(model, padded, (h, w), offsets, tile_hw, (sh, sw), margin, overlap, batch_size, dev)
    finally:
        if was_training:
            model.train()


def _run_tiles(
    model: Any,
    padded: np.ndarray,
    image_hw: tuple[int, int],
    offsets: list[tuple[int, int]],
    tile_hw: tuple[int, int],
    keep_hw: tuple[int, int],
    margin: int,
    overlap: int,
    batch_size: int,
    dev: torch.device,
) -> dict[str, np.ndarray]:
    """Run the network over the tiles of the padded image and stitch their central parts."""
    h, w = image_hw
    sh, sw = keep_hw
    th, tw = tile_hw
    b = overlap // 2
    full_h, full_w = len({o[0] for o in offsets}) * sh, len({o[1] for o in offsets}) * sw
    stitched: dict[str, np.ndarray] = {}
    for chunk in _batches(offsets, batch_size):
        batch = np.stack([padded[y : y + th, x : x + tw] for y, x in chunk])
        x_in = torch.from_numpy(batch).to(dev).permute(0, 3, 1, 2).float().div_(255.0)
        maps = _tile_maps(model(x_in), (len(chunk), th - 2 * margin, tw - 2 * margin), (th, tw), margin)
        for name, values in maps.items():
            if name not in stitched:
                stitched[name] = np.zeros((values.shape[1], full_h, full_w), dtype=np.float32)
            for k, (y, x) in enumerate(chunk):
                stitched[name][:, y : y + sh, x : x + sw] = values[k, :, b : b + sh, b : b + sw]
    out = {name: np.ascontiguousarray(v[:, :h, :w]) for name, v in stitched.items()}
    for name in ("np", "ord"):  # single-channel maps are (H, W)
        if name in out:
            out[name] = out[name][0]
    return out


def _tile_maps(
    out: Any, expected: tuple[int, int, int], tile_hw: tuple[int, int], margin: int
) -> dict[str, np.ndarray]:
    """Per-pixel maps (B, C, O, O) of one batch of network outputs, as they are stitched:
    np -> P(nucleus) (1 channel), tp -> softmax, hv as is, ord -> decoded level (1 channel)."""
    if not isinstance(out, Mapping):
        raise CheckpointError("the network must return a dict with 'np', 'hv' (or 'ord') and 'tp' maps")
    try:
        second = "ord" if "ord" in out and "hv" not in out else "hv"
        np_logits, other, tp_logits = out["np"], out[second], out["tp"]
    except (KeyError, TypeError):
        raise CheckpointError("the network must return a dict with 'np', 'hv' (or 'ord') and 'tp' maps") from None
    th, tw = tile_hw
    for name, t, ch in (("np", np_logits, 2), (second, other, 2 if second == "hv" else 2 * NUM_LEVELS), ("tp", tp_logits, None)):
        if t.ndim != 4 or (t.shape[0], t.shape[2], t.shape[3]) != expected or (ch and t.shape[1] != ch):
            raise CheckpointError(
                f"network output {name!r} has shape {tuple(t.shape)}; expected "
                f"({expected[0]}, {ch or 'C'}, {expected[1]}, {expected[2]}) for {th}x{tw} tiles "
                f"with crop margin {margin}"
            )
    maps = {
        "np": torch.softmax(np_logits.float(), dim=1)[:, 1:2].cpu().numpy(),
        "tp": torch.softmax(tp_logits.float(), dim=1).cpu().numpy(),
    }
    if second == "hv":
        maps["hv"] = other.float().cpu().numpy()
    else:
        maps["ord"] = predicted_levels(other.float())[:, None].to(torch.float32).cpu().numpy()
    return maps


def segment_image(
    model: Any,
    image: np.ndarray,
    *,
    tile: int | None = None,
    overlap: int | None = None,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    keep_unmarked: bool = False,
    type_prior: Sequence[float] | None = None,
    logit_adjust: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, dict[int, dict[str, Any]]]:
    """Stitched maps, then the model's post-processing: (inst_map, type_map, inst_info).

    HoVer-style nets: `predict_image` + `postproc.postprocess`; SONNET (`post_processing`
    "sonnet"): `predict_maps` + `diffmix.seg.sonnet.postproc.postprocess_sonnet`.
    `logit_adjust` tau > 0 with the training mix's `type_prior` (per-class pixel fractions)
    re-weights the type probabilities before the vote (`postproc.prior_adjusted`).
    """
    if logit_adjust and type_prior is None:
        raise ConfigError("logit adjustment needs the training type prior")
    def adjusted(tp: np.ndarray) -> np.ndarray:
        return prior_adjusted(tp, list(type_prior or []), logit_adjust) if logit_adjust else tp

    if getattr(model, "post_processing", "hovernet") == "sonnet":
        maps = predict_maps(model, image, tile=tile, overlap=overlap, batch_size=batch_size, device=device)
        return postprocess_sonnet(maps["np"], maps["ord"], adjusted(maps["tp"]), keep_unmarked=keep_unmarked)
    np_prob, hv, tp_prob = predict_image(
        model, image, tile=tile, overlap=overlap, batch_size=batch_size, device=device
    )
    return postprocess(np_prob, hv, adjusted(tp_prob), keep_unmarked=keep_unmarked)


def overlay(image: np.ndarray, inst_map: np.ndarray, type_map: np.ndarray) -> np.ndarray:
    """The image with every nucleus outlined (1-px inner contour) in its class colour, uint8 RGB."""
    out = np.array(image, dtype=np.uint8, copy=True)
    edge = find_boundaries(inst_map, mode="inner") & (inst_map > 0)
    palette = np.array(CONTOUR_COLOURS, dtype=np.uint8)
    out[edge] = palette[type_map[edge] % len(palette)]
    return out


def list_images(images: str | Path) -> list[Path]:
    """Image files (png/tif/tiff/jpg/jpeg) of a folder, sorted by name; a dataset root with an
    `Images/` sub-folder is accepted too."""
    images = Path(images)
    if not images.is_dir():
        raise DataError(f"{images}: not a folder of images")
    if (images / "Images").is_dir():
        images = images / "Images"
    files = sorted(p for p in images.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{images}: no images ({', '.join(IMAGE_SUFFIXES)})")
    stems = [p.stem for p in files]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise DataError(f"{images}: several images share the names {dup[:10]}")
    return files


def infer_images(
    model: Any,
    images: str | Path,
    out: str | Path,
    *,
    tile: int | None = None,
    overlap: int | None = None,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    keep_unmarked: bool = False,
    type_prior: Sequence[float] | None = None,
    logit_adjust: float = 0.0,
    run_config: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Segment every image of a folder with a loaded network; see `infer_folder`."""
    files = list_images(images)
    check_tiling(model, tile, overlap, batch_size)
    for path in files:  # headers only: refuse a 16-bit or foreign file before the folder exists
        check_image_file(path)
    config = {
        "images": str(Path(images).resolve()),
        "tile": tile,
        "overlap": overlap,
        "keep_unmarked": keep_unmarked,
        **({"logit_adjust": logit_adjust} if logit_adjust else {}),
        **(run_config or {}),
    }
    out, _ = prepare_run_folder(out, config, kind="seg-infer")
    labels_dir, overlay_dir = out / "Labels", out / "Overlay"
    log = JsonlLog(out / "log.jsonl")
    done = skipped = 0
    nuclei = 0
    for path in tqdm(files, desc="seg infer", unit="image", disable=not progress):
        mat_path = labels_dir / f"{path.stem}.mat"
        png_path = overlay_dir / f"{path.stem}.png"
        if mat_path.exists() and png_path.exists():
            skipped += 1
            continue
        t0 = time.perf_counter()
        image = read_image(path)
        inst_map, type_map, info = segment_image(
            model,
            image,
            tile=tile,
            overlap=overlap,
            batch_size=batch_size,
            device=device,
            keep_unmarked=keep_unmarked,
            type_prior=type_prior,
            logit_adjust=logit_adjust,
        )
        # the overlay is written last: an image counts as done only when both files exist
        write_mat_labels(mat_path, inst_map, type_map)
        write_image(png_path, overlay(image, inst_map, type_map))
        done += 1
        nuclei += len(info)
        log.write(
            {
                "image": path.name,
                "nuclei": len(info),
                "seconds": round(time.perf_counter() - t0, 3),
                "size": list(image.shape[:2]),
            }
        )
    return {"out": str(out), "images": len(files), "done": done, "skipped": skipped, "nuclei": nuclei}


def infer_folder(
    ckpt: str | Path,
    images: str | Path,
    out: str | Path,
    tile: int | None = None,
    overlap: int | None = None,
    batch_size: int = 4,
    device: str = "cpu",
    keep_unmarked: bool = False,
    logit_adjust: float = 0.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Segment and classify the nuclei of every image in a folder (`diffmix seg infer`).

    ckpt: a segmentation checkpoint of `diffmix seg train` (read by `seg.models.load_segmenter`).
    images: folder of png/tif/jpg images (or a dataset root with `Images/`).
    out: run folder; gets `config.yaml`, `Labels/NAME.mat` (CoNSeP layout: inst_map, type_map,
        inst_type Nx1, inst_centroid Nx2 (x, y), ids contiguous), `Overlay/NAME.png` (contours
        coloured by class) and `log.jsonl`. Re-running skips images already done; a folder
        holding a run with another checkpoint or other settings is refused (RunFolderError).
    tile, overlap, batch_size, device: see `predict_image`; batch_size and device do not
        change the result, so they may differ between a run and its resumption.
    keep_unmarked: see `postproc.process_np_hv` (False = hover_net, and SONNET's official rule).
    logit_adjust: tau of post-hoc logit adjustment (`postproc.prior_adjusted`) with the type
        prior the checkpoint records from its training mix; 0 = off (the official rule).
    The post-processing is the checkpoint's network's: HoVer-Net's or SONNET's.
    Returns a summary {"out", "images", "done", "skipped", "nuclei"}.
    """
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise CheckpointError(f"{ckpt}: checkpoint not found")

    device = resolve_device(device)
    model, meta = load_segmenter(ckpt, device=device)
    if logit_adjust < 0:
        raise ConfigError(f"logit_adjust must be >= 0, got {logit_adjust}")
    if logit_adjust and "type_prior" not in meta:
        raise CheckpointError(f"{ckpt}: no type prior recorded (trained before diffmix recorded it); "
                              "logit adjustment needs it")
    return infer_images(
        model,
        images,
        out,
        tile=tile,
        overlap=overlap,
        batch_size=batch_size,
        device=device,
        keep_unmarked=keep_unmarked,
        type_prior=meta.get("type_prior"),
        logit_adjust=logit_adjust,
        run_config={"ckpt": str(ckpt.resolve()), "preset": meta.get("preset")},
        progress=progress,
    )
