"""The paper table of ``seqnorm-jax plan --paper-table``: every packaged paper config at
full scale planned for a TPU pod (:mod:`seqnorm_jax.train.plan`), each distinct step
compiled once and cached.

A cached step is keyed by the fields that change what the step computes
(:func:`step_key`) and served while the code that builds steps is unchanged
(:func:`code_fingerprint`) or, after a change, while the lowered program is (the step is
lowered again, in seconds, and compared): a change to the package recompiles only the
steps whose program it changed.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

from seqnorm_jax import aot
from seqnorm_jax.train.config import TrainConfig
from seqnorm_jax.train.plan import (
    DoesNotFitError,
    format_bytes,
    format_seconds,
    installed_versions,
    lower_step,
    train_examples,
)

__all__ = ["TABLE_TOPOLOGIES", "cached_step", "code_fingerprint", "plan_table", "plot_table",
           "step_key", "table_topology"]

# The table's topologies: a config runs on 8 TPU v5e chips (one v5litepod-8 host) when
# every batch of it splits over 8, else on one chip.
TABLE_TOPOLOGIES = ("v5e:2x4", "v5e:1x1")
# Compile order: the cheaper models first, so a partial table has a row for most configs.
_MODEL_ORDER = ("simplenet", "mlp", "mlp4", "cnn", "resnet20", "vgg11", "resnet56", "resnet18",
                "resnet50", "wrn28_10")
_STEP_FIELDS = ("model", "model_kwargs", "norm", "dtype", "dataset", "batch_size",
                "grad_accum_steps", "optimizer", "grad_clip_norm", "output_noise_mean",
                "output_noise_std", "on_divergence", "log_every")


# The parts of the package a training step is not built from: a change there leaves the
# code fingerprint, and so every cached step's fast path, as it is.
_NOT_IN_THE_STEP = ("cli", "studies", "analysis", "data", os.path.join("train", "plan.py"),
                    os.path.join("train", "plan_table.py"))


@functools.cache
def code_fingerprint() -> str:
    """A hash of the package's sources that build a training step (layers, statistics,
    models, the train step and optimizer) and the installed jax, jaxlib and compilers: a
    cached step recorded with this fingerprint is served without lowering anything."""
    import hashlib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha1()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            if name.endswith(".py") and not rel.startswith(_NOT_IN_THE_STEP):
                h.update(rel.encode())
                with open(path, "rb") as f:
                    h.update(f.read())
    h.update(installed_versions("jax", "jaxlib", "libtpu", "jax-cuda12-plugin").encode())
    return h.hexdigest()[:12]


def step_key(config: TrainConfig, topology: str, image_shape=None) -> str:
    """The cache file of ``config``'s step on ``topology``: the fields that change what
    the step computes (model, norm, dtype, batch, optimizer, ...), not those that only set
    its constants (learning rates, epochs). Whether the file's step is still the one this
    code builds is :func:`cached_step`'s question."""
    import hashlib
    import json

    fields = {k: getattr(config, k) for k in _STEP_FIELDS}
    fields["grad_clip_norm"] = fields["grad_clip_norm"] is not None
    fields.update(topology=topology, image_shape=list(image_shape or ()))
    return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def table_topology(configs: Sequence[TrainConfig], topologies=TABLE_TOPOLOGIES) -> str:
    """The first of ``topologies`` over whose chips every config's batch splits."""
    for name in topologies:
        chips = aot.parse_topology(name)[1].split("x")
        n = math.prod(int(d) for d in chips)
        if all(c.batch_size % n == 0 for c in configs):
            return name
    return topologies[-1]


