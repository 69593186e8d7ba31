"""The registry of norm layers, the typed NormSpec, and the shared argument checks."""

import dataclasses

import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import seqnorm_jax.linen as snl
import seqnorm_jax.nnx as snx
from seqnorm_jax import checks, registry
from seqnorm_jax.factory import NormSpec, norm_factory

SHAPE = (32, 4, 4, 16)  # N=32, S=16, C=16


@pytest.mark.parametrize("layer, m", [
    (snl.BatchNorm(), 32 * 16),
    (snl.NoisyBatchNorm(), 32 * 16),
    (snl.GhostNorm(batch_groups=4), 8 * 16),
    (snl.GhostNorm(ghost_size=16), 16 * 16),
    (snl.BatchGroupNorm(batch_groups=2, channel_groups=4), 16 * 16 * 4),
    (snl.GroupNorm(num_groups=4), 16 * 4),
    (snl.GroupNorm(num_groups=None, group_size=2), 16 * 2),
    (snl.BGN(num_groups=2), 32 * 16 * 8),
    (snl.SeqNorm(channel_groups=4, batch_groups=8), 4 * 16),
    (snl.SeqNorm(channel_groups=4, batch_groups=8, order="ghost_first"), 16 * 4),
    (snl.HeterologousNorm(), None),
    (snl.GNPlus(num_groups=4), None),
    (nn.BatchNorm(), 32 * 16),
    (nn.GroupNorm(num_groups=8), 16 * 2),
    (nn.LayerNorm(), 16),
    (nn.LayerNorm(reduction_axes=(1, 2, 3)), 16 * 16),
    (nn.InstanceNorm(), 16),
    (nn.RMSNorm(), None),
])
def test_normalization_set_size(layer, m):
    assert registry.is_norm_layer(layer)
    assert registry.normalization_set_size(layer, SHAPE) == m


def test_nnx_layers_are_the_same_entries():
    rngs = nnx.Rngs(0)
    for lin, nx in [(snl.GhostNorm(batch_groups=4), snx.GhostNorm(16, batch_groups=4, rngs=rngs)),
                    (snl.SeqNorm(channel_groups=4, batch_groups=8),
                     snx.SeqNorm(16, channel_groups=4, batch_groups=8, rngs=rngs)),
                    (nn.BatchNorm(), nnx.BatchNorm(16, rngs=rngs))]:
        assert registry.entry_of(lin) is registry.entry_of(nx)
        assert registry.normalization_set_size(nx, SHAPE) == registry.normalization_set_size(
            lin, SHAPE)


def test_what_is_not_a_norm_layer():
    for module in (snl.Identity(), nn.Dense(3), nn.Conv(3, (3, 3))):
        assert not registry.is_norm_layer(module)
        assert not registry.takes_example_weight(module)
    with pytest.raises(ValueError, match="Dense is not a norm layer"):
        registry.normalization_set_size(nn.Dense(3), SHAPE)


def test_a_subclass_is_its_base_layer():
    class MyNorm(snl.GhostNorm):
        pass
    assert registry.entry_of(MyNorm(batch_groups=2)).name == "GhostNorm"


def test_example_weight_only_for_ours():
    assert registry.takes_example_weight(snl.SeqNorm())
    assert not registry.takes_example_weight(nn.BatchNorm())


def test_set_size_errors_name_the_field():
    with pytest.raises(ValueError, match=r"batch_groups=5 does not divide .* 32; use batch_groups"
                                         r" in \[1, 2, 4, 8, 16, 32\]"):
        registry.normalization_set_size(snl.GhostNorm(batch_groups=5), SHAPE)


def test_feature_axes():
    assert registry.feature_axes(snl.BatchNorm(axis=1), 4) == (1,)
    assert registry.feature_axes(nn.LayerNorm(feature_axes=(-2, -1)), 4) == (2, 3)
    assert registry.feature_axes(nn.GroupNorm(), 4) == (3,)


# ----------------------------------------------------------------------------- NormSpec

def test_spec_round_trip_and_order():
    spec = NormSpec.parse("SEQ_NORM:batch_groups=8, channel_groups=4")
    assert spec.layer == "SeqNorm"
    assert str(spec) == "seqnorm:channel_groups=4,batch_groups=8"  # the layer's field order
    assert NormSpec.parse(str(spec)) == spec
    assert hash(NormSpec.parse(str(spec))) == hash(spec)
    assert NormSpec.parse(spec) is spec
    assert str(NormSpec.parse("none")) == "identity"
    assert str(NormSpec.parse("gn+:variant=parallel,lambda_init=0.5")) == (
        "gnplus:variant=parallel,lambda_init=0.5")


