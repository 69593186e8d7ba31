"""Batches for training and evaluation with Grain: source -> shuffle -> augment -> batch -> shard.

:func:`make_loader` builds one epoch of one process's batches as a
``grain.MapDataset`` pipeline::

    MapDataset.source(SubsetSource(src, order))     # the epoch's order, see below
      .random_map(Preprocess, seed=g(seed, epoch))   # .map(...) without random ops
      .batch(batch_size, drop_remainder)
      [: steps * shard_count]              # equal step counts on every process
      [shard_index::shard_count]           # this process's batches
      [start_step:]                        # resume mid-epoch

The order is the source's in evaluation and, in training, the permutation
``np.random.default_rng(np.random.SeedSequence([seed, epoch, 0])).permutation(len(src))``
(or the non-i.i.d. order, see below).

Whole-array batches: when no example needs work of its own (no random
augmentation: the ``"none"`` preset, or evaluation of the CIFAR presets) and
the source is held in memory (an :class:`~seqnorm_jax.data.ArraySource`, or
subsets and paddings of one), the pipeline is instead
``MapDataset.range(chunks).map(gather)``: each batch is one fancy-index gather
of the epoch's order from the image array, normalised as a whole
(:meth:`Preprocess.batch`). The batches are the same values as the
per-example pipeline's, without per-example Python.

Determinism: the batches are a function of ``(src, seed, epoch)`` and the
arguments only: the order and each example's augmentation generator are
derived from ``np.random.SeedSequence([seed, epoch, stream])`` and the
example's position in the epoch, so rebuilding the loader with
``start_step=k`` gives exactly the batches ``k, k + 1, ...`` of the epoch,
without producing the first ``k`` (a ``MapDataset`` slice is lazy), with or
without worker processes.

Workers: ``num_workers=None`` (the default) starts Grain worker processes, one
per CPU core available to this process, for the presets that decode and crop
every image (``"imagenet"``: about 2-4 ms of Pillow work per image), and none
otherwise (the CIFAR/MNIST presets run at tens of thousands of images per
second per core, faster than a worker could hand them over). Each worker
produces whole batches. Device transfer ahead of the step is
:func:`~seqnorm_jax.data.prefetch_to_device`'s job.

Sharding (multi-host data parallelism): ``batch_size`` is the per-process
batch. The epoch is one sequence of ``batch_size`` chunks; process ``p`` of
``P`` takes chunks ``p, p + P, p + 2P, ...``. Step ``s``'s global batch (the
processes' batches of step ``s`` in process order) is therefore exactly the
batch ``s`` a single process would read with ``batch_size * P``: the data a
run sees does not depend on how many processes share it. With
``drop_remainder=True`` every process gets ``len(src) // (batch_size * P)``
batches (the examples past the last full global batch are dropped, different
ones each epoch when shuffled). With ``drop_remainder=False`` (evaluation)
nothing is dropped, the last chunk may be short, and processes' step counts
can differ by one (:func:`steps_per_epoch` with ``shard_index`` gives each).

Non-i.i.d. batches (paper 002, section 4.4, after Batch Renormalization):
"each minibatch is comprised of examples from only four random categories
(sampled with replacement), each of which is represented with 32 examples in
the minibatch" (CIFAR-100, batch 128). With ``non_iid_classes=k``, each global
batch (``batch_size * shard_count`` examples) draws ``k`` distinct classes
uniformly at random, independently of the other batches (so classes are
sampled with replacement across batches and one class can recur in any
number of batches), and takes ``batch_size * shard_count / k`` examples of
each; the batch is then shuffled so that ghost batches and shards do not
follow the class blocks. Within a class, examples are drawn without
replacement from a random permutation of the class, and a fresh permutation
starts when it is used up, so over an epoch every example of a class is used
about equally often. An epoch has the same number of steps as the i.i.d.
loader with ``drop_remainder=True``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import grain
import numpy as np

from seqnorm_jax import checks
from seqnorm_jax.data.augment import PRESETS
from seqnorm_jax.data.preprocess import Preprocess
from seqnorm_jax.data.sources import Source, SubsetSource, in_memory_view, pad_images

__all__ = ["Loader", "make_loader", "non_iid_indices", "steps_per_epoch"]

_SHUFFLE, _AUGMENT, _NON_IID = 0, 1, 2


def _derived_seed(seed: int, epoch: int, stream: int) -> int:
    """A 32-bit seed (Grain's range) for one (seed, epoch, stream) triple."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1, np.uint32)[0])


def _resolve_shards(shard_index, shard_count) -> tuple[int, int]:
    if shard_count is None or shard_index is None:
        import jax

        shard_count = jax.process_count() if shard_count is None else shard_count
        shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = checks.positive_int(shard_count, "shard_count")
    if isinstance(shard_index, bool) or not isinstance(shard_index, (int, np.integer)) \
            or not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be an int in [0, {shard_count}), got "
                         f"{shard_index!r}.")
    return int(shard_index), int(shard_count)


