"""Gradient accumulation is GhostNorm (papers 000/001, 2.3).

k micro-batches accumulated through BatchNorm give the loss, gradient and (with the
rule of seqnorm_jax.train.step) the running statistics of the whole batch
through GhostNorm(batch_groups=k), computed by the layers themselves on one batch.
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import seqnorm_jax as snj
from seqnorm_jax.train import TrainState, train_step
from seqnorm_jax.train.step import (
    MicroBatchStats,
    accumulate_gradients,
    init_micro_batch_stats,
    split_micro_batches,
    update_micro_batch_stats,
)

K = 4
N = 16
TOL = dict(atol=1e-5, rtol=1e-5)


class Net(nn.Module):
    """conv -> norm -> relu -> conv -> norm -> pool -> dense (two norm layers)."""

    norm: str

    @nn.compact
    def __call__(self, x, train: bool):
        norm = snj.norm_factory(self.norm, momentum=0.9)
        x = nn.relu(norm(use_running_average=not train, name="norm1")(nn.Conv(6, (3, 3))(x)))
        x = norm(use_running_average=not train, name="norm2")(nn.Conv(4, (3, 3))(x))
        return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


def data(seed=0, n=N):
    rng = np.random.default_rng(seed)
    images = (rng.normal(size=(n, 5, 5, 2)) * 2 + 1).astype(np.float32)
    labels = rng.integers(0, 3, size=(n,)).astype(np.int32)
    return {"image": jnp.asarray(images), "label": jnp.asarray(labels)}


@pytest.fixture(scope="module")
def setup():
    batch = data()
    bn, ghost = Net("bn"), Net(f"ghost:batch_groups={K}")

    @jax.jit  # one compilation instead of a dispatch (and compilation) per operation
    def init(x, x_stats):
        variables = bn.init(jax.random.key(0), x, train=False)
        # Move the running statistics off their initial values so the EMA is visible.
        _, upd = bn.apply(variables, x_stats, train=True, mutable=["batch_stats"])
        return variables["params"], upd["batch_stats"]

    return batch, bn, ghost, *init(batch["image"], data(seed=9)["image"])


@functools.cache  # one compilation per model for all the tests
def grad_of(model):
    """The jitted loss, auxiliaries and gradient of ``model`` on a whole batch: the
    reference the accumulated micro-batches are checked against."""
    return jax.jit(jax.value_and_grad(loss_of(model), has_aux=True))


def loss_of(model):
    def loss_fn(params, batch_stats, batch, index=None):
        logits, upd = model.apply({"params": params, "batch_stats": batch_stats},
                                  batch["image"], train=True, mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, (upd["batch_stats"], logits)

    return loss_fn


def test_split_micro_batches_are_contiguous_ghost_batches():
    x = jnp.arange(12.0).reshape(6, 2)
    got = split_micro_batches({"x": x, "y": jnp.arange(6)}, 3)
    chex.assert_trees_all_equal(got["x"][1], x[2:4])
    chex.assert_trees_all_equal(got["y"], jnp.arange(6).reshape(3, 2))


def test_accumulated_bn_equals_full_batch_ghostnorm(setup):
    batch, bn, ghost, params, stats = setup
    (loss, new_stats, logits), grads = jax.jit(
        lambda p, s, b: accumulate_gradients(loss_of(bn), p, s, b, K))(params, stats, batch)
    (want_loss, (want_stats, want_logits)), want_grads = grad_of(ghost)(params, stats, batch)

    chex.assert_trees_all_close(loss, want_loss, **TOL)
    chex.assert_trees_all_close(grads, want_grads, **TOL)
    chex.assert_trees_all_close(new_stats, want_stats, **TOL)
    chex.assert_trees_all_close(logits.reshape(want_logits.shape), want_logits, **TOL)
    # The accumulation is not plain full-batch BatchNorm: the micro-batch statistics differ.
    (_, (bn_stats, _)), bn_grads = grad_of(bn)(params, stats, batch)
    assert not np.allclose(grads["Dense_0"]["kernel"], bn_grads["Dense_0"]["kernel"], atol=1e-4)
    assert not np.allclose(new_stats["norm1"]["var"], bn_stats["norm1"]["var"], atol=1e-4)


def test_accumulated_seqnorm_multiplies_batch_groups(setup):
    """SeqNorm(batch_groups=2) over 2 micro-batches is SeqNorm(batch_groups=4) on the batch."""
    batch, _, _, params, stats = setup
    small = Net("seqnorm:channel_groups=2,batch_groups=2")
    large = Net("seqnorm:channel_groups=2,batch_groups=4")
    (loss, new_stats, _), grads = jax.jit(
        lambda p, s, b: accumulate_gradients(loss_of(small), p, s, b, 2))(params, stats, batch)
    (want_loss, (want_stats, _)), want_grads = grad_of(large)(params, stats, batch)
    chex.assert_trees_all_close((loss, grads, new_stats), (want_loss, want_grads, want_stats),
                                **TOL)


def test_multisteps_streaming_equals_ghostnorm_step(setup):
    """optax.MultiSteps + MicroBatchStats, one call per micro-batch: after K calls the
    parameters and batch_stats are those of one GhostNorm step on the whole batch, and
    the running statistics did not move before the K-th call."""
    batch, bn, ghost, params, stats = setup
    tx = optax.sgd(0.3, momentum=0.9)
    multi = optax.MultiSteps(tx, every_k_schedule=K)

    @jax.jit
    def micro_step(params, opt_state, acc, mb):
        (_, (new_stats, _)), g = jax.value_and_grad(loss_of(bn), has_aux=True)(
            params, acc.batch_stats, mb)
        updates, opt_state = multi.update(g, opt_state, params)
        acc = update_micro_batch_stats(acc, new_stats, K)
        return optax.apply_updates(params, updates), opt_state, acc

    p, opt_state, acc = params, multi.init(params), init_micro_batch_stats(stats)
    micro = split_micro_batches(batch, K)
    for i in range(K):
        p, opt_state, acc = micro_step(p, opt_state, acc, jax.tree_util.tree_map(
            lambda a: a[i], micro))
        if i < K - 1:
            chex.assert_trees_all_equal(acc.batch_stats, stats)
            chex.assert_trees_all_equal(p, params)
    assert isinstance(acc, MicroBatchStats) and int(acc.mini_step) == 0
    chex.assert_trees_all_equal(acc.total, jax.tree_util.tree_map(jnp.zeros_like, stats))

    (_, (want_stats, _)), g = grad_of(ghost)(params, stats, batch)
    updates, _ = tx.update(g, tx.init(params), params)
    chex.assert_trees_all_close(p, optax.apply_updates(params, updates), **TOL)
    chex.assert_trees_all_close(acc.batch_stats, want_stats, **TOL)


def test_train_step_micro_batches_equals_ghostnorm_train_step(setup):
    batch, bn, ghost, params, stats = setup
    tx = optax.sgd(0.1)

    def state(model):
        return TrainState.create(apply_fn=model.apply, params=params, tx=tx, batch_stats=stats,
                                 rng=jax.random.key_data(jax.random.key(3)))

    got, got_metrics = jax.jit(lambda s, b: train_step(s, b, micro_batches=K))(state(bn), batch)
    want, want_metrics = jax.jit(train_step)(state(ghost), batch)
    assert int(got.step) == int(want.step) == 1
    chex.assert_trees_all_close((got.params, got.batch_stats), (want.params, want.batch_stats),
                                **TOL)
    chex.assert_trees_all_close(
        {k: got_metrics[k] for k in ("loss", "accuracy", "grad_norm")},
        {k: want_metrics[k] for k in ("loss", "accuracy", "grad_norm")}, **TOL)


@pytest.mark.parametrize("k", [0, -2, 2.0, True])
def test_bad_micro_batches(k):
    with pytest.raises(ValueError, match="micro_batches must be a positive int"):
        split_micro_batches({"x": jnp.zeros((4, 2))}, k)


def test_batch_not_divisible():
    with pytest.raises(ValueError, match=r"micro_batches=3 does not divide the batch size "
                                         r"16 .*use micro_batches in \[1, 2, 4, 8, 16\]"):
        accumulate_gradients(lambda *a: (0.0, ({}, None)), {}, {}, data(), 3)
