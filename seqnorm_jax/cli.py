"""The ``seqnorm-jax`` command line: ``train``, ``eval``, ``compare``, ``tune`` and ``experiment``.

::

    seqnorm-jax compare                                   # the default comparison, ~10 min on CPU
    seqnorm-jax compare --model cnn --norms bn,ghost,seqnorm --seeds 3 --epochs 5
    seqnorm-jax train --model cnn --norm "ghost:batch_groups=8" --epochs 5 --out runs/ghost
    seqnorm-jax train --config runs/ghost/config.json --resume --out runs/ghost
    seqnorm-jax eval --run runs/ghost --example-weight 0 0.1 0.2
    seqnorm-jax tune --batch-groups 1,2,4,8,16 --channel-groups 1,2,4 --seeds 3
    seqnorm-jax experiment --list
    seqnorm-jax experiment experiments/configs/002_ghost_batch_size_sweep.json --scale cpu

Every field of :class:`~seqnorm_jax.train.TrainConfig` is a flag (``--batch-size``,
``--norm-weight-decay``, ...); ``--config FILE`` loads a JSON config first and the
flags given override it. ``python -m seqnorm_jax`` is the same command.

Exit status: 0 done; 2 an ``error:`` line on stderr -- invalid flags, configurations or
norm specs (checked before any training), a missing dataset, a run folder in use by
another run, a resume whose config differs, or a file that cannot be written
(``error: <path>: <cause>``; the last checkpoint written stays usable); 3 a training run
diverged (``diverged at step N (loss nan)`` on stderr; the last finite state is
checkpointed); 130 interrupted. ``--traceback`` shows the Python traceback instead of
the one-line error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any

__all__ = ["COMPARE_DEFAULTS", "DIVERGED", "build_parser", "main"]

DIVERGED = 3  # the exit status of a train run whose loss became non-finite

# The default `compare`: paper 000's MNIST network (SimpleNet, 784-512-300-10) on all of
# Fashion-MNIST (60k/10k), 7 layers x 3 seeds x 4 epochs. Measured with 3 epochs on 2 CPU
# cores shared with other jobs (load ~7): 424 s of CPU time, 11.5 min of wall time; so 4
# epochs take ~565 s of CPU time, about 8 minutes on 2 otherwise idle cores.
COMPARE_DEFAULTS: dict[str, Any] = dict(
    model="simplenet", dataset="fashion_mnist", epochs=4, batch_size=128, lr=0.05,
    optimizer="sgd", momentum=0.9, schedule="cosine", weight_decay=5e-4, log_every=100,
    eval_batch_size=2000,
)
COMPARE_SEEDS = 3

# The default `tune` (paper 000, 3.2.1): compare's settings, G_M then G_C, on a validation
# set the tuner holds out of the training set (10 %) when --validation-size is not given.
TUNE_BATCH_GROUPS = "1,2,4,8,16"
TUNE_CHANNEL_GROUPS = "1,2,4,8,16,32"

_HELP = {
    "model": "model name (simplenet, mlp, mlp4, cnn, resnet20, resnet56, wrn28_10, resnet18, "
             "resnet50, vgg11)",
    "norm": "norm layer spec, e.g. 'seqnorm:channel_groups=4,batch_groups=8', 'none'",
    "model_kwargs": "extra model fields as KEY=VALUE; a comma makes a list (features=16,32,32 "
                    "or features=16, for one element)",
    "dtype": "float32 or bfloat16 (mixed precision)",
    "dataset": "fashion_mnist, mnist, cifar10, cifar100, imagenet2012, digits",
    "data_dir": "directory of the dataset (TFDS data_dir, IDX or CIFAR files)",
    "data_source": "auto, tfds, idx, cifar or digits",
    "train_size": "train on a stratified random subset of this many examples",
    "validation_size": "hold out this many training examples and evaluate on them",
    "eval_split": "split evaluated after each epoch",
    "augment": "none, flip_crop, flip_crop_cutout, imagenet or default",
    "non_iid_classes": "non-i.i.d. batches drawn from this many classes (paper 002)",
    "data_workers": "Grain worker processes for the training batches (0: none)",
    "grad_accum_steps": "accumulate gradients over this many micro-batches per step",
    "optimizer": "sgd, nesterov, adam (coupled L2) or adamw (decoupled)",
    "lr": "peak (cosine, one-cycle) or initial (step, constant) learning rate",
    "schedule": "constant, cosine, one_cycle, cosine_one_cycle or step",
    "decay_epochs": "epochs at which the step schedule multiplies lr by --decay-factor",
    "weight_decay": "L2 (SGD) or decoupled (AdamW) weight decay",
    "norm_weight_decay": "decay of the norm layers' gamma/beta: zero, one or off",
    "grad_clip_norm": "clip gradients to this global norm",
    "example_weight": "Four Things inference example weight used in evaluation",
    "checkpoint_every": "also checkpoint every this many steps (0: epoch ends only)",
    "on_divergence": "stop (default: end the run at a non-finite loss, keep and checkpoint "
                     "the last finite state) or continue",
}


def _choices() -> dict[str, tuple[str, ...]]:
    from seqnorm_jax.train import NORM_DECAY_MODES, OPTIMIZERS, SCHEDULES
    from seqnorm_jax.train.config import ON_DIVERGENCE

    return {"optimizer": OPTIMIZERS, "schedule": SCHEDULES,
            "norm_weight_decay": NORM_DECAY_MODES, "dtype": ("float32", "bfloat16"),
            "on_divergence": ON_DIVERGENCE}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_none(cast):
    def parse(text: str):
        return None if text.strip().lower() in ("none", "null", "") else cast(text)
    parse.__name__ = cast.__name__
    return parse


def _scalar(text: str) -> Any:
    """``"3"`` -> 3, ``"0.5"`` -> 0.5, ``"true"`` -> True, ``"none"`` -> None, else the text
    (the same rule as ``norm_factory``'s values)."""
    from seqnorm_jax.factory import parse_value

    return parse_value(text)


def _parse_kv(text: str) -> tuple[str, Any]:
    """``"features=16,32"`` -> ``("features", [16, 32])``; ``"depth=20"`` -> ``("depth", 20)``."""
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    if "," in value:
        return key.strip(), [_scalar(v) for v in value.split(",") if v.strip()]
    return key.strip(), _scalar(value)


def _add_config_flags(parser: argparse.ArgumentParser, skip: Sequence[str] = ()) -> None:
    """One flag per TrainConfig field; defaults are SUPPRESS so only given flags are seen."""
    from seqnorm_jax.train import TrainConfig

    group = parser.add_argument_group("training configuration (TrainConfig fields)")
    choices = _choices()
    for field in dataclasses.fields(TrainConfig):
        if field.name in skip:
            continue
        kind = str(field.type).replace(" ", "")
        help_ = _HELP.get(field.name, field.name.replace("_", " "))
        common = dict(dest=field.name, default=argparse.SUPPRESS, help=help_)
        if kind == "bool":
            group.add_argument(_flag(field.name), action=argparse.BooleanOptionalAction,
                               **common)
        elif kind in ("int", "float", "str"):
            group.add_argument(_flag(field.name), type={"int": int, "float": float,
                                                        "str": str}[kind],
                               choices=choices.get(field.name), **common)
        elif kind in ("int|None", "float|None", "str|None"):
            cast = {"int": int, "float": float, "str": str}[kind.split("|")[0]]
            group.add_argument(_flag(field.name), type=_parse_none(cast), **common)
        elif kind == "list[float]":
            group.add_argument(_flag(field.name), type=float, nargs="*", **common)
        elif kind == "dict[str,Any]":
            group.add_argument(_flag(field.name), type=_parse_kv, nargs="+",
                               metavar="KEY=VALUE", **common)
        else:  # pragma: no cover - a new field type must be mapped here
            raise TypeError(f"cli: no flag type for TrainConfig.{field.name}: {field.type}")


def build_parser() -> argparse.ArgumentParser:
    """The ``seqnorm-jax`` argument parser (``train``, ``eval``, ``compare``, ``tune``,
    ``experiment``)."""
    parser = _Parser(prog="seqnorm-jax", description=__doc__.split("\n\n")[0])
    parser.add_argument("--traceback", action="store_true",
                        help="show Python tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train one model with one norm layer",
                           description="Train a model; flags override --config.")
    train.add_argument("--config", help="JSON TrainConfig file (flags override it)")
    train.add_argument("--out", required=True,
                       help="output directory (config.json, metrics, checkpoints)")
    train.add_argument("--resume", action="store_true",
                       help="continue from the newest intact checkpoint in --out; the config "
                            "must equal the saved one except epochs, progress, log_every, "
                            "checkpoint_every, keep_checkpoints, data_workers, "
                            "eval_batch_size, on_divergence, data_dir")
    train.add_argument("--allow-change", default="", metavar="FIELD,...",
                       help="with --resume: accept these changed config fields (e.g. lr)")
    train.add_argument("--mesh", default="auto", choices=("auto", "explicit"),
                       help="axis type of the data mesh over all devices: auto (default) or "
                            "explicit (jax.make_mesh's default, sharding in types)")
    _add_config_flags(train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint of a train run",
                        description="Evaluate the checkpoint of a `train` output directory.")
    ev.add_argument("--run", required=True, help="the --out directory of a train run")
    ev.add_argument("--split", default=None,
                    help="split to evaluate (default: the run's eval split)")
    ev.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    ev.add_argument("--example-weight", type=float, nargs="+", default=[0.0],
                    help="Four Things example weight(s) alpha in [0, 1]; several values are "
                         "evaluated in turn (a line search)")
    ev.add_argument("--batch-size", type=int, default=None, help="evaluation batch size")
    ev.add_argument("--data-dir", default=None, help="override the run's data directory")

    cmp_ = sub.add_parser(
        "compare", help="compare norm layers on one model over several seeds",
        description="Train the same model with several norm layers and seeds; write "
                    "results.json, results.csv, results.md and curves.png to --out. Defaults: "
                    + ", ".join(f"{k}={v}" for k, v in COMPARE_DEFAULTS.items())
                    + f", seeds={COMPARE_SEEDS}.")
    cmp_.add_argument("--config", help="JSON TrainConfig file for the shared settings")
    cmp_.add_argument("--out", default=os.path.join("runs", "compare"),
                      help="output directory (default runs/compare)")
    cmp_.add_argument("--norms", default=None,
                      help="comma-separated layers: labels (none, bn, ghost, gn, seqnorm, hn, "
                           "gn+, bgn, fourthings, noisybn; group settings chosen for the "
                           "model) or norm specs, e.g. 'bn,seqnorm:channel_groups=2,"
                           "batch_groups=4' (default: none,bn,ghost,gn,seqnorm,hn,gn+)")
    cmp_.add_argument("--seeds", default=str(COMPARE_SEEDS),
                      help=f"a count N (seeds 0..N-1) or a comma-separated list "
                           f"(default {COMPARE_SEEDS})")
    _add_config_flags(cmp_, skip=("norm", "seed"))
    _add_tune_parser(sub)

    exp = sub.add_parser(
        "experiment", help="run a paper experiment config (experiments/configs/*.json)",
        description="Run one table or figure of the papers at a scale: full (the paper's "
                    "setting, for accelerators), cpu (real data, minutes to an hour on a CPU) "
                    "or smoke (two steps of a tiny model on mock data). Writes results.json, "
                    "results.csv, results.md and the plots to --out.")
    exp.add_argument("config", nargs="?", help="the experiment's JSON config")
    exp.add_argument("--scale", default="cpu", choices=("full", "cpu", "smoke"),
                     help="which version to run (default cpu)")
    exp.add_argument("--out", default=None,
                     help="output directory (default runs/experiments/NAME/SCALE)")
    exp.add_argument("--seeds", default=None,
                     help="override the seeds: a count N (0..N-1) or a comma-separated list")
    exp.add_argument("--replot", action="store_true",
                     help="train nothing: rewrite the tables and plots from --out's results.json")
    exp.add_argument("--list", action="store_true", dest="list_configs",
                     help="list the configs of --configs-dir and exit")
    exp.add_argument("--configs-dir", default=os.path.join("experiments", "configs"),
                     help="where --list looks (default experiments/configs)")
    return parser


def _add_tune_parser(sub) -> None:
    """The ``tune`` sub-command: paper 000's sequential G_M-then-G_C search."""
    tune = sub.add_parser(
        "tune", help="tune SeqNorm's batch_groups then channel_groups (paper 000, 3.2.1)",
        description="Tune G_M (batch_groups) with GhostNorm, keep the largest well-performing "
                    "value (lowest std over seeds among similar ones), then tune G_C "
                    "(channel_groups) of SeqNorm with it: len(G_M) + len(G_C) settings instead "
                    "of a grid. Tuning reads a validation set, never the test set: without "
                    "--validation-size, 10% of the training set is held out (stratified). "
                    "Writes tune.json, tune.csv, tune.md, tune.png and one compare folder per "
                    "stage to --out. Defaults as compare: "
                    + ", ".join(f"{k}={v}" for k, v in COMPARE_DEFAULTS.items())
                    + f", seeds={COMPARE_SEEDS}.")
    tune.add_argument("--config", help="JSON TrainConfig file for the shared settings")
    tune.add_argument("--out", default=os.path.join("runs", "tune"),
                      help="output directory (default runs/tune)")
    tune.add_argument("--batch-groups", default=TUNE_BATCH_GROUPS, dest="tune_batch_groups",
                      metavar="G_M,...",
                      help=f"comma-separated G_M candidates (default {TUNE_BATCH_GROUPS}); "
                           "values that do not fit the batch are skipped")
    tune.add_argument("--channel-groups", default=TUNE_CHANNEL_GROUPS,
                      dest="tune_channel_groups", metavar="G_C,...",
                      help=f"comma-separated G_C candidates (default {TUNE_CHANNEL_GROUPS}); "
                           "values that do not divide every norm layer's width are skipped")
    tune.add_argument("--seeds", default=str(COMPARE_SEEDS),
                      help=f"a count N (seeds 0..N-1) or a comma-separated list "
                           f"(default {COMPARE_SEEDS})")
    tune.add_argument("--tolerance", type=float, default=None,
                      help="candidates whose mean metric is within this of the best perform "
                           "'similarly' (e.g. 0.005 = half a point of accuracy; default: the "
                           "best candidate's standard error over the seeds)")
    tune.add_argument("--norm-fields", default="", dest="tune_norm_fields",
                      help="fields added to every candidate's spec, e.g. momentum=0.9")
    tune.add_argument("--metric", default="eval_accuracy",
                      help="the validation metric to select by: eval_accuracy (last epoch, "
                           "default), best_eval_accuracy (best epoch) or eval_loss (last "
                           "epoch, lower is better)")
    _add_config_flags(tune, skip=("norm", "seed"))


def _one_line(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return " ".join(lines)


def _config(args: argparse.Namespace, defaults: dict[str, Any] | None = None):
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
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for name in names:
        if name in vars(args):
            value = getattr(args, name)
            data[name] = dict(value) if name == "model_kwargs" else value
    return TrainConfig.from_dict(data)


def _mesh(kind: str):
    import jax

    from seqnorm_jax.distributed import data_mesh

    if kind == "explicit":
        return jax.make_mesh((jax.device_count(),), ("data",),
                             axis_types=(jax.sharding.AxisType.Explicit,))
    return data_mesh()


def _json_number(v: Any) -> Any:
    return v if not isinstance(v, float) or v == v and abs(v) != float("inf") else str(v)


def _cmd_train(args) -> int:
    from seqnorm_jax.train import Trainer
    from seqnorm_jax.train.lock import check_out_dir

    check_out_dir(args.out, "--out", create=False)
    config = _config(args)
    allow = [f.strip() for f in args.allow_change.split(",") if f.strip()]
    if allow and not args.resume:
        raise ValueError("--allow-change applies to --resume only; add --resume or drop it.")
    trainer = Trainer(config, out_dir=args.out, mesh=_mesh(args.mesh))  # checks everything
    result = trainer.fit(resume=args.resume, allow_changes=allow)  # locks --out
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
        print(f"seqnorm-jax train: diverged at step {d['step']} (loss {d['loss']}){kept}",
              file=sys.stderr)
        return DIVERGED
    return 0


def _cmd_eval(args) -> int:
    from seqnorm_jax import data
    from seqnorm_jax.train import Checkpointer, TrainConfig, Trainer

    path = os.path.join(args.run, "config.json")
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
    for a in args.example_weight:
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"--example-weight {a} must lie in [0, 1].")
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
    for a in args.example_weight:
        metrics = trainer.evaluate(state, source, example_weight=a)
        print(json.dumps({"run": args.run, "step": int(state.step), "epoch": position["epoch"],
                          "split": args.split or ("validation" if config.validation_size
                                                  else config.eval_split),
                          "example_weight": a, "eval_accuracy": metrics["eval_accuracy"],
                          "eval_loss": metrics["eval_loss"], "count": int(metrics["count"])}))
    return 0


def _parse_seeds(text: str) -> list[int]:
    try:
        items = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds {text!r}: give a count N or comma-separated integers.") \
            from None
    if len(items) == 1 and "," not in text:
        if items[0] < 1:
            raise ValueError(f"--seeds {text!r}: the count must be >= 1.")
        return list(range(items[0]))
    if not items:
        raise ValueError(f"--seeds {text!r}: give a count N or comma-separated integers.")
    return items


def _parse_norms(text: str | None) -> list[str]:
    from seqnorm_jax.train import DEFAULT_NORMS

    if text is None:
        return list(DEFAULT_NORMS)
    norms: list[str] = []
    for item in (i.strip() for i in text.replace(";", ",").split(",")):
        if not item:
            continue
        if "=" in item and ":" not in item and norms and ":" in norms[-1]:
            norms[-1] += "," + item  # KEY=VALUE continuing the previous spec's fields
        else:
            norms.append(item)
    if not norms:
        raise ValueError("--norms is empty; name at least one layer, e.g. --norms bn,ghost.")
    return norms


def _cmd_compare(args) -> int:
    from seqnorm_jax.factory import norm_factory
    from seqnorm_jax.train import compare, default_norm_specs
    from seqnorm_jax.train.compare import format_table

    from seqnorm_jax.train.lock import check_out_dir

    check_out_dir(args.out, "--out", create=False)
    config = _config(args, COMPARE_DEFAULTS)
    seeds = _parse_seeds(args.seeds)
    norms = _parse_norms(args.norms)
    for spec in default_norm_specs([], config.batch_size, norms).values():
        norm_factory(spec)  # fail fast on a bad layer name, before any training
    result = compare(config, norms=norms, seeds=seeds, out_dir=args.out,
                     progress=config.progress)
    print(format_table(result.summary))
    print(f"results: {os.path.join(args.out, 'results.md')} (+ results.json, results.csv, "
          f"curves.png); {result.settings['total_seconds']:.0f} s")
    return 0


def _parse_groups(text: str, flag: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``; ``ValueError`` naming ``flag`` unless all are ints >= 1."""
    try:
        items = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        items = []
    if not items or any(v < 1 for v in items):
        raise ValueError(f"{flag} {text!r}: give comma-separated positive integers, e.g. "
                         f"{flag} 1,2,4,8.")
    return items


def _cmd_tune(args) -> int:
    from seqnorm_jax.analysis.tuner import METRICS, format_stage, sequential_tune

    from seqnorm_jax.train.lock import check_out_dir

    if args.metric not in METRICS:
        raise ValueError(f"--metric {args.metric!r}: choose one of {', '.join(METRICS)}.")
    check_out_dir(args.out, "--out", create=False)
    config = _config(args, COMPARE_DEFAULTS)
    batch_groups = _parse_groups(args.tune_batch_groups, "--batch-groups")
    channel_groups = _parse_groups(args.tune_channel_groups, "--channel-groups")
    seeds = _parse_seeds(args.seeds)
    if args.tolerance is not None and not args.tolerance >= 0:
        raise ValueError(f"--tolerance {args.tolerance}: must be >= 0 (in the metric's units).")
    result = sequential_tune(config, batch_groups=batch_groups, channel_groups=channel_groups,
                             seeds=seeds, tolerance=args.tolerance, metric=args.metric,
                             out_dir=args.out, progress=config.progress,
                             norm_fields=args.tune_norm_fields)
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


def _cmd_experiment(args) -> int:
    from seqnorm_jax.experiment import list_experiments, run_experiment

    if args.list_configs:
        exps = list_experiments(args.configs_dir)
        print("| config | paper | reproduces | kind | runs x seeds (full) | full-scale compute |")
        print("| --- | --- | --- | --- | --- | --- |")
        for e in exps:
            print(f"| {e.name} | {e.paper} | {e.ref} | {e.kind} | {len(e.runs)} x "
                  f"{len(e.seeds)} | {e.compute} |")
        return 0
    if not args.config:
        raise ValueError("give an experiment config (a JSON file) or --list.")
    if not os.path.exists(args.config):
        raise ValueError(f"no such experiment config {args.config!r}; `seqnorm-jax experiment "
                         "--list` shows the configs.")
    if os.path.isdir(args.config):
        raise ValueError(f"experiment config {args.config!r} is a folder; give one JSON file "
                         "of it (`seqnorm-jax experiment --list --configs-dir "
                         f"{args.config}` lists them).")
    seeds = None if args.seeds is None else _parse_seeds(args.seeds)
    if args.out is not None:
        from seqnorm_jax.train.lock import check_out_dir

        check_out_dir(args.out, "--out", create=False)
    command = "seqnorm-jax " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["experiment"] \
        else None
    payload = run_experiment(args.config, args.scale, args.out, seeds=seeds, command=command,
                             replot=args.replot)
    out = args.out or os.path.join("runs", "experiments", payload["experiment"]["name"],
                                   args.scale)
    print(f"wrote {os.path.join(out, 'results.md')} ({payload['seconds'] / 60:.1f} min)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from absl import logging as absl_logging

        # TFDS's notes about absent folders; Orbax's logs of a failed background write
        # (the failure is reported once, as this command's error line)
        absl_logging.set_verbosity(absl_logging.FATAL)
    except ImportError:  # pragma: no cover - absl comes with jax's dependencies
        pass
    commands = {"train": _cmd_train, "eval": _cmd_eval, "compare": _cmd_compare,
                "tune": _cmd_tune, "experiment": _cmd_experiment}
    from seqnorm_jax.data import DatasetNotFoundError

    try:
        return commands[args.command](args)
    except (ValueError, DatasetNotFoundError, FileNotFoundError) as err:
        if args.traceback:
            raise
        print(f"seqnorm-jax {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # a file or folder of the run cannot be written
        if args.traceback:
            raise
        text = (f"{err.filename}: {err.strerror}" if getattr(err, "filename", None)
                and err.strerror else _one_line(err))
        print(f"seqnorm-jax {args.command}: error: {text}", file=sys.stderr)
        _exit_if_stuck(2)
        return 2
    except KeyboardInterrupt:
        print(f"seqnorm-jax {args.command}: interrupted", file=sys.stderr)
        return 130


def _exit_if_stuck(code: int) -> None:
    """End the process now if a write fault left non-daemon threads behind (Orbax's
    background writers), which would otherwise keep the interpreter from exiting."""
    stuck = [t for t in threading.enumerate()
             if t is not threading.main_thread() and t.is_alive() and not t.daemon]
    if stuck:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
