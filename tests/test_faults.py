"""Runs that never hang, never mix, never mislead (docs/runs.md).

Write faults end the process within a bounded time with one ``error: <path>: <cause>``
line and exit status 2; a non-finite loss is a result (``diverged at step N``, exit 3,
the last finite state checkpointed); one writer per run folder; ``--resume`` refuses a
changed config; damaged checkpoints fall back to the newest intact one; every bad
setting is one ``error:`` line before any work. Tiny MLPs on scikit-learn's digits.
"""

import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqnorm_jax.cli import DIVERGED, main
from seqnorm_jax.train import Checkpointer, TrainConfig, Trainer, read_jsonl
from seqnorm_jax.train.files import run_lock
from seqnorm_jax.train.files import RunFileError

TINY = ["--dataset", "digits", "--model", "mlp", "--model-kwargs", "features=16,",
        "--batch-size", "32", "--eval-batch-size", "512", "--no-progress"]
STEPS_PER_EPOCH = 45  # digits: its training split in batches of 32
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def tiny(**changes):
    base = dict(model="mlp", model_kwargs={"features": [16]}, norm="bn", dataset="digits",
                epochs=1, batch_size=32, eval_batch_size=512, lr=0.1, log_every=10,
                progress=False, seed=1)
    base.update(changes)
    return TrainConfig(**base)


def run(capsys, argv):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse-level errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def strict_rows(path):
    """Every line of a JSONL file, parsed as strict JSON (no NaN/Infinity tokens)."""
    def refuse(name):
        raise AssertionError(f"non-strict JSON constant {name} in {path}")
    with open(path) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


# ----------------------------------------------------------------------------- 1. faults

def test_checkpoint_folder_replaced_mid_run_ends_with_one_error_line(tmp_path, capsys,
                                                                     monkeypatch):
    out = tmp_path / "run"
    ckpt = out / "checkpoints"
    moved = tmp_path / "kept"
    real_save = Checkpointer.save

    def save(self, state, position):
        # The fault lands at a fixed point: before the save of step 10, once the earlier
        # (asynchronous) save is written, the folder is replaced by a file.
        if int(state.step) == 10:
            self.wait()
            os.rename(ckpt, moved)  # keep the good checkpoints aside
            ckpt.write_text("not a folder")
        return real_save(self, state, position)

    monkeypatch.setattr(Checkpointer, "save", save)
    code, _, err = run(capsys, ["train", *TINY, "--epochs", "200", "--checkpoint-every", "5",
                                "--keep-checkpoints", "3", "--out", str(out)])
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("seqnorm-jax train: error: ") and str(ckpt) in lines[0], err
    # the checkpoints written before the fault restore
    steps = sorted(int(p.name) for p in moved.iterdir() if p.name.isdigit())
    assert steps and steps[-1] % 5 == 0
    assert steps == [5]  # the fault came before step 10's save, after step 5's was written
    trainer = Trainer(tiny())
    checkpointer = Checkpointer(moved)
    state, position = checkpointer.restore(trainer.init_state())
    checkpointer.close()
    assert int(state.step) == steps[-1] and position["epoch"] * STEPS_PER_EPOCH \
        + position["step_in_epoch"] == steps[-1]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state.params))


def test_metrics_file_fault_names_the_file(tmp_path):
    out = tmp_path / "run"

    def break_metrics(state, batch, step):
        if step == 12:
            os.remove(out / "metrics.jsonl")
            os.mkdir(out / "metrics.jsonl")  # now a folder: the next row cannot be appended

    with pytest.raises(RunFileError, match=r"metrics\.jsonl: Is a directory"):
        Trainer(tiny(log_every=5), out_dir=out, step_hooks=[break_metrics]).fit()


def test_results_fault_in_compare_is_one_error_line(tmp_path, capsys):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "results.json").mkdir()  # results.json cannot be written
    code, _, err = run(capsys, ["compare", *TINY, "--norms", "bn", "--seeds", "0,",
                                "--epochs", "1", "--out", str(out)])
    assert code == 2 and err.count("\n") == 1, err
    assert f"error: {out / 'results.json'}: Is a directory" in err


# ------------------------------------------------------------------------- 2. divergence

