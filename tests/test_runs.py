"""Runs that stop cleanly and resume exactly, folders that never mix two runs, results
that never mislead: preemption by SIGTERM/SIGINT (at a step, during an asynchronous
checkpoint write, during evaluation; a second signal), a used run folder, the divergence
guard over everything a step writes, a tuning where every candidate diverged, an empty
``--out``, ``--resume`` without a checkpoint, a metrics file deleted mid-run, a
comparison rerun into its folder, and a full disk.

Tiny MLPs on scikit-learn's digits (45 steps an epoch). Signals go to real subprocesses
(``tests/run_worker.py``), sent when the worker says it reached the moment; nothing
waits on a clock.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqnorm_jax.cli import DIVERGED, PREEMPTED, main
from seqnorm_jax.train import Checkpointer, TrainConfig, Trainer, read_jsonl
from test_experiments import _write
from test_faults import STEPS_PER_EPOCH, TINY, run, tiny

RUN = [*TINY, "--epochs", "2", "--checkpoint-every", "10", "--log-every", "10"]
WORKER = os.path.join(os.path.dirname(__file__), "run_worker.py")
# the workers compute as this process does: its 4 CPU devices and XLA flags (conftest.py)
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(jax.device_count())}


def deterministic(rows):
    return [{k: v for k, v in r.items() if k not in ("wall_time", "images_per_sec", "epoch_time")}
            for r in rows]


def final_state(out, template=None):
    """The newest checkpoint of the train run in ``out``, restored (into ``template``'s
    structure; default: a fresh state of the run's config)."""
    if template is None:
        template = Trainer(TrainConfig.from_json(os.path.join(out, "config.json"))).init_state()
    checkpointer = Checkpointer(os.path.join(out, "checkpoints"))
    try:
        state, _ = checkpointer.restore(template)
    finally:
        checkpointer.close()
    return state


def assert_same_state(a, b):
    leaves = lambda s: jax.tree_util.tree_leaves((s.step, s.params, s.opt_state, s.batch_stats))
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def result_runs(folder):
    """The runs of a study's ``results.json``, without their timings."""
    runs = json.loads((folder / "results.json").read_text())["runs"]
    return [{k: v for k, v in r.items() if k != "epoch_time"} for r in runs]


def no_orbax_tmp(out):
    return [os.path.join(d, n) for d, dirs, files in os.walk(out) for n in dirs + files
            if "orbax-checkpoint-tmp" in n]


class Worker:
    """``tests/run_worker.py MOMENT -- ARGV`` in a subprocess."""

    def __init__(self, moment, argv):
        self.proc = subprocess.Popen([sys.executable, WORKER, moment, "--", *argv],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=ENV)

    def wait_for(self, line):
        """Read the worker's stdout up to ``line`` (other output, e.g. progress, is skipped)."""
        for got in self.proc.stdout:
            if got.strip() == line:
                return
        _, err = self.proc.communicate(timeout=120)
        pytest.fail(f"the worker ended without saying {line!r}; stderr:\n{err}")

    def signal(self, sig):
        self.proc.send_signal(sig)

    def finish(self, stdin=""):
        out, err = self.proc.communicate(stdin, timeout=300)
        return self.proc.returncode, out, err


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of ``RUN``: its folder, final state and metrics rows."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(["train", *RUN, "--out", str(out)]) == 0
    return out, final_state(out), read_jsonl(out / "metrics.jsonl")


def assert_like_reference(out, reference):
    _, state, rows = reference
    assert_same_state(final_state(out), state)
    assert deterministic(read_jsonl(out / "metrics.jsonl")) == deterministic(rows)


# ------------------------------------------------------------------ 1. preemption

@pytest.mark.parametrize("moment, sig, step", [
    ("step:12", signal.SIGTERM, 13),  # the step in flight (the 13th) is finished
    ("save:10", signal.SIGTERM, 10),  # while Orbax writes step 10 in the background
    ("eval", signal.SIGINT, 45),      # during the first epoch's evaluation
])
def test_signal_checkpoints_the_step_and_resume_is_bit_identical(moment, sig, step, tmp_path,
                                                                  capsys, reference):
    out = tmp_path / "run"
    worker = Worker(moment, ["train", *RUN, "--out", str(out)])
    worker.wait_for("ready")
    worker.signal(sig)
    code, stdout, err = worker.finish()
    assert code == PREEMPTED == 75, err
    assert err.strip().splitlines()[-1] == \
        f"seqnorm-jax train: preempted at step {step}; resume with --resume", err
    assert "Traceback" not in err, err
    assert str(step) in os.listdir(out / "checkpoints")
    assert int(final_state(out).step) == step
    assert no_orbax_tmp(out) == []
    rows = read_jsonl(out / "metrics.jsonl")
    assert rows and all(r["step"] <= step for r in rows)
    code, _, err = run(capsys, ["train", *RUN, "--out", str(out), "--resume"])
    assert code == 0, err
    assert_like_reference(out, reference)


def test_a_second_signal_exits_at_once(tmp_path):
    out = tmp_path / "run"
    worker = Worker("twice:12", ["train", *RUN, "--out", str(out)])
    worker.wait_for("ready")
    worker.signal(signal.SIGTERM)
    worker.wait_for("got one")  # the first signal is being handled: the run is stopping
    worker.signal(signal.SIGTERM)
    code, _, err = worker.finish()
    assert code == 128 + signal.SIGTERM, err
    assert "SIGTERM again: exiting at once" in err and "Traceback" not in err, err


def test_compare_stopped_mid_run_resumes_where_it_stopped(tmp_path, capsys, monkeypatch):
    argv = ["compare", *TINY, "--norms", "bn,gn:num_groups=4", "--seeds", "0,", "--epochs",
            "2", "--log-every", "10"]
    ref = tmp_path / "ref"
    code, _, err = run(capsys, [*argv, "--out", str(ref)])
    assert code == 0, err
    out = tmp_path / "cmp"
    worker = Worker("run:2:50", [*argv, "--out", str(out)])  # the second run, in epoch 2
    worker.wait_for("ready")
    worker.signal(signal.SIGTERM)
    code, _, err = worker.finish()
    assert code == PREEMPTED, err
    assert err.strip().splitlines()[-1] == ("seqnorm-jax compare: preempted at step 51 (run "
                                            "gn:num_groups=4 seed 0); resume with --resume"), err
    assert not (out / "results.json").exists()
    # rerun without --resume: refused, nothing touched
    code, _, err = run(capsys, [*argv, "--out", str(out)])
    assert code == 2 and err.count("\n") == 1 and "--resume" in err and "--overwrite" in err, err
    # --resume: the finished run is kept, the stopped one continues from step 51
    fits = []
    real_fit = Trainer.fit

    def fit(self, *args, **kwargs):
        fits.append((self.desc, kwargs.get("resume", args[0] if args else False)))
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "fit", fit)
    code, _, err = run(capsys, [*argv, "--out", str(out), "--resume"])
    assert code == 0, err
    assert fits == [("gn:num_groups=4 seed 0", True)]
    assert result_runs(out) == result_runs(ref)
    # rerun with --resume again: nothing is trained; results unchanged
    fits.clear()
    code, _, err = run(capsys, [*argv, "--out", str(out), "--resume"])
    assert code == 0 and fits == [], err
    # --overwrite with other layers: the old runs are gone, not left next to the new
    code, _, err = run(capsys, [*argv[:-4], "--epochs", "1", "--norms", "bn", "--out", str(out),
                                "--overwrite"])
    assert code == 0, err
    assert sorted(os.listdir(out / "runs")) == ["bn_seed0"]


