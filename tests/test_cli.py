"""The ``seqnorm-jax`` command line: train / eval / compare end to end on scikit-learn's
digits (tiny MLPs, 1-2 epochs), and the exit status 2 with a one-line message for bad
flags, bad configurations and missing datasets.
"""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from seqnorm_jax import data
from seqnorm_jax.cli import main
from seqnorm_jax.train import TrainConfig, read_jsonl

TINY = ["--dataset", "digits", "--model", "mlp", "--model-kwargs", "features=16,",
        "--batch-size", "32", "--eval-batch-size", "128", "--no-progress"]


def run(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_train_then_eval_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    # a config file, overridden by flags
    cfg = tmp_path / "cfg.json"
    TrainConfig(model="mlp", norm="gn:num_groups=4", lr=0.2, epochs=5, seed=1).to_json(cfg)
    code, stdout, err = run(capsys, ["train", "--config", str(cfg), "--out", str(out),
                                     *TINY, "--norm", "bn", "--epochs", "1"])
    assert code == 0, err
    saved = TrainConfig.from_json(out / "config.json")
    assert (saved.norm, saved.epochs, saved.lr, saved.seed) == ("bn", 1, 0.2, 1)
    assert saved.model_kwargs == {"features": [16]}
    summary = json_lines(stdout)[-1]
    last_eval = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "eval"][-1]
    assert summary["eval_accuracy"] == last_eval["eval_accuracy"]
    assert summary["step"] == len(data.load("digits", "train")) // 32

    # eval of the checkpoint reproduces the run's own evaluation; two example weights
    code, stdout, err = run(capsys, ["eval", "--run", str(out), "--example-weight", "0", "0.5"])
    assert code == 0, err
    rows = json_lines(stdout)
    assert [r["example_weight"] for r in rows] == [0.0, 0.5]
    np.testing.assert_allclose(rows[0]["eval_accuracy"], last_eval["eval_accuracy"])
    np.testing.assert_allclose(rows[0]["eval_loss"], last_eval["eval_loss"], rtol=1e-6)
    assert rows[0]["count"] == len(data.load("digits", "test")) and rows[0]["split"] == "test"
    code, stdout, err = run(capsys, ["eval", "--run", str(out), "--split", "train[:100]"])
    assert code == 0, err
    assert json_lines(stdout)[0]["count"] == 100

    # --resume continues the run from its last checkpoint to the new epoch count
    code, stdout, err = run(capsys, ["train", "--config", str(out / "config.json"),
                                     "--out", str(out), "--epochs", "2", "--resume"])
    assert code == 0, err
    assert json_lines(stdout)[-1]["step"] == 2 * summary["step"]
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [1, 2]


