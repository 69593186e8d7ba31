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
from seqnorm_jax.train.loop import Trainer, build_model, load_sources

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

    Columns: ``label``, ``spec``, ``seeds`` (count), ``test_accuracy_mean`` and
    ``test_accuracy_std`` (final epoch, sample std over seeds, 0 for one seed),
    ``best_test_accuracy_mean``, ``train_loss_mean`` / ``train_loss_std`` (mean training
    loss of the final epoch), ``epoch_time_mean`` (seconds per epoch, the first epoch
    left out when there are more, as it includes compilation).
    """
    out = []
    for label in dict.fromkeys(r["label"] for r in runs):
        rs = [r for r in runs if r["label"] == label]
        acc_m, acc_s = _mean_std([r["eval_accuracy"][-1] for r in rs])
        loss_m, loss_s = _mean_std([r["train_loss"][-1] for r in rs])
        times = [t for r in rs for t in (r["epoch_time"][1:] or r["epoch_time"])]
        out.append(dict(label=label, spec=rs[0]["spec"], seeds=len(rs),
                        test_accuracy_mean=acc_m, test_accuracy_std=acc_s,
                        best_test_accuracy_mean=float(np.mean(
                            [max(r["eval_accuracy"]) for r in rs])),
                        train_loss_mean=loss_m, train_loss_std=loss_s,
                        epoch_time_mean=float(np.mean(times))))
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
        lines.append(
            f"| {r['label']} | `{r['spec']}` | {100 * r['test_accuracy_mean']:.2f} +- "
            f"{100 * r['test_accuracy_std']:.2f} % | {r['train_loss_mean']:.4f} | "
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
        for ax, key in zip(axes, ("eval_accuracy", "train_loss")):
            curves = np.asarray([r[key] for r in rs], np.float64)
            epochs = np.arange(1, curves.shape[1] + 1)
            mean = curves.mean(0)
            std = curves.std(0, ddof=1) if len(rs) > 1 else np.zeros_like(mean)
            (line,) = ax.plot(epochs, mean, marker="o", ms=3, label=label)
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
    with open(paths["json"], "w") as f:
        json.dump({"settings": result.settings, "specs": result.specs,
                   "summary": result.summary, "runs": result.runs}, f, indent=2)
        f.write("\n")
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(result.summary[0]))
        writer.writeheader()
        writer.writerows(result.summary)
    s = result.settings
    title = (f"{s['model']} on {s['dataset']} ({s['train_size'] or 'all'} train examples), "
             f"batch {s['batch_size']}, {s['epochs']} epochs, seeds {s['seeds']}")
    with open(paths["markdown"], "w") as f:
        split = "validation" if (s.get("config") or {}).get("validation_size") else "test"
        f.write(f"# Normalization layers compared\n\n{title}.\n\n"
                f"{format_table(result.summary, split)}\n")
    _plot(result.runs, paths["plot"], title)
    return paths


def compare(base: TrainConfig, *, norms: Sequence[str] = DEFAULT_NORMS,
            seeds: Sequence[int] = (0, 1), out_dir: str | os.PathLike = "runs/compare",
            progress: bool = True) -> CompareResult:
    """Train ``base`` once per layer in ``norms`` and seed in ``seeds``; write the outputs.

    Every run uses the same data (one load; ``base.train_size`` subset drawn once, with
    ``seeds[0]``), schedule and model; only ``norm`` and ``seed`` (initialisation, data
    order) change. Per-run metrics go to ``out_dir/runs/<label>_seed<k>/``; no
    checkpoints are written.

    Args:
      base: the shared configuration (its ``norm`` and ``seed`` are replaced).
      norms: labels of :func:`default_norm_specs` or norm specs.
      seeds: the seeds.
      out_dir: the output directory.
      progress: show progress bars.

    Returns:
      A :class:`CompareResult` (also written with :func:`write_outputs`).
    """
    if not norms:
        raise ValueError("compare: norms is empty; name at least one layer, e.g. 'bn'.")
    if not seeds:
        raise ValueError("compare: seeds is empty; give at least one seed.")
    out_dir = os.fspath(out_dir)
    base = base.replace(seed=int(seeds[0]))
    train_src, eval_src = load_sources(base)
    num_classes = int(train_src.info.num_classes)
    channels = norm_channels(base, train_src.info.image_shape, num_classes)
    specs = default_norm_specs(channels, base.batch_size, norms)

    from tqdm.auto import tqdm

    runs = []
    jobs = [(label, spec, int(seed)) for label, spec in specs.items() for seed in seeds]
    outer = tqdm(jobs, desc="compare", disable=not progress, unit="run", dynamic_ncols=True)
    t0 = time.perf_counter()
    for label, spec, seed in outer:
        outer.set_postfix(layer=label, seed=seed, refresh=True)
        config = base.replace(norm=spec, seed=seed, progress=progress)
        run_dir = os.path.join(out_dir, "runs", f"{_safe(label)}_seed{seed}")
        result = Trainer(config, out_dir=run_dir, train_source=train_src, eval_source=eval_src,
                         save_checkpoints=False, desc=f"{label} seed {seed}").fit()
        rows = result.eval_rows
        runs.append(dict(label=label, spec=spec, seed=seed,
                         eval_accuracy=[r["eval_accuracy"] for r in rows],
                         eval_loss=[r["eval_loss"] for r in rows],
                         train_loss=[r["loss"] for r in rows],
                         train_accuracy=[r["accuracy"] for r in rows],
                         epoch_time=[r["epoch_time"] for r in rows]))
        if progress:
            outer.write(f"{label} seed {seed}: test accuracy {rows[-1]['eval_accuracy']:.4f}, "
                        f"train loss {rows[-1]['loss']:.4f}")
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


def _safe(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label.replace("+", "plus"))
