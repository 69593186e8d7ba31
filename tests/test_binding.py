"""One record per call: a layer's fields reach its pure function by name, once, checked once.

* every keyword of a layer's pure function is a field of the linen layer and an argument of
  its NNX twin with the same default, but the few listed here (what is not a field, and
  the one default that differs on purpose);
* a layer's output and running statistics equal its pure function's with the fields
  passed by hand (float64 NumPy reference for BatchNorm's);
* a call checks ``epsilon``, ``example_weight`` and ``momentum`` exactly once each.
"""

from __future__ import annotations

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import seqnorm_jax.linen as snl
import seqnorm_jax.nnx as snx
from seqnorm_jax import checks
from seqnorm_jax import functional as F
from seqnorm_jax.functional._call import SHARED, keyword_names

RUNNING = sorted(name for name, cls in snl.LAYERS.items()
                 if issubclass(cls, snl._RunningNorm))
# What a layer passes that is not a field: GN+'s learnable lambda, the noise key.
NOT_FIELDS = {"mixing", "rng"}
# Defaults that differ on purpose: the pure BGN's num_groups=None is one channel per group
# (BatchNorm), the layer's 1 pools every channel (the paper's choice for tiny batches).
DIFFERENT_DEFAULTS = {("BGN", "num_groups")}


def _nnx_defaults(cls) -> dict:
    out = {}
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            for p in inspect.signature(klass.__init__).parameters.values():
                out.setdefault(p.name, p.default)
    return out


@pytest.mark.parametrize("name", RUNNING)
def test_every_keyword_is_a_field_with_the_pure_default(name):
    linen_cls = snl.LAYERS[name]
    function = F.FUNCTIONS[linen_cls.function]
    pure = inspect.signature(function).parameters
    fields = {f.name: f.default for f in dataclasses.fields(linen_cls)}
    nnx_defaults = _nnx_defaults(getattr(snx, name))
    call_arguments = {"running_mean", "running_var", "example_weight", "return_stats", "mask"}
    checked = 0
    for key in keyword_names(function):
        if key in NOT_FIELDS or key in call_arguments:
            assert key not in fields
            continue
        assert key in fields, f"{name}.{key} is not a linen field"
        assert key in nnx_defaults, f"{name}.{key} is not an NNX argument"
        if (name, key) in DIFFERENT_DEFAULTS:
            assert fields[key] == nnx_defaults[key] != pure[key].default
        else:
            assert fields[key] == nnx_defaults[key] == pure[key].default, key
        checked += 1
    assert checked >= len(SHARED) - len(call_arguments)


def test_shared_tail_written_once():
    tail = list(SHARED)
    for name, function in F.FUNCTIONS.items():
        if name == "group_norm":  # flax's GroupNorm order; no running statistics
            continue
        assert keyword_names(function)[-len(tail):] == tuple(tail), name


CASES = {
    "GhostNorm": dict(batch_groups=2),
    "SeqNorm": dict(channel_groups=2, batch_groups=2, order="ghost_first"),
    "BatchGroupNorm": dict(batch_groups=2, channel_group_size=2),
    "HeterologousNorm": dict(mean_set="group", std_set="extended", mean_groups=2,
                             std_groups=2),
    "GNPlus": dict(group_size=2, variant="bn_first"),
    "BGN": dict(num_groups=2),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_layer_equals_its_function_with_fields_by_hand(name):
    x = jax.random.normal(jax.random.key(1), (8, 3, 3, 4)) * 2 + 1
    layer = snl.LAYERS[name](epsilon=1e-3, **CASES[name])
    v = layer.init(jax.random.key(0), x, use_running_average=False)
    y, upd = layer.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    function = F.FUNCTIONS[layer.function]
    kw = dict(CASES[name])
    if name == "GNPlus":  # the layer's lambda; a group_size overrides num_groups=32
        kw.update(mixing=v["params"]["lambda"], num_groups=None)
    want, target = function(x, v["params"]["scale"], v["params"]["bias"], epsilon=1e-3,
                            return_stats=True, **kw)
    np.testing.assert_allclose(y, want, rtol=0, atol=0)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.99 * 0 + 0.01 * target.mean,
                               rtol=1e-6, atol=1e-7)
    # inference: the running statistics and the example weight reach the function as given
    yi = layer.apply(upd | {"params": v["params"]}, x, use_running_average=True,
                     example_weight=0.25)
    wi = function(x, v["params"]["scale"], v["params"]["bias"], epsilon=1e-3,
                  running_mean=upd["batch_stats"]["mean"], running_var=upd["batch_stats"]["var"],
                  example_weight=0.25, **kw)
    np.testing.assert_allclose(yi, wi, rtol=0, atol=0)


def test_batch_norm_layer_against_float64_reference():
    x = np.random.default_rng(0).normal(3.0, 2.0, (16, 2, 2, 3)).astype(np.float32)
    layer = snl.BatchNorm(epsilon=1e-3, momentum=0.9)
    v = layer.init(jax.random.key(0), x, use_running_average=False)
    y, upd = layer.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    x64 = x.astype(np.float64)
    mean, var = x64.mean((0, 1, 2)), x64.var((0, 1, 2))
    np.testing.assert_allclose(y, (x64 - mean) / np.sqrt(var + 1e-3), rtol=0, atol=2e-6)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * mean, rtol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * var, rtol=1e-6)


def _count_checks(monkeypatch) -> dict[str, int]:
    counts = {"epsilon": 0, "example_weight": 0, "momentum": 0}
    for rule in counts:
        original = getattr(checks, rule)

        def spy(*args, _rule=rule, _original=original, **kwargs):
            counts[_rule] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(checks, rule, spy)
    return counts


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_each_rule_checked_once_per_linen_call(monkeypatch, mode):
    x = jnp.ones((4, 2, 2, 4)) + jnp.arange(4.0)
    layer = snl.SeqNorm(channel_groups=2, batch_groups=2)
    v = layer.init(jax.random.key(0), x, use_running_average=False)
    counts = _count_checks(monkeypatch)
    if mode == "train":
        layer.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    else:
        layer.apply(v, x, use_running_average=True, example_weight=0.5)
    assert counts == {"epsilon": 1, "example_weight": 1, "momentum": 1}


def test_each_rule_checked_once_per_nnx_call(monkeypatch):
    layer = snx.GhostNorm(4, batch_groups=2, rngs=nnx.Rngs(0))
    counts = _count_checks(monkeypatch)
    layer(jnp.ones((4, 2, 2, 4)) + jnp.arange(4.0))
    assert counts == {"epsilon": 1, "example_weight": 1, "momentum": 1}
