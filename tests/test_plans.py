"""The declared plan of a call (``stats.plan``, ``stats.pooling.pool_plan``): which regime each
input takes, and that every regime of a family gives the same numbers (float64 NumPy
references of ``tests/reference.py``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as R
from seqnorm_jax import functional as F
from seqnorm_jax import stats
from seqnorm_jax.stats.pooling import pool_plan

DENSE = (16, 12)
MAPS = (8, 3, 3, 12)


def _plan(shape, **kw):
    base = dict(axis=-1, training=True, plain_inference=False, masked=False, axis_name=None)
    return stats.plan(jnp.zeros(shape), **{**base, **kw})


@pytest.mark.parametrize("shape, kw, regime", [
    (DENSE, dict(family="two_steps", batch_groups=2, channel_groups=3), "fused"),
    (DENSE, dict(family="two_steps", batch_groups=2, channel_groups=3, masked=True),
     "per_sample"),
    (DENSE, dict(family="two_steps", channel_groups=3, sequential=False), "per_sample"),
    (DENSE, dict(family="two_steps", channel_groups=3, training=False,
                 plain_inference=True), "running"),
    (MAPS, dict(family="two_steps", batch_groups=2, channel_groups=3), "per_sample"),
    (MAPS, dict(family="batch", batch_groups=2), "view"),
    (MAPS, dict(family="batch", batch_groups=2, channel_groups=3), "per_sample"),
    (DENSE, dict(family="batch", batch_groups=2, channel_groups=3), "view"),
    (MAPS, dict(family="batch", training=False, plain_inference=True), "running"),
    (MAPS, dict(family="batch", training=False), "per_sample"),
    (MAPS, dict(family="batch", axis_name="data"), "per_sample"),
    (DENSE, dict(family="sample", channel_groups=3), "view"),
    (MAPS, dict(family="sample", channel_groups=3), "per_sample"),
])
def test_regime_of_each_input(shape, kw, regime):
    plan = _plan(shape, **kw)
    assert plan.regime == regime
    assert (plan.view is None) == (regime == "per_sample" or (regime == "running"
                                                              and kw["family"] == "batch"))


def test_pool_plan_on_one_device_is_local():
    plan = pool_plan(jnp.zeros((8, 4)), 2, "contiguous", None, None)
    assert (plan.regime, plan.groups, plan.blocks) == ("local", 2, 1)
    per_sample = pool_plan(jnp.zeros((8, 4)), None, "contiguous", None, None)
    assert (per_sample.regime, per_sample.groups) == ("local", 8)


X64 = np.random.default_rng(3).normal(4.0, 2.0, DENSE)


@pytest.mark.parametrize("order", ["group_first", "ghost_first"])
def test_seq_norm_regimes_agree_with_the_reference(order):
    x = jnp.asarray(X64, jnp.float32)
    want = R.seq_norm(X64, 3, 2, order=order)
    fused = F.seq_norm(x, channel_groups=3, batch_groups=2, order=order)
    masked = F.seq_norm(x, channel_groups=3, batch_groups=2, order=order,
                        mask=jnp.ones(DENSE, bool))  # the per-sample regime
    for got in (fused, masked):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("variant", ["gn_first", "bn_first", "parallel"])
def test_gn_plus_regimes_agree_with_the_reference(variant):
    x = jnp.asarray(X64, jnp.float32)
    lam = 0.3
    want = R.gn_plus(X64, 3, lam, variant=variant)
    got = F.gn_plus(x, None, None, lam, num_groups=3, variant=variant)
    masked = F.gn_plus(x, None, None, lam, num_groups=3, variant=variant,
                       mask=jnp.ones(DENSE, bool))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    np.testing.assert_allclose(masked, want, rtol=0, atol=2e-5)
    g_fused = jax.grad(lambda z: jnp.sum(F.gn_plus(z, None, None, lam, num_groups=3,
                                                   variant=variant) ** 3))(x)
    g_sample = jax.grad(lambda z: jnp.sum(F.gn_plus(z, None, None, lam, num_groups=3,
                                                    variant=variant,
                                                    mask=jnp.ones(DENSE, bool)) ** 3))(x)
    np.testing.assert_allclose(g_fused, g_sample, rtol=2e-4, atol=2e-4)


def test_maps_computed_first_keep_every_value():
    """``computed_first`` returns the maps' values exactly in both of its branches:
    finite maps, and maps with inf, NaN and -0.0 (the branch for non-finite maps)."""
    from seqnorm_jax.functional._maps import computed_first

    finite = (jnp.array([[1.5, -0.0, 3e38]]), jnp.array([[-2.0, 0.0, 1e-45]]))
    broken = (jnp.array([[jnp.inf, -0.0, 1.0]]), jnp.array([[jnp.nan, -jnp.inf, -0.0]]))
    for maps in (finite, broken):
        for got, want in zip(jax.jit(computed_first)(*maps), maps):
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(np.signbit(got), np.signbit(want))


def test_gn_plus_inference_computes_its_map_first(monkeypatch):
    """GN+'s inference on feature maps reads its blended map computed before the output
    pass on XLA:CPU (one conditional more in the compiled program than with the map left
    to XLA, which would fuse it into the pass), with the same output."""
    from seqnorm_jax.functional import _maps

    x = jnp.asarray(np.random.default_rng(1).normal(2.0, 3.0, MAPS), jnp.float32)
    mean, var = jnp.linspace(-1, 1, MAPS[-1]), jnp.linspace(0.5, 2, MAPS[-1])

    def program():
        f = jax.jit(lambda x: F.gn_plus(x, None, None, 0.3, num_groups=3, running_mean=mean,
                                        running_var=var))
        return f(x), f.lower(x).compile().as_text().count("conditional(")

    y_first, conds_first = program()
    monkeypatch.setattr(_maps, "computed_first", lambda *maps: maps)
    y_fused, conds_fused = program()
    assert conds_first == conds_fused + 1
    np.testing.assert_allclose(y_first, y_fused, rtol=1e-6, atol=1e-6)
