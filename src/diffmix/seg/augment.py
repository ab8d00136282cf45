"""HoVer-Net's training augmentation with the official ranges, identical on image and label maps.

hover_net `dataloader/train_loader.py` (hovernet_notes 3) augments each 540x540 training
patch with imgaug, then centre-crops the network input. imgaug is unmaintained (its last
release, 0.4.0, is from 2020), so the same operations are done here with OpenCV, already a
dependency and what imgaug's `cv2` backend and hover_net's own `augs.py` call underneath; only
the parameter draws and the composition are ours.

Shape augmentation (`shape_augment`), one affine warp per item about the patch centre:

- scale x and y independently in [0.8, 1.2]; translate x and y by [-1 %, +1 %] of the 540-px
  window, i.e. of twice the output patch side (540 / 270); shear [-5°, 5°] (x, imgaug's
  single-value form); rotate [-179°, 179°]; composed as imgaug does: shear, scale, rotate, then
  translate, about the centre;
- **nearest-neighbour sampling for the image as well as the labels** (official `order=0`):
  `cv2.warpAffine` maps one array of source pixel indices and all three arrays are gathered
  through it, so every output pixel of the image, the instance map and the type map comes from
  the same source pixel: no interpolated ids, no class mixing; pixels from outside the sample
  are black and background (imgaug's constant 0);
- the output window is the `size` x `size` centre of the warp (official: warp 540, crop 270),
  computed directly, which is the same thing without warping pixels that are thrown away;
- horizontal flip with p = 0.5, then vertical flip with p = 0.5.

Input augmentation (`input_augment`, on the uint8 RGB image only):

- one of: Gaussian blur with kernel (kx, ky), each in {1, 3, 5} (sigma from the kernel,
  replicated border); median blur with k in {1, 3, 5}; additive Gaussian noise with sigma in
  [0, 0.05 * 255], per channel with p = 0.5 (else the same noise on all three);
- then, in a random order: hue + [-8, 8] (OpenCV's 0..179 hue scale), saturation x (1 + [-0.2,
  0.2]) against the grey image, brightness + [-26, 26], contrast x [0.75, 1.25] about the
  channel means. **Fixed official defect:** hover_net's `add_to_contrast` returns
  `np.clip(img)` of the *input*, so its contrast step does nothing; here it is applied.

All draws come from the item's `numpy.random.Generator` in a fixed order, so an item is a
pure function of (seed, epoch, position) and resumed runs see the same patches
(`diffmix.seg.data`).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

#: The official ranges (train_loader.py): scale per axis, translate (fraction of the 540 window),
#: shear (degrees), rotate (degrees), flip probability.
SCALE = (0.8, 1.2)
TRANSLATE = (-0.01, 0.01)
SHEAR = (-5.0, 5.0)
ROTATE = (-179.0, 179.0)
FLIP_P = 0.5
#: Input augmentation ranges (augs.py via train_loader.py).
BLUR_KSIZES = (1, 3, 5)
NOISE_SIGMA = (0.0, 0.05 * 255)
HUE = (-8.0, 8.0)
SATURATION = (-0.2, 0.2)
BRIGHTNESS = (-26.0, 26.0)
CONTRAST = (0.75, 1.25)


def affine_matrix(
    scale: tuple[float, float],
    shear_deg: float,
    rotate_deg: float,
    translate: tuple[float, float],
    src_centre: tuple[float, float],
    dst_centre: tuple[float, float],
) -> np.ndarray:
    """2x3 float64 matrix taking source (x, y) to output (x, y): shear, scale, rotate about
    `src_centre`, then translate by `translate` pixels, placed at `dst_centre`."""
    sh = math.tan(math.radians(shear_deg))
    r = math.radians(rotate_deg)
    rot = np.array([[math.cos(r), -math.sin(r)], [math.sin(r), math.cos(r)]])
    lin = rot @ np.diag(scale) @ np.array([[1.0, sh], [0.0, 1.0]])
    offset = np.asarray(dst_centre) + np.asarray(translate) - lin @ np.asarray(src_centre)
    return np.concatenate([lin, offset[:, None]], axis=1)


def draw_shape_params(rng: np.random.Generator, size: int) -> dict:
    """The random parameters of one shape augmentation (official ranges), in a fixed draw order."""
    scale = rng.uniform(*SCALE, size=2)
    window = 2 * size  # the official 540-px window around a 270-px input
    translate = rng.uniform(*TRANSLATE, size=2) * window
    return {
        "scale": (float(scale[0]), float(scale[1])),
        "translate": (float(translate[0]), float(translate[1])),
        "shear": float(rng.uniform(*SHEAR)),
        "rotate": float(rng.uniform(*ROTATE)),
        "flip_lr": bool(rng.random() < FLIP_P),
        "flip_ud": bool(rng.random() < FLIP_P),
    }


def warp_window(
    image: np.ndarray,
    inst_map: np.ndarray,
    type_map: np.ndarray,
    matrix: np.ndarray,
    size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image uint8, inst_map int32, type_map int32) of the size x size output of `matrix`.

    Nearest-neighbour with constant-0 borders. OpenCV warps one map of source pixel indices
    (float64, exact up to 2**53 pixels) and the image and both label maps are gathered through
    it: one sampling for all three, so they cannot disagree by a pixel (separate warpAffine
    calls on uint8 and float arrays were measured to round 2 of 1600 positions differently).
    """
    h, w = inst_map.shape
    index = np.arange(1, h * w + 1, dtype=np.float64).reshape(h, w)
    src = cv2.warpAffine(index, matrix, (size, size), flags=cv2.INTER_NEAREST,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0).astype(np.int64)
    inside = src > 0
    flat = src[inside] - 1
    img = np.zeros((size, size, 3), dtype=np.uint8)
    inst = np.zeros((size, size), dtype=np.int32)
    types = np.zeros((size, size), dtype=np.int32)
    img[inside] = np.asarray(image).reshape(-1, 3)[flat]
    inst[inside] = np.asarray(inst_map).reshape(-1)[flat]
    types[inside] = np.asarray(type_map).reshape(-1)[flat]
    return img, inst, types


