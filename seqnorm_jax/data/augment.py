"""Data augmentation as the papers use it: pure NumPy functions of one HWC image.

Every random function takes an explicit ``np.random.Generator``, so a result is a
deterministic function of the image and the generator's state; none keeps global
state. Images are ``(height, width, channels)`` arrays, uint8 or float; geometric
functions keep the input's dtype.

What the papers do, and the presets that reproduce it:

- ``"flip_crop"`` (CIFAR; paper 000's ResNet-56 runs, paper 003's CIFAR-10 runs):
  pad each side by 4 pixels with zeros, take a random 32x32 crop, flip
  horizontally with probability 1/2, then normalise. Paper 003 states the zero
  padding ("padded with 0 to 36x36 and then randomly cropped to 32x32"); the
  padding here is pixel value 0 (black), as torchvision's
  ``RandomCrop(32, padding=4)``. (Cubuk et al.'s AutoAugment code pads *after*
  normalisation, i.e. with the mean colour; :func:`pad_and_crop` takes
  ``mode="reflect"`` for the other common choice.)
- ``"flip_crop_cutout"`` (CIFAR-10/100 WRN-28-10 runs of papers 000/001, which
  follow Cubuk et al.): ``"flip_crop"`` then Cutout (DeVries & Taylor 2017) of a
  16x16 square. As in DeVries & Taylor's and Cubuk et al.'s code, Cutout acts on
  the normalised image, so the square is set to 0 there (the dataset's mean).
- ``"imagenet"`` (paper 003's and paper 000's ImageNet recipes): training images
  get a random-resized crop (area fraction uniform in ``(0.08, 1)``, aspect ratio
  log-uniform in ``(3/4, 4/3)``) resized to 224x224 and a random horizontal flip;
  evaluation images are resized so that their shorter side is 256 and
  center-cropped to 224x224. :class:`~seqnorm_jax.data.preprocess.Preprocess` runs
  this preset with Pillow
  (:mod:`seqnorm_jax.data.imagenet`: JPEG bytes or arrays, reduced-size
  decoding, crop and resize in one step); :func:`random_resized_crop` and
  :func:`center_crop` here are the NumPy reference of the same geometry.
- ``"none"``: normalisation only.

Evaluation (``train=False``) applies only the deterministic part of a preset
(the ImageNet center crop), then normalisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from seqnorm_jax import checks

__all__ = [
    "PRESETS",
    "normalize_batch",
    "check_rng",
    "center_crop",
    "center_crop_geometry",
    "cutout",
    "normalize",
    "pad_and_crop",
    "random_flip",
    "random_resized_crop",
    "random_resized_crop_box",
    "resize",
]

PRESETS = ("none", "flip_crop", "flip_crop_cutout", "imagenet")
"""The augmentation presets of ``make_loader(augment=...)``."""


def _check_image(image: np.ndarray, fn: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"{fn}: `image` must be a (height, width, channels) array, got shape "
                         f"{image.shape}; add a trailing channel axis to grey images.")
    return image


def check_rng(rng, fn: str) -> None:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"{fn}: `rng` must be a numpy.random.Generator "
                        f"(e.g. np.random.default_rng(seed)), got {type(rng).__name__}.")


def random_flip(image: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """Flip ``image`` left-right with probability ``p``.

    Args:
      image: ``(H, W, C)`` array.
      rng: the generator that decides.
      p: flip probability, in ``[0, 1]``.

    Returns:
      The flipped image (a copy) or ``image`` itself.
    """
    image = _check_image(image, "random_flip")
    check_rng(rng, "random_flip")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"random_flip: `p` must be in [0, 1], got {p}.")
    if rng.random() < p:
        return image[:, ::-1].copy()
    return image


def pad_and_crop(image: np.ndarray, rng: np.random.Generator, pad: int = 4,
                 mode: str = "zero") -> np.ndarray:
    """Pad each side by ``pad`` pixels, then take a random crop of the original size.

    Args:
      image: ``(H, W, C)`` array.
      rng: draws the crop's top-left corner uniformly among the
        ``(2 * pad + 1) ** 2`` positions.
      pad: padding per side, ``>= 0``.
      mode: ``"zero"`` (pixel value 0, as the papers) or ``"reflect"`` (mirror
        without repeating the edge, as ``np.pad(mode="reflect")``).

    Returns:
      An array of the input's shape and dtype.
    """
    image = _check_image(image, "pad_and_crop")
    check_rng(rng, "pad_and_crop")
    if not isinstance(pad, (int, np.integer)) or pad < 0:
        raise ValueError(f"pad_and_crop: `pad` must be a non-negative int, got {pad!r}.")
    if mode not in ("zero", "reflect"):
        raise ValueError(f"pad_and_crop: `mode` must be 'zero' or 'reflect', got {mode!r}.")
    height, width = image.shape[:2]
    if mode == "reflect" and pad >= min(height, width):
        raise ValueError(f"pad_and_crop: reflect padding needs `pad` < the image's height and "
                         f"width ({height}x{width}), got pad={pad}.")
    top = int(rng.integers(0, 2 * pad + 1))
    left = int(rng.integers(0, 2 * pad + 1))
    widths = ((pad, pad), (pad, pad), (0, 0))
    padded = np.pad(image, widths, mode="constant") if mode == "zero" else np.pad(
        image, widths, mode="reflect")
    return padded[top:top + height, left:left + width]


def cutout(image: np.ndarray, rng: np.random.Generator, size: int = 16,
           fill: float = 0) -> np.ndarray:
    """Cutout (DeVries & Taylor 2017): set a ``size`` x ``size`` square to ``fill``.

    As in the authors' code, the square's center is uniform over all pixels and
    the square is clipped at the image border, so near an edge less than
    ``size ** 2`` pixels change. The square spans rows
    ``[cy - size // 2, cy - size // 2 + size)`` (clipped), likewise columns.

    Args:
      image: ``(H, W, C)`` array (the papers apply it after normalisation).
      rng: draws the center.
      size: side of the square, ``> 0`` (16 for CIFAR).
      fill: the value written.

    Returns:
      A copy of ``image`` with the square filled.
    """
    image = _check_image(image, "cutout")
    check_rng(rng, "cutout")
    checks.positive_int(size, "`size`", "cutout")
    height, width = image.shape[:2]
    cy = int(rng.integers(0, height))
    cx = int(rng.integers(0, width))
    y0, x0 = cy - size // 2, cx - size // 2
    out = image.copy()
    out[max(y0, 0):min(y0 + size, height), max(x0, 0):min(x0 + size, width)] = fill
    return out


def _resize_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) weights of antialiased linear resampling with half-pixel centers."""
    scale = in_size / out_size
    kernel_scale = max(scale, 1.0)
    centers = (np.arange(out_size) + 0.5) * scale - 0.5
    dist = np.abs(centers[:, None] - np.arange(in_size)[None, :]) / kernel_scale
    weights = np.maximum(0.0, 1.0 - dist)
    return weights / weights.sum(axis=1, keepdims=True)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize with an antialiased linear (triangle) filter.

    Half-pixel centers; when shrinking, the filter widens by the shrink factor,
    so every input pixel contributes (the behaviour of PIL's ``BILINEAR`` and of
    ``jax.image.resize(method="linear", antialias=True)``).

    Args:
      image: ``(H, W, C)`` array.
      height, width: output size, positive.

    Returns:
      ``(height, width, C)``, the input's dtype (integers are rounded and clipped
      to the dtype's range).
    """
    image = _check_image(image, "resize")
    for arg, value in (("height", height), ("width", width)):
        checks.positive_int(value, f"`{arg}`", "resize")
    in_h, in_w = image.shape[:2]
    if (in_h, in_w) == (height, width):
        return image
    x = image.astype(np.float32)
    x = np.einsum("oh,hwc->owc", _resize_weights(in_h, height).astype(np.float32), x)
    x = np.einsum("pw,owc->opc", _resize_weights(in_w, width).astype(np.float32), x)
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        return np.clip(np.rint(x), info.min, info.max).astype(image.dtype)
    return x.astype(image.dtype)


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3),
                            attempts: int = 10) -> tuple[int, int, int, int]:
    """The crop box of an Inception-style random-resized crop.

    Up to ``attempts`` times: draw the crop's area as a fraction of the image's,
    uniform in ``scale``, and its aspect ratio (width / height) log-uniform in
    ``ratio``; accept the first box that fits, at a uniformly random position.
    If none fits, fall back to the largest centered box whose ratio is clamped
    into ``ratio`` (the rule of torchvision's ``RandomResizedCrop``).

    Returns:
      ``(top, left, crop_height, crop_width)``.
    """
    check_rng(rng, "random_resized_crop_box")
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"random_resized_crop_box: `scale` must satisfy 0 < min <= max <= 1, "
                         f"got {scale}.")
    if not 0.0 < ratio[0] <= ratio[1]:
        raise ValueError(f"random_resized_crop_box: `ratio` must satisfy 0 < min <= max, "
                         f"got {ratio}.")
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int = 224,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """Crop a random box (:func:`random_resized_crop_box`) and resize it to ``size`` x ``size``."""
    image = _check_image(image, "random_resized_crop")
    top, left, h, w = random_resized_crop_box(rng, image.shape[0], image.shape[1], scale, ratio)
    return resize(image[top:top + h, left:left + w], size, size)


def center_crop(image: np.ndarray, size: int = 224, resize_size: int = 256) -> np.ndarray:
    """ImageNet evaluation crop: shorter side to ``resize_size``, then a centered ``size`` crop.

    The longer side is scaled by the same factor (truncated to an int, as
    torchvision's ``Resize``); the crop's offset is ``round((side - size) / 2)``.
    """
    image = _check_image(image, "center_crop")
    new_h, new_w, top, left = center_crop_geometry(image.shape[0], image.shape[1], size,
                                                   resize_size)
    image = resize(image, new_h, new_w)
    return image[top:top + size, left:left + size]


def center_crop_geometry(height: int, width: int, size: int = 224,
                         resize_size: int = 256) -> tuple[int, int, int, int]:
    """Where :func:`center_crop` resizes to and crops: ``(new_h, new_w, top, left)``.

    The shorter side becomes ``resize_size``, the longer one is scaled by the
    same factor and truncated to an int (torchvision's ``Resize``); the crop's
    offsets in the resized image are ``round((new_side - size) / 2)``.

    Raises:
      ValueError: unless ``0 < size <= resize_size``.
    """
    if not 0 < size <= resize_size:
        raise ValueError(f"center_crop: need 0 < `size` <= `resize_size`, got size={size}, "
                         f"resize_size={resize_size}.")
    if height <= width:
        new_h, new_w = resize_size, int(resize_size * width / height)
    else:
        new_h, new_w = int(resize_size * height / width), resize_size
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return new_h, new_w, top, left


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``(image / 255 - mean) / std`` per channel, as float32.

    Args:
      image: ``(H, W, C)`` pixels in the 0..255 scale (uint8 or float).
      mean, std: per-channel constants in the ``[0, 1]`` scale (``DatasetInfo``'s).
    """
    image = _check_image(image, "normalize")
    shapes = np.shape(mean), np.shape(std)
    if shapes != ((image.shape[-1],),) * 2:
        raise ValueError(f"normalize: `mean` and `std` need one value per channel "
                         f"({image.shape[-1]}), got {shapes[0]} and {shapes[1]}.")
    return normalize_batch(image, mean, std)


def normalize_batch(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """:func:`normalize` of any ``(..., C)`` array, unchecked (also whole batches)."""
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    return (images.astype(np.float32) * np.float32(1 / 255) - mean) / std