def test_experiment_stopped_mid_run_resumes_where_it_stopped(tmp_path, capsys):
    config = str(_write(tmp_path, cpu={"base": {"epochs": 1}, "seeds": [0]}))
    argv = ["experiment", config, "--scale", "cpu"]
    ref, out = tmp_path / "ref", tmp_path / "exp"
    code, _, err = run(capsys, [*argv, "--out", str(ref)])
    assert code == 0, err
    worker = Worker("run:2:20", [*argv, "--out", str(out)])
    worker.wait_for("ready")
    worker.signal(signal.SIGINT)
    code, _, err = worker.finish()
    assert code == PREEMPTED, err
    assert "preempted at step 21 (run ghost 2 seed 0); resume with --resume" in err, err
    code, _, err = run(capsys, [*argv, "--out", str(out), "--resume"])
    assert code == 0, err
    assert result_runs(out) == result_runs(ref)


# ---------------------------------------------------------------- 2. used folders

def test_the_lock_comes_before_the_data_load(tmp_path, capsys):
    out = tmp_path / "run"
    first = Worker("load", ["train", *TINY, "--epochs", "1", "--out", str(out)])
    first.wait_for("ready")  # the first run is loading its data
    code, _, err = run(capsys, ["train", *TINY, "--epochs", "1", "--out", str(out)])
    assert code == 2 and err.count("\n") == 1, err
    assert f"'{out}' is in use by another run (pid {first.proc.pid} on host" in err, err
    code, stdout, err = first.finish("go\n")
    assert code == 0, err
    assert json.loads(stdout.splitlines()[-1])["step"] == STEPS_PER_EPOCH


