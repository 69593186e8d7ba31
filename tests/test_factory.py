"""``norm_factory``: spec strings -> layer constructors."""

from __future__ import annotations

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import seqnorm_jax as snj
from seqnorm_jax import norm_factory
from seqnorm_jax.linen import LAYERS, layer_fields

KEY = jax.random.key(0)
RNGS = {"noise": jax.random.key(1)}


# ----------------------------------------------------------------------------
# names and aliases
# ----------------------------------------------------------------------------


def test_seqnorm_spec_builds_seqnorm_with_fields():
    ctor = norm_factory("seqnorm:channel_groups=4,batch_groups=8")
    assert isinstance(ctor, functools.partial)
    assert ctor.func is snj.SeqNorm
    assert ctor.keywords == {"channel_groups": 4, "batch_groups": 8}
    module = ctor()
    assert type(module) is snj.SeqNorm
    assert module.channel_groups == 4 and module.batch_groups == 8
    assert type(module.channel_groups) is int and type(module.batch_groups) is int
    # the rest keep their defaults
    assert module.order == "group_first" and module.grouping == "contiguous"
    assert module.ghost_size is None and module.momentum == 0.99


@pytest.mark.parametrize("name, cls", [
    ("bn", snj.BatchNorm),
    ("batchnorm", snj.BatchNorm),
    ("ghost", snj.GhostNorm),
    ("ghostnorm", snj.GhostNorm),
    ("ghostbn", snj.GhostNorm),
    ("gn", snj.GroupNorm),
    ("groupnorm", snj.GroupNorm),
    ("seqnorm", snj.SeqNorm),
    ("hn", snj.HeterologousNorm),
    ("heterologousnorm", snj.HeterologousNorm),
    ("gn+", snj.GNPlus),
    ("gnplus", snj.GNPlus),
    ("bgn", snj.BGN),
    ("noisybn", snj.NoisyBatchNorm),
    ("noisybatchnorm", snj.NoisyBatchNorm),
    ("none", snj.Identity),
    ("identity", snj.Identity),
    ("fourthings", snj.BatchGroupNorm),
    ("batchgroupnorm", snj.BatchGroupNorm),
])
def test_aliases(name, cls):
    ctor = norm_factory(name)
    assert ctor.func is cls
    assert ctor.keywords == {}
    assert type(ctor()) is cls


@pytest.mark.parametrize("name, cls", [
    ("Ghost_Norm", snj.GhostNorm),
    ("GHOST-BN", snj.GhostNorm),
    ("GhostNorm", snj.GhostNorm),
    ("Seq-Norm", snj.SeqNorm),
    ("SEQ_NORM", snj.SeqNorm),
    ("BN", snj.BatchNorm),
    ("GN+", snj.GNPlus),
    ("GN_Plus", snj.GNPlus),
    ("Batch-Group_Norm", snj.BatchGroupNorm),
    ("Four_Things", snj.BatchGroupNorm),
    ("HeterologousNorm", snj.HeterologousNorm),
    ("Noisy_BN", snj.NoisyBatchNorm),
    ("NONE", snj.Identity),
    ("  bgn  ", snj.BGN),
])
def test_names_ignore_case_dash_and_underscore(name, cls):
    assert norm_factory(name).func is cls
    assert norm_factory(name + ":").func is cls  # an empty field list is fine


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_every_class_name_is_accepted(name):
    assert norm_factory(name).func is LAYERS[name]
    assert norm_factory(name.lower()).func is LAYERS[name]
    assert norm_factory(name.upper()).func is LAYERS[name]


# ----------------------------------------------------------------------------
# value parsing
# ----------------------------------------------------------------------------


def test_value_int():
    kw = norm_factory("ghost:batch_groups=4").keywords
    assert kw == {"batch_groups": 4} and type(kw["batch_groups"]) is int


@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("3E-4", 3e-4), ("0.001", 0.001),
                                         ("2.5", 2.5)])
def test_value_float(text, value):
    kw = norm_factory(f"noisybn:noise_std={text}").keywords
    assert type(kw["noise_std"]) is float
    assert kw["noise_std"] == value
    assert norm_factory(f"noisybn:noise_std={text}")().noise_std == value


@pytest.mark.parametrize("text, value", [("false", False), ("False", False), ("FALSE", False),
                                         ("true", True), ("True", True)])
def test_value_bool(text, value):
    kw = norm_factory(f"bn:use_bias={text}").keywords
    assert kw["use_bias"] is value
    assert norm_factory(f"bn:use_bias={text}")().use_bias is value


def test_value_bool_removes_bias_param():
    module = norm_factory("bn:use_bias=false")()
    variables = module.init(KEY, jnp.ones((4, 2, 2, 4)), use_running_average=False)
    assert set(variables["params"]) == {"scale"}


