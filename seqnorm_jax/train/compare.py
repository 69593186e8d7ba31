"""Compare normalization layers: one model, several layers, several seeds, one table and plot.

:func:`compare` trains the same model (same data, schedule and seeds) once per layer and
seed, then :func:`summarize` reduces the runs to one row per layer (test accuracy mean and
standard deviation over seeds, final training loss, seconds per epoch) and
:func:`write_outputs` writes ``results.json``, ``results.csv``, ``results.md`` and
``curves.png`` (test accuracy and training loss per epoch, mean and a +-1 std band over
the seeds). ``seqnorm-jax compare`` is the command-line front end.

The default layers get group settings that suit the model: :func:`default_norm_specs`
reads the channel counts of the model's norm layers and picks group counts that divide
all of them, and ghost batches that divide the batch.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from seqnorm_jax.train.config import TrainConfig
from seqnorm_jax.train.lock import run_lock
from seqnorm_jax.train.loop import Trainer, build_model, load_sources
from seqnorm_jax.train.metrics import RunFileError, _opened

__all__ = [
    "DEFAULT_NORMS",
    "CompareResult",
    "compare",
    "default_norm_specs",
    "norm_channels",
    "summarize",
    "write_outputs",
]

# The layers of the default comparison, by short label.
DEFAULT_NORMS = ("none", "bn", "ghost", "gn", "seqnorm", "hn", "gn+")


def norm_channels(config: TrainConfig, image_shape: Sequence[int], num_classes: int) -> list[int]:
    """The channel counts of the norm layers of ``config.model`` (built with BatchNorm).

    Found by initialising the model once and recording the feature size of every call
    to a norm layer.
    """
    from flax import linen as nn

    from seqnorm_jax.linen import BatchNorm

    model = build_model(dataclasses.replace(config, norm="bn"), num_classes)
    channels: list[int] = []

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, BatchNorm):
            channels.append(int(args[0].shape[-1]))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                       jax.ShapeDtypeStruct((2, *image_shape), np.float32))
    return channels


def _largest_divisor(candidates: Sequence[int], values: Sequence[int]) -> int:
    for g in candidates:
        if all(v % g == 0 for v in values):
            return g
    return 1


def default_norm_specs(channels: Sequence[int], batch_size: int,
                       norms: Sequence[str] = DEFAULT_NORMS) -> dict[str, str]:
    """``{label: norm_factory spec}`` with group settings that fit the model and batch.

    * ghost batches of 16 examples (the "Four Things" medium-batch regime; paper 000
      uses 64 per ghost batch at batch 512) -- at least 2 ghost batches when the batch
      allows;
    * channel groups: 8 for GroupNorm and GN+ (32 in the papers' wide ResNets; the
      largest of 32, 16, 8, 4, 2 dividing every norm layer's width, capped at a quarter
      of the narrowest layer), 4 for SeqNorm's group step (paper 000's CIFAR-100 and
      ImageNet ``G_C``), with SeqNorm's ghost step as GhostNorm's;
    * HN: the paper's default (BN mean, variance pooled over all channels).

    Labels not in the built-in set are taken as specs themselves (``"bgn:num_groups=2"``).
    """
    narrow = min(channels) if channels else 1
    gn = _largest_divisor([g for g in (32, 16, 8, 4, 2) if g <= max(narrow // 4, 1)] or [1],
                          channels)
    gc = _largest_divisor([g for g in (4, 2) if g <= gn], channels)
    ghost_size = next((s for s in (16, 8, 4, 2) if batch_size % s == 0 and batch_size // s >= 2),
                      None)
    batch_groups = batch_size // ghost_size if ghost_size else 1
    builtin = {
        "none": "none",
        "bn": "bn",
        "ghost": f"ghost:batch_groups={batch_groups}",
        "gn": f"gn:num_groups={gn}",
        "seqnorm": f"seqnorm:channel_groups={gc},batch_groups={batch_groups}",
        "hn": "hn",
        "gn+": f"gn+:num_groups={gn}",
        "bgn": "bgn:num_groups=1",
        "fourthings": f"fourthings:batch_groups={batch_groups},channel_groups={gc}",
        "noisybn": "noisybn",
    }
    return {label: builtin.get(label.strip().lower(), label) for label in norms}


@dataclasses.dataclass
class CompareResult:
    """The runs of :func:`compare` and their summary.

    Attributes:
      specs: ``{label: norm spec}``.
      runs: one dict per (label, seed): ``label``, ``spec``, ``seed`` and the per-epoch
        lists ``eval_accuracy``, ``eval_loss``, ``train_loss``, ``epoch_time``.
      summary: one dict per label, see :func:`summarize`.
      settings: the shared settings (model, dataset, epochs, ...).
    """

    specs: dict[str, str]
    runs: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    settings: dict[str, Any]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(values, np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per layer label, in the order of first appearance.

    Columns: ``label``, ``spec``, ``seeds`` (count), ``diverged`` (``"k/n"``: seeds whose
    training loss became non-finite), ``test_accuracy_mean`` and ``test_accuracy_std``
    (final epoch, sample std over seeds, 0 for one seed), ``best_test_accuracy_mean``,
    ``train_loss_mean`` / ``train_loss_std`` (mean training loss of the final epoch),
    ``epoch_time_mean`` (seconds per epoch, the first epoch left out when there are more,
    as it includes compilation). The numbers are over the seeds that did not diverge;
    ``None`` when every seed diverged.
    """
    out = []
    for label in dict.fromkeys(r["label"] for r in runs):
        rs = [r for r in runs if r["label"] == label]
        ok = [r for r in rs if not r.get("diverged") and r["eval_accuracy"]]
        row = dict(label=label, spec=rs[0]["spec"], seeds=len(rs),
                   diverged=f"{len(rs) - len(ok)}/{len(rs)}", test_accuracy_mean=None,
                   test_accuracy_std=None, best_test_accuracy_mean=None, train_loss_mean=None,
                   train_loss_std=None, epoch_time_mean=None)
        if ok:
            acc_m, acc_s = _mean_std([r["eval_accuracy"][-1] for r in ok])
            loss_m, loss_s = _mean_std([r["train_loss"][-1] for r in ok])
            times = [t for r in ok for t in (r["epoch_time"][1:] or r["epoch_time"])]
            row.update(test_accuracy_mean=acc_m, test_accuracy_std=acc_s,
                       best_test_accuracy_mean=float(np.mean(
                           [max(r["eval_accuracy"]) for r in ok])),
                       train_loss_mean=loss_m, train_loss_std=loss_s,
                       epoch_time_mean=float(np.mean(times)))
        out.append(row)
    return out


