"""Paper 000's sequential SeqNorm tuner (``seqnorm_jax.studies.tune``) and ``seqnorm-jax tune``.

The selection rule is checked on hand-made rows and against a brute-force reference on
random rows; the candidate filters on their own; the tuner end to end on scikit-learn's
digits (a one-layer MLP, 1 epoch), against the per-run metrics its ``compare`` stages
wrote; and the command line, including its one-line errors (exit status 2).
"""

import csv
import json
import math

import numpy as np
import pytest

from seqnorm_jax import data
from seqnorm_jax.cli import main
from seqnorm_jax.registry import NormSpec
from seqnorm_jax.studies import (
    TuneResult,
    select,
    sequential_tune,
    valid_batch_groups,
    valid_channel_groups,
)
from seqnorm_jax.train import TrainConfig


def spec(text):
    """A norm spec as the tuner writes it (parsed once, printed back)."""
    return str(NormSpec.parse(text))

TINY = dict(model="mlp", model_kwargs={"features": [16]}, dataset="digits", epochs=1,
            batch_size=32, eval_batch_size=256, lr=0.2, progress=False)
TINY_FLAGS = ["--dataset", "digits", "--model", "mlp", "--model-kwargs", "features=16,",
              "--batch-size", "32", "--eval-batch-size", "256", "--lr", "0.2", "--epochs", "1",
              "--no-progress"]


def row(value, mean, std, seeds=3):
    return dict(parameter="batch_groups", value=value, mean=mean, std=std,
                sem=std / math.sqrt(seeds), seeds=seeds, status="ok")


# ------------------------------------------------------------------------- select
def test_select_clear_winner():
    rows = [row(1, 0.80, 0.01), row(2, 0.90, 0.01), row(4, 0.70, 0.001)]
    chosen, reason = select(rows)
    assert chosen is rows[1]
    assert "batch_groups=2" in reason and "the only one" in reason


def test_select_within_tolerance_lower_std_wins():
    rows = [row(2, 0.900, 0.020), row(4, 0.897, 0.004), row(8, 0.880, 0.001)]
    chosen, reason = select(rows, 0.005)
    assert chosen is rows[1]  # 8 has the lowest std but is 0.02 below the best
    assert "lowest std" in reason and "(2, 4)" in reason


def test_select_equal_std_larger_value_wins():
    rows = [row(2, 0.900, 0.01), row(8, 0.898, 0.01), row(16, 0.850, 0.01)]
    chosen, reason = select(rows, 0.005)
    assert chosen["value"] == 8
    assert "chose the largest" in reason
    # one seed each: std 0, default tolerance 0 -> the best mean; an exact tie in the
    # mean goes to the larger value
    one = [row(1, 0.9, 0.0, 1), row(2, 0.95, 0.0, 1), row(4, 0.95, 0.0, 1), row(8, 0.9, 0.0, 1)]
    assert select(one)[0]["value"] == 4


def test_select_tolerance_zero_is_argmax():
    rng = np.random.default_rng(0)
    means = rng.uniform(0.8, 0.9, size=6)
    stds = rng.uniform(0.001, 0.02, size=6)
    rows = [row(2**i, float(m), float(s)) for i, (m, s) in enumerate(zip(means, stds))]
    assert select(rows, 0.0)[0] is rows[int(np.argmax(means))]
    # the loss direction: argmin
    assert select(rows, 0.0, maximize=False)[0] is rows[int(np.argmin(means))]


def test_select_default_tolerance_is_the_best_standard_error():
    # best: mean 0.90, std 0.02 over 4 seeds -> standard error 0.01
    rows = [row(1, 0.900, 0.020, 4), row(2, 0.8915, 0.010, 4), row(4, 0.885, 0.002, 4)]
    chosen, reason = select(rows)
    assert chosen is rows[1]  # 4 is within one std (0.02) but not one standard error (0.01)
    assert "standard error over 4 seeds, 0.01" in reason
    assert select(rows, 0.02)[0] is rows[2]


