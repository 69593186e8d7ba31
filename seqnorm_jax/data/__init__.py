"""Input pipelines: datasets, NumPy augmentation and Grain batching.

Datasets come from TFDS (``tfds.data_source``, no TensorFlow), IDX files, CIFAR
pickles or scikit-learn's digits.

Typical use::

    from seqnorm_jax import data

    train = data.load("cifar10", "train_minus_val", data_dir="~/data")   # 45k, stratified
    for epoch in range(epochs):
        for batch in data.make_loader(train, batch_size=128, train=True, seed=0, epoch=epoch,
                                      augment="flip_crop"):
            ...  # batch["image"]: float32 (128, 32, 32, 3), batch["label"]: int32 (128,)

ImageNet from JPEG bytes, with uint8 batches normalised on the device::

    train = data.load("imagenet2012", "train", decode=False)   # or data.ImageFolderSource(dir)
    loader = data.make_loader(train, batch_size=256, train=True, epoch=epoch,
                              augment="imagenet", normalize=False)   # workers: one per core
    for batch in data.prefetch_to_device(loader, size=2, sharding=sharding):
        ...  # in the jitted step: x = data.normalize_on_device(batch["image"], mean, std)

Modules: :mod:`~seqnorm_jax.data.info` (dataset facts and normalisation
constants), :mod:`~seqnorm_jax.data.readers` (file readers),
:mod:`~seqnorm_jax.data.splits` (:func:`load`, splits) and
:mod:`~seqnorm_jax.data.sources` (the sources, image folders),
:mod:`~seqnorm_jax.data.augment` (NumPy augmentations and presets),
:mod:`~seqnorm_jax.data.imagenet` (Pillow decoding, cropping and resizing),
:mod:`~seqnorm_jax.data.loader` (:func:`make_loader`, sharding, non-i.i.d. batches, workers),
:mod:`~seqnorm_jax.data.device` (device prefetch and normalisation).
"""

from seqnorm_jax._extras import require_train

require_train("seqnorm_jax.data")

from seqnorm_jax.data.augment import (
    PRESETS,
    center_crop,
    center_crop_geometry,
    cutout,
    normalize,
    pad_and_crop,
    random_flip,
    random_resized_crop,
    random_resized_crop_box,
    resize,
)
from seqnorm_jax.data.preprocess import Preprocess
from seqnorm_jax.data.device import normalize_on_device, prefetch_to_device
from seqnorm_jax.data.imagenet import decode_image, random_resized_crop_flip, resize_center_crop
from seqnorm_jax.data.info import DATASETS, DatasetInfo, dataset_info
from seqnorm_jax.data.loader import (
    Loader,
    available_cpus,
    make_loader,
    non_iid_indices,
    steps_per_epoch,
)
from seqnorm_jax.data.readers import read_cifar_split, read_digits_split, read_idx, read_idx_split
from seqnorm_jax.data.sources import (
    ArraySource,
    DatasetNotFoundError,
    ImageFolderSource,
    Source,
    SubsetSource,
    TfdsSource,
)
from seqnorm_jax.data.splits import load, load_arrays, parse_split, stratified_holdout

__all__ = [
    "DATASETS",
    "PRESETS",
    "ArraySource",
    "DatasetInfo",
    "DatasetNotFoundError",
    "ImageFolderSource",
    "Loader",
    "Preprocess",
    "Source",
    "SubsetSource",
    "TfdsSource",
    "available_cpus",
    "center_crop",
    "center_crop_geometry",
    "cutout",
    "dataset_info",
    "decode_image",
    "load",
    "load_arrays",
    "make_loader",
    "non_iid_indices",
    "normalize",
    "normalize_on_device",
    "pad_and_crop",
    "parse_split",
    "prefetch_to_device",
    "random_flip",
    "random_resized_crop",
    "random_resized_crop_box",
    "random_resized_crop_flip",
    "read_cifar_split",
    "read_digits_split",
    "read_idx",
    "read_idx_split",
    "resize",
    "resize_center_crop",
    "steps_per_epoch",
    "stratified_holdout",
]