def test_spec_values_and_replace():
    spec = NormSpec.parse("ghost:ghost_size=16,grouping=strided,axis_name=none")
    assert spec.fields == {"ghost_size": 16, "grouping": "strided", "axis_name": None}
    assert spec.get("batch_groups") is None and spec.value("momentum") == 0.99
    wider = spec.replace(momentum=0.9)
    assert wider.value("momentum") == 0.9 and spec.value("momentum") == 0.99
    assert str(NormSpec.parse("bn:use_bias=false")) == "batchnorm:use_bias=false"


def test_spec_builds_the_layer():
    layer = NormSpec.parse("seqnorm:channel_groups=4").factory(batch_groups=2)()
    assert isinstance(layer, snl.SeqNorm)
    assert (layer.channel_groups, layer.batch_groups) == (4, 2)
    assert norm_factory(NormSpec.parse("bgn"))().num_groups == 1


def test_spec_of_layers_round_trips():
    for text in ("seqnorm:channel_groups=4,batch_groups=8", "ghostnorm:momentum=0.9",
                 "heterologousnorm:std_set=group,std_groups=8", "batchnorm", "identity"):
        spec = NormSpec.parse(text)
        assert registry.spec_of(spec.factory()()) == spec
    rngs = nnx.Rngs(0)
    assert str(registry.spec_of(snx.GhostNorm(8, batch_groups=2, rngs=rngs))) == (
        "ghostnorm:batch_groups=2")
    with pytest.raises(ValueError, match="not a seqnorm-jax norm layer"):
        registry.spec_of(nn.BatchNorm())


@pytest.mark.parametrize("text, message", [
    ("seqnrm", r"unknown norm layer 'seqnrm' in 'seqnrm'; choose one of .* Did you mean 'seqnorm'\?"),
    ("seqnorm:chanel_groups=2", r"SeqNorm has no field 'chanel_groups' \(in norm spec "
                                r"'seqnorm:chanel_groups=2'\).* Did you mean 'channel_groups'\?"),
    ("seqnorm:channel_groups", r"malformed item 'channel_groups'"),
    ("", r"non-empty string"),
])
def test_spec_errors(text, message):
    with pytest.raises(ValueError, match=message):
        NormSpec.parse(text)


def test_spec_is_frozen():
    spec = NormSpec.parse("bn")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.layer = "GhostNorm"
    with pytest.raises(TypeError):
        spec.fields["momentum"] = 0.5


# ----------------------------------------------------------------------------- checks

def test_positive_int():
    assert checks.positive_int(3, "steps") == 3
    assert checks.positive_int(np.int64(4), "steps") == 4
    assert checks.positive_int(0, "steps", allow_zero=True) == 0
    for bad in (0, -1, 2.0, True, "3", None):
        with pytest.raises(ValueError, match=r"^Trainer: steps must be a positive int, got "):
            checks.positive_int(bad, "steps", "Trainer")
    with pytest.raises(ValueError, match=r"got -1; use 0 to switch it off"):
        checks.positive_int(-1, "every", allow_zero=True, fix="use 0 to switch it off")


def test_choice_suggests():
    assert checks.choice("strided", ("contiguous", "strided"), "grouping") == "strided"
    with pytest.raises(ValueError, match=r"^f: grouping must be one of \('contiguous', "
                                         r"'strided'\), got 'stridd'\. Did you mean 'strided'\?$"):
        checks.choice("stridd", ("contiguous", "strided"), "grouping", "f")
    with pytest.raises(ValueError, match=r"got \['a'\]\.$"):
        checks.choice(["a"], {"a", "b"}, "x")  # unhashable: no crash, no suggestion


def test_divisors_and_groups():
    assert checks.divisors(12) == [1, 2, 3, 4, 6, 12]
    kw = dict(who="f", groups_name="g", size_name="s", what="batch")
    assert checks.resolve_groups(12, None, 3, **kw) == 4
    assert checks.resolve_groups(12, 6, None, **kw) == 6
    assert checks.resolve_groups(12, None, None, default=1, **kw) == 1
    with pytest.raises(ValueError, match=r"give either g or s, not both"):
        checks.resolve_groups(12, 2, 6, **kw)
    with pytest.raises(ValueError, match=r"s=5 does not divide the batch, 12; use s in "
                                         r"\[1, 2, 3, 4, 6, 12\]"):
        checks.resolve_groups(12, None, 5, **kw)
