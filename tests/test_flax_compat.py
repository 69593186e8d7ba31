"""The drop-in contract: flax's own normalization test cases, run on flax's layer and ours.

The cases of flax's ``NormalizationTest`` (``tests/linen/linen_test.py``) and its
``nn.vmap`` BatchNorm case (``tests/linen/linen_transforms_test.py``), restated here,
each parametrized over ``flax.linen``'s layer (id ``flax``) and seqnorm-jax's (id
``ours``). Where ours differs on purpose (complex inputs; the output dtype), the
case asserts our documented behaviour for ours and flax's for flax.
After them: the fields, defaults and call signatures, masks on every layer, rank-1
input, and the checks of call arguments.
"""

import functools
import inspect
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import random

import seqnorm_jax as snj

BATCH_NORMS = [pytest.param(nn.BatchNorm, id="flax"), pytest.param(snj.BatchNorm, id="ours")]
GROUP_NORMS = [pytest.param(nn.GroupNorm, id="flax"), pytest.param(snj.GroupNorm, id="ours")]


def is_ours(cls) -> bool:
    return cls.__module__.startswith("seqnorm_jax")


# ----------------------------------------------------------------------------
# flax's NormalizationTest
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("use_mask", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("bn", BATCH_NORMS)
def test_batch_norm(bn, use_mask):
    """Training output has mean 0 / variance 1 per channel over the (masked) entries;
    the running statistics move by 1 - momentum towards the batch's."""
    k_x, k_m, k_init = random.split(random.key(0), 3)
    x = random.normal(k_x, (4, 3, 2))
    m = None
    if use_mask:
        m = random.randint(k_m, (4, 3, 1), 0, 2).astype(bool)
        x = jnp.where(m, x, jnp.nan)  # masked-out entries must not matter
    layer = bn(momentum=0.9, use_running_average=False)
    y, variables = layer.init_with_output(k_init, x, mask=m)
    np.testing.assert_allclose(y.mean((0, 1), where=m), [0.0, 0.0], atol=1e-4)
    np.testing.assert_allclose(y.var((0, 1), where=m), [1.0, 1.0], rtol=1e-4)

    _, state = layer.apply(variables, x, mask=m, mutable=["batch_stats"])
    ema = state["batch_stats"]
    np.testing.assert_allclose(ema["mean"], 0.1 * x.mean((0, 1), where=m), atol=1e-4)
    np.testing.assert_allclose(ema["var"], 0.9 + 0.1 * x.var((0, 1), where=m), rtol=1e-4)


@pytest.mark.parametrize("use_mask", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("bn", BATCH_NORMS)
def test_batch_norm_complex(bn, use_mask):
    """flax normalizes complex inputs; ours refuses them (documented difference)."""
    k_x, k_m, k_init = random.split(random.key(0), 3)
    x = random.normal(k_x, (4, 3, 2), dtype=jnp.complex64)
    m = None
    if use_mask:
        m = random.randint(k_m, (4, 3, 1), 0, 2).astype(bool)
        x = jnp.where(m, x, jnp.nan)
    layer = bn(momentum=0.9, use_running_average=False, dtype=jnp.complex64)
    if is_ours(bn):
        with pytest.raises(ValueError, match="x must be a floating-point array, got dtype "
                                             "complex64.*cast it first"):
            layer.init_with_output(k_init, x, mask=m)
        return
    y, variables = layer.init_with_output(k_init, x, mask=m)
    mean = y.mean((0, 1), where=m)
    assert mean.dtype == jnp.complex64
    np.testing.assert_allclose(mean, [0.0, 0.0], atol=1e-4)
    np.testing.assert_allclose(y.var((0, 1), where=m), [1.0, 1.0], rtol=1e-4)
    _, state = layer.apply(variables, x, mask=m, mutable=["batch_stats"])
    np.testing.assert_allclose(state["batch_stats"]["mean"], 0.1 * x.mean((0, 1), where=m),
                               atol=1e-4)


def group_norm_reference(x, groups, axes, eps):
    """(x - mean) / sqrt(var + eps) over ``axes`` of the ``(..., groups, C/groups)`` view."""
    xg = x.reshape(x.shape[:-1] + (groups, x.shape[-1] // groups))
    y = (xg - xg.mean(axis=axes, keepdims=True)) * jax.lax.rsqrt(
        xg.var(axis=axes, keepdims=True) + eps)
    return y.reshape(x.shape)


@pytest.mark.parametrize("gn", GROUP_NORMS)
def test_group_norm(gn):
    x = random.normal(random.key(1), (2, 5, 4, 4, 32))
    layer = gn(num_groups=2, use_bias=False, use_scale=False, epsilon=1e-5)
    y, _ = layer.init_with_output(random.key(2), x)
    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_allclose(y, group_norm_reference(x, 2, (1, 2, 3, 5), 1e-5), atol=1e-4)


@pytest.mark.parametrize("gn", GROUP_NORMS)
def test_group_norm_unbatched(gn):
    """``reduction_axes`` that include the leading axis: one set over the whole input."""
    x = random.normal(random.key(1), (2, 5, 4, 4, 32))
    layer = gn(num_groups=2, use_bias=False, use_scale=False, epsilon=1e-5,
               reduction_axes=(0, 1, 3, 4))
    y, _ = layer.init_with_output(random.key(2), x)
    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_allclose(y, group_norm_reference(x, 2, (0, 1, 3, 5), 1e-5), atol=1e-4)


@pytest.mark.parametrize("gn", GROUP_NORMS)
def test_group_norm_batched(gn):
    """Negative ``reduction_axes`` leave extra leading (batch) axes alone."""
    x = random.normal(random.key(1), (3, 4, 32))
    layer = gn(num_groups=2, use_bias=False, use_scale=False, epsilon=1e-5,
               reduction_axes=(-3, -2, -1))
    y, _ = layer.init_with_output(random.key(2), x)
    assert y.dtype == x.dtype and y.shape == x.shape
    x5 = jnp.stack([x] * 5)
    y5 = layer.apply({}, x5)
    np.testing.assert_allclose(y5[0], y, atol=1e-4)
    np.testing.assert_allclose(y5, group_norm_reference(x5, 2, (1, 2, 4), 1e-5), atol=1e-4)


@pytest.mark.parametrize("gn", GROUP_NORMS)
def test_group_norm_raises(gn):
    """3 groups do not divide 32 channels."""
    x = random.normal(random.key(1), (2, 5, 4, 4, 32))
    with pytest.raises(ValueError):
        gn(num_groups=3, use_bias=False, use_scale=False, epsilon=1e-5).init(random.key(2), x)


@pytest.mark.parametrize("gn", GROUP_NORMS)
def test_group_norm_raises_incorrect_reduction_axes(gn):
    """``reduction_axes`` must include the feature (last) axis."""
    x = random.normal(random.key(1), (2, 5, 4, 4, 32))
    layer = gn(num_groups=2, use_bias=False, use_scale=False, epsilon=1e-5,
               reduction_axes=(0, 1, 2, 3))
    with pytest.raises(ValueError):
        layer.init(random.key(2), x)


@pytest.mark.parametrize("gn", GROUP_NORMS)
def test_group_norm_mask(gn):
    """Each (sample, group) set has mean 0 / variance 1 over its masked entries; NaN in
    masked-out entries stays there."""
    k_x, k_m = random.split(random.key(0))
    x = random.normal(k_x, (5, 3, 2, 7 * 3))
    m = random.choice(k_m, 2, x.shape).astype(bool).at[..., :2].set(True)
    x = jnp.where(m, x, jnp.nan)
    y, _ = gn(7, use_bias=False, use_scale=False).init_with_output(random.key(1), x, mask=m)
    yg, mg = y.reshape(5, 3, 2, 7, 3), m.reshape(5, 3, 2, 7, 3)
    np.testing.assert_allclose(yg.mean((1, 2, 4), where=mg), 0, atol=1e-4)
    np.testing.assert_allclose(yg.var((1, 2, 4), where=mg), 1, atol=1e-4)
    assert np.isfinite(np.asarray(y)[np.asarray(m)]).all()


@pytest.mark.parametrize("bn", BATCH_NORMS)
def test_batch_norm_multi_init(bn):
    """One layer called twice during ``init`` with an ``axis_name`` that is not bound
    (init ignores it, and does not update the running statistics)."""

    class Twice(nn.Module):
        @nn.compact
        def __call__(self, x):
            norm = bn(name="norm", use_running_average=False, axis_name="batch")
            x = norm(x)
            return x, norm(x)

    (y1, y2), variables = Twice().init_with_output(random.key(0),
                                                   random.normal(random.key(1), (2, 4)))
    np.testing.assert_allclose(y1, y2, rtol=0.005)
    np.testing.assert_array_equal(variables["batch_stats"]["norm"]["mean"], np.zeros(4))


UNIFORM = nn.initializers.uniform()


@pytest.mark.parametrize("gn", GROUP_NORMS)
@pytest.mark.parametrize("reference, groups", [
    (functools.partial(nn.LayerNorm, reduction_axes=(1, 2, 3)), {"num_groups": 1}),
    (nn.InstanceNorm, {"num_groups": None, "group_size": 1}),
], ids=["LayerNorm==GroupNorm(1)", "InstanceNorm==GroupNorm(group_size=1)"])
def test_normalization_equivalence(gn, reference, groups):
    """GroupNorm with one group is LayerNorm over all but the batch axis; with one
    channel per group it is InstanceNorm: same variables, same outputs."""
    x = random.normal(random.key(0), (2, 3, 4, 5))
    ref = reference(bias_init=UNIFORM, scale_init=UNIFORM)
    layer = gn(**groups, bias_init=UNIFORM, scale_init=UNIFORM)
    v_ref, v = ref.init(random.key(1), x), layer.init(random.key(1), x)
    jax.tree.map(np.testing.assert_array_equal, v, v_ref)
    np.testing.assert_allclose(layer.apply(v, x), ref.apply(v_ref, x),
                               atol=1e-7)


# ----------------------------------------------------------------------------
# inside linen transforms (flax's test_vmap_batchnorm; nn.scan over layers)
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("bn", BATCH_NORMS)
def test_vmap_batchnorm(bn):
    """BatchNorm with ``axis_name`` inside ``nn.vmap``: the statistics span the mapped
    axis, so 5 mapped batches of 4 equal one batch of 20."""

    class DenseNorm(nn.Module):
        axis_name: str | None = None

        @nn.compact
        def __call__(self, x):
            return bn(axis_name=self.axis_name, use_running_average=False)(nn.Dense(3)(x))

    x = random.uniform(random.key(1), (4, 4))
    xs = random.uniform(random.key(2), (5, 4, 4))
    mapped = nn.vmap(DenseNorm, in_axes=(0,), variable_axes={"params": None,
                                                              "batch_stats": None},
                     split_rngs={"params": False}, axis_name="batch")(axis_name="batch")
    variables = DenseNorm().init(random.key(3), x)
    y_flat, s_flat = DenseNorm().apply(variables, xs.reshape(-1, 4), mutable=["batch_stats"])
    y_map, s_map = mapped.apply(variables, xs, mutable=["batch_stats"])
    np.testing.assert_allclose(y_map, y_flat.reshape(5, 4, 3), atol=1e-5)
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6), s_map, s_flat)


@pytest.mark.parametrize("bn", BATCH_NORMS)
def test_scan_batchnorm_layers(bn):
    """A stack of 3 BatchNorm layers under ``nn.scan`` (per-layer parameters and running
    statistics) equals the 3 layers applied one after the other."""

    class Step(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            return bn(use_running_average=False, momentum=0.5)(h * 2.0 + 1.0), None

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(Step, variable_axes={"params": 0, "batch_stats": 0},
                           split_rngs={"params": True}, length=3)
            return scan()(x, None)[0]

    class Unrolled(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(3):
                x = Step(name=f"layer{i}")(x, None)[0]
            return x

    x = random.normal(random.key(0), (6, 5))
    v = Stack().init(random.key(1), x)
    y, state = Stack().apply(v, x, mutable=["batch_stats"])
    per_layer = lambda tree, i: jax.tree.map(lambda a: a[i], tree["ScanStep_0"])
    v_unrolled = {c: {f"layer{i}": per_layer(v[c], i) for i in range(3)} for c in v}
    y_ref, state_ref = Unrolled().apply(v_unrolled, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    for i in range(3):
        jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6),
                     per_layer(state["batch_stats"], i), state_ref["batch_stats"][f"layer{i}"])
    assert not np.allclose(state["batch_stats"]["ScanStep_0"]["BatchNorm_0"]["mean"], 0.0)


# ----------------------------------------------------------------------------
# fields, defaults and call signatures
# ----------------------------------------------------------------------------


def fields_and_defaults(cls):
    return [(p.name, p.default) for p in inspect.signature(cls).parameters.values()
            if p.name not in ("parent", "name")]


RUNNING_LAYERS = [snj.BatchNorm, snj.GhostNorm, snj.SeqNorm, snj.BatchGroupNorm,
                  snj.HeterologousNorm, snj.GNPlus, snj.BGN, snj.NoisyBatchNorm, snj.Identity]


@pytest.mark.parametrize("cls", RUNNING_LAYERS, ids=lambda c: c.__name__)
def test_running_layers_start_with_flax_batch_norm_fields(cls):
    want = fields_and_defaults(nn.BatchNorm)
    assert fields_and_defaults(cls)[:len(want)] == want
    if cls is snj.BatchNorm:
        assert fields_and_defaults(cls) == want


def test_group_norm_fields_are_flax_fields_then_use_running_average():
    assert fields_and_defaults(snj.GroupNorm) == (
        fields_and_defaults(nn.GroupNorm) + [("use_running_average", None)])
    assert snj.GroupNorm(8).num_groups == 8


@pytest.mark.parametrize("ours, flax_cls", [(cls, nn.BatchNorm) for cls in RUNNING_LAYERS]
                         + [(snj.GroupNorm, nn.GroupNorm)], ids=lambda c: c.__name__)
def test_call_signature_extends_flax(ours, flax_cls):
    """Ours takes flax's call arguments, in flax's order and kinds, then example_weight."""
    strip = lambda cls: [(p.name, p.kind, p.default)
                         for p in inspect.signature(cls.__call__).parameters.values()]
    got, want = strip(ours), strip(flax_cls)
    kw_only = inspect.Parameter.KEYWORD_ONLY
    assert [p for p in got if p[1] != kw_only] == [
        ("self", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
        ("x", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
        ("use_running_average", inspect.Parameter.POSITIONAL_OR_KEYWORD, None)]
    assert [p for p in want if p[1] != kw_only] == [p for p in got if p[1] != kw_only][
        :len([p for p in want if p[1] != kw_only])]
    assert [p for p in got if p[1] == kw_only] == [("mask", kw_only, None),
                                                    ("example_weight", kw_only, 0.0)]


def test_group_norm_positional_num_groups_matches_flax():
    """The issue's case: ``GroupNorm(8)`` on 64 channels is 8 groups, as flax's."""
    x = random.normal(random.key(0), (4, 3, 3, 64))
    ours, theirs = snj.GroupNorm(8), nn.GroupNorm(8)
    v = theirs.init(random.key(1), x)
    np.testing.assert_allclose(ours.apply(v, x), theirs.apply(v, x), atol=2e-5)


@pytest.mark.parametrize("bn", BATCH_NORMS)
def test_output_dtype_rule(bn):
    """flax promotes a bfloat16 input with float32 parameters to float32; ours keeps the
    input's dtype (documented difference); both honour an explicit ``dtype``."""
    x = random.normal(random.key(0), (8, 4)).astype(jnp.bfloat16)
    layer = bn(use_running_average=False)
    y, _ = layer.init_with_output(random.key(1), x)
    assert y.dtype == (jnp.bfloat16 if is_ours(bn) else jnp.float32)
    y, _ = bn(use_running_average=False, dtype=jnp.bfloat16).init_with_output(random.key(1), x)
    assert y.dtype == jnp.bfloat16


@pytest.mark.parametrize("bn", BATCH_NORMS)
def test_rank1_input_is_one_sample(bn):
    """flax's BatchNorm takes a rank-1 input as one sample of C features; ours too."""
    x = jnp.array([0.5, -1.0, 2.0])
    layer = bn(momentum=0.5)
    v = layer.init(random.key(0), x, use_running_average=False)
    assert v["batch_stats"]["mean"].shape == (3,)
    y, state = layer.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(y, np.zeros(3), atol=1e-6)  # one sample: x - mean = 0
    np.testing.assert_allclose(state["batch_stats"]["mean"], 0.5 * np.asarray(x), atol=1e-7)
    np.testing.assert_allclose(state["batch_stats"]["var"], np.full(3, 0.5), atol=1e-7)
    y = layer.apply({**v, **state}, x, use_running_average=True)
    want = (np.asarray(x) - 0.5 * np.asarray(x)) / np.sqrt(0.5 + 1e-5)
    np.testing.assert_allclose(y, want, rtol=1e-5)


@pytest.mark.parametrize("gn", GROUP_NORMS)
def test_group_norm_rank1_input_is_one_sample(gn):
    """A rank-1 ``(C,)`` input to GroupNorm: each channel group of the one sample."""
    x = random.normal(random.key(0), (12,))
    layer = gn(3, use_scale=False, use_bias=False)
    y = layer.apply(layer.init(random.key(1), x), x)
    np.testing.assert_allclose(y, group_norm_reference(x, 3, (-1,), 1e-6), atol=1e-5)


# ----------------------------------------------------------------------------
# masks on every layer
# ----------------------------------------------------------------------------

MASKED_LAYERS = {
    "BatchNorm": snj.BatchNorm(),
    "GhostNorm": snj.GhostNorm(batch_groups=2),
    "GhostNorm_strided": snj.GhostNorm(batch_groups=2, grouping="strided"),
    "SeqNorm": snj.SeqNorm(channel_groups=2, batch_groups=2),
    "BatchGroupNorm": snj.BatchGroupNorm(batch_groups=2, channel_groups=2),
    "HeterologousNorm": snj.HeterologousNorm(),
    "GNPlus": snj.GNPlus(num_groups=2),
    "BGN": snj.BGN(num_groups=2),
    "NoisyBatchNorm": snj.NoisyBatchNorm(noise_std=0.0),
    "GroupNorm": snj.GroupNorm(num_groups=2),
}


def masked_input():
    """x (8, 3, 4) and a mask that keeps most entries (every set keeps several)."""
    x = random.normal(random.key(0), (8, 3, 4)) * 2.0 + 1.0
    m = random.uniform(random.key(1), (8, 3, 4)) > 0.25
    return x, m.at[:, 0, :].set(True)


@pytest.mark.parametrize("name", sorted(MASKED_LAYERS))
def test_mask_all_true_is_no_mask(name):
    layer = MASKED_LAYERS[name]
    x, _ = masked_input()
    v = layer.init(random.key(2), x, use_running_average=False)
    full = jnp.ones(x.shape, bool)
    y0, s0 = layer.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    y1, s1 = layer.apply(v, x, use_running_average=False, mask=full, mutable=["batch_stats"])
    np.testing.assert_allclose(y1, y0, atol=1e-6)
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6), s1, s0)


@pytest.mark.parametrize("grouping", ["contiguous", "strided"])
def test_masked_ghost_norm_matches_a_float64_reference(grouping):
    """Each ghost batch is normalized with the mean and variance of its own kept entries."""
    x, m = masked_input()
    layer = snj.GhostNorm(batch_groups=2, grouping=grouping, use_scale=False, use_bias=False)
    v = layer.init(random.key(2), x, use_running_average=False)
    y, _ = layer.apply(v, jnp.where(m, x, jnp.nan), use_running_average=False, mask=m,
                       mutable=["batch_stats"])
    xn, mn = np.asarray(x, np.float64), np.asarray(m)
    want = np.empty_like(xn)
    for g in range(2):
        rows = np.arange(g * 4, g * 4 + 4) if grouping == "contiguous" else np.arange(g, 8, 2)
        xg, mg = xn[rows], mn[rows]
        mean = xg.mean((0, 1), where=mg, keepdims=True)
        var = xg.var((0, 1), where=mg, keepdims=True)
        want[rows] = (xg - mean) / np.sqrt(var + 1e-5)
    np.testing.assert_allclose(np.asarray(y)[mn], want[mn], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(MASKED_LAYERS))
def test_masked_entries_never_leak(name):
    """What masked-out entries hold (NaN, or 1e6) changes no kept output, no running
    statistic and no gradient of the kept outputs."""
    layer = MASKED_LAYERS[name]
    x, m = masked_input()
    v = layer.init(random.key(2), x, use_running_average=False)

    @jax.jit
    def run(filler):
        xf = jnp.where(m, x, filler)

        def loss(params, xf):
            y, state = layer.apply({**v, "params": params}, xf, use_running_average=False,
                                   mask=m, mutable=["batch_stats"])
            return jnp.sum(jnp.where(m, y, 0.0) * jnp.cos(x)), (y, state)

        (_, (y, state)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            v["params"], xf)
        return jnp.where(m, y, 0.0), state, grads[0], jnp.where(m, grads[1], 0.0)

    with_nan, with_big = run(jnp.float32(jnp.nan)), run(jnp.float32(1e6))
    for a, b in zip(jax.tree.leaves(with_nan), jax.tree.leaves(with_big), strict=True):
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------
# call arguments checked before any work
# ----------------------------------------------------------------------------


def train(layer, x, **call):
    v = layer.init(random.key(0), x, use_running_average=False)
    return layer.apply(v, x, use_running_average=False, mutable=["batch_stats"], **call)


def infer(layer, x, **call):
    v = layer.init(random.key(0), x, use_running_average=False)
    return layer.apply(v, x, use_running_average=True, **call)


X = random.normal(random.key(5), (4, 2, 2, 4))


def example_weight_error(layer):
    return pytest.raises(ValueError, match=rf"{type(layer).__name__}: example_weight must be in "
                         r"\[0, 1\].*got .*pass a weight in \[0, 1\]")


@pytest.mark.parametrize("weight", [1.5, -0.1, math.nan, np.float32(2.0)])
def test_example_weight_outside_unit_interval(weight):
    layer = snj.GhostNorm(batch_groups=2)
    with example_weight_error(layer):
        layer.init(random.key(0), X, use_running_average=True, example_weight=weight)


@pytest.mark.parametrize("name", sorted(MASKED_LAYERS))
def test_every_layer_checks_example_weight(name):
    layer = MASKED_LAYERS[name]
    with example_weight_error(layer):
        layer.init(random.key(0), X, use_running_average=True, example_weight=1.5)


@pytest.mark.parametrize("momentum", [-0.1, 1.5, math.nan])
def test_momentum_outside_unit_interval(momentum):
    with pytest.raises(ValueError, match=r"GhostNorm: momentum must be in \[0, 1\].*"
                                         r"flax's default is 0.99"):
        train(snj.GhostNorm(batch_groups=2, momentum=momentum), X)


@pytest.mark.parametrize("layer", [snj.SeqNorm(epsilon=0.0), snj.GroupNorm(2, epsilon=-1.0),
                                   snj.BatchNorm(epsilon=math.inf)],
                         ids=["SeqNorm", "GroupNorm", "BatchNorm"])
def test_epsilon_must_be_positive(layer):
    with pytest.raises(ValueError, match=rf"{type(layer).__name__}: epsilon must be a "
                                         r"positive finite number.*such as 1e-5"):
        train(layer, X)


def test_example_weight_in_range_and_traced_weights_pass():
    layer = snj.GhostNorm(batch_groups=2)
    y_half = infer(layer, X, example_weight=0.5)
    y_traced = jax.jit(lambda w: infer(layer, X, example_weight=w))(0.5)
    np.testing.assert_allclose(y_traced, y_half, atol=1e-6)
    assert not np.allclose(y_half, infer(layer, X))