def cached_step(config: TrainConfig, topology: str, cache_dir: str, *, image_shape=None,
                progress: Callable[[str], None] | None = None,
                compile: bool = True) -> dict[str, Any] | None:
    """:meth:`StepPlan.to_dict` of ``config``'s step on ``topology``, from
    ``cache_dir/<step_key>.json`` or compiled and stored there; a config that cannot be
    planned is stored as ``{"error": message}``.

    A cached step is served only if it is the program this code compiles: the file
    records the :func:`code_fingerprint` and the :meth:`LoweredStep.program_fingerprint`
    it was compiled from. The same code fingerprint serves it at once; otherwise the step
    is lowered (seconds, no compile) and served if the program is unchanged (the file then
    records the new code fingerprint), else compiled again. So a change to the package
    recompiles only the steps whose program it changed. With ``compile=False`` a step that
    would have to compile is ``None`` instead (nothing is compiled or written for it)."""
    import json

    path = os.path.join(cache_dir, step_key(config, topology, image_shape) + ".json")
    entry = None
    if os.path.exists(path):
        with open(path) as f:
            entry = json.load(f)
        if entry.get("code") == code_fingerprint():
            return entry["step"]
    if entry is None and not compile:
        return None
    try:
        lowered = lower_step(config, topology, image_shape=image_shape)
        program = lowered.program_fingerprint()
        if entry is not None and entry.get("program") == program:
            step = entry["step"]
        elif not compile:
            return None
        else:
            step = lowered.compile(progress).to_dict()
    except ValueError as err:
        program = None
        step = {"error": str(err), "does_not_fit": isinstance(err, DoesNotFitError)}
    os.makedirs(cache_dir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"code": code_fingerprint(), "program": program, "step": step}, f,
                  indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)
    return step


