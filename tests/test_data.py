"""Tests of seqnorm_jax.data: readers, TFDS (mocked), splits, augmentation, Grain loaders.

Fixture files (IDX, CIFAR pickles) are generated at runtime under ``tmp_path``;
nothing touches the network. The Fashion-MNIST tests read the Debian package
``dataset-fashion-mnist`` (installed in CI).
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import os
import pickle
import struct

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqnorm_jax import data

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


# ----------------------------------------------------------------------------- fixtures


def _idx_bytes(array: np.ndarray, code: int) -> bytes:
    """An IDX file written from the format's definition (independent of the reader)."""
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    big = array.astype(array.dtype.newbyteorder(">"))
    return header + big.tobytes(order="C")


def _write(path, payload: bytes, gz: bool) -> None:
    with open(path, "wb") as f:
        f.write(gzip.compress(payload) if gz else payload)


def _mnist_dir(tmp_path, n_train=30, n_test=12, gz=True, dotted=False, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train": (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
                  np.arange(n_train, dtype=np.uint8) % 10),
        "test": (rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
                 (np.arange(n_test, dtype=np.uint8) * 3) % 10),
    }
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = arrays[split]
        sep = "." if dotted else "-"
        ext = ".gz" if gz else ""
        _write(tmp_path / f"{prefix}-images{sep}idx3-ubyte{ext}", _idx_bytes(images, 0x08), gz)
        _write(tmp_path / f"{prefix}-labels{sep}idx1-ubyte{ext}", _idx_bytes(labels, 0x08), gz)
    return arrays


def _cifar_dir(root, name="cifar10", per_batch=20, n_test=10, seed=0):
    """CIFAR python pickles in the official layout; returns the images (NHWC) and labels."""
    rng = np.random.default_rng(seed)
    num_classes = 10 if name == "cifar10" else 100
    if name == "cifar10":
        sub, train_files, test_files, key = ("cifar-10-batches-py",
                                             [f"data_batch_{i}" for i in range(1, 6)],
                                             ["test_batch"], b"labels")
    else:
        sub, train_files, test_files, key = "cifar-100-python", ["train"], ["test"], b"fine_labels"
        per_batch = 200
    d = root / sub
    d.mkdir()
    out = {}
    for split, files, n in (("train", train_files, per_batch), ("test", test_files, n_test)):
        images, labels = [], []
        for j, fname in enumerate(files):
            img = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            lab = [int(v) for v in (np.arange(n) + j) % num_classes]
            # rows: 1024 red, 1024 green, 1024 blue values, each plane row-major
            rows = np.stack([np.concatenate([img[i, :, :, ch].reshape(-1) for ch in range(3)])
                             for i in range(n)])
            with open(d / fname, "wb") as f:
                pickle.dump({b"data": rows, key: lab, b"batch_label": b"x"}, f)
            images.append(img)
            labels += lab
        out[split] = (np.concatenate(images), np.array(labels, np.int64))
    with open(d / ("batches.meta" if name == "cifar10" else "meta"), "wb") as f:
        pickle.dump({b"label_names": [b"c"] * num_classes}, f)
    return out


def _index_source(n: int, shape=(2, 2, 1), num_classes=10) -> data.ArraySource:
    """A source whose image i encodes i (pixel 0: i % 256, pixel 1: i // 256)."""
    images = np.zeros((n, *shape), np.uint8)
    flat = images.reshape(n, -1)
    flat[:, 0] = np.arange(n) % 256
    flat[:, 1] = np.arange(n) // 256
    info = dataclasses.replace(data.dataset_info("digits"), image_shape=shape,
                               num_classes=num_classes)
    return data.ArraySource(images, np.arange(n) % num_classes, info)


def _decode_index(batch_images: np.ndarray, info) -> np.ndarray:
    pixels = np.rint((batch_images * info.std[0] + info.mean[0]) * 255).astype(np.int64)
    flat = pixels.reshape(pixels.shape[0], -1)
    return flat[:, 0] + 256 * flat[:, 1]


def _all(loader) -> list[dict]:
    return list(loader)


# ----------------------------------------------------------------------------- info