def test_a_used_folder_needs_resume_or_overwrite(tmp_path, capsys, reference):
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)  # a finished 2-epoch run: checkpoints 80, 90
    before = {p: (out / p).read_bytes() for p in ("metrics.jsonl", "config.json")}
    code, _, err = run(capsys, ["train", *TINY, "--epochs", "1", "--out", str(out)])
    assert code == 2 and err.count("\n") == 1, err
    assert (f"error: out_dir (--out) '{out}' holds an earlier run (config.json, "
            "metrics.jsonl, metrics.csv, tensorboard, checkpoints); continue it with --resume, "
            "replace it "
            "with --overwrite") in err
    assert {p: (out / p).read_bytes() for p in before} == before
    assert sorted(os.listdir(out / "checkpoints")) == ["80", "90"]
    code, _, err = run(capsys, ["train", *TINY, "--out", str(out), "--resume", "--overwrite"])
    assert code == 2 and "give one of them" in err, err
    # --overwrite clears the earlier run: eval then reads the new run's checkpoint only
    code, _, err = run(capsys, ["train", *TINY, "--epochs", "1", "--out", str(out),
                                "--overwrite"])
    assert code == 0, err
    assert sorted(os.listdir(out / "checkpoints")) == [str(STEPS_PER_EPOCH)]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "eval"] == \
        [STEPS_PER_EPOCH]
    assert len(os.listdir(out / "tensorboard")) == 1  # the earlier run's events went too
    code, stdout, err = run(capsys, ["eval", "--run", str(out)])
    assert code == 0 and json.loads(stdout)["step"] == STEPS_PER_EPOCH, err
    # the results are kept in the run's folder too, each evaluation after the earlier ones
    assert read_jsonl(out / "eval.jsonl") == [json.loads(stdout)]
    code, stdout2, err = run(capsys, ["eval", "--run", str(out), "--example-weight", "0", "1"])
    assert code == 0, err
    assert read_jsonl(out / "eval.jsonl") == [json.loads(line) for line in
                                              (stdout + stdout2).splitlines()]


# ------------------------------------------------------------- 3. divergence guard

class InfStatsAfter(nn.Module):
    """An MLP whose running statistic ``var`` becomes ``inf`` at its ``k``-th training step
    while its loss stays finite."""

    k: int = 5

    @nn.compact
    def __call__(self, x, train: bool = True):
        count = self.variable("batch_stats", "count", lambda: jnp.zeros((), jnp.int32))
        var = self.variable("batch_stats", "var", lambda: jnp.ones((4,), jnp.float32))
        logits = nn.Dense(10)(nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1))))
        if train and not self.is_initializing():
            count.value = count.value + 1
            var.value = jnp.where(count.value >= self.k, jnp.inf, var.value * 0.5)
        return logits


class OverflowingUpdate(nn.Module):
    """An MLP with a parameter ``w`` that does not change the output (``w*c - sg(w*c)`` is
    0) but gets a gradient of about ``c``; at lr 1e21 its first update overflows float32
    while the loss and the gradient norm stay finite."""

    c: float = 1e19

    @nn.compact
    def __call__(self, x, train: bool = True):
        w = self.param("w", nn.initializers.zeros, ())
        logits = nn.Dense(10)(nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1))))
        return logits.at[:, 0].add(w * self.c - jax.lax.stop_gradient(w * self.c))


