"""Bad inputs raise a ValueError that names the argument, the values/shapes and the fix.

Covers the pure functions (:mod:`seqnorm_jax.functional`) and the linen modules
(``init`` / ``apply`` in training with ``mutable=["batch_stats"]``), plus what must
*not* raise: inference at any batch size, a dummy batch-1 ``init``, and ghost
batches of two samples on dense inputs.
"""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import seqnorm_jax as snj
import seqnorm_jax.nnx  # noqa: F401 - snj.nnx
from seqnorm_jax import functional as F

KEY = jax.random.key(0)
EPS = 1e-5


class Raw(str):
    """A piece of :func:`pat` that is already a regex."""


def pat(*pieces: str) -> str:
    """A regex matching ``pieces`` in order, anything in between: literal text, or a
    regex when wrapped in :class:`Raw`."""
    return ".*".join(p if isinstance(p, Raw) else re.escape(p) for p in pieces)


def rand(shape, seed=0, dtype=np.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(dtype))


def train(module, x, init_x=None, rngs=None, **call_kw):
    """``init`` (on ``init_x`` or ``x``), then one training ``apply`` on ``x``."""
    variables = module.init(KEY, x if init_x is None else init_x, use_running_average=False)
    return module.apply(variables, x, use_running_average=False, mutable=["batch_stats"],
                        rngs=rngs, **call_kw)


# Valid keyword arguments for each pure function on an input with C = 4 channels
# (so that only the argument under test is wrong).
VALID_KW = {
    "batch_norm": {},
    "ghost_norm": {"batch_groups": 2},
    "group_norm": {"num_groups": 2},
    "seq_norm": {"channel_groups": 2, "batch_groups": 2},
    "batch_group_norm": {"batch_groups": 2, "channel_groups": 2},
    "heterologous_norm": {},
    "gn_plus": {"num_groups": 2},
    "bgn": {"num_groups": 2},
    "noisy_batch_norm": {"rng": jax.random.key(1)},
}
FUNCTION_NAMES = sorted(VALID_KW)
assert set(FUNCTION_NAMES) == set(F.FUNCTIONS)

RUNNING_MODULES = {
    "BatchNorm": lambda **kw: snj.BatchNorm(**kw),
    "GhostNorm": lambda **kw: snj.GhostNorm(batch_groups=2, **kw),
    "SeqNorm": lambda **kw: snj.SeqNorm(channel_groups=2, batch_groups=2, **kw),
    "BatchGroupNorm": lambda **kw: snj.BatchGroupNorm(batch_groups=2, channel_groups=2, **kw),
    "HeterologousNorm": lambda **kw: snj.HeterologousNorm(**kw),
    "GNPlus": lambda **kw: snj.GNPlus(num_groups=2, **kw),
    "BGN": lambda **kw: snj.BGN(num_groups=2, **kw),
    "NoisyBatchNorm": lambda **kw: snj.NoisyBatchNorm(**kw),
}
ALL_MODULES = {**RUNNING_MODULES, "GroupNorm": lambda **kw: snj.GroupNorm(num_groups=2, **kw)}
NOISE = {"noise": jax.random.key(2)}


# ----------------------------------------------------------------------------
# batch grouping: batch_groups / ghost_size
# ----------------------------------------------------------------------------

X_BATCH6 = (6, 2, 2, 4)  # N = 6: divisors 1, 2, 3, 6
DIV_FIX = "drop_remainder=True"


def batch_msg(who, name, value):
    """``who: name=value does not divide the batch size`` of shape (6, 2, 2, 4), i.e. 6;
    the fix lists the valid values and says to drop the incomplete batch."""
    return (f"{who}: {name}={value} does not divide the batch size", "(6, 2, 2, 4)", "6",
            Raw(rf"use (a )?{name} in \[1, 2, 3, 6\]"), "a multiple of the number of groups",
            DIV_FIX)


