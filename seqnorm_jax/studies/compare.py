"""Compare normalization layers: one model, several layers, several seeds, one table and plot.

:func:`compare` trains the same model (same data, schedule and seeds) once per layer and
seed with the study engine (:func:`~seqnorm_jax.studies.engine.run_settings`), reduces
the runs to one row per layer (:func:`~seqnorm_jax.studies.report.summarize`) and
:func:`write_outputs` writes ``results.json``, ``results.csv``, ``results.md`` and
``curves.png``. ``seqnorm-jax compare`` is the command-line front end.

The default layers get group settings that suit the model: :func:`default_norm_specs`
takes the feature widths of the model's norm layers
(:func:`~seqnorm_jax.studies.engine.norm_widths`) and picks group counts that divide all
of them, and ghost batches that divide the batch.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

import jax

import seqnorm_jax.studies.report as report
from seqnorm_jax.registry import NormSpec
from seqnorm_jax.studies.engine import Setting, SourceCache, norm_widths, run_settings
from seqnorm_jax.studies.labels import DEFAULT_NORMS, LABELS
from seqnorm_jax.train.config import TrainConfig
from seqnorm_jax.train.files import claim_run_folder, is_writer

__all__ = ["DEFAULT_NORMS", "LABELS", "RESULT_FILES", "CompareResult", "compare", "default_norm_specs",
           "format_table", "model_norm_widths", "write_outputs"]

# What a comparison writes into its folder (its runs first: a folder holding runs/ holds one).
RESULT_FILES = ("runs", "results.json", "results.csv", "results.md", "curves.png")


def model_norm_widths(config: TrainConfig, image_shape: Sequence[int],
                      num_classes: int) -> list[int]:
    """The norm layers' feature widths of ``config.model`` (:func:`norm_widths`), computed
    once per study. The widths do not depend on the layer: the model is traced with
    BatchNorm, which fits any width, so no candidate's group settings have to fit yet."""
    from seqnorm_jax.train import build_model

    return norm_widths(build_model(config.replace(norm="bn"), num_classes), image_shape)


def _largest_divisor(candidates: Sequence[int], values: Sequence[int]) -> int:
    return next((g for g in candidates if all(v % g == 0 for v in values)), 1)


