"""seqnorm_jax.aot without the accelerator compilers: topology names, the missing-extra
message, and the HLO-text analysis on an XLA:CPU program over the suite's 4 fake devices."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from seqnorm_jax import aot
from seqnorm_jax.aot import P


def test_shape_bytes_of_arrays_and_tuples():
    assert aot.shape_bytes("bf16[8,128]{1,0}") == 8 * 128 * 2
    assert aot.shape_bytes("(f32[8]{0}, bf16[2,3]{1,0}, pred[])") == 32 + 12 + 1
    assert aot.shape_bytes("f32[16,128]{1,0:T(8,128)S(1)}") == 16 * 128 * 4


@pytest.mark.parametrize("name,shape", [("h100:8", "1x1x8"), ("a100:16", "1x2x8"),
                                        ("H100:2x4", "1x2x4"), ("v5e:16x16", "16x16"),
                                        ("v4:2x2x2", "2x2x2")])
def test_topology_names(name, shape):
    chip, parsed = aot.parse_topology(name)
    assert chip is aot.CHIPS[name.split(":")[0].lower()]
    assert parsed == shape


@pytest.mark.parametrize("name,match", [("v5e", "expected CHIP:SHAPE"),
                                        ("v5f:4x4", "unknown chip 'v5f'. Did you mean 'v5[ep]'"),
                                        ("v5e:16", "2 or 3 sizes"),
                                        ("h100:12", "1..8 GPUs per host"),
                                        ("h100:x8", "N or HOSTSxN")])
def test_bad_topology_names(name, match):
    with pytest.raises(ValueError, match=match) as err:
        aot.topology(name)
    assert "h100:8" in str(err.value)                  # the message shows valid names


def test_missing_compiler_names_the_extra(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(aot.CompilerNotInstalledError,
                       match=r'pip install "seqnorm-jax\[tpu\]"'):
        aot.topology("v5e:4x4")
    with pytest.raises(aot.CompilerNotInstalledError,
                       match=r'pip install "seqnorm-jax\[cuda\]"'):
        aot.topology("h100:8")


def test_analysis_of_a_cpu_program():
    devices = jax.devices()[:4]
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    x = jax.ShapeDtypeStruct((32, 16), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    w = jax.ShapeDtypeStruct((16, 8), jnp.float32, sharding=NamedSharding(mesh, P()))

    def loss(x, w):
        return jnp.sum(jnp.tanh(x @ w))

    exe = aot.compile_for(jax.grad(loss, argnums=1), x, w, mesh=mesh)
    a = aot.analyze(exe, aot.CHIPS["v5e"])
    assert a.collective_counts["all-reduce"] == 1
    assert a.collective_bytes["all-reduce"] == 16 * 8 * 4
    assert "dot_general" in a.collectives[0].op_name or "transpose" in a.collectives[0].op_name
    assert a.memory.arguments == 8 * 16 * 4 + 16 * 8 * 4
    assert a.memory.outputs == 16 * 8 * 4
    matmuls = 2 * (2 * 8 * 16 * 8)
    assert matmuls <= a.flops <= 1.5 * matmuls
    chip = aot.CHIPS["v5e"]
    assert a.roofline_seconds == max(a.flops / chip.peak_bf16_flops,
                                     a.bytes_accessed / chip.hbm_bandwidth)


def test_every_chip_names_its_source():
    for chip in aot.CHIPS.values():
        assert chip.source and chip.hbm_bytes > 0 and chip.peak_bf16_flops > 1e12


def test_plan_without_the_compiler_is_one_line(monkeypatch, capsys):
    from seqnorm_jax.cli import main

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert main(["plan", "--model", "cnn", "--topology", "v5e:4x4"]) == 2
    err = capsys.readouterr().err
    assert err == ('seqnorm-jax plan: error: the TPU compiler (libtpu) is not installed: '
                   'pip install "seqnorm-jax[tpu]"\n')


def test_plan_flag_errors_come_before_any_compile(capsys):
    from seqnorm_jax.cli import main

    assert main(["plan", "--model", "cnn"]) == 2
    assert "--topology is required" in capsys.readouterr().err
    assert main(["plan", "--model", "cnn", "--topology", "v5e:16"]) == 2
    assert "2 or 3 sizes" in capsys.readouterr().err
