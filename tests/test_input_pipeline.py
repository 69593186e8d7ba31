"""Tests of the fast input pipeline: Pillow ImageNet preprocessing, image folders, undecoded
TFDS images, whole-array batches, workers, device prefetch and normalisation.

JPEG/PNG files are written by the tests with Pillow under ``tmp_path``; TFDS is mocked
(``tfds.testing.mock_data``). Nothing touches the network.
"""

from __future__ import annotations

import dataclasses
import io
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from seqnorm_jax import data

INFO = data.dataset_info("imagenet2012")


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth, textured uint8 RGB image (JPEG-friendly, like a photo)."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, h)[:, None, None]
    x = np.linspace(0, 1, w)[None, :, None]
    img = 128 + 70 * np.sin(9 * x + 5 * y + np.arange(3)) + 12 * rng.standard_normal((h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _encode(array: np.ndarray, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buf, fmt, **kw)
    return buf.getvalue()


def _decoded(blob: bytes) -> np.ndarray:
    """Pillow's full decode of ``blob`` (the independent reference)."""
    return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))


def _preprocess(train: bool, normalize: bool = False) -> data.Preprocess:
    return data.Preprocess("imagenet", INFO.mean, INFO.std, INFO.image_shape, train=train,
                           normalize=normalize)


# ----------------------------------------------------------------------------- crop boxes


def test_crop_box_distribution():
    """Inception boxes: area fraction uniform, log aspect ratio uniform, positions uniform."""
    rng = np.random.default_rng(0)
    n, side = 4000, 400
    # With scale <= 0.5 every first draw fits in a 400x400 image, so nothing is rejected and
    # the draws follow the stated laws (up to the rounding of the sides to pixels).
    boxes = np.array([data.random_resized_crop_box(rng, side, side, scale=(0.08, 0.5))
                      for _ in range(n)])
    top, left, h, w = boxes.T
    area = h * w / side**2
    log_ratio = np.log(w / h)
    lo, hi = math.log(3 / 4), math.log(4 / 3)
    assert area.min() >= 0.08 * 0.97 and area.max() <= 0.5 * 1.03
    assert log_ratio.min() >= lo - 0.02 and log_ratio.max() <= hi + 0.02

    def ks(sample, a, b):  # Kolmogorov-Smirnov distance to U(a, b)
        s = np.sort(sample)
        cdf = np.clip((s - a) / (b - a), 0, 1)
        k = np.arange(1, s.size + 1) / s.size
        return max(np.abs(k - cdf).max(), np.abs(k - 1 / s.size - cdf).max())

    assert ks(area, 0.08, 0.5) < 0.03  # 1% critical value at n=4000: 0.026 (+ rounding)
    assert ks(log_ratio, lo, hi) < 0.03
    # the position is uniform over the places the box fits
    assert abs(np.mean(top / (side - h)) - 0.5) < 0.02
    assert abs(np.mean(left / (side - w)) - 0.5) < 0.02
    # default scale on a 375x500 image: every box inside the image, within the stated ranges
    boxes = np.array([data.random_resized_crop_box(rng, 375, 500) for _ in range(n)])
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 375).all() and (left + w <= 500).all()
    area = h * w / (375 * 500)
    assert area.min() >= 0.08 * 0.97 and area.max() <= 1.0
    assert np.log(w / h).min() >= lo - 0.02 and np.log(w / h).max() <= hi + 0.02
    assert 0.35 < np.median(area) < 0.6


