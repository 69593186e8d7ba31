"""What every study writes: run records, mean +- std over seeds, paired differences, tables,
the result files and the two plots every study shares.

A *record* is one training run of a study (a setting and a seed): the fields the study
gives it (``label``, ``spec``, ``seed``, ...) and the per-epoch lists of
:func:`run_record`. A run whose loss became non-finite is a record too, with
``diverged = {"step", "loss"}``; the numbers of a summary are over the seeds that did not
diverge, and its ``diverged`` column says how many did (``"k/n"``).

The accuracy a run reports after every epoch comes from its evaluation split: the test
split, or the validation hold-out when the run holds one out (``validation_size``). The
summary names its columns after it (:func:`accuracy_name`): ``test_accuracy_*`` or
``val_accuracy_*``.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "accuracy_name",
    "final_accuracy",
    "jsonable",
    "mean_std",
    "result_paths",
    "paired_differences",
    "plot_curves",
    "plot_sweep",
    "run_dir_name",
    "run_line",
    "run_record",
    "save_figure",
    "strict_json",
    "summarize",
    "write_csv",
    "write_json",
    "write_text",
]

SPLIT_NAMES = {"test": "test", "validation": "val"}


def accuracy_name(split: str = "test") -> str:
    """The summary's accuracy column for runs evaluated on ``split`` (``"test"`` or
    ``"validation"``): ``"test_accuracy"`` or ``"val_accuracy"``."""
    if split not in SPLIT_NAMES:
        raise ValueError(f"split={split!r}: choose one of {list(SPLIT_NAMES)}.")
    return f"{SPLIT_NAMES[split]}_accuracy"


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0 for one value) over seeds."""
    a = np.asarray(list(values), np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def run_record(result, **fields) -> dict[str, Any]:
    """One run of a study: ``fields`` and the per-epoch lists of a
    :class:`~seqnorm_jax.train.FitResult` (``eval_accuracy``, ``eval_loss``,
    ``train_loss``, ``train_accuracy``, ``epoch_time``), plus ``diverged`` (``None`` or
    ``{"step", "loss"}``)."""
    rows = result.eval_rows
    return dict(**fields, eval_accuracy=[r["eval_accuracy"] for r in rows],
                eval_loss=[r["eval_loss"] for r in rows], train_loss=[r["loss"] for r in rows],
                train_accuracy=[r["accuracy"] for r in rows],
                epoch_time=[r["epoch_time"] for r in rows],
                diverged=None if result.diverged is None else
                {"step": result.diverged["step"], "loss": result.diverged["loss"]})


def finished(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The records that did not diverge and were evaluated at least once."""
    return [r for r in records if not r.get("diverged") and r["eval_accuracy"]]


def run_line(record: Mapping[str, Any], split: str = "test") -> str:
    """One line about a finished run, for progress output."""
    head = f"{record['label']} seed {record['seed']}"
    if record["diverged"]:
        return (f"{head}: diverged at step {record['diverged']['step']} (loss "
                f"{record['diverged']['loss']:.4g})")
    return (f"{head}: {split} accuracy {record['eval_accuracy'][-1]:.4f}, "
            f"train loss {record['train_loss'][-1]:.4f}")


def run_dir_name(label: str, seed: int) -> str:
    """``runs/<this>/``: a run's folder name, the label made safe for file systems."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_"
                   for ch in label.replace("+", "plus"))
    return f"{safe}_seed{seed}"


def summarize(records: Sequence[Mapping[str, Any]], split: str = "test") -> list[dict[str, Any]]:
    """One row per label, in the order of first appearance.

    Columns (``A`` = :func:`accuracy_name` of ``split``): ``label``, ``spec``, ``seeds``
    (count), ``diverged`` (``"k/n"``: seeds whose training loss became non-finite),
    ``A_mean`` and ``A_std`` (final epoch, sample std over seeds, 0 for one seed),
    ``best_A_mean``, ``train_loss_mean`` / ``train_loss_std`` (mean training loss of the
    final epoch), ``epoch_time_mean`` (seconds per epoch, the first epoch left out when
    there are more, as it includes compilation). The numbers are over the seeds that did
    not diverge; ``None`` when every seed diverged.
    """
    acc = accuracy_name(split)
    out = []
    for label in dict.fromkeys(r["label"] for r in records):
        rs = [r for r in records if r["label"] == label]
        ok = finished(rs)
        row = {"label": label, "spec": rs[0]["spec"], "seeds": len(rs),
               "diverged": f"{len(rs) - len(ok)}/{len(rs)}", f"{acc}_mean": None,
               f"{acc}_std": None, f"best_{acc}_mean": None, "train_loss_mean": None,
               "train_loss_std": None, "epoch_time_mean": None}
        if ok:
            row[f"{acc}_mean"], row[f"{acc}_std"] = mean_std(r["eval_accuracy"][-1] for r in ok)
            row[f"best_{acc}_mean"] = float(np.mean([max(r["eval_accuracy"]) for r in ok]))
            row["train_loss_mean"], row["train_loss_std"] = mean_std(
                r["train_loss"][-1] for r in ok)
            row["epoch_time_mean"] = float(np.mean(
                [t for r in ok for t in (r["epoch_time"][1:] or r["epoch_time"])]))
        out.append(row)
    return out


def final_accuracy(record: Mapping[str, Any]) -> float:
    """The test accuracy when the run validated on a hold-out (scored once, at the end),
    else its final evaluation accuracy."""
    return record.get("final_test_accuracy", record["eval_accuracy"][-1])


def paired_differences(records: Sequence[Mapping[str, Any]],
                       baseline: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Accuracy minus the baseline's, seed by seed (:func:`final_accuracy`).

    Seeds share the initialisation and the data order across runs, so the per-seed
    difference cancels much of the seed-to-seed spread that the plain means carry.
    Returns ``delta_vs_baseline_accuracy_mean``/``_std`` and
    ``seeds_better_than_baseline`` (``"k/n"``), or ``{}`` when no seed is shared.
    """
    by_seed = {r["seed"]: final_accuracy(r) for r in baseline}
    diffs = [final_accuracy(r) - by_seed[r["seed"]] for r in records if r["seed"] in by_seed]
    if not diffs:
        return {}
    m, s = mean_std(diffs)
    return {"delta_vs_baseline_accuracy_mean": m, "delta_vs_baseline_accuracy_std": s,
            "seeds_better_than_baseline": f"{sum(d > 0 for d in diffs)}/{len(diffs)}"}


# ---------------------------------------------------------------------------- files


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (JSON ``null``), so that
    it serialises as strict JSON (a diverged run's losses)."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def jsonable(value: Any) -> Any:
    """``value`` with arrays and NumPy scalars turned into lists and Python numbers."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "__array__") and not isinstance(value, (str, bytes)):
        arr = np.asarray(value)
        return arr.tolist() if arr.ndim else arr.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_text(path: str, text: str) -> None:
    """``text`` into ``path`` (:func:`~seqnorm_jax.train.files.open_run_file`: a local
    path or a URL; a failed write is a :class:`~seqnorm_jax.train.RunFileError` naming it)."""
    from seqnorm_jax.train.files import open_run_file

    with open_run_file(path, "w") as f:
        f.write(text)


def result_paths(out_dir: str, stem: str, plot: str) -> dict[str, str]:
    """``{"json", "csv", "markdown", "plot"}``: a study's result files in ``out_dir``
    (created): ``<stem>.json``, ``<stem>.csv``, ``<stem>.md`` and ``plot``."""
    from seqnorm_jax.train.files import run_path

    run_path(out_dir).mkdir(parents=True, exist_ok=True)
    return {"json": os.path.join(out_dir, f"{stem}.json"),
            "csv": os.path.join(out_dir, f"{stem}.csv"),
            "markdown": os.path.join(out_dir, f"{stem}.md"), "plot": os.path.join(out_dir, plot)}


def write_json(path: str, payload: Any, *, compact: bool = False) -> None:
    """``payload`` as strict JSON (non-finite floats as ``null``); ``compact`` for files
    whose runs hold long lists."""
    write_text(path, json.dumps(strict_json(jsonable(payload)), allow_nan=False,
                                **({"separators": (",", ":")} if compact else {"indent": 2}))
               + "\n")


def write_csv(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """``rows`` as CSV, the first row's keys as the header."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, text.getvalue())


def percent(mean: float, std: float | None = None) -> str:
    """``"91.23 +- 0.45 %"`` (accuracies are fractions)."""
    return f"{100 * mean:.2f}" + ("" if std is None else f" +- {100 * std:.2f}") + " %"


def markdown_table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A markdown table (also readable as plain text)."""
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- plots


def save_figure(fig, path: str, title: str | None = None) -> None:
    """:func:`seqnorm_jax.analysis.plots.save_figure`, a failed write raised as
    :class:`~seqnorm_jax.train.RunFileError` naming ``path``."""
    from seqnorm_jax.analysis.plots import save_figure as save
    from seqnorm_jax.train.files import RunFileError

    try:
        save(fig, path, title=title)
    except OSError as e:
        raise RunFileError(path, e.strerror or str(e)) from e


def plot_curves(records: Sequence[Mapping[str, Any]], path: str, title: str,
                split: str = "test") -> None:
    """Accuracy on ``split`` and training loss per epoch, per label: the mean over the
    seeds that did not diverge and a +-1 std band; a label whose every seed diverged
    gets a labelled marker and no curve."""
    from matplotlib.ticker import MaxNLocator

    from seqnorm_jax.analysis.plots import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for label in dict.fromkeys(r["label"] for r in records):
        rs = [r for r in records if r["label"] == label]
        ok = finished(rs)
        n_div = len(rs) - len(ok)
        for ax, key in zip(axes, ("eval_accuracy", "train_loss")):
            if not ok:
                ax.plot([], [], marker="x", ls="none", label=f"{label} (diverged)")
                continue
            length = max(len(r[key]) for r in ok)
            curves = np.asarray([list(r[key]) + [np.nan] * (length - len(r[key])) for r in ok],
                                np.float64)
            epochs = np.arange(1, length + 1)
            mean = np.nanmean(curves, 0)
            std = np.nanstd(curves, 0, ddof=1) if len(ok) > 1 else np.zeros_like(mean)
            name = label if not n_div else f"{label} ({n_div}/{len(rs)} diverged)"
            (line,) = ax.plot(epochs, mean, marker="o", ms=3, label=name)
            ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    acc = f"{'validation' if split == 'validation' else 'test'} accuracy"
    axes[0].set(xlabel="epoch", ylabel=acc, title=acc)
    axes[1].set(xlabel="epoch", ylabel="train loss", title="training loss (epoch mean)")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(fontsize=8)
    save_figure(fig, path, title)


def plot_sweep(summary: Sequence[Mapping[str, Any]], path: str, title: str, *,
               key: str, ylabel: str, x_label: str | None = None, x_log: bool = False) -> None:
    """``key``'s mean +- std against each row's ``x``, one line per ``series`` (or label);
    rows without ``x`` or whose every seed diverged are left out."""
    from seqnorm_jax.analysis.plots import pyplot

    fig, ax = pyplot().subplots(figsize=(6.5, 4.2))
    points = [r for r in summary if r.get("x") is not None and r.get(f"{key}_mean") is not None]
    for series in dict.fromkeys(r.get("series") or r["label"] for r in points):
        rs = sorted((r for r in points if (r.get("series") or r["label"]) == series),
                    key=lambda r: r["x"])
        x = np.asarray([r["x"] for r in rs], np.float64)
        m = 100 * np.asarray([r[f"{key}_mean"] for r in rs])
        s = 100 * np.asarray([r[f"{key}_std"] for r in rs])
        ax.errorbar(x, m, yerr=s, marker="o", ms=4, capsize=3, label=series)
    if x_log:
        ax.set_xscale("log", base=2)
    ax.set(xlabel=x_label or "x", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=8)
    save_figure(fig, path)
