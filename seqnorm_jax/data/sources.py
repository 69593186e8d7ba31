"""Random-access data sources: TFDS ``data_source`` (no TensorFlow), IDX, CIFAR pickles, digits.

:func:`load` returns a :class:`Source`: ``len(src)``, ``src[i] -> {"image": uint8
(H, W, C), "label": int}``, ``src.labels`` (all labels, int64) and ``src.info``
(:class:`~seqnorm_jax.data.info.DatasetInfo`). Sources satisfy Grain's
random-access protocol, so ``grain.MapDataset.source(src)`` reads them directly.
Sources of encoded images hand over the file's bytes instead of an array:
``load(..., decode=False)`` (TFDS with ``tfds.decode.SkipDecoding``) and
:class:`ImageFolderSource` (``root/<class>/<image file>``); the
:class:`~seqnorm_jax.data.Preprocess` presets decode them.

Splits
------
``split`` is ``BASE`` or ``BASE[START:STOP]``:

- ``"train"``, ``"test"``: the dataset's own splits (ImageNet's ``"test"`` is the
  official ILSVRC-2012 validation set, TFDS's ``"validation"``; digits' are
  this package's fixed stratified rule, see :func:`~seqnorm_jax.data.readers.read_digits_split`).
- ``"validation"`` and ``"train_minus_val"``: a stratified hold-out of the
  training split and its complement, as the papers make theirs (papers 000/001:
  CIFAR-10/100 as 45,000 train / 5,000 validation "randomly stratified from the
  training set"). ``validation_size`` examples (default
  ``DatasetInfo.validation_size``: 5,000 for MNIST, Fashion-MNIST and CIFAR,
  10,000 for ImageNet, 150 for digits) are split over the classes in
  proportion to their counts (largest remainders, ties to the lower class
  id), and each class's share is drawn uniformly without replacement with
  ``np.random.default_rng(seed)``, class by class in increasing class order.
  Both splits list their examples in increasing index order, are disjoint,
  cover the training split, and depend only on ``(dataset, validation_size,
  seed)``. Paper 002 holds out 10,000 CIFAR-100 images instead:
  ``validation_size=10000``. The hold-out needs every training label: from
  TFDS that reads each training record once (minutes for ImageNet).
- ``[START:STOP]`` keeps a sub-range of the chosen split's examples, with
  Python slice semantics (``"train[:10000]"``, ``"test[-500:]"``) or
  percentages (``"train[:10%]"``, rounded to the nearest example); it applies
  after the validation hold-out (``"train_minus_val[:1000]"``).

Sources
-------
``"tfds"``: ``tfds.data_source(name, split=..., data_dir=...)`` over an already
prepared dataset in the ``array_record`` format; it never downloads.
``"idx"``: MNIST-format IDX files (``train-images-idx3-ubyte[.gz]`` ...) in
``data_dir``, or in ``/usr/share/datasets/fashion-mnist/`` (Debian's
``dataset-fashion-mnist``) for Fashion-MNIST. ``"cifar"``: the python pickles of
``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``, extracted in
``data_dir``. ``"digits"``: scikit-learn's ``load_digits``. ``"auto"`` tries
the dataset's sources in the order of ``DatasetInfo.sources`` and raises
:class:`DatasetNotFoundError`, listing every way to get the data, when none has it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence

import numpy as np

from seqnorm_jax.data import readers
from seqnorm_jax.data.info import DatasetInfo, dataset_info

__all__ = [
    "ArraySource",
    "DatasetNotFoundError",
    "IMAGE_EXTENSIONS",
    "ImageFolderSource",
    "Source",
    "SubsetSource",
    "TfdsSource",
    "load",
    "load_arrays",
    "parse_split",
    "stratified_holdout",
    "DEFAULT_IDX_DIRS",
    "in_memory_view",
    "pad_images",
]

SPLITS = ("train", "test", "validation", "train_minus_val")
SOURCES = ("auto", "tfds", "idx", "cifar", "digits")

# Where the IDX reader looks when `data_dir` is not given.
DEFAULT_IDX_DIRS = {"fashion_mnist": ("/usr/share/datasets/fashion-mnist",)}
_SUBDIRS = {"mnist": ("mnist", "MNIST"),
            "fashion_mnist": ("fashion-mnist", "fashion_mnist", "FashionMNIST")}


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


class _PaddedSource(Source):
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


_SPLIT_RE = re.compile(r"^\s*(\w+)\s*(?:\[\s*([^:\]]*)\s*:\s*([^\]]*)\s*\])?\s*$")


def parse_split(split: str) -> tuple[str, str | None, str | None]:
    """``"train[:10%]"`` -> ``("train", None, "10%")``; validates the base name.

    Raises:
      ValueError: a malformed string or an unknown base split.
    """
    m = _SPLIT_RE.match(split) if isinstance(split, str) else None
    if m is None:
        raise ValueError(f"malformed split {split!r}; expected NAME or NAME[START:STOP] with "
                         f"NAME in {SPLITS}, e.g. 'train[:10000]' or 'test[:10%]'.")
    base, start, stop = m.group(1), m.group(2), m.group(3)
    if base not in SPLITS:
        raise ValueError(f"unknown split {base!r} in {split!r}; choose one of {SPLITS} "
                         f"(optionally with [START:STOP]).")
    return base, (start.strip() or None) if start is not None else None, (
        (stop.strip() or None) if stop is not None else None)


def _bound(text: str | None, n: int, split: str) -> int | None:
    if text is None:
        return None
    try:
        if text.endswith("%"):
            return int(round(float(text[:-1]) * n / 100.0))
        return int(text)
    except ValueError:
        raise ValueError(f"malformed slice bound {text!r} in split {split!r}; use an int or a "
                         f"percentage like '10%'.") from None


def stratified_holdout(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of a stratified random hold-out of ``size`` examples.

    Class ``c`` (with ``n_c`` of the ``N`` examples) gets ``floor(size * n_c / N)``
    examples plus one for the classes with the largest remainders (ties to the
    lower class id) until ``size`` is reached; each class's examples are drawn
    uniformly without replacement by ``np.random.default_rng(seed)``, class by
    class in increasing class order.

    Raises:
      ValueError: ``size`` not in ``[1, N - 1]``.
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    if not isinstance(size, (int, np.integer)) or not 0 < size < n:
        raise ValueError(f"validation_size must be an int in [1, {n - 1}] for a training split "
                         f"of {n} examples, got {size!r}.")
    classes, counts = np.unique(labels, return_counts=True)
    exact = size * counts / n
    quota = np.floor(exact).astype(np.int64)
    remainder = exact - quota
    order = np.lexsort((classes, -remainder))  # largest remainder first, then lower class id
    quota[order[: size - int(quota.sum())]] += 1
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(labels == c), size=int(q), replace=False)
              for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(picked))


# --------------------------------------------------------------------------- readers


def _tfds_source(info: DatasetInfo, base: str, data_dir,
                 decode: bool = True) -> tuple[Source | None, str]:
    """(source, "") or (None, why not)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        return None, f"tensorflow-datasets is not importable ({e})"
    split = info.tfds_test_split if base == "test" else "train"
    decoders = None if decode else {"image": tfds.decode.SkipDecoding()}
    try:
        ds = tfds.data_source(info.tfds_name, split=split, data_dir=data_dir, download=False,
                              decoders=decoders)
    except Exception as e:  # noqa: BLE001 -- TFDS raises many types for "not prepared"
        where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        try:
            prepared = tfds.builder(info.tfds_name, data_dir=data_dir).is_prepared()
        except Exception:  # noqa: BLE001
            prepared = None
        if prepared is False:
            reason = f"not prepared in {where}"
        elif prepared:
            reason = (f"prepared in {where} but not readable by tfds.data_source ({reason}); "
                      f"rebuild with --file_format=array_record")
        return None, reason
    return TfdsSource(ds, info), ""


