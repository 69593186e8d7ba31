"""Gradients: jax.test_util.check_grads in float64 for every function, and flax parity."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import seqnorm_jax as snj
from seqnorm_jax import functional as F

SHAPE = (4, 2, 3, 4)

CASES = [
    ("batch_norm", F.batch_norm, {}),
    ("ghost_norm", F.ghost_norm, {"batch_groups": 2}),
    ("ghost_norm_strided", F.ghost_norm, {"batch_groups": 2, "grouping": "strided"}),
    ("group_norm", F.group_norm, {"num_groups": 2}),
    ("seq_norm", F.seq_norm, {"channel_groups": 2, "batch_groups": 2}),
    ("seq_norm_ghost_first", F.seq_norm, {"channel_groups": 2, "batch_groups": 2,
                                          "order": "ghost_first"}),
    ("batch_group_norm", F.batch_group_norm, {"batch_groups": 2, "channel_groups": 2}),
    ("heterologous_norm", F.heterologous_norm, {"std_groups": 2}),
    ("heterologous_norm_pooled", F.heterologous_norm, {"mean_set": "group", "mean_groups": 2,
                                                       "std_set": "batch",
                                                       "std_center": "pooled"}),
    ("gn_plus_gn_first", F.gn_plus, {"num_groups": 2, "variant": "gn_first"}),
    ("gn_plus_bn_first", F.gn_plus, {"num_groups": 2, "variant": "bn_first"}),
    ("gn_plus_parallel", F.gn_plus, {"num_groups": 2, "variant": "parallel"}),
    ("bgn", F.bgn, {"num_groups": 2}),
    ("noisy_batch_norm", F.noisy_batch_norm, {"noise_std": 0.1}),
]
RUNNING = {"batch_norm", "ghost_norm", "seq_norm", "batch_group_norm", "heterologous_norm",
           "gn_plus_gn_first", "gn_plus_bn_first", "gn_plus_parallel", "bgn"}


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


@pytest.mark.parametrize("name,fn,kw", CASES, ids=[c[0] for c in CASES])
def test_training_gradients(name, fn, kw):
    x, gamma, beta = inputs()
    kw = dict(kw)
    if name == "noisy_batch_norm":
        kw["rng"] = jax.random.key(0)
    if name.startswith("gn_plus"):
        f = lambda x, g, b, lam: fn(x, g, b, lam, **kw)
        args = (x, gamma, beta, jnp.asarray(0.3))
    else:
        f = lambda x, g, b: fn(x, g, b, **kw)
        args = (x, gamma, beta)
    check_grads(f, args, order=2, modes=("fwd", "rev"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,fn,kw", [c for c in CASES if c[0] in RUNNING],
                         ids=[c[0] for c in CASES if c[0] in RUNNING])
def test_inference_gradients_including_example_weight(name, fn, kw):
    x, gamma, beta = inputs(1)
    kw = {k: v for k, v in kw.items() if k != "batch_groups"}
    rm = jnp.linspace(-1.0, 1.0, SHAPE[-1])
    rv = jnp.linspace(0.5, 2.0, SHAPE[-1])
    lam = (jnp.asarray(0.3),) if name.startswith("gn_plus") else ()
    f = lambda x, g, b, alpha: fn(x, g, b, *lam, running_mean=rm, running_var=rv,
                                  example_weight=alpha, **kw)
    check_grads(f, (x, gamma, beta, jnp.asarray(0.4)), order=1, modes=("fwd", "rev"),
                atol=1e-5, rtol=1e-5)


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
