"""Weights & Biases logging behind the metrics writer (``TrainConfig.wandb_project``).

No test reaches W&B's servers: a stand-in ``wandb`` module records what the run asks of
it (``init``'s arguments, each ``log``, ``finish``), and a real training run's W&B points
are compared with its TensorBoard event files read back by TensorBoard's own reader."""

import importlib.machinery
import importlib.util
import json
import types

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from seqnorm_jax._extras import MissingExtraError
from seqnorm_jax.cli import main
from seqnorm_jax.train import TrainConfig, Trainer
from seqnorm_jax.train.files import RUN_FILES, claim_run_folder
from seqnorm_jax.train.metrics import EVENTS_FOLDER, WANDB_FILE, MetricsWriter


class _Run:
    def __init__(self, **init):
        self.init, self.logged, self.finished = init, [], 0

    def log(self, values, step):
        self.logged.append((step, dict(values)))

    def finish(self):
        self.finished += 1


@pytest.fixture
def fake_wandb(monkeypatch):
    """A ``wandb`` module that records its runs, importable and found by ``find_spec``."""
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    module.runs = []

    def init(**kwargs):
        module.runs.append(_Run(**kwargs))
        return module.runs[-1]

    module.init = init
    monkeypatch.setitem(__import__("sys").modules, "wandb", module)
    return module


def _config(**changes):
    return TrainConfig(**{**dict(model="mlp", model_kwargs={"features": [16]}, norm="bn",
                                 dataset="digits", epochs=2, batch_size=32,
                                 eval_batch_size=128, lr=0.1, log_every=8, progress=False,
                                 seed=0), **changes})


def test_training_run_logs_what_tensorboard_shows(tmp_path, fake_wandb):
    config = _config(wandb_project="seqnorm-tests")
    Trainer(config, out_dir=tmp_path).fit()
    (run,) = fake_wandb.runs
    record = json.loads((tmp_path / WANDB_FILE).read_text())
    assert record["project"] == "seqnorm-tests" and len(record["id"]) == 16
    assert run.init == dict(project="seqnorm-tests", id=record["id"], name=tmp_path.name,
                            dir=str(tmp_path), config=config.to_dict(), resume="allow")
    assert run.finished == 1
    events = EventAccumulator(str(tmp_path / EVENTS_FOLDER))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {tag for _, values in run.logged for tag in values} == set(tags)
    for tag in tags:   # the same steps and values (float32 in the event files)
        ours = [(step, values[tag]) for step, values in run.logged if tag in values]
        theirs = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in ours] == [s for s, _ in theirs]
        assert [v for _, v in ours] == pytest.approx([v for _, v in theirs], rel=1e-6)


def test_a_resumed_run_continues_its_wandb_run(tmp_path, fake_wandb):
    row = {"kind": "train", "step": 10, "loss": 1.5}
    first = MetricsWriter(tmp_path, wandb_project="p")
    first.write(row)
    first.close()
    MetricsWriter(tmp_path, resume_step=10, wandb_project="p").close()     # resumed
    MetricsWriter(tmp_path, resume_step=10, wandb_project="q").close()     # another project
    MetricsWriter(tmp_path, wandb_project="q").close()                     # a fresh run
    ids = [r.init["id"] for r in fake_wandb.runs]
    assert [r.init["project"] for r in fake_wandb.runs] == ["p", "p", "q", "q"]
    assert ids[0] == ids[1] and len(set(ids)) == 3     # the same run resumed, new ones else
    assert fake_wandb.runs[0].logged == [(10, {"train/loss": 1.5})]
    assert all(r.finished == 1 for r in fake_wandb.runs)


def test_overwrite_removes_the_wandb_files(tmp_path, fake_wandb):
    MetricsWriter(tmp_path, wandb_project="p").close()
    (tmp_path / "wandb").mkdir()                       # where W&B itself writes
    assert {WANDB_FILE, "wandb"} <= set(RUN_FILES)
    claim_run_folder(tmp_path, resume=False, overwrite=True)
    assert not (tmp_path / WANDB_FILE).exists() and not (tmp_path / "wandb").exists()


def test_wandb_that_cannot_start_is_one_error(tmp_path, fake_wandb):
    def refuse(**kwargs):
        raise RuntimeError("api_key not configured (no-tty)")

    fake_wandb.init = refuse
    with pytest.raises(ValueError, match=r"wandb_project='p'.*RuntimeError: api_key not "
                                         r"configured.*WANDB_MODE=offline"):
        MetricsWriter(tmp_path, wandb_project="p")


def test_without_the_extra_the_run_is_refused_before_any_work(tmp_path, monkeypatch,
                                                              capsys):
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else found(name, *a))
    with pytest.raises(MissingExtraError, match=r'pip install "seqnorm-jax\[wandb\]"'):
        Trainer(_config(wandb_project="p"), out_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    code = main(["train", "--model", "mlp", "--dataset", "digits", "--epochs", "1",
                 "--wandb-project", "p", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "seqnorm-jax[wandb]" in err[0], err


def test_wandb_needs_a_run_folder(fake_wandb):
    with pytest.raises(ValueError, match="wandb_project.*out_dir"):
        Trainer(_config(wandb_project="p"))