def _idx_dirs(info: DatasetInfo, data_dir) -> list[str]:
    roots = [os.fspath(data_dir)] if data_dir is not None else list(
        DEFAULT_IDX_DIRS.get(info.name, ()))
    dirs = []
    for root in roots:
        dirs.append(root)
        dirs += [os.path.join(root, s) for s in _SUBDIRS.get(info.name, ())]
    return dirs


def _idx_source(info: DatasetInfo, base: str, data_dir) -> tuple[Source | None, str]:
    dirs = _idx_dirs(info, data_dir)
    if not dirs:
        return None, "no data_dir given (IDX files have no default location for this dataset)"
    split = "test" if base == "test" else "train"
    for d in dirs:
        if readers.find_idx_files(d, split) is not None:
            images, labels = readers.read_idx_split(d, split)
            return ArraySource(images, labels, info), ""
    stems = readers.IDX_FILE_NAMES[split]
    return None, f"no {stems[0]}[.gz] / {stems[1]}[.gz] in {', '.join(dirs)}"


def _cifar_source(info: DatasetInfo, base: str, data_dir) -> tuple[Source | None, str]:
    if data_dir is None:
        return None, "no data_dir given (CIFAR pickles have no default location)"
    d = readers.find_cifar_dir(data_dir, info.name)
    if d is None:
        sub = "cifar-10-batches-py" if info.name == "cifar10" else "cifar-100-python"
        return None, f"no {sub} pickles in {os.fspath(data_dir)}"
    images, labels = readers.read_cifar_split(d, info.name, "test" if base == "test" else "train")
    return ArraySource(images, labels, info), ""


