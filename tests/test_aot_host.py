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

    find_spec = importlib.util.find_spec   # the compilers missing, the training side there
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith(("libtpu", "jax_cuda"))
                        else find_spec(name, *a))
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
    for flag in (["--plot", "t.png"], ["--out", "t.md"], ["--no-compile"]):
        assert main(["plan", "--model", "cnn", "--topology", "v5e:4x4", *flag]) == 2
        assert f"{flag[0]} belongs to the paper table: add --paper-table" in (
            capsys.readouterr().err)


HLO = """\
ENTRY %main (p0: f32[64], p1: bf16[3,3,32,64]) -> f32[] {
  %p0 = f32[64]{0:T(128)} parameter(0)
  %ar = (f32[]{:T(128)}, f32[64]{0:T(128)S(1)}, f32[64]{0}, f32[64]{0}, f32[64]{0}, /*index=5*/f32[64]{0}) all-reduce(%a, %b, %c, %d, %e, /*index=5*/%f), replica_groups={{0,1,2,3}}, to_apply=%add, metadata={op_name="jit(fn)/jvp()/reduce_sum"}
  %g0 = f32[]{:T(128)} get-tuple-element(%ar), index=0, metadata={op_name="jit(fn)/jvp()/reduce_sum"}
  %g1 = f32[64]{0} get-tuple-element(%ar), index=1, metadata={op_name="jit(fn)/jvp(Net)/bn1/reduce_sum"}
  %ars = bf16[3,3,32,64]{3,2,1,0:T(8,128)(2,1)} all-reduce-start(%w), to_apply=%add, metadata={op_name="jit(fn)/transpose(jvp(Net))/conv/conv_general_dilated"}
  %ard = bf16[3,3,32,64]{3,2,1,0:T(8,128)(2,1)} all-reduce-done(%ars)
  %ag = (f32[16]{0}, f32[64]{0}) all-gather-start(%x), dimensions={0}
  %agd = f32[64]{0} all-gather-done(%ag)
  ROOT %fusion.1 = f32[] fusion(%g0), kind=kLoop, calls=%fused
}
"""


def test_collectives_of_hlo_text():
    cs = aot.hlo_collectives(HLO)
    assert [c.kind for c in cs] == ["all-reduce", "all-reduce", "all-gather"]
    assert cs[0].bytes == 4 + 5 * 64 * 4                # a combined tuple with /*index=5*/
    assert cs[0].parts[1] == (256, "jit(fn)/jvp(Net)/bn1/reduce_sum")
    assert cs[0].parts[2] == (256, "jit(fn)/jvp()/reduce_sum")   # no reader: the op's name
    assert cs[1].bytes == 3 * 3 * 32 * 64 * 2            # asynchronous: counted once
    assert cs[2].bytes == 64 * 4                         # all-gather-start: its output
    from seqnorm_jax.distributed import collective_counts

    assert collective_counts(HLO)["all-reduce"] == 2
