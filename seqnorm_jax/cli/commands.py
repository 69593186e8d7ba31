"""What each ``seqnorm-jax`` sub-command does with its parsed flags."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from typing import Any

from seqnorm_jax import checks
from seqnorm_jax.cli.parser import COMPARE_DEFAULTS, parse_groups, parse_norms, parse_seeds
from seqnorm_jax.train.files import PREEMPTED

__all__ = ["COMMANDS", "DIVERGED", "PREEMPTED"]

DIVERGED = 3  # the exit status of a train run whose loss became non-finite


def _known_name(value: str, flag: str, check, names) -> None:
    """``check(value)`` (a registry lookup); its error names ``flag`` and the closest name."""
    try:
        check(value)
    except ValueError as e:
        hint = "" if "Did you mean" in str(e) else checks.suggest(value, names)
        raise ValueError(f"{flag}: {e}{hint}") from None


def train_config(args: argparse.Namespace, defaults: dict[str, Any] | None = None):
    """The TrainConfig of ``defaults``, then ``--config``, then the flags given; the model
    and dataset names checked (with the closest name when misspelled)."""
    from seqnorm_jax.data import DATASETS, dataset_info
    from seqnorm_jax.models import MODELS, get_model
    from seqnorm_jax.train import TrainConfig

    data = dict(defaults or {})
    if getattr(args, "config", None):
        if not os.path.exists(args.config):
            raise FileNotFoundError(f"--config: no such file {args.config!r}.")
        if os.path.isdir(args.config):
            raise ValueError(f"--config {args.config!r} is a folder; give a JSON config file "
                             f"(e.g. {os.path.join(args.config, 'config.json')}).")
        try:
            data.update(TrainConfig.from_json(args.config).to_dict())
        except ValueError as e:
            raise ValueError(f"--config: {e}") from None
    for field in dataclasses.fields(TrainConfig):
        if field.name in vars(args):
            value = getattr(args, field.name)
            data[field.name] = dict(value) if field.name == "model_kwargs" else value
    config = TrainConfig.from_dict(data)
    _known_name(config.model, "--model", lambda m: get_model(m, norm="none"), MODELS)
    _known_name(config.dataset, "--dataset", dataset_info, DATASETS)
    return config


def _check_out(path: str) -> None:
    from seqnorm_jax.train.files import check_out_dir

    check_out_dir(path, "--out", create=False)


def _mesh(kind: str):
    import jax

    from seqnorm_jax.distributed import data_mesh

    if kind == "explicit":
        return jax.make_mesh((jax.device_count(),), ("data",),
                             axis_types=(jax.sharding.AxisType.Explicit,))
    return data_mesh()


def _json_number(v: Any) -> Any:
    return v if not isinstance(v, float) or v == v and abs(v) != float("inf") else str(v)


@contextlib.contextmanager
def _claimed_out(args):
    """Hold ``--out``'s lock; refuse a folder holding an earlier run unless ``--resume`` or
    ``--overwrite`` (which clears it). The first thing a run does, before any data load
    or compilation."""
    from seqnorm_jax.train.files import claim_run_folder, run_lock

    with run_lock(args.out, "out_dir (--out)"):
        claim_run_folder(args.out, "out_dir (--out)", resume=args.resume,
                         overwrite=args.overwrite)
        yield


def train(args) -> int:
    from seqnorm_jax.train import Trainer

    _check_out(args.out)
    config = train_config(args)
    allow = [f.strip() for f in args.allow_change.split(",") if f.strip()]
    if allow and not args.resume:
        raise ValueError("--allow-change applies to --resume only; add --resume or drop it.")
    with _claimed_out(args):
        trainer = Trainer(config, out_dir=args.out, mesh=_mesh(args.mesh))  # checks everything
        result = trainer.fit(resume=args.resume, allow_changes=allow)
    last = result.eval_rows[-1] if result.eval_rows else {}
    summary = {"out": args.out, "step": int(result.state.step),
               "eval_accuracy": last.get("eval_accuracy"), "eval_loss": last.get("eval_loss"),
               "train_loss": last.get("loss")}
    if result.diverged is not None:
        summary["diverged_at_step"] = result.diverged["step"]
    print(json.dumps({k: _json_number(v) for k, v in summary.items()}))
    if result.diverged is not None:
        d = result.diverged
        kept = (f"; the last finite state (step {d['last_finite_step']}) is checkpointed in "
                f"{os.path.join(args.out, 'checkpoints')}" if "last_finite_step" in d else "")
        cause = "" if d["loss"] != d["loss"] or abs(d["loss"]) == float("inf") else \
            "; its gradient or updated state was non-finite"
        print(f"seqnorm-jax train: diverged at step {d['step']} (loss {d['loss']}{cause})"
              f"{kept}", file=sys.stderr)
        return DIVERGED
    return 0


def evaluate(args) -> int:
    from seqnorm_jax import data
    from seqnorm_jax.train import Checkpointer, TrainConfig, Trainer
    from seqnorm_jax.train.files import CONFIG_NAME
    from seqnorm_jax.train.metrics import append_eval_rows

    for a in args.example_weight:  # the one range rule, before any work
        checks.example_weight(a, "--example-weight")
    path = os.path.join(args.run, CONFIG_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"--run: {args.run!r} has no config.json; pass the --out "
                                "directory of a `seqnorm-jax train` run.")
    config = TrainConfig.from_json(path)
    changes = {"progress": False}
    if args.data_dir is not None:
        changes["data_dir"] = args.data_dir
    if args.batch_size is not None:
        changes["eval_batch_size"] = args.batch_size
    config = config.replace(**changes)
    trainer = Trainer(config)
    source = trainer.eval_source
    if args.split is not None:
        kwargs = dict(data_dir=config.data_dir, source=config.data_source, seed=config.seed)
        if args.split.split("[")[0].strip() in ("validation", "train_minus_val"):
            kwargs["validation_size"] = config.validation_size
        source = data.load(config.dataset, args.split, **kwargs)
    checkpointer = Checkpointer(os.path.join(args.run, "checkpoints"))
    try:
        state, position = checkpointer.restore(trainer.init_state(), step=args.step)
    finally:
        checkpointer.close()
    rows = []
    for a in args.example_weight:
        metrics = trainer.evaluate(state, source, example_weight=a)
        rows.append({"run": args.run, "step": int(state.step), "epoch": position["epoch"],
                     "split": args.split or ("validation" if config.validation_size
                                             else config.eval_split),
                     "example_weight": a, "eval_accuracy": metrics["eval_accuracy"],
                     "eval_loss": metrics["eval_loss"], "count": int(metrics["count"])})
        print(json.dumps(rows[-1]))
    append_eval_rows(args.run, rows)
    return 0


def compare(args) -> int:
    from seqnorm_jax.studies.compare import compare as run_compare, format_table

    _check_out(args.out)
    config = train_config(args, COMPARE_DEFAULTS)
    seeds = parse_seeds(args.seeds)
    result = run_compare(config, norms=parse_norms(args.norms), seeds=seeds, out_dir=args.out,
                         progress=config.progress, resume=args.resume,
                         overwrite=args.overwrite)
    print(format_table(result.summary, "validation" if config.validation_size else "test"))
    print(f"results: {os.path.join(args.out, 'results.md')} (+ results.json, results.csv, "
          f"curves.png); {result.settings['total_seconds']:.0f} s")
    return 0


def tune(args) -> int:
    from seqnorm_jax.studies.selection import METRICS
    from seqnorm_jax.studies.tune import AllDivergedError, sequential_tune
    from seqnorm_jax.studies.tune_report import format_stage

    if args.metric not in METRICS:
        raise ValueError(f"--metric {args.metric!r}: choose one of {', '.join(METRICS)}."
                         f"{checks.suggest(args.metric, METRICS)}")
    _check_out(args.out)
    config = train_config(args, COMPARE_DEFAULTS)
    batch_groups = parse_groups(args.tune_batch_groups, "--batch-groups")
    channel_groups = parse_groups(args.tune_channel_groups, "--channel-groups")
    seeds = parse_seeds(args.seeds)
    if args.tolerance is not None and not args.tolerance >= 0:
        raise ValueError(f"--tolerance {args.tolerance}: must be >= 0 (in the metric's units).")
    try:
        result = sequential_tune(config, batch_groups=batch_groups,
                                 channel_groups=channel_groups, seeds=seeds,
                                 tolerance=args.tolerance, metric=args.metric, out_dir=args.out,
                                 progress=config.progress, norm_fields=args.tune_norm_fields,
                                 resume=args.resume, overwrite=args.overwrite)
    except AllDivergedError as e:  # a result of the runs, not a bad input: exit as diverged
        print(f"seqnorm-jax tune: {e}", file=sys.stderr)
        return DIVERGED
    print(f"stage 1: G_M (batch_groups) with GhostNorm\n"
          f"{format_stage(result.stage1, args.metric)}\n{result.reasons['batch_groups']}\n")
    print(f"stage 2: G_C (channel_groups) with SeqNorm at G_M = {result.batch_groups}\n"
          f"{format_stage(result.stage2, args.metric)}\n{result.reasons['channel_groups']}\n")
    print(result.reasons["validation"])
    print(f"chosen: {result.spec} ({result.num_runs} runs; a grid would take "
          f"{result.grid_runs})")
    print(f"results: {os.path.join(args.out, 'tune.md')} (+ tune.json, tune.csv, tune.png); "
          f"{result.settings['total_seconds']:.0f} s")
    return 0


def experiment(args) -> int:
    from seqnorm_jax.studies.experiment import (
        default_out_dir,
        list_experiments,
        load_experiment,
        run_experiment,
    )

    if args.list_configs:
        print("| config | paper | reproduces | kind | runs x seeds (full) | full-scale compute |")
        print("| --- | --- | --- | --- | --- | --- |")
        for e in list_experiments(args.configs_dir):
            print(f"| {e.name} | {e.paper} | {e.ref} | {e.kind} | {len(e.runs)} x "
                  f"{len(e.seeds)} | {e.compute} |")
        return 0
    if not args.config:
        raise ValueError("give an experiment config (a packaged name or a JSON file) or --list.")
    exp = load_experiment(args.config)
    seeds = None if args.seeds is None else parse_seeds(args.seeds)
    if args.out is not None:
        _check_out(args.out)
    command = "seqnorm-jax " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["experiment"] \
        else None
    payload = run_experiment(exp, args.scale, args.out, seeds=seeds, command=command,
                             replot=args.replot, resume=args.resume, overwrite=args.overwrite)
    out = args.out or default_out_dir(exp.resolve(args.scale))
    print(f"wrote {os.path.join(out, 'results.md')} ({payload['seconds'] / 60:.1f} min)")
    return 0


COMMANDS = {"train": train, "eval": evaluate, "compare": compare, "tune": tune,
            "experiment": experiment}


def plan(args) -> int:
    """``seqnorm-jax plan``: compile runs' training steps for a topology, print the plans."""
    import jax

    try:  # this process compiles for the topology and runs nothing on an accelerator
        jax.config.update("jax_platforms", "cpu")
    except Exception:  # noqa: BLE001 - backends already started (an embedding program)
        pass
    from seqnorm_jax import aot

    try:
        return _plan(args)
    except aot.CompilerNotInstalledError as e:
        raise ValueError(str(e)) from None


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _plan_runs(args):
    """``(label, TrainConfig)`` of each run to plan, the seeds per run, the image shape."""
    from seqnorm_jax.studies.experiment import load_experiment
    from seqnorm_jax.train import TrainConfig

    if not args.experiment:
        if args.run is not None:
            raise ValueError("--run picks a run of CONFIG; give a paper config, e.g. "
                             "seqnorm-jax plan 000_table2_imagenet_resnet18 --run 0.")
        return [(None, train_config(args))], 1, None
    exp = load_experiment(args.experiment).resolve(args.scale)
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if f.name in vars(args)}
    if "model_kwargs" in flags:
        flags["model_kwargs"] = dict(flags["model_kwargs"])
    runs = [(run.get("label"), c.replace(**flags) if flags else c) for run, c in exp.configs()]
    if args.run is not None:
        labels = [label for label, _ in runs]
        if args.run.isdigit() and int(args.run) < len(runs):
            runs = [runs[int(args.run)]]
        elif args.run in labels:
            runs = [runs[labels.index(args.run)]]
        else:
            raise ValueError(f"--run {args.run!r}: {exp.name} has runs 0..{len(runs) - 1}: "
                             + "; ".join(f"{i} {lb!r}" for i, lb in enumerate(labels))
                             + checks.suggest(args.run, labels))
    if not runs:
        raise ValueError(f"{exp.name} ({exp.kind}) has no fixed runs to plan; plan one of its "
                         "settings with the training flags instead.")
    return runs, len(exp.seeds), exp.image_shape