BATCH_CASES = [
    # (function, functional kwargs, module, expected message pieces)
    ("ghost_norm", {"batch_groups": 4}, snj.GhostNorm(batch_groups=4),
     batch_msg("ghost_norm", "batch_groups", 4)),
    ("ghost_norm", {"ghost_size": 4}, snj.GhostNorm(ghost_size=4),
     batch_msg("ghost_norm", "ghost_size", 4)),
    ("seq_norm", {"channel_groups": 2, "batch_groups": 4},
     snj.SeqNorm(channel_groups=2, batch_groups=4), batch_msg("seq_norm", "batch_groups", 4)),
    ("seq_norm", {"channel_groups": 2, "ghost_size": 4},
     snj.SeqNorm(channel_groups=2, ghost_size=4), batch_msg("seq_norm", "ghost_size", 4)),
    ("batch_group_norm", {"batch_groups": 4, "channel_groups": 2},
     snj.BatchGroupNorm(batch_groups=4, channel_groups=2),
     batch_msg("batch_group_norm", "batch_groups", 4)),
    ("batch_group_norm", {"ghost_size": 4, "channel_groups": 2},
     snj.BatchGroupNorm(ghost_size=4, channel_groups=2),
     batch_msg("batch_group_norm", "ghost_size", 4)),
    # not a positive count: either "does not divide ... use batch_groups in [...]" or
    # "must be a positive int, got 0" names the argument and the fix
    ("ghost_norm", {"batch_groups": 0}, snj.GhostNorm(batch_groups=0),
     ("ghost_norm: batch_groups", Raw(r"(=0 does not divide.*use batch_groups in \[1, 2, 3, 6\]"
                                      r"| must be a positive int, got 0)"))),
    # both given
    ("ghost_norm", {"batch_groups": 3, "ghost_size": 2}, snj.GhostNorm(batch_groups=3, ghost_size=2),
     ("ghost_norm: give either batch_groups or ghost_size, not both",
      "(got batch_groups=3, ghost_size=2)")),
    ("seq_norm", {"batch_groups": 3, "ghost_size": 2}, snj.SeqNorm(batch_groups=3, ghost_size=2),
     ("seq_norm: give either batch_groups or ghost_size, not both",
      "(got batch_groups=3, ghost_size=2)")),
    ("batch_group_norm", {"batch_groups": 3, "ghost_size": 2},
     snj.BatchGroupNorm(batch_groups=3, ghost_size=2),
     ("batch_group_norm: give either batch_groups or ghost_size, not both",
      "(got batch_groups=3, ghost_size=2)")),
]
BATCH_IDS = [f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[1].items())}" for c in BATCH_CASES]


@pytest.mark.parametrize("fn, kwargs, module, pieces", BATCH_CASES, ids=BATCH_IDS)
def test_batch_grouping_functional(fn, kwargs, module, pieces):
    with pytest.raises(ValueError, match=pat(*pieces)):
        F.FUNCTIONS[fn](rand(X_BATCH6), **kwargs)


@pytest.mark.parametrize("fn, kwargs, module, pieces", BATCH_CASES, ids=BATCH_IDS)
def test_batch_grouping_module(fn, kwargs, module, pieces):
    with pytest.raises(ValueError, match=pat(*pieces)):
        train(module, rand(X_BATCH6))


def test_batch_grouping_module_raises_in_training_after_valid_init():
    """A module initialized on a batch it divides still refuses a batch it does not."""
    module = snj.GhostNorm(batch_groups=4)
    variables = module.init(KEY, rand((8, 2, 2, 4)), use_running_average=False)
    with pytest.raises(ValueError, match=pat(*batch_msg("ghost_norm", "batch_groups", 4))):
        module.apply(variables, rand(X_BATCH6), use_running_average=False,
                     mutable=["batch_stats"])


# ----------------------------------------------------------------------------
# channel grouping
# ----------------------------------------------------------------------------

X_C6 = (4, 2, 2, 6)  # C = 6: divisors 1, 2, 3, 6


def chan_msg(who, name, value):
    """``who: name=value does not divide the number of channels`` of x (4, 2, 2, 6), i.e. 6;
    the fix lists the valid values."""
    return (f"{who}: {name}={value} does not divide the number of channels", "(4, 2, 2, 6)",
            "axis=-1", "6", Raw(rf"use (a )?{name} in \[1, 2, 3, 6\]"))


CHANNEL_CASES = [
    # (function, functional kwargs, module, expected message pieces)
    ("group_norm", {"num_groups": 4}, snj.GroupNorm(num_groups=4),
     chan_msg("group_norm", "num_groups", 4)),
    ("group_norm", {"num_groups": None, "group_size": 4},
     snj.GroupNorm(num_groups=None, group_size=4),
     chan_msg("group_norm", "group_size", 4)),
    ("group_norm", {"num_groups": 2, "group_size": 3}, snj.GroupNorm(num_groups=2, group_size=3),
     ("group_norm: give either num_groups or group_size, not both",
      "(got num_groups=2, group_size=3)")),
    ("seq_norm", {"channel_groups": 4}, snj.SeqNorm(channel_groups=4),
     chan_msg("seq_norm", "channel_groups", 4)),
    ("seq_norm", {"channel_group_size": 4}, snj.SeqNorm(channel_group_size=4),
     chan_msg("seq_norm", "channel_group_size", 4)),
    ("batch_group_norm", {"channel_groups": 4}, snj.BatchGroupNorm(channel_groups=4),
     chan_msg("batch_group_norm", "channel_groups", 4)),
    ("batch_group_norm", {"channel_group_size": 4}, snj.BatchGroupNorm(channel_group_size=4),
     chan_msg("batch_group_norm", "channel_group_size", 4)),
    ("bgn", {"num_groups": 4}, snj.BGN(num_groups=4),
     chan_msg("bgn", "num_groups", 4)),
    ("bgn", {"group_size": 4}, snj.BGN(group_size=4),
     chan_msg("bgn", "group_size", 4)),
    ("gn_plus", {"num_groups": 4}, snj.GNPlus(num_groups=4),
     chan_msg("gn_plus", "num_groups", 4)),
    ("gn_plus", {}, snj.GNPlus(),  # the paper's default G = 32
     chan_msg("gn_plus", "num_groups", 32)),
    ("gn_plus", {"num_groups": None, "group_size": 4}, snj.GNPlus(group_size=4),
     chan_msg("gn_plus", "group_size", 4)),
    ("heterologous_norm", {"std_groups": 4}, snj.HeterologousNorm(std_groups=4),
     chan_msg("heterologous_norm", "std_groups", 4)),
    ("heterologous_norm", {"mean_set": "group", "mean_groups": 4},
     snj.HeterologousNorm(mean_set="group", mean_groups=4),
     chan_msg("heterologous_norm", "mean_groups", 4)),
]
CHANNEL_IDS = [f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[1].items()) or 'default'}"
               for c in CHANNEL_CASES]


