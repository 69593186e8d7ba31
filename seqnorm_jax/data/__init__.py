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

Modules: :mod:`~seqnorm_jax.data.info` (dataset facts and normalisation
constants), :mod:`~seqnorm_jax.data.readers` (file readers),
:mod:`~seqnorm_jax.data.sources` (:func:`load`, splits),
:mod:`~seqnorm_jax.data.augment` (NumPy augmentations and presets),
:mod:`~seqnorm_jax.data.loader` (:func:`make_loader`, sharding, non-i.i.d. batches).
"""

from seqnorm_jax.data.augment import (
    PRESETS,
    Preprocess,
    center_crop,
    cutout,
    normalize,
    pad_and_crop,
    random_flip,
    random_resized_crop,
    random_resized_crop_box,
    resize,
)
from seqnorm_jax.data.info import DATASETS, DatasetInfo, dataset_info
from seqnorm_jax.data.loader import Loader, make_loader, non_iid_indices, steps_per_epoch
from seqnorm_jax.data.readers import read_cifar_split, read_digits_split, read_idx, read_idx_split
from seqnorm_jax.data.sources import (
    ArraySource,
    DatasetNotFoundError,
    Source,
    SubsetSource,
    TfdsSource,
    load,
    load_arrays,
    parse_split,
    stratified_holdout,
)

__all__ = [
    "DATASETS",
    "PRESETS",
    "ArraySource",
    "DatasetInfo",
    "DatasetNotFoundError",
    "Loader",
    "Preprocess",
    "Source",
    "SubsetSource",
    "TfdsSource",
    "center_crop",
    "cutout",
    "dataset_info",
    "load",
    "load_arrays",
    "make_loader",
    "non_iid_indices",
    "normalize",
    "pad_and_crop",
    "parse_split",
    "random_flip",
    "random_resized_crop",
    "random_resized_crop_box",
    "read_cifar_split",
    "read_digits_split",
    "read_idx",
    "read_idx_split",
    "resize",
    "steps_per_epoch",
    "stratified_holdout",
]
