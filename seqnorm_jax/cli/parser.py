"""The ``seqnorm-jax`` argument parser: one sub-command per job, one flag per config field."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["COMPARE_DEFAULTS", "COMPARE_SEEDS", "add_config_flags", "build_parser",
           "config_defaults", "parse_groups", "parse_norms", "parse_seeds"]

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

DESCRIPTION = """\
Train and compare batch- and channel-grouped normalization layers (GhostNorm, SeqNorm,
"Four Things", Heterologous Normalization, GN+, BGN) and reproduce the papers' tables
and figures. `seqnorm-jax COMMAND --help` lists a command's flags and their defaults."""

EPILOG = """\
examples:
  seqnorm-jax compare                                  # the default comparison, 4-15 min on 2 cores
  seqnorm-jax compare --model cnn --norms bn,ghost,seqnorm --seeds 3 --epochs 5
  seqnorm-jax train --model cnn --norm ghost:batch_groups=8 --epochs 5 --out runs/ghost
  seqnorm-jax train --config runs/ghost/config.json --resume --out runs/ghost
  seqnorm-jax eval --run runs/ghost --example-weight 0 0.1 0.2
  seqnorm-jax tune --batch-groups 1,2,4,8,16 --channel-groups 1,2,4 --seeds 3
  seqnorm-jax experiment --list
  seqnorm-jax experiment 002_ghost_batch_size_sweep --scale cpu
  seqnorm-jax plan 000_table2_imagenet_resnet18 --topology v5e:4x4   # needs [tpu]

exit status:
  0    done
  2    an error line on stderr: invalid flags, configurations or norm specs (checked
       before any training), a missing dataset, a run folder in use or holding an
       earlier run (without --resume or --overwrite), a resume whose config differs,
       or a file that cannot be written
  3    a training run diverged (the last finite state is checkpointed), or every
       candidate of a tune stage diverged
  75   preempted: SIGTERM or SIGINT stopped train/compare/tune/experiment after the
       step in flight, its state checkpointed ("preempted at step N; resume with
       --resume"); a second signal exits at once (143 SIGTERM, 130 SIGINT)
  130  interrupted"""

class HelpFormatter(argparse.HelpFormatter):
    """Flags in a column wide enough for ``--one-cycle-final-lr`` and its value."""

    def __init__(self, prog: str, **kwargs):
        kwargs.setdefault("max_help_position", 32)
        kwargs.setdefault("width", 100)
        super().__init__(prog, **kwargs)


class RawHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The top-level help: description and epilog as written (line breaks kept)."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2) and :class:`HelpFormatter`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _none_or(cast):
    def parse(text: str):
        return None if text.strip().lower() in ("none", "null", "") else cast(text)
    parse.__name__ = cast.__name__
    return parse


def _key_value(text: str) -> tuple[str, Any]:
    """``"features=16,32"`` -> ``("features", [16, 32])``; ``"depth=20"`` -> ``("depth", 20)``
    (values as in norm specs)."""
    from seqnorm_jax.registry import parse_value

    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    if "," in value:
        return key.strip(), [parse_value(v) for v in value.split(",") if v.strip()]
    return key.strip(), parse_value(value)


def _choices() -> dict[str, tuple[str, ...]]:
    from seqnorm_jax.train.config import (DTYPES, NORM_DECAY_MODES, ON_DIVERGENCE, OPTIMIZERS,
                                          SCHEDULES)

    return {"optimizer": OPTIMIZERS, "schedule": SCHEDULES,
            "norm_weight_decay": NORM_DECAY_MODES, "dtype": DTYPES,
            "on_divergence": ON_DIVERGENCE}


_METAVARS = {"int": "N", "float": "X", "str": "NAME"}
_FIELD_METAVARS = {"norm": "SPEC", "data_dir": "DIR", "eval_split": "SPLIT"}


def _default_text(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, dict)) and not value:
        return "none"
    return "none" if value is None else str(value)