@pytest.mark.parametrize("fn, kwargs, module, pieces", CHANNEL_CASES, ids=CHANNEL_IDS)
def test_channel_grouping_functional(fn, kwargs, module, pieces):
    with pytest.raises(ValueError, match=pat(*pieces)):
        F.FUNCTIONS[fn](rand(X_C6), **kwargs)


@pytest.mark.parametrize("fn, kwargs, module, pieces", CHANNEL_CASES, ids=CHANNEL_IDS)
def test_channel_grouping_module(fn, kwargs, module, pieces):
    with pytest.raises(ValueError, match=pat(*pieces)):
        train(module, rand(X_C6))


# ----------------------------------------------------------------------------
# normalization sets of a single element (dense inputs)
# ----------------------------------------------------------------------------

SINGLE_FIX = ("so its variance is 0 and the output is undefined",)
GHOST_FIX = "Use fewer batch_groups (a larger ghost_size) or a larger batch."
GN_FIX = "Use fewer num_groups (a larger group_size)."
HN_FIX = "Use a larger batch, or a set with more elements than 'instance'"

SINGLE_CASES = [
    ("ghost_norm", {"ghost_size": 1}, snj.GhostNorm(ghost_size=1),
     ("ghost_norm: each group's normalization set has a single element",
      "(x.shape=(4, 3): 1 sample(s) x 1 spatial x 1 channel(s))", *SINGLE_FIX, GHOST_FIX)),
    ("ghost_norm", {"batch_groups": 4}, snj.GhostNorm(batch_groups=4),
     ("ghost_norm: each group's normalization set has a single element",
      "(x.shape=(4, 3): 1 sample(s) x 1 spatial x 1 channel(s))", *SINGLE_FIX, GHOST_FIX)),
    ("group_norm", {"num_groups": None, "group_size": 1},
     snj.GroupNorm(num_groups=None, group_size=1),
     ("group_norm: each sample's group normalization set has a single element",
      "(x.shape=(4, 3): 1 sample(s) x 1 spatial x 1 channel(s))", *SINGLE_FIX, GN_FIX)),
    ("heterologous_norm", {"mean_set": "instance"}, snj.HeterologousNorm(mean_set="instance"),
     ("heterologous_norm: each 'instance' normalization set has a single element",
      "(x.shape=(4, 3): 1 sample(s) x 1 spatial x 1 channel(s))", *SINGLE_FIX, HN_FIX)),
]
SINGLE_IDS = [f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[1].items())}" for c in SINGLE_CASES]


@pytest.mark.parametrize("fn, kwargs, module, pieces", SINGLE_CASES, ids=SINGLE_IDS)
def test_single_element_set_functional(fn, kwargs, module, pieces):
    with pytest.raises(ValueError, match=pat(*pieces)):
        F.FUNCTIONS[fn](rand((4, 3)), **kwargs)


@pytest.mark.parametrize("fn, kwargs, module, pieces", SINGLE_CASES, ids=SINGLE_IDS)
def test_single_element_set_module(fn, kwargs, module, pieces):
    with pytest.raises(ValueError, match=pat(*pieces)):
        train(module, rand((4, 3)))


def _pairs_input():
    """Dense (6, 3) input whose ghost pairs (rows 2k, 2k+1) differ by at least 1."""
    rng = np.random.default_rng(3)
    first = rng.normal(size=(3, 3))
    gap = (1.0 + rng.uniform(size=(3, 3))) * rng.choice([-1.0, 1.0], size=(3, 3))
    x = np.stack([first, first + gap], axis=1).reshape(6, 3)
    return jnp.asarray(x.astype(np.float32))


def _ghost_pairs_expected(x):
    x64 = np.asarray(x, np.float64).reshape(3, 2, 3)
    mean = x64.mean(axis=1, keepdims=True)
    var = x64.var(axis=1, keepdims=True)
    return ((x64 - mean) / np.sqrt(var + EPS)).reshape(6, 3)


