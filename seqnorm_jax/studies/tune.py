"""The sequential SeqNorm tuner of paper 000 (section 3.2.1): ``G_M`` first, then ``G_C``.

A grid search over SeqNorm's two hyperparameters costs ``Theta(G_C x G_M)`` runs. Paper 000
tunes them one after the other instead (``Theta(G_C + G_M)`` runs):

1. tune ``G_M`` (``batch_groups``) with GhostNorm alone and keep "the largest ``g_M`` for
   which the network performs well (amongst similarly performing models, select the one
   with the lowest variance)";
2. tune ``G_C`` (``channel_groups``) of SeqNorm with that ``G_M`` fixed.

:func:`sequential_tune` runs both stages with :func:`~seqnorm_jax.studies.compare.compare`
(one ``compare`` per stage, whose tables and curves go to ``out_dir/stage1_batch_groups``
and ``out_dir/stage2_channel_groups``), picks each stage's setting with
:func:`~seqnorm_jax.studies.selection.select`, and returns a
:class:`~seqnorm_jax.studies.tune_report.TuneResult` (written as ``tune.json``,
``tune.csv``, ``tune.md`` and ``tune.png``). Tuning reads a validation set held out of the
training set, never the test set; retrain :attr:`TuneResult.config` to report test numbers.

>>> from seqnorm_jax.train import TrainConfig
>>> base = TrainConfig(model="simplenet", dataset="fashion_mnist", epochs=4, batch_size=128)
>>> result = sequential_tune(base, batch_groups=(1, 2, 4, 8), channel_groups=(1, 2, 4))
>>> result.spec  # the chosen setting, e.g. 'seqnorm:channel_groups=4,batch_groups=8'
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from seqnorm_jax import checks
import seqnorm_jax.studies.report as report
from seqnorm_jax.studies.compare import compare, model_norm_widths
from seqnorm_jax.studies.selection import (
    METRICS,
    STAGES,
    VALIDATION_FRACTION,
    nothing_left,
    select,
    valid_batch_groups,
    valid_channel_groups,
)
from seqnorm_jax.studies.tune_report import TuneResult
from seqnorm_jax.train.config import TrainConfig
from seqnorm_jax.train.files import run_lock
from seqnorm_jax.train.files import claim_run_folder

__all__ = ["TUNE_FILES", "TUNE_STAGES", "AllDivergedError", "sequential_tune"]

# What a tuning writes into its folder (its stages first: a folder holding one holds a tuning).
TUNE_STAGES = tuple(sub for _, sub, _ in STAGES)
TUNE_FILES = TUNE_STAGES + ("tune.json", "tune.csv", "tune.md", "tune.png")


class AllDivergedError(ValueError):
    """Every candidate of a tuning stage diverged: there is nothing to select."""


def _check_evaluated(rows: list[dict[str, Any]], param: str, compare_dir: str) -> None:
    """Raise :class:`AllDivergedError` naming the candidates when none was evaluated."""
    if any(r["status"] == "ok" for r in rows):
        return
    tried = [r["spec"] for r in rows if r["status"] == "diverged"]
    raise AllDivergedError(
        f"every {param} candidate diverged (non-finite training loss in every seed): "
        f"{', '.join(tried)}; lower --lr, or add --grad-clip-norm or warm-up (their runs "
        f"are in {compare_dir}).")


def _rows(stage: int, param: str, values: Sequence[int], skipped: Mapping[int, str],
          spec_of, compared, metric: str) -> list[dict[str, Any]]:
    """The stage's rows, in increasing candidate order, from a ``compare`` result."""
    summary = {r["label"]: r for r in compared.summary} if compared is not None else {}
    rows = []
    for v in sorted(set(values) | set(skipped)):
        spec = str(spec_of(v))
        row = dict(stage=stage, parameter=param, value=v, spec=spec, status="skipped",
                   reason=skipped.get(v, ""), seeds=0, values=None, mean=None, std=None,
                   sem=None, train_loss_mean=None, epoch_time_mean=None, chosen=False)
        if v not in skipped:
            every = [r for r in compared.runs if r["label"] == spec]
            runs = report.finished(every)
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
            mean, std = report.mean_std(vals)
            row.update(status="ok", seeds=len(vals), values=vals, mean=mean, std=std,
                       sem=std / math.sqrt(len(vals)),
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


def _candidate_specs(norm_fields: str):
    """GhostNorm's and SeqNorm's specs with ``norm_fields`` (``"momentum=0.9"``) set,
    parsed and checked once, before any work."""
    from seqnorm_jax.registry import NormSpec
    from seqnorm_jax.train.build import check_norm_fields

    fields = norm_fields.strip().strip(",")
    specs = []
    for layer in ("ghost", "seqnorm"):
        try:
            spec = NormSpec.parse(f"{layer}:{fields}" if fields else layer)
            check_norm_fields(spec.factory()())
        except ValueError as e:
            raise ValueError(f"sequential_tune: norm_fields={norm_fields!r}: {e}") from None
        specs.append(spec)
    return specs


def sequential_tune(base: TrainConfig, *, batch_groups: Sequence[int] = (1, 2, 4, 8, 16),
                    channel_groups: Sequence[int] = (1, 2, 4, 8, 16, 32),
                    seeds: Sequence[int] = (0, 1, 2), tolerance: float | None = None,
                    metric: str = "eval_accuracy", out_dir: str | os.PathLike = "runs/tune",
                    progress: bool = True, norm_fields: str = "", resume: bool = False,
                    overwrite: bool = False) -> TuneResult:
    """Tune SeqNorm's ``G_M`` then ``G_C`` as paper 000 does (section 3.2.1).

    Stage 1 trains GhostNorm (``"ghost:batch_groups=g"``) for each usable ``G_M``
    candidate and picks ``g*`` with :func:`select`; stage 2 trains SeqNorm
    (``"seqnorm:channel_groups=c,batch_groups=g*"``) for each usable ``G_C`` candidate and
    picks ``c*`` the same way: ``len(G_M) + len(G_C)`` settings (times the seeds) instead of
    the grid's product. Each stage is one :func:`~seqnorm_jax.studies.compare.compare` call, so its
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
      resume: continue the tuning in ``out_dir``: finished runs are kept, a run stopped
        by a signal continues from its checkpoint, the others are trained.
      overwrite: delete an earlier tuning's files in ``out_dir`` first. Without
        ``resume`` or ``overwrite`` a folder holding one is refused.

    Returns:
      A :class:`TuneResult` (also written to ``out_dir``).

    Raises:
      ValueError: a bad argument, or no usable candidate left for ``batch_groups`` or
        ``channel_groups`` (the message names the argument and the values that fit), or
        ``out_dir`` holds an earlier tuning.
      AllDivergedError: every candidate of a stage diverged (the message names them).
      Preempted: SIGTERM or SIGINT stopped it (resume with ``resume=True``).
      seqnorm_jax.data.DatasetNotFoundError: the dataset is not available locally.
    """
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

    ghost, seq = _candidate_specs(norm_fields)

    # ---- candidates, checked before any training
    g_kept, g_skipped = valid_batch_groups(batch_groups, base.batch_size, base.grad_accum_steps)
    if not g_kept:
        micro = base.batch_size // base.grad_accum_steps
        raise nothing_left("batch_groups", g_skipped,
                           [g for g in checks.divisors(micro) if micro // g >= 2],
                           f"divisors of the batch of {micro} leaving ghost batches of >= 2 "
                           "examples; or change batch_size")
    with run_lock(out_dir, "out_dir (--out)"):  # before the data is read
        claim_run_folder(out_dir, "out_dir (--out)", resume=resume, overwrite=overwrite,
                         files=TUNE_FILES, marks=TUNE_STAGES)
        return _tune(base, ghost, seq, g_kept, g_skipped, channel_groups, seeds, tolerance,
                     metric, maximize, out_dir, progress, resume)


def _tune(base, ghost, seq, g_kept, g_skipped, channel_groups, seeds, tolerance, metric,
          maximize, out_dir, progress, resume) -> TuneResult:
    from seqnorm_jax import data

    train_split = data.load(base.dataset, "train", data_dir=base.data_dir,
                            source=base.data_source)
    info = train_split.info
    widths = model_norm_widths(base, info.image_shape, int(info.num_classes))
    c_kept, c_skipped = valid_channel_groups(channel_groups, widths)
    if not c_kept:
        raise nothing_left("channel_groups", c_skipped,
                           [c for c in checks.divisors(min(widths))
                            if all(n % c == 0 for n in widths)],
                           f"the common divisors of the norm layers' channel counts {widths}")

    # ---- the validation hold-out
    tune_base, val_size, val_reason = _validation(base, len(train_split), seeds[0])

    t0 = time.perf_counter()

    def stage(index: int, values: list[int], spec_of) -> Any:
        param, sub, symbol = STAGES[index]
        if progress:
            print(f"stage {index + 1}/2: {symbol} ({param}) in {values}, seeds {seeds}",
                  flush=True)
        return compare(tune_base, norms=[spec_of(v) for v in values], seeds=seeds,
                       out_dir=os.path.join(out_dir, sub), progress=progress, widths=widths,
                       resume=resume)

    # ---- stage 1: G_M with GhostNorm
    stage1 = _rows(1, "batch_groups", g_kept, g_skipped,
                   lambda g: ghost.replace(batch_groups=g),
                   stage(0, g_kept, lambda g: ghost.replace(batch_groups=g)), metric)
    _check_evaluated(stage1, "batch_groups", os.path.join(out_dir, STAGES[0][1]))
    chosen1, reason1 = select(stage1, tolerance, maximize=maximize)
    chosen1["chosen"] = True
    g_star = chosen1["value"]

    # ---- stage 2: G_C with SeqNorm at g*
    seq_at = lambda c: seq.replace(channel_groups=c, batch_groups=g_star)
    stage2 = _rows(2, "channel_groups", c_kept, c_skipped, seq_at, stage(1, c_kept, seq_at),
                   metric)
    _check_evaluated(stage2, "channel_groups", os.path.join(out_dir, STAGES[1][1]))
    chosen2, reason2 = select(stage2, tolerance, maximize=maximize)
    chosen2["chosen"] = True
    spec = chosen2["spec"]

    settings = dict(
        metric=metric, maximize=maximize, tolerance=tolerance, seeds=seeds,
        validation_size=val_size, validation_held_out_by_tuner=base.validation_size is None,
        norm_channels=widths, model=base.model, dataset=base.dataset, epochs=base.epochs,
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
