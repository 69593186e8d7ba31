"""Numerics at |mean| >> std, flax's ``mask``, and the inputs flax's layers accept.

* Every pure function of ``tests/cases.py`` (but the noisy BatchNorm, whose float32 and
  float64 runs draw different noise), at every input kind (dense, sequence, image; two
  channels per group included), on float32 input with mean 1e4 and std 1, is within
  1e-3 of the same function run in float64 on the same values; with
  ``use_fast_variance=False``, within 1e-5 at mean 1e6.
* ``mask``: the statistics are those of the kept entries only, count-weighted, for
  ghost groups and channel groups too (independent NumPy float64 references); entries
  the mask drops may hold NaN without reaching any other output or any gradient.
* ``group_norm`` takes flax's ``reduction_axes`` and rank-1 inputs; ``batch_norm``
  takes rank-1 inputs as flax's ``BatchNorm`` does.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from cases import cases
from seqnorm_jax import functional as F

SHAPES = {"dense": (16, 8), "sequence": (8, 5, 8), "image": (8, 3, 3, 8)}


def _error(case, shape, mean, fast):
    x32 = (np.random.default_rng(0).normal(size=shape) + mean).astype(np.float32)
    y32 = case.fn(jnp.asarray(x32), use_fast_variance=fast, **case.training_kwargs())
    with jax.enable_x64(True):
        y64 = case.fn(jnp.asarray(x32.astype(np.float64)), use_fast_variance=False,
                      **case.training_kwargs())
        return float(np.max(np.abs(np.asarray(y32, np.float64) - np.asarray(y64))))


@pytest.mark.parametrize("shape_id", list(SHAPES))
@pytest.mark.parametrize("case", cases("large_mean"))
def test_large_mean_default_settings(case, shape_id):
    assert _error(case, SHAPES[shape_id], 1e4, True) <= 1e-3


@pytest.mark.parametrize("shape_id", list(SHAPES))
@pytest.mark.parametrize("case", cases("two_pass_large_mean"))
def test_very_large_mean_two_pass(case, shape_id):
    # a looser tolerance where a case declares one, with the figure measured and the reason
    tol = case.tolerance.get("two_pass_large_mean", {}).get(shape_id, 1e-5)
    assert _error(case, SHAPES[shape_id], 1e6, False) <= tol


# ---------------------------------------------------------------------------- masks


def _masked_reference(x, mask, groups_of):
    """float64 NumPy: normalize each entry with the mean/var of the kept entries of its
    group; ``groups_of(n, c)`` names the group of sample n and channel c."""
    x = np.asarray(x, np.float64)
    mask = np.broadcast_to(mask, x.shape)
    n_, c_ = x.shape[0], x.shape[-1]
    y = np.empty_like(x)
    keys = {}
    for n in range(n_):
        for c in range(c_):
            keys.setdefault(groups_of(n, c), []).append((n, c))
    for members in keys.values():
        vals = np.concatenate([x[n, ..., c][mask[n, ..., c]].ravel() for n, c in members])
        mu, var = vals.mean(), vals.var()
        for n, c in members:
            y[n, ..., c] = (x[n, ..., c] - mu) / np.sqrt(var + 1e-5)
    return y


MASKED = [
    ("batch_norm", F.batch_norm, {}, lambda n, c: c),
    ("ghost_norm", F.ghost_norm, {"batch_groups": 2}, lambda n, c: (n // 4, c)),
    ("group_norm", F.group_norm, {"num_groups": 2, "epsilon": 1e-5}, lambda n, c: (n, c // 4)),
    ("batch_group_norm", F.batch_group_norm, {"batch_groups": 2, "channel_groups": 2},
     lambda n, c: (n // 4, c // 4)),
    ("bgn", F.bgn, {"num_groups": 2}, lambda n, c: c // 4),
]


@pytest.mark.parametrize("fn,kw,groups_of", [c[1:] for c in MASKED], ids=[c[0] for c in MASKED])
def test_mask_statistics_over_kept_entries(fn, kw, groups_of):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 3, 4, 8)) * 2 + 5
    mask = rng.random(size=x.shape) < 0.6
    mask[:, 0, 0, :] = True  # every (n, c) map keeps an entry
    want = _masked_reference(x, mask, groups_of)
    x_nan = np.where(mask, x, np.nan).astype(np.float32)
    got = np.asarray(fn(jnp.asarray(x_nan), mask=jnp.asarray(mask), **kw))
    # Kept entries match; dropped ones hold NaN inputs and so NaN outputs, nothing else.
    np.testing.assert_allclose(got[mask], want[mask], atol=2e-5, rtol=1e-5)
    assert np.all(np.isnan(got[~mask]))
    # Finite dropped entries are normalized with the kept entries' statistics, as flax does.
    got_finite = np.asarray(fn(jnp.asarray(x, jnp.float32), mask=jnp.asarray(mask), **kw))
    np.testing.assert_allclose(got_finite, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("case", cases("masked_nan_gradients"))
def test_masked_nan_never_leaks_into_gradients(case):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(8, 2, 3, 8)).astype(np.float32)
    mask = np.ones(x.shape, bool)
    mask[1, 1, 2, :] = False
    x_nan = jnp.asarray(np.where(mask, x, np.nan))
    w = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
    scale, bias = jnp.ones(8), jnp.zeros(8)

    def loss(x, scale, bias):
        y = case.fn(*case.args(x, scale, bias), mask=jnp.asarray(mask),
                    **case.training_kwargs())
        return jnp.sum(jnp.where(mask, y * w, 0.0))

    gx, gs, gb = jax.grad(loss, argnums=(0, 1, 2))(x_nan, scale, bias)
    assert np.all(np.isfinite(np.asarray(gx)[mask]))
    assert np.all(np.isfinite(np.asarray(gs))) and np.all(np.isfinite(np.asarray(gb)))
    # and equal to the gradients with the dropped entry replaced by any finite value
    gx2, gs2, gb2 = jax.grad(loss, argnums=(0, 1, 2))(jnp.where(mask, x_nan, 123.0), scale, bias)
    chex.assert_trees_all_close((np.asarray(gx)[mask], gs, gb),
                                (np.asarray(gx2)[mask], gs2, gb2), atol=1e-5, rtol=1e-5)


def test_mask_matches_flax_batch_norm_and_group_norm():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(6, 5, 8)).astype(np.float32) * 3 + 1)
    mask = jnp.asarray(rng.random(size=(6, 5, 1)) < 0.7)
    for ours, theirs in ((lambda x, m: F.batch_norm(x, mask=m), nn.BatchNorm(False)),
                         (lambda x, m: F.group_norm(x, num_groups=4, mask=m),
                          nn.GroupNorm(num_groups=4, use_bias=False, use_scale=False))):
        v = theirs.init(jax.random.key(0), x, mask=jnp.broadcast_to(mask, x.shape))
        want = theirs.apply(v, x, mask=jnp.broadcast_to(mask, x.shape),
                            mutable=["batch_stats"])
        want = want[0] if isinstance(want, tuple) else want
        chex.assert_trees_all_close(ours(x, mask), want, atol=2e-5, rtol=1e-5)


def test_bad_mask_is_refused_before_work():
    x = jnp.ones((4, 3, 8))
    with pytest.raises(ValueError, match="mask of shape .* does not broadcast"):
        F.batch_norm(x, mask=jnp.ones((4, 2, 8), bool))
    with pytest.raises(ValueError, match="mask must be boolean"):
        F.ghost_norm(x, batch_groups=2, mask=jnp.ones(x.shape))


# -------------------------------------------------------------- flax's input layouts


def test_group_norm_reduction_axes_and_rank_one_match_flax():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(2, 3, 4, 8)).astype(np.float32))
    for axes in [(2, 3), (1, 2, 3), (-1,)]:
        ref = nn.GroupNorm(num_groups=2, reduction_axes=axes, use_scale=False, use_bias=False)
        want = ref.apply({}, x)
        chex.assert_trees_all_close(F.group_norm(x, num_groups=2, reduction_axes=axes), want,
                                    atol=2e-5, rtol=1e-5)
    v = jnp.asarray(rng.normal(size=(8,)).astype(np.float32))
    want = nn.GroupNorm(num_groups=2, use_scale=False, use_bias=False).apply({}, v)
    chex.assert_trees_all_close(F.group_norm(v, num_groups=2), want, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="include the last .feature. axis"):
        F.group_norm(x, num_groups=2, reduction_axes=(1, 2))


def test_batch_norm_rank_one_as_flax():
    v = jnp.arange(4.0)
    bias = jnp.asarray([1.0, 2.0, 3.0, 4.0])
    layer = nn.BatchNorm(use_running_average=False)
    variables = layer.init(jax.random.key(0), v)
    want, _ = layer.apply({**variables, "params": {"scale": jnp.ones(4), "bias": bias}}, v,
                          mutable=["batch_stats"])
    got, target = F.batch_norm(v, jnp.ones(4), bias, return_stats=True)
    chex.assert_trees_all_close(got, want, atol=1e-6)
    chex.assert_trees_all_close(target.mean, v)