@pytest.mark.parametrize("text", ["none", "None", "NONE", "null"])
def test_value_none(text):
    ctor = norm_factory(f"groupnorm:num_groups={text},group_size=2")
    assert ctor.func is snj.GroupNorm
    assert ctor.keywords == {"num_groups": None, "group_size": 2}
    module = ctor()
    assert module.num_groups is None and module.group_size == 2
    x = jax.random.normal(KEY, (2, 3, 3, 4))
    y = module.apply(module.init(KEY, x), x)
    chex.assert_shape(y, x.shape)
    chex.assert_tree_all_finite(y)


@pytest.mark.parametrize("spec, field, value", [
    ("gnplus:variant=parallel", "variant", "parallel"),
    ("gn+:variant=bn_first", "variant", "bn_first"),
    ("ghost:grouping=strided", "grouping", "strided"),
    ("hn:mean_set=group,std_set=layer", "std_set", "layer"),
    ("seqnorm:order=ghost_first", "order", "ghost_first"),
    ("bn:axis_name=batch", "axis_name", "batch"),
])
def test_value_string(spec, field, value):
    kw = norm_factory(spec).keywords
    assert kw[field] == value and type(kw[field]) is str
    assert getattr(norm_factory(spec)(), field) == value


def test_whitespace_around_items_is_ignored():
    ctor = norm_factory(" SeqNorm : channel_groups = 4 , batch_groups = 8 , ")
    assert ctor.func is snj.SeqNorm
    assert ctor.keywords == {"channel_groups": 4, "batch_groups": 8}


def test_later_item_wins_over_earlier():
    assert norm_factory("ghost:batch_groups=2,batch_groups=4").keywords == {"batch_groups": 4}


# ----------------------------------------------------------------------------
# overrides and callables
# ----------------------------------------------------------------------------


def test_keyword_overrides_win_over_the_string():
    ctor = norm_factory("seqnorm:channel_groups=4,batch_groups=8", batch_groups=2,
                        order="ghost_first")
    assert ctor.keywords == {"channel_groups": 4, "batch_groups": 2, "order": "ghost_first"}
    module = ctor()
    assert (module.channel_groups, module.batch_groups, module.order) == (4, 2, "ghost_first")


def test_override_name_is_allowed_and_call_time_fields_apply():
    ctor = norm_factory("bn", name="norm1")
    assert ctor().name == "norm1"
    ctor = norm_factory("ghost:batch_groups=2")
    module = ctor(momentum=0.9, name="g")
    assert (module.batch_groups, module.momentum, module.name) == (2, 0.9, "g")


def test_unknown_override_raises():
    with pytest.raises(ValueError, match=re.escape("SeqNorm has no field 'foo'") +
                       ".*its fields are.*'channel_groups'"):
        norm_factory("seqnorm", foo=1)


@pytest.mark.parametrize("spec", [snj.GhostNorm, nn.LayerNorm,
                                  lambda **kw: snj.BatchNorm(**kw)])
def test_callable_returns_partial(spec):
    ctor = norm_factory(spec, epsilon=1e-3)
    assert isinstance(ctor, functools.partial)
    assert ctor.func is spec
    assert ctor.keywords == {"epsilon": 1e-3}
    assert ctor().epsilon == 1e-3


def test_callable_without_overrides():
    ctor = norm_factory(snj.SeqNorm)
    assert isinstance(ctor, functools.partial) and ctor.func is snj.SeqNorm
    assert ctor.keywords == {} and ctor.args == ()


# ----------------------------------------------------------------------------
# built modules run and equal the directly built class
# ----------------------------------------------------------------------------

BUILD_CASES = [
    ("bn", snj.BatchNorm, {}),
    ("bn:momentum=0.9,epsilon=1e-3,use_scale=false", snj.BatchNorm,
     {"momentum": 0.9, "epsilon": 1e-3, "use_scale": False}),
    ("ghost:batch_groups=4", snj.GhostNorm, {"batch_groups": 4}),
    ("ghostnorm:ghost_size=2,grouping=strided", snj.GhostNorm,
     {"ghost_size": 2, "grouping": "strided"}),
    ("gn:num_groups=4", snj.GroupNorm, {"num_groups": 4}),
    ("groupnorm:num_groups=none,group_size=2", snj.GroupNorm,
     {"num_groups": None, "group_size": 2}),
    ("seqnorm:channel_groups=4,batch_groups=8", snj.SeqNorm,
     {"channel_groups": 4, "batch_groups": 8}),
    ("seqnorm:channel_group_size=2,ghost_size=4,order=ghost_first", snj.SeqNorm,
     {"channel_group_size": 2, "ghost_size": 4, "order": "ghost_first"}),
    ("fourthings:batch_groups=2,channel_groups=4", snj.BatchGroupNorm,
     {"batch_groups": 2, "channel_groups": 4}),
    ("hn:std_groups=2", snj.HeterologousNorm, {"std_groups": 2}),
    ("hn:mean_set=group,mean_groups=2,std_set=layer,std_center=pooled", snj.HeterologousNorm,
     {"mean_set": "group", "mean_groups": 2, "std_set": "layer", "std_center": "pooled"}),
    ("gn+:num_groups=4,variant=parallel,lambda_init=0.5", snj.GNPlus,
     {"num_groups": 4, "variant": "parallel", "lambda_init": 0.5}),
    ("gnplus:group_size=2,variant=bn_first", snj.GNPlus,
     {"group_size": 2, "variant": "bn_first"}),
    ("bgn:num_groups=2", snj.BGN, {"num_groups": 2}),
    ("bgn:group_size=4", snj.BGN, {"group_size": 4}),
    ("noisybn:noise_std=1e-3", snj.NoisyBatchNorm, {"noise_std": 1e-3}),
    ("none", snj.Identity, {}),
]