def test_train_crop_uses_the_box_and_flip_of_the_numpy_reference():
    """Same draws as random_flip(random_resized_crop(...)): same box, same flip, Pillow pixels."""
    img = _photo(300, 400)
    for seed in range(6):
        rng = np.random.default_rng(seed)
        top, left, h, w = data.random_resized_crop_box(rng, 300, 400)
        flip = rng.random() < 0.5
        ref = Image.fromarray(img).resize((224, 224), Image.Resampling.BILINEAR,
                                          box=(left, top, left + w, top + h))
        ref = np.asarray(ref)[:, ::-1] if flip else np.asarray(ref)
        out = data.random_resized_crop_flip(img, np.random.default_rng(seed))
        assert out.dtype == np.uint8 and out.shape == (224, 224, 3) and out.flags.writeable
        np.testing.assert_array_equal(out, ref)
        # the NumPy reference (float resampling, rounded once) is within a few levels
        rng = np.random.default_rng(seed)
        numpy_ref = data.random_flip(data.random_resized_crop(img, rng), rng)
        assert np.abs(out.astype(int) - numpy_ref).mean() < 1.0


# ----------------------------------------------------------------------------- eval crop


@pytest.mark.parametrize("shape", [(384, 480), (480, 384)])
def test_eval_crop_exact_against_pillow(shape):
    """Box geometry exact in binary (scale 1.5): equal to resize-then-crop, bit for bit."""
    blob = _encode(_photo(*shape), quality=90)
    full = _decoded(blob)
    h, w = shape
    nh, nw = (256, int(256 * w / h)) if h <= w else (int(256 * h / w), 256)
    top, left = int(round((nh - 224) / 2)), int(round((nw - 224) / 2))
    ref = np.asarray(Image.fromarray(full).resize((nw, nh), Image.Resampling.BILINEAR))
    ref = ref[top:top + 224, left:left + 224]
    np.testing.assert_array_equal(data.resize_center_crop(blob), ref)
    np.testing.assert_array_equal(data.resize_center_crop(full), ref)
    assert data.center_crop_geometry(h, w) == (nh, nw, top, left)


def test_eval_crop_any_geometry_within_one_level():
    """At arbitrary geometry the box's float coordinates round differently: <= 1 level."""
    img = _photo(375, 500, seed=1)
    ref = np.asarray(Image.fromarray(img).resize((341, 256), Image.Resampling.BILINEAR))
    ref = ref[16:240, 58:282]
    diff = np.abs(data.resize_center_crop(img).astype(int) - ref)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    # and the NumPy reference center_crop (same geometry) within a level on average
    assert np.abs(data.center_crop(img).astype(int) - ref).mean() < 0.5


# ----------------------------------------------------------------------------- inputs


def test_bytes_and_arrays_agree():
    """No reduced decoding (small images): identical; with it (large images): close."""
    pre_train, pre_eval = _preprocess(True), _preprocess(False)
    small = _encode(_photo(300, 420, seed=2), quality=92)
    for pre in (pre_train, pre_eval):
        a = pre({"image": small, "label": 1}, np.random.default_rng(5))
        b = pre({"image": _decoded(small), "label": 1}, np.random.default_rng(5))
        np.testing.assert_array_equal(a["image"], b["image"])
    large = _encode(_photo(1200, 1600, seed=3), quality=92)
    full = _decoded(large)
    for seed in range(3):
        for pre in (pre_train, pre_eval):
            a = pre({"image": large, "label": 1}, np.random.default_rng(seed))["image"]
            b = pre({"image": full, "label": 1}, np.random.default_rng(seed))["image"]
            assert a.shape == b.shape == (224, 224, 3) and a.dtype == b.dtype == np.uint8
            # DCT-domain 1/2..1/8 decoding versus a full decode and Pillow's antialiased
            # resize: a slightly different low-pass filter
            assert np.abs(a.astype(int) - b).mean() < 3.0