def test_dataset_info_names_and_constants():
    assert set(data.DATASETS) == {"mnist", "fashion_mnist", "cifar10", "cifar100",
                                  "imagenet2012", "digits"}
    assert data.dataset_info("Fashion-MNIST").name == "fashion_mnist"
    assert data.dataset_info("imagenet").image_shape == (224, 224, 3)
    assert data.dataset_info("cifar100").num_classes == 100
    for info in data.DATASETS.values():
        assert len(info.mean) == len(info.std) == info.image_shape[-1]
        assert info.default_augment in data.PRESETS
    chex.assert_trees_all_close(data.dataset_info("cifar10").mean,
                                (0.49139968, 0.48215841, 0.44653091), atol=0)
    with pytest.raises(ValueError, match="unknown dataset 'svhn'.*choose one of"):
        data.dataset_info("svhn")


# ----------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip(tmp_path, gz):
    rng = np.random.default_rng(1)
    cases = {
        "u8": (rng.integers(0, 256, (5, 3, 4), dtype=np.uint8), 0x08),
        "i16": (rng.integers(-30000, 30000, (6, 2), dtype=np.int16), 0x0B),
        "f32": (rng.standard_normal((7,)).astype(np.float32), 0x0D),
        "f64": (rng.standard_normal((2, 2, 2, 2)), 0x0E),
    }
    for name, (array, code) in cases.items():
        path = tmp_path / f"{name}.idx"
        _write(path, _idx_bytes(array, code), gz)
        got = data.read_idx(path)
        assert got.shape == array.shape and got.dtype == array.dtype.newbyteorder("=")
        np.testing.assert_array_equal(got, array)


def test_read_idx_malformed(tmp_path):
    good = _idx_bytes(np.zeros((4, 3), np.uint8), 0x08)
    bad_magic = tmp_path / "bad_magic"
    _write(bad_magic, b"\x01\x00" + good[2:], gz=False)
    with pytest.raises(ValueError, match=r"bad_magic.*malformed header.*two zero bytes"):
        data.read_idx(bad_magic)
    bad_code = tmp_path / "bad_code"
    _write(bad_code, good[:2] + b"\x42" + good[3:], gz=True)
    with pytest.raises(ValueError, match=r"malformed header: unknown element type code 0x42"):
        data.read_idx(bad_code)
    truncated = tmp_path / "truncated"
    _write(truncated, good[:-1], gz=False)
    with pytest.raises(ValueError, match=r"announces shape \(4, 3\).*truncated or corrupt"):
        data.read_idx(truncated)
    short = tmp_path / "short"
    _write(short, b"\x00\x00", gz=False)
    with pytest.raises(ValueError, match="shorter than the 4-byte magic"):
        data.read_idx(short)


@pytest.mark.parametrize("gz,dotted", [(True, False), (False, True)])
def test_idx_source(tmp_path, gz, dotted):
    arrays = _mnist_dir(tmp_path, gz=gz, dotted=dotted)
    for split in ("train", "test"):
        src = data.load("mnist", split, source="idx", data_dir=tmp_path)
        images, labels = arrays[split]
        assert len(src) == len(labels) and src.info.name == "mnist"
        for i in (0, len(src) - 1):
            ex = src[i]
            assert ex["image"].dtype == np.uint8 and ex["image"].shape == (28, 28, 1)
            np.testing.assert_array_equal(ex["image"][..., 0], images[i])
            assert ex["label"] == int(labels[i]) and isinstance(ex["label"], int)
        np.testing.assert_array_equal(src.labels, labels)
    # a sub-directory named after the dataset is found too
    root = tmp_path / "root"
    (root / "fashion-mnist").mkdir(parents=True)
    arrays = _mnist_dir(root / "fashion-mnist", n_train=10, seed=3)
    images, labels = data.load_arrays("fashion_mnist", "train", source="idx", data_dir=root)
    np.testing.assert_array_equal(images[..., 0], arrays["train"][0])
    np.testing.assert_array_equal(labels, arrays["train"][1])


