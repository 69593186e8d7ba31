"""Loss landscape and gradient predictiveness along the gradient (Santurkar et al. 2018).

At a training step with parameters ``theta`` and mini-batch ``B``, let ``g`` be the
gradient of the mean cross-entropy on ``B`` (training mode: batch statistics). For every
step size ``eta`` of a list, the probe evaluates

* the *loss landscape*: ``L(theta - eta * g)`` on the same batch (papers 000 and 004
  record its min and max over the step sizes at every step and plot the band over
  training; a narrow, low band is a smooth landscape);
* the *gradient predictiveness* (paper 004): ``||grad L(theta) - grad L(theta - eta * g)||_2``,
  the l2 distance between the gradients over all parameters (a narrow, low band means
  the gradient stays predictive along the step).

Paper 000 (Appendix B.2) uses ``eta`` in ``0.1, 0.2, ..., 0.8`` on MNIST (SimpleNet, batch
512) and four one-cycle rates on CIFAR-10. The running statistics are never updated by a
probe: each forward pass uses the batch's statistics and its ``batch_stats`` update is
discarded. The per-step ``"noise"``/``"dropout"`` rngs are those of
:func:`seqnorm_jax.train.step_rngs`, the same for every point, so ``NoisyBatchNorm``
models are probed with the noise of the step.

>>> rec = LandscapeRecorder(every=10)
>>> Trainer(config, step_hooks=[rec]).fit()
>>> summarize_landscape([rec.rows])["landscape_width"]
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from seqnorm_jax import checks
from seqnorm_jax.analysis._recorder import DeviceRecorder
from seqnorm_jax.analysis.plots import (
    mean_std,
    moving_average,
    save_figure,
    two_panel_figure,
)
from seqnorm_jax.train.state import step_rngs
from seqnorm_jax.train.step import apply_model, cross_entropy_loss

__all__ = [
    "PAPER_STEP_SIZES",
    "LandscapeRecorder",
    "landscape_probe",
    "plot_landscape",
    "summarize_landscape",
]

# Paper 000, Appendix B.2 (MNIST): 8 learning rates 0.1, 0.2, ..., 0.8.
PAPER_STEP_SIZES: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
"""Paper 000's step sizes for the loss-landscape probe (Appendix B.2, MNIST)."""


def _loss_fn(state, rngs, batch):
    """The mean cross-entropy on ``batch`` in training mode, as a function of the params."""

    def loss(params):
        # the batch_stats update is computed and discarded (running stats unchanged)
        logits, _ = apply_model(state, batch["image"], train=True, params=params, rngs=rngs)
        return cross_entropy_loss(logits, batch["label"]).mean()

    return loss


def _probe(state, batch, step_sizes, map_batch_size):
    loss = _loss_fn(state, step_rngs(state), batch)
    value_and_grad = jax.value_and_grad(loss)
    loss0, grad0 = value_and_grad(state.params)

    def at(eta):
        moved = jax.tree_util.tree_map(lambda p, g: (p - eta.astype(p.dtype) * g).astype(p.dtype),
                                       state.params, grad0)
        value, grad = value_and_grad(moved)
        distance = optax.tree.norm(jax.tree_util.tree_map(jnp.subtract, grad0, grad))
        return value.astype(jnp.float32), distance

    losses, distances = jax.lax.map(at, step_sizes, batch_size=map_batch_size)
    return {"loss0": loss0.astype(jnp.float32), "grad_norm": optax.tree.norm(grad0),
            "loss": losses, "grad_distance": distances}


_probe_jit = jax.jit(_probe, static_argnums=(3,))


def landscape_probe(state, batch: Mapping[str, jax.Array], step_sizes: Sequence[float] | jax.Array,
                    *, map_batch_size: int | None = None) -> dict[str, jax.Array]:
    """Loss and gradient along the negative gradient at ``state.params`` on ``batch``.

    One compiled function per model and batch shape (``step_sizes`` is a traced array;
    the step sizes are visited one after the other with ``jax.lax.map``, so memory stays
    that of two gradient computations whatever their number).

    Args:
      state: a :class:`seqnorm_jax.train.TrainState` (``apply_fn(variables, x, train=,
        rngs=, mutable=)``); its running statistics are read, never changed.
      batch: ``{"image", "label"}`` (possibly sharded over devices).
      step_sizes: the ``eta`` values, shape ``(E,)``.
      map_batch_size: evaluate this many step sizes at once (``jax.lax.map``'s
        ``batch_size``: faster, more memory); ``None``: one at a time.

    Returns:
      ``{"loss0": (), "grad_norm": (), "loss": (E,), "grad_distance": (E,)}`` (float32
      jax arrays): the loss at ``theta`` and the l2 norm of its gradient ``g``; the loss
      at ``theta - eta * g``; and ``||g - grad(theta - eta * g)||_2`` over all parameters.

    Raises:
      ValueError: ``step_sizes`` is empty or not one-dimensional, or ``batch`` lacks
        ``"image"``/``"label"``.
    """
    eta = jnp.asarray(step_sizes, jnp.float32)
    if eta.ndim != 1 or eta.shape[0] == 0:
        raise ValueError(f"step_sizes must be a non-empty 1-D list of step sizes, got shape "
                         f"{tuple(eta.shape)}; e.g. step_sizes=(0.1, 0.2, 0.4).")
    missing = {"image", "label"} - set(batch)
    if missing:
        raise ValueError(f"batch lacks {sorted(missing)}; pass {{'image': x, 'label': y}}.")
    batch = {"image": batch["image"], "label": batch["label"]}
    return _probe_jit(state, batch, eta, map_batch_size)


