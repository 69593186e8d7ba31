"""What :func:`~seqnorm_jax.studies.tune.sequential_tune` returns and writes: the
:class:`TuneResult`, its stage tables (:func:`format_stage`) and its plot."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

import seqnorm_jax.studies.report as report
from seqnorm_jax.studies.selection import METRICS, STAGES, best_and_tolerance
from seqnorm_jax.train.config import TrainConfig
from seqnorm_jax.train.files import is_writer

__all__ = ["TuneResult", "format_stage"]


@dataclasses.dataclass
class TuneResult:
    """What :func:`sequential_tune` returns.

    Attributes:
      stage1: one row per ``G_M`` candidate (GhostNorm): ``stage``, ``parameter``
        (``"batch_groups"``), ``value``, ``spec``, ``status`` (``"ok"``, ``"skipped"`` or
        ``"diverged"``: every seed's training loss became non-finite), ``reason`` (why
        skipped or diverged, or how many seeds diverged, else ``""``), ``seeds``,
        ``values`` (the metric per seed), ``mean``, ``std`` (sample std over seeds, 0 for one seed), ``sem`` (``std /
        sqrt(seeds)``), ``train_loss_mean``, ``epoch_time_mean`` (from ``compare``'s
        summary) and ``chosen``. Skipped rows have ``None`` for the numbers.
      stage2: the same for the ``G_C`` candidates (SeqNorm with the chosen ``G_M``).
      batch_groups: the chosen ``G_M``.
      channel_groups: the chosen ``G_C``.
      spec: the final norm spec, ``"seqnorm:channel_groups=C,batch_groups=M"``.
      reasons: ``{"batch_groups", "channel_groups", "validation"}``: why each setting
        was chosen, and which data were used to choose.
      num_runs: training runs done (candidates evaluated x seeds).
      grid_runs: the runs a full ``G_C x G_M`` grid of the usable candidates would take.
      config: ``base`` with the chosen ``norm``: retrain it (on the full training set
        unless ``base.validation_size`` was set) to report test numbers.
      settings: ``metric``, ``maximize``, ``tolerance``, ``seeds``, ``validation_size``,
        ``validation_held_out_by_tuner``, ``norm_channels``, ``model``, ``dataset``,
        ``epochs``, ``batch_size``, ``total_seconds``, ``out_dir`` and the tuning config.
    """

    stage1: list[dict[str, Any]]
    stage2: list[dict[str, Any]]
    batch_groups: int
    channel_groups: int
    spec: str
    reasons: dict[str, str]
    num_runs: int
    grid_runs: int
    config: TrainConfig
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """The result as a JSON-compatible dict (``config`` as its dict)."""
        d = dataclasses.asdict(self)
        d["config"] = self.config.to_dict()
        return d

    def markdown(self) -> str:
        """The summary of ``tune.md``: settings, both stage tables, reasons, the choice."""
        s = self.settings
        desc, _ = METRICS[s["metric"]]
        lines = [
            "# SeqNorm tuned sequentially (paper 000, section 3.2.1)", "",
            (f"{s['model']} on {s['dataset']}, batch {s['batch_size']}, "
             f"{_epochs(s['epochs'])}, seeds {s['seeds']}; metric: {desc} (`{s['metric']}`)."),
            "",
            f"Data: {self.reasons['validation']}", "",
            "## Stage 1: G_M (batch_groups) with GhostNorm", "",
            format_stage(self.stage1, s["metric"]), "",
            f"Choice: {self.reasons['batch_groups']}", "",
            f"## Stage 2: G_C (channel_groups) with SeqNorm at G_M = {self.batch_groups}", "",
            format_stage(self.stage2, s["metric"]), "",
            f"Choice: {self.reasons['channel_groups']}", "",
            "## Result", "",
            (f"`{self.spec}` -- {self.num_runs} training runs (a full grid of the usable "
             f"candidates: {self.grid_runs})."),
            "",
        ]
        return "\n".join(lines)

    def write(self, out_dir: str | os.PathLike) -> dict[str, str]:
        """Write ``tune.json``, ``tune.csv`` (one row per candidate of both stages),
        ``tune.md`` and ``tune.png`` into ``out_dir``.

        Returns:
          ``{"json", "csv", "markdown", "plot"}``: the paths written.
        """
        paths = report.result_paths(os.fspath(out_dir), "tune", "tune.png")
        if not is_writer():  # a multi-process run: process 0 writes
            return paths
        report.write_json(paths["json"], self.to_dict())
        report.write_csv(paths["csv"], [
            {**r, "values": "" if r["values"] is None else ";".join(f"{v:.6g}" for v in r["values"])}
            for r in self.stage1 + self.stage2])
        report.write_text(paths["markdown"], self.markdown())
        _plot(self, paths["plot"])
        return paths


def _epochs(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def _fmt(value: float | None, percent: bool) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.2f}" if percent else f"{value:.4f}"


def format_stage(rows: Sequence[Mapping[str, Any]], metric: str = "eval_accuracy") -> str:
    """One stage's rows as a markdown table (also readable as plain text).

    Args:
      rows: :attr:`TuneResult.stage1` or :attr:`TuneResult.stage2`.
      metric: the metric the rows hold (accuracies are shown in %).

    Returns:
      The table, the chosen row marked ``chosen``.
    """
    pct = "accuracy" in metric
    unit = " (%)" if pct else ""
    symbol = {"batch_groups": "G_M", "channel_groups": "G_C"}.get(
        rows[0].get("parameter", ""), "value") if rows else "value"
    lines = [f"| {symbol} | spec | {metric}{unit} mean +- std | sem | seeds | |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['value']} | `{r['spec']}` | - | - | - | {r['status']}: "
                         f"{r['reason']} |")
            continue
        lines.append(f"| {r['value']} | `{r['spec']}` | {_fmt(r['mean'], pct)} +- "
                     f"{_fmt(r['std'], pct)} | {_fmt(r['sem'], pct)} | {r['seeds']} | "
                     f"{'**chosen**' if r['chosen'] else ''} |")
    return "\n".join(lines)


def _plot(result: TuneResult, path: str) -> None:
    from seqnorm_jax.analysis.plots import pyplot

    plt = pyplot()
    s = result.settings
    pct = "accuracy" in s["metric"]
    scale = 100.0 if pct else 1.0
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, rows, (param, _, symbol) in zip(axes, (result.stage1, result.stage2), STAGES):
        ok = [r for r in rows if r["status"] == "ok"]
        x = np.arange(len(ok))
        mean = np.array([r["mean"] for r in ok]) * scale
        std = np.array([r["std"] for r in ok]) * scale
        ax.errorbar(x, mean, yerr=std, marker="o", capsize=4, label="mean +- std over seeds")
        for i, r in enumerate(ok):
            ax.scatter(np.full(len(r["values"]), i), np.asarray(r["values"]) * scale,
                       s=10, color="gray", alpha=0.6, zorder=3,
                       label="one seed" if i == 0 else None)
            if r["chosen"]:
                ax.scatter([i], [mean[i]], s=220, marker="*", color="tab:red", zorder=4,
                           label=f"chosen {symbol} = {r['value']}")
        best, tol = best_and_tolerance(ok, s["tolerance"], s["maximize"])
        edge = (best["mean"] - tol if s["maximize"] else best["mean"] + tol) * scale
        ax.axhline(edge, color="tab:green", ls=":", lw=1,
                   label=f"best {'-' if s['maximize'] else '+'} tolerance ({tol * scale:.3g})")
        ax.set_xticks(x, [str(r["value"]) for r in ok])
        skipped = [f"{r['value']}{' (diverged)' if r['status'] == 'diverged' else ''}"
                   for r in rows if r["status"] != "ok"]
        title = ("stage 1: GhostNorm, " if param == "batch_groups" else
                 f"stage 2: SeqNorm at G_M = {result.batch_groups}, ") + f"{symbol} ({param})"
        if skipped:
            title += f"\nskipped: {', '.join(skipped)}"
        ax.set(xlabel=f"{symbol} ({param})", ylabel=s["metric"] + (" (%)" if pct else ""),
               title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    report.save_figure(fig, path, f"{s['model']} on {s['dataset']} (validation), "
                       f"{_epochs(s['epochs'])}, seeds {s['seeds']}: {result.spec}")