def _check_pairs(y, x):
    expected = _ghost_pairs_expected(x)
    assert y.shape == (6, 3)
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.abs(np.asarray(y, np.float64)), 1.0, rtol=0, atol=1e-3)
    # each pair is one +1 and one -1
    np.testing.assert_array_equal(np.sign(np.asarray(y)).reshape(3, 2, 3).sum(axis=1), 0)


def test_ghost_size_two_on_dense_input_is_allowed_functional():
    x = _pairs_input()
    _check_pairs(F.ghost_norm(x, ghost_size=2), x)
    _check_pairs(F.ghost_norm(x, batch_groups=3), x)


def test_ghost_size_two_on_dense_input_is_allowed_module():
    x = _pairs_input()
    y, state = train(snj.GhostNorm(ghost_size=2), x)
    _check_pairs(y, x)
    chex.assert_tree_all_finite(state)


# ----------------------------------------------------------------------------
# non-float input
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("fn", FUNCTION_NAMES)
def test_int_input_functional(fn):
    x = jnp.ones((4, 2, 2, 4), jnp.int32)
    with pytest.raises(ValueError, match=pat(
            f"{fn}: x must be a floating-point array, got dtype int32 (shape (4, 2, 2, 4))",
            "cast it first, e.g. x.astype(jnp.float32)")):
        F.FUNCTIONS[fn](x, **VALID_KW[fn])


@pytest.mark.parametrize("dtype", [jnp.bool_, jnp.uint8, jnp.int8])
def test_other_non_float_dtypes_functional(dtype):
    x = jnp.zeros((4, 2, 2, 4), dtype)
    with pytest.raises(ValueError, match=pat(
            f"batch_norm: x must be a floating-point array, got dtype {jnp.dtype(dtype)}",
            "cast it first")):
        F.batch_norm(x)


@pytest.mark.parametrize("name", sorted(ALL_MODULES))
def test_int_input_module(name):
    x = jnp.ones((4, 2, 2, 4), jnp.int32)
    with pytest.raises(ValueError, match=pat("x must be a floating-point array, got dtype int32",
                                             "cast it first")):
        train(ALL_MODULES[name](), x, rngs=NOISE)


# ----------------------------------------------------------------------------
# bad choices, axis and rank
# ----------------------------------------------------------------------------

GROUPING_FIX = "grouping must be one of ('contiguous', 'strided'), got 'random'"
CHOICE_CASES = [
    ("ghost_norm", {"grouping": "random"}, snj.GhostNorm(grouping="random"),
     f"ghost_norm: {GROUPING_FIX}"),
    ("batch_group_norm", {"grouping": "random"}, snj.BatchGroupNorm(grouping="random"),
     f"batch_group_norm: {GROUPING_FIX}"),
    ("seq_norm", {"grouping": "random"}, snj.SeqNorm(grouping="random"),
     f"seq_norm: {GROUPING_FIX}"),
    ("seq_norm", {"order": "x"}, snj.SeqNorm(order="x"),
     "seq_norm: order must be one of ('group_first', 'ghost_first'), got 'x'"),
    ("gn_plus", {"num_groups": 2, "variant": "x"}, snj.GNPlus(num_groups=2, variant="x"),
     "gn_plus: variant must be one of ('gn_first', 'bn_first', 'parallel'), got 'x'"),
    ("heterologous_norm", {"mean_set": "foo"}, snj.HeterologousNorm(mean_set="foo"),
     "heterologous_norm: mean_set must be one of ('batch', 'instance', 'layer', 'group', "
     "'extended', 'extended_groups'), got 'foo'"),
    ("heterologous_norm", {"std_set": "foo"}, snj.HeterologousNorm(std_set="foo"),
     "heterologous_norm: std_set must be one of ('batch', 'instance', 'layer', 'group', "
     "'extended', 'extended_groups'), got 'foo'"),
    ("heterologous_norm", {"std_center": "foo"}, snj.HeterologousNorm(std_center="foo"),
     "heterologous_norm: std_center must be one of ('mean_set', 'pooled'), got 'foo'"),
]
CHOICE_IDS = [f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[1].items())}" for c in CHOICE_CASES]


