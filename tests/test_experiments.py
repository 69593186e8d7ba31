"""The paper experiment configs: every one loads at every scale, every smoke run's model
and norm layer fit its mock batch, and one config of each kind passes its smoke run.

The smoke run trains each run of a config for two steps of a tiny model on mock data
(``seqnorm_jax/studies/configs/*.json``, section ``"smoke"``) and checks the outputs the
real run writes: the results files, the plots and finite numbers. Every kind's hooks,
analysis, summary and plots run in one of them (:data:`SMOKE_RUNS`); the other configs
differ only in settings, which the cheap fit check covers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
import pytest

from seqnorm_jax.studies import experiment
from seqnorm_jax.studies.engine import mock_sources
from seqnorm_jax.studies.experiment import Experiment, load_experiment, run_experiment
from seqnorm_jax.studies.kinds import KINDS
from seqnorm_jax.studies.report import accuracy_name

CONFIG_DIR = os.path.join(os.path.dirname(experiment.__file__), "configs")
CONFIGS = sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith(".json"))
# One config per kind, end to end: compare with a validation hold-out and a sweep (the
# test split scored at the end), landscape, fluctuation, example weighing with the alpha
# chosen on validation, output range, and the tuner.
SMOKE_RUNS = ["002_ghost_batch_size_sweep.json", "000_fig2_a3_mnist_simplenet_landscape.json",
              "003_fluctuation_mlp4.json", "002_example_weight_sweep.json",
              "002_output_range_bound.json", "000_tuning_strategy.json"]
KIND_PLOTS = {"landscape": "landscape.png", "fluctuation": "fluctuation.png",
              "example_weight": "example_weight.png", "output_range": "output_range.png"}


def test_the_papers_tables_and_figures_all_have_a_config():
    names = {os.path.splitext(f)[0] for f in CONFIGS}
    papers = {n[:3] for n in names}
    assert {"000", "002", "003", "004"} <= papers
    kinds = {load_experiment(os.path.join(CONFIG_DIR, f)).kind for f in CONFIGS}
    assert set(KINDS) <= kinds
    assert {load_experiment(os.path.join(CONFIG_DIR, f)).kind for f in SMOKE_RUNS} == set(KINDS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_at_every_scale(name):
    exp = load_experiment(os.path.join(CONFIG_DIR, name))
    assert exp.cpu is not None and exp.smoke is not None, "every config has cpu and smoke scales"
    assert exp.claim and exp.compute, "say what the paper claims and what a full run costs"
    for scale in experiment.SCALES:
        resolved = exp.resolve(scale)
        assert resolved.scale == scale
        if exp.kind != "tune":
            assert len(resolved.configs()) == len(resolved.runs) >= 1
    cpu = exp.resolve("cpu")
    if exp.kind != "tune":
        # the CPU scale trains on data that exists offline on this kind of machine
        assert {c.dataset for _, c in cpu.configs()} <= {"fashion_mnist", "digits"}
    smoke = exp.resolve("smoke")
    assert len(smoke.seeds) == 1 and smoke.base["epochs"] == 1
    if exp.kind != "tune":
        _check_smoke_runs_fit(smoke)


def _check_smoke_runs_fit(smoke):
    """Each smoke run's model and norm layer on its mock batch: one abstract training
    forward pass (the layers check their groups against the batch and the widths)."""
    import jax
    from flax import linen as nn

    from seqnorm_jax.data import dataset_info
    from seqnorm_jax.registry import NormSpec
    from seqnorm_jax.train import build_model

    for run, config in smoke.configs():
        NormSpec.parse(config.norm)
        info = dataset_info(config.dataset)
        shape = tuple(smoke.image_shape or info.image_shape)
        model = build_model(config, info.num_classes)
        x = jax.ShapeDtypeStruct((config.batch_size // config.grad_accum_steps, *shape),
                                 np.float32)

        def forward(x):
            variables = model.init(jax.random.key(0), x, train=False)
            return model.apply(variables, x, train=True, mutable=["batch_stats"],
                               rngs={"noise": jax.random.key(1)})

        out, _ = jax.eval_shape(forward, x)
        assert out.shape == (x.shape[0], info.num_classes), (run["label"], out.shape)
        assert isinstance(model, nn.Module)


def _lean(smoke):
    """The smoke scale with fewer runs: the first run and the baseline (paired differences
    need both); the tuner with one candidate per stage. The code paths stay the same."""
    baseline = smoke.analysis.get("baseline")
    runs = [r for i, r in enumerate(smoke.runs) if i == 0 or r["label"] == baseline]
    analysis = {k: (v[:1] if k in ("batch_groups", "channel_groups") else v)
                for k, v in smoke.analysis.items()}
    return dataclasses.replace(smoke, runs=runs, analysis=analysis)


@pytest.mark.parametrize("name", SMOKE_RUNS)
def test_config_smoke_run(name, tmp_path):
    exp = load_experiment(os.path.join(CONFIG_DIR, name))
    smoke = _lean(exp.resolve("smoke"))
    out = tmp_path / exp.name
    payload = run_experiment(smoke, out_dir=out, progress=False, command=f"smoke {name}")
    assert (out / "results.json").exists()
    saved = json.loads((out / "results.json").read_text())
    assert saved["experiment"]["scale"] == "smoke"
    if exp.kind == "tune":
        tune = saved["tune"]
        assert tune["batch_groups"] in smoke.analysis["batch_groups"]
        ran = [r for r in tune["stage1"] + tune["stage2"] if r["status"] == "ok"]
        assert tune["num_runs"] == len(ran) * len(smoke.seeds) == 2
        return
    labels = [r["label"] for r in smoke.runs]
    assert [r["label"] for r in payload["summary"]] == labels
    # a run that validates on a hold-out names its accuracy after it (not "test")
    acc = accuracy_name("validation" if smoke.base.get("validation_size") else "test")
    for row in payload["summary"]:
        assert 0.0 <= row[f"{acc}_mean"] <= 1.0
        assert math.isfinite(row["train_loss_mean"]), row
        if acc == "val_accuracy":
            assert "test_accuracy_mean" not in row
            if KINDS[exp.kind].scores_test:  # example weighing scores its chosen alpha instead
                assert 0.0 <= row["final_test_accuracy_mean"] <= 1.0
    if smoke.analysis.get("baseline"):  # paired by seed against the baseline run
        assert all("delta_vs_baseline_accuracy_mean" in row for row in payload["summary"])
    with open(out / "results.csv") as f:
        assert f"{acc}_mean" in f.readline().split(",")
    for f in ("results.csv", "results.md", "curves.png", KIND_PLOTS.get(exp.kind, "curves.png")):
        assert (out / f).stat().st_size > 0, f
    if any(r.get("x") is not None for r in smoke.runs):
        assert (out / "sweep.png").stat().st_size > 0


# ------------------------------------------------------------------ the runner itself


def _write(tmp_path, **changes):
    data = {
        "name": "t", "paper": "002", "ref": "Figure 0", "title": "test", "kind": "compare",
        "claim": "c", "compute": "none",
        "base": {"model": "mlp", "model_kwargs": {"features": [16]}, "dataset": "digits",
                 "epochs": 3, "batch_size": 32, "lr": 0.1},
        "runs": [{"label": "bn", "norm": "bn"},
                 {"label": "ghost 2", "norm": "ghost:batch_groups=2", "series": "ghost", "x": 2}],
        "seeds": [0, 1, 2],
        "cpu": {"base": {"epochs": 2}, "seeds": [5]},
        "smoke": {"base": {"batch_size": 8}, "image_shape": [4, 4, 1],
                  "runs": [{"label": "bn", "norm": "bn"}]},
    }
    data.update(changes)
    path = tmp_path / f"{data['name']}.json"
    path.write_text(json.dumps(data))
    return path


def test_scales_merge_base_runs_seeds(tmp_path):
    exp = load_experiment(_write(tmp_path))
    full, cpu, smoke = (exp.resolve(s) for s in ("full", "cpu", "smoke"))
    assert full.base["epochs"] == 3 and full.seeds == [0, 1, 2] and len(full.runs) == 2
    assert cpu.base["epochs"] == 2 and cpu.seeds == [5] and len(cpu.runs) == 2
    assert cpu.base["model_kwargs"] == {"features": [16]}
    assert smoke.base["epochs"] == 1 and smoke.seeds == [0] and len(smoke.runs) == 1
    assert smoke.image_shape == [4, 4, 1]
    (run, config), = smoke.configs()
    assert config.batch_size == 8 and config.norm == "bn" and run["label"] == "bn"
    assert exp.base["epochs"] == 3, "resolving must not change the loaded config"


def test_a_resolved_experiment_keeps_its_scale(tmp_path, monkeypatch):
    exp = load_experiment(_write(tmp_path))
    smoke = exp.resolve("smoke")
    # scale is a field: dataclasses.replace keeps it, and the experiment runs at it
    assert dataclasses.replace(smoke).scale == "smoke"
    with pytest.raises(ValueError, match="already resolved at scale 'smoke'"):
        run_experiment(smoke, "cpu")
    monkeypatch.chdir(tmp_path)
    run_experiment(dataclasses.replace(smoke, seeds=[3]), progress=False)
    saved = json.loads((tmp_path / "runs" / "experiments" / "t" / "smoke" /
                        "results.json").read_text())
    assert saved["experiment"]["scale"] == "smoke" and saved["experiment"]["seeds"] == [3]
    assert saved["experiment"]["base"]["epochs"] == 1 and saved["summary"][0]["seeds"] == 1


@pytest.mark.parametrize("changes, match", [
    ({"kind": "grid"}, r"kind='grid'; choose one of \['compare'"),
    ({"name": "other"}, "name='other' must equal the file name 't'"),
    ({"epochs": 3}, r"unknown key\(s\) \['epochs'\]"),
    ({"runs": [{"label": "a", "norm": "bn"}, {"label": "a", "norm": "gn"}]},
     r"duplicate run labels \['a'\]"),
    ({"runs": [{"label": "a", "norm": "ghostly"}]}, "run 'a'.*unknown norm layer"),
    ({"runs": [{"label": "a", "batch_size": 0}]}, "run 'a'.*batch_size=0"),
    ({"seeds": []}, "seeds must be a non-empty list"),
    ({"analysis": {"baseline": "BN"}}, "analysis.baseline='BN' is not a run label"),
    ({"analysis": {"step_sizes": [0.1]}},
     r"analysis option\(s\) \['step_sizes'\] are not read by kind 'compare'"),
    ({"cpu": {"bases": {}}}, r"unknown key\(s\) \['bases'\] in 'cpu'"),
])
def test_bad_configs_name_the_problem(tmp_path, changes, match):
    if "name" in changes:
        path = _write(tmp_path)
        data = json.loads(path.read_text())
        data.update(changes)
        path.write_text(json.dumps(data))
    else:
        path = _write(tmp_path, **changes)
    with pytest.raises(ValueError, match=match):
        load_experiment(path)


def test_missing_scale_and_bad_scale(tmp_path):
    exp = load_experiment(_write(tmp_path, cpu=None))
    with pytest.raises(ValueError, match="has no 'cpu' section"):
        exp.resolve("cpu")
    with pytest.raises(ValueError, match=r"scale must be one of .*, got 'huge'"):
        exp.resolve("huge")


def test_mock_sources_shapes_and_every_class():
    train, test = mock_sources("cifar100", num_train=200, num_eval=100, image_shape=(8, 8, 3))
    assert len(train) == 200 and len(test) == 100
    item = train[0]
    assert item["image"].shape == (8, 8, 3) and item["image"].dtype == np.uint8
    assert train.info.num_classes == 100 and train.info.image_shape == (8, 8, 3)
    labels = np.array([train[i]["label"] for i in range(200)])
    np.testing.assert_array_equal(np.bincount(labels, minlength=100), np.full(100, 2))


def test_cpu_run_on_real_digits_writes_tables_and_sweep(tmp_path):
    exp = load_experiment(_write(tmp_path, cpu={"base": {"epochs": 2}, "seeds": [0, 1],
                                                 "analysis": {"baseline": "bn"}}))
    payload = run_experiment(exp, "cpu", tmp_path / "out", progress=False, command="cmd")
    rows = {r["label"]: r for r in payload["summary"]}
    assert set(rows) == {"bn", "ghost 2"} and rows["bn"]["seeds"] == 2
    # an MLP on digits learns something in 2 epochs with either layer
    assert rows["bn"]["test_accuracy_mean"] > 0.5 and rows["ghost 2"]["test_accuracy_mean"] > 0.5
    assert rows["ghost 2"]["x"] == 2 and rows["ghost 2"]["series"] == "ghost"
    runs = [r for r in payload["runs"] if r["label"] == "bn"]
    acc = [r["eval_accuracy"][-1] for r in runs]
    np.testing.assert_allclose(rows["bn"]["test_accuracy_mean"], np.mean(acc), rtol=1e-12)
    np.testing.assert_allclose(rows["bn"]["test_accuracy_std"], np.std(acc, ddof=1), rtol=1e-9)
    # paired by seed against the baseline run
    ghost = {r["seed"]: r["eval_accuracy"][-1] for r in payload["runs"] if r["label"] == "ghost 2"}
    diffs = [ghost[r["seed"]] - r["eval_accuracy"][-1] for r in runs]
    np.testing.assert_allclose(rows["ghost 2"]["delta_vs_baseline_accuracy_mean"], np.mean(diffs),
                               rtol=1e-12, atol=1e-15)
    assert rows["bn"]["delta_vs_baseline_accuracy_mean"] == 0.0
    assert rows["ghost 2"]["seeds_better_than_baseline"] == f"{sum(d > 0 for d in diffs)}/2"
    md = (tmp_path / "out" / "results.md").read_text()
    assert "Command: `cmd`" in md and "| ghost 2 |" in md
    assert (tmp_path / "out" / "sweep.png").stat().st_size > 0
    assert isinstance(exp, Experiment)
    # --replot: the same tables from results.json, no training
    (tmp_path / "out" / "results.md").unlink()
    again = run_experiment(exp, "cpu", tmp_path / "out", progress=False, command="re",
                           replot=True)
    assert again["summary"] == payload["summary"]
    assert "redrawn from `results.json` by `re`" in (tmp_path / "out" / "results.md").read_text()
    with pytest.raises(ValueError, match="replot: no .*results.json; run the experiment first"):
        run_experiment(exp, "cpu", tmp_path / "empty", replot=True)
    exp.cpu["analysis"]["baseline"] = "BN"
    with pytest.raises(ValueError, match="analysis.baseline='BN' is not a run label"):
        run_experiment(exp, "cpu", tmp_path / "out", replot=True)


def test_cli_experiment_list_run_and_errors(tmp_path, capsys, monkeypatch):
    from seqnorm_jax.cli import main

    assert main(["experiment", "--list", "--configs-dir", CONFIG_DIR]) == 0
    out = capsys.readouterr().out
    assert all(f"| {os.path.splitext(f)[0]} |" in out for f in CONFIGS)
    # the packaged configs, from any directory
    monkeypatch.chdir(tmp_path)
    assert main(["experiment", "--list"]) == 0
    assert capsys.readouterr().out == out
    path = _write(tmp_path)
    assert main(["experiment", str(path), "--scale", "smoke", "--out",
                 str(tmp_path / "s")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert json.loads((tmp_path / "s" / "results.json").read_text())["summary"][0]["label"] \
        == "bn"
    assert main(["experiment", str(tmp_path / "missing.json")]) == 2
    assert "no such experiment config" in capsys.readouterr().err
    assert main(["experiment", "002_ghost_batch_sise_sweep", "--scale", "smoke"]) == 2
    assert "Did you mean '002_ghost_batch_size_sweep'?" in capsys.readouterr().err
    assert main(["experiment"]) == 2
    assert "give an experiment config" in capsys.readouterr().err
    assert main(["experiment", str(path), "--seeds", "x"]) == 2
    assert "--seeds 'x'" in capsys.readouterr().err
