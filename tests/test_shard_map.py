"""axis_name / axis_index_groups under jax.shard_map on 4 fake CPU devices.

A batch split over devices must give the outputs, gradients and batch_stats of
the single-device layer on the whole batch, with ghost groups counted over the
global batch (a multiple or a divisor of the device count).
"""

import chex
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import seqnorm_jax as snj

N_DEV = 4


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() >= N_DEV, "tests/conftest.py sets 4 CPU devices"
    return jax.make_mesh((N_DEV,), ("data",), devices=jax.devices()[:N_DEV])


def batch(shape=(16, 3, 3, 8), seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k1, shape) * 2.0 + jax.random.normal(k2, shape[-1:]) * 3.0


def place(mesh, *specs_and_values):
    """device_put each (spec, value): the batch split over "data", the rest replicated."""
    return [jax.device_put(v, NamedSharding(mesh, spec)) for spec, v in specs_and_values]


def sharded_step(mesh, layer, variables, x):
    """Training apply inside shard_map: x split over "data", variables replicated."""

    def step(v, x):
        y, upd = layer.apply(v, x, use_running_average=False, mutable=["batch_stats"])
        return y, upd["batch_stats"]

    f = jax.shard_map(step, mesh=mesh, in_specs=(P(), P("data")), out_specs=(P("data"), P()))
    return jax.jit(f)(*place(mesh, (P(), variables), (P("data"), x)))


def sharded_output(mesh, layer, variables, x):
    """Training output only, for layers whose running statistics differ between devices."""
    step = lambda v, x: layer.apply(v, x, use_running_average=False, mutable=["batch_stats"])[0]
    f = jax.shard_map(step, mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data"))
    return jax.jit(f)(*place(mesh, (P(), variables), (P("data"), x)))


def sharded_grad(mesh, layer, variables, x, w):
    """Gradients of sum(sin(y) * w) over the global batch w.r.t. params and x."""

    def grads(params, x, w):
        def loss(p, x):
            y, _ = layer.apply({**variables, "params": p}, x, use_running_average=False,
                               mutable=["batch_stats"])
            return jax.lax.psum(jnp.sum(jnp.sin(y) * w), "data")

        return jax.grad(loss, argnums=(0, 1))(params, x)

    f = jax.shard_map(grads, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                      out_specs=(P(), P("data")))
    return jax.jit(f)(*place(mesh, (P(), variables["params"]), (P("data"), x), (P("data"), w)))


def single_grad(layer, variables, x, w):
    def loss(p, x):
        y, _ = layer.apply({**variables, "params": p}, x, use_running_average=False,
                           mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y) * w)

    return jax.grad(loss, argnums=(0, 1))(variables["params"], x)


CASES = [
    # (id, layer across devices, the same layer on one device)
    ("syncbn", snj.BatchNorm(axis_name="data"), snj.BatchNorm()),
    ("ghost_eq_devices", snj.GhostNorm(batch_groups=4, axis_name="data"),
     snj.GhostNorm(batch_groups=4)),
    ("ghost_multiple_of_devices", snj.GhostNorm(batch_groups=8, axis_name="data"),
     snj.GhostNorm(batch_groups=8)),
    ("ghost_divisor_of_devices", snj.GhostNorm(batch_groups=2, axis_name="data"),
     snj.GhostNorm(batch_groups=2)),
    ("ghost_one_group", snj.GhostNorm(batch_groups=1, axis_name="data"), snj.BatchNorm()),
    ("seqnorm", snj.SeqNorm(channel_groups=2, batch_groups=2, axis_name="data"),
     snj.SeqNorm(channel_groups=2, batch_groups=2)),
    ("seqnorm_ghost_first", snj.SeqNorm(channel_groups=2, batch_groups=8, order="ghost_first",
                                        axis_name="data"),
     snj.SeqNorm(channel_groups=2, batch_groups=8, order="ghost_first")),
    ("batch_group", snj.BatchGroupNorm(batch_groups=2, channel_groups=4, axis_name="data"),
     snj.BatchGroupNorm(batch_groups=2, channel_groups=4)),
    ("hn", snj.HeterologousNorm(std_groups=2, axis_name="data"), snj.HeterologousNorm(
        std_groups=2)),
    ("hn_pooled", snj.HeterologousNorm(std_center="pooled", axis_name="data"),
     snj.HeterologousNorm(std_center="pooled")),
    ("gnplus", snj.GNPlus(num_groups=2, axis_name="data"), snj.GNPlus(num_groups=2)),
    ("bgn", snj.BGN(num_groups=2, axis_name="data"), snj.BGN(num_groups=2)),
]


@pytest.mark.parametrize("sharded,single", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_sharded_equals_single_device(mesh, sharded, single):
    x = batch()
    v = single.init(jax.random.key(0), x, use_running_average=False)
    y_one, upd = single.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    y, stats = sharded_step(mesh, sharded, v, x)
    chex.assert_trees_all_close(y, y_one, atol=2e-5, rtol=1e-5)
    chex.assert_trees_all_close(stats, upd["batch_stats"], atol=2e-5, rtol=1e-5)
    w = jax.random.normal(jax.random.key(5), x.shape)
    chex.assert_trees_all_close(sharded_grad(mesh, sharded, v, x, w),
                                single_grad(single, v, x, w), atol=2e-5, rtol=1e-4)


def test_without_axis_name_each_device_is_a_ghost_batch(mesh):
    """Leaving axis_name out normalizes each device's shard alone: GhostNorm(batch_groups=4)."""
    x = batch()
    layer = snj.BatchNorm()
    v = layer.init(jax.random.key(0), x, use_running_average=False)
    y = sharded_output(mesh, layer, v, x)
    want = snj.GhostNorm(batch_groups=N_DEV).apply(v, x, use_running_average=False,
                                                   mutable=["batch_stats"])[0]
    chex.assert_trees_all_close(y, want, atol=2e-5, rtol=1e-5)


def test_axis_index_groups_sync_subsets_of_devices(mesh):
    """axis_index_groups=[[0, 1], [2, 3]]: each pair of devices is one batch, as in flax."""
    x = batch()
    groups = [[0, 1], [2, 3]]
    layer = snj.BatchNorm(axis_name="data", axis_index_groups=groups)
    v = layer.init(jax.random.key(0), x, use_running_average=False)
    y = sharded_output(mesh, layer, v, x)
    want = snj.GhostNorm(batch_groups=2).apply(v, x, use_running_average=False,
                                               mutable=["batch_stats"])[0]
    chex.assert_trees_all_close(y, want, atol=2e-5, rtol=1e-5)
    # batch_groups counts the groups of each sub-group's batch (8 samples here):
    # 4 groups of 2 samples per pair of devices are 8 ghost batches of the whole.
    layer = snj.GhostNorm(batch_groups=4, axis_name="data", axis_index_groups=groups)
    y = sharded_output(mesh, layer, v, x)
    want = snj.GhostNorm(batch_groups=8).apply(v, x, use_running_average=False,
                                               mutable=["batch_stats"])[0]
    chex.assert_trees_all_close(y, want, atol=2e-5, rtol=1e-5)


def test_batch_groups_incompatible_with_devices(mesh):
    layer = snj.GhostNorm(batch_groups=3, axis_name="data")
    x = batch((12, 2, 2, 4))
    v = layer.init(jax.random.key(0), x, use_running_average=False)
    with pytest.raises(ValueError, match=r"batch_groups=3 must be a multiple or a divisor of "
                                         r"the size of axis 'data' \(4 devices\)"):
        sharded_step(mesh, layer, v, x)
