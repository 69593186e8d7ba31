"""The paper table of ``seqnorm-jax plan --paper-table`` from a compile cache (no compiler:
every step is cached, so nothing compiles): the arithmetic of its rows and the order of
its topologies."""

import json
import os

import pytest

from seqnorm_jax.studies.experiment import load_experiment
from seqnorm_jax.train import plan

GIB = 2 ** 30


def _record(step_seconds, total, fits=True):
    return {"step_seconds": step_seconds,
            "memory": {"total": total, "hbm": 16 * GIB, "fits": fits}}


def test_table_row_from_cached_steps(tmp_path):
    exp = load_experiment("003_fluctuation_mlp4").resolve("full")
    configs = [c for _, c in exp.configs()]            # batches 128, 4, 128, 4 on MNIST
    topology = plan.table_topology(configs)
    assert topology == "v5e:1x1"                        # batch 4 does not split over 8
    seconds = [1e-3, 2e-3, 3e-3, 4e-3]
    for c, s in zip(configs, seconds):
        key = plan.step_key(c, topology, exp.image_shape)
        with open(os.path.join(tmp_path, key + ".json"), "w") as f:
            json.dump(_record(s, int(0.5 * GIB) if s < 4e-3 else 2 * GIB), f)
    out = tmp_path / "table.md"
    text = plan.plan_table(["003_fluctuation_mlp4"], str(tmp_path), out=str(out))
    assert out.read_text() == text
    row = text.splitlines()[2].split(" | ")
    steps = [60_000 // c.batch_size * c.epochs for c in configs]
    wall = sum(s * n for s, n in zip(seconds, steps)) * len(exp.seeds)
    assert wall == pytest.approx(3 * 20 * (468e-3 + 15000 * 2e-3 + 468 * 3e-3 + 15000 * 4e-3))
    assert row[1:4] == ["v5e:1x1", "4 of 4", "1.000 ms - 4.000 ms"]
    assert row[4] == plan.format_seconds(wall)
    assert row[5] == "2.00 GiB / 16.00 GiB" and row[6] == "yes |"


def test_step_key_ignores_constants_not_the_step():
    exp = load_experiment("003_fluctuation_mlp4").resolve("full")
    c = exp.configs()[0][1]
    assert plan.step_key(c, "v5e:1x1") == plan.step_key(c.replace(lr=0.5, epochs=3), "v5e:1x1")
    assert plan.step_key(c, "v5e:1x1") != plan.step_key(c.replace(norm="hn"), "v5e:1x1")
    assert plan.step_key(c, "v5e:1x1") != plan.step_key(c, "v5e:2x4")


def test_step_key_changes_with_the_code_that_builds_the_step(monkeypatch):
    # A step cached from other sources (or another jax / compiler) is never served.
    exp = load_experiment("003_fluctuation_mlp4").resolve("full")
    c = exp.configs()[0][1]
    before = plan.step_key(c, "v5e:1x1")
    assert len(plan.code_fingerprint()) == 12
    monkeypatch.setattr(plan, "code_fingerprint", lambda: "0" * 12)
    assert plan.step_key(c, "v5e:1x1") != before