def test_grey_png_and_bad_inputs():
    grey = _photo(200, 260)[..., :1]
    for blob in (_encode(grey, quality=90), _encode(_photo(200, 260), "PNG")):
        for train in (True, False):
            out = _preprocess(train)({"image": blob, "label": 0}, np.random.default_rng(0))
            assert out["image"].shape == (224, 224, 3) and out["image"].dtype == np.uint8
    # a grey JPEG becomes three equal channels
    out = data.resize_center_crop(_encode(grey, quality=90))
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    # one-channel output from an RGB JPEG
    assert data.resize_center_crop(_encode(_photo(200, 260)), channels=1).shape == (224, 224, 1)
    with pytest.raises(ValueError, match="cannot identify"):
        data.resize_center_crop(b"not an image at all")
    with pytest.raises(ValueError, match="uint8"):
        data.resize_center_crop(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="`channels` must be 1"):
        data.decode_image(_encode(grey), channels=4)
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        data.random_resized_crop_flip(_photo(64, 64), rng=0)


def test_preprocess_normalize_flag_and_decoded_presets():
    blob = _encode(_photo(250, 300, seed=4), quality=90)
    for train in (True, False):
        as_uint8 = _preprocess(train)({"image": blob, "label": 7}, np.random.default_rng(1))
        as_float = _preprocess(train, normalize=True)({"image": blob, "label": 7},
                                                      np.random.default_rng(1))
        assert as_float["image"].dtype == np.float32 and as_uint8["image"].dtype == np.uint8
        np.testing.assert_array_equal(as_float["image"],
                                      data.normalize(as_uint8["image"], INFO.mean, INFO.std))
        assert as_uint8["label"] == as_float["label"] == 7
    # other presets decode bytes in full (a 32x32 PNG for a CIFAR preset)
    cifar = data.dataset_info("cifar10")
    tiny = _photo(32, 32)
    pre = data.Preprocess("flip_crop", cifar.mean, cifar.std, cifar.image_shape, train=True)
    a = pre({"image": _encode(tiny, "PNG"), "label": 0}, np.random.default_rng(3))
    b = pre({"image": tiny, "label": 0}, np.random.default_rng(3))
    np.testing.assert_array_equal(a["image"], b["image"])


def test_cutout_on_uint8_fills_the_rounded_mean():
    cifar = data.dataset_info("cifar10")
    img = _photo(32, 32)
    kw = dict(train=True, cutout_size=8)
    f = data.Preprocess("flip_crop_cutout", cifar.mean, cifar.std, cifar.image_shape, **kw)
    u = data.Preprocess("flip_crop_cutout", cifar.mean, cifar.std, cifar.image_shape,
                        normalize=False, **kw)
    a = f({"image": img, "label": 0}, np.random.default_rng(2))["image"]
    b = u({"image": img, "label": 0}, np.random.default_rng(2))["image"]
    assert b.dtype == np.uint8
    bound = 0.5 / (255 * np.asarray(cifar.std)) + 1e-6
    diff = np.abs(data.normalize(b, cifar.mean, cifar.std) - a)
    assert (diff <= bound).all() and (a == 0).all(axis=-1).sum() >= 16  # the square is there


# ----------------------------------------------------------------------------- sources


def _folder(tmp_path, sizes, classes=("cat", "dog", "emu")):
    root = tmp_path / "images"
    root.mkdir()
    for i, (h, w) in enumerate(sizes):
        d = root / classes[i % len(classes)]
        d.mkdir(exist_ok=True)
        (d / f"{i:03d}.JPEG").write_bytes(_encode(_photo(h, w, seed=i), quality=85))
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_source(tmp_path):
    root = _folder(tmp_path, [(60, 80), (80, 60), (70, 70), (64, 96), (96, 64)])
    src = data.ImageFolderSource(root)
    assert len(src) == 5 and src.classes == ["cat", "dog", "emu"]
    np.testing.assert_array_equal(src.labels, [0, 0, 1, 1, 2])
    ex = src[2]
    assert isinstance(ex["image"], bytes) and ex["label"] == 1
    assert data.decode_image(ex["image"]).shape == (80, 60, 3)
    with pytest.raises(ValueError, match="no image files"):
        data.ImageFolderSource(_empty(tmp_path))
    with pytest.raises(ValueError, match="not a directory"):
        data.ImageFolderSource(tmp_path / "missing")
    few = dataclasses.replace(INFO, num_classes=2)
    with pytest.raises(ValueError, match="3 class directories"):
        data.ImageFolderSource(root, few)


