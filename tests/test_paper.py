"""The papers' own worked examples and bounds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqnorm_jax import functional as F

# Paper 000, section 3: X = (35, 39, 30, 4, 38, 26, 27, 19) as an (8, 1) input.
X = np.array([35, 39, 30, 4, 38, 26, 27, 19], np.float32)[:, None]
# The values the paper prints (its extracted text drops the minus signs).
PAPER_BN = [0.7, 1.1, 0.3, 2.2, 1.0, 0.1, 0.02, 0.8]
PAPER_GHOST2 = [0.6, 0.9, 0.2, 1.7, 1.5, 0.2, 0.07, 1.2]


def test_ranking_example_batch_norm_keeps_the_order():
    y = np.asarray(F.batch_norm(jnp.asarray(X)))[:, 0]
    np.testing.assert_allclose(np.abs(y), PAPER_BN, atol=0.051)  # printed to 1-2 decimals
    assert np.array_equal(np.argsort(y), np.argsort(X[:, 0]))  # the order is kept
    assert y[1] > y[4]  # 39 > 38 stays 1.1 > 1.0
    np.testing.assert_allclose(y[1], 1.0890, atol=1e-4)


def test_ranking_example_ghost_norm_puts_38_above_39():
    y = np.asarray(F.ghost_norm(jnp.asarray(X), batch_groups=2))[:, 0]
    np.testing.assert_allclose(np.abs(y), PAPER_GHOST2, atol=0.051)
    assert y[4] > y[1]  # 38 -> 1.5 is now above 39 -> 0.9
    np.testing.assert_allclose([y[1], y[4]], [0.8787, 1.5439], atol=1e-4)


BOUND_LAYERS = [
    ("batch_norm", lambda x: F.batch_norm(x, epsilon=1e-12), lambda s: s[0] * s[1] * s[2]),
    ("ghost_norm_4", lambda x: F.ghost_norm(x, batch_groups=4, epsilon=1e-12),
     lambda s: s[0] // 4 * s[1] * s[2]),
    ("group_norm_2", lambda x: F.group_norm(x, num_groups=2, epsilon=1e-12),
     lambda s: s[1] * s[2] * s[3] // 2),
    ("batch_group_norm", lambda x: F.batch_group_norm(x, batch_groups=2, channel_groups=2,
                                                      epsilon=1e-12),
     lambda s: s[0] // 2 * s[1] * s[2] * s[3] // 2),
    ("bgn_1", lambda x: F.bgn(x, num_groups=1, epsilon=1e-12),
     lambda s: s[0] * s[1] * s[2] * s[3]),
]


@pytest.mark.parametrize("name,fn,set_size", BOUND_LAYERS, ids=[b[0] for b in BOUND_LAYERS])
def test_four_things_training_output_bound(name, fn, set_size):
    """Training outputs lie in [-sqrt(m-1), sqrt(m-1)]; one outlier attains the bound."""
    shape = (8, 2, 3, 4)
    m = set_size(shape)
    bound = np.sqrt(m - 1)
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        heavy = rng.standard_cauchy(size=shape)  # heavy tails push towards the bound
        y = np.asarray(fn(jnp.asarray(heavy)))
        assert np.max(np.abs(y)) <= bound * (1 + 1e-9)
        # A single outlier in a set of otherwise equal values reaches exactly +sqrt(m-1).
        x = np.zeros(shape)
        x[0, 0, 0, 0] = 100.0
        y = np.asarray(fn(jnp.asarray(x)))
        np.testing.assert_allclose(y[0, 0, 0, 0], bound, rtol=1e-9)
        assert np.max(np.abs(y)) <= bound * (1 + 1e-9)


def test_inference_output_is_unbounded():
    """At inference (running statistics) nothing bounds the output."""
    x = jnp.full((1, 4), 1e3)
    y = F.batch_norm(x, running_mean=jnp.zeros(4), running_var=jnp.ones(4))
    assert float(jnp.min(y)) > 999.0
