"""Train and eval steps: cross-entropy loss, accuracy, running statistics, example weighing.

The steps are pure functions of ``(state, batch)``; :func:`jit_train_step` and
:func:`jit_eval_step` compile them for a data-parallel mesh (batch sharded over the
``"data"`` axis, state replicated; one device works the same). XLA partitions the norm
layers' statistics over the sharded batch itself, so a ``GhostNorm`` with groups aligned
to the devices needs no communication and ``BatchNorm`` reduces across them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh

from seqnorm_jax.distributed import DATA_AXIS, batch_sharding, replicated_sharding
from seqnorm_jax.linen import LAYERS
from seqnorm_jax.train.state import TrainState, step_rngs

__all__ = [
    "StepAccumulator",
    "cross_entropy_loss",
    "guarded_step",
    "init_accumulator",
    "jit_loop_step",
    "reset_accumulator",
    "eval_step",
    "example_weight_scope",
    "jit_eval_step",
    "jit_train_step",
    "output_noise_scope",
    "train_step",
]

_NORM_CLASSES = tuple(cls for name, cls in LAYERS.items() if name != "Identity")
# Layers whose output `output_noise_scope` perturbs: ours and flax's own norm layers.
_NOISE_TARGETS = _NORM_CLASSES + (nn.BatchNorm, nn.GroupNorm, nn.LayerNorm)


def global_norm(tree: Any) -> jax.Array:
    """The l2 norm of all leaves of ``tree`` together, in float32 (any optax version)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                        for g in jax.tree_util.tree_leaves(tree)))


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy with integer labels, computed in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


@contextlib.contextmanager
def example_weight_scope(example_weight: float | jax.Array):
    """Pass ``example_weight`` to every seqnorm-jax norm layer called inside the scope.

    The "Four Things" inference example weighing (paper 002) is a call argument of the
    layers (``layer(x, example_weight=a)``). This scope sets it on every norm layer's
    call through ``flax.linen.intercept_methods``, so a model needs no extra argument to
    forward it. Use it around inference (``train=False``) only: the layers reject a
    non-zero weight in training.
    """

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, _NORM_CLASSES):
            kwargs = {**kwargs, "example_weight": example_weight}
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield


@contextlib.contextmanager
def output_noise_scope(mean: float, std: float, rng_name: str = "output_noise"):
    """Add Gaussian noise ``N(mean, std**2)`` to the output of every norm layer in the scope.

    Paper 004's robustness study (section 3, Figures 5 and 11) distorts the output
    distribution of every normalization layer with ``mean=1e-3, std=1.001`` during
    training. The noise is drawn per element with ``module.make_rng(rng_name)``, so
    ``apply`` needs ``rngs={rng_name: key}`` (:func:`~seqnorm_jax.train.step_rngs`
    provides ``"output_noise"``). It perturbs seqnorm-jax's layers (not ``Identity``)
    and flax's ``BatchNorm``, ``GroupNorm`` and ``LayerNorm``; :func:`train_step` uses it
    when given ``output_noise``.
    """

    def interceptor(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and isinstance(context.module, _NOISE_TARGETS):
            noise = jax.random.normal(context.module.make_rng(rng_name), y.shape, jnp.float32)
            y = y + (mean + std * noise).astype(y.dtype)
        return y

    with nn.intercept_methods(interceptor):
        yield


def _noise_context(output_noise: tuple[float, float] | None):
    if output_noise is None:
        return contextlib.nullcontext()
    mean, std = output_noise
    return output_noise_scope(mean, std)


def apply_update(state: TrainState, grads: Any, batch_stats: Any, loss: jax.Array,
                 grad_norm: jax.Array, guard: jax.Array | None = None) -> TrainState:
    """``state`` after the optimizer step on ``grads`` and with the new ``batch_stats``.

    With ``guard`` (a traced bool) the step is taken only if ``guard`` holds and ``loss``
    and ``grad_norm`` are finite; otherwise the state passes through unchanged. The
    choice is a ``lax.cond`` around the update, so a step that is taken costs what an
    unguarded one does (no select over the state).
    """
    def update(_):
        new = state.apply_gradients(grads=grads)
        return new.replace(batch_stats=batch_stats) if state.batch_stats else new

    if guard is None:
        return update(None)
    keep = guard & jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    return jax.lax.cond(keep, update, lambda _: state, None)


def train_step(state: TrainState, batch: dict[str, jax.Array],
               lr_fn: Callable[[Any], Any] | None = None, *,
               output_noise: tuple[float, float] | None = None,
               guard: jax.Array | None = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on ``batch`` (``{"image", "label"}``) in training mode.

    The forward pass uses the batch statistics and updates the running ones
    (``batch_stats``); the per-step ``"noise"``/``"dropout"`` rngs come from
    :func:`step_rngs`. The loss is the mean cross-entropy, in float32 also for bfloat16
    models. ``output_noise=(mean, std)`` adds that Gaussian noise to every norm layer's
    output (:func:`output_noise_scope`, paper 004's robustness study). ``guard`` (a
    traced bool): take the step only if it holds and the loss and gradient are finite
    (:func:`apply_update`; :func:`guarded_step` passes it).

    Returns:
      ``(new_state, metrics)`` with scalar ``loss``, ``accuracy``, ``grad_norm`` (before
      clipping) and ``lr`` (``lr_fn(step)`` of the step just taken, 0 if ``lr_fn`` is None).
    """
    rngs = step_rngs(state)

    def loss_fn(params):
        variables = {"params": params}
        mutable = []
        if state.batch_stats:
            variables["batch_stats"] = state.batch_stats
            mutable = ["batch_stats"]
        with _noise_context(output_noise):
            logits, updates = state.apply_fn(variables, batch["image"], train=True, rngs=rngs,
                                             mutable=mutable)
        loss = cross_entropy_loss(logits, batch["label"]).mean()
        return loss, (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = global_norm(grads)
    new_state = apply_update(state, grads, updates.get("batch_stats"), loss, grad_norm, guard)
    accuracy = jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))
    lr = jnp.asarray(lr_fn(state.step) if lr_fn is not None else 0.0, jnp.float32)
    metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": grad_norm, "lr": lr}
    return new_state, metrics


def eval_step(state: TrainState, batch: dict[str, jax.Array],
              example_weight: float | jax.Array = 0.0) -> dict[str, jax.Array]:
    """Inference with the running statistics; returns sums to aggregate over batches.

    Args:
      state: the train state.
      batch: ``{"image", "label"}`` and optionally ``"mask"`` (1 for real examples, 0 for
        padding, e.g. to fill the last batch to a multiple of the device count).
      example_weight: alpha of "Four Things" inference example weighing, passed to every
        norm layer (0: plain running statistics; 1: each example's own statistics).

    Returns:
      ``{"loss_sum", "correct", "count"}`` (float32 scalars, summed over unmasked examples).
    """
    variables = {"params": state.params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    with example_weight_scope(example_weight):
        logits = state.apply_fn(variables, batch["image"], train=False)
    labels = batch["label"]
    mask = batch.get("mask")
    mask = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    keep = mask > 0
    loss = jnp.where(keep, cross_entropy_loss(logits, labels), 0.0)  # padding cannot be NaN
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return {"loss_sum": jnp.sum(loss * mask), "correct": jnp.sum(jnp.where(keep, correct, 0.0)
                                                                  * mask),
            "count": jnp.sum(mask)}


class StepAccumulator(NamedTuple):
    """Training metrics kept on the device between two fetches, and the divergence flag.

    ``loss[:steps]`` and ``accuracy[:steps]`` hold the steps taken since the last reset
    (those before the run diverged, the diverging one included), one entry per step, so
    the host sums them in float64 step by step exactly as if it had fetched each step;
    ``lr`` is the last such step's rate. ``diverged_step`` is the 1-based global step
    whose loss or gradient was first non-finite (-1: none) and ``diverged_loss`` that
    step's loss; both survive :func:`reset_accumulator`.
    """

    loss: jax.Array
    accuracy: jax.Array
    steps: jax.Array
    lr: jax.Array
    diverged_step: jax.Array
    diverged_loss: jax.Array


def init_accumulator(size: int) -> StepAccumulator:
    """An empty :class:`StepAccumulator` for up to ``size`` steps (no divergence)."""
    z = jnp.zeros((), jnp.float32)
    buf = jnp.zeros((size,), jnp.float32)
    return StepAccumulator(buf, buf, jnp.zeros((), jnp.int32), z, jnp.full((), -1, jnp.int32), z)


def reset_accumulator(acc: StepAccumulator) -> StepAccumulator:
    """Empty ``acc``, keeping its divergence fields."""
    return init_accumulator(acc.loss.shape[0])._replace(diverged_step=acc.diverged_step,
                                                        diverged_loss=acc.diverged_loss)


def guarded_step(step_fn: Callable[..., tuple[TrainState, dict[str, jax.Array]]],
                 state: TrainState, batch: Any, acc: StepAccumulator, *,
                 stop_on_divergence: bool = True) -> tuple[TrainState, StepAccumulator]:
    """One ``step_fn`` step with its metrics recorded in ``acc`` and divergence caught on
    the device.

    A step diverges when its loss or its gradient norm is not finite. With
    ``stop_on_divergence`` (the default) that step and every later one return the state
    unchanged (``step_fn(state, batch, guard=...)``, a ``lax.cond`` in the compiled step;
    no host round trip), so the state stays the last finite one until the host sees
    ``acc.diverged_step`` and stops; otherwise the updates are applied as computed.
    ``acc`` must have room for the step (the caller resets it at least every
    ``acc.loss.shape[0]`` steps).
    """
    live = acc.diverged_step < 0 if stop_on_divergence else jnp.ones((), bool)
    if stop_on_divergence:
        new_state, m = step_fn(state, batch, guard=live)
    else:
        new_state, m = step_fn(state, batch)
    finite = jnp.isfinite(m["loss"]) & jnp.isfinite(m["grad_norm"])
    first = (acc.diverged_step < 0) & ~finite

    def record(buf, value):
        return jnp.where(live, buf.at[acc.steps].set(value.astype(jnp.float32)), buf)

    acc = StepAccumulator(
        loss=record(acc.loss, m["loss"]),
        accuracy=record(acc.accuracy, m["accuracy"]),
        steps=acc.steps + live.astype(jnp.int32),
        lr=jnp.where(live, m["lr"], acc.lr),
        diverged_step=jnp.where(first, (state.step + 1).astype(jnp.int32), acc.diverged_step),
        diverged_loss=jnp.where(first, m["loss"], acc.diverged_loss))
    return new_state, acc


def jit_loop_step(mesh: Mesh | None = None, lr_fn: Callable[[Any], Any] | None = None, *,
                  donate: bool | None = None, num_micro_batches: int = 1,
                  output_noise: tuple[float, float] | None = None,
                  stop_on_divergence: bool = True, axis_name: str = DATA_AXIS,
                  image_norm: tuple[Any, Any] | None = None):
    """:func:`guarded_step` of :func:`train_step`, compiled like :func:`jit_train_step`.

    ``step(state, batch, acc) -> (state, acc)``: the training loop's step; its metrics
    stay on the device in the :class:`StepAccumulator` until the loop fetches them.
    With ``image_norm=(mean, std)`` the batch's images arrive as uint8 pixels and are
    normalised inside the step (:func:`seqnorm_jax.data.normalize_on_device`, fused by
    XLA into the first layer), so a quarter of the bytes cross to the device and the
    host does no per-batch arithmetic.
    """
    step = _step_fn(lr_fn, num_micro_batches, output_noise)

    def fn(s, b, a):
        if image_norm is not None:
            b = normalize_images(b, image_norm)
        return guarded_step(step, s, b, a, stop_on_divergence=stop_on_divergence)

    return _jit(fn, mesh, donate, axis_name, extra_in=1)


def normalize_images(batch: dict[str, Any], image_norm: tuple[Any, Any]) -> dict[str, Any]:
    """``batch`` with its uint8 ``"image"`` normalised by ``image_norm = (mean, std)``."""
    from seqnorm_jax.data import normalize_on_device

    return {**batch, "image": normalize_on_device(batch["image"], *image_norm)}


def _step_fn(lr_fn, num_micro_batches, output_noise):
    if num_micro_batches == 1:
        return lambda s, b, guard=None: train_step(s, b, lr_fn, output_noise=output_noise,
                                                   guard=guard)
    from seqnorm_jax.train.accumulation import accumulated_train_step

    return lambda s, b, guard=None: accumulated_train_step(
        s, b, num_micro_batches, lr_fn, output_noise=output_noise, guard=guard)


def _jit(fn, mesh, donate, axis_name=DATA_AXIS, extra_in=0):
    if donate is None:
        donate = jax.default_backend() != "cpu"
    kwargs = {}
    if mesh is not None:
        rep = replicated_sharding(mesh)
        kwargs = dict(in_shardings=(rep, batch_sharding(mesh, axis_name), *([rep] * extra_in)),
                      out_shardings=(rep, rep))
    return jax.jit(fn, donate_argnums=(0,) if donate else (), **kwargs)


def jit_train_step(mesh: Mesh | None = None, lr_fn: Callable[[Any], Any] | None = None,
                   *, donate: bool | None = None, num_micro_batches: int = 1,
                   output_noise: tuple[float, float] | None = None,
                   axis_name: str = DATA_AXIS):
    """:func:`train_step` compiled for ``mesh``: batch sharded on ``"data"``, state replicated.

    Args:
      mesh: a :func:`seqnorm_jax.distributed.data_mesh`; ``None`` compiles without
        sharding constraints (inputs decide).
      lr_fn: the learning-rate schedule, for the logged ``lr``.
      donate: donate the input state's buffers (default: on accelerators, not on CPU,
        where XLA cannot reuse them).
      num_micro_batches: ``k > 1`` runs each batch as ``k`` accumulated micro-batches
        (:func:`seqnorm_jax.train.accumulated_train_step`; with BatchNorm this trains
        ``GhostNorm(batch_groups=k)``).
      output_noise: ``(mean, std)`` of Gaussian noise added to every norm layer's output
        in training (:func:`output_noise_scope`); ``None``: off.
      axis_name: the mesh axis the batch is split over.
    """
    return _jit(_step_fn(lr_fn, num_micro_batches, output_noise), mesh, donate, axis_name)


def jit_eval_step(mesh: Mesh | None = None, *, axis_name: str = DATA_AXIS):
    """:func:`eval_step` compiled for ``mesh``: ``step(state, batch, example_weight=0.0)``.

    A Python ``example_weight`` of 0 (plain running statistics, the default) calls a
    compilation with the weight as the constant 0, so the norm layers take their
    inference path (one multiply-add); any other weight, or a traced one, is an
    argument of a second compilation that serves every value.
    """
    kwargs2 = kwargs3 = {}
    if mesh is not None:
        rep, bat = replicated_sharding(mesh), batch_sharding(mesh, axis_name)
        kwargs2 = dict(in_shardings=(rep, bat), out_shardings=rep)
        kwargs3 = dict(in_shardings=(rep, bat, rep), out_shardings=rep)
    plain = jax.jit(lambda s, b: eval_step(s, b, 0.0), **kwargs2)
    weighted = jax.jit(lambda s, b, a: eval_step(s, b, a), **kwargs3)

    def step(state, batch, example_weight=0.0):
        if isinstance(example_weight, (int, float)) and example_weight == 0:
            return plain(state, batch)
        return weighted(state, batch, jnp.asarray(example_weight, jnp.float32))

    return step