def _empty(tmp_path):
    d = tmp_path / "empty"
    (d / "a").mkdir(parents=True)
    return d


def test_tfds_undecoded_images_mocked():
    """load(decode=False) asks TFDS for SkipDecoding and hands the encoded bytes over."""
    tfds = pytest.importorskip("tensorflow_datasets")
    arrays = [_photo(90 + 10 * i, 120, seed=i) for i in range(4)]
    seen = []

    def as_data_source(builder, split, decoders=None, **kwargs):
        skip = decoders is not None and isinstance(decoders.get("image"),
                                                   tfds.decode.SkipDecoding)
        seen.append(skip)
        return [{"image": _encode(a, quality=90) if skip else _decoded(_encode(a, quality=90)),
                 "label": i} for i, a in enumerate(arrays)]

    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        raw = data.load("imagenet2012", "test", decode=False)
        dec = data.load("imagenet2012", "test")
    assert seen == [True, False]
    assert isinstance(raw[0]["image"], bytes) and dec[0]["image"].shape == (90, 120, 3)
    np.testing.assert_array_equal(raw.labels, [0, 1, 2, 3])
    for train in (True, False):
        pre = _preprocess(train)
        for i in range(4):  # small images: no reduced decoding, so identical
            a = pre(raw[i], np.random.default_rng(i))["image"]
            b = pre(dec[i], np.random.default_rng(i))["image"]
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="pad needs decoded images"):
        data.load("imagenet2012", "test", decode=False, pad=2)


# ----------------------------------------------------------------------------- loaders


def test_imagenet_loader_determinism_and_resume_with_workers(tmp_path):
    root = _folder(tmp_path, [(48 + 4 * i, 64 + 3 * i) for i in range(18)])
    src = data.ImageFolderSource(root)
    kw = dict(batch_size=3, train=True, seed=4, epoch=1, augment="imagenet", normalize=False,
              shard_index=0, shard_count=1)
    assert data.make_loader(src, **kw).num_workers == data.available_cpus()  # the default
    full = list(data.make_loader(src, num_workers=0, **kw))
    assert len(full) == 6
    assert full[0]["image"].dtype == np.uint8 and full[0]["image"].shape == (3, 224, 224, 3)
    chex.assert_trees_all_equal(full, list(data.make_loader(src, num_workers=0, **kw)))
    # resume mid-epoch in worker processes: exactly the remaining batches
    resumed = list(data.make_loader(src, num_workers=2, start_step=2, **kw))
    chex.assert_trees_all_equal(resumed, full[2:])
    other = list(data.make_loader(src, num_workers=0, **{**kw, "epoch": 2}))
    assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(full, other))
    # every example once per epoch, labels following the folder's classes
    labels = np.concatenate([b["label"] for b in full])
    np.testing.assert_array_equal(np.sort(labels), np.sort(src.labels))
    evaluation = list(data.make_loader(src, batch_size=4, train=False, augment="imagenet",
                                       num_workers=0, shard_index=0, shard_count=1))
    assert [b["image"].shape[0] for b in evaluation] == [4, 4, 4, 4, 2]
    assert evaluation[0]["image"].dtype == np.float32
    np.testing.assert_array_equal(
        evaluation[0]["image"][1],
        data.normalize(data.resize_center_crop(src[1]["image"]), INFO.mean, INFO.std))


class _Opaque(data.Source):
    """The same examples behind a source the loader cannot see through (per-example path)."""

    def __init__(self, parent):
        self.parent, self.info = parent, parent.info

    def __len__(self):
        return len(self.parent)

    def _get(self, i):
        return self.parent[i]

    def _all_labels(self):
        return self.parent.labels


