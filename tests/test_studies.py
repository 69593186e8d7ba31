"""The studies package on its own: summaries over seeds, paired differences, norm widths,
the kinds registry and the packaged configs (no training)."""

from __future__ import annotations

import importlib
import json
import tomllib
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from flax import linen as nn

from seqnorm_jax.studies import KINDS, norm_widths, summarize
from seqnorm_jax.studies.compare import format_table, model_norm_widths
from seqnorm_jax.studies.report import accuracy_name, mean_std, paired_differences
from seqnorm_jax.train import TrainConfig


def record(label, seed, accs, losses=(0.5, 0.4), diverged=None, **extra):
    return dict(label=label, spec=label.lower(), seed=seed, eval_accuracy=list(accs),
                eval_loss=[0.0] * len(accs), train_loss=list(losses),
                train_accuracy=[0.0] * len(accs), epoch_time=[9.0, 2.0], diverged=diverged,
                **extra)


RECORDS = [record("BN", 0, [0.5, 0.80]), record("BN", 1, [0.6, 0.90]),
           record("GN", 0, [0.4, 0.85]), record("GN", 1, [0.7, 0.70]),
           record("GN", 2, [], losses=(), diverged={"step": 3, "loss": float("nan")})]


def test_summary_over_seeds_and_diverged_runs():
    bn, gn = summarize(RECORDS)
    assert bn["label"] == "BN" and bn["seeds"] == 2 and bn["diverged"] == "0/2"
    np.testing.assert_allclose([bn["test_accuracy_mean"], bn["test_accuracy_std"]],
                               [0.85, np.std([0.8, 0.9], ddof=1)], rtol=1e-12)
    np.testing.assert_allclose(bn["best_test_accuracy_mean"], 0.85, rtol=1e-12)
    assert bn["epoch_time_mean"] == 2.0  # the first (compiling) epoch left out
    assert gn["seeds"] == 3 and gn["diverged"] == "1/3"  # counted, not summed
    np.testing.assert_allclose(gn["test_accuracy_mean"], 0.775, rtol=1e-12)
    assert mean_std([0.3]) == (0.3, 0.0)


def test_validation_accuracy_is_not_called_test_accuracy():
    """Runs that evaluate on a validation hold-out: ``val_accuracy_*`` columns (the
    summary wrote ``test_accuracy_*`` for them before)."""
    rows = summarize(RECORDS, "validation")
    assert accuracy_name("validation") == "val_accuracy"
    assert {"val_accuracy_mean", "val_accuracy_std", "best_val_accuracy_mean"} <= set(rows[0])
    assert not any(k.startswith("test_") or "_test_" in k for k in rows[0])
    np.testing.assert_allclose(rows[0]["val_accuracy_mean"], 0.85, rtol=1e-12)
    table = format_table(rows, "validation")
    assert "| validation accuracy (mean +- std) |" in table and "| BN | `bn` | 85.00 +- 7.07 %" \
        in table
    with pytest.raises(ValueError, match="split='val'"):
        accuracy_name("val")


def test_paired_differences_by_seed():
    bn = [r for r in RECORDS if r["label"] == "BN"]
    gn = [r for r in RECORDS if r["label"] == "GN" and not r["diverged"]]
    out = paired_differences(gn, bn)
    np.testing.assert_allclose(out["delta_vs_baseline_accuracy_mean"], (0.05 - 0.2) / 2,
                               rtol=1e-12)
    np.testing.assert_allclose(out["delta_vs_baseline_accuracy_std"],
                               np.std([0.05, -0.2], ddof=1), rtol=1e-12)
    assert out["seeds_better_than_baseline"] == "1/2"
    # the test accuracy scored once at the end wins over the last evaluation's
    scored = [dict(r, final_test_accuracy=1.0) for r in gn]
    assert paired_differences(scored, bn)["delta_vs_baseline_accuracy_mean"] == pytest.approx(
        0.15, abs=1e-12)
    assert paired_differences(gn, [record("BN", 7, [0.5])]) == {}


class Mixed(nn.Module):
    """A model with flax's own norm layers: their widths count too."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(6, (3, 3))(x)
        x = nn.LayerNorm()(x)
        x = nn.Dense(5)(x.reshape(x.shape[0], -1))
        return nn.BatchNorm(use_running_average=not train)(x)


def test_norm_widths_from_one_abstract_init():
    assert norm_widths(Mixed(), (4, 4, 1)) == [6, 5]
    config = TrainConfig(model="cnn", norm="gn:num_groups=7")  # the layer need not fit
    assert model_norm_widths(config, (28, 28, 1), 10) == [32, 64, 64]


def test_kinds_registry_is_the_only_list_of_kinds():
    assert list(KINDS) == ["compare", "landscape", "fluctuation", "example_weight",
                           "output_range", "tune"]
    assert all(k.name == name for name, k in KINDS.items())
    assert KINDS["tune"].run is not None and not KINDS["tune"].baseline
    assert not KINDS["example_weight"].scores_test  # it scores its chosen alpha on test


def test_configs_are_package_data():
    root = Path(__file__).resolve().parents[1]
    data = tomllib.loads((root / "pyproject.toml").read_text())
    globs = data["tool"]["setuptools"]["package-data"]["seqnorm_jax.studies"]
    assert "configs/*.json" in globs
    packaged = sorted(p.name for p in (resources.files("seqnorm_jax.studies") / "configs")
                      .iterdir() if p.name.endswith(".json"))
    assert len(packaged) == 24
    # experiments/configs is the same folder (a link), not a second copy
    assert sorted(p.name for p in (root / "experiments" / "configs").glob("*.json")) == packaged
    assert (root / "experiments" / "configs").resolve() == \
        (root / "seqnorm_jax" / "studies" / "configs").resolve()
    assert json.loads((root / "experiments" / "configs" / packaged[0]).read_text())["name"] \
        == packaged[0].removesuffix(".json")


def test_compare_outputs_written_by_process_0_only(tmp_path, monkeypatch):
    # the module (the package's ``compare`` is the function)
    compare_module = importlib.import_module("seqnorm_jax.studies.compare")

    settings = dict(model="mlp", dataset="digits", train_size=None, batch_size=32, epochs=2,
                    seeds=[0, 1, 2], config={"validation_size": 100})
    result = compare_module.CompareResult(specs={"BN": "bn", "GN": "gn"}, runs=RECORDS,
                                          summary=summarize(RECORDS, "validation"),
                                          settings=settings)
    monkeypatch.setattr(compare_module, "is_writer", lambda: False)
    compare_module.write_outputs(result, tmp_path / "other")
    assert not list((tmp_path / "other").iterdir())
    monkeypatch.setattr(compare_module, "is_writer", lambda: True)
    paths = compare_module.write_outputs(result, tmp_path / "first")
    saved = json.loads(open(paths["json"]).read())  # strict JSON: the NaN loss is null
    assert saved["runs"][-1]["diverged"] == {"step": 3, "loss": None}
    assert open(paths["csv"]).readline().startswith(
        "label,spec,seeds,diverged,val_accuracy_mean,val_accuracy_std,best_val_accuracy_mean")
    md = open(paths["markdown"]).read()
    assert "| GN | `gn` | 77.50 +- 10.61 % (diverged 1/3) |" in md
    assert open(paths["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