def config_defaults(defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every TrainConfig field's default, ``defaults`` over the dataclass's own (read from
    the fields: no config is built, so nothing is validated or imported here)."""
    from seqnorm_jax.train.config import TrainConfig

    values = {f.name: (f.default_factory() if f.default is dataclasses.MISSING else f.default)
              for f in dataclasses.fields(TrainConfig)}
    return {**values, **(defaults or {})}


def add_config_flags(parser: argparse.ArgumentParser, skip: Sequence[str] = (),
                     defaults: Mapping[str, Any] | None = None) -> None:
    """One flag per TrainConfig field, its help the field's documentation
    (:func:`~seqnorm_jax.train.config.field_docs`) ending with the default (``defaults``
    over TrainConfig's). The parsed values default to SUPPRESS, so only given flags are
    seen."""
    from seqnorm_jax.train.config import TrainConfig, field_docs

    group = parser.add_argument_group("training configuration (TrainConfig fields; --config "
                                      "loads them from JSON first)")
    choices = _choices()
    docs = field_docs()
    values = config_defaults(defaults)
    types = {"int": int, "float": float, "str": str}
    for field in dataclasses.fields(TrainConfig):
        if field.name in skip:
            continue
        kind = str(field.type).replace(" ", "")
        text = f"{docs[field.name].rstrip('.')} (default: {_default_text(values[field.name])})"
        help_ = text.replace("%", "%%")  # argparse formats help with %
        common = dict(dest=field.name, default=argparse.SUPPRESS, help=help_)
        if kind == "bool":
            group.add_argument(_flag(field.name), action=argparse.BooleanOptionalAction,
                               **common)
        elif kind in types:
            group.add_argument(_flag(field.name), type=types[kind],
                               choices=choices.get(field.name),
                               metavar=None if field.name in choices else
                               _FIELD_METAVARS.get(field.name, _METAVARS[kind]), **common)
        elif kind.endswith("|None") and kind.split("|")[0] in types:
            group.add_argument(_flag(field.name), type=_none_or(types[kind.split("|")[0]]),
                               metavar=_FIELD_METAVARS.get(field.name,
                                                           _METAVARS[kind.split("|")[0]]),
                               **common)
        elif kind == "list[float]":
            group.add_argument(_flag(field.name), type=float, nargs="*", metavar="EPOCH",
                               **common)
        elif kind == "dict[str,Any]":
            group.add_argument(_flag(field.name), type=_key_value, nargs="+",
                               metavar="KEY=VALUE", **common)
        else:  # pragma: no cover - a new field type must be mapped here
            raise TypeError(f"cli: no flag type for TrainConfig.{field.name}: {field.type}")


def build_parser() -> argparse.ArgumentParser:
    """The ``seqnorm-jax`` argument parser (``train``, ``eval``, ``compare``, ``tune``,
    ``experiment``, ``plan``)."""
    parser = Parser(prog="seqnorm-jax", description=DESCRIPTION, epilog=EPILOG,
                    formatter_class=RawHelpFormatter)
    parser.add_argument("--traceback", action="store_true",
                        help="show Python tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser,
                                metavar="COMMAND", title="commands")
    _train_parser(sub)
    _eval_parser(sub)
    _compare_parser(sub)
    _tune_parser(sub)
    _experiment_parser(sub)
    _plan_parser(sub)
    return parser


def _train_parser(sub) -> None:
    from seqnorm_jax.train.config import RESUME_SAFE_FIELDS

    train = sub.add_parser("train", help="train one model with one norm layer",
                           description="Train a model with one norm layer; evaluate after "
                                       "every epoch; write config.json, the metrics and Orbax "
                                       "checkpoints to --out. Flags override --config.")
    train.add_argument("--config", metavar="FILE", help="JSON TrainConfig file (flags override it)")
    train.add_argument("--out", required=True, metavar="DIR",
                       help="output folder (config.json, metrics, checkpoints)")
    train.add_argument("--resume", action="store_true",
                       help="continue from the newest intact checkpoint in --out (none "
                            "there: start from step 0, saying so); the config "
                            "must equal the saved one except "
                            + ", ".join(RESUME_SAFE_FIELDS))
    train.add_argument("--overwrite", action="store_true",
                       help="delete the earlier run in --out first (without it or --resume, a "
                            "folder holding a run is refused)")
    train.add_argument("--allow-change", default="", metavar="FIELD,...",
                       help="with --resume: accept these changed config fields (e.g. lr)")
    train.add_argument("--mesh", default="auto", choices=("auto", "explicit"),
                       help="axis type of the data mesh over all devices; explicit is "
                            "jax.make_mesh's default, sharding in types (default: auto)")
    add_config_flags(train)


def _eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a checkpoint of a train run",
                        description="Evaluate the checkpoint of a `train` output folder; one "
                                    "JSON line per example weight.")
    ev.add_argument("--run", required=True, metavar="DIR",
                    help="the --out folder of a train run")
    ev.add_argument("--split", default=None,
                    help="split to evaluate, e.g. test or train[:1000] (default: the run's "
                         "evaluation split)")
    ev.add_argument("--step", type=int, default=None,
                    help="checkpoint step (default: the newest)")
    ev.add_argument("--example-weight", type=float, nargs="+", default=[0.0], metavar="ALPHA",
                    help="'Four Things' example weight(s) in [0, 1]; several values are "
                         "evaluated in turn, a line search (default: 0)")
    ev.add_argument("--batch-size", type=int, default=None,
                    help="evaluation batch size (default: the run's)")
    ev.add_argument("--data-dir", default=None, metavar="DIR",
                    help="read the dataset from here instead of the run's data folder")


def _study_flags(parser, out: str) -> None:
    """``--config``, ``--out`` and ``--seeds`` of the studies (compare, tune)."""
    parser.add_argument("--config", metavar="FILE",
                        help="JSON TrainConfig file for the shared settings")
    parser.add_argument("--out", default=out, metavar="DIR", help=f"output folder (default: {out})")
    parser.add_argument("--seeds", default=str(COMPARE_SEEDS), metavar="N|S,...",
                        help="a count N (seeds 0..N-1) or a comma-separated list of seeds "
                             f"(default: {COMPARE_SEEDS})")
    _resume_flags(parser)


def _resume_flags(parser) -> None:
    """``--resume`` and ``--overwrite`` of a study's folder."""
    parser.add_argument("--resume", action="store_true",
                        help="continue the study in --out: finished runs are kept, a stopped "
                             "one continues from its checkpoint, the rest are trained")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the earlier study in --out first (without it or --resume, "
                             "a folder holding one is refused)")


def _compare_parser(sub) -> None:
    from seqnorm_jax.studies.labels import DEFAULT_NORMS, LABELS

    cmp_ = sub.add_parser(
        "compare", help="compare norm layers on one model over several seeds",
        description="Train the same model with several norm layers and seeds; write "
                    "results.json, results.csv, results.md and curves.png to --out. Its "
                    "defaults train paper 000's SimpleNet on Fashion-MNIST.")
    _study_flags(cmp_, "runs/compare")
    cmp_.add_argument("--norms", default=None, metavar="LAYER,...",
                      help=f"comma-separated layers: labels ({', '.join(LABELS)}), whose group "
                           "settings are chosen for the model, or norm specs, e.g. "
                           "bn,seqnorm:channel_groups=2,batch_groups=4 "
                           f"(default: {','.join(DEFAULT_NORMS)})")
    add_config_flags(cmp_, skip=("norm", "seed"), defaults=COMPARE_DEFAULTS)


def _tune_parser(sub) -> None:
    from seqnorm_jax.studies.labels import METRICS

    tune = sub.add_parser(
        "tune", help="tune SeqNorm's batch_groups then channel_groups (paper 000, 3.2.1)",
        description="Tune G_M (batch_groups) with GhostNorm, keep the largest well-performing "
                    "value (lowest std over seeds among similar ones), then tune G_C "
                    "(channel_groups) of SeqNorm with it: len(G_M) + len(G_C) settings instead "
                    "of a grid. Tuning reads a validation set, never the test set: without "
                    "--validation-size, 10% of the training set is held out (stratified). "
                    "Writes tune.json, tune.csv, tune.md, tune.png and one compare folder per "
                    "stage to --out. Its defaults are compare's.")
    _study_flags(tune, "runs/tune")
    tune.add_argument("--batch-groups", default=TUNE_BATCH_GROUPS, dest="tune_batch_groups",
                      metavar="G_M,...",
                      help="comma-separated G_M candidates; values that do not fit the batch "
                           f"are skipped (default: {TUNE_BATCH_GROUPS})")
    tune.add_argument("--channel-groups", default=TUNE_CHANNEL_GROUPS,
                      dest="tune_channel_groups", metavar="G_C,...",
                      help="comma-separated G_C candidates; values that do not divide every "
                           f"norm layer's width are skipped (default: {TUNE_CHANNEL_GROUPS})")
    tune.add_argument("--tolerance", type=float, default=None, metavar="X",
                      help="candidates whose mean metric is within this of the best perform "
                           "'similarly', e.g. 0.005 = half a point of accuracy (default: the "
                           "best candidate's standard error over the seeds)")
    tune.add_argument("--norm-fields", default="", dest="tune_norm_fields", metavar="KEY=VALUE,...",
                      help="fields added to every candidate's spec, e.g. momentum=0.9 "
                           "(default: none)")
    tune.add_argument("--metric", default="eval_accuracy",
                      help="the validation metric to select by: "
                           + "; ".join(f"{k}: {d}" for k, (d, _) in METRICS.items())
                           + " (default: eval_accuracy)")
    add_config_flags(tune, skip=("norm", "seed"), defaults=COMPARE_DEFAULTS)


def _experiment_parser(sub) -> None:
    exp = sub.add_parser(
        "experiment", help="run a paper experiment config (--list shows them)",
        description="Run one table or figure of the papers at a scale: full (the paper's "
                    "setting, for accelerators), cpu (real data, minutes to an hour on a CPU) "
                    "or smoke (two steps of a tiny model on mock data). Writes results.json, "
                    "results.csv, results.md and the plots to --out.")
    exp.add_argument("config", nargs="?", metavar="CONFIG",
                     help="a packaged config's name (see --list) or a JSON config file")
    exp.add_argument("--scale", default="cpu", choices=("full", "cpu", "smoke"),
                     help="which version to run (default: cpu)")
    exp.add_argument("--out", default=None, metavar="DIR",
                     help="output folder (default: runs/experiments/NAME/SCALE)")
    exp.add_argument("--seeds", default=None, metavar="N|S,...",
                     help="override the scale's seeds: a count N (0..N-1) or a "
                          "comma-separated list (default: the config's)")
    _resume_flags(exp)
    exp.add_argument("--replot", action="store_true",
                     help="train nothing: rewrite the tables and plots from --out's results.json")
    exp.add_argument("--list", action="store_true", dest="list_configs",
                     help="list the configs and exit")
    exp.add_argument("--configs-dir", default=None, metavar="DIR",
                     help="where --list looks (default: the configs shipped with the package)")


def _plan_parser(sub) -> None:
    plan = sub.add_parser(
        "plan", help="compile a run's training step for a TPU or GPU pod, without one",
        description="Compile the training step of a run (a paper config, --config or the "
                    "training flags) for a TPU or GPU topology with no accelerator attached, "
                    "and print per chip: memory against HBM (refused if it does not fit), "
                    "the collectives per step with the norm layers' statistics apart from "
                    "the gradient all-reduce, flops and bytes accessed, the roofline step "
                    "time and the run's training time. Needs the compiler: pip install "
                    "\"seqnorm-jax[tpu]\" (TPU) or \"seqnorm-jax[cuda]\" (GPU). Flags given "
                    "override the config's fields.")
    plan.add_argument("experiment", nargs="?", metavar="CONFIG",
                      help="a paper config's name (seqnorm-jax experiment --list) or JSON file; "
                           "without it, --config and the training flags")
    plan.add_argument("--topology", default=None, metavar="CHIP:SHAPE",
                      help="TPU v4, v5e, v5p, v6e with libtpu's chip grid (v5e:16x16, "
                           "v4:2x2x2, v5p:2x2x2) or GPU h100, a100 with a count or HOSTSxGPUS "
                           "(h100:8, a100:2x8)")
    plan.add_argument("--mesh", default=None, metavar="AXIS=SIZE,...",
                      help="the mesh over the topology's devices, with a 'data' axis for the "
                           "batch, e.g. data=128,model=2 (default: data=all devices)")
    plan.add_argument("--axis-types", default="auto", choices=("auto", "explicit"),
                      help="the mesh's axis type; explicit is jax.make_mesh's default, "
                           "sharding in types (default: auto)")
    plan.add_argument("--scale", default="full", choices=("full", "cpu", "smoke"),
                      help="which version of CONFIG (default: full)")
    plan.add_argument("--run", default=None, metavar="LABEL",
                      help="plan only this run of CONFIG: its label or 0-based index "
                           "(default: every run)")
    plan.add_argument("--config", metavar="FILE",
                      help="JSON TrainConfig file (flags override it)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("--paper-table", action="store_true",
                      help="plan every packaged paper config at full scale and print the "
                           "table (step time, training time, memory fit); each distinct step "
                           "compiles once, cached in --cache")
    plan.add_argument("--cache", default="runs/plan/cache", metavar="DIR",
                      help="with --paper-table: the compile cache (default: runs/plan/cache)")
    plan.add_argument("--out", default=None, metavar="FILE",
                      help="with --paper-table: also write the table here, after every compile")
    plan.add_argument("--plot", default=None, metavar="PNG",
                      help="with --paper-table: also draw the finished table here (training "
                           "time and memory per config)")
    plan.add_argument("--no-compile", dest="compile", action="store_false",
                      help="with --paper-table: the table of the steps already in --cache, "
                           "compiling nothing")
    add_config_flags(plan)


# ---------------------------------------------------------------------------- values


def parse_seeds(text: str, flag: str = "--seeds") -> list[int]:
    """``"3"`` -> ``[0, 1, 2]``; ``"0,5"`` -> ``[0, 5]``; ``ValueError`` naming ``flag``."""
    try:
        items = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        items = None
    if not items:
        raise ValueError(f"{flag} {text!r}: give a count N or comma-separated integers.")
    if len(items) == 1 and "," not in text:
        if items[0] < 1:
            raise ValueError(f"{flag} {text!r}: the count must be >= 1.")
        return list(range(items[0]))
    return items


def parse_groups(text: str, flag: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``; ``ValueError`` naming ``flag`` unless all are ints >= 1."""
    try:
        items = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        items = []
    if not items or any(v < 1 for v in items):
        raise ValueError(f"{flag} {text!r}: give comma-separated positive integers, e.g. "
                         f"{flag} 1,2,4,8.")
    return items


def parse_norms(text: str | None) -> list[str]:
    """``--norms``: labels and specs; ``KEY=VALUE`` items continue the previous spec."""
    from seqnorm_jax.studies.labels import DEFAULT_NORMS

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
