"""Readers for dataset files users already have: IDX, CIFAR python pickles, sklearn digits.

Each reader returns ``(images, labels)``: ``images`` a uint8 array of shape
``(N, H, W, C)`` and ``labels`` an int64 array of shape ``(N,)``.
"""

from __future__ import annotations

import gzip
import os
import pickle

import numpy as np

__all__ = [
    "read_idx",
    "find_idx_files",
    "read_idx_split",
    "find_cifar_dir",
    "read_cifar_split",
    "read_digits_split",
    "IDX_FILE_NAMES",
]

# IDX type codes (third byte of the magic number) -> big-endian NumPy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# (images, labels) file stems of MNIST and Fashion-MNIST; ".gz" and the "name.idx3-ubyte"
# spelling some archives use are accepted too.
IDX_FILE_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_bytes(path: str | os.PathLike) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":  # gzip magic, whatever the file's extension
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise ValueError(f"IDX file {os.fspath(path)!r} looks gzip-compressed but cannot be "
                             f"decompressed ({e}); re-download it.") from e
    return data


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (the MNIST format), gzip-compressed or raw.

    The header is a 4-byte magic number ``0x00 0x00 TYPE NDIM`` followed by
    ``NDIM`` big-endian uint32 dimension sizes; the data follows in C order.

    Args:
      path: the file; compression is detected from its content, not its name.

    Returns:
      The array, in native byte order, with the header's shape and element type.

    Raises:
      ValueError: a malformed header (bad magic, unknown type code) or a size
        that does not match the header, naming the file.
    """
    name = os.fspath(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"IDX file {name!r} is {len(data)} bytes long, shorter than the 4-byte "
                         f"magic number; the file is truncated or not an IDX file.")
    if data[0] != 0 or data[1] != 0:
        raise ValueError(f"IDX file {name!r} has a malformed header: magic number "
                         f"{data[:4].hex()} does not start with two zero bytes; it is not an "
                         f"IDX file (or was decompressed wrongly).")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"IDX file {name!r} has a malformed header: unknown element type code "
                         f"0x{code:02x}; valid codes are "
                         f"{', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)}.")
    if ndim == 0:
        raise ValueError(f"IDX file {name!r} has a malformed header: zero dimensions.")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"IDX file {name!r} is truncated inside its header ({len(data)} bytes, "
                         f"the header of {ndim} dimensions needs {header}).")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"IDX file {name!r}: the header announces shape {shape} of {dtype} "
                         f"({expected} bytes) but the file holds {len(data) - header} bytes of "
                         f"data; the file is truncated or corrupt.")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def find_idx_files(directory: str | os.PathLike, split: str) -> tuple[str, str] | None:
    """The ``(images, labels)`` IDX files of ``split`` (``"train"``/``"test"``) in ``directory``.

    Accepts the MNIST / Fashion-MNIST names (``train-images-idx3-ubyte``,
    ``t10k-labels-idx1-ubyte``, ...), raw or ``.gz``, and the
    ``train-images.idx3-ubyte`` spelling. Returns ``None`` if either is missing.
    """
    found = []
    for stem in IDX_FILE_NAMES[split]:
        candidates = [stem, stem + ".gz"]
        dotted = stem.replace("-idx", ".idx")
        candidates += [dotted, dotted + ".gz"]
        path = next((os.path.join(directory, c) for c in candidates
                     if os.path.isfile(os.path.join(directory, c))), None)
        if path is None:
            return None
        found.append(path)
    return found[0], found[1]


def read_idx_split(directory: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read the ``"train"`` or ``"test"`` split of an MNIST-style IDX directory.

    Returns:
      ``(images, labels)``: uint8 ``(N, H, W, 1)`` and int64 ``(N,)``.

    Raises:
      FileNotFoundError: the directory lacks the split's two files.
      ValueError: malformed files, or image and label counts that differ.
    """
    files = find_idx_files(directory, split)
    if files is None:
        stems = IDX_FILE_NAMES[split]
        raise FileNotFoundError(f"no IDX files {stems[0]}[.gz] and {stems[1]}[.gz] in "
                                f"{os.fspath(directory)!r}.")
    images, labels = read_idx(files[0]), read_idx(files[1])
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"IDX image file {files[0]!r} holds {images.dtype} of shape "
                         f"{images.shape}; expected uint8 (N, H, W).")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"IDX label file {files[1]!r} has shape {labels.shape}; expected "
                         f"({images.shape[0]},) to match {files[0]!r}.")
    return images[..., None], labels.astype(np.int64)


