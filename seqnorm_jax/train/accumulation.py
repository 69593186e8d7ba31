"""Gradient accumulation, and why it is GhostNorm (papers 000/001, section 2.3).

Accumulating the gradients of ``k`` micro-batches of ``N / k`` samples through
BatchNorm computes the gradient of one batch of ``N`` samples through
``GhostNorm(batch_groups=k)``: each micro-batch is normalized with its own statistics,
exactly as a contiguous ghost batch is. The same holds for every layer here: a layer
with ``batch_groups=g`` under ``k``-fold accumulation acts as ``batch_groups=g * k`` on
the whole batch.

Running statistics
------------------
The rule that keeps the equivalence, used by every helper of this module: **the
running statistics change once per optimizer step, by one EMA step towards the mean,
over the ``k`` micro-batches, of each micro-batch's statistics.** Every micro-batch
starts from the same ``batch_stats`` (those of the last optimizer step); its forward
pass returns ``momentum * ra + (1 - momentum) * t_i``; the committed value is the mean
of those ``k`` results, i.e. ``momentum * ra + (1 - momentum) * mean_i(t_i)``. This is
GhostNorm's own rule (one update per call, towards the mean over ghost batches of the
ghost batches' means and biased variances, see ``METHODS.md``), so after one optimizer
step the ``batch_stats`` equal those of the full batch through ``GhostNorm(batch_groups=k)``.
(PyTorch loops that let every micro-batch move the EMA instead take ``k`` EMA steps per
optimizer step.)

Two forms:

* :func:`accumulate_gradients` / :func:`accumulated_train_step`: one call per optimizer
  step; the batch is split into ``k`` contiguous micro-batches that a ``lax.scan``
  runs one after the other (activation memory of one micro-batch);
* :class:`MicroBatchStats` with ``optax.MultiSteps``: one call per micro-batch, for
  loops that already stream micro-batches; ``optax.MultiSteps(tx, every_k_schedule=k)``
  averages the gradients and :func:`update_micro_batch_stats` the running statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from seqnorm_jax.train.state import TrainState, step_rngs
from seqnorm_jax.train.steps import (
    _noise_context,
    apply_update,
    cross_entropy_loss,
    global_norm,
)

__all__ = [
    "MicroBatchStats",
    "accumulate_gradients",
    "accumulated_train_step",
    "init_micro_batch_stats",
    "split_micro_batches",
    "update_micro_batch_stats",
]

PyTree = Any


def _check_k(num_micro_batches: Any, who: str) -> int:
    if isinstance(num_micro_batches, bool) or not isinstance(num_micro_batches, int) \
            or num_micro_batches < 1:
        raise ValueError(f"{who}: num_micro_batches must be a positive int, got "
                         f"{num_micro_batches!r}.")
    return num_micro_batches


def split_micro_batches(batch: PyTree, num_micro_batches: int) -> PyTree:
    """Reshape every leaf ``(N, ...)`` of ``batch`` to ``(k, N / k, ...)``.

    Micro-batch ``i`` holds samples ``i * N/k`` to ``(i + 1) * N/k - 1``: the contiguous
    ghost batch ``i`` of ``GhostNorm(batch_groups=k, grouping="contiguous")``.

    Raises:
      ValueError: ``num_micro_batches`` is not a positive int, a leaf has no batch axis,
        or the batch size is not a multiple of it (the message lists the divisors).
    """
    k = _check_k(num_micro_batches, "split_micro_batches")

    def split(leaf):
        shape = jnp.shape(leaf)
        if not shape or shape[0] % k:
            n = shape[0] if shape else None
            divisors = [d for d in range(1, n + 1) if n % d == 0] if n else []
            raise ValueError(
                f"split_micro_batches: num_micro_batches={k} does not divide the batch size "
                f"{n} (leaf shape {shape}); use num_micro_batches in {divisors} or a batch "
                f"size that is a multiple of {k}."
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
    num_micro_batches: int,
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
      num_micro_batches: ``k``.

    Returns:
      ``((loss, new_batch_stats, aux), grads)``: the mean over micro-batches of the losses,
      of the returned ``batch_stats`` (the module's rule) and of the gradients, and ``aux``
      stacked along a leading axis of size ``k``. With BatchNorm layers, ``loss``, ``grads``
      and ``new_batch_stats`` are those of the whole batch through
      ``GhostNorm(batch_groups=k)``.
    """
    k = _check_k(num_micro_batches, "accumulate_gradients")
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