@pytest.mark.parametrize("spec, cls, fields", BUILD_CASES, ids=[c[0] for c in BUILD_CASES])
def test_built_module_equals_direct_class(spec, cls, fields):
    built = norm_factory(spec)()
    direct = cls(**fields)
    assert type(built) is cls
    assert built == direct  # dataclass equality: the same fields
    for key, value in fields.items():
        assert getattr(built, key) == value

    x = jax.random.normal(jax.random.key(3), (8, 4, 4, 8))
    outs = []
    for module in (built, direct):
        variables = module.init(KEY, x, use_running_average=False)
        y, state = module.apply(variables, x, use_running_average=False,
                                mutable=["batch_stats"], rngs=RNGS)
        chex.assert_shape(y, x.shape)
        chex.assert_tree_all_finite((y, state))
        outs.append((variables, y, state))
    (v1, y1, s1), (v2, y2, s2) = outs
    chex.assert_trees_all_equal(v1, v2)
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))
    chex.assert_trees_all_equal(s1, s2)
    if cls is snj.Identity:
        np.testing.assert_array_equal(np.asarray(y1), np.asarray(x))
    elif cls is not snj.GroupNorm:
        # the training step moved the running statistics
        assert not np.allclose(np.asarray(s1["batch_stats"]["var"]), 1.0)


# ----------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError, match=re.escape("unknown norm layer 'foo' in 'foo:a=1'") +
                       r".*choose one of \[") as info:
        norm_factory("foo:a=1")
    msg = str(info.value)
    for choice in ("'seqnorm'", "'ghost'", "'bn'", "'gn+'", "'none'", "'fourthings'",
                   "'batchnorm'", "'heterologousnorm'"):
        assert choice in msg


def test_unknown_field_lists_fields():
    with pytest.raises(ValueError, match=re.escape(
            "SeqNorm has no field 'foo' (in norm spec 'seqnorm:channel_groups=4,foo=1')") +
            r".*its fields are \[") as info:
        norm_factory("seqnorm:channel_groups=4,foo=1")
    msg = str(info.value)
    for field in layer_fields(snj.SeqNorm):
        assert f"'{field}'" in msg
    assert "'parent'" not in msg and "'name'" not in msg


def test_unknown_field_is_case_sensitive_and_names_the_layer():
    with pytest.raises(ValueError, match=re.escape("GhostNorm has no field 'Batch_Groups'") +
                       ".*'batch_groups'"):
        norm_factory("ghost:Batch_Groups=4")
    with pytest.raises(ValueError, match=re.escape(
            "Identity has no field 'eps' (in norm spec 'none:eps=1'); its fields are "
            "['axis', 'axis_index_groups', 'axis_name', 'bias_init', 'dtype', 'epsilon'")):
        norm_factory("none:eps=1")


@pytest.mark.parametrize("spec, item", [
    ("seqnorm:channel_groups", "channel_groups"),
    ("seqnorm:channel_groups=4,batch_groups", "batch_groups"),
    ("bn:=4", "=4"),
])
def test_malformed_item(spec, item):
    with pytest.raises(ValueError, match=re.escape(
            f"malformed item {item!r} in norm spec {spec!r}: expected KEY=VALUE")):
        norm_factory(spec)


@pytest.mark.parametrize("spec", ["", "   ", None, 3])
def test_empty_or_non_string_spec(spec):
    with pytest.raises(ValueError, match=re.escape(
            "norm spec must be a non-empty string like 'seqnorm:channel_groups=4', "
            f"got {spec!r}")):
        norm_factory(spec)


@pytest.mark.parametrize("spec", ["gn:num_groups=2", "none"])
def test_batch_norm_style_binding_works_for_every_layer(spec):
    """A model written for BatchNorm binds use_running_average and dtype as fields."""
    import jax
    import jax.numpy as jnp

    layer = norm_factory(spec)(use_running_average=True, dtype=jnp.float32)
    x = jnp.arange(16.0).reshape(2, 2, 4)
    v = layer.init(jax.random.key(0), x)
    y = layer.apply(v, x)
    assert y.shape == x.shape and y.dtype == jnp.float32
    if spec == "none":
        assert bool(jnp.all(y == x))
