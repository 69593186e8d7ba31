"""The statistics core against float64 NumPy, including the |mean| >> std case."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqnorm_jax as snj
from plain_sums import plain_first  # noqa: F401 (a fixture)
from seqnorm_jax import functional as F
from seqnorm_jax import stats
from seqnorm_jax.stats import moments


def rel_err(got, want):
    got = np.asarray(got, np.float64)
    return float(np.max(np.abs(got - want) / np.abs(want)))


@pytest.mark.parametrize("fast_variance", [True, False], ids=["fastvar", "twopass"])
def test_large_mean_small_std_float32(fast_variance, plain_first):
    """A float32 input with mean 1e4 and std 1: variances within 1e-3 of float64 (measured
    1.04e-4 at worst with jax 0.8, 0.10 and 0.12, asserted at 2e-4)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 8, 8, 4)) + 1e4, jnp.float32)
    xd = np.asarray(x, np.float64)  # the same float32 values, in float64
    m = stats.sample_moments(x, use_fast_variance=fast_variance)
    assert m.var.dtype == jnp.float32
    errors = {"per-sample": rel_err(m.var, xd.var(axis=(1, 2)))}
    for g_m in (1, 2, 4):
        pooled = stats.pool(m, batch_groups=g_m, channel_groups=None)
        want = np.repeat(xd.reshape(g_m, -1, 8, 8, 4).var(axis=(1, 2, 3)), 16 // g_m, axis=0)
        errors[f"batch_groups={g_m}"] = rel_err(pooled.var, want)
    pooled = stats.pool(m, batch_groups=None, channel_groups=1)
    errors["channel_groups=1"] = rel_err(pooled.var[:, 0], xd.var(axis=(1, 2, 3)))
    # Dense inputs: the batch pooling is a two-pass merge of the samples.
    d = jnp.asarray(rng.normal(size=(64, 4)) + 1e4, jnp.float32)
    pooled = stats.pool(stats.sample_moments(d), batch_groups=1, channel_groups=None)
    errors["dense"] = rel_err(pooled.var[0], np.asarray(d, np.float64).var(axis=0))
    print(f"\nmean 1e4, std 1, float32, relative variance error vs float64 "
          f"(use_fast_variance={fast_variance}): "
          + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert max(errors.values()) < 2e-4, errors
    # Whole layers stay accurate: BatchNorm output vs float64 (flax's one-pass
    # E[x^2] - E[x]^2 variance is off by ~100% here).
    y = F.batch_norm(x, use_fast_variance=fast_variance)
    want = (xd - xd.mean(axis=(0, 1, 2))) / np.sqrt(xd.var(axis=(0, 1, 2)) + 1e-5)
    np.testing.assert_allclose(np.asarray(y, np.float64), want, atol=2e-3)


def test_plain_sums_only_where_every_group_is_well_conditioned():
    """XLA:CPU's plain sums (E[x^2] - E[x]^2) are kept only when every group has
    mean^2 <= 16 var; one ill-conditioned channel sends the whole call to the shifted sums.
    Both branches against float64 of the same float32 values."""
    rng = np.random.default_rng(3)
    red = (0, 1, 2)
    well = rng.normal(size=(32, 8, 8, 6)) * rng.uniform(0.5, 2, 6) + rng.uniform(-3, 3, 6)
    for offset, branch in ((0.0, "plain"), (1e4, "shifted")):
        x = np.array(well)
        x[..., 2] += offset  # one channel with |mean| >> std, or none
        xf = jnp.asarray(x, jnp.float32)
        xd = np.asarray(xf, np.float64)
        mean, var = xd.mean(axis=red), xd.var(axis=red)
        took_plain = bool(np.all(mean ** 2 <= moments.PLAIN_SUMS_MAX_MEAN2_OVER_VAR * var))
        assert took_plain == (branch == "plain")
        k, s1, v = jax.jit(moments._plain_then_shifted, static_argnums=1)(xf, red)
        got_mean = np.asarray(k, np.float64) + np.asarray(s1, np.float64)
        np.testing.assert_allclose(got_mean.reshape(-1), mean, rtol=1e-6, atol=1e-5)
        assert rel_err(v.reshape(-1), var) < 2e-5, (branch, rel_err(v.reshape(-1), var))
        # the plain sums alone lose the variance of the offset channel entirely
        if branch == "shifted":
            plain = np.asarray(jnp.mean(xf * xf, red) - jnp.mean(xf, red) ** 2, np.float64)
            assert abs(plain[2] - var[2]) / var[2] > 1e-2


def test_plain_sums_first_on_one_cpu_device_only():
    """The test process has 4 CPU devices: statistics take the shifted sums (no cond in the
    program); forced on, a training forward stages a cond and stays equal to the shifted one."""
    assert not moments.plain_sums_first()
    x = jax.random.normal(jax.random.key(0), (16, 4, 4, 8)) * 2 + 1
    # a new function for each trace: tracing caches key on the function, not on the setting
    assert "cond" not in str(jax.make_jaxpr(lambda x: F.batch_norm(x))(x))
    shifted = F.batch_norm(x)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(moments, "plain_sums_first", lambda: True)
        assert "cond" in str(jax.make_jaxpr(lambda x: F.batch_norm(x))(x))
        np.testing.assert_allclose(F.batch_norm(x), shifted, atol=2e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_inputs(dtype):
    """Statistics and batch_stats in float32, output in the input's dtype (or ``dtype``)."""
    x = (jax.random.normal(jax.random.key(0), (8, 4, 4, 8)) * 2 + 5).astype(dtype)
    m = stats.sample_moments(x)
    assert m.mean.dtype == m.var.dtype == jnp.float32
    for layer in (snj.BatchNorm(), snj.GhostNorm(batch_groups=2), snj.SeqNorm(channel_groups=2),
                  snj.HeterologousNorm(), snj.GNPlus(num_groups=2), snj.BGN(num_groups=2)):
        v = layer.init(jax.random.key(0), x, use_running_average=False)
        y, upd = layer.apply(v, x, use_running_average=False, mutable=["batch_stats"])
        assert y.dtype == dtype, type(layer).__name__
        chex.assert_trees_all_equal_dtypes(upd["batch_stats"], {"mean": jnp.float32(0),
                                                                "var": jnp.float32(0)})
        assert layer.apply(v, x, use_running_average=True).dtype == dtype
        y32 = layer.clone(dtype=jnp.float32).apply(v, x, use_running_average=False,
                                                   mutable=["batch_stats"])[0]
        assert y32.dtype == jnp.float32
        # The half-precision output is the float32 result rounded once.
        np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y32), atol=0.02)
    assert snj.GroupNorm(num_groups=2).init_with_output(jax.random.key(0), x)[0].dtype == dtype


def test_merge_equals_statistics_of_the_union():
    """Chan's merge with unequal counts equals the mean/variance of the concatenated data."""
    rng = np.random.default_rng(1)
    parts = [rng.normal(loc=rng.normal() * 5, size=(n, 3)) for n in (2, 7, 11)]
    with jax.enable_x64(True):
        mean = jnp.stack([p.mean(0) for p in parts])
        var = jnp.stack([p.var(0) for p in parts])
        counts = jnp.asarray([[len(p)] for p in parts], jnp.float64)
        merged = stats.merge(stats.Moments(mean, var), 0, weight=counts, keepdims=False)
        union = np.concatenate(parts)
        np.testing.assert_allclose(merged.mean, union.mean(0), rtol=1e-12)
        np.testing.assert_allclose(merged.var, union.var(0), rtol=1e-12)
        # With a center, the mean squared deviation around it.
        c = np.array([1.0, -2.0, 0.5])
        around = stats.merge(stats.Moments(mean, var), 0, weight=counts, center=c,
                             keepdims=False)
        np.testing.assert_allclose(around.var, ((union - c) ** 2).mean(0), rtol=1e-12)


def test_mix_equals_raw_second_moment_blend():
    rng = np.random.default_rng(2)
    with jax.enable_x64(True):
        a = stats.Moments(jnp.asarray(rng.normal(size=5)), jnp.asarray(rng.uniform(1, 2, 5)))
        b = stats.Moments(jnp.asarray(rng.normal(size=5)), jnp.asarray(rng.uniform(1, 2, 5)))
        for w in (0.0, 0.25, 1.0):
            got = stats.mix(a, b, w)
            mean = (1 - w) * a.mean + w * b.mean
            e2 = (1 - w) * (a.var + a.mean**2) + w * (b.var + b.mean**2)
            np.testing.assert_allclose(got.mean, mean, rtol=1e-12)
            np.testing.assert_allclose(got.var, e2 - mean**2, rtol=1e-10, atol=1e-12)


def test_strided_grouping_layout():
    """Strided group g holds samples g, g + G, ...; contiguous group g holds a block."""
    x = jnp.arange(8.0)[:, None] * jnp.ones((1, 2))
    m = stats.Moments(x, jnp.zeros_like(x))
    strided = stats.pool(m, batch_groups=2, channel_groups=None, grouping="strided").mean[:, 0]
    contiguous = stats.pool(m, batch_groups=2, channel_groups=None).mean[:, 0]
    np.testing.assert_array_equal(strided, [3, 4, 3, 4, 3, 4, 3, 4])
    np.testing.assert_array_equal(contiguous, [1.5] * 4 + [5.5] * 4)


def test_ema():
    np.testing.assert_allclose(stats.ema(jnp.ones(3), jnp.full(3, 3.0), 0.9), [1.2] * 3,
                               rtol=1e-6)


def test_sample_moments_other_feature_axis():
    """axis=1 (channels first) gives the same moments as the transposed channels-last input."""
    x = jax.random.normal(jax.random.key(3), (4, 3, 5, 6))
    a = stats.sample_moments(x, axis=1)
    b = stats.sample_moments(jnp.moveaxis(x, 1, -1))
    chex.assert_trees_all_close(a, b, atol=1e-6)
    y = F.ghost_norm(x, batch_groups=2, axis=1)
    y_last = F.ghost_norm(jnp.moveaxis(x, 1, -1), batch_groups=2)
    chex.assert_trees_all_close(y, jnp.moveaxis(y_last, -1, 1), atol=1e-5)
