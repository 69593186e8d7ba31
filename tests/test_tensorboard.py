"""TensorBoard event files next to metrics.jsonl, read back with TensorBoard's own reader
(``EventAccumulator``): the scalars of every row, a resumed run shown as one run, and a
real training run whose events match its metrics.jsonl."""

import math

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from seqnorm_jax.train import TrainConfig, Trainer
from seqnorm_jax.train.files import RunFileError
from seqnorm_jax.train.metrics import (EVENTS_FOLDER, SCALAR_TAGS, MetricsWriter,
                                       read_jsonl)


def _scalars(folder):
    acc = EventAccumulator(str(folder / EVENTS_FOLDER))
    acc.Reload()
    return {tag: [(e.step, e.value, e.wall_time) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"]}


def _train(step, loss, wall):
    return {"kind": "train", "step": step, "epoch": 0, "loss": loss, "accuracy": 0.5,
            "lr": 0.1, "images_per_sec": 1000.0, "wall_time": wall}


def test_rows_become_scalars(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.write(_train(10, 2.25, 1.0e9))
    writer.write(_train(20, math.nan, 1.0e9 + 5))       # a diverged step's loss
    writer.write({"kind": "eval", "step": 20, "epoch": 0, "loss": 2.0, "accuracy": 0.375,
                  "eval_loss": 1.75, "eval_accuracy": 0.625, "example_weight": 0.25,
                  "epoch_time": 12.5, "wall_time": 1.0e9 + 6})
    writer.close()
    got = _scalars(tmp_path)
    assert set(got) == set(SCALAR_TAGS["train"].values()) | set(SCALAR_TAGS["eval"].values())
    assert got["train/loss"][0] == (10, 2.25, 1.0e9)
    assert got["train/loss"][1][0] == 20 and math.isnan(got["train/loss"][1][1])
    assert got["train/accuracy"] == [(10, 0.5, 1.0e9), (20, 0.5, 1.0e9 + 5)]
    assert got["train/lr"][0][:2] == (10, pytest.approx(0.1))
    assert got["eval/accuracy"] == [(20, 0.625, 1.0e9 + 6)]
    assert got["eval/example_weight"] == [(20, 0.25, 1.0e9 + 6)]
    assert got["epoch/train_loss"] == [(20, 2.0, 1.0e9 + 6)]
    assert got["epoch/seconds"] == [(20, 12.5, 1.0e9 + 6)]
    assert math.isnan(read_jsonl(tmp_path / "metrics.jsonl")[1]["loss"])


def test_event_file_write_error_names_the_folder(tmp_path):
    # the run folder's tensorboard/ cannot be created: one RunFileError naming it
    (tmp_path / EVENTS_FOLDER).write_text("a file where the folder goes")
    with pytest.raises(RunFileError, match=f"^{tmp_path / EVENTS_FOLDER}: "):
        MetricsWriter(tmp_path)


def test_resumed_run_shows_as_one_run(tmp_path):
    first = MetricsWriter(tmp_path)
    for step in (10, 20, 30, 40):                         # the interrupted run logged 30, 40
        first.write(_train(step, float(step), 1.0e9 + step))
    first.close()
    second = MetricsWriter(tmp_path, resume_step=20)     # resumed from the step-20 checkpoint
    for step in (30, 40, 50):
        second.write(_train(step, float(step) + 0.5, 2.0e9 + step))
    second.close()
    got = _scalars(tmp_path)["train/loss"]
    assert [(s, v) for s, v, _ in got] == [(10, 10.0), (20, 20.0), (30, 30.5), (40, 40.5),
                                           (50, 50.5)]


def test_training_run_events_match_metrics_jsonl(tmp_path):
    config = TrainConfig(model="mlp", model_kwargs={"features": [16]}, norm="bn",
                         dataset="digits", epochs=2, batch_size=32, eval_batch_size=128,
                         lr=0.1, log_every=8, progress=False, seed=0)
    Trainer(config, out_dir=tmp_path).fit()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    got = _scalars(tmp_path)
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert len(train) >= 4 and len(evals) == 2
    assert [s for s, _, _ in got["train/loss"]] == [r["step"] for r in train]
    np.testing.assert_allclose([v for _, v, _ in got["train/loss"]],
                               [r["loss"] for r in train], rtol=1e-6)
    np.testing.assert_allclose([v for _, v, _ in got["eval/accuracy"]],
                               [r["eval_accuracy"] for r in evals], rtol=1e-6)
    np.testing.assert_allclose([w for _, _, w in got["eval/loss"]],
                               [r["wall_time"] for r in evals], rtol=0, atol=1e-3)