def test_select_matches_brute_force_reference():
    rng = np.random.default_rng(1)
    for _ in range(200):
        n = int(rng.integers(1, 7))
        # coarse grids make ties in mean and std common
        means = rng.integers(80, 90, size=n) / 100
        stds = rng.integers(0, 4, size=n) / 100
        rows = [row(v, float(m), float(s), 2) for v, m, s in
                zip(rng.permutation([1, 2, 4, 8, 16, 32])[:n].tolist(), means, stds)]
        tol = float(rng.choice([0.0, 0.01, 0.02]))
        maximize = bool(rng.integers(2))
        sign = 1 if maximize else -1
        best = max(sign * r["mean"] for r in rows)
        well = [r for r in rows if best - sign * r["mean"] <= tol + 1e-9]
        low = min(r["std"] for r in well)
        expected = max((r for r in well if r["std"] <= low + 1e-9), key=lambda r: r["value"])
        assert select(rows, tol, maximize=maximize)[0] is expected


def test_select_ignores_skipped_and_rejects_bad_input():
    rows = [row(1, 0.8, 0.01), dict(value=2, status="skipped", mean=None, std=None)]
    assert select(rows)[0]["value"] == 1
    with pytest.raises(ValueError, match="no evaluated candidate"):
        select(rows[1:])
    with pytest.raises(ValueError, match="tolerance=-0.1"):
        select(rows, -0.1)


# ------------------------------------------------------------------------- candidates
def test_candidate_filters_record_reasons():
    kept, skipped = valid_batch_groups([16, 1, 3, 2, 32, 2], 32)
    assert kept == [1, 2, 16]
    assert set(skipped) == {3, 32}
    assert "does not divide the batch of 32" in skipped[3]
    assert "ghost batches of 1 example" in skipped[32]
    # gradient accumulation: the norm layers see micro-batches of 32 / 4 = 8
    kept, skipped = valid_batch_groups([1, 2, 4, 8], 32, grad_accum_steps=4)
    assert kept == [1, 2, 4] and "micro-batch of 8" in skipped[8]

    kept, skipped = valid_channel_groups([1, 2, 4, 8, 3], [16, 12])
    assert kept == [1, 2, 4]
    assert skipped[8].endswith("[12]") and skipped[3].endswith("[16]")

    for bad in ([0, 2], [2.0], "1,2", []):
        with pytest.raises(ValueError, match="batch_groups"):
            valid_batch_groups(bad, 32)


def test_nothing_left_raises_before_training(tmp_path):
    base = TrainConfig(**TINY)
    out = tmp_path / "tune"
    with pytest.raises(ValueError, match=r"no batch_groups candidate.*\[1, 2, 4, 8, 16\]"):
        sequential_tune(base, batch_groups=(3, 5, 32), channel_groups=(1,), seeds=(0,),
                        out_dir=out, progress=False)
    with pytest.raises(ValueError, match=r"no channel_groups candidate.*\[16\]"):
        sequential_tune(base, batch_groups=(1, 2), channel_groups=(3, 32), seeds=(0,),
                        out_dir=out, progress=False)
    with pytest.raises(ValueError, match="metric"):
        sequential_tune(base, metric="test_accuracy", out_dir=out, progress=False)
    with pytest.raises(ValueError, match="norm_fields='speed=2'.*GhostNorm has no field"):
        sequential_tune(base, batch_groups=(1,), channel_groups=(1,), seeds=(0,),
                        out_dir=out, progress=False, norm_fields="speed=2")
    assert not out.exists()