def default_norm_specs(widths: Sequence[int], batch_size: int,
                       norms: Sequence[str] = DEFAULT_NORMS) -> dict[str, str]:
    """``{label: norm spec}`` with group settings that fit the model and batch.

    * ghost batches of 16 examples (the "Four Things" medium-batch regime; paper 000
      uses 64 per ghost batch at batch 512) -- at least 2 ghost batches when the batch
      allows;
    * channel groups: 8 for GroupNorm and GN+ (32 in the papers' wide ResNets; the
      largest of 32, 16, 8, 4, 2 dividing every norm layer's width, capped at a quarter
      of the narrowest layer), 4 for SeqNorm's group step (paper 000's CIFAR-100 and
      ImageNet ``G_C``), with SeqNorm's ghost step as GhostNorm's;
    * HN: the paper's default (BN mean, variance pooled over all channels).

    Labels not in :data:`LABELS` are taken as specs themselves (``"bgn:num_groups=2"``).
    """
    narrow = min(widths) if widths else 1
    gn = _largest_divisor([g for g in (32, 16, 8, 4, 2) if g <= max(narrow // 4, 1)] or [1],
                          widths)
    gc = _largest_divisor([g for g in (4, 2) if g <= gn], widths)
    ghost_size = next((s for s in (16, 8, 4, 2) if batch_size % s == 0 and batch_size // s >= 2),
                      None)
    bg = batch_size // ghost_size if ghost_size else 1
    builtin = {"none": "none", "bn": "bn", "ghost": f"ghost:batch_groups={bg}",
               "gn": f"gn:num_groups={gn}",
               "seqnorm": f"seqnorm:channel_groups={gc},batch_groups={bg}", "hn": "hn",
               "gn+": f"gn+:num_groups={gn}", "bgn": "bgn:num_groups=1",
               "fourthings": f"fourthings:batch_groups={bg},channel_groups={gc}",
               "noisybn": "noisybn"}
    return {label: builtin.get(label.strip().lower(), label) for label in norms}


@dataclasses.dataclass
class CompareResult:
    """The runs of :func:`compare` and their summary.

    Attributes:
      specs: ``{label: norm spec}``.
      runs: one record per (label, seed): ``label``, ``spec``, ``seed`` and the per-epoch
        lists ``eval_accuracy``, ``eval_loss``, ``train_loss``, ``epoch_time``.
      summary: one row per label (:func:`~seqnorm_jax.studies.report.summarize`).
      settings: the shared settings (model, dataset, epochs, ...).
    """

    specs: dict[str, str]
    runs: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    settings: dict[str, Any]


def _split(settings: dict[str, Any]) -> str:
    return "validation" if (settings.get("config") or {}).get("validation_size") else "test"


def format_table(summary: Sequence[dict[str, Any]], split: str = "test") -> str:
    """The summary as a markdown table; ``split`` names where the accuracy is from
    (``"validation"`` when the runs held out a validation set)."""
    acc = report.accuracy_name(split)
    rows = []
    for r in summary:
        diverged = r.get("diverged", "0/")
        if r[f"{acc}_mean"] is None:
            rows.append([r["label"], f"`{r['spec']}`", f"diverged ({diverged})", "-", "-",
                         str(r["seeds"])])
            continue
        note = "" if diverged.startswith("0/") else f" (diverged {diverged})"
        rows.append([r["label"], f"`{r['spec']}`",
                     report.percent(r[f"{acc}_mean"], r[f"{acc}_std"]) + note,
                     f"{r['train_loss_mean']:.4f}", f"{r['epoch_time_mean']:.1f}",
                     str(r["seeds"])])
    return report.markdown_table(["layer", "spec", f"{split} accuracy (mean +- std)",
                                  "final train loss", "s/epoch", "seeds"], rows)


def write_outputs(result: CompareResult, out_dir: str | os.PathLike) -> dict[str, str]:
    """Write ``results.json``, ``results.csv``, ``results.md`` and ``curves.png``.

    Returns:
      ``{"json", "csv", "markdown", "plot"}``: the paths written.
    """
    paths = report.result_paths(os.fspath(out_dir), "results", "curves.png")
    if not is_writer():  # a multi-process run: process 0 writes
        return paths
    report.write_json(paths["json"], {"settings": result.settings, "specs": result.specs,
                                      "summary": result.summary, "runs": result.runs})
    report.write_csv(paths["csv"], result.summary)
    s = result.settings
    title = (f"{s['model']} on {s['dataset']} ({s['train_size'] or 'all'} train examples), "
             f"batch {s['batch_size']}, {s['epochs']} epochs, seeds {s['seeds']}")
    report.write_text(paths["markdown"], f"# Normalization layers compared\n\n{title}.\n\n"
                                         f"{format_table(result.summary, _split(s))}\n")
    report.plot_curves(result.runs, paths["plot"], title, _split(s))
    return paths


def _unfit(flag: str):
    """The message of a layer that does not fit the run, naming ``--flag`` and its spec."""
    def message(setting: Setting, e: ValueError) -> str:
        spec = setting.config.norm
        head, sep, tail = str(e).partition(" does not fit this run")
        return f"--{flag}: {spec!r} does not fit this run{tail}" if sep else \
            f"--{flag}: {spec!r}: {e}"
    return message


def compare(base: TrainConfig, *, norms: Sequence[str | NormSpec] = DEFAULT_NORMS,
            seeds: Sequence[int] = (0, 1), out_dir: str | os.PathLike = "runs/compare",
            progress: bool = True, flag: str = "norms",
            widths: Sequence[int] | None = None, resume: bool = False,
            overwrite: bool = False) -> CompareResult:
    """Train ``base`` once per layer in ``norms`` and seed in ``seeds``; write the outputs.

    Every run uses the same data (one load; ``base.train_size`` subset drawn once, with
    ``seeds[0]``), schedule and model; only ``norm`` and ``seed`` (initialisation, data
    order) change. Per-run metrics go to ``out_dir/runs/<label>_seed<k>/``; no
    checkpoints are written. Every layer is checked against the batch, the devices and
    the model before the first run trains. A run whose loss becomes non-finite stops
    there and is recorded as diverged (``runs[i]["diverged"]``, the ``diverged``
    column, marked in the table and plot); the other runs go on.

    Args:
      base: the shared configuration (its ``norm`` and ``seed`` are replaced).
      norms: labels of :func:`default_norm_specs`, norm spec texts (checked here, before
        any data is read) or parsed :class:`~seqnorm_jax.registry.NormSpec` objects.
      seeds: the seeds.
      out_dir: the output directory.
      progress: show progress bars.
      flag: how errors name the list of layers (``"norms"``: ``--norms``).
      widths: the model's norm-layer widths, when the caller knows them already
        (default: :func:`model_norm_widths`).
      resume: continue the comparison in ``out_dir``: finished runs are kept, a run
        stopped by a signal continues from its checkpoint, the others are trained
        (:func:`~seqnorm_jax.studies.engine.run_settings`).
      overwrite: delete an earlier comparison's files in ``out_dir`` first. Without
        ``resume`` or ``overwrite`` a folder holding one is refused.

    Returns:
      A :class:`CompareResult` (also written with :func:`write_outputs`).

    Raises:
      ValueError: a layer does not fit the run (before any training), or ``out_dir`` is
        in use by another run or holds an earlier comparison.
      Preempted: SIGTERM or SIGINT stopped it (resume with ``resume=True``).
      RunFileError: an output file cannot be written.
    """
    from seqnorm_jax.train.files import run_lock

    if not norms:
        raise ValueError("compare: norms is empty; name at least one layer, e.g. 'bn'.")
    if not seeds:
        raise ValueError("compare: seeds is empty; give at least one seed.")
    for norm in norms:  # a bad layer name fails here, before any data is read
        if isinstance(norm, str) and norm.strip().lower() not in LABELS:
            try:
                NormSpec.parse(norm)
            except ValueError as e:
                raise ValueError(f"--{flag}: {e}") from None
    norms = [str(norm) for norm in norms]  # parsed specs are labelled as they print
    out_dir = os.fspath(out_dir)
    seeds = [int(s) for s in seeds]
    base = base.replace(seed=seeds[0])
    with run_lock(out_dir, "out_dir (--out)"):
        claim_run_folder(out_dir, "out_dir (--out)", resume=resume, overwrite=overwrite,
                         files=RESULT_FILES, marks=RESULT_FILES[:1])
        t0 = time.perf_counter()
        sources = SourceCache(seeds[0])
        train_src, eval_src = sources(base)
        if widths is None:
            widths = model_norm_widths(base, train_src.info.image_shape,
                                       int(train_src.info.num_classes))
        specs = default_norm_specs(widths, base.batch_size, norms)
        settings = [Setting(label, base.replace(norm=spec)) for label, spec in specs.items()]
        runs = run_settings(settings, seeds, out_dir, sources=sources, unfit=_unfit(flag),
                            progress=progress, desc="compare",
                            split="validation" if base.validation_size else "test",
                            resume=resume)
        settings_row = dict(
            model=base.model, dataset=base.dataset, train_size=base.train_size,
            train_examples=len(train_src), test_examples=len(eval_src),
            batch_size=base.batch_size, epochs=base.epochs, lr=base.lr,
            optimizer=base.optimizer, schedule=base.schedule, weight_decay=base.weight_decay,
            dtype=base.dtype, seeds=seeds, norm_channels=list(widths), devices=jax.device_count(),
            backend=jax.default_backend(), total_seconds=round(time.perf_counter() - t0, 1),
            config=base.to_dict())
        result = CompareResult(specs=specs, runs=runs,
                               summary=report.summarize(runs, _split(settings_row)),
                               settings=settings_row)
        write_outputs(result, out_dir)
    return result