# ----------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_source(tmp_path, name):
    arrays = _cifar_dir(tmp_path, name)
    for data_dir in (tmp_path, tmp_path / os.listdir(tmp_path)[0]):
        for split in ("train", "test"):
            images, labels = data.load_arrays(name, split, source="cifar", data_dir=data_dir)
            np.testing.assert_array_equal(images, arrays[split][0])
            np.testing.assert_array_equal(labels, arrays[split][1])
    src = data.load(name, "train", data_dir=tmp_path)  # auto: TFDS is not prepared there
    assert isinstance(src, data.ArraySource) and src[3]["image"].shape == (32, 32, 3)
    np.testing.assert_array_equal(src[3]["image"], arrays["train"][0][3])


def test_cifar_bad_file(tmp_path):
    _cifar_dir(tmp_path, "cifar10")
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"pixels": np.zeros((1, 3072), np.uint8)}, f)
    with pytest.raises(ValueError, match="lacks the keys b'data' and b'labels'"):
        data.load("cifar10", "test", source="cifar", data_dir=tmp_path)


# ----------------------------------------------------------------------------- TFDS


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_source_mocked(name, shape):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=24):
        direct = tfds.data_source(name, split="test")
        for source in ("tfds", "auto"):
            src = data.load(name, "test", source=source)
            assert isinstance(src, data.TfdsSource) and len(src) == 24
            for i in (0, 23):
                ex = src[i]
                assert ex["image"].dtype == np.uint8 and ex["image"].shape == shape
                np.testing.assert_array_equal(ex["image"], np.asarray(direct[i]["image"]))
                assert ex["label"] == int(direct[i]["label"])
        np.testing.assert_array_equal(src.labels, [int(direct[i]["label"]) for i in range(24)])
        val = data.load(name, "validation", source="tfds", validation_size=6)
        rest = data.load(name, "train_minus_val", source="tfds", validation_size=6)
        assert len(val) == 6 and len(rest) == 18
        assert not set(val.indices) & set(rest.indices)
        batch = next(iter(data.make_loader(src, batch_size=8, train=True, augment="default",
                                           shard_index=0, shard_count=1)))
        assert batch["image"].shape == (8, *shape) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32


# ----------------------------------------------------------------------------- real data


def test_fashion_mnist_debian_files():
    assert os.path.isdir(FASHION_DIR), (
        f"{FASHION_DIR} is missing: install the Debian package with "
        f"`apt-get install dataset-fashion-mnist` (CI does).")
    train = data.load("fashion_mnist", "train", source="idx")
    test = data.load("fashion_mnist", "test", source="idx")
    assert (len(train), len(test)) == (60000, 10000)
    np.testing.assert_array_equal(train.labels[:10], [9, 0, 0, 3, 0, 2, 7, 2, 5, 5])
    np.testing.assert_array_equal(test.labels[:10], [9, 2, 1, 1, 6, 1, 4, 6, 5, 7])
    np.testing.assert_array_equal(np.bincount(train.labels), [6000] * 10)
    assert train[0]["image"].shape == (28, 28, 1) and train[0]["image"].dtype == np.uint8
    # the published normalisation constants match the training images (float64 reference)
    pixels = train.images.astype(np.float64) / 255.0
    info = train.info
    chex.assert_trees_all_close((pixels.mean(),), info.mean, atol=5e-5)
    chex.assert_trees_all_close((pixels.std(),), info.std, atol=5e-5)
    # the 55k / 5k hold-out is stratified: 500 per class
    val = data.load("fashion_mnist", "validation", source="idx")
    np.testing.assert_array_equal(np.bincount(val.labels), [500] * 10)


def test_auto_source_tries_tfds_quietly(caplog):
    # source="auto" asks TFDS first; where TFDS has no prepared copy it used to log absl
    # warnings ("Variant folder ... has no dataset_info.json") on the way to the IDX files
    with caplog.at_level(logging.DEBUG):
        train = data.load("fashion_mnist", "test")
    assert len(train) == 10000
    assert [r.getMessage() for r in caplog.records if r.name == "absl"] == []