@pytest.mark.parametrize("fn, kwargs, module, message", CHOICE_CASES, ids=CHOICE_IDS)
def test_bad_choice_functional(fn, kwargs, module, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        F.FUNCTIONS[fn](rand((4, 2, 2, 4)), **kwargs)


@pytest.mark.parametrize("fn, kwargs, module, message", CHOICE_CASES, ids=CHOICE_IDS)
def test_bad_choice_module(fn, kwargs, module, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        train(module, rand((4, 2, 2, 4)))


AXIS_FIX = "axis 0 is the batch axis; use axis=-1 for channels-last inputs"


@pytest.mark.parametrize("fn", FUNCTION_NAMES)
@pytest.mark.parametrize("axis", [0, -4, 4])
def test_bad_axis_functional(fn, axis):
    with pytest.raises(ValueError, match=pat(
            f"axis={axis} is not a valid feature axis for an input of rank 4", AXIS_FIX)):
        F.FUNCTIONS[fn](rand((4, 2, 2, 4)), axis=axis, **VALID_KW[fn])


@pytest.mark.parametrize("fn", FUNCTION_NAMES)
def test_axis_tuple_functional(fn):
    with pytest.raises(ValueError, match=pat(
            "axis must be a single int (the feature axis), got (1, 2)",
            "reshape or transpose the input so the channels form one axis")):
        F.FUNCTIONS[fn](rand((4, 2, 2, 4)), axis=(1, 2), **VALID_KW[fn])


@pytest.mark.parametrize("name", sorted(RUNNING_MODULES))  # GroupNorm has no axis, as flax's
def test_bad_axis_module(name):
    with pytest.raises(ValueError, match=pat(
            "axis=0 is not a valid feature axis for an input of rank 4", AXIS_FIX)):
        train(ALL_MODULES[name](axis=0), rand((4, 2, 2, 4)), rngs=NOISE)


RANK_MSG = ("x must have a batch axis and a feature axis (rank >= 2), got rank 1",
            "Add a batch axis, e.g. x[None]")


# batch_norm and group_norm take a rank-1 input as one sample, as flax's layers do
# (tests/test_flax_compat.py).
@pytest.mark.parametrize("fn", sorted(set(FUNCTION_NAMES) - {"batch_norm", "group_norm"}))
def test_rank1_input_functional(fn):
    with pytest.raises(ValueError, match=pat(*RANK_MSG)):
        F.FUNCTIONS[fn](rand((8,)), **VALID_KW[fn])


@pytest.mark.parametrize("name", sorted(set(ALL_MODULES) - {"BatchNorm", "GroupNorm"}))
def test_rank1_input_module(name):
    with pytest.raises(ValueError, match=pat(*RANK_MSG)):
        train(ALL_MODULES[name](), rand((8,)), rngs=NOISE)


@pytest.mark.parametrize("fn", sorted(set(FUNCTION_NAMES) - {"group_norm"}))
@pytest.mark.parametrize("given", ["running_mean", "running_var"])
def test_running_stats_must_come_in_pairs(fn, given):
    kwargs = {given: jnp.zeros((4,))}
    with pytest.raises(ValueError, match=pat(
            f"{fn}: give both running_mean and running_var, or neither")):
        F.FUNCTIONS[fn](rand((4, 2, 2, 4)), **VALID_KW[fn], **kwargs)


# ----------------------------------------------------------------------------
# training-only misuse: example_weight, the noise rng, float32 reductions
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(RUNNING_MODULES))
def test_example_weight_in_training_raises(name):
    module = RUNNING_MODULES[name]()
    x = rand((4, 2, 2, 4))
    variables = module.init(KEY, x, use_running_average=False)
    with pytest.raises(ValueError, match=pat(
            f"{name}: example_weight=0.5 applies at inference only",
            "call with use_running_average=True")):
        module.apply(variables, x, use_running_average=False, mutable=["batch_stats"],
                     rngs=NOISE, example_weight=0.5)
    # the same weight at inference is accepted
    y = module.apply(variables, x, use_running_average=True, example_weight=0.5)
    assert y.shape == x.shape
    chex.assert_tree_all_finite(y)


def test_noisy_batch_norm_training_without_rng_module():
    module = snj.NoisyBatchNorm()
    x = rand((4, 2, 2, 4))
    variables = module.init(KEY, x, use_running_average=False)  # no rng needed at init
    with pytest.raises(ValueError, match=pat(
            "NoisyBatchNorm: training with noise_std=0.0003 needs an rng",
            "pass rngs={'noise': key} to apply")):
        module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    # with the rng (or at inference) it runs
    y, _ = module.apply(variables, x, use_running_average=False, mutable=["batch_stats"],
                        rngs=NOISE)
    chex.assert_tree_all_finite(y)
    chex.assert_tree_all_finite(module.apply(variables, x, use_running_average=True))


def test_noisy_batch_norm_custom_rng_collection_named_in_message():
    module = snj.NoisyBatchNorm(noise_std=1e-3, rng_collection="dropout")
    x = rand((4, 2, 2, 4))
    variables = module.init(KEY, x, use_running_average=False)
    with pytest.raises(ValueError, match=pat("noise_std=0.001 needs an rng",
                                             "pass rngs={'dropout': key} to apply")):
        module.apply(variables, x, use_running_average=False, mutable=["batch_stats"],
                     rngs=NOISE)


def test_noisy_batch_norm_training_without_rng_functional():
    with pytest.raises(ValueError, match=pat(
            "noisy_batch_norm: training with noise_std=0.0003 needs an rng key",
            "pass rng=", "rngs={'noise': key} to apply")):
        F.noisy_batch_norm(rand((4, 2, 2, 4)))


@pytest.mark.parametrize("name", sorted(ALL_MODULES))
def test_force_float32_reductions_false_raises(name):
    module = ALL_MODULES[name](force_float32_reductions=False)
    with pytest.raises(ValueError, match=pat(
            f"{name}: force_float32_reductions=False is not supported",
            "always computes statistics in float32 or wider", "Leave it True")):
        train(module, rand((4, 2, 2, 4)), rngs=NOISE)


# ----------------------------------------------------------------------------
# inference accepts any batch size, including 1
# ----------------------------------------------------------------------------


def _np_group_norm(x, groups, eps=EPS):
    """Per-sample normalization over (spatial, channels of the group), float64."""
    x = np.asarray(x, np.float64)
    n, c = x.shape[0], x.shape[-1]
    v = x.reshape(n, -1, groups, c // groups)
    mean = v.mean(axis=(1, 3), keepdims=True)
    var = v.var(axis=(1, 3), keepdims=True)
    return ((v - mean) / np.sqrt(var + eps)).reshape(x.shape)


def _bn_initial(x):
    """Inference with the initial running stats (mean 0, var 1): x / sqrt(1 + eps)."""
    return np.asarray(x, np.float64) / np.sqrt(1.0 + EPS)


def _seq_initial(x):
    return _np_group_norm(x, 2) / np.sqrt(1.0 + EPS)


def _gn_plus_initial(x):
    s = 1.0 / (1.0 + np.exp(-1.0))  # sigmoid(lambda_init = 1)
    g = _np_group_norm(x, 2)
    return s * g + (1 - s) * g / np.sqrt(1.0 + EPS)


INFERENCE_CASES = {
    # name: (module, closed form with the initial running stats, tolerance)
    "BatchNorm": (snj.BatchNorm(), _bn_initial, 1e-6),
    "GhostNorm": (snj.GhostNorm(batch_groups=4), _bn_initial, 1e-6),
    "BatchGroupNorm": (snj.BatchGroupNorm(batch_groups=2, channel_groups=2), _bn_initial, 1e-6),
    "BGN": (snj.BGN(num_groups=2), _bn_initial, 1e-6),
    "NoisyBatchNorm": (snj.NoisyBatchNorm(), _bn_initial, 1e-6),
    # HN (BN mean, EN std) pools the running stats: mean 0, var 1 as well.
    "HeterologousNorm": (snj.HeterologousNorm(), _bn_initial, 1e-6),
    # GroupNorm step from the example itself, then the running stats.
    "SeqNorm": (snj.SeqNorm(channel_groups=2, batch_groups=4), _seq_initial, 1e-5),
    "GNPlus": (snj.GNPlus(num_groups=2), _gn_plus_initial, 1e-5),
}


@pytest.mark.parametrize("name", sorted(INFERENCE_CASES))
def test_inference_accepts_any_batch_size(name):
    module, closed_form, tol = INFERENCE_CASES[name]
    variables = module.init(KEY, rand((8, 4, 4, 4), seed=10), use_running_average=False)
    chex.assert_trees_all_equal(
        variables["batch_stats"], {"mean": jnp.zeros((4,)), "var": jnp.ones((4,))})
    for n in (1, 3, 5):
        x = rand((n, 4, 4, 4), seed=n)
        y = module.apply(variables, x, use_running_average=True)
        chex.assert_shape(y, (n, 4, 4, 4))
        chex.assert_tree_all_finite(y)
        np.testing.assert_allclose(np.asarray(y, np.float64), closed_form(x), rtol=0, atol=tol)


@pytest.mark.parametrize("name", sorted(INFERENCE_CASES))
def test_inference_batch_of_one_dense(name):
    module, closed_form, tol = INFERENCE_CASES[name]
    variables = module.init(KEY, rand((8, 4), seed=11), use_running_average=False)
    x = rand((1, 4), seed=12)
    y = module.apply(variables, x, use_running_average=True)
    chex.assert_shape(y, (1, 4))
    chex.assert_tree_all_finite(y)
    np.testing.assert_allclose(np.asarray(y, np.float64), closed_form(x), rtol=0, atol=tol)


# ----------------------------------------------------------------------------
# a dummy batch-1 init of a grouped layer
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 4, 4, 4), (1, 4)], ids=["spatial", "dense"])
def test_dummy_batch_one_init_then_training(shape):
    module = snj.GhostNorm(batch_groups=8)
    x1 = rand(shape, seed=20)
    y1, variables = module.init_with_output(KEY, x1, use_running_average=False)
    c = shape[-1]
    chex.assert_trees_all_equal_shapes_and_dtypes(
        variables,
        {"params": {"scale": jnp.zeros((c,)), "bias": jnp.zeros((c,))},
         "batch_stats": {"mean": jnp.zeros((c,)), "var": jnp.zeros((c,))}})
    # init does not move the running statistics
    chex.assert_trees_all_equal(
        variables["batch_stats"], {"mean": jnp.zeros((c,)), "var": jnp.ones((c,))})
    chex.assert_shape(y1, shape)
    chex.assert_tree_all_finite(y1)

    x = rand((16,) + shape[1:], seed=21)
    y, state = module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    chex.assert_shape(y, x.shape)
    chex.assert_tree_all_finite((y, state))
    expected, update = F.ghost_norm(x, batch_groups=8, return_stats=True)
    np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state["batch_stats"]["mean"]),
                               0.01 * np.asarray(update.mean), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(state["batch_stats"]["var"]),
                               0.99 + 0.01 * np.asarray(update.var), rtol=1e-6, atol=1e-7)