@pytest.mark.parametrize("case", ["running statistics", "parameters"])
def test_the_kept_state_is_finite_leaf_by_leaf(case, tmp_path):
    out = tmp_path / "run"
    if case == "running statistics":  # the loss stays finite; var becomes inf at step 5
        model, cfg, want = InfStatsAfter(k=5), tiny(checkpoint_every=2), 5
    else:  # finite loss and gradient; the update overflows float32 at the first step
        model, cfg, want = OverflowingUpdate(), tiny(lr=1e21, momentum=0.0), 1
    trainer = Trainer(cfg, out_dir=out, model=model)
    result = trainer.fit()
    assert result.diverged is not None and result.diverged["step"] == want
    assert np.isfinite(result.diverged["loss"])
    assert result.diverged["last_finite_step"] == want - 1
    kept = final_state(out, trainer.init_state())
    assert int(kept.step) == want - 1
    for path, leaf in jax.tree_util.tree_flatten_with_path(
            (kept.params, kept.opt_state, kept.batch_stats))[0]:
        assert np.isfinite(np.asarray(leaf)).all(), jax.tree_util.keystr(path)


# -------------------------------------------------------- 4-6. results that never mislead

def test_tune_with_every_candidate_diverged_names_them(tmp_path, capsys):
    code, _, err = run(capsys, ["tune", *TINY, "--lr", "1e38", "--momentum", "0",
                                "--batch-groups", "2,4", "--channel-groups", "1", "--seeds",
                                "0,", "--epochs", "1", "--out", str(tmp_path / "tune")])
    assert code == DIVERGED, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("seqnorm-jax tune: every batch_groups candidate diverged"), err
    assert "ghostnorm:batch_groups=2, ghostnorm:batch_groups=4; lower --lr" in lines[0], err


@pytest.mark.parametrize("command", ["train", "compare"])
def test_an_empty_out_is_refused(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, [command, *TINY, "--out", ""])
    assert code == 2 and err.count("\n") == 1, err
    assert "error: --out is empty ('')" in err, err
    assert os.listdir(tmp_path) == []


def test_resume_without_a_checkpoint_says_it_starts_fresh(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run(capsys, ["train", *TINY, "--epochs", "1", "--out", str(out),
                                     "--resume"])
    assert code == 0, err
    assert f"--resume: no checkpoint in {out / 'checkpoints'}; starting from step 0" in err
    assert json.loads(stdout)["step"] == STEPS_PER_EPOCH


def test_metrics_file_deleted_mid_run_is_rewritten_whole(tmp_path):
    out = tmp_path / "run"

    def delete(state, batch, step):
        if step in (12, 31):
            os.remove(out / "metrics.jsonl")
            os.remove(out / "metrics.csv")

    result = Trainer(tiny(epochs=2, log_every=5), out_dir=out, step_hooks=[delete]).fit()
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows if r["kind"] == "train"][:3] == [5, 10, 15]
    assert [r for r in rows if r["kind"] == "train"] == result.train_rows
    assert [r for r in rows if r["kind"] == "eval"] == result.eval_rows
    with open(out / "metrics.csv") as f:
        assert len(f.read().splitlines()) == 1 + len(rows)


# ---------------------------------------------------------------------- 9. disk full

@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs mounted for the test, or ``None`` where mounting is not allowed."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                          capture_output=True).returncode == 0 if shutil.which("mount") else False
    yield mnt if made else None
    if made:
        subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_one_error_line_last_checkpoint_intact_resume_bit_identical(
        tmp_path, capsys, small_disk, reference):
    out = (small_disk or tmp_path) / "run"
    filler = (small_disk or tmp_path) / "filler"
    moment = f"fill:20:{filler}" if small_disk is not None else "enospc:20"
    code, _, err = Worker(moment, ["train", *RUN, "--out", str(out)]).finish()
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("seqnorm-jax train: error: ") and "No space left" in lines[0], err
    assert int(final_state(out).step) == 10  # the last checkpoint is intact
    assert no_orbax_tmp(out) == []  # step 20's half-written folder went when it was opened
    if filler.exists():
        filler.unlink()
    code, _, err = run(capsys, ["train", *RUN, "--out", str(out), "--resume"])
    assert code == 0, err
    assert no_orbax_tmp(out) == []
    assert_like_reference(out, reference)
