"""What a :class:`~seqnorm_jax.train.TrainConfig` builds, checked before any work, and evaluation.

* :func:`build_model` and :func:`load_sources`: the config's model and data sources.
* :func:`check_step` traces the run's training step abstractly (``jax.eval_shape``:
  shapes only, nothing computed or compiled) on a batch of the run's global size,
  sharded over the run's mesh (:func:`loop_step_arguments`). Every norm layer of the
  model then sees the shape it will see in training, so a group count that does not
  divide the batch or a layer's width, or a setting the mesh cannot shard, fails there
  in a second, with one message naming the setting (:func:`fit_errors`), instead of
  after other runs have trained. The layers' own fields are range-checked on the way
  (``momentum`` in ``[0, 1]``, ``epsilon > 0``, ``noise_std >= 0``: the rules of
  :mod:`seqnorm_jax.checks`).
* :func:`evaluate`: every example of a source once, one compilation for all batches.
  The batches are padded to one fixed size that the mesh's devices divide (the padding
  is masked out), and in a multi-process run every process runs the same number of
  steps (they are collective): a process whose shard has fewer batches finishes with
  fully masked ones.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from seqnorm_jax import checks, registry
from seqnorm_jax.distributed import (
    batch_sharding,
    data_mesh,
    mesh_batch_axis,
    mesh_context,
    replicated_sharding,
    shard_batch,
)
from seqnorm_jax.train.compiled import init_accumulator, jit_eval_step
from seqnorm_jax.train.config import TrainConfig
from seqnorm_jax.train.state import TrainState, create_train_state, model_norm_paths

__all__ = ["build_model", "check_norm_fields", "check_step", "checked_norm_paths", "evaluate",
           "fit_errors", "load_sources", "loop_step_arguments", "source_num_classes"]


def _dtype(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def build_model(config: TrainConfig, num_classes: int) -> nn.Module:
    """``seqnorm_jax.models.get_model`` for ``config`` (model, norm, dtype, model_kwargs)."""
    from seqnorm_jax.models import get_model

    return get_model(config.model, norm=config.norm, num_classes=num_classes,
                     dtype=_dtype(config.dtype), **config.model_kwargs)


def load_sources(config: TrainConfig):
    """The training and evaluation sources of ``config`` (via ``seqnorm_jax.data.load``).

    With ``validation_size`` the evaluation source is the held-out part of the training
    set (``"validation"``) and training uses the rest (``"train_minus_val"``); otherwise
    the training source is ``"train"`` and the evaluation one ``config.eval_split``.
    ``train_size`` then keeps a stratified random subset of the training source
    (``seqnorm_jax.data.stratified_holdout``, seeded by ``seed``).

    Raises:
      seqnorm_jax.data.DatasetNotFoundError: the dataset is not available locally.
    """
    from seqnorm_jax import data

    common = dict(data_dir=config.data_dir, source=config.data_source, seed=config.seed)
    if config.validation_size:
        common["validation_size"] = config.validation_size
        train = data.load(config.dataset, "train_minus_val", **common)
        evaluation = data.load(config.dataset, "validation", **common)
    else:
        train = data.load(config.dataset, "train", **common)
        evaluation = data.load(config.dataset, config.eval_split, **common)
    if config.train_size and config.train_size != len(train):
        if config.train_size > len(train):
            raise ValueError(f"train_size={config.train_size} is larger than the training set "
                             f"({len(train)} examples); use at most {len(train)} or leave it "
                             "unset.")
        train = data.SubsetSource(
            train, data.stratified_holdout(train.labels, config.train_size, config.seed))
    return train, evaluation


def source_num_classes(source) -> int:
    info = getattr(source, "info", None)
    if info is None or not hasattr(info, "num_classes"):
        raise ValueError("the data source has no .info.num_classes; pass num_classes to Trainer.")
    return int(info.num_classes)


# ------------------------------------------------------------- checks before any work
# field -> its range rule, defined once in seqnorm_jax.checks
_FIELD_RULES = {"momentum": checks.momentum, "epsilon": checks.epsilon,
                "noise_std": checks.noise_std}


def check_norm_fields(module: nn.Module) -> None:
    """Raise ``ValueError`` if a norm layer's ``momentum``, ``epsilon`` or ``noise_std`` is
    not a number or out of its range (the rules of :mod:`seqnorm_jax.checks`)."""
    who = type(module).__name__
    for field, rule in _FIELD_RULES.items():
        v = getattr(module, field, None)
        if v is None:
            continue
        if not isinstance(v, (int, float, np.number)) or isinstance(v, bool):
            raise ValueError(f"{who}: {field} must be a number, got {v!r}.")
        rule(float(v), who)


def _check_fields(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and registry.is_norm_layer(context.module):
        check_norm_fields(context.module)
    return next_fun(*args, **kwargs)


def check_step(loop_step: Any, model: nn.Module, tx: Any, config: TrainConfig, mesh: Mesh,
               batch_axis: Any, image_shape: tuple[int, ...],
               flag: str = "TrainConfig.norm (--norm)") -> None:
    """Trace ``loop_step`` (the run's compiled step) on :func:`loop_step_arguments`:
    abstract values, nothing is computed or compiled.

    Raises:
      ValueError: the norm layers do not fit the batch, the devices or the model's
        widths, or a layer field is out of range; one line naming ``flag``, the spec,
        the run's batch and devices, and the layer's own message (:func:`fit_errors`).
    """
    with fit_errors(config, mesh, flag), mesh_context(mesh), \
            nn.intercept_methods(_check_fields):
        jax.eval_shape(loop_step, *loop_step_arguments(model, tx, config, image_shape, mesh,
                                                       batch_axis))


def loop_step_arguments(model: nn.Module, tx: Any, config: TrainConfig,
                        image_shape: tuple[int, ...], mesh: Mesh, batch_axis: Any
                        ) -> tuple[Any, Any, Any]:
    """``(state, batch, accumulator)`` of the loop's step as ``jax.ShapeDtypeStruct`` s
    sharded as in training (a batch of ``config.batch_size`` images of ``image_shape``
    split over ``batch_axis``, the rest replicated); nothing is computed. Call it under
    ``mesh_context(mesh)``."""
    shape = tuple(image_shape)
    sample = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    bat = batch_sharding(mesh, batch_axis)
    batch = {"image": jax.ShapeDtypeStruct((config.batch_size, *shape), jnp.uint8,
                                           sharding=bat),
             "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=bat)}
    rep = replicated_sharding(mesh)
    state = jax.eval_shape(
        lambda x: create_train_state(model, jax.random.key(0), x, tx), sample)
    state = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), state)
    acc = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
        jax.eval_shape(lambda: init_accumulator(config.log_every)))
    return state, batch, acc


def checked_norm_paths(model: nn.Module, sample_input: Any, config: TrainConfig,
                       mesh: Mesh) -> tuple[str, ...]:
    """:func:`~seqnorm_jax.train.model_norm_paths` of ``model``, with the norm layers'
    fields checked and any error named as :func:`check_step` names it (the optimizer
    needs the paths before the step can be traced)."""
    with fit_errors(config, mesh), nn.intercept_methods(_check_fields):
        return model_norm_paths(model, sample_input)


@contextlib.contextmanager
def fit_errors(config: TrainConfig, mesh: Mesh, flag: str = "TrainConfig.norm (--norm)"):
    """Turn a norm layer's error inside the block into one line naming ``flag``, the spec,
    the run's model, batch and devices (``config``, ``mesh``), and the layer's own message."""
    c = config
    try:
        yield
    except Exception as e:  # noqa: BLE001 - jax's sharding type errors are not public
        if not isinstance(e, (ValueError, TypeError, IndexError)) \
                and type(e).__name__ != "ShardingTypeError":
            raise
        text = " ".join(ln.strip() for ln in str(e).strip().splitlines() if ln.strip())
        text = text.split(" -------------------- ")[0]
        devices = mesh.devices.size
        raise ValueError(
            f"{flag}={c.norm!r} does not fit this run (model {c.model}, batch {c.batch_size} "
            f"over {devices} device{'s' if devices > 1 else ''}): {text}") from None


# ------------------------------------------------------------------------ evaluation
def _pad_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Pad ``batch`` to ``size`` examples (zeros) and add a 0/1 ``mask``."""
    n = len(batch["label"])
    out = {k: np.asarray(v) for k, v in batch.items() if k in ("image", "label")}
    mask = np.ones((n,), np.float32)
    if n < size:
        pad = size - n
        out = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])
               for k, v in out.items()}
        mask = np.concatenate([mask, np.zeros((pad,), np.float32)])
    out["mask"] = mask
    return out