class NaNAfter(nn.Module):
    """An MLP whose training loss is NaN from its ``k``-th training step on (a step counter
    in ``batch_stats``, so a kept state also keeps the counter)."""

    k: int = 5

    @nn.compact
    def __call__(self, x, train: bool = True):
        count = self.variable("batch_stats", "count", lambda: jnp.zeros((), jnp.int32))
        x = nn.Dense(16)(x.reshape(x.shape[0], -1))
        logits = nn.Dense(10)(nn.relu(x))
        if train and not self.is_initializing():
            count.value = count.value + 1
            logits = logits * jnp.where(count.value >= self.k, jnp.nan, 1.0)
        return logits


def test_divergence_stops_with_the_last_finite_state_checkpointed(tmp_path):
    out = tmp_path / "run"
    result = Trainer(tiny(epochs=2), out_dir=out, model=NaNAfter(k=7)).fit()
    assert result.diverged == {"step": 7, "loss": pytest.approx(float("nan"), nan_ok=True),
                               "last_finite_step": 6}
    assert int(result.state.step) == 6 and int(result.state.batch_stats["count"]) == 6
    assert result.eval_rows == []
    # the state is exactly that of a run stopped after 6 steps, and it is checkpointed
    ref = Trainer(tiny(epochs=2), model=NaNAfter(k=7), max_steps=6).fit()
    for a, b in zip(jax.tree_util.tree_leaves(ref.state.params),
                    jax.tree_util.tree_leaves(result.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert sorted(os.listdir(out / "checkpoints")) == ["6"]
    # JSONL stays strict JSON; NaN is the string "nan", read back as a float
    rows = strict_rows(out / "metrics.jsonl")
    assert rows == [{**rows[0], "kind": "train", "step": 7, "loss": "nan"}]
    assert np.isnan(read_jsonl(out / "metrics.jsonl")[0]["loss"])
    assert "nan" in (out / "metrics.csv").read_text().splitlines()[1].split(",")


def test_divergence_continue_trains_on_and_reports(tmp_path):
    result = Trainer(tiny(on_divergence="continue", log_every=50), model=NaNAfter(k=3)).fit()
    assert result.diverged["step"] == 3 and "last_finite_step" not in result.diverged
    assert int(result.state.step) == STEPS_PER_EPOCH and len(result.eval_rows) == 1
    assert np.isnan(result.eval_rows[0]["loss"])


def test_cli_divergence_exit_3_and_compare_goes_on(tmp_path, capsys):
    code, out, err = run(capsys, ["train", *TINY, "--lr", "1e6", "--out", str(tmp_path / "t")])
    assert code == DIVERGED == 3
    assert json.loads(out)["diverged_at_step"] >= 1
    assert "diverged at step" in err and "is checkpointed in" in err, err
    # compare: without normalization a 4-layer MLP at lr 30 diverges (recorded as such),
    # with BatchNorm it trains; the comparison goes on and keeps both
    cmp_out = tmp_path / "cmp"
    deep = [a if a != "features=16," else "features=32,32,32,32" for a in TINY]
    code, out, err = run(capsys, ["compare", *deep, "--norms", "none,bn", "--lr", "30",
                                  "--momentum", "0", "--seeds", "0,", "--epochs", "1",
                                  "--out", str(cmp_out)])
    assert code == 0, err
    results = json.loads((cmp_out / "results.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"{c} in results.json"))
    by_label = {r["label"]: r for r in results["summary"]}
    assert by_label["none"]["diverged"] == "1/1" and by_label["none"]["test_accuracy_mean"] is None
    assert by_label["bn"]["diverged"] == "0/1" and 0 <= by_label["bn"]["test_accuracy_mean"] <= 1
    assert results["runs"][0]["diverged"]["step"] >= 1 and results["runs"][1]["diverged"] is None
    assert "| none | `none` | diverged (1/1) |" in out
    assert (cmp_out / "curves.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------ 3. one writer

def test_second_writer_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from seqnorm_jax.train.files import run_lock\n"
         "with run_lock(sys.argv[1]):\n print('locked', flush=True); sys.stdin.read()",
         str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = run(capsys, ["train", *TINY, "--out", str(out)])
        assert code == 2 and err.count("\n") == 1, err
        assert f"out_dir (--out) '{out}' is in use by another run (pid {holder.pid} on host" in err
        assert not (out / "metrics.jsonl").exists() and not (out / "config.json").exists()
    finally:
        holder.communicate("", timeout=60)
    # the holder ended: its lock went with it (no stale lock)
    with run_lock(out):
        pass


# ----------------------------------------------------------------------- 4. resume config

def test_resume_refuses_a_changed_config_naming_the_fields(tmp_path, capsys):
    out = str(tmp_path / "run")
    code, _, err = run(capsys, ["train", *TINY, "--epochs", "1", "--out", out])
    assert code == 0, err
    saved = (tmp_path / "run" / "config.json").read_text()
    code, _, err = run(capsys, ["train", *TINY, "--epochs", "2", "--lr", "0.01",
                                "--seed", "5", "--out", out, "--resume"])
    assert code == 2 and err.count("\n") == 1, err
    assert "lr (0.05 -> 0.01), seed (0 -> 5)" in err and "--allow-change lr,seed" in err
    assert (tmp_path / "run" / "config.json").read_text() == saved  # nothing rewritten
    # a variable-changing norm is refused before Orbax reads the tree, even when allowed
    code, _, err = run(capsys, ["train", *TINY, "--norm", "gn:num_groups=4", "--out", out,
                                "--resume", "--allow-change", "norm"])
    assert code == 2 and "holds another model, norm layer or optimizer" in err, err
    assert "tree structures" not in err
    # epochs is safe; lr with --allow-change
    code, out_text, err = run(capsys, ["train", *TINY, "--epochs", "2", "--lr", "0.01",
                                       "--out", out, "--resume", "--allow-change", "lr"])
    assert code == 0, err
    assert json.loads(out_text)["step"] == 2 * STEPS_PER_EPOCH


# ------------------------------------------------------------------ 5. damaged checkpoints

def _damage(step_dir, how):
    if how == "truncated data file":
        files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir / "state" / "d") for f in fs]
        biggest = max(files, key=os.path.getsize)
        with open(biggest, "r+b") as f:
            f.truncate(os.path.getsize(biggest) // 2)
    elif how == "missing state":
        shutil.rmtree(step_dir / "state")
    elif how == "garbage position":
        for d, _, fs in os.walk(step_dir / "position"):
            for f in fs:
                with open(os.path.join(d, f), "w") as fh:
                    fh.write("{garbage")
    elif how == "empty step folder":
        os.mkdir(step_dir.parent / str(int(step_dir.name) + 1))


DAMAGED_CFG = dict(epochs=2, checkpoint_every=10, keep_checkpoints=3)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The final parameters of the damaged-checkpoint runs' config, never interrupted."""
    full = Trainer(tiny(**DAMAGED_CFG), out_dir=tmp_path_factory.mktemp("full")).fit()
    return jax.tree_util.tree_leaves(full.state.params)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A run folder of that config stopped at step 30 (checkpoints 10, 20, 30)."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    Trainer(tiny(**DAMAGED_CFG), out_dir=out, max_steps=30).fit()
    return out


@pytest.mark.parametrize("how", ["truncated data file", "missing state", "garbage position",
                                 "empty step folder"])
def test_resume_skips_damaged_checkpoints(tmp_path, how, capfd, uninterrupted, interrupted):
    out = tmp_path / "run"
    cfg = tiny(**DAMAGED_CFG)
    shutil.copytree(interrupted, out)
    os.remove(out / "run.lock")
    assert sorted(os.listdir(out / "checkpoints")) == ["10", "20", "30"]
    _damage(out / "checkpoints" / "30", how)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # a row cut off mid-write
    capfd.readouterr()
    resumed = Trainer(cfg, out_dir=out).fit(resume=True)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Event loop is closed" not in err, err
    skipped = resumed.skipped_checkpoints
    if how == "empty step folder":
        assert [s for s, _ in skipped] == [31]
    else:
        assert [s for s, _ in skipped] == [30]
        assert f"skipped damaged checkpoint {out / 'checkpoints' / '30'}" in err
    # the resumed run ends where an uninterrupted one does
    for a, b in zip(uninterrupted, jax.tree_util.tree_leaves(resumed.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rows = strict_rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [45, 90]


def test_no_intact_checkpoint_names_each(tmp_path):
    out = tmp_path / "run"
    Trainer(tiny(checkpoint_every=10, keep_checkpoints=1), out_dir=out, max_steps=10).fit()
    shutil.rmtree(out / "checkpoints" / "10" / "state")
    with pytest.raises(ValueError, match=r"no intact checkpoint in .*checkpoints: step 10: "):
        Trainer(tiny(), out_dir=out).fit(resume=True)


def test_corrupt_metrics_line_names_the_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1}\n{oops\n{"kind": "train", "step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 2 is not a JSON object"):
        read_jsonl(path)


# -------------------------------------------------------------------- 6. bad settings

@pytest.fixture
def config_file(tmp_path):
    def write(**fields):
        path = tmp_path / "cfg.json"
        path.write_text(json.dumps(fields))
        return str(path)
    return write


BAD_SETTINGS = [
    # (case, argv builder, expected piece of the one-line error)
    ("lr as a string", lambda t, cf: ["--config", cf(lr="0.1")],
     "TrainConfig.lr='0.1': must be a number, got str; write it without quotes"),
    ("lr null", lambda t, cf: ["--config", cf(lr=None)], "TrainConfig.lr=None: must be a number"),
    ("momentum a word", lambda t, cf: ["--config", cf(momentum="high")],
     "TrainConfig.momentum='high': must be a number"),
    ("progress 'no'", lambda t, cf: ["--config", cf(progress="no")],
     "TrainConfig.progress='no': must be true or false"),
    ("config a folder", lambda t, cf: ["--config", str(t)], "is a folder; give a JSON config"),
    ("seed 2**70", lambda t, cf: ["--seed", str(2**70)],
     "TrainConfig.seed=1180591620717411303424: must be an integer in [0, 2**32)"),
    ("out a file", lambda t, cf: ["--out", cf()], "is a file, not a folder"),
    ("out not writable", lambda t, cf: ["--out", "/proc/seqnorm-jax-test/run"],
     "/proc/seqnorm-jax-test/run"),
    ("bn momentum 2", lambda t, cf: ["--norm", "bn:momentum=2"],
     "BatchNorm: momentum must be in [0, 1]"),
    ("bn epsilon -1", lambda t, cf: ["--norm", "bn:epsilon=-1"],
     "BatchNorm: epsilon must be a positive finite number, got -1.0"),
    ("b2 1.5", lambda t, cf: ["--b2", "1.5"], "TrainConfig.b2=1.5: must lie in [0, 1)"),
    ("lr inf", lambda t, cf: ["--lr", "inf"], "TrainConfig.lr=inf: must be a finite number"),
    ("momentum -5", lambda t, cf: ["--momentum", "-5"],
     "TrainConfig.momentum=-5.0: must lie in [0, 1)"),
    ("example weight 1.5", lambda t, cf: ["--example-weight", "1.5"],
     "TrainConfig: example_weight must be in [0, 1]"),
    ("ghost groups vs batch", lambda t, cf: ["--norm", "ghost:batch_groups=7"],
     "TrainConfig.norm (--norm)='ghost:batch_groups=7' does not fit this run"),
    ("groups vs width", lambda t, cf: ["--norm", "gn:num_groups=5"],
     "TrainConfig.norm (--norm)='gn:num_groups=5' does not fit this run"),
]


@pytest.mark.parametrize("case, argv, needle", BAD_SETTINGS, ids=[c[0] for c in BAD_SETTINGS])
def test_bad_train_settings_one_error_line_before_any_work(case, argv, needle, tmp_path,
                                                           config_file, capsys):
    extra = argv(tmp_path, config_file)
    out = [] if "--out" in extra else ["--out", str(tmp_path / "o")]
    code, _, err = run(capsys, ["train", *TINY, *out, *extra])
    assert code == 2, err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()  # nothing created


def test_compare_checks_every_norm_before_training(tmp_path, capsys):
    out = tmp_path / "cmp"
    code, _, err = run(capsys, ["compare", *TINY, "--norms", "bn,ghost:batch_groups=7",
                                "--seeds", "0,", "--epochs", "1", "--out", str(out)])
    assert code == 2 and err.count("\n") == 1, err
    assert "--norms: 'ghost:batch_groups=7' does not fit this run" in err
    assert not (out / "runs").exists()  # bn was not trained first


def test_bad_experiment_inputs(tmp_path, capsys):
    code, _, err = run(capsys, ["experiment", str(tmp_path)])
    assert code == 2 and "is a folder; give one JSON file" in err, err
    src = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs",
                       "002_ghost_batch_size_sweep.json")
    data = json.loads(open(src).read())
    data["smoke"]["base"]["lr"] = "fast"
    path = tmp_path / "002_ghost_batch_size_sweep.json"
    path.write_text(json.dumps(data))
    code, _, err = run(capsys, ["experiment", str(path), "--scale", "smoke",
                                "--out", str(tmp_path / "e")])
    assert code == 2 and err.count("\n") == 1, err
    assert "TrainConfig.lr='fast': must be a number" in err


def test_tune_checks_norm_fields_before_any_work(tmp_path, capsys):
    code, _, err = run(capsys, ["tune", *TINY, "--norm-fields", "momentum=2", "--seeds", "0,",
                                "--batch-groups", "1,2", "--channel-groups", "1",
                                "--out", str(tmp_path / "t")])
    assert code == 2 and err.count("\n") == 1, err
    assert "norm_fields='momentum=2'" in err and "momentum must be in [0, 1]" in err
    assert not (tmp_path / "t").exists()


# ------------------------------------------------------------------------- 7. run files

def test_only_process_0_writes_the_run_files(tmp_path, monkeypatch):
    """Process 1 of a multi-process run trains and evaluates but writes nothing into the
    run folder (config.json, metrics, lock): process 0 does."""
    from seqnorm_jax.train import files, loop

    with monkeypatch.context() as m:
        m.setattr(jax, "process_index", lambda: 1)
        assert not files.is_writer()
    assert files.is_writer()
    monkeypatch.setattr(loop, "is_writer", lambda: False)  # what process 1 sees
    out = tmp_path / "run"
    result = Trainer(tiny(), out_dir=out, save_checkpoints=False).fit()
    assert len(result.eval_rows) == 1 and np.isfinite(result.eval_rows[0]["eval_loss"])
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == []


def test_evaluate_on_a_process_without_batches_runs_the_collective_steps(monkeypatch):
    """Process 1 of 2 holds no example of a 1-example source: it still runs the one
    (collective) evaluation step process 0 runs, on a fully masked batch."""
    from seqnorm_jax import data
    from seqnorm_jax.distributed import data_mesh
    from seqnorm_jax.train import evaluate

    source = data.SubsetSource(data.load("digits", "test"), np.array([0]))
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    seen = []

    def step(state, batch, example_weight):  # process 0's example counts once
        seen.append(jax.device_get(batch))
        return {"loss_sum": jnp.float32(0.5), "correct": jnp.float32(1.0),
                "count": jnp.float32(1.0)}

    got = evaluate(None, source, batch_size=4, mesh=data_mesh(jax.devices()[:1]),
                   eval_step=step)
    assert len(seen) == 1
    assert seen[0]["image"].shape == (2, *source.info.image_shape)
    np.testing.assert_array_equal(seen[0]["mask"], [0.0, 0.0])
    assert got == {"eval_loss": 0.5, "eval_accuracy": 1.0, "count": 1.0}


def test_a_gs_run_folder_stays_a_url(tmp_path):
    """out_dir="gs://bucket/run" keeps its scheme: config.json and the metrics go to the
    bucket (here a local folder behind a mocked epath), never to a local "gs:" folder."""
    from etils.epath import testing as epath_testing

    from seqnorm_jax.train.files import check_out_dir
    from seqnorm_jax.train.files import run_path

    root = tmp_path / "buckets"

    def local(path):
        return os.fspath(path).replace("gs://", f"{root}/")

    redirect = {name: (lambda fn, path, *a, **k: fn(local(path), *a, **k))
                for name in ("exists", "isdir", "listdir", "makedirs", "mkdir", "open")}
    with epath_testing.mock_epath(**redirect):
        assert os.fspath(run_path("gs://bucket/run")) == "gs://bucket/run"
        assert check_out_dir("gs://bucket/run", "--out") == "gs://bucket/run"
        trainer = Trainer(tiny(), out_dir="gs://bucket/run", save_checkpoints=False)
        assert trainer.out_dir == "gs://bucket/run"
        result = trainer.fit()
    run_dir = root / "bucket" / "run"
    assert TrainConfig.from_json(run_dir / "config.json") == tiny()
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["kind"] for r in rows] == ["train"] * 5 + ["eval"]  # steps 10, ..., 40, 45
    assert rows[-1]["eval_loss"] == result.eval_rows[-1]["eval_loss"]
    assert not (tmp_path / "gs:").exists() and not os.path.exists("gs:")
