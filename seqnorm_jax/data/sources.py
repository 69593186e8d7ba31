"""Random-access data sources: ``len(src)``, ``src[i]``, ``src.labels``, ``src.info``.

A :class:`Source` returns ``src[i] -> {"image": uint8 (H, W, C), "label": int}``;
``src.labels`` holds all labels (int64) and ``src.info`` the
:class:`~seqnorm_jax.data.info.DatasetInfo`. Sources satisfy Grain's random-access
protocol, so ``grain.MapDataset.source(src)`` reads them directly. Sources of encoded
images hand over the file's bytes instead of an array (TFDS with
``tfds.decode.SkipDecoding``, :class:`ImageFolderSource`: ``root/<class>/<image file>``);
the :class:`~seqnorm_jax.data.Preprocess` presets decode them.
:func:`seqnorm_jax.data.load` (:mod:`seqnorm_jax.data.splits`) opens a dataset's split
as a source.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from seqnorm_jax.data.info import DatasetInfo, dataset_info

__all__ = [
    "ArraySource",
    "DatasetNotFoundError",
    "IMAGE_EXTENSIONS",
    "ImageFolderSource",
    "Source",
    "SubsetSource",
    "TfdsSource",
    "PaddedSource",
    "in_memory_images",
    "in_memory_view",
    "pad_images",
]


class DatasetNotFoundError(FileNotFoundError):
    """No source has the requested dataset; the message lists the ways to get it."""


class Source:
    """A random-access dataset: ``len()``, ``[i] -> {"image", "label"}``, ``labels``, ``info``.

    Subclasses implement ``__len__``, ``_get(i)`` and ``_all_labels()``.
    """

    info: DatasetInfo

    def __len__(self) -> int:
        raise NotImplementedError

    def _get(self, index: int) -> dict:
        raise NotImplementedError

    def _all_labels(self) -> np.ndarray:
        raise NotImplementedError

    def __getitem__(self, index) -> dict:
        """Example ``index`` as ``{"image": uint8 (H, W, C), "label": int}``."""
        n = len(self)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for a source of {n} examples.")
        return self._get(i)

    @property
    def labels(self) -> np.ndarray:
        """All labels, int64 ``(len(self),)`` (read once and cached)."""
        cached = self.__dict__.get("_labels_cache")
        if cached is None:
            cached = np.asarray(self._all_labels(), dtype=np.int64)
            cached.setflags(write=False)
            self.__dict__["_labels_cache"] = cached
        return cached

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.info.name!r}, {len(self)} examples)"


class ArraySource(Source):
    """In-memory images and labels (the IDX, CIFAR and digits readers' results).

    Args:
      images: uint8 ``(N, H, W, C)``.
      labels: integer ``(N,)``.
      info: the dataset's :class:`DatasetInfo`.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, info: DatasetInfo):
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"ArraySource: `images` must be uint8 (N, H, W, C), got "
                             f"{images.dtype} {images.shape}.")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"ArraySource: `labels` must have shape ({images.shape[0]},), got "
                             f"{labels.shape}.")
        self.images = images
        self._labels = labels.astype(np.int64)
        self.info = info

    def __len__(self) -> int:
        return self.images.shape[0]

    def _get(self, index: int) -> dict:
        return {"image": self.images[index], "label": int(self._labels[index])}

    def _all_labels(self) -> np.ndarray:
        return self._labels


