"""The registry of experiment kinds: what a kind adds to a study, in one entry each.

A paper experiment (:mod:`seqnorm_jax.studies.experiment`) names a *kind*. A
:class:`Kind` supplies everything the kind adds to the shared engine and report:

* ``options``: the ``analysis`` keys it reads;
* ``hooks(exp, trainer)``: Trainer step hooks for each run (recorders);
* ``analyse(exp, trainer, state, hooks, sources)``: the per-run analysis after
  training, JSON-ready, stored in the run's record under the kind's name;
* ``summary(exp, records)``: the kind's columns of a label's summary row;
* ``report(exp, out_dir, by_label, summary, title)``: its files and plots, returning
  ``(plots, markdown)`` (the plot names and the text added to ``results.md``);
* ``prepare(exp, records)``: records as they are saved (e.g. trajectories trimmed);
* ``run``: a kind that is not "settings x seeds" (``tune``) runs itself.

A new kind is one new entry of :data:`KINDS`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from seqnorm_jax.studies.report import jsonable, markdown_table, mean_std, write_csv

__all__ = ["KINDS", "Kind"]

Records = Sequence[Mapping[str, Any]]


def _none(*args) -> list[Any]:
    return []


def _nothing(*args) -> dict[str, Any]:
    return {}


def _no_report(*args) -> tuple[list[str], str]:
    return [], ""


def _same(exp, records: Records) -> Records:
    return records


@dataclasses.dataclass(frozen=True)
class Kind:
    """One experiment kind (see the module docstring)."""

    name: str
    options: tuple[str, ...] = ()
    hooks: Callable[..., list[Any]] = _none
    analyse: Callable[..., dict[str, Any]] = _nothing
    summary: Callable[..., dict[str, Any]] = _nothing
    report: Callable[..., tuple[list[str], str]] = _no_report
    prepare: Callable[..., Records] = _same
    scores_test: bool = True  # a validated run also scores the test split once, at the end
    baseline: bool = True  # accepts analysis.baseline (paired differences)
    run: Callable[..., dict[str, Any]] | None = None


# ---------------------------------------------------------------------------- landscape


def _landscape_hooks(exp, trainer) -> list[Any]:
    from seqnorm_jax.analysis import LandscapeRecorder

    a = exp.analysis
    kwargs = {k: a[k] for k in ("step_sizes", "every") if k in a}
    if a.get("relative_to_lr"):
        kwargs["lr_schedule"] = trainer.schedule
    return [LandscapeRecorder(**kwargs)]


def _landscape_summary(exp, rs: Records) -> dict[str, Any]:
    from seqnorm_jax.analysis import summarize_landscape

    s = summarize_landscape([r["landscape"] for r in rs])
    return {k: v for k, v in s.items() if isinstance(v, (int, float))}


def _landscape_report(exp, out_dir, by_label, summary, title):
    from seqnorm_jax.analysis import plot_landscape

    plot_landscape({k: [r["landscape"] for r in v] for k, v in by_label.items()},
                   os.path.join(out_dir, "landscape.png"), title=title,
                   smooth=int(exp.analysis.get("smooth", 1)))
    return ["landscape.png"], ""


# ---------------------------------------------------------------------------- fluctuation

FLUCTUATION_KEYS = ("bn_mean_fluct", "bn_std_fluct", "en_mean_fluct", "en_std_fluct")


def _trajectory_neurons(exp) -> int:
    """How many neurons' trajectories a fluctuation result keeps (the summary covers all)."""
    return int(exp.analysis.get("trajectory_neurons", 2))


def _fluctuation_hooks(exp, trainer) -> list[Any]:
    from seqnorm_jax.analysis import StatisticsRecorder

    return [StatisticsRecorder(last_steps=int(exp.analysis.get("last_steps", 200)),
                               total_steps=trainer.total_steps)]


def _fluctuation_prepare(exp, records: Records) -> Records:
    from seqnorm_jax.analysis.fluctuation import keep_neurons

    n = _trajectory_neurons(exp)
    return [{**r, "fluctuation": keep_neurons(r["fluctuation"], n)} if "fluctuation" in r
            else r for r in records]


def _fluctuation_summary(exp, rs: Records) -> dict[str, Any]:
    per_layer = [r["fluctuation"]["summary"] for r in rs]
    out = {}
    for i in range(len(per_layer[0])):
        for key in FLUCTUATION_KEYS:
            out[f"layer{i}_{key}_mean"], out[f"layer{i}_{key}_std"] = mean_std(
                p[i][key] for p in per_layer)
    return out