def shape_augment(
    image: np.ndarray,
    inst_map: np.ndarray,
    type_map: np.ndarray,
    y: int,
    x: int,
    size: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The augmented size x size patch whose unaugmented version is the crop at (y, x).

    image HxWx3 uint8, inst_map / type_map HxW ints (any size around the window). With the
    identity parameters this is exactly `image[y:y+size, x:x+size]` (and the same crop of the
    labels); see the module docstring for the random parameters.
    """
    p = draw_shape_params(rng, size)
    mid = (size - 1) / 2.0
    matrix = affine_matrix(p["scale"], p["shear"], p["rotate"], p["translate"], (x + mid, y + mid), (mid, mid))
    img, inst, types = warp_window(image, inst_map, type_map, matrix, size)
    if p["flip_lr"]:
        img, inst, types = img[:, ::-1], inst[:, ::-1], types[:, ::-1]
    if p["flip_ud"]:
        img, inst, types = img[::-1], inst[::-1], types[::-1]
    return np.ascontiguousarray(img), np.ascontiguousarray(inst), np.ascontiguousarray(types)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    # augs.py: np.clip(..., 0, 255).astype(np.uint8), i.e. truncation toward zero
    return np.clip(values, 0, 255).astype(np.uint8)


def adjust_hue(image: np.ndarray, delta: float) -> np.ndarray:
    """Shift the hue by `delta` on OpenCV's 8-bit scale (0..179, i.e. 2 degrees per step)."""
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = np.mod(hsv[..., 0] + delta, 180).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def adjust_saturation(image: np.ndarray, value: float) -> np.ndarray:
    """Blend with the grey image: value 1 keeps the image, 0 gives grey, above 1 saturates."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[..., None].astype(np.float64)
    return _to_uint8(image.astype(np.float64) * value + grey * (1.0 - value))


def adjust_brightness(image: np.ndarray, delta: float) -> np.ndarray:
    """Add `delta` to every channel."""
    return _to_uint8(image.astype(np.float64) + delta)  # float: uint8 + int would wrap


def adjust_contrast(image: np.ndarray, value: float) -> np.ndarray:
    """Scale each channel's deviation from its mean by `value` (official defect fixed: applied)."""
    mean = image.mean(axis=(0, 1), keepdims=True)
    return _to_uint8(image.astype(np.float64) * value + mean * (1.0 - value))


def input_augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """HoVer-Net's pixel augmentation of a uint8 RGB image (module docstring); returns uint8."""
    img = np.ascontiguousarray(image, dtype=np.uint8)
    choice = int(rng.integers(0, 3))
    if choice == 0:
        kx, ky = (int(k) for k in rng.choice(BLUR_KSIZES, size=2))
        img = cv2.GaussianBlur(img, (kx, ky), sigmaX=0, sigmaY=0, borderType=cv2.BORDER_REPLICATE)
    elif choice == 1:
        k = int(rng.choice(BLUR_KSIZES))
        img = cv2.medianBlur(img, k) if k > 1 else img
    else:
        sigma = rng.uniform(*NOISE_SIGMA)
        per_channel = rng.random() < 0.5
        shape = img.shape if per_channel else img.shape[:2] + (1,)
        noise = rng.normal(0.0, sigma, size=shape)
        img = np.clip(np.round(img + noise), 0, 255).astype(np.uint8)
    for step in rng.permutation(4):  # official: Sequential(..., random_order=True)
        if step == 0:
            img = adjust_hue(img, rng.uniform(*HUE))
        elif step == 1:
            img = adjust_saturation(img, 1.0 + rng.uniform(*SATURATION))
        elif step == 2:
            img = adjust_brightness(img, rng.uniform(*BRIGHTNESS))
        else:
            img = adjust_contrast(img, rng.uniform(*CONTRAST))
    return img


def hovernet_augment(
    image: np.ndarray,
    inst_map: np.ndarray,
    type_map: np.ndarray,
    y: int,
    x: int,
    size: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shape then input augmentation of the size x size window at (y, x): (uint8 image,
    int32 inst_map, int32 type_map). Instance ids and classes are those of the source pixels."""
    img, inst, types = shape_augment(image, inst_map, type_map, y, x, size, rng)
    return input_augment(img, rng), inst, types