def _digits_like(n=203, shape=(6, 5, 1)):
    rng = np.random.default_rng(0)
    info = dataclasses.replace(data.dataset_info("digits"), image_shape=shape)
    return data.ArraySource(rng.integers(0, 256, (n, *shape), dtype=np.uint8),
                            rng.integers(0, 10, n), info)


@pytest.mark.parametrize("kw", [
    dict(train=True, augment="none"),
    dict(train=False, augment="flip_crop"),
    dict(train=True, augment="none", drop_remainder=False, start_step=3),
    dict(train=False, augment="none", shard_index=1, shard_count=3),
    dict(train=True, augment="none", shard_index=0, shard_count=2, normalize=False),
    dict(train=True, augment="none", non_iid_classes=4),
])
def test_whole_array_batches_equal_per_example_batches(kw):
    base = _digits_like()
    kw = {"shard_index": 0, "shard_count": 1, **kw}
    # a padded subset of an in-memory source, as load(..., split="...[a:b]", pad=2) builds it
    sub = data.SubsetSource(base, np.arange(3, 203, 1))
    padded = data.sources.PaddedSource(sub, 2)
    for src in (base, padded):
        fast = data.make_loader(src, batch_size=16, seed=1, epoch=2, **kw)
        slow = data.make_loader(_Opaque(src), batch_size=16, seed=1, epoch=2, **kw)
        assert fast.whole_batches and not slow.whole_batches
        got, want = list(fast), list(slow)
        assert len(got) == len(want) == len(fast) > 0
        chex.assert_trees_all_equal(got, want)
        assert got[0]["image"].dtype == (np.uint8 if kw.get("normalize") is False
                                         else np.float32)
        assert got[0]["label"].dtype == np.int32


def test_augmented_presets_stay_per_example():
    src = _digits_like(shape=(8, 8, 1))
    assert not data.make_loader(src, batch_size=8, train=True, augment="flip_crop",
                                shard_index=0, shard_count=1).whole_batches
    pre = data.Preprocess("flip_crop", src.info.mean, src.info.std, src.info.image_shape,
                          train=True)
    with pytest.raises(ValueError, match="works example by example"):
        pre.batch(src.images[:4], src.labels[:4])


# ----------------------------------------------------------------------------- device


def test_normalize_on_device_matches_host():
    images = np.random.default_rng(0).integers(0, 256, (4, 9, 7, 3), dtype=np.uint8)
    host = np.stack([data.normalize(im, INFO.mean, INFO.std) for im in images])
    fn = jax.jit(lambda x: data.normalize_on_device(x, INFO.mean, INFO.std))
    out = fn(images)
    assert out.dtype == jnp.float32 and out.shape == images.shape
    chex.assert_trees_all_close(np.asarray(out), host, atol=1e-6, rtol=1e-6)
    half = data.normalize_on_device(jnp.asarray(images), INFO.mean, INFO.std, jnp.bfloat16)
    assert half.dtype == jnp.bfloat16
    chex.assert_trees_all_close(np.asarray(half, np.float32), host, atol=0.02, rtol=0.01)
    with pytest.raises(ValueError, match="one value per channel"):
        data.normalize_on_device(images, (0.5,), (0.2,))


def test_prefetch_to_device_in_order():
    batches = [{"image": np.full((2, 3), i, np.uint8), "label": np.arange(2) + i}
               for i in range(5)]
    for size in (1, 2, 8):
        out = list(data.prefetch_to_device(iter(batches), size=size))
        assert len(out) == 5 and all(isinstance(b["image"], jax.Array) for b in out)
        chex.assert_trees_all_equal([jax.device_get(b) for b in out], batches)
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    n = jax.device_count() * 2
    host = [{"x": np.arange(n * 3, dtype=np.float32).reshape(n, 3) + k} for k in range(3)]
    out = list(data.prefetch_to_device(host, sharding=sharding))
    assert out[1]["x"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(out[2]["x"]), host[2]["x"])
    with pytest.raises(ValueError, match="`size` must be a positive int"):
        next(data.prefetch_to_device(batches, size=0))