def accumulated_train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    num_micro_batches: int,
    lr_fn: Callable[[Any], Any] | None = None,
    *,
    output_noise: tuple[float, float] | None = None,
    guard: jax.Array | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """:func:`seqnorm_jax.train.train_step` with the batch run as ``k`` accumulated micro-batches.

    One optimizer step (``state.step`` grows by one) on the mean gradient of the ``k``
    micro-batches of ``batch`` (``{"image", "label"}``, batch size a multiple of ``k``);
    the running statistics follow the module's rule (one EMA step towards the mean of the
    micro-batch statistics). For a model with BatchNorm layers this is ``train_step`` of
    the same model with ``GhostNorm(batch_groups=k)`` layers (up to the per-micro-batch
    ``"noise"``/``"dropout"`` rngs, folded from :func:`step_rngs` with the micro-batch index).

    ``guard``: as ``train_step``'s (take the step only if it holds and the loss and
    gradient are finite).

    Returns:
      ``(new_state, metrics)`` with ``loss``, ``accuracy`` (over the whole batch),
      ``grad_norm`` (of the accumulated gradient) and ``lr``, as ``train_step``.
    """
    rngs = step_rngs(state)
    mutable = ["batch_stats"] if state.batch_stats else []

    def loss_fn(params, batch_stats, mb, index):
        variables = {"params": params}
        if mutable:
            variables["batch_stats"] = batch_stats
        micro_rngs = {name: jax.random.fold_in(key, index) for name, key in rngs.items()}
        with _noise_context(output_noise):
            logits, updates = state.apply_fn(variables, mb["image"], train=True,
                                             rngs=micro_rngs, mutable=mutable)
        loss = cross_entropy_loss(logits, mb["label"]).mean()
        correct = jnp.sum((jnp.argmax(logits, -1) == mb["label"]).astype(jnp.float32))
        return loss, (updates.get("batch_stats", batch_stats), correct)

    batch_stats = state.batch_stats if mutable else {}
    (loss, new_stats, correct), grads = accumulate_gradients(
        loss_fn, state.params, batch_stats, batch, num_micro_batches)
    grad_norm = global_norm(grads)
    new_state = apply_update(state, grads, new_stats if mutable else None, loss, grad_norm,
                             guard)
    n = jax.tree_util.tree_leaves(batch["label"])[0].shape[0]
    lr = jnp.asarray(lr_fn(state.step) if lr_fn is not None else 0.0, jnp.float32)
    metrics = {"loss": loss, "accuracy": jnp.sum(correct) / n, "grad_norm": grad_norm,
               "lr": lr}
    return new_state, metrics


class MicroBatchStats(NamedTuple):
    """Running statistics accumulated over the micro-batches of one optimizer step.

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
                             num_micro_batches: int) -> MicroBatchStats:
    """Add one micro-batch's returned ``batch_stats``; commit their mean after the ``k``-th.

    Call it once per micro-batch, next to ``optax.MultiSteps(tx, every_k_schedule=k)``'s
    ``update``: both complete an optimizer step on the same call. ``new_batch_stats`` is
    what ``apply(..., mutable=["batch_stats"])`` returned for a forward pass that started
    from ``acc.batch_stats``. Works under ``jit`` (the commit is a ``jnp.where``).
    """
    k = _check_k(num_micro_batches, "update_micro_batch_stats")
    total = jax.tree_util.tree_map(jnp.add, acc.total, new_batch_stats)
    mini_step = acc.mini_step + 1
    done = mini_step >= k
    committed = jax.tree_util.tree_map(
        lambda old, t: jnp.where(done, (t / k).astype(old.dtype), old), acc.batch_stats, total)
    total = jax.tree_util.tree_map(lambda t: jnp.where(done, jnp.zeros_like(t), t), total)
    return MicroBatchStats(committed, total, jnp.where(done, 0, mini_step).astype(jnp.int32))