_CIFAR_LAYOUT = {
    # name: (sub-directory, train files, test files, label key)
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                ("test_batch",), b"labels"),
    "cifar100": ("cifar-100-python", ("train",), ("test",), b"fine_labels"),
}


def find_cifar_dir(directory: str | os.PathLike, name: str) -> str | None:
    """The CIFAR python-pickle directory of ``name`` (``"cifar10"``/``"cifar100"``).

    ``directory`` may be the pickle directory itself (``cifar-10-batches-py``,
    ``cifar-100-python``) or its parent. Returns ``None`` when neither holds the
    expected files.
    """
    sub, train, test, _ = _CIFAR_LAYOUT[name]
    for d in (os.fspath(directory), os.path.join(os.fspath(directory), sub)):
        if all(os.path.isfile(os.path.join(d, f)) for f in train + test):
            return d
    return None


def _load_pickle(path: str) -> dict:
    with open(path, "rb") as f:
        try:
            return pickle.load(f, encoding="bytes")
        except Exception as e:  # noqa: BLE001 -- any unpickling failure means a bad file
            raise ValueError(f"CIFAR file {path!r} is not a readable python pickle ({e!r}).") from e


def read_cifar_split(directory: str | os.PathLike, name: str,
                     split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read the ``"train"`` or ``"test"`` split of CIFAR-10/100 from its python pickles.

    The layout is the one of ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``
    from https://www.cs.toronto.edu/~kriz/cifar.html: pickled dicts whose
    ``b"data"`` rows are 3072 uint8 values (1024 red, 1024 green, 1024 blue, each
    row-major 32x32) and whose ``b"labels"`` (CIFAR-10) or ``b"fine_labels"``
    (CIFAR-100) are the class ids. Pickles can run code: read only files you trust.

    Returns:
      ``(images, labels)``: uint8 ``(N, 32, 32, 3)`` and int64 ``(N,)``.

    Raises:
      FileNotFoundError: ``directory`` lacks the files.
      ValueError: a file without the expected keys or shapes.
    """
    found = find_cifar_dir(directory, name)
    sub, train, test, label_key = _CIFAR_LAYOUT[name]
    if found is None:
        raise FileNotFoundError(f"no {name} python pickles ({sub}/{', '.join(train + test)}) in "
                                f"{os.fspath(directory)!r}.")
    images, labels = [], []
    for f in train if split == "train" else test:
        path = os.path.join(found, f)
        batch = _load_pickle(path)
        if b"data" not in batch or label_key not in batch:
            raise ValueError(f"CIFAR file {path!r} lacks the keys b'data' and {label_key!r}; "
                             f"is it a {name} python-version file?")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        lab = np.asarray(batch[label_key], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or lab.shape != (data.shape[0],):
            raise ValueError(f"CIFAR file {path!r}: data of shape {data.shape} and "
                             f"{lab.shape[0]} labels; expected (N, 3072) and N labels.")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(lab)
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def _digit_test_mask(labels: np.ndarray) -> np.ndarray:
    """Every fifth example of each class (within-class ranks 4, 9, 14, ...) is a test example."""
    mask = np.zeros(labels.shape, dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        mask[idx[4::5]] = True
    return mask


def read_digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits (1,797 images of UCI's optdigits test set) as uint8 images.

    Grey levels 0..16 become ``round(v * 255 / 16)``. The dataset has no official
    train/test split; this package's fixed, stratified rule puts every fifth
    example of each class (within-class ranks 4, 9, 14, ... in the file order) in
    ``"test"`` (355 images) and the rest in ``"train"`` (1,442 images).

    Returns:
      ``(images, labels)``: uint8 ``(N, 8, 8, 1)`` and int64 ``(N,)``.

    Raises:
      ImportError: scikit-learn is not installed (``pip install scikit-learn``).
    """
    from sklearn.datasets import load_digits  # optional dependency

    digits = load_digits()
    images = np.round(np.asarray(digits.images, np.float64) * (255.0 / 16.0)).astype(np.uint8)
    labels = np.asarray(digits.target, dtype=np.int64)
    test = _digit_test_mask(labels)
    keep = test if split == "test" else ~test
    return np.ascontiguousarray(images[keep][..., None]), labels[keep]