def evaluate(state: TrainState, source, *, batch_size: int = 1000, example_weight: float = 0.0,
             mesh: Mesh | None = None, eval_step=None) -> dict[str, float]:
    """Loss and accuracy of ``state`` on all of ``source`` (running statistics).

    The batches are padded to a fixed size that the mesh's devices divide (padded
    examples are masked out), so every example counts once and one compilation serves
    all batches.

    Args:
      state: the train state (replicated on ``mesh``).
      source: a random-access data source (``seqnorm_jax.data.load``).
      batch_size: examples per evaluation batch (rounded up to a multiple of the
        number of devices).
      example_weight: "Four Things" alpha passed to every norm layer.
      mesh: the data mesh (default: all devices).
      eval_step: a compiled :func:`~seqnorm_jax.train.jit_eval_step` to reuse.

    Returns:
      ``{"eval_loss", "eval_accuracy", "count"}``.
    """
    from seqnorm_jax import data

    mesh = data_mesh() if mesh is None else mesh
    axis = mesh_batch_axis(mesh)
    eval_step = jit_eval_step(mesh, axis_name=axis) if eval_step is None else eval_step
    devices = mesh.devices.size
    procs = jax.process_count()
    local_batch = -(-batch_size // procs)
    local_devices = max(1, devices // procs)
    padded = -(-local_batch // local_devices) * local_devices
    shard = dict(shard_index=jax.process_index(), shard_count=procs) if procs > 1 else {}
    loader = data.make_loader(source, batch_size=local_batch, train=False, drop_remainder=False,
                              **shard)
    # Every process must run the same number of steps (they are collective): the first
    # process has the most batches; the others finish with fully masked ones.
    num_batches = data.steps_per_epoch(source, local_batch, False, procs, shard_index=0)
    # a process with no batch left (or none at all) runs an empty, fully masked one
    empty = {"image": np.zeros((0, *source.info.image_shape), np.float32),
             "label": np.zeros((0,), np.int32)}
    totals = None
    batches = iter(loader)
    for _ in range(num_batches):
        batch = next(batches, empty)
        sums = eval_step(state, shard_batch(_pad_batch(batch, padded), mesh, axis),
                         example_weight)
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    if totals is None:
        raise ValueError("evaluate: the evaluation source is empty.")
    totals = jax.device_get(totals)
    count = float(totals["count"])
    return {"eval_loss": float(totals["loss_sum"]) / count,
            "eval_accuracy": float(totals["correct"]) / count, "count": count}
