"""seqnorm_jax.aot on the TPU compiler (libtpu; run in a venv with the [tpu] extra).

Reference figures are worked out by hand from the shapes: a data-parallel gradient of
``sum(tanh(x @ w))`` with ``x`` split over the chips and ``w`` replicated holds one
shard of ``x`` and all of ``w`` per chip, returns ``w``'s gradient, and all-reduces
exactly that gradient once.
"""

import jax
import jax.numpy as jnp
import pytest

from seqnorm_jax import aot
from seqnorm_jax.aot import P


def loss(x, w):
    return jnp.sum(jnp.tanh(x @ w).astype(jnp.float32))


def _grad_step(topo, axis_types, rows_per_chip=8, k=128, n=256):
    mesh = aot.make_mesh(topo, axis_types=axis_types)
    chips = topo.num_devices
    x = aot.sharded((rows_per_chip * chips, k), jnp.bfloat16, mesh, P("data"))
    w = aot.sharded((k, n), jnp.bfloat16, mesh, P())
    exe = aot.compile_for(jax.grad(loss, argnums=1), x, w, mesh=mesh)
    return aot.analyze(exe, topo)


@pytest.mark.parametrize("name,chips,devices,kind", [("v5e:16x16", 256, 256, "TPU v5 lite"),
                                                     ("v4:2x2x2", 8, 16, "TPU v4"),
                                                     ("v5p:2x2x2", 8, 8, "TPU v5"),
                                                     ("v5e:1x1", 1, 1, "TPU v5 lite")])
def test_topologies_by_name(name, chips, devices, kind):
    topo = aot.topology(name)
    assert (topo.num_chips, topo.num_devices) == (chips, devices)
    assert topo.devices[0].device_kind == kind
    assert topo.chip is aot.CHIPS[name.split(":")[0]]
    share = devices // chips                    # TPU v4: one device per TensorCore
    assert topo.device_chip.hbm_bytes == topo.chip.hbm_bytes // share
    assert topo.device_chip.peak_bf16_flops == topo.chip.peak_bf16_flops / share


@pytest.mark.parametrize("axis_types", ["auto", "explicit"])
def test_data_parallel_gradient_figures(axis_types):
    topo = aot.topology("v5e:4x4")
    a = _grad_step(topo, axis_types)
    k, n, rows = 128, 256, 8
    grad_bytes = k * n * 2                       # bf16 gradient of w
    assert a.collective_counts == {"all-reduce": 1, "all-gather": 0, "reduce-scatter": 0,
                                   "collective-permute": 0, "all-to-all": 0}
    assert a.collective_bytes["all-reduce"] == grad_bytes
    assert a.memory.arguments == rows * k * 2 + grad_bytes   # x's shard + all of w
    assert a.memory.outputs == grad_bytes
    matmuls = 2 * (2 * rows * k * n)             # forward x @ w and backward x^T @ g
    assert matmuls <= a.flops <= 1.1 * matmuls
    assert a.bytes_accessed >= a.memory.arguments + a.memory.outputs
    chip = aot.CHIPS["v5e"]
    assert a.roofline_seconds == pytest.approx(
        max(a.flops / chip.peak_bf16_flops, a.bytes_accessed / chip.hbm_bandwidth), rel=1e-12)
    assert a.fits is True
    assert a.num_kernels >= 1


def test_mesh_shapes_and_types():
    topo = aot.topology("v4:2x2x2")
    mesh = aot.make_mesh(topo, (8, 2), ("data", "model"), ("explicit", "auto"))
    assert dict(mesh.shape) == {"data": 8, "model": 2}
    assert mesh.axis_types == (jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto)
    with pytest.raises(ValueError, match="product is 16"):
        aot.make_mesh(topo, (4, 2), ("data", "model"))
    with pytest.raises(ValueError, match="'auto' or 'explicit'"):
        aot.make_mesh(topo, axis_types="sideways")


def test_unsupported_grid_names_the_topology():
    with pytest.raises(ValueError, match="'v5e:3x7'.*libtpu cannot build it"):
        aot.topology("v5e:3x7")
