"""Every layer against the float64 NumPy references of tests/reference.py.

Training outputs, the values the running statistics move towards, and inference
outputs (with and without example weighing), for dense, sequence and image
inputs and several group settings, in float64 with tight tolerances.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as ref
from plain_sums import plain_first  # noqa: F401 (a fixture)
from seqnorm_jax import functional as F

RTOL = ATOL = 1e-9
SHAPES = {"dense": (16, 8), "sequence": (8, 6, 8), "image": (8, 3, 5, 8)}


def make_x(shape, seed=0, offset=3.0):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    return rng.normal(size=shape) * rng.uniform(0.5, 2.0, c) + offset * rng.normal(size=c)


def affine_params(c, seed=1):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.5, 1.5, c), rng.normal(size=c)


def running(c, seed=2):
    rng = np.random.default_rng(seed)
    return rng.normal(size=c), rng.uniform(0.5, 2.0, c)


def axes_but_last(a):
    return tuple(range(a.ndim - 1))


def assert_close(got, want, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=atol)


def set_update(x, **kw):
    """EMA targets of a batch-pooled set: its stats averaged over sample groups."""
    mean, var = ref.set_stats(x, **kw)
    return mean.mean(axes_but_last(x)), var.mean(axes_but_last(x))


def grouped_inference(x, rm, rv, alpha, g_c, eps=1e-5, gamma=None, beta=None):
    """Inference of a channel-grouped layer: per-(n, c) mixtures of the running and
    the example's own distributions, pooled uniformly over the channel group."""
    x = np.asarray(x, np.float64)
    axes = tuple(range(1, x.ndim - 1))
    s1 = x.mean(axis=axes, keepdims=True) if axes else x
    s2 = (x**2).mean(axis=axes, keepdims=True) if axes else x**2
    e1 = (1 - alpha) * rm + alpha * s1
    e2 = (1 - alpha) * (rv + rm**2) + alpha * s2
    c = x.shape[-1]
    grp = lambda a: np.repeat(
        np.broadcast_to(a, s1.shape).reshape(s1.shape[:-1] + (g_c, c // g_c)).mean(-1), c // g_c,
        axis=-1)
    mean = grp(e1)
    var = grp(e2) - mean**2
    return ref.affine((x - mean) / np.sqrt(var + eps), gamma, beta)


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


# ----------------------------------------------------------------------------
# training: outputs and running-statistics targets
# ----------------------------------------------------------------------------

TRAIN_CASES = [
    # (id, function, kwargs, reference output, reference EMA targets or None)
    ("bn", F.batch_norm, {}, lambda x, g, b: ref.batch_norm(x, 1e-5, g, b),
     lambda x: set_update(x, batch_groups=1, channel_groups=None)),
    *[
        (f"ghost_gm{gm}{'_strided' if st else ''}", F.ghost_norm,
         {"batch_groups": gm, "grouping": "strided" if st else "contiguous"},
         (lambda gm, st: lambda x, g, b: ref.ghost_norm(x, gm, 1e-5, g, b, strided=st))(gm, st),
         (lambda gm, st: lambda x: ref.ghost_running_update(x, gm, strided=st))(gm, st))
        for gm in (1, 2, 4) for st in (False, True)
    ],
    ("ghost_size2", F.ghost_norm, {"ghost_size": 2},
     lambda x, g, b: ref.ghost_norm(x, x.shape[0] // 2, 1e-5, g, b),
     lambda x: ref.ghost_running_update(x, x.shape[0] // 2)),
    *[
        (f"group_gc{gc}", F.group_norm, {"num_groups": gc},
         (lambda gc: lambda x, g, b: ref.group_norm(x, gc, 1e-6, g, b))(gc), None)
        for gc in (1, 2, 4)
    ],
    *[
        (f"seq_gc{gc}_gm{gm}_{order}", F.seq_norm,
         {"channel_groups": gc, "batch_groups": gm, "order": order},
         (lambda gc, gm, order: lambda x, g, b: ref.seq_norm(x, gc, gm, 1e-5, g, b, order))(
             gc, gm, order),
         (lambda gc, gm, order: lambda x: (
             ref.ghost_running_update(ref.group_norm(x, gc, 1e-5), gm) if order == "group_first"
             else ref.ghost_running_update(x, gm)))(gc, gm, order))
        for gc, gm in ((1, 1), (2, 4), (4, 2)) for order in ("group_first", "ghost_first")
    ],
    *[
        (f"batch_group_gm{gm}_gc{gc}", F.batch_group_norm,
         {"batch_groups": gm, "channel_groups": gc},
         (lambda gm, gc: lambda x, g, b: ref.batch_group_norm(x, gm, gc, 1e-5, g, b))(gm, gc),
         (lambda gm, gc: lambda x: set_update(x, batch_groups=gm, channel_groups=gc))(gm, gc))
        for gm, gc in ((1, 1), (2, 4), (4, 2), (8, 8))
    ],
    *[
        (f"bgn_g{g_}", F.bgn, {"num_groups": g_},
         (lambda g_: lambda x, g, b: ref.bgn(x, g_, 1e-5, g, b))(g_),
         (lambda g_: lambda x: set_update(x, batch_groups=1, channel_groups=g_))(g_))
        for g_ in (1, 2, 8)
    ],
    *[
        (f"hn_{ms}_{ss}_{center}", F.heterologous_norm,
         {"mean_set": ms, "std_set": ss, "mean_groups": 2, "std_groups": 4, "std_center": center},
         (lambda ms, ss, center: lambda x, g, b: ref.heterologous_norm(
             x, ms, ss, 2, 4, center, 1e-5, g, b))(ms, ss, center),
         lambda x: set_update(x, batch_groups=1, channel_groups=None))
        for ms, ss in (("batch", "extended"), ("batch", "batch"), ("batch", "layer"),
                       ("instance", "extended_groups"), ("group", "batch"),
                       ("extended", "group"), ("layer", "instance"))
        for center in ("mean_set", "pooled")
    ],
    *[
        (f"gnplus_{variant}", F.gn_plus, {"num_groups": 2, "variant": variant, "mixing": 0.3},
         (lambda variant: lambda x, g, b: ref.gn_plus(x, 2, 0.3, variant, 1e-5, g, b))(variant),
         (lambda variant: lambda x: set_update(
             ref.group_norm(x, 2, 1e-5) if variant == "gn_first" else x,
             batch_groups=1, channel_groups=None))(variant))
        for variant in ("gn_first", "bn_first", "parallel")
    ],
]


def _valid(case_id, shape_id):
    # Per-sample sets of one channel have a single element on dense inputs: an
    # error there (tests/test_errors.py), so those pairs are not generated.
    single = ("hn_instance", "hn_layer_instance", "ghost_size2")
    return shape_id != "dense" or not any(s in case_id for s in single)


TRAIN_PARAMS = [
    pytest.param(case, shape_id, id=f"{case[0]}-{shape_id}")
    for case in TRAIN_CASES for shape_id in SHAPES if _valid(case[0], shape_id)
]


@pytest.mark.parametrize("case,shape_id", TRAIN_PARAMS)
@pytest.mark.parametrize("fast_variance", [True, False], ids=["fastvar", "twopass"])
def test_training_matches_float64_reference(case, shape_id, fast_variance, plain_first):
    case_id, fn, kwargs, ref_out, ref_update = case
    if plain_first and not fast_variance:
        return  # the two-pass variance never takes the plain sums
    # plain-first: small channel offsets, so that the plain sums are kept
    x = make_x(SHAPES[shape_id], offset=0.3 if plain_first else 3.0)
    gamma, beta = affine_params(x.shape[-1])
    kwargs = dict(kwargs)
    mixing = kwargs.pop("mixing", None)
    args = (x, gamma, beta) if mixing is None else (x, gamma, beta, mixing)
    if ref_update is None:
        y = fn(*args, use_fast_variance=fast_variance, **kwargs)
    else:
        y, upd = fn(*args, use_fast_variance=fast_variance, return_stats=True, **kwargs)
        want_mean, want_var = ref_update(x)
        assert_close(upd.mean, want_mean)
        assert_close(upd.var, want_var)
    assert y.dtype == jnp.float64
    assert_close(y, ref_out(x, gamma, beta))


# ----------------------------------------------------------------------------
# inference: running statistics and example weighing
# ----------------------------------------------------------------------------

ALPHAS = (0.0, 0.3, 1.0)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("shape_id", ["sequence", "image"])
@pytest.mark.parametrize("fn,kwargs,g_c", [
    (F.batch_norm, {}, None),
    (F.ghost_norm, {"batch_groups": 4}, None),
    (F.noisy_batch_norm, {}, None),
    (F.batch_group_norm, {"batch_groups": 2, "channel_groups": 4}, 4),
    (F.bgn, {"num_groups": 2}, 2),
    (F.bgn, {"num_groups": 1}, 1),
], ids=["bn", "ghost", "noisy_bn", "batch_group", "bgn2", "bgn1"])
def test_inference_with_example_weight(fn, kwargs, g_c, shape_id, alpha):
    x = make_x(SHAPES[shape_id], seed=3)
    c = x.shape[-1]
    gamma, beta = affine_params(c)
    rm, rv = running(c)
    if g_c is not None:  # these layers store group-constant running statistics
        rm = np.repeat(rm[:g_c], c // g_c)
        rv = np.repeat(rv[:g_c], c // g_c)
    y = fn(x, gamma, beta, running_mean=rm, running_var=rv, example_weight=alpha, **kwargs)
    if g_c is None:
        want = ref.example_weighted_inference(x, rm, rv, alpha, 1e-5, gamma, beta)
    else:
        want = grouped_inference(x, rm, rv, alpha, g_c, 1e-5, gamma, beta)
    assert_close(y, want, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("order", ["group_first", "ghost_first"])
def test_seq_norm_inference(order, alpha):
    x = make_x(SHAPES["image"], seed=4)
    c = x.shape[-1]
    gamma, beta = affine_params(c)
    rm, rv = running(c)
    y = F.seq_norm(x, gamma, beta, channel_groups=2, batch_groups=4, order=order,
                   running_mean=rm, running_var=rv, example_weight=alpha)
    if order == "group_first":
        g = ref.group_norm(x, 2, 1e-5)
        want = ref.affine(ref.example_weighted_inference(g, rm, rv, alpha, 1e-5), gamma, beta)
    else:
        h = ref.example_weighted_inference(x, rm, rv, alpha, 1e-5)
        want = ref.group_norm(h, 2, 1e-5, gamma, beta)
    assert_close(y, want, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("variant", ["gn_first", "bn_first", "parallel"])
def test_gn_plus_inference(variant, alpha):
    x = make_x(SHAPES["image"], seed=5)
    c = x.shape[-1]
    gamma, beta = affine_params(c)
    rm, rv = running(c)
    lam = -0.4
    y = F.gn_plus(x, gamma, beta, lam, num_groups=4, variant=variant, running_mean=rm,
                  running_var=rv, example_weight=alpha)
    bn = lambda a: ref.example_weighted_inference(a, rm, rv, alpha, 1e-5)
    want = ref.gn_plus(x, 4, lam, variant, 1e-5, gamma, beta, bn=bn)
    assert_close(y, want, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("std_groups", [1, 4])
def test_heterologous_norm_inference(std_groups, alpha):
    """HN: BN mean, variance pooled over channel groups around each channel's mean."""
    x = make_x(SHAPES["image"], seed=6)
    c = x.shape[-1]
    gamma, beta = affine_params(c)
    rm, rv = running(c)
    y = F.heterologous_norm(x, gamma, beta, std_groups=std_groups, running_mean=rm,
                            running_var=rv, example_weight=alpha)
    s1 = x.mean(axis=(1, 2), keepdims=True)
    s2 = (x**2).mean(axis=(1, 2), keepdims=True)
    mu = (1 - alpha) * rm + alpha * s1
    var_c = (1 - alpha) * (rv + rm**2) + alpha * s2 - mu**2
    var = np.repeat(var_c.reshape(var_c.shape[:-1] + (std_groups, -1)).mean(-1),
                    c // std_groups, axis=-1)
    want = ref.affine((x - mu) / np.sqrt(var + 1e-5), gamma, beta)
    assert_close(y, want, rtol=1e-8, atol=1e-8)


def test_inference_is_batch_independent():
    """Each example's inference output depends on that example only."""
    x = make_x(SHAPES["image"], seed=7)
    rm, rv = running(x.shape[-1])
    for fn, kw in ((F.ghost_norm, {"batch_groups": 4}), (F.seq_norm, {"channel_groups": 2}),
                   (F.heterologous_norm, {}), (F.gn_plus, {"num_groups": 2})):
        full = fn(x, running_mean=rm, running_var=rv, example_weight=0.4, **kw)
        one = fn(x[3:4], running_mean=rm, running_var=rv, example_weight=0.4, **kw)
        assert_close(one, np.asarray(full)[3:4], rtol=1e-12, atol=1e-12)
