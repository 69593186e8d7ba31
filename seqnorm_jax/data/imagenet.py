"""ImageNet preprocessing with Pillow: decode, crop and resize in one step, uint8 out.

The two functions here are what the ``"imagenet"`` preset of
:class:`~seqnorm_jax.data.Preprocess` runs. Each takes either the encoded
bytes of an image (JPEG, PNG, ... as stored by ImageNet's archives, by
``tfds.data_source(..., decoders={"image": tfds.decode.SkipDecoding()})`` or
by an image folder, see :class:`~seqnorm_jax.data.ImageFolderSource`) or an
already decoded uint8 ``(H, W, C)`` array, and returns a uint8 ``(size, size,
channels)`` array. Normalisation is left to the device
(:func:`~seqnorm_jax.data.normalize_on_device`), so a batch crosses to the
accelerator as uint8, a quarter of the bytes of float32.

Geometry. The crop boxes are exactly those of the NumPy reference functions in
:mod:`~seqnorm_jax.data.augment`: :func:`random_resized_crop_flip` draws its
box with :func:`~seqnorm_jax.data.augment.random_resized_crop_box` and then
its flip with one ``rng.random() < 0.5``, the same draws in the same order as
``random_flip(random_resized_crop(image, rng), rng)``; :func:`resize_center_crop`
uses :func:`~seqnorm_jax.data.augment.center_crop_geometry`.

Resampling, and how it differs from the NumPy reference:

- The crop is resized with Pillow's ``BILINEAR`` filter, antialiased (its
  support widens with the shrink factor), directly from the crop box
  (``Image.resize(size, BILINEAR, box=...)``): one pass, without materialising
  the crop or the resized full image. Pillow computes it in 8-bit fixed point
  with an intermediate rounding to uint8 between the horizontal and the
  vertical pass, so against :func:`~seqnorm_jax.data.augment.resize` (float,
  rounded once) pixels differ by at most a few levels of 255.
- Evaluation: resizing the whole image so that its shorter side is
  ``resize_size`` and cropping the center equals resizing the center box alone
  (Pillow clips the filter at the image border, not at the box), up to the
  rounding of the box's float coordinates.
- Reduced-size decoding: when the image is a JPEG and the crop spans at least
  ``2 * size`` source pixels in both directions (training) or the image is at
  least twice the resized size (evaluation), the JPEG is decoded at 1/2, 1/4
  or 1/8 scale in the DCT domain (``Image.draft``), the largest reduction that
  still leaves at least ``size`` pixels across the crop (respectively the
  resized size), and the remaining shrink is done by the resize. Only encoded
  input can use it; a decoded array is always resampled at full resolution.
  The result is a slightly different (also antialiased) low-pass filter, so
  bytes and array inputs agree exactly when no reduction applies and within a
  few levels of 255 (mean absolute difference) when it does.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from seqnorm_jax import checks
from seqnorm_jax.data.augment import (check_rng, center_crop_geometry,
                                      random_resized_crop_box)

__all__ = ["decode_image", "random_resized_crop_flip", "resize_center_crop"]

_MODES = {1: "L", 3: "RGB"}


def _check_channels(channels, fn: str) -> str:
    if channels not in _MODES:
        raise ValueError(f"{fn}: `channels` must be 1 (grey) or 3 (RGB), got {channels!r}.")
    return _MODES[channels]


def _open(image, fn: str) -> tuple[Image.Image, bool]:
    """A lazy Pillow image of ``image`` (bytes or uint8 HWC) and whether it is still encoded."""
    if isinstance(image, (bytes, bytearray, memoryview, np.bytes_)):
        try:
            return Image.open(io.BytesIO(bytes(image))), True
        except Exception as e:  # noqa: BLE001 -- Pillow raises several types for bad data
            raise ValueError(f"{fn}: `image` holds {len(image)} bytes that Pillow cannot "
                             f"identify as an image ({e}); pass encoded JPEG/PNG bytes or a "
                             f"uint8 (height, width, channels) array.") from e
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] not in (1, 3):
        raise ValueError(f"{fn}: `image` must be encoded image bytes or a uint8 (height, width, "
                         f"1 or 3) array, got {array.dtype} of shape {array.shape}.")
    pil = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    return pil, False


def _to_array(pil: Image.Image, mode: str) -> np.ndarray:
    if pil.mode != mode:
        pil = pil.convert(mode)
    out = np.array(pil)  # writable, as the NumPy augmentations' results
    return out[..., None] if out.ndim == 2 else out


def _draft(pil: Image.Image, mode: str, need_w: float, need_h: float) -> float:
    """Decode ``pil`` (a lazy JPEG) at the largest DCT reduction leaving ``need`` pixels.

    Returns the factor from full-resolution to decoded coordinates (1 when
    nothing is reduced, e.g. for a PNG).
    """
    full_w, full_h = pil.size
    request = (max(1, math.ceil(need_w)), max(1, math.ceil(need_h)))
    if full_w // request[0] < 2 or full_h // request[1] < 2:
        return 1.0
    drafted = pil.draft(mode, request)
    if drafted is None:
        return 1.0
    return drafted[1][2] / full_w


def decode_image(image, channels: int = 3) -> np.ndarray:
    """Decode encoded image bytes to a uint8 ``(H, W, channels)`` array (arrays pass through).

    Grey, palette and CMYK images are converted to ``channels`` (1: ``"L"``,
    3: ``"RGB"``), as some ImageNet JPEGs need.
    """
    mode = _check_channels(channels, "decode_image")
    pil, encoded = _open(image, "decode_image")
    if not encoded and np.asarray(image).shape[-1] == channels:
        return np.asarray(image)
    return _to_array(pil, mode)


def random_resized_crop_flip(image, rng: np.random.Generator, size: int = 224,
                             scale: tuple[float, float] = (0.08, 1.0),
                             ratio: tuple[float, float] = (3 / 4, 4 / 3),
                             channels: int = 3) -> np.ndarray:
    """Inception crop of ``image`` resized to ``size`` x ``size``, flipped with probability 1/2.

    Args:
      image: encoded image bytes, or a uint8 ``(H, W, C)`` array.
      rng: draws the crop box
        (:func:`~seqnorm_jax.data.augment.random_resized_crop_box`), then the flip.
      size: output side.
      scale, ratio: the box's area fraction and aspect-ratio (width / height) ranges.
      channels: 3 (RGB) or 1 (grey) in the output.

    Returns:
      uint8 ``(size, size, channels)``. See the module docstring for the
      resampling (Pillow ``BILINEAR``, reduced-size JPEG decoding when the crop
      allows).
    """
    mode = _check_channels(channels, "random_resized_crop_flip")
    check_rng(rng, "random_resized_crop_flip")
    checks.positive_int(size, "`size`", "random_resized_crop_flip")
    pil, encoded = _open(image, "random_resized_crop_flip")
    width, height = pil.size
    top, left, h, w = random_resized_crop_box(rng, height, width, scale, ratio)
    flip = rng.random() < 0.5
    factor = _draft(pil, mode, width * size / w, height * size / h) if encoded else 1.0
    if pil.mode != mode:
        pil = pil.convert(mode)
    box = (left * factor, top * factor, (left + w) * factor, (top + h) * factor)
    out = pil.resize((size, size), Image.Resampling.BILINEAR, box=box)
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _to_array(out, mode)


def resize_center_crop(image, size: int = 224, resize_size: int = 256,
                       channels: int = 3) -> np.ndarray:
    """ImageNet evaluation crop: shorter side to ``resize_size``, center ``size`` x ``size``.

    The same geometry as :func:`~seqnorm_jax.data.augment.center_crop`
    (:func:`~seqnorm_jax.data.augment.center_crop_geometry`), computed as one
    Pillow ``BILINEAR`` resize of the center box (see the module docstring).

    Args:
      image: encoded image bytes, or a uint8 ``(H, W, C)`` array.
      size, resize_size: crop side and shorter side after resizing, ``0 < size <=
        resize_size``.
      channels: 3 (RGB) or 1 (grey) in the output.

    Returns:
      uint8 ``(size, size, channels)``.
    """
    mode = _check_channels(channels, "resize_center_crop")
    pil, encoded = _open(image, "resize_center_crop")
    width, height = pil.size
    new_h, new_w, top, left = center_crop_geometry(height, width, size, resize_size)
    factor = _draft(pil, mode, new_w, new_h) if encoded else 1.0
    if pil.mode != mode:
        pil = pil.convert(mode)
    sx, sy = width / new_w * factor, height / new_h * factor
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    out = pil.resize((size, size), Image.Resampling.BILINEAR, box=box)
    return _to_array(out, mode)