def steps_per_epoch(src: Source | int, batch_size: int, drop_remainder: bool = True,
                    shard_count: int | None = None, *, shard_index: int | None = None) -> int:
    """Number of batches one process reads in an epoch.

    Args:
      src: the source (or its length).
      batch_size: the per-process batch size.
      drop_remainder: as :func:`make_loader`'s (non-i.i.d. loaders always drop).
      shard_count, shard_index: as :func:`make_loader`'s (default: JAX's process
        count and index). ``shard_index`` matters only with
        ``drop_remainder=False``.

    Returns:
      ``len(src) // (batch_size * shard_count)`` when dropping the remainder,
      else the number of ``batch_size`` chunks (the last possibly short) that
      fall to ``shard_index``.
    """
    n = src if isinstance(src, (int, np.integer)) else len(src)
    batch_size = checks.positive_int(batch_size, "batch_size")
    shard_index, shard_count = _resolve_shards(shard_index, shard_count)
    if drop_remainder:
        return int(n) // (batch_size * shard_count)
    chunks = -(-int(n) // batch_size)
    return len(range(shard_index, chunks, shard_count))


def non_iid_indices(labels: np.ndarray, *, batch_size: int, classes_per_batch: int,
                    num_batches: int, rng: np.random.Generator) -> np.ndarray:
    """Example order of ``num_batches`` non-i.i.d. batches (paper 002, section 4.4).

    Each batch takes ``classes_per_batch`` distinct classes drawn uniformly
    (independently of the other batches) and ``batch_size / classes_per_batch``
    examples of each, drawn without replacement from a per-class permutation
    that is renewed when used up; the batch is then shuffled.

    Args:
      labels: int ``(N,)``, the label of every example.
      batch_size: examples per batch, a multiple of ``classes_per_batch``.
      classes_per_batch: ``k``, at most the number of classes present.
      num_batches: batches to produce.
      rng: the generator of every random choice.

    Returns:
      int64 ``(num_batches * batch_size,)`` indices into ``labels``, batch after batch.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    k = classes_per_batch
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= classes.size:
        raise ValueError(f"non_iid_classes must be an int in [1, {classes.size}] (the classes "
                         f"present), got {k!r}.")
    if batch_size % k:
        raise ValueError(f"non_iid_classes={k} must divide the global batch size {batch_size} "
                         f"(batch_size * shard_count) so that each class gets the same number "
                         f"of examples.")
    per_class = batch_size // k
    members = [np.flatnonzero(labels == c) for c in classes]
    queues = [rng.permutation(m) for m in members]
    heads = [0] * classes.size
    out = np.empty((num_batches, batch_size), dtype=np.int64)
    for b in range(num_batches):
        chosen = rng.choice(classes.size, size=k, replace=False)
        parts = []
        for c in chosen:
            need = per_class
            while need:
                take = min(need, queues[c].size - heads[c])
                parts.append(queues[c][heads[c]:heads[c] + take])
                heads[c] += take
                need -= take
                if heads[c] == queues[c].size:
                    queues[c], heads[c] = rng.permutation(members[c]), 0
        out[b] = rng.permutation(np.concatenate(parts))
    return out.reshape(-1)


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class _ArrayBatches:
    """Batch ``b`` of an in-memory epoch: one gather of its rows, preprocessed as a whole.

    Picklable (module-level class), so Grain worker processes can run it.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, rows: np.ndarray, pad: int,
                 batch_size: int, preprocess: Preprocess):
        self.images = images
        self.labels = labels
        self.rows = rows
        self.pad = pad
        self.batch_size = batch_size
        self.preprocess = preprocess

    def __call__(self, b) -> dict:
        rows = self.rows[int(b) * self.batch_size:(int(b) + 1) * self.batch_size]
        return self.preprocess.batch(pad_images(self.images[rows], self.pad), self.labels[rows])


