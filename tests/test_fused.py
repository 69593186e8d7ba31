"""Per-sample channel groups on dense inputs (``stats.normalize``, a ``jax.custom_vjp``).

GroupNorm, SeqNorm and GN+ (``gn_first``, ``bn_first``) in training on ``(N, C)`` inputs
run the written-out backward of :mod:`seqnorm_jax.stats.fused`. Checked here: reverse
mode to order 2 (``check_grads``, float64) including the running-statistics outputs, the
input and parameter gradients against central differences of the float64 NumPy
references (``tests/reference.py``), the gradient at ``|mean| >> std`` in float32 against
float64, what the backward keeps (``x`` and group-sized values, float32 and bfloat16),
and that forward mode raises (the documented limit of a custom VJP).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import reference as ref
from seqnorm_jax import functional as F
from test_lean import check_lean, saved_residuals

SHAPE = (8, 16)
G_C, G_M = 4, 2
MIX = 0.3

# name -> (library call, NumPy reference), both (x, gamma, beta) -> y
CASES = {
    "group_norm": (lambda x, g, b, **kw: F.group_norm(x, g, b, num_groups=G_C, **kw),
                   lambda x, g, b: ref.group_norm(x, G_C, 1e-6, g, b)),
    "seq_norm": (lambda x, g, b, **kw: F.seq_norm(x, g, b, channel_groups=G_C,
                                                  batch_groups=G_M, **kw),
                 lambda x, g, b: ref.seq_norm(x, G_C, G_M, 1e-5, g, b)),
    "seq_norm_ghost_first": (
        lambda x, g, b, **kw: F.seq_norm(x, g, b, channel_groups=G_C, batch_groups=G_M,
                                         order="ghost_first", **kw),
        lambda x, g, b: ref.seq_norm(x, G_C, G_M, 1e-5, g, b, order="ghost_first")),
    "gn_plus_gn_first": (lambda x, g, b, **kw: F.gn_plus(x, g, b, MIX, num_groups=G_C, **kw),
                         lambda x, g, b: ref.gn_plus(x, G_C, MIX, "gn_first", 1e-5, g, b)),
    "gn_plus_bn_first": (
        lambda x, g, b, **kw: F.gn_plus(x, g, b, MIX, num_groups=G_C, variant="bn_first", **kw),
        lambda x, g, b: ref.gn_plus(x, G_C, MIX, "bn_first", 1e-5, g, b)),
}
RUNNING = [n for n in CASES if n != "group_norm"]


def inputs(seed=0, dtype=np.float64, mean=2.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=SHAPE) * 1.5 + mean
    gamma, beta = rng.uniform(0.5, 1.5, SHAPE[-1]), rng.normal(size=SHAPE[-1])
    return tuple(jnp.asarray(a, dtype) for a in (x, gamma, beta))


@pytest.mark.parametrize("name", list(CASES))
def test_reverse_mode_to_order_two(name):
    fn = CASES[name][0]
    with jax.enable_x64(True):
        check_grads(fn, inputs(), order=2, modes=("rev",), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", RUNNING)
def test_running_statistics_outputs_are_differentiable(name):
    fn = CASES[name][0]
    with jax.enable_x64(True):
        f = lambda x, g, b: fn(x, g, b, return_stats=True)
        check_grads(f, inputs(1), order=2, modes=("rev",), atol=1e-5, rtol=1e-5)


def test_mixing_gradient():
    with jax.enable_x64(True):
        x, g, b = inputs(2)
        for variant in ("gn_first", "bn_first"):
            f = lambda lam: F.gn_plus(x, g, b, lam, num_groups=G_C, variant=variant)
            check_grads(f, (jnp.asarray(MIX),), order=2, modes=("rev",), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_match_central_differences_of_the_reference(name):
    fn, reference = CASES[name]
    rng = np.random.default_rng(3)
    w = rng.normal(size=SHAPE)
    with jax.enable_x64(True):
        args = inputs(4)
        grads = jax.grad(lambda *a: jnp.sum(fn(*a) * w), argnums=(0, 1, 2))(*args)
    h = 1e-6
    for i, grad in enumerate(grads):
        t = rng.normal(size=np.shape(args[i]))
        plus = [np.asarray(a, np.float64) for a in args]
        minus = [np.asarray(a, np.float64) for a in args]
        plus[i], minus[i] = plus[i] + h * t, minus[i] - h * t
        numeric = (np.sum(reference(*plus) * w) - np.sum(reference(*minus) * w)) / (2 * h)
        np.testing.assert_allclose(np.vdot(np.asarray(grad), t), numeric, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(CASES))
def test_float32_gradient_at_large_mean(name):
    """The backward shifts x by each group's first value, as the forward's sums do: at mean
    1e4 and std 1.5 the float32 input gradient stays within 1e-3 of float64's."""
    fn = CASES[name][0]
    w = np.random.default_rng(5).normal(size=SHAPE)
    x, g, b = inputs(6, np.float32, mean=1e4)
    grad = lambda x, g, b: jax.grad(lambda x: jnp.sum(fn(x, g, b) * w))(x)
    got = grad(x, g, b)
    with jax.enable_x64(True):
        want = grad(*(jnp.asarray(np.asarray(a), jnp.float64) for a in (x, g, b)))
    assert float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want)))) <= 1e-3


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_backward_keeps_only_x_and_statistics(name, dtype):
    fn = CASES[name][0]
    x, g, b = inputs(7, np.float32)
    res = saved_residuals(lambda x, g, b: fn(x, g, b), x.astype(dtype), g, b)
    check_lean(res, x.size, SHAPE[0] * G_C)
    kept_x = [r for r in res if r[2] == "from the argument x"]
    assert kept_x[0][0] == {jnp.float32: "f32", jnp.bfloat16: "bf16"}[dtype]


def test_forward_mode_is_the_documented_limit():
    x, g, b = inputs(8, np.float32)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda x: F.group_norm(x, g, b, num_groups=G_C), (x,), (jnp.ones_like(x),))