DUMMY_INIT_MODULES = {
    "BatchNorm": snj.BatchNorm(),
    "GhostNorm": snj.GhostNorm(batch_groups=8),
    "SeqNorm": snj.SeqNorm(channel_groups=2, batch_groups=8),
    "BatchGroupNorm": snj.BatchGroupNorm(batch_groups=8, channel_groups=2),
    "HeterologousNorm": snj.HeterologousNorm(),
    "GNPlus": snj.GNPlus(num_groups=2),
    "BGN": snj.BGN(num_groups=2),
    "NoisyBatchNorm": snj.NoisyBatchNorm(),
}


@pytest.mark.parametrize("name", sorted(DUMMY_INIT_MODULES))
def test_dummy_dense_batch_one_init_every_running_module(name):
    """A dense (1, C) dummy batch has single-element batch sets; init must still work
    (linen docstring: such a batch is normalized with the initial running stats)."""
    module = DUMMY_INIT_MODULES[name]
    y, variables = module.init_with_output(KEY, rand((1, 4), seed=30),
                                           use_running_average=False)
    chex.assert_shape(y, (1, 4))
    chex.assert_tree_all_finite(y)
    chex.assert_trees_all_equal(
        variables["batch_stats"], {"mean": jnp.zeros((4,)), "var": jnp.ones((4,))})
    chex.assert_shape((variables["params"]["scale"], variables["params"]["bias"]), (4,))
    y, state = module.apply(variables, rand((16, 4), seed=31), use_running_average=False,
                            mutable=["batch_stats"], rngs=NOISE)
    chex.assert_tree_all_finite((y, state))


