"""The train step (with gradient accumulation as a parameter) and the eval step.

The steps are pure functions of ``(state, batch)``; :mod:`seqnorm_jax.train.compiled`
compiles them for a data-parallel mesh. Every forward pass of a
:class:`~seqnorm_jax.train.TrainState`, here and in :mod:`seqnorm_jax.analysis`, goes
through :func:`apply_model`, which builds the variables (``params``, and
``batch_stats`` when the model has running statistics) and applies the model.

Gradient accumulation is GhostNorm (papers 000/001, section 2.3)
-----------------------------------------------------------------
``train_step(..., micro_batches=k)`` splits the batch into ``k`` contiguous
micro-batches that a ``lax.scan`` runs one after the other (activation memory of one
micro-batch) and takes one optimizer step on the mean gradient. Through BatchNorm this
computes the gradient of one batch of ``N`` samples through
``GhostNorm(batch_groups=k)``: each micro-batch is normalized with its own statistics,
exactly as a contiguous ghost batch is. A layer with ``batch_groups=g`` under ``k``-fold
accumulation acts as ``batch_groups=g * k`` on the whole batch.

The rule that keeps the equivalence for the running statistics: **they change once per
optimizer step, by one EMA step towards the mean, over the ``k`` micro-batches, of each
micro-batch's statistics.** Every micro-batch starts from the same ``batch_stats``; its
forward pass returns ``momentum * ra + (1 - momentum) * t_i``; the committed value is
the mean of those ``k`` results. This is GhostNorm's own rule (see ``METHODS.md``), so
after one optimizer step the ``batch_stats`` equal those of the full batch through
``GhostNorm(batch_groups=k)``. (PyTorch loops that let every micro-batch move the EMA
take ``k`` EMA steps per optimizer step instead.) Loops that stream micro-batches one
call at a time use :class:`MicroBatchStats` next to ``optax.MultiSteps``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from seqnorm_jax import checks
from seqnorm_jax.train.norm_calls import example_weight_scope, noise_context
from seqnorm_jax.train.state import TrainState, step_rngs

__all__ = [
    "MicroBatchStats",
    "accumulate_gradients",
    "apply_model",
    "apply_update",
    "cross_entropy_loss",
    "eval_step",
    "init_micro_batch_stats",
    "split_micro_batches",
    "step_finite",
    "train_step",
    "update_micro_batch_stats",
]

PyTree = Any


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy with integer labels, computed in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def apply_model(state: TrainState, images: jax.Array, *, train: bool,
                params: PyTree | None = None, batch_stats: PyTree | None = None,
                rngs: dict[str, jax.Array] | None = None) -> tuple[jax.Array, PyTree]:
    """``state.apply_fn`` on ``images`` with the variables built from ``params`` and
    ``batch_stats`` (default: the state's own).

    The ``batch_stats`` collection is passed only when the model has running
    statistics; in training it is mutable and its update is returned, never written
    into ``state``.

    Returns:
      ``(output, batch_stats)``: in training the updated running statistics, otherwise
      the ones given (``{}`` or ``None`` for a model without them).
    """
    params = state.params if params is None else params
    batch_stats = state.batch_stats if batch_stats is None else batch_stats
    variables = {"params": params}
    if not batch_stats:
        return state.apply_fn(variables, images, train=train, rngs=rngs), batch_stats
    variables["batch_stats"] = batch_stats
    if not train:
        return state.apply_fn(variables, images, train=False, rngs=rngs), batch_stats
    out, updates = state.apply_fn(variables, images, train=True, rngs=rngs,
                                  mutable=["batch_stats"])
    return out, updates["batch_stats"]


def step_finite(loss: jax.Array, grad_norm: jax.Array, new_state: TrainState) -> jax.Array:
    """Whether a step is finite: its loss, its gradient norm and everything it writes
    (``new_state``'s parameters, optimizer state and running statistics; a traced bool).

    The arrays are checked through the sum of all their values (in at least float32): an
    ``inf`` or NaN anywhere makes it non-finite, and so does a state whose values sum
    beyond float32's range (~3e38), which counts as diverged too. (A sum fuses into the
    update that produces the arrays; a per-element ``isfinite`` test was a visible cost in
    the step of an MLP, whose update moves as many bytes as its forward pass.)
    """
    total = jnp.zeros((), jnp.float32)
    for leaf in jax.tree_util.tree_leaves((new_state.params, new_state.opt_state,
                                           new_state.batch_stats)):
        dtype = jnp.result_type(leaf)
        if jnp.issubdtype(dtype, jnp.inexact):
            total = total + jnp.sum(leaf, dtype=jnp.promote_types(dtype, jnp.float32))
    return jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(total)


def _keep_if(keep: jax.Array, new: TrainState, old: TrainState) -> TrainState:
    """``new`` where ``keep`` holds, else ``old``: an elementwise select on XLA:CPU, a
    ``lax.cond`` on the other backends.

    On XLA:CPU the select fuses into the optimizer update that writes ``new``, while the
    ``cond`` copies every leaf of the state into its result (+24 % of SimpleNet's step at
    batch 128, ``python benchmarks/train_loop.py --causes``). On the TPU compiler the
    select read 16 % more bytes in VGG-11's step, 1.71 against 1.47 GiB per chip at 16
    examples, where the ``cond`` reads 1.22 GiB (``seqnorm-jax plan
    004_output_noise_vgg11 --run 0 --topology v5e:2x4``).
    """
    def select():
        return jax.tree_util.tree_map(lambda a, b: jnp.where(keep, a, b), new, old)

    return jax.lax.platform_dependent(
        cpu=select, default=lambda: jax.lax.cond(keep, lambda: new, lambda: old))


def apply_update(state: TrainState, grads: Any, batch_stats: Any, loss: jax.Array,
                 grad_norm: jax.Array, guard: jax.Array | None = None
                 ) -> tuple[TrainState, jax.Array]:
    """``state`` after the optimizer step on ``grads`` and with the new ``batch_stats``,
    and whether that step is finite.

    With ``guard`` (a traced bool) the step is taken only if ``guard`` holds and the step
    is finite; otherwise the state passes through unchanged (:func:`_keep_if`: a
    ``lax.cond`` between the two states, an elementwise select on XLA:CPU).

    Returns:
      ``(new_state, finite)``: ``finite`` is :func:`step_finite` of the step as computed
      (the loss, the gradient norm and every array the step writes), whether or not the
      guard kept it.
    """
    new = state.apply_gradients(grads=grads)
    new = new.replace(batch_stats=batch_stats) if state.batch_stats else new
    finite = step_finite(loss, grad_norm, new)
    if guard is not None:
        new = _keep_if(guard & finite, new, state)
    return new, finite


def split_micro_batches(batch: PyTree, micro_batches: int) -> PyTree:
    """Reshape every leaf ``(N, ...)`` of ``batch`` to ``(k, N / k, ...)``.

    Micro-batch ``i`` holds samples ``i * N/k`` to ``(i + 1) * N/k - 1``: the contiguous
    ghost batch ``i`` of ``GhostNorm(batch_groups=k, grouping="contiguous")``.

    Raises:
      ValueError: ``micro_batches`` is not a positive int, a leaf has no batch axis,
        or the batch size is not a multiple of it (the message lists the divisors).
    """
    k = checks.positive_int(micro_batches, "micro_batches", "split_micro_batches")

    def split(leaf):
        shape = jnp.shape(leaf)
        if not shape or shape[0] % k:
            n = shape[0] if shape else None
            raise ValueError(
                f"split_micro_batches: micro_batches={k} does not divide the batch size "
                f"{n} (leaf shape {shape}); use micro_batches in "
                f"{checks.divisors(n) if n else []} or a batch size that is a multiple of {k}."
            )
        return jnp.reshape(leaf, (k, shape[0] // k) + tuple(shape[1:]))

    return jax.tree_util.tree_map(split, batch)


def _mean(tree: PyTree, k: int) -> PyTree:
    return jax.tree_util.tree_map(lambda a: a / k, tree)


def accumulate_gradients(
    loss_fn: Callable[..., tuple[jax.Array, tuple[PyTree, PyTree]]],
    params: PyTree,
    batch_stats: PyTree,
    batch: PyTree,
    micro_batches: int,
) -> tuple[tuple[jax.Array, PyTree, PyTree], PyTree]:
    """Mean loss and gradient over ``k`` micro-batches, and the accumulated running statistics.

    Args:
      loss_fn: ``loss_fn(params, batch_stats, micro_batch, index) -> (loss, (new_batch_stats,
        aux))``, the training forward pass of one micro-batch (``index`` is the micro-batch
        number, an int32 scalar, e.g. to fold into rngs). ``loss`` is the *mean* over the
        micro-batch's samples; ``new_batch_stats`` is the ``batch_stats`` collection that
        ``apply(..., mutable=["batch_stats"])`` returns.
      params: the parameters to differentiate.
      batch_stats: the running statistics at the start of the optimizer step; every
        micro-batch starts from them.
      batch: the whole batch (leaves ``(N, ...)``), split by :func:`split_micro_batches`.
      micro_batches: ``k``.

    Returns:
      ``((loss, new_batch_stats, aux), grads)``: the mean over micro-batches of the losses,
      of the returned ``batch_stats`` (the module's rule) and of the gradients, and ``aux``
      stacked along a leading axis of size ``k``. With BatchNorm layers, ``loss``, ``grads``
      and ``new_batch_stats`` are those of the whole batch through
      ``GhostNorm(batch_groups=k)``.
    """
    k = checks.positive_int(micro_batches, "micro_batches", "accumulate_gradients")
    micro = split_micro_batches(batch, k)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def body(carry, xs):
        loss_sum, stats_sum, grad_sum = carry
        index, mb = xs
        (loss, (new_stats, aux)), grads = grad_fn(params, batch_stats, mb, index)
        add = lambda a, b: jax.tree_util.tree_map(jnp.add, a, b)
        return (loss_sum + loss, add(stats_sum, new_stats), add(grad_sum, grads)), aux

    zeros = lambda tree: jax.tree_util.tree_map(jnp.zeros_like, tree)
    init = (jnp.zeros((), jnp.float32), zeros(batch_stats), zeros(params))
    (loss_sum, stats_sum, grad_sum), aux = jax.lax.scan(
        body, init, (jnp.arange(k, dtype=jnp.int32), micro))
    return (loss_sum / k, _mean(stats_sum, k), aux), _mean(grad_sum, k)


def train_step(state: TrainState, batch: dict[str, jax.Array],
               lr_fn: Callable[[Any], Any] | None = None, *, micro_batches: int = 1,
               output_noise: tuple[float, float] | None = None,
               guard: jax.Array | None = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on ``batch`` (``{"image", "label"}``) in training mode.

    The forward pass uses the batch statistics and updates the running ones
    (``batch_stats``); the per-step ``"noise"``/``"dropout"`` rngs come from
    :func:`step_rngs`. The loss is the mean cross-entropy, in float32 also for bfloat16
    models.

    Args:
      state, batch: the train state and the batch.
      lr_fn: the learning-rate schedule, for the logged ``lr``.
      micro_batches: ``k > 1`` runs the batch (size a multiple of ``k``) as ``k``
        accumulated micro-batches and takes one step on their mean gradient; the running
        statistics follow the module docstring's rule. Through BatchNorm this is
        ``train_step`` with ``GhostNorm(batch_groups=k)`` (up to the rngs, folded with the
        micro-batch index).
      output_noise: ``(mean, std)`` of Gaussian noise added to every norm layer's output
        (:func:`~seqnorm_jax.train.output_noise_scope`, paper 004's robustness study).
      guard: a traced bool: take the step only if it holds and the step is finite
        (:func:`step_finite`: loss, gradient norm, and the new parameters, optimizer
        state and running statistics; :func:`~seqnorm_jax.train.guarded_step` passes it).

    Returns:
      ``(new_state, metrics)`` with scalar ``loss``, ``accuracy`` (over the whole
      batch), ``grad_norm`` (before clipping), ``lr`` (``lr_fn(step)`` of the step
      just taken, 0 if ``lr_fn`` is None) and ``finite`` (:func:`step_finite` of the
      step as computed, a bool).
    """
    k = checks.positive_int(micro_batches, "micro_batches", "train_step")
    rngs = step_rngs(state)

    def loss_fn(params, batch_stats, mb, index=None):
        if index is not None:
            micro_rngs = {name: jax.random.fold_in(key, index) for name, key in rngs.items()}
        with noise_context(output_noise):
            logits, new_stats = apply_model(state, mb["image"], train=True, params=params,
                                            batch_stats=batch_stats,
                                            rngs=rngs if index is None else micro_rngs)
        loss = cross_entropy_loss(logits, mb["label"]).mean()
        correct = jnp.sum((jnp.argmax(logits, -1) == mb["label"]).astype(jnp.float32))
        return loss, (new_stats, correct)

    batch_stats = state.batch_stats or {}
    if k == 1:
        (loss, (new_stats, correct)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, batch_stats, batch)
    else:
        (loss, new_stats, correct), grads = accumulate_gradients(
            loss_fn, state.params, batch_stats, batch, k)
    grad_norm = optax.tree.norm(grads)
    new_state, finite = apply_update(state, grads, new_stats, loss, grad_norm, guard)
    accuracy = jnp.sum(correct) / batch["label"].shape[0]
    lr = jnp.asarray(lr_fn(state.step) if lr_fn is not None else 0.0, jnp.float32)
    metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": grad_norm, "lr": lr,
               "finite": finite}
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
    with example_weight_scope(example_weight):
        logits, _ = apply_model(state, batch["image"], train=False)
    labels = batch["label"]
    mask = batch.get("mask")
    mask = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    keep = mask > 0
    loss = jnp.where(keep, cross_entropy_loss(logits, labels), 0.0)  # padding cannot be NaN
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return {"loss_sum": jnp.sum(loss * mask), "correct": jnp.sum(jnp.where(keep, correct, 0.0)
                                                                  * mask),
            "count": jnp.sum(mask)}


class MicroBatchStats(NamedTuple):
    """Running statistics accumulated over the micro-batches of one optimizer step.

    For loops that stream micro-batches one call at a time, next to
    ``optax.MultiSteps(tx, every_k_schedule=k)`` (which averages the gradients).

    Attributes:
      batch_stats: the committed running statistics: pass them to every micro-batch's
        forward pass (they change only when an optimizer step completes).
      total: sum of the ``batch_stats`` returned by this step's micro-batches so far.
      mini_step: micro-batches seen in this optimizer step (int32, ``0 <= mini_step < k``).
    """

    batch_stats: PyTree
    total: PyTree
    mini_step: jax.Array


def init_micro_batch_stats(batch_stats: PyTree) -> MicroBatchStats:
    """The accumulator at the start of training (or of an optimizer step)."""
    return MicroBatchStats(batch_stats, jax.tree_util.tree_map(jnp.zeros_like, batch_stats),
                           jnp.zeros((), jnp.int32))


def update_micro_batch_stats(acc: MicroBatchStats, new_batch_stats: PyTree,
                             micro_batches: int) -> MicroBatchStats:
    """Add one micro-batch's returned ``batch_stats``; commit their mean after the ``k``-th.

    Call it once per micro-batch, next to ``optax.MultiSteps(tx, every_k_schedule=k)``'s
    ``update``: both complete an optimizer step on the same call. ``new_batch_stats`` is
    what ``apply(..., mutable=["batch_stats"])`` returned for a forward pass that started
    from ``acc.batch_stats``. Works under ``jit`` (the commit is a ``jnp.where``).
    """
    k = checks.positive_int(micro_batches, "micro_batches", "update_micro_batch_stats")
    total = jax.tree_util.tree_map(jnp.add, acc.total, new_batch_stats)
    mini_step = acc.mini_step + 1
    done = mini_step >= k
    committed = jax.tree_util.tree_map(
        lambda old, t: jnp.where(done, (t / k).astype(old.dtype), old), acc.batch_stats, total)
    total = jax.tree_util.tree_map(lambda t: jnp.where(done, jnp.zeros_like(t), t), total)
    return MicroBatchStats(committed, total, jnp.where(done, 0, mini_step).astype(jnp.int32))
