"""The sequential SeqNorm tuner of paper 000 (section 3.2.1): ``G_M`` first, then ``G_C``.

A grid search over SeqNorm's two hyperparameters costs ``Theta(G_C x G_M)`` runs. Paper 000
tunes them one after the other instead (``Theta(G_C + G_M)`` runs):

1. tune ``G_M`` (``batch_groups``) with GhostNorm alone and keep "the largest ``g_M`` for
   which the network performs well (amongst similarly performing models, select the one
   with the lowest variance)";
2. tune ``G_C`` (``channel_groups``) of SeqNorm with that ``G_M`` fixed.

:func:`sequential_tune` runs both stages with :func:`seqnorm_jax.train.compare` (one
``compare`` per stage, whose tables and curves go to ``out_dir/stage1_batch_groups`` and
``out_dir/stage2_channel_groups``), picks each stage's setting with :func:`select`, and
returns a :class:`TuneResult` (written as ``tune.json``, ``tune.csv``, ``tune.md`` and
``tune.png``). Tuning reads a validation set held out of the training set, never the test
set; retrain :attr:`TuneResult.config` to report test numbers.

>>> from seqnorm_jax.train import TrainConfig
>>> base = TrainConfig(model="simplenet", dataset="fashion_mnist", epochs=4, batch_size=128)
>>> result = sequential_tune(base, batch_groups=(1, 2, 4, 8), channel_groups=(1, 2, 4))
>>> result.spec  # the chosen setting, e.g. 'seqnorm:channel_groups=4,batch_groups=8'
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from seqnorm_jax.train.compare import compare, norm_channels
from seqnorm_jax.train.config import TrainConfig

__all__ = [
    "METRICS",
    "VALIDATION_FRACTION",
    "TuneResult",
    "format_stage",
    "select",
    "sequential_tune",
    "valid_batch_groups",
    "valid_channel_groups",
]

# Share of the training split held out for validation when ``base.validation_size`` is
# None: paper 000 tunes on 5,000 of CIFAR's 50,000 training images ("randomly stratified").
VALIDATION_FRACTION = 0.1

# The selectable metrics: name -> (description, higher is better).
METRICS: dict[str, tuple[str, bool]] = {
    "eval_accuracy": ("validation accuracy after the last epoch", True),
    "best_eval_accuracy": ("best validation accuracy over the epochs", True),
    "eval_loss": ("validation loss after the last epoch", False),
}

_STAGES = (("batch_groups", "stage1_batch_groups", "G_M"),
           ("channel_groups", "stage2_channel_groups", "G_C"))
_EPS = 1e-12  # slack for float comparisons of means and stds


# ---------------------------------------------------------------------------- selection
def select(rows: Sequence[Mapping[str, Any]], tolerance: float | None = None, *,
           maximize: bool = True) -> tuple[Mapping[str, Any], str]:
    """Paper 000's choice among tuned candidates (section 3.2.1).

    The paper keeps "the largest ``g_M`` for which the network performs well (amongst
    similarly performing models, select the one with the lowest variance)". Here:

    1. a candidate *performs well* if its mean metric over seeds is within ``tolerance``
       of the best mean (``best - mean <= tolerance``; for a metric to minimize,
       ``mean - best <= tolerance``);
    2. among those, the one with the lowest standard deviation over seeds wins;
    3. remaining ties (equal stds, e.g. one seed each): the largest value.

    Default tolerance: the best candidate's standard error of the mean (its sample std
    over seeds divided by ``sqrt(seeds)``) -- the "one-standard-error rule" of model
    selection. The paper gives no number; it calls ``G_M`` in ``(2, 4, 8)`` "similar" when
    all three reach 96.6 % validation accuracy on CIFAR-10, i.e. when they differ by less
    than the reported precision and the seed noise. The standard error measures how well
    the best mean itself is known, so candidates inside it cannot be told apart from the
    best with the seeds run; the seed std would be a looser rule that does not tighten
    with more seeds. With one seed there is no spread estimate, so the default reduces to
    the plain best mean. ``tolerance=0`` is the plain argmax (paper 000's CIFAR-10 ``G_C``
    choice, "slightly higher accuracy than the rest").

    Args:
      rows: candidates, each with ``value`` (the hyperparameter), ``mean``, ``std`` and,
        for the default tolerance, ``sem``; optional ``parameter`` (its name, for the
        reason). Rows with ``status == "skipped"`` or no ``mean`` are ignored.
      tolerance: absolute tolerance in the metric's units (0.005 = half a point of
        accuracy); ``None``: the best candidate's standard error.
      maximize: whether a higher metric is better.

    Returns:
      ``(chosen_row, reason)``: the chosen row (one of ``rows``) and a sentence that
      explains the choice.

    Raises:
      ValueError: no evaluated row, or a negative or non-finite ``tolerance``.
    """
    cands = [r for r in rows if r.get("status", "ok") == "ok" and r.get("mean") is not None]
    if not cands:
        raise ValueError("select: rows has no evaluated candidate (all are skipped or lack a "
                         "'mean'); pass rows with 'value', 'mean' and 'std'.")
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"select: tolerance={tolerance!r} must be a finite number >= 0 "
                         "(or None for the best candidate's standard error).")
    name = cands[0].get("parameter", "value")
    sign = 1.0 if maximize else -1.0
    best, tol = _best_and_tolerance(cands, tolerance, maximize)
    if tolerance is None:
        tol_text = (f"the best candidate's standard error over {best.get('seeds', '?')} seeds, "
                    f"{tol:.4g}" if tol > 0 else
                    "0 (one seed or no spread: the best candidate's standard error is 0)")
    else:
        tol_text = f"{tol:.4g} (given)"
    well = [r for r in cands if sign * (best["mean"] - r["mean"]) <= tol + _EPS]
    low = min(r["std"] for r in well)
    lowest = [r for r in well if r["std"] <= low + _EPS]
    chosen = max(lowest, key=lambda r: r["value"])

    values = ", ".join(str(r["value"]) for r in well)
    reason = (f"best mean {best['mean']:.4f} at {name}={best['value']}; tolerance {tol_text}; "
              f"within it: {name} in ({values})")
    if len(well) == 1:
        reason += f"; chose {name}={chosen['value']}, the only one."
    elif len(lowest) == 1:
        reason += (f"; chose {name}={chosen['value']}, the lowest std among them "
                   f"({chosen['std']:.4f}).")
    else:
        tied = ", ".join(str(r["value"]) for r in lowest)
        reason += (f"; lowest std {low:.4f} shared by {name} in ({tied}); chose the largest, "
                   f"{name}={chosen['value']}.")
    return chosen, reason


def _best_and_tolerance(cands: Sequence[Mapping[str, Any]], tolerance: float | None,
                        maximize: bool) -> tuple[Mapping[str, Any], float]:
    """The best evaluated row (ties: the larger value) and the tolerance in effect."""
    sign = 1.0 if maximize else -1.0
    best = max(cands, key=lambda r: (sign * r["mean"], r["value"]))
    tol = float(best.get("sem") or 0.0) if tolerance is None else float(tolerance)
    return best, tol


# ---------------------------------------------------------------------------- candidates
def _check_candidates(values: Sequence[int], arg: str) -> list[int]:
    """Positive ints, deduplicated and sorted; ``ValueError`` naming ``arg`` otherwise."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"sequential_tune: {arg}={values!r} must be a sequence of positive "
                         f"ints, e.g. {arg}=(1, 2, 4, 8).")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"sequential_tune: {arg} has {v!r}; every candidate must be a "
                             f"positive int, e.g. {arg}=(1, 2, 4, 8).")
        out.append(int(v))
    if not out:
        raise ValueError(f"sequential_tune: {arg} is empty; give at least one candidate, e.g. "
                         f"{arg}=(1, 2, 4, 8).")
    return sorted(set(out))


