"""Equivalences with flax's own layers and between our layers at their extremes (float32).

Each test records the worst absolute error it measured in ``EQUIVALENCE_ERRORS``;
``pytest -s tests/test_equivalence.py`` prints the table at the end.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqnorm_jax as snj
from seqnorm_jax import functional as F

# float32 rounding of O(1) outputs and O(10) statistics.
ATOL = 2e-5
RTOL = 1e-5
EQUIVALENCE_ERRORS: dict[str, float] = {}


def max_err(got, want):
    return max(
        float(np.max(np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64))))
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    )


def record(name, got, want):
    err = max_err(got, want)
    EQUIVALENCE_ERRORS[name] = max(err, EQUIVALENCE_ERRORS.get(name, 0.0))
    return err


@pytest.fixture(scope="module", autouse=True)
def report():
    """``pytest -s tests/test_equivalence.py`` prints the worst error of each equivalence."""
    yield
    print("\nworst absolute error per equivalence (float32 unless noted):")
    for name, err in sorted(EQUIVALENCE_ERRORS.items()):
        print(f"  {name:70s} {err:.2e}")


def to64(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)


def check_against_flax(name, ours, flax32, exact):
    """``ours`` and ``flax32`` are float32 results, ``exact`` the float64 one.

    Ours must be within float32 rounding of the exact result, and differ from
    flax's float32 result by at most rounding plus flax's own error (flax's
    default fast variance E[x^2] - E[x]^2 cancels when |mean| >> std; ours does not).
    """
    err_ours = record(name + " [ours vs float64]", ours, exact)
    err_flax = max_err(flax32, exact)
    err = record(name, ours, flax32)
    assert err_ours <= ATOL, (name, err_ours)
    assert err <= ATOL + err_flax, (name, err, err_flax)
def batches(shape, steps, seed=0):
    key = jax.random.key(seed)
    c = shape[-1]
    out = []
    for i in range(steps):
        k1, k2, k3 = jax.random.split(jax.random.fold_in(key, i), 3)
        scale = jax.random.uniform(k2, (c,), minval=0.5, maxval=2.0)
        shift = 3.0 * jax.random.normal(k3, (c,))
        out.append(jax.random.normal(k1, shape, jnp.float32) * scale + shift)
    return out


def run_steps(module, variables, xs):
    """Training steps; returns the outputs and the final variables."""
    ys = []
    for x in xs:
        y, upd = module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
        variables = {**variables, **upd}
        ys.append(y)
    return ys, variables


def perturbed_params(variables, seed=1):
    key = jax.random.key(seed)
    p = variables["params"]
    return {
        **variables,
        "params": {
            "scale": 1.0 + 0.3 * jax.random.normal(key, p["scale"].shape),
            "bias": 0.5 * jax.random.normal(jax.random.fold_in(key, 1), p["bias"].shape),
        },
    }


SHAPES = [(32, 16), (8, 6, 16), (8, 5, 5, 16)]


def flax32_and_exact(fn, *args):
    """``fn(*args)`` in float32 and, as the exact reference, in float64."""
    out32 = fn(*args)
    with jax.enable_x64(True):
        exact = jax.tree.map(np.asarray, fn(*to64(args)))
    return out32, exact


def steps_then_inference(module):
    def run(variables, xs, x_test):
        ys, variables = run_steps(module, variables, xs)
        y_test = module.apply(variables, x_test, use_running_average=True)
        return ys, variables["batch_stats"], y_test
    return run


@pytest.mark.parametrize("shape", SHAPES, ids=["dense", "sequence", "image"])
@pytest.mark.parametrize("ours", [
    snj.BatchNorm(), snj.GhostNorm(batch_groups=1), snj.BatchGroupNorm(),
    snj.BGN(num_groups=16), snj.HeterologousNorm(std_groups=16),
], ids=["BatchNorm", "GhostNorm(batch_groups=1)", "BatchGroupNorm()",
        "BGN(one channel per group)", "HN(std_groups=C)"])
@pytest.mark.parametrize("fast_variance", [True, False], ids=["fastvar", "twopass"])
def test_bn_family_equals_flax_batchnorm(ours, shape, fast_variance):
    """Outputs and batch_stats over 4 steps, then inference outputs, equal flax's."""
    flax_bn = nn.BatchNorm(use_fast_variance=fast_variance)
    ours = ours.clone(use_fast_variance=fast_variance)
    xs = batches(shape, 4)
    x_test = batches((3,) + shape[1:], 1, seed=9)[0]
    v0 = perturbed_params(flax_bn.init(jax.random.key(0), xs[0], use_running_average=False))
    chex.assert_trees_all_equal_shapes_and_dtypes(
        v0, ours.init(jax.random.key(0), xs[0], use_running_average=False))
    flax32, exact = flax32_and_exact(steps_then_inference(flax_bn), v0, xs, x_test)
    got = steps_then_inference(ours)(v0, xs, x_test)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, flax32)
    mode = "fast" if fast_variance else "two-pass"
    check_against_flax(f"{ours.__class__.__name__} == flax BatchNorm ({mode} variance)", got,
                       flax32, exact)


