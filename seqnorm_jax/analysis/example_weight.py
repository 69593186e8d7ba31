"""Inference example weighing sweep (paper 002, section 3.1), also for finished runs.

"Four Things" blends each example's own statistics into the running ones at inference,
``mu = (1 - alpha) * M1 + alpha * s1``, and chooses ``alpha`` after training by a line
search on held-out data; it "can be used with any model trained with Batch
Normalization, even retroactively". :func:`example_weight_sweep` evaluates a state at
several ``alpha`` (one compiled evaluation step for all), :func:`sweep_run` does it for a
run directory written by :class:`~seqnorm_jax.train.Trainer` (newest checkpoint),
:func:`best_example_weight` picks the best ``alpha`` and :func:`plot_example_weight`
draws accuracy and loss against ``alpha``.

Pick ``alpha`` on a validation split (``TrainConfig.validation_size`` or
``sweep_run(..., split="validation")``), not on the test set you report.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from jax.sharding import Mesh

from seqnorm_jax.analysis.plots import mean_std, save_figure, two_panel_figure

__all__ = ["best_example_weight", "example_weight_sweep", "plot_example_weight", "sweep_run"]


def _check_weights(example_weights: Sequence[float]) -> list[float]:
    weights = [float(a) for a in np.asarray(example_weights, np.float64).ravel()]
    if not weights:
        raise ValueError("example_weights is empty; give alphas in [0, 1], e.g. "
                         "np.linspace(0, 1, 11).")
    bad = [a for a in weights if not 0.0 <= a <= 1.0]
    if bad:
        raise ValueError(f"example_weights must lie in [0, 1] (0: running statistics, 1: the "
                         f"example's own), got {bad}.")
    return weights


def example_weight_sweep(state, source, example_weights: Sequence[float], *,
                         batch_size: int = 1000, mesh: Mesh | None = None,
                         eval_step=None) -> list[dict[str, float]]:
    """Evaluate ``state`` on ``source`` at each inference example weight ``alpha``.

    Uses :func:`seqnorm_jax.train.evaluate`, which passes ``alpha`` to every seqnorm-jax
    norm layer, with one compiled evaluation step for all alphas.

    Args:
      state: a :class:`~seqnorm_jax.train.TrainState` (replicated on ``mesh`` here).
      source: a random-access data source (``seqnorm_jax.data.load``).
      example_weights: the alphas, each in ``[0, 1]``.
      batch_size: evaluation batch size.
      mesh: the data mesh (default: all devices).
      eval_step: a compiled :func:`~seqnorm_jax.train.jit_eval_step` for ``mesh`` to reuse.

    Returns:
      One row per alpha, in the given order: ``{"example_weight", "eval_loss",
      "eval_accuracy"}``.
    """
    from seqnorm_jax.distributed import data_mesh, replicate
    from seqnorm_jax.train import evaluate, jit_eval_step

    weights = _check_weights(example_weights)
    mesh = data_mesh() if mesh is None else mesh
    eval_step = jit_eval_step(mesh) if eval_step is None else eval_step
    state = replicate(state, mesh)
    rows = []
    for alpha in weights:
        m = evaluate(state, source, batch_size=batch_size, example_weight=alpha, mesh=mesh,
                     eval_step=eval_step)
        rows.append({"example_weight": alpha, "eval_loss": m["eval_loss"],
                     "eval_accuracy": m["eval_accuracy"]})
    return rows


def sweep_run(run_dir: str | os.PathLike, example_weights: Sequence[float], *,
              split: str | None = None, source=None, step: int | None = None,
              batch_size: int | None = None) -> list[dict[str, float]]:
    """Retroactive :func:`example_weight_sweep` of a finished ``Trainer`` run.

    Reads ``run_dir/config.json``, rebuilds the model, optimizer and data of the run
    (:func:`seqnorm_jax.train.load_sources`, ``Trainer.init_state``), restores the newest
    Orbax checkpoint of ``run_dir/checkpoints`` (or ``step``) and sweeps.

    Args:
      run_dir: the run's ``out_dir`` (written with checkpoints on).
      example_weights: the alphas.
      split: evaluate this split of the run's dataset (e.g. ``"validation"``,
        ``"test"``); default: the run's own evaluation source.
      source: evaluate this data source instead (overrides ``split``).
      step: the checkpoint step (default: the newest).
      batch_size: evaluation batch size (default: the run's ``eval_batch_size``).

    Returns:
      The rows of :func:`example_weight_sweep`.

    Raises:
      FileNotFoundError: no ``config.json`` or no checkpoint in ``run_dir``.
      ValueError: both ``split`` and ``source`` given.
    """
    from seqnorm_jax import data
    from seqnorm_jax.train import Checkpointer, TrainConfig, Trainer, load_sources
    from seqnorm_jax.train.files import run_path

    shown = os.fspath(run_dir)
    if split is not None and source is not None:
        raise ValueError("sweep_run: give split or source, not both.")
    run_dir = run_path(run_dir)  # a local folder or a URL (gs://bucket/run)
    config_path = run_dir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"sweep_run: no config.json in {shown!r}; pass the out_dir of a "
                                "Trainer run.")
    ckpt_dir = run_dir / "checkpoints"
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"sweep_run: no checkpoints/ in {shown!r}; train with "
                                "save_checkpoints=True.")
    config = TrainConfig.from_json(config_path)
    train_src, eval_src = load_sources(config)
    if source is None and split is not None:
        kwargs = dict(data_dir=config.data_dir, source=config.data_source, seed=config.seed)
        if config.validation_size:
            kwargs["validation_size"] = config.validation_size
        source = data.load(config.dataset, split, **kwargs)
    source = eval_src if source is None else source
    trainer = Trainer(config.replace(progress=False), train_source=train_src,
                      eval_source=eval_src, save_checkpoints=False)
    checkpointer = Checkpointer(ckpt_dir, keep=config.keep_checkpoints)
    try:
        state, _ = checkpointer.restore(trainer.init_state(), step=step)
    finally:
        checkpointer.close()
    return example_weight_sweep(
        state, source, example_weights,
        batch_size=config.eval_batch_size if batch_size is None else batch_size,
        mesh=trainer.mesh, eval_step=trainer.eval_step)


def best_example_weight(rows: Sequence[Mapping[str, Any]], metric: str = "eval_accuracy",
                        *, mode: str | None = None) -> float:
    """The alpha of the best row (ties: the smallest alpha).

    Args:
      rows: rows of :func:`example_weight_sweep`.
      metric: the column to optimise.
      mode: ``"max"`` or ``"min"``; default ``"min"`` for metrics named ``*loss*``,
        else ``"max"``.

    Returns:
      The best ``example_weight``.
    """
    if not rows:
        raise ValueError("best_example_weight: rows is empty; run example_weight_sweep first.")
    if metric not in rows[0]:
        raise ValueError(f"best_example_weight: metric {metric!r} is not a column; choose one "
                         f"of {sorted(k for k in rows[0] if k != 'example_weight')}.")
    mode = mode or ("min" if "loss" in metric else "max")
    if mode not in ("min", "max"):
        raise ValueError(f"best_example_weight: mode must be 'min' or 'max', got {mode!r}.")
    sign = 1.0 if mode == "max" else -1.0
    best = min(rows, key=lambda r: (-sign * float(r[metric]), float(r["example_weight"])))
    return float(best["example_weight"])


def _as_runs(runs: Any) -> list[list[Mapping[str, Any]]]:
    runs = list(runs)
    if runs and isinstance(runs[0], Mapping):
        return [runs]
    return [list(r) for r in runs]


def plot_example_weight(curves: Mapping[str, Any], path: str | os.PathLike,
                        title: str | None = None) -> str:
    """Accuracy and loss against the inference example weight, mean +- std over seeds.

    Args:
      curves: ``{label: runs}``, each a list of sweeps (one per seed, the same alphas)
        or a single sweep's rows.
      path: the PNG to write.
      title: figure title.

    Returns:
      ``path``. The best alpha of each label's mean curve is marked.
    """
    fig, axes, colors = two_panel_figure(curves, "plot_example_weight")
    for label, runs in curves.items():
        runs = _as_runs(runs)
        alphas = [float(r["example_weight"]) for r in runs[0]]
        for run in runs[1:]:
            if [float(r["example_weight"]) for r in run] != alphas:
                raise ValueError(f"plot_example_weight: the runs of {label!r} sweep different "
                                 "alphas; sweep the same example_weights for every seed.")
        for ax, key, better in ((axes[0], "eval_accuracy", np.argmax),
                                (axes[1], "eval_loss", np.argmin)):
            mean, std = mean_std([[float(r[key]) for r in run] for run in runs])
            (line,) = ax.plot(alphas, mean, marker="o", ms=3, color=colors[label],
                              label=f"{label} ({len(runs)} run{'s' if len(runs) > 1 else ''})")
            ax.fill_between(alphas, mean - std, mean + std, color=line.get_color(), alpha=0.2)
            i = int(better(mean))
            ax.plot([alphas[i]], [mean[i]], marker="*", ms=11, color=line.get_color())
    axes[0].set(xlabel="inference example weight alpha", ylabel="accuracy",
                title="accuracy vs alpha (star: best)")
    axes[1].set(xlabel="inference example weight alpha", ylabel="cross-entropy",
                title="loss vs alpha (star: best)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return save_figure(fig, path, title=title)
