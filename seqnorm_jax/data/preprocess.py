"""One example's preprocessing for the input pipeline: decode, augment, normalise.

:class:`Preprocess` runs a preset of :mod:`seqnorm_jax.data.augment` (NumPy) or,
for ImageNet, of :mod:`seqnorm_jax.data.imagenet` (Pillow), on one example or, for
presets without per-example work, on a whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from seqnorm_jax.data import imagenet
from seqnorm_jax.data.augment import (PRESETS, cutout, normalize_batch, pad_and_crop,
                                      random_flip)

__all__ = ["Preprocess"]


class Preprocess:
    """One example's preprocessing: a preset's augmentation, then normalisation.

    A picklable callable (so Grain worker processes can run it):
    ``fn(example, rng)`` in training (random augmentation), ``fn(example)`` in
    evaluation. ``example`` is ``{"image": ..., "label": int}`` where the image
    is a uint8 ``(H, W, C)`` (or ``(H, W)``) array or the encoded bytes of one
    (JPEG, PNG, ...); the result is ``{"image": float32 HWC, "label": np.int32}``,
    or a uint8 image with ``normalize=False``.

    The ``"imagenet"`` preset runs :func:`~seqnorm_jax.data.imagenet.random_resized_crop_flip`
    (training) or :func:`~seqnorm_jax.data.imagenet.resize_center_crop`
    (evaluation): Pillow decoding (reduced-size for JPEG bytes when the crop
    allows), crop and resize in one step. Their crop boxes are those of
    :func:`random_resized_crop` / :func:`center_crop`; the pixels differ from
    those NumPy references by Pillow's resampling (see
    :mod:`seqnorm_jax.data.imagenet`). Other presets decode bytes in full first.

    Args:
      preset: one of :data:`PRESETS`.
      mean, std: per-channel normalisation constants (``[0, 1]`` scale).
      image_shape: the ``(H, W, C)`` every output image must have; a mismatch
        (e.g. variable-size ImageNet images without the ``"imagenet"`` preset)
        raises a clear error instead of failing later in batching.
      train: random augmentation (True) or the deterministic evaluation path.
      pad: pad-and-crop padding (``"flip_crop"``, ``"flip_crop_cutout"``).
      pad_mode: ``"zero"`` or ``"reflect"``.
      cutout_size: Cutout square side (``"flip_crop_cutout"``).
      crop_size, resize_size: ImageNet crop and evaluation resize sizes.
      normalize: normalise on the host (float32 out), or hand over uint8 images
        to normalise on the device with :func:`~seqnorm_jax.data.normalize_on_device`.
        Cutout then fills its square with the mean colour rounded to uint8
        (``round(255 * mean)``), which normalises to within ``0.5 / (255 * std)``
        of the exact 0 (under 0.01 for the supported datasets).
    """

    def __init__(self, preset: str, mean: Sequence[float], std: Sequence[float],
                 image_shape: Sequence[int], *, train: bool, pad: int = 4,
                 pad_mode: str = "zero", cutout_size: int = 16, crop_size: int = 224,
                 resize_size: int = 256, normalize: bool = True):
        if preset not in PRESETS:
            raise ValueError(f"unknown augmentation preset {preset!r}; choose one of {PRESETS}.")
        self.preset = preset
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.image_shape = tuple(int(d) for d in image_shape)
        if len(self.image_shape) != 3 or len(self.mean) != self.image_shape[-1] \
                or len(self.std) != self.image_shape[-1]:
            raise ValueError(f"Preprocess: `image_shape` must be (H, W, C) and `mean`/`std` "
                             f"need C values each, got image_shape={self.image_shape}, "
                             f"{len(self.mean)} means and {len(self.std)} stds.")
        self.train = bool(train)
        self.pad = pad
        self.pad_mode = pad_mode
        self.cutout_size = cutout_size
        self.crop_size = crop_size
        self.resize_size = resize_size
        self.normalize = bool(normalize)
        # float32 constants made once: augment.normalize re-checks them on every image
        self._mean_std = (np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32))

    def __repr__(self) -> str:
        return (f"Preprocess(preset={self.preset!r}, train={self.train}, "
                f"normalize={self.normalize})")

    @property
    def per_example(self) -> bool:
        """Whether examples need individual work (random augmentation, decoding, cropping).

        When False, :meth:`batch` transforms a whole stacked batch at once.
        """
        return self.preset == "imagenet" or (self.train and self.preset != "none")

    def __call__(self, example: dict, rng: np.random.Generator | None = None) -> dict:
        image = example["image"]
        channels = self.image_shape[-1]
        encoded = isinstance(image, (bytes, bytearray, memoryview, np.bytes_))
        if encoded:
            if self.preset != "imagenet":
                image = imagenet.decode_image(image, channels)
        else:
            image = np.asarray(image)
            if image.ndim == 2:
                image = image[..., None]
        if self.train and self.preset != "none" and rng is None:
            raise ValueError(f"Preprocess(preset={self.preset!r}, train=True) needs an `rng`.")
        if self.preset == "imagenet":
            if self.train:
                image = imagenet.random_resized_crop_flip(image, rng, self.crop_size,
                                                          channels=channels)
            else:
                image = imagenet.resize_center_crop(image, self.crop_size, self.resize_size,
                                                    channels=channels)
        elif self.train and self.preset in ("flip_crop", "flip_crop_cutout"):
            image = random_flip(pad_and_crop(image, rng, self.pad, self.pad_mode), rng)
        self._check_shape(image.shape, "an image")
        if self.normalize:  # the shape and the constants are checked already
            image = normalize_batch(image, *self._mean_std)
            fill = 0.0
        else:
            fill = np.rint(np.asarray(self.mean) * 255).astype(np.uint8)
        if self.train and self.preset == "flip_crop_cutout":
            image = cutout(image, rng, self.cutout_size, fill=fill)
        return {"image": image, "label": np.int32(example["label"])}

    def batch(self, images: np.ndarray, labels: np.ndarray) -> dict:
        """The evaluation transform of a whole batch (presets without per-example work).

        Args:
          images: uint8 ``(B, H, W, C)``.
          labels: integer ``(B,)``.

        Returns:
          ``{"image", "label"}`` equal to stacking :meth:`__call__`'s results.

        Raises:
          ValueError: this preset needs per-example work (:attr:`per_example`), or
            the images do not have ``image_shape``.
        """
        if self.per_example:
            raise ValueError(f"Preprocess(preset={self.preset!r}, train={self.train}) works "
                             f"example by example; call it on each example instead of "
                             f"Preprocess.batch.")
        self._check_shape(images.shape[1:], "images")
        if self.normalize:
            images = normalize_batch(images, *self._mean_std)
        return {"image": images, "label": np.asarray(labels, dtype=np.int32)}

    def _check_shape(self, shape: tuple[int, ...], what: str) -> None:
        if shape != self.image_shape:
            raise ValueError(
                f"{what} of shape {shape} reached batching, expected {self.image_shape}; "
                f"variable-size images (ImageNet) need augment='imagenet', which crops them "
                f"to {self.image_shape[:2]}.")