def format_table(summary: Sequence[dict[str, Any]], evaluated_on: str = "test") -> str:
    """The summary as a markdown table (also readable as plain text).

    ``evaluated_on`` names the split the accuracy is from (``"validation"`` when the runs
    held out a validation set; the ``test_accuracy_*`` columns then hold that accuracy).
    """
    lines = [f"| layer | spec | {evaluated_on} accuracy (mean +- std) | final train loss | "
             "s/epoch | seeds |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in summary:
        diverged = r.get("diverged", "0/")
        note = "" if diverged.startswith("0/") else f" (diverged {diverged})"
        if r["test_accuracy_mean"] is None:
            lines.append(f"| {r['label']} | `{r['spec']}` | diverged ({diverged}) | - | - | "
                         f"{r['seeds']} |")
            continue
        lines.append(
            f"| {r['label']} | `{r['spec']}` | {100 * r['test_accuracy_mean']:.2f} +- "
            f"{100 * r['test_accuracy_std']:.2f} %{note} | {r['train_loss_mean']:.4f} | "
            f"{r['epoch_time_mean']:.1f} | {r['seeds']} |")
    return "\n".join(lines)


def _plot(runs: Sequence[dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for label in dict.fromkeys(r["label"] for r in runs):
        rs = [r for r in runs if r["label"] == label]
        ok = [r for r in rs if not r.get("diverged") and r["eval_accuracy"]]
        n_div = len(rs) - len(ok)
        for ax, key in zip(axes, ("eval_accuracy", "train_loss")):
            if not ok:  # every seed diverged: a labelled marker at epoch 1, no curve
                ax.plot([], [], marker="x", ls="none", label=f"{label} (diverged)")
                continue
            length = max(len(r[key]) for r in ok)
            curves = np.asarray([list(r[key]) + [np.nan] * (length - len(r[key])) for r in ok],
                                np.float64)
            epochs = np.arange(1, length + 1)
            mean = np.nanmean(curves, 0)
            std = (np.nanstd(curves, 0, ddof=1) if len(ok) > 1 else np.zeros_like(mean))
            name = label if not n_div else f"{label} ({n_div}/{len(rs)} diverged)"
            (line,) = ax.plot(epochs, mean, marker="o", ms=3, label=name)
            ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    axes[0].set(xlabel="epoch", ylabel="test accuracy", title="test accuracy")
    axes[1].set(xlabel="epoch", ylabel="train loss", title="training loss (epoch mean)")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: CompareResult, out_dir: str | os.PathLike) -> dict[str, str]:
    """Write ``results.json``, ``results.csv``, ``results.md`` and ``curves.png``.

    Returns:
      ``{"json", "csv", "markdown", "plot"}``: the paths written.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f) for k, f in (
        ("json", "results.json"), ("csv", "results.csv"), ("markdown", "results.md"),
        ("plot", "curves.png"))}
    payload = strict_json({"settings": result.settings, "specs": result.specs,
                           "summary": result.summary, "runs": result.runs})
    with _opened(paths["json"], "w") as f:
        json.dump(payload, f, indent=2, allow_nan=False)
        f.write("\n")
    with _opened(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(result.summary[0]))
        writer.writeheader()
        writer.writerows(result.summary)
    s = result.settings
    title = (f"{s['model']} on {s['dataset']} ({s['train_size'] or 'all'} train examples), "
             f"batch {s['batch_size']}, {s['epochs']} epochs, seeds {s['seeds']}")
    with _opened(paths["markdown"], "w") as f:
        split = "validation" if (s.get("config") or {}).get("validation_size") else "test"
        f.write(f"# Normalization layers compared\n\n{title}.\n\n"
                f"{format_table(result.summary, split)}\n")
    try:
        _plot(result.runs, paths["plot"], title)
    except OSError as e:
        raise RunFileError(paths["plot"], e.strerror or str(e)) from e
    return paths


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


def compare(base: TrainConfig, *, norms: Sequence[str] = DEFAULT_NORMS,
            seeds: Sequence[int] = (0, 1), out_dir: str | os.PathLike = "runs/compare",
            progress: bool = True, flag: str = "norms") -> CompareResult:
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
      norms: labels of :func:`default_norm_specs` or norm specs.
      seeds: the seeds.
      out_dir: the output directory.
      progress: show progress bars.
      flag: how errors name the list of layers (``"norms"``: ``--norms``).

    Returns:
      A :class:`CompareResult` (also written with :func:`write_outputs`).

    Raises:
      ValueError: a layer does not fit the run (before any training), or ``out_dir`` is
        in use by another run.
      RunFileError: an output file cannot be written.
    """
    if not norms:
        raise ValueError("compare: norms is empty; name at least one layer, e.g. 'bn'.")
    if not seeds:
        raise ValueError("compare: seeds is empty; give at least one seed.")
    out_dir = os.fspath(out_dir)
    base = base.replace(seed=int(seeds[0]))
    with run_lock(out_dir, "out_dir (--out)"):
        return _compare(base, norms, seeds, out_dir, progress, flag)


def check_specs(base: TrainConfig, specs: dict[str, str], train_src, eval_src,
                flag: str = "norms", make=None) -> dict[str, Trainer]:
    """Check every spec against the batch, the devices and the model's widths (no training).

    Args:
      make: ``make(label, spec) -> Trainer`` (default: a :class:`Trainer` of ``base`` with
        that norm); a Trainer checks its norm layers when it is built.

    Returns:
      ``{label: trainer}``, the trainers built for the check.

    Raises:
      ValueError: the first spec that does not fit, naming ``flag`` and the spec.
    """
    if make is None:
        make = lambda label, spec: Trainer(base.replace(norm=spec), train_source=train_src,
                                           eval_source=eval_src)
    trainers = {}
    for label, spec in specs.items():
        try:
            trainers[label] = make(label, spec)
        except ValueError as e:
            text = str(e).split(" does not fit this run", 1)
            if len(text) == 2:
                raise ValueError(f"--{flag}: {spec!r} does not fit this run{text[1]}") from None
            raise ValueError(f"--{flag}: {spec!r}: {e}") from None
    return trainers


def _compare(base, norms, seeds, out_dir, progress, flag):
    train_src, eval_src = load_sources(base)
    num_classes = int(train_src.info.num_classes)
    channels = norm_channels(base, train_src.info.image_shape, num_classes)
    specs = default_norm_specs(channels, base.batch_size, norms)

    def make(label, spec, seed):
        config = base.replace(norm=spec, seed=seed, progress=progress)
        return Trainer(config, out_dir=os.path.join(out_dir, "runs", f"{_safe(label)}_seed{seed}"),
                       train_source=train_src, eval_source=eval_src, save_checkpoints=False,
                       desc=f"{label} seed {seed}")

    # every layer checked before the first run trains; the first seed's trainers are used
    first = check_specs(base, specs, train_src, eval_src, flag,
                        make=lambda label, spec: make(label, spec, int(seeds[0])))

    from tqdm.auto import tqdm

    runs = []
    jobs = [(label, spec, int(seed)) for label, spec in specs.items() for seed in seeds]
    outer = tqdm(jobs, desc="compare", disable=not progress, unit="run", dynamic_ncols=True)
    t0 = time.perf_counter()
    for label, spec, seed in outer:
        outer.set_postfix(layer=label, seed=seed, refresh=True)
        trainer = (first.pop(label) if seed == int(seeds[0]) and label in first
                   else make(label, spec, seed))
        result = trainer.fit()
        runs.append(run_record(result, label=label, spec=spec, seed=seed))
        if progress:
            outer.write(_run_line(label, seed, runs[-1]))
    outer.close()
    settings = dict(model=base.model, dataset=base.dataset, train_size=base.train_size,
                    train_examples=len(train_src), test_examples=len(eval_src),
                    batch_size=base.batch_size, epochs=base.epochs, lr=base.lr,
                    optimizer=base.optimizer, schedule=base.schedule,
                    weight_decay=base.weight_decay, dtype=base.dtype, seeds=list(seeds),
                    norm_channels=channels, devices=jax.device_count(),
                    backend=jax.default_backend(),
                    total_seconds=round(time.perf_counter() - t0, 1), config=base.to_dict())
    result = CompareResult(specs=specs, runs=runs, summary=summarize(runs), settings=settings)
    write_outputs(result, out_dir)
    return result


def run_record(result, **fields) -> dict[str, Any]:
    """One run of a study: ``fields`` and the per-epoch lists of a :class:`FitResult`
    (``eval_accuracy``, ``eval_loss``, ``train_loss``, ``train_accuracy``,
    ``epoch_time``), plus ``diverged`` (``None`` or ``{"step", "loss"}``)."""
    rows = result.eval_rows
    return dict(**fields, eval_accuracy=[r["eval_accuracy"] for r in rows],
                eval_loss=[r["eval_loss"] for r in rows], train_loss=[r["loss"] for r in rows],
                train_accuracy=[r["accuracy"] for r in rows],
                epoch_time=[r["epoch_time"] for r in rows],
                diverged=None if result.diverged is None else
                {"step": result.diverged["step"], "loss": result.diverged["loss"]})


def _run_line(label, seed, record) -> str:
    if record["diverged"]:
        return (f"{label} seed {seed}: diverged at step {record['diverged']['step']} (loss "
                f"{record['diverged']['loss']:.4g})")
    return (f"{label} seed {seed}: test accuracy {record['eval_accuracy'][-1]:.4f}, "
            f"train loss {record['train_loss'][-1]:.4f}")


def _safe(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label.replace("+", "plus"))