@pytest.mark.parametrize("shape", SHAPES, ids=["dense", "sequence", "image"])
@pytest.mark.parametrize("groups", [dict(num_groups=4), dict(num_groups=1),
                                    dict(num_groups=None, group_size=2)],
                         ids=["num_groups=4", "num_groups=1", "group_size=2"])
def test_group_norm_equals_flax_group_norm(shape, groups):
    flax_gn = nn.GroupNorm(**groups)
    ours = snj.GroupNorm(**groups)
    x = batches(shape, 1)[0]
    v = perturbed_params(flax_gn.init(jax.random.key(0), x))
    chex.assert_trees_all_equal_shapes_and_dtypes(v, ours.init(jax.random.key(0), x))
    flax32, exact = flax32_and_exact(flax_gn.apply, v, x)
    check_against_flax("GroupNorm == flax GroupNorm", ours.apply(v, x), flax32, exact)


class FlaxSeqNorm(nn.Module):
    """SeqNorm from flax's own layers: GroupNorm without affine, then BatchNorm."""

    num_groups: int
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x, use_running_average):
        g = nn.GroupNorm(num_groups=self.num_groups, epsilon=self.epsilon, use_scale=False,
                         use_bias=False, name="gn")(x)
        return nn.BatchNorm(epsilon=self.epsilon, name="bn")(g, use_running_average)


@pytest.mark.parametrize("shape", SHAPES, ids=["dense", "sequence", "image"])
@pytest.mark.parametrize("channel_groups", [1, 4])
def test_seqnorm_with_one_ghost_batch_is_flax_groupnorm_then_batchnorm(shape, channel_groups):
    xs = batches(shape, 4)
    x_test = batches((2,) + shape[1:], 1, seed=5)[0]
    flax_seq = FlaxSeqNorm(num_groups=channel_groups)
    v = flax_seq.init(jax.random.key(0), xs[0], use_running_average=False)
    bn_vars = perturbed_params({"params": v["params"]["bn"],
                                "batch_stats": v["batch_stats"]["bn"]})
    v_flax = {"params": {"bn": bn_vars["params"]}, "batch_stats": {"bn": bn_vars["batch_stats"]}}
    flax32, exact = flax32_and_exact(steps_then_inference(flax_seq), v_flax, xs, x_test)
    flax32, exact = [(ys, bs["bn"], y) for ys, bs, y in (flax32, exact)]
    ours = snj.SeqNorm(channel_groups=channel_groups, batch_groups=1)
    got = steps_then_inference(ours)(bn_vars, xs, x_test)
    check_against_flax("SeqNorm(batch_groups=1) == flax GroupNorm -> BatchNorm", got, flax32,
                       exact)


@pytest.mark.parametrize("shape", [(16, 8, 8), (8, 4, 4, 8)], ids=["sequence", "image"])
def test_batch_group_norm_extremes(shape):
    """channel_groups=C is GhostNorm; batch_groups=N is GroupNorm (in training)."""
    x = batches(shape, 1)[0]
    n, c = shape[0], shape[-1]
    for gm in (1, 2, 4):
        got = F.batch_group_norm(x, batch_groups=gm, channel_groups=c)
        want = F.ghost_norm(x, batch_groups=gm)
        record("BatchGroupNorm(channel_groups=C) == GhostNorm", got, want)
        chex.assert_trees_all_close(got, want, atol=1e-6, rtol=0)
    for gc in (1, 2, 8):
        got = F.batch_group_norm(x, batch_groups=n, channel_groups=gc)
        gn = nn.GroupNorm(num_groups=gc, epsilon=1e-5, use_scale=False, use_bias=False)
        flax32, exact = flax32_and_exact(gn.apply, {}, x)
        check_against_flax("BatchGroupNorm(batch_groups=N) == flax GroupNorm", got, flax32, exact)


def test_heterologous_norm_with_one_channel_is_batch_norm():
    x = batches((8, 4, 4, 1), 1)[0]
    bn = nn.BatchNorm(use_running_average=False)
    flax32, exact = flax32_and_exact(lambda a: bn.init_with_output(jax.random.key(0), a)[0], x)
    for std_set in ("extended", "extended_groups", "batch"):
        for center in ("mean_set", "pooled"):
            got = F.heterologous_norm(x, std_set=std_set, std_center=center)
            check_against_flax("HeterologousNorm with one channel == flax BatchNorm", got,
                               flax32, exact)