def _digits_source(info: DatasetInfo, base: str, data_dir) -> tuple[Source | None, str]:
    try:
        images, labels = readers.read_digits_split("test" if base == "test" else "train")
    except ImportError as e:
        return None, f"scikit-learn is not importable ({e})"
    return ArraySource(images, labels, info), ""


_READERS = {"tfds": _tfds_source, "idx": _idx_source, "cifar": _cifar_source,
            "digits": _digits_source}


def _how_to_get(info: DatasetInfo) -> list[str]:
    name = info.name
    ways = []
    if name == "fashion_mnist":
        ways.append("Debian/Ubuntu: `sudo apt-get install dataset-fashion-mnist` installs the IDX "
                    "files in /usr/share/datasets/fashion-mnist/ (read with source='idx').")
    if info.tfds_name is not None:
        manual = (" (ImageNet also needs the ILSVRC-2012 archives downloaded by hand: add "
                  "`--manual_dir=DIR`)" if name == "imagenet2012" else "")
        ways.append(f"TFDS: `pip install \"seqnorm-jax[download]\"` (adds TensorFlow), then "
                    f"`tfds build {info.tfds_name} --file_format=array_record "
                    f"[--data_dir=DIR]`{manual}; pass data_dir=DIR if not the default "
                    f"~/tensorflow_datasets.")
    if "idx" in info.sources:
        ways.append("Point data_dir at a directory holding the IDX files train-images-idx3-ubyte, "
                    "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte "
                    "(raw or .gz).")
    if "cifar" in info.sources:
        archive = "cifar-10-python.tar.gz" if name == "cifar10" else "cifar-100-python.tar.gz"
        ways.append(f"Point data_dir at the extracted {archive} from "
                    f"https://www.cs.toronto.edu/~kriz/cifar.html (source='cifar').")
    if "digits" in info.sources:
        ways.append("`pip install scikit-learn` (its load_digits data ships with the package).")
    return ways


def _open(info: DatasetInfo, base: str, data_dir, source: str, decode: bool = True) -> Source:
    if source != "auto" and source not in info.sources:
        raise ValueError(f"source {source!r} cannot read {info.name}; its sources are "
                         f"{info.sources} (or 'auto').")
    tried = info.sources if source == "auto" else (source,)
    reasons = []
    for s in tried:
        src, why = (_tfds_source(info, base, data_dir, decode) if s == "tfds"
                    else _READERS[s](info, base, data_dir))
        if src is not None:
            return src
        reasons.append(f"  - {s}: {why}")
    ways = "\n".join(f"  {i}. {w}" for i, w in enumerate(_how_to_get(info), 1))
    raise DatasetNotFoundError(
        f"dataset {info.name!r} not found (source={source!r}, data_dir={data_dir!r}).\n"
        f"Tried:\n" + "\n".join(reasons) + f"\nWays to get it:\n{ways}")