# ------------------------------------------------------------------------- end to end
def test_sequential_tune_end_to_end_digits(tmp_path):
    base = TrainConfig(**TINY)
    out = tmp_path / "tune"
    seeds = (0, 1)
    result = sequential_tune(base, batch_groups=(1, 2, 3, 32), channel_groups=(1, 2, 32),
                             seeds=seeds, out_dir=out, progress=False, norm_fields="momentum=0.9")
    assert isinstance(result, TuneResult)
    # len(G_M) + len(G_C) usable settings, not their product
    assert result.num_runs == (2 + 2) * len(seeds) and result.grid_runs == 2 * 2 * len(seeds)
    assert [(r["value"], r["status"]) for r in result.stage1] == [
        (1, "ok"), (2, "ok"), (3, "skipped"), (32, "skipped")]
    assert [(r["value"], r["status"]) for r in result.stage2] == [
        (1, "ok"), (2, "ok"), (32, "skipped")]
    assert "does not divide" in result.stage1[2]["reason"]
    g = result.batch_groups
    assert all(r["spec"] == spec(f"seqnorm:channel_groups={r['value']},batch_groups={g},"
                                 "momentum=0.9") for r in result.stage2)
    assert result.stage1[0]["spec"] == spec("ghost:batch_groups=1,momentum=0.9")
    assert result.spec == spec(f"seqnorm:channel_groups={result.channel_groups},"
                               f"batch_groups={g},momentum=0.9")
    assert result.config.norm == result.spec and result.config.validation_size is None

    # the stage rows against the per-run metrics that compare wrote, and the choice
    # against select on those rows
    n_val = round(0.1 * len(data.load("digits", "train")))
    for stage, sub in ((result.stage1, "stage1_batch_groups"),
                       (result.stage2, "stage2_channel_groups")):
        written = json.loads((out / sub / "results.json").read_text())
        assert written["settings"]["test_examples"] == n_val  # validation, not the test set
        assert written["settings"]["config"]["validation_size"] == n_val
        ok = [r for r in stage if r["status"] == "ok"]
        assert sorted(written["specs"]) == sorted(r["spec"] for r in ok)
        # the runs validated on the hold-out: the columns say so
        assert all(row["val_accuracy_mean"] is not None and "test_accuracy_mean" not in row
                   for row in written["summary"])
        assert "| validation accuracy (mean +- std) |" in (out / sub / "results.md").read_text()
        for r in ok:
            finals = [run["eval_accuracy"][-1] for run in written["runs"]
                      if run["spec"] == r["spec"]]
            assert len(finals) == len(seeds)
            np.testing.assert_allclose(r["values"], finals, rtol=0, atol=1e-12)
            np.testing.assert_allclose(r["mean"], np.mean(finals), rtol=0, atol=1e-12)
            np.testing.assert_allclose(r["std"], np.std(finals, ddof=1), rtol=0, atol=1e-12)
            np.testing.assert_allclose(r["sem"], np.std(finals, ddof=1) / np.sqrt(2), atol=1e-12)
            # accuracies over the validation examples are multiples of 1 / n_val
            np.testing.assert_allclose(np.asarray(finals) * n_val,
                                       np.round(np.asarray(finals) * n_val), atol=1e-6)
        assert [r for r in stage if r["chosen"]] == [select(stage)[0]]
    assert result.settings["validation_held_out_by_tuner"] is True
    assert f"held out {n_val} of the" in result.reasons["validation"]

    # the files
    saved = json.loads((out / "tune.json").read_text())
    assert saved["spec"] == result.spec and saved["num_runs"] == result.num_runs
    with open(out / "tune.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 7 and sum(r["chosen"] == "True" for r in rows) == 2
    md = (out / "tune.md").read_text()
    assert result.spec in md and "skipped: does not divide the batch of 32" in md
    assert (out / "tune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for sub in ("stage1_batch_groups", "stage2_channel_groups"):
        assert (out / sub / "results.md").exists() and (out / sub / "curves.png").exists()


# ------------------------------------------------------------------------- command line
def test_cli_tune_digits(tmp_path, capsys):
    out = tmp_path / "tune"
    code = main(["tune", *TINY_FLAGS, "--batch-groups", "1,2", "--channel-groups", "2,3",
                 "--seeds", "1", "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    saved = json.loads((out / "tune.json").read_text())
    assert saved["num_runs"] == 3 and saved["settings"]["seeds"] == [0]
    assert saved["settings"]["model"] == "mlp" and saved["settings"]["validation_size"] == \
        round(0.1 * len(data.load("digits", "train")))
    assert saved["spec"].startswith("seqnorm:channel_groups=2,batch_groups=")
    assert f"chosen: {saved['spec']} (3 runs" in stdout
    assert f"| 1 | `{spec('ghost:batch_groups=1')}` |" in stdout
    assert "skipped: does not divide" in stdout


@pytest.mark.parametrize("argv, needle", [
    (["--batch-groups", "1,x"], "--batch-groups '1,x'"),
    (["--channel-groups", "0"], "--channel-groups '0'"),
    (["--batch-groups", "3,5"], "no batch_groups candidate"),
    (["--metric", "test_accuracy"], "--metric 'test_accuracy'"),
    (["--tolerance", "-1"], "--tolerance"),
    (["--seeds", "0"], "--seeds"),
])
def test_cli_tune_bad_input_exit_2_with_one_line(argv, needle, tmp_path, capsys):
    code = main(["tune", *TINY_FLAGS, *argv, "--out", str(tmp_path / "tune")])
    _, err = capsys.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("seqnorm-jax tune: error:"), err
    assert needle in lines[0]
    assert not (tmp_path / "tune").exists()