# ----------------------------------------------------------------------------
# edge inputs with a defined result: a traced example_weight out of range, an
# all-False mask, an empty batch, a traced use_running_average, rank-1 GhostNorm
# ----------------------------------------------------------------------------


def _trained(name, x):
    """A module with running statistics moved away from their initial (0, 1)."""
    module = RUNNING_MODULES[name]()
    variables = module.init(KEY, x, use_running_average=False)
    _, upd = module.apply(variables, x * 3 + 2, use_running_average=False,
                          mutable=["batch_stats"], rngs=NOISE)
    return module, {**variables, **upd}


@pytest.mark.parametrize("name", sorted(RUNNING_MODULES))
@pytest.mark.parametrize("weight, clipped", [(-0.5, 0.0), (1.5, 1.0), (0.25, 0.25)])
def test_traced_example_weight_is_clipped_to_unit_interval(name, weight, clipped):
    x = rand((4, 3, 3, 4))
    module, variables = _trained(name, x)
    infer = lambda w: module.apply(variables, x, use_running_average=True, example_weight=w)
    got = jax.jit(infer)(jnp.float32(weight))
    chex.assert_tree_all_finite(got)
    np.testing.assert_allclose(got, infer(clipped), rtol=1e-5, atol=1e-5)
    if weight != clipped:  # a static weight out of range is refused, naming it
        with pytest.raises(ValueError, match=pat(
                f"example_weight must be in [0, 1]", f"got {weight}")):
            infer(weight)


@pytest.mark.parametrize("name", sorted(ALL_MODULES))
def test_all_false_mask_is_finite_and_keeps_running_statistics(name):
    x = rand((4, 3, 3, 4)) + 5
    module = ALL_MODULES[name]()
    variables = module.init(KEY, x, use_running_average=False)
    none = jnp.zeros(x.shape, bool)
    y, upd = module.apply(variables, x, use_running_average=False, mask=none,
                          mutable=["batch_stats"], rngs=NOISE)
    chex.assert_tree_all_finite(y)
    # Every set is empty: its mean and variance are 0, so a one-step layer gives
    # x / sqrt(epsilon) (scale 1, bias 0); two-step layers (SeqNorm, GN+) compose two such
    # steps, and NoisyBatchNorm's input noise is amplified by the same 1 / sqrt(epsilon).
    if name not in ("SeqNorm", "GNPlus", "NoisyBatchNorm"):
        eps = 1e-6 if name == "GroupNorm" else 1e-5
        np.testing.assert_allclose(y, x / np.sqrt(eps), rtol=1e-5)
    # the running statistics do not move towards statistics that do not exist
    chex.assert_trees_all_equal(upd.get("batch_stats", {}), variables.get("batch_stats", {}))
    # masked-in results are unchanged by the rule: a mask keeping the first sample only
    # moves the running statistics as the first sample alone does
    if name in ("BatchNorm", "NoisyBatchNorm", "HeterologousNorm", "BGN"):
        first = jnp.zeros(x.shape, bool).at[:1].set(True)
        _, masked = module.apply(variables, x, use_running_average=False, mask=first,
                                 mutable=["batch_stats"], rngs=NOISE)
        _, alone = module.apply(variables, x[:1], use_running_average=False,
                                mutable=["batch_stats"], rngs=NOISE)
        if name != "NoisyBatchNorm":  # its noise differs with the batch shape
            chex.assert_trees_all_close(masked, alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(RUNNING_MODULES))