class Loader:
    """One epoch of one process's batches; iterate it, or index :attr:`dataset`.

    Each batch is ``{"image": float32 (B, H, W, C), "label": int32 (B,)}``, the
    images normalised with the dataset's ``info.mean`` / ``info.std`` (uint8 images,
    unnormalised, from ``make_loader(..., normalize=False)``).

    Attributes:
      dataset: the ``grain.MapDataset`` of this process's batches from
        ``start_step`` on (random access, lazy).
      steps_per_epoch: the epoch's full number of batches for this process.
      start_step: the first batch produced.
      num_workers: Grain worker processes used by iteration (0: in this thread).
        With workers, Grain 0.2.x reads absl flags, so iteration marks them as
        parsed (with their defaults) when the program has not parsed them.
      whole_batches: whether batches are gathered as whole arrays (see the
        module docstring) rather than assembled example by example.
    """

    def __init__(self, dataset: grain.MapDataset, steps_per_epoch: int, start_step: int,
                 num_workers: int, whole_batches: bool = False):
        self.dataset = dataset
        self.steps_per_epoch = steps_per_epoch
        self.start_step = start_step
        self.num_workers = num_workers
        self.whole_batches = whole_batches

    def __len__(self) -> int:
        """Batches left in the epoch: ``steps_per_epoch - start_step``."""
        return len(self.dataset)

    def __iter__(self) -> Iterator[dict]:
        if self.num_workers == 0:
            return (self.dataset[i] for i in range(len(self.dataset)))
        # Grain 0.2.x reads absl flags when it starts workers and fails if the program never
        # parsed them (programs not run through absl.app); use the flags' defaults then.
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        # Workers do the work, so each reads with one thread and a one-batch buffer.
        read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)
        options = grain.MultiprocessingOptions(num_workers=self.num_workers)
        return iter(self.dataset.to_iter_dataset(read).mp_prefetch(options))

    def __repr__(self) -> str:
        return (f"Loader(steps_per_epoch={self.steps_per_epoch}, start_step={self.start_step}, "
                f"num_workers={self.num_workers}, whole_batches={self.whole_batches})")


