"""Static facts about the supported datasets: classes, image shape, normalisation constants.

The per-channel means and standard deviations are fixed, published constants,
in the ``[0, 1]`` pixel scale (a uint8 pixel ``p`` becomes ``p / 255``); they are
never computed at load time, so every run normalises its inputs identically
whatever subset it reads. Sources:

- MNIST: ``(0.1307,) / (0.3081,)``, the constants of PyTorch's MNIST example
  (``pytorch/examples``, ``mnist/main.py``), i.e. the mean and standard deviation
  of all pixels of the 60,000 training images.
- Fashion-MNIST: ``(0.2860,) / (0.3530,)``, the same statistics of its 60,000
  training images, as commonly quoted for the dataset (Xiao et al. 2017); the
  test suite re-derives them from the Debian package's files.
- CIFAR-10: ``(0.49139968, 0.48215841, 0.44653091) / (0.24703223, 0.24348513,
  0.26158784)``, the per-channel statistics of the 50,000 training images as
  used in Cubuk et al.'s AutoAugment / RandAugment CIFAR code, whose setup
  paper 000 (Sequential Normalization) adopts.
- CIFAR-100: ``(0.50707516, 0.48654887, 0.44091784) / (0.26733429, 0.25643846,
  0.27615047)``, the per-channel statistics of its 50,000 training images (the
  values of the widely used ``pytorch-cifar100`` training code).
- ImageNet (ILSVRC-2012): ``(0.485, 0.456, 0.406) / (0.229, 0.224, 0.225)``,
  torchvision's constants, also used by NVIDIA's DeepLearningExamples ResNet-50
  v1.5 recipe (``[123.675, 116.28, 103.53] / [58.395, 57.12, 57.375]`` in the
  0..255 scale) that paper 000 trains its ImageNet models with.
- scikit-learn digits: no published constants exist, so these are the mean and
  standard deviation of all pixels of the 1,797 images of
  ``sklearn.datasets.load_digits`` after this package's conversion of the 0..16
  grey levels to uint8 (``round(v * 255 / 16)``): ``(0.30531,) / (0.37589,)``;
  the test suite re-derives them.
"""

from __future__ import annotations

import dataclasses

__all__ = ["DatasetInfo", "dataset_info", "DATASETS"]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the input pipeline needs to know about a dataset.

    Attributes:
      name: the dataset's name in this package (``"cifar10"``, ...).
      num_classes: number of label classes; labels are ``0 .. num_classes - 1``.
      image_shape: ``(height, width, channels)`` of the images the loader emits
        (for ImageNet the 224x224 crop, not the variable-size stored images).
      mean: per-channel mean of the pixels in the ``[0, 1]`` scale (see the
        module docstring for where each value comes from).
      std: per-channel standard deviation, same scale.
      validation_size: default number of training examples held out by the
        ``"validation"`` / ``"train_minus_val"`` splits.
      default_augment: the augmentation preset the papers train this dataset
        with (see :mod:`seqnorm_jax.data.augment`).
      tfds_name: the TFDS dataset name, or ``None`` when there is none.
      tfds_test_split: the TFDS split that serves as ``"test"`` (ImageNet's
        labelled test set is TFDS's ``"validation"``).
      sources: the local sources able to read it, in the order ``source="auto"``
        tries them.
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    validation_size: int
    default_augment: str
    tfds_name: str | None
    tfds_test_split: str
    sources: tuple[str, ...]


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        name="mnist", num_classes=10, image_shape=(28, 28, 1),
        mean=(0.1307,), std=(0.3081,),
        validation_size=5000, default_augment="none",
        tfds_name="mnist", tfds_test_split="test", sources=("tfds", "idx"),
    ),
    "fashion_mnist": DatasetInfo(
        name="fashion_mnist", num_classes=10, image_shape=(28, 28, 1),
        mean=(0.2860,), std=(0.3530,),
        validation_size=5000, default_augment="none",
        tfds_name="fashion_mnist", tfds_test_split="test", sources=("tfds", "idx"),
    ),
    "cifar10": DatasetInfo(
        name="cifar10", num_classes=10, image_shape=(32, 32, 3),
        mean=(0.49139968, 0.48215841, 0.44653091),
        std=(0.24703223, 0.24348513, 0.26158784),
        validation_size=5000, default_augment="flip_crop",
        tfds_name="cifar10", tfds_test_split="test", sources=("tfds", "cifar"),
    ),
    "cifar100": DatasetInfo(
        name="cifar100", num_classes=100, image_shape=(32, 32, 3),
        mean=(0.50707516, 0.48654887, 0.44091784),
        std=(0.26733429, 0.25643846, 0.27615047),
        validation_size=5000, default_augment="flip_crop",
        tfds_name="cifar100", tfds_test_split="test", sources=("tfds", "cifar"),
    ),
    "imagenet2012": DatasetInfo(
        name="imagenet2012", num_classes=1000, image_shape=(224, 224, 3),
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        validation_size=10000, default_augment="imagenet",
        tfds_name="imagenet2012", tfds_test_split="validation", sources=("tfds",),
    ),
    "digits": DatasetInfo(
        name="digits", num_classes=10, image_shape=(8, 8, 1),
        mean=(0.30531,), std=(0.37589,),
        validation_size=150, default_augment="none",
        tfds_name=None, tfds_test_split="test", sources=("digits",),
    ),
}
"""Every known dataset, by name: its shape, classes, splits and normalization constants."""

_ALIASES = {
    "fashionmnist": "fashion_mnist", "fashion-mnist": "fashion_mnist",
    "cifar-10": "cifar10", "cifar-100": "cifar100",
    "imagenet": "imagenet2012", "ilsvrc2012": "imagenet2012",
    "sklearn_digits": "digits",
}


def canonical_name(name: str) -> str:
    """The dataset's canonical name (``"fashion-mnist"`` -> ``"fashion_mnist"``).

    Raises:
      ValueError: ``name`` is not a supported dataset; the message lists them.
    """
    if not isinstance(name, str):
        raise ValueError(f"dataset name must be a string, got {name!r}.")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}.")
    return key


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name`` (mnist, fashion_mnist, cifar10, cifar100,
    imagenet2012 or digits; a few spellings such as ``"fashion-mnist"`` are accepted).

    Raises:
      ValueError: an unknown dataset name.
    """
    return DATASETS[canonical_name(name)]