def _fluctuation_report(exp, out_dir, by_label, summary, title):
    from seqnorm_jax.analysis import plot_fluctuation

    # the per-layer means and stds over seeds that the summary holds
    flat = [{"run": row["label"], "layer": layer["layer"],
             **{f"{key}_{stat}": row[f"layer{i}_{key}_{stat}"]
                for key in FLUCTUATION_KEYS for stat in ("mean", "std")}}
            for row in summary if row["label"] in by_label
            for i, layer in enumerate(by_label[row["label"]][0]["fluctuation"]["summary"])]
    write_csv(os.path.join(out_dir, "fluctuation.csv"), flat)
    plot_fluctuation({k: v[0]["fluctuation"] for k, v in by_label.items()},
                     os.path.join(out_dir, "fluctuation.png"))
    table = markdown_table(
        ["run", "layer", "BN mean fluct.", "BN std fluct.", "EN mean fluct.", "EN std fluct."],
        ([item["run"], str(item["layer"]),
          *(f"{item[k + '_mean']:.4g} +- {item[k + '_std']:.2g}" for k in FLUCTUATION_KEYS)]
         for item in flat))
    return ["fluctuation.png"], ("\n\n## Statistics fluctuation (std over steps; mean +- std "
                                 "over seeds)\n\n" + table)


def _fluctuation_analyse(exp, trainer, state, hooks, sources) -> dict[str, Any]:
    return {"fluctuation": hooks[0].to_dict(neurons=_trajectory_neurons(exp))}


# ---------------------------------------------------------------------------- example weight


def _example_weight_analyse(exp, trainer, state, hooks, sources) -> dict[str, Any]:
    from seqnorm_jax.analysis import best_example_weight, example_weight_sweep

    config = trainer.config
    alphas = [float(v) for v in exp.analysis.get("example_weights", [0.0, 0.25, 0.5, 0.75, 1.0])]
    out: dict[str, Any] = {"example_weight": example_weight_sweep(
        state, trainer.eval_source, alphas, batch_size=config.eval_batch_size,
        mesh=trainer.mesh)}
    if config.validation_size:
        best = best_example_weight(out["example_weight"])
        rows = example_weight_sweep(state, sources.test_split(config), sorted({0.0, float(best)}),
                                    batch_size=config.eval_batch_size, mesh=trainer.mesh)
        out["example_weight_test"] = {"chosen_on_validation": float(best), "rows": rows}
    return out


def _example_weight_summary(exp, rs: Records) -> dict[str, Any]:
    from seqnorm_jax.analysis import best_example_weight

    curves = [r["example_weight"] for r in rs]
    out = {}
    for j, row in enumerate(curves[0]):
        out[f"acc_at_{row['example_weight']:g}_mean"], out[
            f"acc_at_{row['example_weight']:g}_std"] = mean_std(c[j]["eval_accuracy"]
                                                                for c in curves)
    out["best_example_weight_mean"] = float(np.mean([best_example_weight(c) for c in curves]))
    out["best_gain_mean"], out["best_gain_std"] = mean_std(
        max(x["eval_accuracy"] for x in c) - c[0]["eval_accuracy"] for c in curves)
    return out


def _example_weight_table(by_label) -> str:
    rows = []
    for lab, rs in by_label.items():
        for j, row in enumerate(rs[0]["example_weight"]):
            acc = mean_std(r["example_weight"][j]["eval_accuracy"] for r in rs)
            loss = mean_std(r["example_weight"][j]["eval_loss"] for r in rs)
            rows.append([lab, f"{row['example_weight']:g}",
                         f"{100 * acc[0]:.2f} +- {100 * acc[1]:.2f} %", f"{loss[0]:.4f}"])
    text = markdown_table(["run", "alpha", "eval accuracy (mean +- std over seeds)",
                           "eval loss"], rows)
    tests = [(lab, r["seed"], r["example_weight_test"]) for lab, rs in by_label.items()
             for r in rs if "example_weight_test" in r]
    if not tests:
        return text
    per_seed, gains = [], {}
    for lab, seed, t in tests:
        acc = {row["example_weight"]: row["eval_accuracy"] for row in t["rows"]}
        a = t["chosen_on_validation"]
        gains.setdefault(lab, []).append(acc[a] - acc[0.0])
        per_seed.append([lab, str(seed), f"{a:g}", f"{100 * acc[0.0]:.2f} %",
                         f"{100 * acc[a]:.2f} %", f"{100 * (acc[a] - acc[0.0]):+.2f}"])
    means = [[lab, "{:+.2f} +- {:.2f} points".format(*(100 * v for v in mean_std(g)))]
             for lab, g in gains.items()]
    return "\n".join([
        text, "", "Alpha chosen on the validation set, applied to the test split:", "",
        markdown_table(["run", "seed", "chosen alpha", "test accuracy at 0",
                        "at the chosen alpha", "gain"], per_seed), "",
        markdown_table(["run", "test gain from the chosen alpha (mean +- std over seeds)"],
                       means)])


