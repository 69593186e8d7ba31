"""Statistics fluctuation over training steps (paper 003, section 4.6).

Paper 003 trains a four-layer, 128-unit MLP (``get_model("mlp4")``) on MNIST at batch 128
and 4 and, for each layer's input, records over the last 200 training steps

* the per-neuron batch statistics ``BN_mean``, ``BN_std`` (per channel over the batch and
  spatial axes), and
* the pooled ``EN_mean``, ``EN_std`` (over the batch, spatial axes *and* channels: one
  value per layer),

then reports the standard deviation over steps of each (its Fig. 6) and plots a few
neurons' trajectories (Fig. 7). Its finding: ``BN_std`` fluctuates most, dramatically at
batch 4, while the pooled ``EN_std`` stays steady.

:class:`StatisticsRecorder` is a :class:`~seqnorm_jax.train.Trainer` step hook that
records these statistics at the pre-update parameters of each step (training mode,
running statistics untouched), with :mod:`seqnorm_jax.stats`: standard deviations are
``sqrt`` of the biased variances, without ``eps``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from seqnorm_jax import checks, stats
from seqnorm_jax.analysis._recorder import DeviceRecorder
from seqnorm_jax.analysis.output_range import resolve_layer
from seqnorm_jax.analysis.plots import label_colors, pyplot, save_figure
from seqnorm_jax.registry import feature_axes
from seqnorm_jax.train.norm_calls import NormCallInterceptor, module_path, norm_calls
from seqnorm_jax.train.state import step_rngs
from seqnorm_jax.train.step import apply_model

__all__ = ["STAT_NAMES", "StatisticsRecorder", "input_statistics", "plot_fluctuation"]

STAT_NAMES = ("bn_mean", "bn_std", "en_mean", "en_std")
"""The statistics ``StatisticsRecorder`` follows: BN and EN (pooled) mean and std."""


def _to_nc(x: jax.Array, feats: tuple[int, ...]) -> jax.Array:
    """Move the feature axes of ``x`` last and merge them: ``(N, ..., C)`` channels-last."""
    rest = [i for i in range(x.ndim) if i not in feats]
    x = jnp.transpose(x, rest + list(feats))
    return x.reshape(x.shape[:len(rest)] + (-1,))


def _layer_statistics(x: jax.Array, feats: tuple[int, ...]) -> dict[str, jax.Array]:
    """BN (per channel over batch and spatial) and EN (all pooled) mean and std of ``x``."""
    m = stats.sample_moments(_to_nc(x, feats), use_fast_variance=False)  # (N, C)
    bn = stats.merge(m, 0, keepdims=False)  # (C,)
    en = stats.merge(m, (0, 1), keepdims=False)  # ()
    return {"bn_mean": bn.mean, "bn_std": jnp.sqrt(bn.var),
            "en_mean": en.mean, "en_std": jnp.sqrt(en.var)}


def _statistics(state, batch, paths: tuple[str, ...] | None, neurons: int | None):
    found: dict[str, dict[str, jax.Array]] = {}

    def grab(module, args, kwargs, out):
        path = module_path(module)
        if path in found or (paths is not None and path not in paths):
            return
        x = args[0]
        st = _layer_statistics(x, feature_axes(module, x.ndim))
        if neurons is not None:
            st["bn_mean"], st["bn_std"] = st["bn_mean"][:neurons], st["bn_std"][:neurons]
        found[path] = st

    with nn.intercept_methods(NormCallInterceptor(grab)):
        apply_model(state, batch["image"], train=True, rngs=step_rngs(state))
    return found


_statistics_jit = jax.jit(_statistics, static_argnums=(2, 3))


def input_statistics(state, batch: Mapping[str, jax.Array], layers: Sequence[str] | None = None,
                     *, neurons: int | None = None) -> dict[str, dict[str, jax.Array]]:
    """BN and EN statistics of the inputs of the norm layers, in training mode.

    Args:
      state: a :class:`~seqnorm_jax.train.TrainState` (its running statistics are read,
        never changed; the ``"noise"``/``"dropout"`` rngs come from ``step_rngs``).
      batch: ``{"image", ...}``.
      layers: module paths to keep (default: every norm layer).
      neurons: keep the per-neuron statistics of the first ``neurons`` channels only.

    Returns:
      ``{path: {"bn_mean": (C,), "bn_std": (C,), "en_mean": (), "en_std": ()}}`` (jax
      arrays, statistics dtype: float32 or wider).
    """
    paths = None if layers is None else tuple(layers)
    return _statistics_jit(state, {"image": batch["image"]}, paths, neurons)


class StatisticsRecorder(DeviceRecorder):
    """Records the BN/EN statistics of the norm layers' inputs over the last training steps.

    A Trainer step hook (``hook(state, batch, step)``, before each optimizer step). With
    ``total_steps`` it records the steps ``step >= total_steps - last_steps``; without, it
    records every step and keeps the newest ``last_steps`` (all of them when
    ``last_steps`` is None), so at the end it holds the run's last steps either way.
    Results stay on the device and are fetched in groups of ``fetch_every``.

    Args:
      last_steps: the window length (paper 003: 200).
      total_steps: the run's total number of steps (``Trainer.total_steps``).
      layers: paths or indices (into the model's norm layers, in call order) of the
        layers to record; default all.
      neurons: keep the per-neuron statistics of the first ``neurons`` channels only
        (memory); default all.
      fetch_every: fetch pending results after this many recorded steps.

    Attributes:
      layers: the recorded paths (known after the first recorded step).
    """

    def __init__(self, last_steps: int | None = 200, total_steps: int | None = None,
                 layers: Sequence[int | str] | None = None, neurons: int | None = None, *,
                 fetch_every: int = 32):
        for name, value in (("last_steps", last_steps), ("total_steps", total_steps),
                            ("neurons", neurons)):
            if value is not None:
                checks.positive_int(value, name, "StatisticsRecorder",
                                    fix="pass a positive int or None.")
        if total_steps is not None and last_steps is None:
            raise ValueError("StatisticsRecorder: give last_steps with total_steps (the window "
                             "is the last last_steps of total_steps).")
        self.last_steps = last_steps
        self.total_steps = total_steps
        self.neurons = neurons
        super().__init__(fetch_every)
        self._requested = None if layers is None else list(layers)
        self.layers: list[str] | None = None
        self._steps: list[int] = []
        self._host: dict[str, dict[str, list]] = {}

    # ------------------------------------------------------------------ recording
    def records(self, step: int) -> bool:
        """Whether ``step`` falls in the recorded window."""
        if self.total_steps is None:
            return True
        return step >= self.total_steps - self.last_steps

    def _resolve_layers(self, state, batch) -> None:
        x = jax.ShapeDtypeStruct(batch["image"].shape, batch["image"].dtype)
        paths = [c.path for c in norm_calls(
            lambda s, a: apply_model(s, a, train=False), state, x)]
        if self._requested is None:
            if not paths:
                resolve_layer(paths, -1)  # raises: no norm layer
            self.layers = paths
        else:
            chosen = [resolve_layer(paths, lay) for lay in self._requested]
            self.layers = [p for p in paths if p in chosen]
        self._host = {p: {k: [] for k in STAT_NAMES} for p in self.layers}

    def __call__(self, state, batch: Mapping[str, jax.Array], step: int) -> None:
        """Record the statistics at ``step`` if it is in the window (the hook protocol)."""
        step = int(step)
        if not self.records(step):
            return
        if self.layers is None:
            self._resolve_layers(state, batch)
        out = input_statistics(state, batch, self.layers, neurons=self.neurons)
        self._push(step, out)

    def _store(self, step: int, out) -> None:
        self._steps.append(step)
        for path in self.layers:
            for k in STAT_NAMES:
                self._host[path][k].append(np.asarray(out[path][k], np.float64))

    def _after_flush(self) -> None:
        """Drop steps outside the window (when ``total_steps`` is unknown)."""
        if self.total_steps is None and self.last_steps is not None:
            extra = len(self._steps) - self.last_steps
            if extra > 0:
                del self._steps[:extra]
                for per in self._host.values():
                    for k in STAT_NAMES:
                        del per[k][:extra]

    # ------------------------------------------------------------------ results
    @property
    def steps(self) -> list[int]:
        """The recorded steps (fetching pending results first)."""
        self.flush()
        return self._steps

    @property
    def data(self) -> dict[str, dict[str, np.ndarray]]:
        """``{path: {"bn_mean": (steps, C), "bn_std": (steps, C), "en_mean": (steps,),
        "en_std": (steps,)}}`` (float64 numpy arrays)."""
        self.flush()
        return {path: {k: np.asarray(v, np.float64) for k, v in per.items()}
                for path, per in self._host.items()}

    def summary(self) -> list[dict[str, Any]]:
        """The fluctuation of each statistic, one row per layer.

        Columns: ``layer``, ``channels`` (neurons recorded), ``steps``; for each statistic
        ``s`` of ``bn_mean``, ``bn_std``, ``en_mean``, ``en_std``: ``s_fluct``, the
        standard deviation over the recorded steps (population, ``ddof=0``; per neuron,
        then averaged over neurons for the BN ones: paper 003's Fig. 6 quantity), and
        ``s_rel_fluct``, the same divided by the mean absolute value of the statistic
        (per neuron, then averaged), which compares layers of different scales.
        """
        return _summary(self.steps, self.data)

    def to_dict(self, neurons: int | None = None) -> dict[str, Any]:
        """JSON-ready: ``{"layers", "steps", "last_steps", "total_steps", "stats" (lists),
        "summary"}``; :func:`plot_fluctuation` takes it as it takes the recorder.

        Args:
          neurons: keep the per-neuron trajectories of only the first ``neurons`` neurons
            of each layer (the summary still covers all of them): 200 steps of a
            128-wide layer are otherwise ~1 MB of JSON per layer.
        """
        data = self.data
        out = {"layers": list(self.layers or []), "steps": list(self.steps),
               "last_steps": self.last_steps, "total_steps": self.total_steps,
               "stats": {p: {k: v.tolist() for k, v in per.items()} for p, per in data.items()},
               "summary": _summary(self.steps, data)}
        return out if neurons is None else keep_neurons(out, neurons)


def keep_neurons(recorded: Mapping[str, Any], neurons: int) -> dict[str, Any]:
    """A :meth:`StatisticsRecorder.to_dict` with the trajectories of the first ``neurons``
    neurons per layer only (the per-layer EN statistics and the summary are kept whole)."""
    checks.positive_int(neurons, "neurons", "keep_neurons")
    stats = {p: {k: ([row[:neurons] for row in v] if k.startswith("bn_") else v)
                 for k, v in per.items()} for p, per in recorded["stats"].items()}
    return {**recorded, "stats": stats}


def _summary(steps: Sequence[int], data: Mapping[str, Mapping[str, np.ndarray]]
             ) -> list[dict[str, Any]]:
    rows = []
    for path, per in data.items():
        row: dict[str, Any] = {"layer": path, "channels": int(np.shape(per["bn_mean"])[-1])
                               if np.ndim(per["bn_mean"]) == 2 else 0, "steps": len(steps)}
        for k in STAT_NAMES:
            a = np.asarray(per[k], np.float64)
            if a.shape[0] == 0:
                row[f"{k}_fluct"] = row[f"{k}_rel_fluct"] = float("nan")
                continue
            fluct = a.std(axis=0)
            scale = np.abs(a).mean(axis=0)
            with np.errstate(divide="ignore", invalid="ignore"):
                rel = fluct / scale
            row[f"{k}_fluct"] = float(np.mean(fluct))
            row[f"{k}_rel_fluct"] = float(np.mean(rel))
        rows.append(row)
    return rows


def _as_data(rec: Any) -> tuple[np.ndarray, dict[str, dict[str, np.ndarray]], list[dict]]:
    """``(steps, data, summary)`` from a recorder or its ``to_dict()``."""
    if isinstance(rec, StatisticsRecorder):
        data = rec.data
        return np.asarray(rec.steps), data, _summary(rec.steps, data)
    if isinstance(rec, Mapping) and "stats" in rec:
        data = {p: {k: np.asarray(v, np.float64) for k, v in per.items()}
                for p, per in rec["stats"].items()}
        return np.asarray(rec["steps"]), data, rec.get("summary") or _summary(rec["steps"], data)
    raise ValueError("plot_fluctuation: each value must be a StatisticsRecorder or its "
                     f"to_dict(), got {type(rec).__name__}.")


def plot_fluctuation(recorders: Mapping[str, Any], path: str | os.PathLike, *, neuron: int = 0,
                     title: str | None = None) -> str:
    """Trajectories of one neuron's BN vs the EN statistics per layer, and the fluctuations.

    One row per layer (paper 003, Fig. 7): the mean (left) and the std (right) over the
    recorded steps (counted from the first recorded step of each run, so runs of different
    lengths overlay), the neuron's ``BN`` statistic solid and the layer's pooled ``EN`` one
    dashed, one colour per label. The last row has bar charts of the fluctuation
    summary (std over steps) per layer and label: BN solid, EN hatched (Fig. 6).

    Args:
      recorders: ``{label: StatisticsRecorder or its to_dict()}``.
      path: the PNG to write.
      neuron: the channel whose trajectories are drawn (among the recorded ones).
      title: figure title.

    Returns:
      ``path``.
    """
    if not recorders:
        raise ValueError("plot_fluctuation: recorders is empty; pass {label: recorder}.")
    runs = {label: _as_data(rec) for label, rec in recorders.items()}
    layers = list(dict.fromkeys(p for _, data, _ in runs.values() for p in data))
    if not layers:
        raise ValueError("plot_fluctuation: nothing recorded; check the recorder's window "
                         "(last_steps, total_steps).")
    plt = pyplot()
    fig, axes = plt.subplots(len(layers) + 1, 2, figsize=(11, 2.6 * (len(layers) + 1)),
                             squeeze=False)
    colors = label_colors(list(runs))
    for row, layer in enumerate(layers):
        for col, stat in enumerate(("mean", "std")):
            ax = axes[row, col]
            for label, (steps, data, _) in runs.items():
                if layer not in data or len(steps) == 0:
                    continue
                bn = np.asarray(data[layer][f"bn_{stat}"])
                if neuron >= bn.shape[1]:
                    raise ValueError(f"plot_fluctuation: neuron={neuron} but {label!r} recorded "
                                     f"{bn.shape[1]} neurons of {layer!r}; use a smaller neuron.")
                # runs of different lengths share the axis: steps into the recorded window
                x = np.asarray(steps) - steps[0]
                ax.plot(x, bn[:, neuron], color=colors[label], lw=1,
                        label=f"{label} BN (neuron {neuron})")
                ax.plot(x, data[layer][f"en_{stat}"], color=colors[label], lw=1, ls="--",
                        label=f"{label} EN")
            ax.set_title(f"{layer}: {stat}", fontsize=9)
            ax.grid(alpha=0.3)
            if row == len(layers) - 1:
                ax.set_xlabel("step into the recorded window (its last steps)")
        if row == 0:
            axes[0, 0].legend(fontsize=7)
    width = 0.8 / max(2 * len(runs), 1)
    for col, stat in enumerate(("mean", "std")):
        ax = axes[-1, col]
        for i, (label, (_, _, summary)) in enumerate(runs.items()):
            by_layer = {r["layer"]: r for r in summary}
            for j, kind in enumerate(("bn", "en")):
                vals = [by_layer[lay][f"{kind}_{stat}_fluct"] if lay in by_layer else np.nan
                        for lay in layers]
                pos = np.arange(len(layers)) - 0.4 + width * (2 * i + j + 0.5)
                ax.bar(pos, vals, width=width, color=colors[label],
                       alpha=0.85 if kind == "bn" else 0.45, hatch=None if kind == "bn" else "//",
                       edgecolor=colors[label], label=f"{label} {kind.upper()}")
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, rotation=20, ha="right", fontsize=8)
        ax.set(ylabel="std over steps", title=f"fluctuation of the {stat}")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    return save_figure(fig, path, title=title)
