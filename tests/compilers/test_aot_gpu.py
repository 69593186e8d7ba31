"""seqnorm_jax.aot on XLA:GPU without a GPU (run in a venv with the [cuda] extra).

The same hand-worked figures as tests/compilers/test_aot.py, on 8 H100s and 8 A100s;
XLA:GPU has no deviceless cost analysis, so flops and bytes come from XLA's HLO cost
analysis of the compiled GPU module.
"""

import jax
import jax.numpy as jnp
import pytest

from seqnorm_jax import aot
from seqnorm_jax.aot import P


def loss(x, w):
    return jnp.sum(jnp.tanh(x @ w).astype(jnp.float32))


@pytest.mark.parametrize("name,kind", [("h100:8", "NVIDIA H100 80GB HBM3"),
                                       ("a100:8", "NVIDIA A100-SXM4-80GB")])
@pytest.mark.parametrize("axis_types", ["auto", "explicit"])
def test_data_parallel_gradient_figures(name, kind, axis_types):
    topo = aot.topology(name)
    assert topo.num_chips == 8 and topo.devices[0].device_kind == kind
    mesh = aot.make_mesh(topo, axis_types=axis_types)
    rows, k, n = 8, 128, 256
    x = aot.sharded((rows * 8, k), jnp.bfloat16, mesh, P("data"))
    w = aot.sharded((k, n), jnp.bfloat16, mesh, P())
    a = aot.analyze(aot.compile_for(jax.grad(loss, argnums=1), x, w, mesh=mesh), topo.chip)
    grad_bytes = k * n * 2
    assert a.collective_counts["all-reduce"] == 1
    assert sum(a.collective_counts.values()) == 1
    assert a.collective_bytes["all-reduce"] == grad_bytes
    assert a.memory.arguments == rows * k * 2 + grad_bytes
    assert a.memory.outputs == grad_bytes
    matmuls = 2 * (2 * rows * k * n)
    assert matmuls <= a.flops <= 1.1 * matmuls
    assert a.num_kernels >= 2          # the two matmuls at least
    assert a.fits is True


def test_hosts_of_eight():
    topo = aot.topology("h100:16")
    assert topo.num_chips == 16
    assert len({d.process_index for d in topo.devices}) == 2


def test_target_config_states_the_published_device():
    text = aot.gpu_target_config("h100")
    assert "core_count: 132" in text
    assert f"memory_bandwidth: {int(3.35e12)}" in text
    assert "cuda_compute_capability { major: 9 minor: 0 }" in text


def test_convolution_flops_counted_on_gpu():
    # XLA:GPU runs convolutions as cuDNN custom calls, which XLA's cost analysis counts as
    # no flops; aot adds them: forward, backward-input and backward-filter each
    # 2 x (8 x 16 x 16 x 16 outputs per device) x (3 x 3 x 8 kernel taps per output)
    topo = aot.topology("h100:8")
    mesh = aot.make_mesh(topo)
    x = aot.sharded((64, 16, 16, 8), jnp.float32, mesh, P("data"))
    w = aot.sharded((3, 3, 8, 16), jnp.float32, mesh)

    def loss(x, w):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(y ** 2)

    a = aot.analyze(aot.compile_for(jax.grad(loss, argnums=(0, 1)), x, w, mesh=mesh), topo)
    convs = 3 * 2 * (8 * 16 * 16 * 16) * (3 * 3 * 8)
    assert convs <= a.flops <= 1.01 * convs
