"""What the backward pass keeps, and mixed precision.

The backward pass of every layer may keep the input ``x`` (it is an argument, so
keeping it costs nothing) and arrays the size of the ``(N, C)`` statistics, never
another ``x``-sized intermediate: checked with
``jax.ad_checkpoint.print_saved_residuals``, whose lines read
``f32[8,4,4,16] from the argument x`` or ``f32[8,16] output of rsqrt from ...``.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

import seqnorm_jax as snj
from cases import cases
from plain_sums import plain_first  # noqa: F401 (a fixture)

SHAPE = (8, 4, 4, 16)  # N * C = 128 statistics entries; x has 2048 elements

_RESIDUAL = re.compile(r"^(\w+)\[([\d,]*)\]\s+(.*)$")


def saved_residuals(fn, *args) -> list[tuple[str, tuple[int, ...], str]]:
    """(dtype, shape, origin) of each value reverse-mode autodiff of ``fn`` keeps."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print_saved_residuals(fn, *args)
    out = []
    for line in buf.getvalue().splitlines():
        m = _RESIDUAL.match(line.strip())
        if m:
            shape = tuple(int(d) for d in m.group(2).split(",") if d)
            out.append((m.group(1), shape, m.group(3)))
    assert out, f"no residuals parsed from:\n{buf.getvalue()}"
    return out


def check_lean(residuals, x_size: int, nc: int, kept: str = "from the argument x") -> None:
    """One residual larger than the statistics, of x's size, its origin matching ``kept``."""
    big = [r for r in residuals if int(np.prod(r[1])) > nc]
    assert len(big) == 1 and re.fullmatch(kept, big[0][2]), (
        "the backward pass keeps more than x:\n" + "\n".join(map(str, big)))
    assert int(np.prod(big[0][1])) == x_size


@pytest.mark.parametrize("case", cases("lean_backward"))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_backward_keeps_only_x_and_statistics(case, dtype, plain_first):
    x = jax.random.normal(jax.random.key(0), SHAPE, dtype) + 3
    c = SHAPE[-1]
    kw = case.training_kwargs()
    f = lambda x, *rest: case.fn(x, *rest, **kw)  # the residuals name x by its name
    args = case.args(x, jnp.ones(c), jnp.zeros(c))
    res = saved_residuals(f, *args)
    check_lean(res, x.size, SHAPE[0] * c, case.kept_input)
    # the input is kept in its own dtype (no float32 copy of a bfloat16 x)
    kept_x = [r for r in res if re.fullmatch(case.kept_input, r[2])]
    assert kept_x[0][0] == {jnp.float32: "f32", jnp.bfloat16: "bf16"}[dtype]


@pytest.mark.parametrize("name", ["BatchNorm", "GhostNorm", "SeqNorm", "GNPlus"])
def test_module_training_step_keeps_only_x(name):
    fields = {"GhostNorm": {"batch_groups": 4}, "SeqNorm": {"channel_groups": 4,
                                                             "batch_groups": 2},
              "GNPlus": {"num_groups": 4}}.get(name, {})
    layer = snj.linen.LAYERS[name](**fields)
    x = jax.random.normal(jax.random.key(1), SHAPE)
    v = layer.init(jax.random.key(0), x, use_running_average=False)

    w = jax.random.normal(jax.random.key(2), SHAPE)

    def loss(params, x):
        # linear in y, so whatever is kept is kept by the layer, not by the loss
        y, upd = layer.apply({**v, "params": params}, x, use_running_average=False,
                             mutable=["batch_stats"])
        return jnp.sum(y * w), upd

    res = saved_residuals(lambda p, x: loss(p, x)[0], v["params"], x)
    # the loss's own weight w is kept as "from a constant"; everything else is the layer's
    check_lean([r for r in res if r[2] != "from a constant"], x.size, SHAPE[0] * SHAPE[-1])