def test_digits_splits_and_constants():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    raw = load_digits()
    train_x, train_y = data.load_arrays("digits", "train")
    test_x, test_y = data.load_arrays("digits", "test")
    assert train_x.shape == (1442, 8, 8, 1) and test_x.shape == (355, 8, 8, 1)
    assert train_x.dtype == np.uint8 and train_y.dtype == np.int64
    # stratified: every class gives a fifth of its examples (rounded down) to test
    counts = np.bincount(raw.target)
    np.testing.assert_array_equal(np.bincount(test_y), counts // 5)
    # the split is a partition of the 1797 images, with the 0..16 levels scaled to 0..255
    expected = np.round(raw.images * 255 / 16).astype(np.uint8)
    all_x = np.concatenate([train_x, test_x])[..., 0]
    key = lambda x: sorted(map(bytes, x))  # noqa: E731
    assert key(all_x) == key(expected)
    pixels = expected.astype(np.float64) / 255
    info = data.dataset_info("digits")
    chex.assert_trees_all_close((pixels.mean(), pixels.std()), (info.mean[0], info.std[0]),
                                atol=5e-6)
    padded = data.load("digits", "train", pad=4)
    assert padded.info.image_shape == (16, 16, 1)
    ex = padded[5]["image"]
    assert ex.shape == (16, 16, 1)
    np.testing.assert_array_equal(ex[4:12, 4:12], train_x[5])
    assert ex.sum() == train_x[5].sum()


# ----------------------------------------------------------------------------- splits


def test_validation_split_stratified_disjoint_deterministic():
    pytest.importorskip("sklearn")
    train = data.load("digits", "train")
    val = data.load("digits", "validation", seed=3)
    rest = data.load("digits", "train_minus_val", seed=3)
    assert len(val) == 150 and len(rest) == len(train) - 150
    idx_val, idx_rest = val.indices, rest.indices
    assert not set(idx_val) & set(idx_rest)
    np.testing.assert_array_equal(np.sort(np.concatenate([idx_val, idx_rest])),
                                  np.arange(len(train)))
    # stratified: each class's share is 150 * n_c / N rounded by largest remainders
    counts = np.bincount(train.labels)
    exact = 150 * counts / counts.sum()
    got = np.bincount(val.labels, minlength=10)
    assert got.sum() == 150 and np.all(np.abs(got - exact) < 1)
    np.testing.assert_array_equal(val.labels, train.labels[idx_val])
    np.testing.assert_array_equal(val[7]["image"], train[int(idx_val[7])]["image"])
    # deterministic given the seed, different for another seed
    np.testing.assert_array_equal(data.load("digits", "validation", seed=3).indices, idx_val)
    assert not np.array_equal(data.load("digits", "validation", seed=4).indices, idx_val)
    # CIFAR's rule: 5,000 of 50,000 balanced examples -> exactly 500 per class
    labels = np.repeat(np.arange(10), 5000)
    held = data.stratified_holdout(labels, 5000, seed=0)
    np.testing.assert_array_equal(np.bincount(labels[held]), [500] * 10)
    assert np.all(np.diff(held) > 0)


def test_split_slicing(tmp_path):
    arrays = _mnist_dir(tmp_path, n_train=40)
    full = data.load("mnist", "train", source="idx", data_dir=tmp_path)
    for split, expect in (("train[:10]", np.arange(10)), ("train[5:8]", np.arange(5, 8)),
                          ("train[-3:]", np.arange(37, 40)), ("train[:25%]", np.arange(10)),
                          ("train[10%:]", np.arange(4, 40))):
        sub = data.load("mnist", split, source="idx", data_dir=tmp_path)
        np.testing.assert_array_equal(sub.labels, arrays["train"][1][expect])
        np.testing.assert_array_equal(sub[0]["image"], full[int(expect[0])]["image"])
    rest = data.load("mnist", "train_minus_val", source="idx", data_dir=tmp_path,
                     validation_size=10)
    first = data.load("mnist", "train_minus_val[:5]", source="idx", data_dir=tmp_path,
                      validation_size=10)
    np.testing.assert_array_equal(first.labels, rest.labels[:5])
    for bad, msg in (("training", "unknown split 'training'"), ("train[:x]", "slice bound 'x'"),
                     ("train[3]", "malformed split")):
        with pytest.raises(ValueError, match=msg):
            data.load("mnist", bad, source="idx", data_dir=tmp_path)
    with pytest.raises(ValueError, match=r"validation_size must be an int in \[1, 39\]"):
        data.load("mnist", "validation", source="idx", data_dir=tmp_path, validation_size=40)
    with pytest.raises(ValueError, match="validation_size applies to"):
        data.load("mnist", "train", source="idx", data_dir=tmp_path, validation_size=10)


# ----------------------------------------------------------------------------- errors


def test_missing_dataset_error_lists_the_ways(tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as err:
        data.load("fashion_mnist", "train", data_dir=tmp_path)
    assert isinstance(err.value, FileNotFoundError)
    msg = str(err.value)
    for needle in ("apt-get install dataset-fashion-mnist", 'pip install "seqnorm-jax[download]"',
                   "tfds build fashion_mnist --file_format=array_record",
                   "train-images-idx3-ubyte", "data_dir", "- tfds:", "- idx:"):
        assert needle in msg, needle
    with pytest.raises(data.DatasetNotFoundError, match="cifar-10-python.tar.gz"):
        data.load("cifar10", "train", source="cifar", data_dir=tmp_path)
    with pytest.raises(ValueError, match="source 'cifar' cannot read mnist"):
        data.load("mnist", "train", source="cifar", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown source 'http'"):
        data.load("mnist", "train", source="http")


# ----------------------------------------------------------------------------- augmentation


def _image(seed=0, shape=(32, 32, 3)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_random_flip():
    img = _image()
    np.testing.assert_array_equal(data.random_flip(img, np.random.default_rng(0), p=1.0),
                                  img[:, ::-1])
    np.testing.assert_array_equal(data.random_flip(img, np.random.default_rng(0), p=0.0), img)
    flips = [not np.array_equal(data.random_flip(img, np.random.default_rng(s)), img)
             for s in range(200)]
    assert 70 < sum(flips) < 130
    a = data.random_flip(img, np.random.default_rng(7))
    b = data.random_flip(img, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    with pytest.raises(TypeError, match="`rng` must be a numpy.random.Generator"):
        data.random_flip(img, 0)


@pytest.mark.parametrize("mode,np_mode", [("zero", "constant"), ("reflect", "reflect")])
def test_pad_and_crop(mode, np_mode):
    img = _image(1)
    padded = np.pad(img, ((4, 4), (4, 4), (0, 0)), mode=np_mode)
    offsets = set()
    for s in range(60):
        out = data.pad_and_crop(img, np.random.default_rng(s), pad=4, mode=mode)
        assert out.shape == img.shape and out.dtype == img.dtype
        matches = [(t, l) for t in range(9) for l in range(9)
                   if np.array_equal(out, padded[t:t + 32, l:l + 32])]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 30  # many of the 81 positions are reached
    np.testing.assert_array_equal(data.pad_and_crop(img, np.random.default_rng(5), mode=mode),
                                  data.pad_and_crop(img, np.random.default_rng(5), mode=mode))
    with pytest.raises(ValueError, match="`mode` must be 'zero' or 'reflect'"):
        data.pad_and_crop(img, np.random.default_rng(0), mode="edge")


def test_cutout_square():
    img = np.ones((32, 32, 3), np.float32)
    full = 0
    for s in range(300):
        out = data.cutout(img, np.random.default_rng(s), size=16)
        zero = np.all(out == 0, axis=-1)
        assert np.array_equal(zero, np.any(out == 0, axis=-1))  # all channels together
        rows, cols = np.flatnonzero(zero.any(1)), np.flatnonzero(zero.any(0))
        # the zeroed pixels form one axis-aligned rectangle
        assert zero.sum() == rows.size * cols.size
        assert np.all(zero[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])
        assert np.all(np.diff(rows) == 1) and np.all(np.diff(cols) == 1)
        for idx in (rows, cols):
            touches = idx[0] == 0 or idx[-1] == 31
            # 16 wide unless clipped at a border; the center is inside, so >= 8 survive
            assert idx.size == 16 if not touches else 8 <= idx.size <= 16
        full += rows.size == cols.size == 16
        np.testing.assert_array_equal(out[~zero], 1.0)
    assert full > 50
    np.testing.assert_array_equal(img, 1.0)  # the input is not modified
    np.testing.assert_array_equal(data.cutout(img, np.random.default_rng(2)),
                                  data.cutout(img, np.random.default_rng(2)))


@pytest.mark.parametrize("in_shape,out_hw", [((40, 30, 3), (17, 23)), ((9, 12, 1), (20, 31)),
                                             ((64, 64, 2), (64, 32))])
def test_resize_matches_jax_image_resize(in_shape, out_hw):
    x = np.random.default_rng(0).uniform(0, 255, in_shape).astype(np.float32)
    got = data.resize(x, *out_hw)
    ref = jax.image.resize(jnp.asarray(x, jnp.float32), (*out_hw, in_shape[2]),
                           method="linear", antialias=True)
    chex.assert_trees_all_close(got, np.asarray(ref), atol=2e-3, rtol=1e-5)
    as_uint8 = data.resize(x.astype(np.uint8), *out_hw)
    assert as_uint8.dtype == np.uint8 and as_uint8.shape == (*out_hw, in_shape[2])


def test_random_resized_crop_scale_and_ratio():
    fractions, ratios = [], []
    for s in range(2000):
        top, left, h, w = data.random_resized_crop_box(np.random.default_rng(s), 300, 400)
        assert 0 <= top <= 300 - h and 0 <= left <= 400 - w
        fractions.append(h * w / (300 * 400))
        ratios.append(w / h)
    fractions, ratios = np.array(fractions), np.array(ratios)
    # bounds up to the rounding of h and w to whole pixels
    assert fractions.min() > 0.08 * 0.98 and fractions.max() <= 1.0
    assert ratios.min() > 0.75 * 0.99 and ratios.max() < 4 / 3 * 1.01
    assert fractions.min() < 0.1 and fractions.max() > 0.95  # the whole range is used
    img = _image(3, (300, 400, 3))
    out = data.random_resized_crop(img, np.random.default_rng(1), size=224)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, data.random_resized_crop(img, np.random.default_rng(1)))
    # the fallback (no draw fits a thin image) is a centered box with a clamped ratio
    assert data.random_resized_crop_box(np.random.default_rng(0), 10, 1000, scale=(0.9, 1.0)) \
        == (0, (1000 - 13) // 2, 10, 13)


def test_center_crop_and_normalize():
    img = _image(4, (256, 300, 3))  # shorter side already 256: no resampling
    np.testing.assert_array_equal(data.center_crop(img), img[16:240, 38:262])
    tall = np.full((500, 300, 3), 77, np.uint8)
    out = data.center_crop(tall)
    assert out.shape == (224, 224, 3) and np.all(out == 77)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    ref = (img.astype(np.float64) / 255 - np.array(mean)) / np.array(std)
    got = data.normalize(img, mean, std)
    assert got.dtype == np.float32
    chex.assert_trees_all_close(got, ref.astype(np.float32), atol=1e-5)
    with pytest.raises(ValueError, match="one value per channel"):
        data.normalize(img, (0.1,) * 2, std)


def test_preprocess_imagenet_variable_sizes():
    info = data.dataset_info("imagenet2012")
    for train in (True, False):
        pre = data.Preprocess("imagenet", info.mean, info.std, info.image_shape, train=train)
        for shape in ((300, 400, 3), (500, 240, 3)):
            out = pre({"image": _image(0, shape), "label": 3}, np.random.default_rng(0))
            assert out["image"].shape == (224, 224, 3) and out["image"].dtype == np.float32
            assert out["label"] == 3 and out["label"].dtype == np.int32
    pre = data.Preprocess("none", info.mean, info.std, info.image_shape, train=False)
    with pytest.raises(ValueError, match="need augment='imagenet'"):
        pre({"image": _image(0, (300, 400, 3)), "label": 0})


# ----------------------------------------------------------------------------- loader


def test_loader_batches_shapes_and_normalisation():
    pytest.importorskip("sklearn")
    src = data.load("digits", "test")
    loader = data.make_loader(src, batch_size=64, train=False, shard_index=0, shard_count=1)
    batches = _all(loader)
    assert len(loader) == len(batches) == 6  # 355 = 5 * 64 + 35, nothing dropped
    assert [b["image"].shape for b in batches] == [(64, 8, 8, 1)] * 5 + [(35, 8, 8, 1)]
    images, labels = data.load_arrays("digits", "test")
    info = src.info
    ref = (images.astype(np.float64) / 255 - info.mean[0]) / info.std[0]
    got = np.concatenate([b["image"] for b in batches])
    assert got.dtype == np.float32
    chex.assert_trees_all_close(got, ref.astype(np.float32), atol=1e-5)
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), labels)
    assert batches[0]["label"].dtype == np.int32
    # training drops the remainder by default
    train = data.make_loader(src, batch_size=64, train=True, shard_index=0, shard_count=1)
    assert len(train) == 5 == data.steps_per_epoch(src, 64, True, 1)


def test_loader_deterministic_per_seed_and_epoch():
    src = _index_source(200, shape=(8, 8, 1))
    kw = dict(batch_size=16, train=True, augment="flip_crop_cutout", shard_index=0,
              shard_count=1)
    a = _all(data.make_loader(src, seed=1, epoch=2, **kw))
    b = _all(data.make_loader(src, seed=1, epoch=2, **kw))
    chex.assert_trees_all_equal(a, b)
    c = _all(data.make_loader(src, seed=1, epoch=3, **kw))
    d = _all(data.make_loader(src, seed=2, epoch=2, **kw))
    labels = lambda bs: np.concatenate([x["label"] for x in bs])  # noqa: E731
    assert not np.array_equal(labels(a), labels(c))
    assert not np.array_equal(labels(a), labels(d))
    # without augmentation the epoch is a permutation of the source (12 * 16 of 200)
    plain = _all(data.make_loader(src, seed=1, epoch=2, batch_size=16, train=True,
                                  shard_index=0, shard_count=1))
    idx = np.concatenate([_decode_index(x["image"], src.info) for x in plain])
    assert idx.size == 192 and np.unique(idx).size == 192
    np.testing.assert_array_equal(labels(plain), src.labels[idx])


def test_loader_start_step_skips():
    src = _index_source(150, shape=(8, 8, 1))
    kw = dict(batch_size=10, train=True, seed=5, epoch=1, augment="flip_crop",
              shard_index=0, shard_count=1)
    full = _all(data.make_loader(src, **kw))
    resumed = data.make_loader(src, start_step=6, **kw)
    assert len(resumed) == len(full) - 6 and resumed.steps_per_epoch == len(full)
    chex.assert_trees_all_equal(_all(resumed), full[6:])
    assert _all(data.make_loader(src, start_step=len(full), **kw)) == []
    with pytest.raises(ValueError, match="start_step=16 is past the end of the epoch"):
        data.make_loader(src, start_step=16, **kw)


@pytest.mark.parametrize("drop", [True, False])
def test_loader_shards_disjoint_covering(drop):
    n, b, p_count = 103, 4, 3
    src = _index_source(n)
    kw = dict(batch_size=b, train=drop, seed=0, epoch=4, drop_remainder=drop)
    shards = [_all(data.make_loader(src, shard_index=p, shard_count=p_count, **kw))
              for p in range(p_count)]
    ids = [np.concatenate([_decode_index(x["image"], src.info) for x in s]) for s in shards]
    everything = np.concatenate(ids)
    assert np.unique(everything).size == everything.size  # disjoint
    for p in range(p_count):
        assert len(shards[p]) == data.steps_per_epoch(src, b, drop, p_count, shard_index=p)
    if drop:
        assert {len(s) for s in shards} == {n // (b * p_count)}
        # the global batches equal a single process's batches of size b * p_count
        single = _all(data.make_loader(src, batch_size=b * p_count, shard_index=0,
                                       shard_count=1, train=True, seed=0, epoch=4,
                                       drop_remainder=True))
        for step, batch in enumerate(single):
            joined = {k: np.concatenate([shards[p][step][k] for p in range(p_count)])
                      for k in batch}
            chex.assert_trees_all_equal(joined, batch)
    else:
        np.testing.assert_array_equal(np.sort(everything), np.arange(n))  # covering
        assert [len(s) for s in shards] == [9, 9, 8]  # 26 chunks of 4 (the last of 3)


def test_loader_non_iid_batches():
    pytest.importorskip("sklearn")
    src = data.load("digits", "train")
    kw = dict(batch_size=40, train=True, seed=0, non_iid_classes=4, shard_index=0,
              shard_count=1)
    batches = _all(data.make_loader(src, epoch=0, **kw))
    assert len(batches) == 1442 // 40
    for batch in batches:
        classes, counts = np.unique(batch["label"], return_counts=True)
        assert classes.size == 4 and np.all(counts == 10)
        assert np.any(np.diff(batch["label"]) != 0)  # shuffled, not one class block
    chex.assert_trees_all_equal(batches, _all(data.make_loader(src, epoch=0, **kw)))
    other = _all(data.make_loader(src, epoch=1, **kw))
    assert not np.array_equal(batches[0]["label"], other[0]["label"])
    # classes recur across batches; each class is used about equally over the epoch
    per_class = np.bincount(np.concatenate([x["label"] for x in batches]), minlength=10)
    assert per_class.sum() == 36 * 40 and per_class.max() <= 250
    # examples within a class are drawn without replacement until the class is used up:
    # after D draws from a class of S examples, each was drawn D // S or D // S + 1 times
    idx = data.non_iid_indices(src.labels, batch_size=40, classes_per_batch=4,
                               num_batches=200, rng=np.random.default_rng(0))
    for c in range(10):
        members = np.flatnonzero(src.labels == c)
        drawn = idx[src.labels[idx] == c]
        q, r = divmod(drawn.size, members.size)
        times = np.bincount(drawn, minlength=src.labels.size)[members]
        assert q >= 1 and set(np.unique(times)) <= {q, q + 1}
        assert np.sum(times == q + 1) == r
    with pytest.raises(ValueError, match="non_iid_classes=3 must divide the global batch"):
        data.make_loader(src, batch_size=40, train=True, non_iid_classes=3, shard_index=0,
                         shard_count=1)
    with pytest.raises(ValueError, match=r"non_iid_classes must be an int in \[1, 10\]"):
        data.make_loader(src, batch_size=40, train=True, non_iid_classes=20, shard_index=0,
                         shard_count=1)
    with pytest.raises(ValueError, match="non_iid_classes applies to training"):
        data.make_loader(src, batch_size=40, train=False, non_iid_classes=4, shard_index=0,
                         shard_count=1)


def test_loader_defaults_and_argument_errors():
    src = _index_source(50)
    loader = data.make_loader(src, batch_size=8, train=True)  # shards from JAX: 1 process
    assert len(loader) == 50 // (8 * jax.process_count())
    for kwargs, msg in ((dict(batch_size=0), "batch_size must be a positive int"),
                        (dict(batch_size=4, augment="mixup"), "unknown augment 'mixup'"),
                        (dict(batch_size=4, shard_index=3, shard_count=3),
                         r"shard_index must be an int in \[0, 3\)"),
                        (dict(batch_size=4, shard_count=0), "shard_count must be a positive int"),
                        (dict(batch_size=4, epoch=-1), "epoch must be a non-negative int")):
        with pytest.raises(ValueError, match=msg):
            data.make_loader(src, train=True, **kwargs)
    with pytest.raises(TypeError, match="`src` must be a seqnorm_jax.data Source"):
        data.make_loader(list(range(5)), batch_size=2, train=True)


def test_loader_worker_processes_match_in_thread():
    src = _index_source(48, shape=(8, 8, 1))
    kw = dict(batch_size=8, train=True, seed=3, epoch=1, augment="flip_crop",
              shard_index=0, shard_count=1)
    in_thread = _all(data.make_loader(src, **kw))
    workers = _all(data.make_loader(src, num_workers=2, **kw))
    chex.assert_trees_all_equal(workers, in_thread)