def make_loader(src: Source, *, batch_size: int, train: bool, seed: int = 0, epoch: int = 0,
                augment: str = "none", drop_remainder: bool | None = None,
                shard_index: int | None = None, shard_count: int | None = None,
                non_iid_classes: int | None = None, num_workers: int | None = None,
                start_step: int = 0, normalize: bool = True) -> Loader:
    """One epoch of batches of ``src`` for this process (see the module docstring).

    Args:
      src: a :class:`~seqnorm_jax.data.sources.Source` (from
        :func:`~seqnorm_jax.data.load`).
      batch_size: the per-process batch size.
      train: shuffle and augment (True), or read in order with the evaluation
        transform (False).
      seed: the run's data seed.
      epoch: the epoch number; each epoch has its own order and augmentation.
      augment: an augmentation preset (``"none"``, ``"flip_crop"``,
        ``"flip_crop_cutout"``, ``"imagenet"``) or ``"default"`` for the
        dataset's ``info.default_augment``.
      drop_remainder: drop the last incomplete global batch; default ``train``.
      shard_index, shard_count: this process's shard; default
        ``jax.process_index()`` and ``jax.process_count()``.
      non_iid_classes: ``k`` to draw each global batch from ``k`` random classes
        (training only; always drops the remainder).
      num_workers: Grain worker processes (0: produce batches in the iterating
        thread); ``None``: one per available CPU core for the ``"imagenet"``
        preset, 0 for the others (see the module docstring).
      start_step: the first batch to produce (``0 <= start_step <=
        steps_per_epoch``), for an exact resume mid-epoch.
      normalize: float32 images normalised with ``src.info.mean``/``std`` (True),
        or uint8 images (a quarter of the bytes to move to the device) for
        :func:`~seqnorm_jax.data.normalize_on_device` inside the jitted step.

    Returns:
      A :class:`Loader`.

    Raises:
      ValueError: an invalid argument, named in the message.
    """
    if not isinstance(src, Source):
        raise TypeError(f"make_loader: `src` must be a seqnorm_jax.data Source (from "
                        f"seqnorm_jax.data.load), got {type(src).__name__}.")
    batch_size = checks.positive_int(batch_size, "batch_size")
    seed = checks.positive_int(seed, "seed", allow_zero=True)
    epoch = checks.positive_int(epoch, "epoch", allow_zero=True)
    if num_workers is not None:
        num_workers = checks.positive_int(num_workers, "num_workers", allow_zero=True)
    start_step = checks.positive_int(start_step, "start_step", allow_zero=True)
    shard_index, shard_count = _resolve_shards(shard_index, shard_count)
    preset = src.info.default_augment if augment == "default" else augment
    if preset not in PRESETS:
        raise ValueError(f"unknown augment {augment!r}; choose one of {PRESETS} or 'default' "
                         f"(this dataset's: {src.info.default_augment!r}).")
    if drop_remainder is None:
        drop_remainder = bool(train)
    global_batch = batch_size * shard_count

    if non_iid_classes is not None:
        if not train:
            raise ValueError("non_iid_classes applies to training batches; use train=True or "
                             "non_iid_classes=None for evaluation.")
        if not drop_remainder:
            raise ValueError("non_iid_classes builds full batches only; leave drop_remainder "
                             "at its default (True in training).")
        steps = len(src) // global_batch
        rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, _NON_IID]))
        order = non_iid_indices(src.labels, batch_size=global_batch,
                                classes_per_batch=non_iid_classes, num_batches=steps, rng=rng)
    else:
        steps = steps_per_epoch(src, batch_size, drop_remainder, shard_count,
                                shard_index=shard_index)
        order = None
        if train:
            rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, _SHUFFLE]))
            order = rng.permutation(len(src))
    if start_step > steps:
        raise ValueError(f"start_step={start_step} is past the end of the epoch "
                         f"({steps} steps).")

    info = src.info
    preprocess = Preprocess(preset, info.mean, info.std, info.image_shape, train=train,
                            normalize=normalize)
    view = None if preprocess.per_example else in_memory_view(src)
    if view is not None:
        root, rows, pad = view
        if order is not None:
            rows = order if rows is None else rows[order]
        elif rows is None:
            rows = np.arange(len(src))
        examples = len(rows)
        chunks = examples // batch_size if drop_remainder else -(-examples // batch_size)
        ds = grain.MapDataset.range(chunks).map(
            _ArrayBatches(root.images, root.labels, rows, pad, batch_size, preprocess))
    else:
        ds = grain.MapDataset.source(src if order is None else SubsetSource(src, order))
        if preprocess.per_example and train:
            ds = ds.random_map(preprocess, seed=_derived_seed(seed, epoch, _AUGMENT))
        else:
            ds = ds.map(preprocess)
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if drop_remainder:
        ds = ds[: steps * shard_count]
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    ds = ds[start_step:]
    if num_workers is None:
        num_workers = available_cpus() if preset == "imagenet" else 0
    return Loader(ds, steps, start_step, num_workers, whole_batches=view is not None)