def _row(step: int, out: Mapping[str, Any]) -> dict[str, Any]:
    loss = [float(v) for v in np.asarray(out["loss"]).ravel()]
    dist = [float(v) for v in np.asarray(out["grad_distance"]).ravel()]
    row = {"step": int(step), "loss0": float(out["loss0"]), "grad_norm": float(out["grad_norm"]),
           "loss": loss, "grad_distance": dist,
           "loss_min": min(loss), "loss_max": max(loss),
           "grad_distance_min": min(dist), "grad_distance_max": max(dist)}
    if "step_sizes" in out:
        row["step_sizes"] = [float(v) for v in np.asarray(out["step_sizes"]).ravel()]
    return row


class LandscapeRecorder(DeviceRecorder):
    """A :class:`~seqnorm_jax.train.Trainer` step hook that probes the landscape.

    Called as ``hook(state, batch, step)`` before each optimizer step, it runs
    :func:`landscape_probe` when ``step % every == 0``. The results stay on the device
    and are fetched in groups of ``fetch_every`` probes (and whenever :attr:`rows` is
    read, and at each epoch end), so the hook does not wait for the device at every
    step.

    Args:
      step_sizes: the ``eta`` values (default: paper 000's MNIST values 0.1 ... 0.8).
      every: probe every this many steps.
      fetch_every: fetch pending results to the host after this many probes.
      map_batch_size: see :func:`landscape_probe`.
      lr_schedule: if given (a function of the step, e.g. an optax schedule), the step
        sizes are relative to the learning rate of the step: ``eta * lr_schedule(step)``
        (paper 000's ResNet-56 study probes 0.5x ... 2x the one-cycle rate). The rows then
        hold the absolute step sizes in ``step_sizes``.

    Attributes:
      rows: one dict per probed step: ``step``, ``loss0``, ``grad_norm``, ``loss`` and
        ``grad_distance`` (lists over the step sizes), ``loss_min``, ``loss_max``,
        ``grad_distance_min``, ``grad_distance_max`` (python floats).
    """

    def __init__(self, step_sizes: Sequence[float] = PAPER_STEP_SIZES, every: int = 1, *,
                 fetch_every: int = 32, map_batch_size: int | None = None,
                 lr_schedule: Any = None):
        for name, value in (("every", every), ("fetch_every", fetch_every)):
            checks.positive_int(value, name, "LandscapeRecorder")
        self.step_sizes = tuple(float(s) for s in np.asarray(step_sizes, np.float64).ravel())
        if not self.step_sizes:
            raise ValueError("LandscapeRecorder: step_sizes is empty; give at least one, e.g. "
                             "(0.1, 0.2, 0.4).")
        self.every = every
        super().__init__(fetch_every)
        self.map_batch_size = map_batch_size
        self.lr_schedule = lr_schedule
        self._eta = None
        self._rows: list[dict[str, Any]] = []

    def __call__(self, state, batch: Mapping[str, jax.Array], step: int) -> None:
        """Probe at ``step`` if it is a multiple of ``every`` (the Trainer hook protocol)."""
        step = int(step)
        if step % self.every:
            return
        if self._eta is None:
            self._eta = jnp.asarray(self.step_sizes, jnp.float32)
        eta = self._eta
        if self.lr_schedule is not None:
            eta = eta * jnp.asarray(self.lr_schedule(step), jnp.float32)
        out = landscape_probe(state, batch, eta, map_batch_size=self.map_batch_size)
        self._push(step, {**out, "step_sizes": eta})

    def _store(self, step: int, out) -> None:
        self._rows.append(_row(step, out))

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The rows so far (fetching pending results first)."""
        self.flush()
        return self._rows

    def to_dict(self) -> dict[str, Any]:
        """``{"step_sizes", "every", "rows"}``: JSON-ready."""
        return {"step_sizes": list(self.step_sizes), "every": self.every, "rows": self.rows}


# ----------------------------------------------------------------------------- summaries

def _as_rows(run: Any) -> list[dict[str, Any]]:
    """Rows of one run: a list of rows, a :class:`LandscapeRecorder` or its ``to_dict()``."""
    if isinstance(run, LandscapeRecorder):
        return run.rows
    if isinstance(run, Mapping) and "rows" in run:
        return list(run["rows"])
    return list(run)


def _as_runs(runs: Any) -> list[list[dict[str, Any]]]:
    """A list of runs from one run or several (see :func:`_as_rows`)."""
    if isinstance(runs, (LandscapeRecorder, Mapping)):
        return [_as_rows(runs)]
    runs = list(runs)
    if runs and isinstance(runs[0], Mapping) and "step" in runs[0]:
        return [runs]  # a single run's rows
    return [_as_rows(r) for r in runs]


def _run_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    def col(key: str) -> np.ndarray:
        return np.asarray([r[key] for r in rows], np.float64)

    width = col("loss_max") - col("loss_min")
    gwidth = col("grad_distance_max") - col("grad_distance_min")
    return {
        "landscape_width": float(width.mean()),
        "landscape_width_max": float(width.max()),
        "grad_pred_width": float(gwidth.mean()),
        "grad_pred_width_max": float(gwidth.max()),
        "loss_max": float(col("loss_max").mean()),
        "grad_distance_max": float(col("grad_distance_max").mean()),
    }


def summarize_landscape(rows_per_run: Any) -> dict[str, float]:
    """Scalar summaries of probed runs, for tables.

    Per run, over its probed steps: ``landscape_width`` = mean of ``loss_max -
    loss_min`` and ``landscape_width_max`` = its largest value; ``grad_pred_width`` /
    ``grad_pred_width_max`` the same for ``grad_distance_max - grad_distance_min``;
    ``loss_max`` and ``grad_distance_max``, the means of the band tops (paper 004 reads
    lower values as better too). Each is then averaged over the runs (seeds), with the
    sample standard deviation across runs in ``<name>_std`` (0 for one run).
    Non-finite losses (a step size that diverged) propagate as ``inf``/``nan``.

    Args:
      rows_per_run: a list of runs, each a list of rows (:attr:`LandscapeRecorder.rows`),
        a recorder, or its ``to_dict()``; a single run's rows are accepted too.

    Returns:
      ``{"runs", "steps"`` (probed steps per run, the smallest), and for each summary
      ``name`` and ``name_std}``.

    Raises:
      ValueError: no run, or a run without rows.
    """
    runs = _as_runs(rows_per_run)
    if not runs or any(not r for r in runs):
        raise ValueError("summarize_landscape: every run needs at least one probed row; "
                         "check LandscapeRecorder(every=...) against the number of steps.")
    per_run = [_run_summary(r) for r in runs]
    out: dict[str, float] = {"runs": len(runs), "steps": min(len(r) for r in runs)}
    for key in per_run[0]:
        mean, std = mean_std([[s[key]] for s in per_run])
        out[key] = float(mean[0])
        out[f"{key}_std"] = float(std[0])
    return out


# ----------------------------------------------------------------------------- plot

def _band(runs: list[list[dict[str, Any]]], lo: str, hi: str, smooth: int):
    """Steps common to all runs, and the seed-averaged, smoothed band ``(lo, hi)``."""
    common = sorted(set.intersection(*(set(r["step"] for r in run) for run in runs)))
    by_step = [{r["step"]: r for r in run} for run in runs]
    low = [[d[s][lo] for s in common] for d in by_step]
    high = [[d[s][hi] for s in common] for d in by_step]
    return (np.asarray(common), moving_average(mean_std(low)[0], smooth),
            moving_average(mean_std(high)[0], smooth))


def plot_landscape(curves: Mapping[str, Any], path: str | os.PathLike, *,
                   title: str | None = None, smooth: int = 1, log_scale: bool = False) -> str:
    """Loss landscape and gradient predictiveness bands over training, one colour per label.

    Left: the band between ``loss_min`` and ``loss_max`` over the step sizes; right: the
    band of ``grad_distance`` (papers 000 Fig. 2, 004 Fig. 6). With several runs per
    label, the band edges are averaged over the runs at the steps they share.

    Args:
      curves: ``{label: runs}``, each a list of runs (rows lists, recorders or their
        ``to_dict()``) or a single run.
      path: the PNG to write.
      title: figure title.
      smooth: trailing moving-average window over probed steps (1: none).
      log_scale: log y axes.

    Returns:
      ``path``.
    """
    fig, axes, colors = two_panel_figure(curves, "plot_landscape")
    for label, runs in curves.items():
        runs = _as_runs(runs)
        if not runs or any(not r for r in runs):
            raise ValueError(f"plot_landscape: label {label!r} has a run without rows.")
        for ax, (lo, hi) in zip(axes, (("loss_min", "loss_max"),
                                       ("grad_distance_min", "grad_distance_max"))):
            steps, low, high = _band(runs, lo, hi, smooth)
            ax.fill_between(steps, low, high, color=colors[label], alpha=0.35, linewidth=0,
                            label=f"{label} ({len(runs)} run{'s' if len(runs) > 1 else ''})")
            ax.plot(steps, low, color=colors[label], lw=0.6)
            ax.plot(steps, high, color=colors[label], lw=0.6)
    axes[0].set(xlabel="training step", ylabel="loss at theta - eta g",
                title="loss landscape (min-max over step sizes)")
    axes[1].set(xlabel="training step", ylabel="||grad(theta) - grad(theta - eta g)||",
                title="gradient predictiveness (min-max)")
    for ax in axes:
        ax.grid(alpha=0.3)
        if log_scale:
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    return save_figure(fig, path, title=title)
