"""Gradients: jax.test_util.check_grads in float64 for every function, and flax parity."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import seqnorm_jax as snj
from cases import cases

SHAPE = (8, 2, 3, 8)  # the group counts of tests/cases.py: two channels per group


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=SHAPE) * 1.5 + 2.0
    gamma = rng.uniform(0.5, 1.5, SHAPE[-1])
    beta = rng.normal(size=SHAPE[-1])
    return jnp.asarray(x), jnp.asarray(gamma), jnp.asarray(beta)


@pytest.mark.parametrize("case", cases("training_gradients"))
def test_training_gradients(case):
    x, gamma, beta = inputs()
    kw = case.training_kwargs()
    check_grads(lambda *args: case.fn(*args, **kw), case.args(x, gamma, beta), order=2,
                modes=("fwd", "rev"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", cases("inference_gradients"))
def test_inference_gradients_including_example_weight(case):
    x, gamma, beta = inputs(1)
    kw = {k: v for k, v in case.kwargs.items() if k != "batch_groups"}
    rm = jnp.linspace(-1.0, 1.0, SHAPE[-1])
    rv = jnp.linspace(0.5, 2.0, SHAPE[-1])
    f = lambda alpha, *args: case.fn(*args, running_mean=rm, running_var=rv,
                                     example_weight=alpha, **kw)
    check_grads(f, (jnp.asarray(0.4), *case.args(x, gamma, beta)), order=1,
                modes=("fwd", "rev"), atol=1e-5, rtol=1e-5)


def test_gradients_equal_flax_batch_norm():
    """d loss / d (x, scale, bias) of our BatchNorm equals flax's (float64)."""
    x, _, _ = inputs(2)
    w = jnp.asarray(np.random.default_rng(3).normal(size=SHAPE))
    flax_bn, ours = nn.BatchNorm(use_running_average=False), snj.GhostNorm(
        use_running_average=False, batch_groups=1)
    v = flax_bn.init(jax.random.key(0), x)

    def loss(module):
        def f(params, x):
            y, _ = module.apply({**v, "params": params}, x, mutable=["batch_stats"])
            return jnp.sum(jnp.sin(y) * w)
        return jax.grad(f, argnums=(0, 1))(v["params"], x)

    want, got = loss(flax_bn), loss(ours)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)