class TfdsSource(Source):
    """A ``tfds.data_source`` split, yielding ``{"image": uint8 HWC, "label": int}``.

    Args:
      data_source: what ``tfds.data_source(name, split=...)`` returned.
      info: the dataset's :class:`DatasetInfo`.
    """

    def __init__(self, data_source, info: DatasetInfo):
        self.data_source = data_source
        self.info = info

    def __len__(self) -> int:
        return len(self.data_source)

    def _get(self, index: int) -> dict:
        record = self.data_source[index]
        image = record["image"]
        if not isinstance(image, (bytes, np.bytes_)):  # decoded, not tfds.decode.SkipDecoding
            image = np.asarray(image, dtype=np.uint8)
            if image.ndim == 2:
                image = image[..., None]
        return {"image": image, "label": int(record["label"])}

    def _all_labels(self) -> np.ndarray:
        # Reads (and decodes) every record once; costly for ImageNet's training set.
        n = len(self)
        get_many = getattr(self.data_source, "__getitems__", None)
        out = np.empty(n, dtype=np.int64)
        chunk = 4096
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            records = None
            if get_many is not None:
                try:
                    records = get_many(list(range(start, stop)))
                except TypeError:  # some data sources (TFDS's mocks) lack a working batch read
                    get_many = None
            if records is None:
                records = [self.data_source[i] for i in range(start, stop)]
            out[start:stop] = [int(r["label"]) for r in records]
        return out


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class ImageFolderSource(Source):
    """Encoded image files in one sub-directory per class (``root/<class>/<file>``).

    The layout of ImageNet's extracted training archive. Classes are the
    sub-directory names in sorted order (label ``k`` is the ``k``-th); files
    (extensions in :data:`IMAGE_EXTENSIONS`, any case) are listed in sorted
    order within each class. ``src[i]["image"]`` is the file's bytes, decoded by
    :class:`~seqnorm_jax.data.Preprocess` (the ``"imagenet"`` preset decodes
    JPEGs at reduced size when the crop allows).

    Args:
      root: the directory of class sub-directories.
      info: the dataset's :class:`DatasetInfo` (default ImageNet's); its
        ``num_classes`` must be at least the number of sub-directories.

    Raises:
      ValueError: ``root`` has no class sub-directory with image files, or more
        classes than ``info.num_classes``.
    """

    def __init__(self, root: str | os.PathLike, info: DatasetInfo | None = None):
        self.root = os.fspath(root)
        self.info = dataset_info("imagenet2012") if info is None else info
        if not os.path.isdir(self.root):
            raise ValueError(f"ImageFolderSource: `root` {self.root!r} is not a directory.")
        self.classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
        if len(self.classes) > self.info.num_classes:
            raise ValueError(f"ImageFolderSource: {self.root!r} has {len(self.classes)} class "
                             f"directories but {self.info.name} has {self.info.num_classes} "
                             f"classes; pass the `info` of a dataset with enough classes.")
        paths, labels = [], []
        for label, name in enumerate(self.classes):
            folder = os.path.join(self.root, name)
            files = sorted(f for f in os.listdir(folder)
                           if f.lower().endswith(IMAGE_EXTENSIONS))
            paths += [os.path.join(folder, f) for f in files]
            labels += [label] * len(files)
        if not paths:
            raise ValueError(f"ImageFolderSource: no image files ({', '.join(IMAGE_EXTENSIONS)}) "
                             f"in class sub-directories of {self.root!r}; expected "
                             f"root/<class>/<image>.")
        self.paths = paths
        self._labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def _get(self, index: int) -> dict:
        with open(self.paths[index], "rb") as f:
            return {"image": f.read(), "label": int(self._labels[index])}

    def _all_labels(self) -> np.ndarray:
        return self._labels


class SubsetSource(Source):
    """The examples ``indices`` of ``parent``, in that order."""

    def __init__(self, parent: Source, indices: Sequence[int]):
        indices = np.asarray(indices, dtype=np.int64)
        if indices.ndim != 1:
            raise ValueError(f"SubsetSource: `indices` must be 1-D, got shape {indices.shape}.")
        if indices.size and (indices.min() < 0 or indices.max() >= len(parent)):
            raise ValueError(f"SubsetSource: `indices` must lie in [0, {len(parent)}).")
        self.parent = parent
        self.indices = indices
        self.info = parent.info

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def _get(self, index: int) -> dict:
        return self.parent[int(self.indices[index])]

    def _all_labels(self) -> np.ndarray:
        return self.parent.labels[self.indices]


class PaddedSource(Source):
    """Zero-pads every image of ``parent`` by ``pad`` pixels on each side."""

    def __init__(self, parent: Source, pad: int):
        self.parent = parent
        self.pad = pad
        h, w, c = parent.info.image_shape
        self.info = dataclasses.replace(parent.info, image_shape=(h + 2 * pad, w + 2 * pad, c))

    def __len__(self) -> int:
        return len(self.parent)

    def _get(self, index: int) -> dict:
        ex = self.parent[index]
        return {"image": pad_images(ex["image"], self.pad), "label": ex["label"]}

    def _all_labels(self) -> np.ndarray:
        return self.parent.labels


def in_memory_view(src: Source) -> tuple[ArraySource, np.ndarray | None, int] | None:
    """How a source built on an :class:`ArraySource` maps onto its arrays, or ``None``.

    Returns:
      ``(root, rows, pad)``: ``src[i]`` is example ``rows[i]`` of ``root``
      (``rows`` is ``None`` for all of them in order), zero-padded by ``pad``
      pixels on every side. Lets whole batches be gathered with one fancy index.
    """
    if isinstance(src, ArraySource):
        return src, None, 0
    if isinstance(src, SubsetSource):
        parent = in_memory_view(src.parent)
        if parent is None:
            return None
        root, rows, pad = parent  # padding commutes with picking examples
        return root, src.indices if rows is None else rows[src.indices], pad
    if isinstance(src, PaddedSource):
        parent = in_memory_view(src.parent)
        return None if parent is None else (parent[0], parent[1], parent[2] + src.pad)
    return None


def pad_images(images: np.ndarray, pad: int) -> np.ndarray:
    """Zero-pad ``(..., H, W, C)`` images by ``pad`` pixels on each side of H and W."""
    if not pad:
        return images
    widths = [(0, 0)] * (images.ndim - 3) + [(pad, pad), (pad, pad), (0, 0)]
    return np.pad(images, widths)


def in_memory_images(src: Source) -> np.ndarray | None:
    """The images of a source built on an :class:`ArraySource`, without a per-example loop."""
    view = in_memory_view(src)
    if view is None:
        return None
    root, rows, pad = view
    return pad_images(root.images if rows is None else root.images[rows], pad)