def test_example_weight_extremes():
    """alpha=0 is plain inference; alpha=1 normalizes each example by itself (instance norm)."""
    xs = batches((8, 4, 4, 8), 3)
    layer = snj.GhostNorm(batch_groups=2)
    v = layer.init(jax.random.key(0), xs[0], use_running_average=False)
    _, v = run_steps(layer, perturbed_params(v), xs)
    x = batches((3, 4, 4, 8), 1, seed=7)[0]
    plain = nn.BatchNorm(use_running_average=True).apply(v, x)
    got0 = layer.apply(v, x, use_running_average=True, example_weight=0.0)
    got0_traced = jax.jit(lambda a: layer.apply(v, x, use_running_average=True,
                                                example_weight=a))(0.0)
    record("example_weight=0 == flax BatchNorm inference", [got0, got0_traced], [plain, plain])
    chex.assert_trees_all_close(got0, plain, atol=ATOL, rtol=RTOL)
    chex.assert_trees_all_close(got0_traced, plain, atol=ATOL, rtol=RTOL)
    got1 = layer.apply(v, x, use_running_average=True, example_weight=1.0)
    inorm = nn.InstanceNorm(epsilon=1e-5)
    flax32, exact = flax32_and_exact(inorm.apply, {"params": v["params"]}, x)
    check_against_flax("example_weight=1 == flax InstanceNorm", got1, flax32, exact)


@pytest.mark.parametrize("variant", ["gn_first", "parallel"])
def test_gn_plus_with_large_lambda_is_group_norm(variant):
    x = batches((8, 4, 4, 8), 1)[0]
    layer = snj.GNPlus(num_groups=4, variant=variant, lambda_init=50.0)
    v = perturbed_params(layer.init(jax.random.key(0), x, use_running_average=False))
    v["params"]["lambda"] = jnp.float32(50.0)
    got, _ = layer.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    gn = nn.GroupNorm(num_groups=4, epsilon=1e-5)
    flax32, exact = flax32_and_exact(
        gn.apply, {"params": {k: v["params"][k] for k in ("scale", "bias")}}, x)
    check_against_flax("GNPlus(lambda->+inf) == flax GroupNorm", got, flax32, exact)


def test_gn_plus_with_small_lambda_bn_first_is_batch_norm():
    x = batches((8, 4, 4, 8), 1)[0]
    got = F.gn_plus(x, mixing=-50.0, num_groups=4, variant="bn_first")
    want = F.batch_norm(x)
    record("GNPlus(bn_first, lambda->-inf) == BatchNorm", got, want)
    # BatchNorm reduces x straight to per-channel sums; GN+ goes through per-sample moments:
    # the two float32 roundings differ by a few ulps of the output.
    chex.assert_trees_all_close(got, want, atol=5e-6, rtol=0)


@pytest.mark.parametrize("shape", [(16, 8), (8, 4, 4, 8)], ids=["dense", "image"])
def test_ghost_running_statistics_after_several_steps(shape):
    """Module EMA after 5 steps equals the float64 EMA of the documented targets."""
    import reference as ref

    xs = batches(shape, 5)
    layer = snj.GhostNorm(batch_groups=4, momentum=0.9)
    v = layer.init(jax.random.key(0), xs[0], use_running_average=False)
    chex.assert_trees_all_equal(v["batch_stats"], {"mean": jnp.zeros(shape[-1]),
                                                   "var": jnp.ones(shape[-1])})
    _, v = run_steps(layer, v, xs)
    mean, var = np.zeros(shape[-1]), np.ones(shape[-1])
    for x in xs:
        m, s = ref.ghost_running_update(np.asarray(x), 4)
        mean, var = 0.9 * mean + 0.1 * m, 0.9 * var + 0.1 * s
    record("GhostNorm batch_stats == float64 EMA of METHODS targets", v["batch_stats"],
           {"mean": mean, "var": var})
    chex.assert_trees_all_close(v["batch_stats"], {"mean": mean, "var": var}, atol=ATOL, rtol=RTOL)


def test_jit_and_no_jit_agree():
    x = batches((8, 4, 4, 8), 1)[0]
    for name, fn in F.FUNCTIONS.items():
        kw = {"rng": jax.random.key(0)} if name == "noisy_batch_norm" else {}
        if name in ("group_norm", "gn_plus"):
            kw["num_groups"] = 4
        eager = fn(x, **kw)
        jitted = jax.jit(lambda a, fn=fn, kw=kw: fn(a, **kw))(x)
        record("jit == no jit", jitted, eager)
        chex.assert_trees_all_close(eager, jitted, atol=ATOL, rtol=RTOL)
