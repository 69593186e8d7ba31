"""``seqnorm-jax plan`` and seqnorm_jax.train.plan on the TPU compiler (the [tpu] extra).

The references are independent of the compiler: the parameter count of the model
(``jax.eval_shape`` of its init on the host), the training set's size and the chip
table's published figures.
"""

import json
import math

import jax
import numpy as np
import pytest

from seqnorm_jax import aot
from seqnorm_jax.cli import main
from seqnorm_jax.train import TrainConfig
from seqnorm_jax.train.build import build_model
from seqnorm_jax.train.plan import TRAIN_EXAMPLES, lower_step, plan_step


def _param_bytes(config):
    model = build_model(config, 10)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                            jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32))
    return sum(math.prod(a.shape) * a.dtype.itemsize
               for a in jax.tree_util.tree_leaves(shapes["params"]))


@pytest.fixture(scope="module")
def topo():
    return aot.topology("v5e:2x2")


def _config(norm, **kw):
    return TrainConfig(model="cnn", norm=norm, dataset="cifar10", batch_size=64, epochs=3,
                       dtype="float32", **kw)


@pytest.mark.parametrize("axis_types", ["auto", "explicit"])
def test_ghost_groups_on_chips_add_no_statistics_collective(topo, axis_types):
    config = _config("ghost:batch_groups=4")
    plan = plan_step(config, topo, axis_types=axis_types)
    groups = plan.collective_groups()
    # the running averages ride in the gradient all-reduce: no collective of their own
    assert groups["statistics"]["count"] == groups["combined"]["count"] <= 1
    # float32 gradients of every parameter, plus the loss and accuracy sums (scalars)
    params = _param_bytes(config)
    assert params <= groups["gradients"]["bytes"] <= params + 64
    assert plan.total_steps == (TRAIN_EXAMPLES["cifar10"] // 64) * 3
    chip = aot.CHIPS["v5e"]
    a = plan.analysis
    assert plan.step_seconds == max(a.flops / chip.peak_bf16_flops,
                                    a.bytes_accessed / chip.hbm_bandwidth)
    assert plan.run_seconds == pytest.approx(plan.step_seconds * plan.total_steps, rel=1e-12)
    assert a.fits and a.memory.aliased > 0          # the state is donated, as on a TPU


def test_synchronized_batchnorm_reduces_its_statistics(topo):
    plan = plan_step(_config("bn"), topo)
    groups = plan.collective_groups()
    assert groups["statistics"]["count"] >= 3       # at least one per norm layer
    assert groups["statistics"]["count"] > groups["combined"]["count"]


def test_cli_json_and_paper_config(capsys):
    assert main(["plan", "003_fluctuation_mlp4", "--scale", "smoke", "--run", "0",
                 "--topology", "v5e:2x2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    run = out["runs"][0]
    assert out["topology"] == "v5e:2x2" and out["seeds"] == 1
    assert run["label"] == "BN, batch 8" and run["batch_size"] == 8
    assert run["devices"] == 4 and run["mesh"] == {"data": 4}
    assert out["training_seconds"] == pytest.approx(run["run_seconds"], rel=1e-12)
    assert run["memory"]["fits"] is True
    assert run["step_seconds"] == max(run["compute_seconds"], run["memory_seconds"])


def test_cli_refuses_a_step_that_does_not_fit(capsys):
    # two 40000-wide layers: 2 x 6.4 GB of float32 weights, twice with SGD momentum,
    # against the 16 GiB of a TPU v5e chip
    code = main(["plan", "--model", "mlp", "--model-kwargs", "features=40000,40000",
                 "--dataset", "mnist", "--norm", "none", "--batch-size", "8",
                 "--topology", "v5e:2x2"])
    err = capsys.readouterr().err
    assert code == 2
    assert "does not fit v5e:2x2" in err and "exceeds available HBM" in err
    assert "Traceback" not in err


def test_cli_bad_mesh_and_run(capsys):
    assert main(["plan", "--model", "cnn", "--topology", "v5e:2x2", "--mesh",
                 "data=3"]) == 2
    assert "--mesh 'data=3'" in capsys.readouterr().err
    assert main(["plan", "003_fluctuation_mlp4", "--run", "BN batch 9",
                 "--topology", "v5e:2x2"]) == 2
    assert "--run 'BN batch 9'" in capsys.readouterr().err


def test_cli_data_by_model_mesh_on_explicit_axes(capsys):
    assert main(["plan", "--model", "cnn", "--dataset", "cifar10", "--norm",
                 "ghost:batch_groups=2", "--batch-size", "64", "--topology", "v5e:2x2",
                 "--mesh", "data=2,model=2", "--axis-types", "explicit", "--json"]) == 0
    run = json.loads(capsys.readouterr().out)["runs"][0]
    assert run["mesh"] == {"data": 2, "model": 2} and run["axis_types"] == "explicit"
    # ghost groups on the data shards: no collective for statistics alone
    stats = run["collectives"]["statistics"]["count"]
    assert stats == run["collectives"]["combined"]["count"] <= 1


def test_program_fingerprint_is_the_lowered_program(topo):
    # what keys the plan cache across code changes: the same config lowers to the same
    # program (fresh Trainer, fresh trace), another norm layer to another one
    bn = lower_step(_config("bn"), topo)
    assert bn.program_fingerprint() == lower_step(_config("bn"), topo).program_fingerprint()
    assert bn.program_fingerprint() != lower_step(_config("ghost:batch_groups=4"),
                                                  topo).program_fingerprint()
    assert "loc(" not in bn.lowered.as_text()            # no source lines in the hash