def valid_batch_groups(candidates: Sequence[int], batch_size: int,
                       grad_accum_steps: int = 1) -> tuple[list[int], dict[int, str]]:
    """Split ``G_M`` candidates into usable ones and skipped ones with the reason.

    The norm layers see micro-batches of ``batch_size // grad_accum_steps`` examples; a
    candidate is usable if it divides that and leaves ghost batches of at least 2 examples
    (a ghost batch of one example normalizes each example by itself).

    Args:
      candidates: the ``batch_groups`` candidates (positive ints).
      batch_size: the global batch size.
      grad_accum_steps: gradient accumulation steps (micro-batches per batch).

    Returns:
      ``(kept, skipped)``: the usable candidates in increasing order, and
      ``{candidate: reason}`` for the others.
    """
    cands = _check_candidates(candidates, "batch_groups")
    micro = batch_size // grad_accum_steps
    where = (f"the batch of {batch_size}" if grad_accum_steps == 1 else
             f"the micro-batch of {micro} ({batch_size} / {grad_accum_steps} accumulation steps)")
    kept, skipped = [], {}
    for g in cands:
        if micro % g:
            skipped[g] = f"does not divide {where}"
        elif micro // g < 2:
            skipped[g] = f"leaves ghost batches of {micro // g} example of {where}"
        else:
            kept.append(g)
    return kept, skipped