def test_custom_rule_gradients_match_plain_autodiff_float64(plain_first):
    """The moments' custom JVP (and its transpose) against autodiff of the plain
    two-pass formula, first and second order, in float64."""
    from seqnorm_jax import stats

    def plain(x):
        mean = jnp.mean(x, axis=(1, 2))
        var = jnp.mean(jnp.square(x - mean[:, None, None]), axis=(1, 2))
        return mean, var

    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(3), (3, 4, 5, 6), jnp.float64) * 2 + 7
        w = jax.random.normal(jax.random.key(4), (2, 3, 6), jnp.float64)
        for fast in (True, False):
            ours = lambda x: stats.sample_moments(x, use_fast_variance=fast)
            loss = lambda f: (lambda x: jnp.sum(f(x)[0] * w[0]) + jnp.sum(jnp.sin(f(x)[1]) * w[1]))
            g_ours, g_ref = jax.grad(loss(ours))(x), jax.grad(loss(plain))(x)
            np.testing.assert_allclose(g_ours, g_ref, rtol=1e-10, atol=1e-12)
            t = jnp.cos(x)
            h_ours = jax.jvp(jax.grad(loss(ours)), (x,), (t,))[1]
            h_ref = jax.jvp(jax.grad(loss(plain)), (x,), (t,))[1]
            np.testing.assert_allclose(h_ours, h_ref, rtol=1e-9, atol=1e-11)
            j_ours = jax.jvp(ours, (x,), (t,))[1]
            j_ref = jax.jvp(plain, (x,), (t,))[1]
            np.testing.assert_allclose(np.asarray(j_ours), np.asarray(j_ref), rtol=1e-10,
                                       atol=1e-12)


# ----------------------------------------------------------------------------
# mixed precision
# ----------------------------------------------------------------------------

MODULES = {
    "BatchNorm": {},
    "GhostNorm": {"batch_groups": 2},
    "GroupNorm": {"num_groups": 4},
    "SeqNorm": {"channel_groups": 4, "batch_groups": 2},
    "BatchGroupNorm": {"batch_groups": 2, "channel_groups": 4},
    "HeterologousNorm": {},
    "GNPlus": {"num_groups": 4},
    "BGN": {"num_groups": 4},
    "NoisyBatchNorm": {},
}


@pytest.mark.parametrize("name", sorted(MODULES))
@pytest.mark.parametrize("in_dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_half_precision_inputs(name, in_dtype):
    layer = snj.linen.LAYERS[name](**MODULES[name])
    x32 = jax.random.normal(jax.random.key(2), SHAPE) * 3 + 5
    x = x32.astype(in_dtype)
    rngs = {"params": jax.random.key(0), "noise": jax.random.key(1)}
    v = layer.init(rngs, x, use_running_average=False)
    for leaf in jax.tree_util.tree_leaves(v):
        assert leaf.dtype == jnp.float32
    y, upd = layer.apply(v, x, use_running_average=False, mutable=["batch_stats"],
                         rngs={"noise": jax.random.key(1)})
    assert y.dtype == in_dtype  # never silently float32
    for leaf in jax.tree_util.tree_leaves(upd):
        assert leaf.dtype == jnp.float32
    # statistics in float32: the half-precision output equals the float32 layer's
    # output on the same (rounded) input, rounded once.
    y32, upd32 = layer.apply(v, x.astype(jnp.float32), use_running_average=False,
                             mutable=["batch_stats"], rngs={"noise": jax.random.key(1)})
    if name != "NoisyBatchNorm":  # the noise is added in the input's precision
        np.testing.assert_allclose(np.asarray(y, np.float32),
                                   np.asarray(y32.astype(in_dtype), np.float32),
                                   atol=2 * float(jnp.finfo(in_dtype).eps) * 4, rtol=0)
        for a, b in zip(jax.tree_util.tree_leaves(upd), jax.tree_util.tree_leaves(upd32)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # dtype given: the output is in it
    y_f32 = layer.clone(dtype=jnp.float32).apply(
        v, x, use_running_average=False, mutable=["batch_stats"],
        rngs={"noise": jax.random.key(1)})[0]
    assert y_f32.dtype == jnp.float32
    if "batch_stats" in v:
        y_inf = layer.apply(v, x, use_running_average=True)
        assert y_inf.dtype == in_dtype


def test_half_precision_gradients_keep_dtype():
    layer = snj.SeqNorm(channel_groups=4, batch_groups=2)
    x = (jax.random.normal(jax.random.key(0), SHAPE) + 2).astype(jnp.bfloat16)
    v = layer.init(jax.random.key(0), x, use_running_average=False)

    def loss(params, x):
        y, _ = layer.apply({**v, "params": params}, x, use_running_average=False,
                           mutable=["batch_stats"])
        return jnp.sum(y.astype(jnp.float32) ** 2)

    gp, gx = jax.grad(loss, argnums=(0, 1))(v["params"], x)
    assert gx.dtype == jnp.bfloat16
    assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(gp))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves((gp, gx)))


def test_flax_batchnorm_promotes_where_we_keep_the_input_dtype():
    """Documented difference: flax promotes bf16 input + f32 params to f32."""
    x = jnp.ones(SHAPE, jnp.bfloat16)
    v = nn.BatchNorm().init(jax.random.key(0), x, use_running_average=True)
    assert nn.BatchNorm().apply(v, x, use_running_average=True).dtype == jnp.float32
    assert snj.BatchNorm().apply(v, x, use_running_average=True).dtype == jnp.bfloat16