def test_compare_end_to_end_tiny(tmp_path, capsys):
    out = tmp_path / "cmp"
    code, stdout, err = run(capsys, ["compare", *TINY, "--norms", "bn,ghost", "--seeds", "0,1",
                                     "--epochs", "1", "--out", str(out)])
    assert code == 0, err
    assert "| bn | `bn` |" in stdout and "| ghost | `ghost:batch_groups=2` |" in stdout
    results = json.loads((out / "results.json").read_text())
    assert results["specs"] == {"bn": "bn", "ghost": "ghost:batch_groups=2"}
    assert [r["label"] for r in results["summary"]] == ["bn", "ghost"]
    assert len(results["runs"]) == 4 and results["settings"]["seeds"] == [0, 1]
    for row in results["summary"]:
        runs = [r for r in results["runs"] if r["label"] == row["label"]]
        accs = [r["eval_accuracy"][-1] for r in runs]
        np.testing.assert_allclose(row["test_accuracy_mean"], np.mean(accs), rtol=1e-12)
        np.testing.assert_allclose(row["test_accuracy_std"], np.std(accs, ddof=1), rtol=1e-12)
        assert 0.5 < row["test_accuracy_mean"] <= 1.0
        assert row["epoch_time_mean"] > 0
    # each run's metrics are its own train run's files
    run_rows = read_jsonl(out / "runs" / "ghost_seed1" / "metrics.jsonl")
    assert [r for r in run_rows if r["kind"] == "eval"][-1]["eval_accuracy"] == \
        results["runs"][3]["eval_accuracy"][-1]
    with open(out / "results.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames[:3] == ["label", "spec", "seeds"]
        assert "test_accuracy_mean" in reader.fieldnames and len(list(reader)) == 2
    assert (out / "results.md").read_text().count("\n| ") == 4  # header, rule, 2 rows
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_norms_flag_parsing():
    from seqnorm_jax.cli import parse_norms as _parse_norms

    assert _parse_norms("bn,seqnorm:channel_groups=4,batch_groups=8,gn+") == [
        "bn", "seqnorm:channel_groups=4,batch_groups=8", "gn+"]
    assert _parse_norms("hn:std_groups=2; ghost") == ["hn:std_groups=2", "ghost"]
    assert _parse_norms(None)[:2] == ["none", "bn"]


def test_compare_default_specs_fit_the_model():
    from seqnorm_jax.studies.compare import default_norm_specs
    from seqnorm_jax.studies.compare import model_norm_widths as norm_channels

    channels = norm_channels(TrainConfig(model="simplenet"), (28, 28, 1), 10)
    assert channels == [512, 300]
    specs = default_norm_specs(channels, 128)
    assert specs == {"none": "none", "bn": "bn", "ghost": "ghost:batch_groups=8",
                     "gn": "gn:num_groups=4",
                     "seqnorm": "seqnorm:channel_groups=4,batch_groups=8",
                     "hn": "hn", "gn+": "gn+:num_groups=4"}
    cnn = norm_channels(TrainConfig(model="cnn"), (28, 28, 1), 10)
    assert cnn == [32, 64, 64]
    assert default_norm_specs(cnn, 64, ["gn", "ghost", "bgn:num_groups=2"]) == {
        "gn": "gn:num_groups=8", "ghost": "ghost:batch_groups=4",
        "bgn:num_groups=2": "bgn:num_groups=2"}


@pytest.mark.parametrize("argv, needle", [
    (["train", "--out", "x", "--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
    (["train", "--out", "x", "--optimizer", "adagrad"], "argument --optimizer: invalid choice"),
    (["train", "--epochs", "1"], "the following arguments are required: --out"),
    (["compare", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["fit"], "invalid choice: 'fit'"),
])
def test_bad_flags_exit_2_with_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


@pytest.mark.parametrize("argv, needle", [
    (["train", *TINY, "--norm", "ghostly"], "unknown norm layer 'ghostly'"),
    (["train", *TINY, "--batch-size", "0"], "TrainConfig.batch_size=0: must be an integer >= 1"),
    (["train", *TINY, "--norm-weight-decay", "two"], "argument --norm-weight-decay"),
    (["train", *TINY, "--model-kwargs", "depth=20"], "has no field(s) ['depth']"),
    (["train", *TINY, "--config", "missing.json"], "--config: no such file 'missing.json'"),
    (["compare", *TINY, "--seeds", "0", "--epochs", "1"], "--seeds '0': the count must be >= 1"),
    (["eval", "--run", "nowhere"], "'nowhere' has no config.json"),
    # misspelled names: the closest one is suggested
    (["train", *TINY, "--model", "mpl"], "--model: unknown model 'mpl'"),
    (["train", *TINY, "--model", "mpl"], "Did you mean 'mlp'?"),
    (["train", *TINY, "--dataset", "digit"], "Did you mean 'digits'?"),
    (["train", *TINY, "--norm", "seqnorm:chanel_groups=2"], "Did you mean 'channel_groups'?"),
    (["compare", *TINY, "--norms", "bn,ghots", "--seeds", "0,"], "Did you mean 'ghost'?"),
    (["tune", *TINY, "--metric", "eval_acuracy"], "Did you mean 'eval_accuracy'?"),
])
def test_bad_settings_exit_2_with_one_line(argv, needle, tmp_path, capsys):
    if argv[0] == "train":
        argv = [*argv, "--out", str(tmp_path / "o")]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse-level (choices)
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err and err.count("\n") == 1, err


def test_missing_dataset_exit_2_names_it(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(capsys, ["train", "--dataset", "cifar10", "--data-dir", str(empty),
                                "--out", str(tmp_path / "o"), "--no-progress"])
    assert code == 2
    assert "dataset 'cifar10' not found" in err and "Ways to get it" in err
    assert "Traceback" not in err
    # the message's lists keep their lines: one error line, then one line per item
    lines = err.splitlines()
    assert lines[0].startswith("seqnorm-jax train: error: dataset 'cifar10' not found")
    assert [ln.split(".")[0].strip() for ln in lines if ln.startswith("  1.")
            or ln.startswith("  2.")] == ["1", "2"]
    assert lines[lines.index("Tried:") + 1].startswith("  - ")


def test_digits_without_scikit_learn_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    code, _, err = run(capsys, ["train", *TINY, "--out", str(tmp_path / "o")])
    assert code == 2 and "Traceback" not in err
    assert "dataset 'digits' not found" in err and "scikit-learn is not importable" in err
    assert "`pip install scikit-learn`" in err


def test_help_shows_descriptions_and_defaults(capsys):
    for argv in (["--help"], ["train", "--help"], ["compare", "--help"], ["tune", "--help"],
                 ["experiment", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert "``" not in out and ":func:" not in out, argv
        text = " ".join(out.split())  # argparse wraps help lines
        if argv[0] == "--help":
            assert "exit status:" in text and "seqnorm-jax experiment --list" in text
        elif argv[0] == "train":
            assert ("--seed N seeds the initialisation, the per-step random numbers and the "
                    "data order (default: 0)") in text
            assert "--lr X peak (cosine, one-cycle) or initial (step, constant) learning rate " \
                   "(default: 0.05)" in text
            assert "--progress, --no-progress show progress bars (default: on)" in text
        elif argv[0] == "compare":  # compare's own defaults, not TrainConfig's
            assert "--model NAME" in text and "(default: simplenet)" in text
            assert "--epochs N passes over the training set (default: 4)" in text
        elif argv[0] == "tune":
            assert "(default: 1,2,4,8,16)" in text and "(default: eval_accuracy)" in text
        else:
            assert "(default: cpu)" in text


def _train_flags() -> dict:
    from seqnorm_jax.cli.parser import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return {a.dest: a for a in sub.choices["train"]._actions}


def test_every_config_field_has_a_flag_documented_by_the_field():
    import dataclasses

    from seqnorm_jax.cli.parser import COMPARE_DEFAULTS
    from seqnorm_jax.train.config import field_docs

    flags, docs, defaults = _train_flags(), field_docs(), TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        action = flags[field.name]
        assert action.option_strings[0] == "--" + field.name.replace("_", "-")
        assert docs[field.name].strip(), field.name
        assert action.help.startswith(docs[field.name].rstrip(".") + " (default: "), field.name
    # the text is the docstring's entry, continuation lines joined, roles as plain text
    assert docs["seed"] == ("seeds the initialisation, the per-step random numbers and the "
                            "data order.")
    assert docs["model"].endswith("or vgg11 (seqnorm_jax.models.get_model).")
    assert flags["lr"].help == ("peak (cosine, one-cycle) or initial (step, constant) "
                                "learning rate (default: 0.05)")
    assert flags["epochs"].help.endswith(f"(default: {defaults.epochs})")
    TrainConfig(**COMPARE_DEFAULTS)  # the studies' defaults are a valid config


def test_a_field_without_its_doc_is_refused():
    import dataclasses

    from seqnorm_jax.train.config import field_docs

    @dataclasses.dataclass
    class Config:
        """Settings.

        Attributes:
          a: the first,
            on two lines.
        """

        a: int = 1
        b: int = 2

    with pytest.raises(TypeError, match=r"undocumented: \['b'\]"):
        field_docs(Config)
    entry = "Attributes:\n" + " " * 10 + "b: second.\n"
    Config.__doc__ = Config.__doc__.replace("Attributes:\n", entry)
    assert field_docs(Config) == {"a": "the first, on two lines.", "b": "second."}


HELP_WITHOUT_JAX = """
import runpy, sys
sys.argv = ["seqnorm-jax", *sys.argv[1:]]
try:
    runpy.run_module("seqnorm_jax", run_name="__main__")
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("jax", "jaxlib", "flax", "optax", "orbax", "numpy",
                           "tensorflow_datasets", "grain") if m in sys.modules)
print("EXIT", code, "HEAVY", heavy, file=sys.stderr)
"""


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["compare"], ["tune"],
                                     ["experiment"], ["plan"]])
def test_help_imports_no_jax(command):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", HELP_WITHOUT_JAX, *command, "--help"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.stderr.strip().splitlines()[-1] == "EXIT 0 HEAVY []", proc.stderr
    assert proc.stdout.startswith("usage: seqnorm-jax")


def test_eval_example_weight_out_of_range_before_any_work(tmp_path, capsys):
    # checked by the one rule (seqnorm_jax.checks.example_weight) before the run is read
    code, out, err = run(capsys, ["eval", "--run", str(tmp_path / "none"),
                                  "--example-weight", "0.5", "1.5"])
    assert code == 2 and out == ""
    assert err.startswith("seqnorm-jax eval: error: --example-weight: example_weight must be "
                          "in [0, 1]")
    assert "got 1.5" in err and err.count("\n") == 1


def test_python_dash_m_entry_point():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "seqnorm_jax", "train", "--out", "o",
                           "--lr", "fast"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "argument --lr: invalid float value: 'fast'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_train_on_an_explicit_mesh(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run(capsys, ["train", *TINY, "--epochs", "1", "--mesh", "explicit",
                                     "--out", str(out)])
    assert code == 0, err
    summary = json_lines(stdout)[-1]
    assert summary["step"] == len(data.load("digits", "train")) // 32
    assert 0.5 < summary["eval_accuracy"] <= 1.0