def load(name: str, split: str, *, data_dir: str | os.PathLike | None = None,
         source: str = "auto", validation_size: int | None = None, seed: int = 0,
         pad: int = 0, decode: bool = True) -> Source:
    """Open a split of a dataset as a random-access :class:`Source`.

    Args:
      name: ``"mnist"``, ``"fashion_mnist"``, ``"cifar10"``, ``"cifar100"``,
        ``"imagenet2012"`` or ``"digits"``.
      split: ``"train"``, ``"test"``, ``"validation"`` or ``"train_minus_val"``,
        optionally sliced: ``"train[:10000]"``, ``"test[:10%]"`` (see the module
        docstring for the rules).
      data_dir: TFDS data directory, or the directory of the IDX / CIFAR files.
      source: ``"auto"``, ``"tfds"``, ``"idx"``, ``"cifar"`` or ``"digits"``.
      validation_size: examples held out by ``"validation"`` /
        ``"train_minus_val"``; default ``DatasetInfo.validation_size``.
      seed: seed of the validation hold-out (nothing else).
      pad: zero pixels added on every side of every image (e.g. ``pad=4`` turns
        digits' 8x8 into 16x16); ``src.info.image_shape`` includes it.
      decode: ``False`` leaves TFDS images encoded (``tfds.decode.SkipDecoding``):
        ``src[i]["image"]`` is then the stored JPEG/PNG bytes, which the
        ``"imagenet"`` preset decodes at reduced size when its crop allows (the
        fast way to read ImageNet). Sources other than TFDS always decode.

    Returns:
      A :class:`Source`; ``src[i]`` is ``{"image": uint8 (H, W, C), "label": int}``.

    Raises:
      DatasetNotFoundError: no source has the dataset (the message lists the
        ways to get it).
      ValueError: an unknown name, split or source, or a bad argument.
    """
    info = dataset_info(name)
    base, start, stop = parse_split(split)
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; choose one of {SOURCES}.")
    if not isinstance(pad, (int, np.integer)) or pad < 0:
        raise ValueError(f"pad must be a non-negative int, got {pad!r}.")
    if not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int, got {seed!r}.")
    if validation_size is not None and base not in ("validation", "train_minus_val"):
        raise ValueError(f"validation_size applies to the 'validation' and 'train_minus_val' "
                         f"splits, not {base!r}; drop it or pick one of those splits.")
    if pad and not decode:
        raise ValueError("pad needs decoded images; drop pad or leave decode=True.")
    src = _open(info, base, data_dir, source, bool(decode))
    if base in ("validation", "train_minus_val"):
        size = info.validation_size if validation_size is None else validation_size
        held = stratified_holdout(src.labels, size, seed)
        if base == "validation":
            src = SubsetSource(src, held)
        else:
            keep = np.ones(len(src), dtype=bool)
            keep[held] = False
            src = SubsetSource(src, np.flatnonzero(keep))
    if start is not None or stop is not None:
        n = len(src)
        rng = range(n)[slice(_bound(start, n, split), _bound(stop, n, split))]
        src = SubsetSource(src, np.arange(rng.start, rng.stop, rng.step, dtype=np.int64))
    if pad:
        src = _PaddedSource(src, int(pad))
    return src


def load_arrays(name: str, split: str, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """The whole split in memory: ``(images uint8 (N, H, W, C), labels int64 (N,))``.

    Takes :func:`load`'s arguments. Meant for analysis of small datasets; every
    image must have the same shape (not ImageNet).
    """
    src = load(name, split, **kwargs)
    labels = np.array(src.labels)
    images = _in_memory_images(src)
    if images is not None:
        return images, labels
    if len(src) == 0:
        return np.zeros((0, *src.info.image_shape), np.uint8), labels
    first = src[0]["image"]
    images = np.empty((len(src), *first.shape), dtype=np.uint8)
    for i in range(len(src)):
        image = src[i]["image"]
        if image.shape != first.shape:
            raise ValueError(f"load_arrays: example {i} has shape {image.shape}, example 0 "
                             f"{first.shape}; variable-size datasets cannot be stacked.")
        images[i] = image
    return images, labels


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
    if isinstance(src, _PaddedSource):
        parent = in_memory_view(src.parent)
        return None if parent is None else (parent[0], parent[1], parent[2] + src.pad)
    return None


def pad_images(images: np.ndarray, pad: int) -> np.ndarray:
    """Zero-pad ``(..., H, W, C)`` images by ``pad`` pixels on each side of H and W."""
    if not pad:
        return images
    widths = [(0, 0)] * (images.ndim - 3) + [(pad, pad), (pad, pad), (0, 0)]
    return np.pad(images, widths)


def _in_memory_images(src: Source) -> np.ndarray | None:
    """The images of a source built on an :class:`ArraySource`, without a per-example loop."""
    view = in_memory_view(src)
    if view is None:
        return None
    root, rows, pad = view
    return pad_images(root.images if rows is None else root.images[rows], pad)