def _plan(args) -> int:
    from seqnorm_jax import aot
    from seqnorm_jax.train import plan as planning

    if args.paper_table:
        from seqnorm_jax.studies.experiment import list_experiments
        from seqnorm_jax.train import plan_table

        names = [e.name for e in list_experiments()]
        topologies = (args.topology,) if args.topology else plan_table.TABLE_TOPOLOGIES
        for name in topologies:
            aot.parse_topology(name)
        print(plan_table.plan_table(names, args.cache, topologies=topologies, out=args.out,
                                    progress=_progress, compile=args.compile,
                                    plot=args.plot), end="")
        return 0
    for flag, given in (("--out", args.out is not None), ("--plot", args.plot is not None),
                        ("--no-compile", not args.compile)):
        if given:
            raise ValueError(f"{flag} belongs to the paper table: add --paper-table, or "
                             f"drop {flag} to plan one config.")
    if not args.topology:
        raise ValueError("--topology is required: a TPU chip grid (v5e:16x16, v4:2x2x2, "
                         "v5p:2x2x2) or GPUs (h100:8, a100:2x8).")
    aot.parse_topology(args.topology)
    runs, seeds, image_shape = _plan_runs(args)
    topo = aot.topology(args.topology)
    planning.parse_mesh(args.mesh, topo.num_devices)
    plans = [(label, planning.plan_step(c, topo, mesh=args.mesh, axis_types=args.axis_types,
                                        image_shape=image_shape, progress=_progress))
             for label, c in runs]
    total = sum(p.run_seconds for _, p in plans) * seeds
    if args.json:
        print(json.dumps({"topology": topo.name, "seeds": seeds, "training_seconds": total,
                          "runs": [{"label": label, **p.to_dict()} for label, p in plans]},
                         indent=1, default=_json_number))
    else:
        for label, p in plans:
            print(planning.format_plan(p, label))
        if args.experiment:
            print(f"{args.experiment}: {len(plans)} run(s) x {seeds} seed(s): "
                  f"{planning.format_seconds(total)} of training on {topo.name} at the "
                  "roofline step times")
    refused = [(label, p) for label, p in plans if not p.analysis.fits]
    if refused:
        label, p = refused[0]
        a = p.analysis
        raise ValueError(
            f"{label or p.config.model + ' / ' + p.config.norm} does not fit {topo.name}: "
            f"{planning.format_bytes(a.memory.total)} per device, the {a.chip.name} has "
            f"{planning.format_bytes(a.chip.hbm_bytes)}; use more chips (a larger "
            "--topology), a smaller --batch-size or more --grad-accum-steps.")
    return 0


COMMANDS["plan"] = plan