def _run_plan(config: TrainConfig, step: dict[str, Any]) -> float | None:
    """The training seconds of ``config`` at the cached ``step``'s roofline time."""
    if "error" in step:
        return None
    spe = max(train_examples(config) // config.batch_size, 1)
    return step["step_seconds"] * spe * config.epochs


def plan_table(names: Sequence[str], cache_dir: str, *, topologies=TABLE_TOPOLOGIES,
               out: str | None = None, progress: Callable[[str], None] | None = None,
               compile: bool = True, plot: str | os.PathLike | None = None) -> str:
    """The paper configs ``names`` at full scale, one row each: the topology, the runs
    planned, the roofline step time, the training time of all runs and seeds, the peak
    memory per chip against HBM. Steps compile once each, cached in ``cache_dir``, the
    cheapest models first and one run of every config before the second of any, so the
    table can be built over several sittings; with ``out`` it is rewritten after every
    compile. ``compile=False`` gives the table of the steps the cache holds for this code,
    compiling nothing (a cached step from other code is lowered to check its program).
    With ``plot`` the finished table is also drawn there (:func:`plot_table`)."""
    from seqnorm_jax.studies.experiment import load_experiment

    if plot is not None and not os.fspath(plot).endswith(".png"):
        raise ValueError(f"plot={os.fspath(plot)!r} is drawn as a PNG: give a path ending "
                         "in .png.")
    exps = [load_experiment(n).resolve("full") for n in names]
    rows = []
    for exp in exps:
        configs = [c for _, c in exp.configs()]
        rows.append(dict(exp=exp, configs=configs, topology=table_topology(configs, topologies),
                         steps={}))
    rank = {m: i for i, m in enumerate(_MODEL_ORDER)}

    def cost(row):
        return max((rank.get(c.model, len(rank)) for c in row["configs"]), default=0)

    order = sorted(rows, key=cost)
    longest = max((len(r["configs"]) for r in rows), default=0)

    def save() -> str:
        text = _table(rows)
        if out is not None:
            with open(out, "w") as f:
                f.write(text)
        return text

    for i in range(longest):
        for row in order:
            if i >= len(row["configs"]):
                continue
            c = row["configs"][i]
            step = cached_step(c, row["topology"], cache_dir, compile=compile,
                               image_shape=row["exp"].image_shape, progress=progress)
            if step is None:
                continue
            row["steps"][i] = step
            save()
    text = save()
    if plot is not None:
        plot_table(rows, plot)
    return text


def _summary(row) -> dict[str, Any]:
    """One table row's figures from its cached steps: the runs planned out of the config's,
    whether that is all of them, the refused and too-large counts, and over the planned
    steps the step times, the training seconds of all runs x seeds, the peak memory per
    chip, the chip's HBM and whether every step fits."""
    exp, configs, steps = row["exp"], row["configs"], row["steps"]
    ok = {i: s for i, s in steps.items() if "error" not in s}
    too_big = sum(1 for s in steps.values() if s.get("does_not_fit"))
    out = dict(name=exp.name, kind=exp.kind, topology=row["topology"], planned=len(steps),
               runs=len(configs), complete=len(steps) == len(configs), too_big=too_big,
               errors=len(steps) - len(ok) - too_big)
    if ok:
        out.update(times=[s["step_seconds"] for s in ok.values()],
                   wall=sum(_run_plan(configs[i], s) for i, s in ok.items()) * len(exp.seeds),
                   memory=max(s["memory"]["total"] for s in ok.values()),
                   hbm=next(iter(ok.values()))["memory"]["hbm"],
                   fits=all(s["memory"]["fits"] for s in ok.values()) and not too_big)
    return out


def _table(rows) -> str:
    lines = ["| config | topology | runs planned | step time (roofline) | training time, all "
             "runs x seeds | peak memory per chip / HBM | fits |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for s in map(_summary, rows):
        planned = f"{s['planned']} of {s['runs']}" + (
            f" ({s['errors']} refused)" if s["errors"] else "")
        if s["too_big"]:
            planned += f" ({s['too_big']} too large for a chip)"
        if not s["runs"]:
            lines.append(f"| {s['name']} | - | no fixed runs ({s['kind']}: chosen while it "
                         "runs) | | | | |")
            continue
        if "wall" not in s:
            lines.append(f"| {s['name']} | {s['topology']} | {planned} | | | | |")
            continue
        times = s["times"]
        span = (format_seconds(min(times)) if len(set(times)) == 1 else
                f"{format_seconds(min(times))} - {format_seconds(max(times))}")
        part = "" if s["complete"] else " (planned runs only)"
        lines.append(f"| {s['name']} | {s['topology']} | {planned} | {span} | "
                     f"{format_seconds(s['wall'])}{part} | {format_bytes(s['memory'])} / "
                     f"{format_bytes(s['hbm'])} | {'yes' if s['fits'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plot_table(rows, path: str | os.PathLike) -> str:
    """The table as a PNG at ``path``: per config, the training time of all runs x seeds
    (hours, log scale) and the peak memory per chip as a share of the chip's HBM, one
    colour per topology; a config with runs left unplanned is hatched and marked (its
    time counts only the planned runs), and one with nothing planned has no bar."""
    from matplotlib.patches import Patch

    from seqnorm_jax.analysis.plots import label_colors, pyplot, save_figure

    summaries = [s for s in map(_summary, rows) if "wall" in s]
    if not summaries:
        raise ValueError(f"plot {os.fspath(path)!r}: no config has a planned step yet; "
                         "compile some (drop --no-compile) before plotting.")
    colors = label_colors(sorted({s["topology"] for s in summaries}))
    names = [s["name"] + ("" if s["complete"] else f"  ({s['planned']} of {s['runs']} runs)")
             for s in summaries]
    fig, (left, right) = pyplot().subplots(1, 2, sharey=True,
                                           figsize=(12, 0.32 * len(summaries) + 1.6),
                                           gridspec_kw=dict(width_ratios=(3, 2)))
    y = list(range(len(summaries)))[::-1]
    for yi, s in zip(y, summaries):
        kw = dict(color=colors[s["topology"]], hatch=None if s["complete"] else "//",
                  edgecolor="black", linewidth=0.4)
        left.barh(yi, s["wall"] / 3600, **kw)
        right.barh(yi, 100 * s["memory"] / s["hbm"], **kw)
    left.set_xscale("log")
    left.set_xlabel("training time, all runs x seeds (hours, roofline)")
    left.set_yticks(y, names, fontsize=8)
    left.grid(axis="x", alpha=0.3)
    left.set_ylim(-0.6, len(summaries) - 0.4)
    right.axvline(100, color="black", linewidth=0.8)
    right.set_xlabel("peak memory per chip (% of HBM)")
    right.legend(handles=[Patch(color=c, label=t) for t, c in colors.items()],
                 loc="lower right", fontsize=8)
    return save_figure(fig, path, title="Paper configs at full scale (XLA:TPU, deviceless AOT)")