def _example_weight_report(exp, out_dir, by_label, summary, title):
    from seqnorm_jax.analysis import plot_example_weight

    plot_example_weight({k: [r["example_weight"] for r in v] for k, v in by_label.items()},
                        os.path.join(out_dir, "example_weight.png"), title=title)
    write_csv(os.path.join(out_dir, "example_weight.csv"), [
        {"run": r["label"], "seed": r["seed"], **{k: row[k] for k in (
            "example_weight", "eval_accuracy", "eval_loss")}}
        for rs in by_label.values() for r in rs for row in r["example_weight"]])
    return ["example_weight.png"], "\n\n" + _example_weight_table(by_label)


# ---------------------------------------------------------------------------- output range


def _output_range_analyse(exp, trainer, state, hooks, sources) -> dict[str, Any]:
    from seqnorm_jax import data
    from seqnorm_jax.analysis import output_range

    a, config = exp.analysis, trainer.config
    n = int(a.get("num_examples", 256))
    n = min(n, config.batch_size) if exp.scale == "smoke" else n
    batch = next(iter(data.make_loader(trainer.train_source, batch_size=n, train=False,
                                       drop_remainder=True)))
    variables = {"params": state.params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    result = output_range(trainer.model, variables, np.asarray(batch["image"]),
                          a.get("layer", -1), example_weight=float(a.get("example_weight", 0.0)))
    return {"output_range": jsonable(result)}


def _output_range_summary(exp, rs: Records) -> dict[str, Any]:
    o = [r["output_range"] for r in rs]
    return {"set_size": o[0].get("set_size"), "bound": o[0].get("bound"),
            "train_abs_max_mean": float(np.mean([x["train_abs_max"] for x in o])),
            "eval_abs_max_mean": float(np.mean([x["eval_abs_max"] for x in o]))}


def _output_range_report(exp, out_dir, by_label, summary, title):
    from seqnorm_jax.analysis import plot_output_range

    plot_output_range({k: v[0]["output_range"] for k, v in by_label.items()},
                      os.path.join(out_dir, "output_range.png"), title=title)
    return ["output_range.png"], ""


# ---------------------------------------------------------------------------- tune


def _run_tune(exp, out_dir: str, progress: bool, resume: bool = False) -> dict[str, Any]:
    from seqnorm_jax.studies.tune import sequential_tune
    from seqnorm_jax.train import TrainConfig

    base = TrainConfig.from_dict({**exp.base, "progress": progress and exp.scale != "smoke"})
    kwargs = {k: tuple(exp.analysis[k]) for k in ("batch_groups", "channel_groups")
              if k in exp.analysis}
    kwargs.update({k: exp.analysis[k] for k in ("tolerance", "metric", "norm_fields")
                   if k in exp.analysis})
    result = sequential_tune(base, seeds=tuple(exp.seeds), out_dir=out_dir, progress=progress,
                             resume=resume, **kwargs)
    return {"tune": jsonable(result.to_dict())}


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("compare"),
    Kind("landscape", ("step_sizes", "every", "relative_to_lr", "smooth"),
         hooks=_landscape_hooks, analyse=lambda exp, t, s, hooks, src: {
             "landscape": hooks[0].rows},
         summary=_landscape_summary, report=_landscape_report),
    Kind("fluctuation", ("last_steps", "trajectory_neurons"), hooks=_fluctuation_hooks,
         analyse=_fluctuation_analyse, summary=_fluctuation_summary,
         report=_fluctuation_report, prepare=_fluctuation_prepare),
    Kind("example_weight", ("example_weights",), analyse=_example_weight_analyse,
         summary=_example_weight_summary, report=_example_weight_report, scores_test=False),
    Kind("output_range", ("layer", "example_weight", "num_examples"),
         analyse=_output_range_analyse, summary=_output_range_summary,
         report=_output_range_report),
    Kind("tune", ("batch_groups", "channel_groups", "tolerance", "metric", "norm_fields"),
         baseline=False, run=_run_tune),
)}
"""The experiment kinds, by name: what a study of each kind records and reports."""
