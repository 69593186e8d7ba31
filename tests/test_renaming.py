"""rename_norm_modules: a flax BatchNorm model's checkpoint loads into the same model with
another layer; the loaded model computes what flax's computed where the layers agree."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqnorm_jax as snj
from seqnorm_jax.renaming import rename_norm_modules


class Net(nn.Module):
    norm: type = nn.BatchNorm

    @nn.compact
    def __call__(self, x, train):
        x = nn.Conv(8, (3, 3))(x)
        x = self.norm(use_running_average=not train)(x)       # auto-named: <Class>_0
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = self.norm(use_running_average=not train)(x)       # <Class>_1
        return nn.Dense(3)(x.mean((1, 2)))


def _trained_flax():
    x = jax.random.normal(jax.random.key(0), (8, 6, 6, 3)) * 2 + 1
    net = Net()
    variables = net.init(jax.random.key(1), x, train=False)
    _, updates = net.apply(variables, x, train=True, mutable=["batch_stats"])
    return x, net, {**variables, **updates}


def test_batchnorm_checkpoint_loads_into_ghostnorm_model():
    x, net, flax_vars = _trained_flax()
    ours = Net(norm=snj.GhostNorm)
    like = ours.init(jax.random.key(2), x, train=False)
    loaded = rename_norm_modules(flax_vars, {"BatchNorm": "GhostNorm"}, like=like)
    assert jax.tree.structure(loaded) == jax.tree.structure(like)
    assert sorted(loaded["params"]) == ["Conv_0", "Conv_1", "Dense_0", "GhostNorm_0",
                                        "GhostNorm_1"]
    np.testing.assert_array_equal(loaded["batch_stats"]["GhostNorm_1"]["var"],
                                  flax_vars["batch_stats"]["BatchNorm_1"]["var"])
    # inference uses the running statistics: the same function as flax's model
    np.testing.assert_allclose(ours.apply(loaded, x, train=False),
                               net.apply(flax_vars, x, train=False), rtol=1e-5, atol=1e-6)


def test_gnplus_gets_its_lambda_from_like():
    x, _, flax_vars = _trained_flax()
    gnplus = functools.partial(snj.GNPlus, num_groups=4)
    like = Net(norm=gnplus).init(jax.random.key(2), x, train=False)
    loaded = rename_norm_modules(flax_vars, {"BatchNorm": "GNPlus"}, like=like)
    assert loaded["params"]["GNPlus_0"]["lambda"] is like["params"]["GNPlus_0"]["lambda"]
    np.testing.assert_array_equal(loaded["params"]["GNPlus_0"]["scale"],
                                  flax_vars["params"]["BatchNorm_0"]["scale"])
    shapes = jax.eval_shape(lambda: like)
    with pytest.raises(ValueError, match="params/GNPlus_0/lambda is new .* initialized"):
        rename_norm_modules(flax_vars, {"BatchNorm": "GNPlus"}, like=shapes)


def test_errors_name_the_path():
    x, _, flax_vars = _trained_flax()
    like = Net(norm=snj.GhostNorm).init(jax.random.key(2), x, train=False)
    with pytest.raises(ValueError, match="params/BatchNorm_0 is in the renamed checkpoint"):
        rename_norm_modules(flax_vars, {"Norm": "GhostNorm"}, like=like)
    with pytest.raises(ValueError, match="mapping: expected"):
        rename_norm_modules(flax_vars, {})
    clash = {"params": {"BatchNorm_0": {"scale": jnp.ones(2)}, "GhostNorm_0": {}}}
    with pytest.raises(ValueError, match="two modules under params would be named 'GhostNorm_0'"):
        rename_norm_modules(clash, {"BatchNorm": "GhostNorm"})
    wide = jax.tree.map(lambda a: a, flax_vars)
    wide["params"]["BatchNorm_1"] = {"scale": jnp.ones(9), "bias": jnp.zeros(8)}
    with pytest.raises(ValueError, match=r"params/GhostNorm_1/scale is an array of shape \(8,\) "
                                         r"in the new model but an array of shape \(9,\)"):
        rename_norm_modules(wide, {"BatchNorm": "GhostNorm"}, like=like)