def valid_channel_groups(candidates: Sequence[int],
                         channels: Sequence[int]) -> tuple[list[int], dict[int, str]]:
    """Split ``G_C`` candidates into those dividing every norm layer's channel count and
    the skipped ones with the reason.

    Args:
      candidates: the ``channel_groups`` candidates (positive ints).
      channels: the channel counts of the model's norm layers
        (:func:`seqnorm_jax.train.norm_channels`).

    Returns:
      ``(kept, skipped)`` as in :func:`valid_batch_groups`.
    """
    cands = _check_candidates(candidates, "channel_groups")
    kept, skipped = [], {}
    for c in cands:
        bad = sorted({n for n in channels if n % c})
        if bad:
            skipped[c] = f"does not divide the norm layers' channel count(s) {bad}"
        else:
            kept.append(c)
    return kept, skipped


def _nothing_left(arg: str, skipped: dict[int, str], fix: str) -> ValueError:
    why = "; ".join(f"{k}: {v}" for k, v in skipped.items())
    return ValueError(f"sequential_tune: no {arg} candidate is usable ({why}); {fix}")


# ---------------------------------------------------------------------------- result
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
        out_dir = os.fspath(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        paths = {k: os.path.join(out_dir, f) for k, f in (
            ("json", "tune.json"), ("csv", "tune.csv"), ("markdown", "tune.md"),
            ("plot", "tune.png"))}
        with open(paths["json"], "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
        rows = self.stage1 + self.stage2
        with open(paths["csv"], "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            for r in rows:
                writer.writerow({**r, "values": "" if r["values"] is None else
                                 ";".join(f"{v:.6g}" for v in r["values"])})
        with open(paths["markdown"], "w") as f:
            f.write(self.markdown())
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
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    s = result.settings
    pct = "accuracy" in s["metric"]
    scale = 100.0 if pct else 1.0
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, rows, (param, _, symbol) in zip(axes, (result.stage1, result.stage2), _STAGES):
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
        best, tol = _best_and_tolerance(ok, s["tolerance"], s["maximize"])
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
    fig.suptitle(f"{s['model']} on {s['dataset']} (validation), {_epochs(s['epochs'])}, seeds "
                 f"{s['seeds']}: {result.spec}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- the tuner
def _rows(stage: int, param: str, values: Sequence[int], skipped: Mapping[int, str],
          spec_of, compared, metric: str) -> list[dict[str, Any]]:
    """The stage's rows, in increasing candidate order, from a ``compare`` result."""
    summary = {r["label"]: r for r in compared.summary} if compared is not None else {}
    rows = []
    for v in sorted(set(values) | set(skipped)):
        spec = spec_of(v)
        row = dict(stage=stage, parameter=param, value=v, spec=spec, status="skipped",
                   reason=skipped.get(v, ""), seeds=0, values=None, mean=None, std=None,
                   sem=None, train_loss_mean=None, epoch_time_mean=None, chosen=False)
        if v not in skipped:
            every = [r for r in compared.runs if r["label"] == spec]
            runs = [r for r in every if not r.get("diverged") and r["eval_accuracy"]]
            diverged = len(every) - len(runs)
            if diverged:
                row["reason"] = (f"{diverged}/{len(every)} seeds diverged (non-finite "
                                 "training loss)")
            if not runs:
                row["status"] = "diverged"
                rows.append(row)
                continue
            if metric == "best_eval_accuracy":
                vals = [float(max(r["eval_accuracy"])) for r in runs]
            else:
                vals = [float(r[metric][-1]) for r in runs]
            a = np.asarray(vals, np.float64)
            std = float(a.std(ddof=1)) if a.size > 1 else 0.0
            row.update(status="ok", seeds=len(vals), values=vals, mean=float(a.mean()),
                       std=std, sem=std / math.sqrt(a.size),
                       train_loss_mean=summary[spec]["train_loss_mean"],
                       epoch_time_mean=summary[spec]["epoch_time_mean"])
        rows.append(row)
    return rows


def _validation(base: TrainConfig, n_train: int, seed: int) -> tuple[TrainConfig, int, str]:
    if base.validation_size is not None:
        return base, base.validation_size, (
            f"validation set of base.validation_size={base.validation_size} training "
            f"examples (stratified hold-out, seed {seed}); the test set was not used.")
    size = max(1, round(VALIDATION_FRACTION * n_train))
    return base.replace(validation_size=size), size, (
        f"base.validation_size was None, so the tuner held out {size} of the {n_train} "
        f"training examples ({VALIDATION_FRACTION:.0%}, stratified, seed {seed}) as the "
        "validation set and trained on the rest; the test set was not used. Retrain the "
        "chosen setting (TuneResult.config) on the full training set for test numbers.")


def sequential_tune(base: TrainConfig, *, batch_groups: Sequence[int] = (1, 2, 4, 8, 16),
                    channel_groups: Sequence[int] = (1, 2, 4, 8, 16, 32),
                    seeds: Sequence[int] = (0, 1, 2), tolerance: float | None = None,
                    metric: str = "eval_accuracy", out_dir: str | os.PathLike = "runs/tune",
                    progress: bool = True, norm_fields: str = "") -> TuneResult:
    """Tune SeqNorm's ``G_M`` then ``G_C`` as paper 000 does (section 3.2.1).

    Stage 1 trains GhostNorm (``"ghost:batch_groups=g"``) for each usable ``G_M``
    candidate and picks ``g*`` with :func:`select`; stage 2 trains SeqNorm
    (``"seqnorm:channel_groups=c,batch_groups=g*"``) for each usable ``G_C`` candidate and
    picks ``c*`` the same way: ``len(G_M) + len(G_C)`` settings (times the seeds) instead of
    the grid's product. Each stage is one :func:`seqnorm_jax.train.compare` call, so its
    tables, curves and per-run metrics land in ``out_dir/stage1_batch_groups`` and
    ``out_dir/stage2_channel_groups``; the result is written to ``out_dir`` with
    :meth:`TuneResult.write`.

    ``norm_fields`` adds the same fields to every candidate's spec, e.g.
    ``"momentum=0.9"`` for short runs whose running statistics would not settle at the
    default 0.99.

    Candidates that cannot run are skipped with the reason recorded in their row:
    ``G_M`` values that do not divide the batch (the micro-batch under gradient
    accumulation) or leave ghost batches of one example, ``G_C`` values that do not
    divide every norm layer's channel count. Both lists are checked before any training.

    The test set is never read: with ``base.validation_size`` set, its hold-out is the
    validation set; otherwise the tuner holds out :data:`VALIDATION_FRACTION` (10 %) of the
    training split, stratified, and trains on the rest. Every run of both stages uses the
    same hold-out (seeded by ``seeds[0]``) and the same seeds.

    Args:
      base: the shared configuration (its ``norm`` and ``seed`` are replaced).
      batch_groups: ``G_M`` candidates.
      channel_groups: ``G_C`` candidates.
      seeds: seeds of every candidate (the std over them drives the selection).
      tolerance: :func:`select`'s tolerance in the metric's units; ``None``: the best
        candidate's standard error over the seeds.
      metric: one of :data:`METRICS` (``"eval_accuracy"``, ``"best_eval_accuracy"``,
        ``"eval_loss"``).
      out_dir: the output directory.
      progress: show progress bars and the stage headers.
      norm_fields: fields added to every candidate's spec (``"momentum=0.9"``).

    Returns:
      A :class:`TuneResult` (also written to ``out_dir``).

    Raises:
      ValueError: a bad argument, or no usable candidate left for ``batch_groups`` or
        ``channel_groups`` (the message names the argument and the values that fit).
      seqnorm_jax.data.DatasetNotFoundError: the dataset is not available locally.
    """
    from seqnorm_jax import data

    if metric not in METRICS:
        raise ValueError(f"sequential_tune: metric={metric!r}; choose one of {list(METRICS)}.")
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"sequential_tune: tolerance={tolerance!r} must be a finite number "
                         ">= 0, or None for the best candidate's standard error.")
    if isinstance(seeds, (str, bytes)) or not seeds:
        raise ValueError("sequential_tune: seeds is empty; give at least one seed, e.g. "
                         "seeds=(0, 1, 2).")
    seeds = [int(s) for s in seeds]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"sequential_tune: seeds={seeds} repeats a seed; give distinct seeds.")
    out_dir = os.fspath(out_dir)
    maximize = METRICS[metric][1]

    extra = f",{norm_fields.strip().strip(',')}" if norm_fields.strip() else ""
    if extra:
        from seqnorm_jax.factory import norm_factory
        from seqnorm_jax.train.validate import check_norm_fields

        for probe in (f"ghost:batch_groups=1{extra}", f"seqnorm:channel_groups=1{extra}"):
            try:
                check_norm_fields(norm_factory(probe)())
            except ValueError as e:
                raise ValueError(f"sequential_tune: norm_fields={norm_fields!r}: {e}") from None

    # ---- candidates, checked before any training
    g_kept, g_skipped = valid_batch_groups(batch_groups, base.batch_size, base.grad_accum_steps)
    if not g_kept:
        micro = base.batch_size // base.grad_accum_steps
        fits = [g for g in range(1, micro // 2 + 1) if micro % g == 0]
        raise _nothing_left("batch_groups", g_skipped,
                            f"pass batch_groups from {fits} (divisors of the batch of "
                            f"{micro} leaving ghost batches of >= 2 examples) or change "
                            "batch_size.")
    train_split = data.load(base.dataset, "train", data_dir=base.data_dir,
                            source=base.data_source)
    info = train_split.info
    channels = norm_channels(base, info.image_shape, int(info.num_classes))
    c_kept, c_skipped = valid_channel_groups(channel_groups, channels)
    if not c_kept:
        fits = [c for c in range(1, min(channels) + 1) if all(n % c == 0 for n in channels)]
        raise _nothing_left("channel_groups", c_skipped,
                            f"pass channel_groups from {fits} (the common divisors of the "
                            f"norm layers' channel counts {channels}).")

    # ---- the validation hold-out
    tune_base, val_size, val_reason = _validation(base, len(train_split), seeds[0])

    t0 = time.perf_counter()

    def stage(index: int, values: list[int], spec_of) -> Any:
        param, sub, symbol = _STAGES[index]
        if progress:
            print(f"stage {index + 1}/2: {symbol} ({param}) in {values}, seeds {seeds}",
                  flush=True)
        return compare(tune_base, norms=[spec_of(v) for v in values], seeds=seeds,
                       out_dir=os.path.join(out_dir, sub), progress=progress)

    # ---- stage 1: G_M with GhostNorm
    ghost = lambda g: f"ghost:batch_groups={g}{extra}"
    stage1 = _rows(1, "batch_groups", g_kept, g_skipped, ghost, stage(0, g_kept, ghost), metric)
    chosen1, reason1 = select(stage1, tolerance, maximize=maximize)
    chosen1["chosen"] = True
    g_star = chosen1["value"]

    # ---- stage 2: G_C with SeqNorm at g*
    seq = lambda c: f"seqnorm:channel_groups={c},batch_groups={g_star}{extra}"
    stage2 = _rows(2, "channel_groups", c_kept, c_skipped, seq, stage(1, c_kept, seq), metric)
    chosen2, reason2 = select(stage2, tolerance, maximize=maximize)
    chosen2["chosen"] = True
    spec = chosen2["spec"]

    settings = dict(
        metric=metric, maximize=maximize, tolerance=tolerance, seeds=seeds,
        validation_size=val_size, validation_held_out_by_tuner=base.validation_size is None,
        norm_channels=channels, model=base.model, dataset=base.dataset, epochs=base.epochs,
        batch_size=base.batch_size, total_seconds=round(time.perf_counter() - t0, 1),
        out_dir=out_dir, tuning_config=tune_base.to_dict())
    result = TuneResult(
        stage1=stage1, stage2=stage2, batch_groups=g_star, channel_groups=chosen2["value"],
        spec=spec,
        reasons={"batch_groups": reason1, "channel_groups": reason2, "validation": val_reason},
        num_runs=(len(g_kept) + len(c_kept)) * len(seeds),
        grid_runs=len(g_kept) * len(c_kept) * len(seeds),
        config=base.replace(norm=spec), settings=settings)
    result.write(out_dir)
    return result