def test_all_false_mask_on_one_device_moves_the_running_statistics_of_all(name):
    # Under shard_map, a device whose mask keeps nothing still takes the statistics of
    # the others: every device ends with the same running statistics.
    if name in ("GhostNorm", "SeqNorm", "BatchGroupNorm"):
        make = lambda: RUNNING_MODULES[name]().clone(axis_name="d", batch_groups=1)
    else:
        make = lambda: RUNNING_MODULES[name](axis_name="d")
    module = make()
    x = rand((4, 3, 3, 4)) + 5
    mask = jnp.ones(x.shape, bool).at[:2].set(False)  # devices 0 and 1 keep nothing
    variables = module.init(KEY, x, use_running_average=False)
    mesh = jax.make_mesh((4,), ("d",), axis_types=(jax.sharding.AxisType.Explicit,))
    spec = jax.sharding.PartitionSpec("d")

    def step(x, mask):
        _, upd = module.apply(variables, x, use_running_average=False, mask=mask,
                              mutable=["batch_stats"], rngs={"noise": jax.random.key(2)})
        return jax.tree.map(lambda a: a[None], upd["batch_stats"])

    x, mask = (jax.device_put(a, jax.sharding.NamedSharding(mesh, spec)) for a in (x, mask))
    per_device = jax.device_get(
        jax.shard_map(step, mesh=mesh, in_specs=(spec, spec), out_specs=spec)(x, mask))
    for leaf in jax.tree.leaves(per_device):
        chex.assert_tree_all_finite(leaf)
        np.testing.assert_allclose(leaf, np.broadcast_to(leaf[2], leaf.shape), rtol=1e-6)
    assert not np.allclose(per_device["mean"][0], variables["batch_stats"]["mean"])


@pytest.mark.parametrize("name", sorted(ALL_MODULES))
def test_empty_batch(name):
    x = rand((0, 3, 3, 4))
    module = ALL_MODULES[name]()
    variables = module.init(KEY, rand((4, 3, 3, 4)), use_running_average=False)
    # inference (and GroupNorm, per sample) has an empty output, as flax's layers
    y = module.apply(variables, x, use_running_average=True)
    assert y.shape == x.shape
    if name == "GroupNorm":
        assert module.apply(variables, x).shape == x.shape
        return
    # training needs the batch's statistics: refused, naming x's shape and the fix
    with pytest.raises(ValueError, match=pat("x has an empty batch (shape (0, 3, 3, 4))",
                                             "use_running_average=True")):
        module.apply(variables, x, use_running_average=False, mutable=["batch_stats"],
                     rngs=NOISE)


@pytest.mark.parametrize("name", sorted(RUNNING_MODULES))
def test_traced_use_running_average_names_the_argument(name):
    x = rand((4, 3, 3, 4))
    module = RUNNING_MODULES[name]()
    variables = module.init(KEY, x, use_running_average=False)
    step = jax.jit(lambda v, x, mode: module.apply(v, x, use_running_average=mode,
                                                   mutable=["batch_stats"], rngs=NOISE))
    with pytest.raises(ValueError, match=pat(
            f"{name}: use_running_average must be a Python bool known when the function is "
            "traced", "static_argnames='use_running_average'")):
        step(variables, x, True)
    nnx_layer = getattr(snj.nnx, name)(4, rngs=nnx.Rngs(0), **_NNX_KW.get(name, {}))
    with pytest.raises(ValueError, match=pat(f"{name}: use_running_average must be a Python bool")):
        nnx.jit(lambda layer, x, mode: layer(x, use_running_average=mode))(nnx_layer, x, True)


_NNX_KW = {"GhostNorm": {"batch_groups": 2}, "SeqNorm": {"channel_groups": 2, "batch_groups": 2},
           "BatchGroupNorm": {"batch_groups": 2, "channel_groups": 2},
           "GNPlus": {"num_groups": 2}, "BGN": {"num_groups": 2}}


@pytest.mark.parametrize("kw", [{"batch_groups": 1}, {"ghost_size": 1}, {}])
def test_ghost_norm_of_one_group_takes_rank1_input_as_batch_norm(kw):
    x = rand((6,)) * 2 + 1
    ours = snj.GhostNorm(**kw)
    flax_bn = nn.BatchNorm()
    got, got_upd = train(ours, x)
    want, want_upd = train(flax_bn, x)
    np.testing.assert_allclose(got, want, atol=1e-6)  # the bias: one-element sets
    chex.assert_trees_all_close(got_upd, want_upd, rtol=1e-6)
    np.testing.assert_allclose(F.ghost_norm(x, **kw), F.batch_norm(x), atol=0)
