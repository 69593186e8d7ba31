"""Loading a dataset split by name: TFDS ``data_source`` (no TensorFlow), IDX, CIFAR pickles, digits.

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

import contextlib
import logging
import os
import re

import numpy as np

from seqnorm_jax import checks
from seqnorm_jax.data import readers
from seqnorm_jax.data.info import DatasetInfo, dataset_info
from seqnorm_jax.data.sources import (
    ArraySource,
    DatasetNotFoundError,
    PaddedSource,
    Source,
    SubsetSource,
    TfdsSource,
    in_memory_images,
)

__all__ = [
    "DEFAULT_IDX_DIRS",
    "SOURCES",
    "SPLITS",
    "load",
    "load_arrays",
    "parse_split",
    "stratified_holdout",
]

SPLITS = ("train", "test", "validation", "train_minus_val")
SOURCES = ("auto", "tfds", "idx", "cifar", "digits")

# Where the IDX reader looks when `data_dir` is not given.
DEFAULT_IDX_DIRS = {"fashion_mnist": ("/usr/share/datasets/fashion-mnist",)}
_SUBDIRS = {"mnist": ("mnist", "MNIST"),
            "fashion_mnist": ("fashion-mnist", "fashion_mnist", "FashionMNIST")}


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
                         f"(optionally with [START:STOP]).{checks.suggest(base, SPLITS)}")
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


@contextlib.contextmanager
def _quiet_absl():
    """TFDS's warnings while it looks for a dataset (e.g. "Variant folder ... has no
    dataset_info.json" for a folder it cannot use) held back: whether TFDS has the data is
    this module's to say, in the error that lists every source tried."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


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
        with _quiet_absl():
            ds = tfds.data_source(info.tfds_name, split=split, data_dir=data_dir,
                                  download=False, decoders=decoders)
    except Exception as e:  # noqa: BLE001 -- TFDS raises many types for "not prepared"
        where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        try:
            with _quiet_absl():
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
        raise ValueError(f"unknown source {source!r}; choose one of {SOURCES}."
                         f"{checks.suggest(source, SOURCES)}")
    checks.positive_int(pad, "pad", "load", allow_zero=True)
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
        src = PaddedSource(src, int(pad))
    return src


def load_arrays(name: str, split: str, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """The whole split in memory: ``(images uint8 (N, H, W, C), labels int64 (N,))``.

    Takes :func:`load`'s arguments. Meant for analysis of small datasets; every
    image must have the same shape (not ImageNet).
    """
    src = load(name, split, **kwargs)
    labels = np.array(src.labels)
    images = in_memory_images(src)
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
