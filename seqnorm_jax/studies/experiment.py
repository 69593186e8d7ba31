"""Paper experiments as JSON configs: load, resolve a scale, run, write results and plots.

An experiment config (``seqnorm_jax/studies/configs/*.json``, shipped with the package;
one per table or figure of the papers) names a *kind* of study
(:data:`~seqnorm_jax.studies.kinds.KINDS`), a full-scale base
:class:`~seqnorm_jax.train.TrainConfig`, a list of runs (each a label and the fields it
changes), the seeds, and two scaled-down versions: ``"cpu"`` (real data, minutes on a
laptop-class CPU) and ``"smoke"`` (a few steps of a tiny model on mock data, for CI).
``seqnorm-jax experiment`` is the command-line front end.

Every kind writes ``results.md``/``.csv``/``.json`` and ``curves.png`` (``sweep.png`` when
runs carry ``x``) plus its own files. With ``analysis.baseline`` (a run label) the table adds
each run's accuracy minus the baseline's, paired by seed. Runs that validate on a hold-out
(``validation_size``) score the test split once at the end (``final_test_accuracy``).

Scales: ``full`` is the config as written; ``cpu`` and ``smoke`` update ``base`` with their
own ``base`` (``model_kwargs`` replaced whole), replace ``runs``/``seeds`` when given and
update ``analysis``. ``smoke`` also forces one epoch of two steps, one seed and mock data
(random images of the dataset's shape, or ``smoke.image_shape``, which also turns the
augmentation off: its crops are defined for the real image size).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
import time
from collections.abc import Sequence
from importlib import resources
from typing import Any

from seqnorm_jax import checks
import seqnorm_jax.studies.report as report
from seqnorm_jax.studies.engine import Setting, SourceCache, run_settings
from seqnorm_jax.studies.kinds import KINDS
from seqnorm_jax.train.config import TrainConfig
from seqnorm_jax.train.files import run_path
from seqnorm_jax.train.files import is_writer

__all__ = ["SCALES", "Experiment", "config_path", "environment", "list_experiments",
           "load_experiment", "run_experiment"]

SCALES = ("full", "cpu", "smoke")
"""The scales of an experiment config: the paper's setting, a CPU-sized one, and a two-step
smoke run."""
_TOP_KEYS = {"name", "paper", "ref", "title", "claim", "kind", "base", "runs", "seeds",
             "analysis", "x_label", "x_log", "compute", "gaps", "notes", "cpu", "smoke"}
_SCALE_KEYS = {"base", "runs", "seeds", "analysis", "image_shape", "notes"}
_RUN_META = ("label", "series", "x")
SMOKE_STEPS = 2


def environment() -> dict[str, Any]:
    """The machine and versions a result came from (recorded with every result file)."""
    import flax
    import jax
    import optax

    return {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
            "devices": jax.device_count(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__}


@dataclasses.dataclass
class Experiment:
    """A loaded experiment config (see the module docstring for the fields).

    ``scale`` is the scale it is resolved at (``"full"`` as loaded); :meth:`resolve`
    returns the experiment at another one.
    """

    name: str
    paper: str
    ref: str
    title: str
    kind: str
    base: dict[str, Any]
    runs: list[dict[str, Any]]
    seeds: list[int]
    claim: str = ""
    analysis: dict[str, Any] = dataclasses.field(default_factory=dict)
    x_label: str | None = None
    x_log: bool = False
    compute: str = ""
    gaps: str | None = None
    notes: str | None = None
    cpu: dict[str, Any] | None = None
    smoke: dict[str, Any] | None = None
    path: str | None = None
    image_shape: tuple[int, ...] | None = None
    scale: str = "full"

    def resolve(self, scale: str = "full") -> Experiment:
        """This experiment at ``scale`` (``"full"``, ``"cpu"`` or ``"smoke"``), validated."""
        checks.choice(scale, SCALES, "scale", f"experiment {self.name!r}")
        if self.scale != "full":
            if scale == self.scale:
                return copy.deepcopy(self)
            raise ValueError(f"experiment {self.name!r} is already resolved at scale "
                             f"{self.scale!r}; resolve the loaded experiment at {scale!r}.")
        out = copy.deepcopy(self)
        if scale != "full":
            section = getattr(self, scale)
            if section is None:
                raise ValueError(f"experiment {self.name!r} has no {scale!r} section; add one "
                                 f"or run another scale.")
            out.base = {**out.base, **section.get("base", {})}
            if "runs" in section:
                out.runs = copy.deepcopy(section["runs"])
            if "seeds" in section:
                out.seeds = list(section["seeds"])
            out.analysis = {**out.analysis, **section.get("analysis", {})}
            if scale == "smoke":
                out.base.update(epochs=1, progress=False)
                out.seeds = out.seeds[:1]
                out.image_shape = section.get("image_shape")
                if out.image_shape is not None:
                    # the augmentation presets crop to the dataset's real size
                    out.base["augment"] = "none"
        out.cpu = out.smoke = None
        out.scale = scale
        out.validate()
        return out

    def configs(self) -> list[tuple[dict[str, Any], TrainConfig]]:
        """``(run, TrainConfig)`` for every run (the run's fields applied to ``base``)."""
        out = []
        for run in self.runs:
            fields = {**self.base, **{k: v for k, v in run.items() if k not in _RUN_META}}
            try:
                out.append((run, TrainConfig.from_dict(fields)))
            except (TypeError, ValueError) as e:
                raise ValueError(f"experiment {self.name!r}, run {run.get('label')!r}: {e}") \
                    from None
        return out

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first problem (kind, runs, seeds, configs, norms)."""
        from seqnorm_jax.registry import NormSpec

        where = f"experiment {self.name!r}"
        kind = KINDS.get(self.kind)
        if kind is None:
            raise ValueError(f"{where}: kind={self.kind!r}; choose one of {list(KINDS)}."
                             f"{checks.suggest(self.kind, KINDS)}")
        if not self.seeds or not all(isinstance(s, int) for s in self.seeds):
            raise ValueError(f"{where}: seeds must be a non-empty list of integers.")
        known = set(kind.options) | ({"baseline"} if kind.baseline else set())
        unknown = sorted(set(self.analysis) - known)
        if unknown:
            raise ValueError(f"{where}: analysis option(s) {unknown} are not read by kind "
                             f"{self.kind!r}; its options are {sorted(known)}."
                             f"{checks.suggest(unknown[0], known)}")
        if kind.run is not None:
            TrainConfig.from_dict(self.base)
            return
        if not self.runs:
            raise ValueError(f"{where}: runs is empty; give at least one run with a label.")
        labels = [r.get("label") for r in self.runs]
        if not all(isinstance(lab, str) and lab for lab in labels):
            raise ValueError(f"{where}: every run needs a non-empty string 'label'.")
        dup = sorted({lab for lab in labels if labels.count(lab) > 1})
        if dup:
            raise ValueError(f"{where}: duplicate run labels {dup}; labels must be unique.")
        self.check_baseline(labels)
        for run, config in self.configs():
            try:
                NormSpec.parse(config.norm)
            except ValueError as e:
                raise ValueError(f"{where}, run {run['label']!r}: {e}") from None

    def check_baseline(self, labels: Sequence[str]) -> None:
        """``analysis.baseline``, if set, must be one of ``labels``."""
        baseline = self.analysis.get("baseline")
        if baseline is not None and baseline not in labels:
            raise ValueError(f"experiment {self.name!r}: analysis.baseline={baseline!r} is not "
                             f"a run label; choose one of {sorted(set(labels))}."
                             f"{checks.suggest(baseline, labels)}")


def load_experiment(path: str | os.PathLike) -> Experiment:
    """Load and validate an experiment config (all three scales are checked).

    ``path`` is a JSON file or the name of a config shipped with the package
    (``"002_ghost_batch_size_sweep"``, see :func:`list_experiments`).
    """
    path = config_path(path)
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: an experiment config must be a JSON object.")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; valid keys are {sorted(_TOP_KEYS)}."
                         f"{checks.suggest(unknown[0], _TOP_KEYS)}")
    missing = sorted({"name", "paper", "ref", "title", "kind", "base", "seeds"} - set(data))
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}.")
    stem = os.path.splitext(os.path.basename(path))[0]
    if data["name"] != stem:
        raise ValueError(f"{path}: name={data['name']!r} must equal the file name {stem!r}.")
    for scale in ("cpu", "smoke"):
        extra = sorted(set(data.get(scale) or {}) - _SCALE_KEYS)
        if extra:
            raise ValueError(f"{path}: unknown key(s) {extra} in {scale!r}; valid keys are "
                             f"{sorted(_SCALE_KEYS)}.{checks.suggest(extra[0], _SCALE_KEYS)}")
    data.setdefault("runs", [])
    _check_sections(path, data)
    exp = Experiment(**data, path=path)
    for scale in SCALES:
        if scale == "full" or getattr(exp, scale) is not None:
            exp.resolve(scale)
    return exp


def _check_sections(path: str, data: dict[str, Any]) -> None:
    """Each section has its JSON type (``base`` an object, ``runs`` a list of objects, ...)."""
    def need(ok, where, what):
        if not ok:
            raise ValueError(f"{path}: {where} must be {what}.")

    for key in ("name", "paper", "ref", "title", "kind"):
        need(isinstance(data[key], str), key, "a string")
    need(isinstance(data["base"], dict), "base", "an object of TrainConfig fields")
    need(isinstance(data["runs"], list) and all(isinstance(r, dict) for r in data["runs"]),
         "runs", "a list of objects (a label and the fields it changes)")
    need(isinstance(data["seeds"], list), "seeds", "a list of integers")
    need(isinstance(data.get("analysis", {}), dict), "analysis", "an object")
    for scale in ("cpu", "smoke"):
        section = data.get(scale)
        if section is None:
            continue
        need(isinstance(section, dict), scale, "an object")
        for key, kind, what in (("base", dict, "an object"), ("runs", list, "a list"),
                                ("seeds", list, "a list of integers"),
                                ("analysis", dict, "an object")):
            if key in section:
                need(isinstance(section[key], kind), f"{scale}.{key}", what)


def _packaged() -> dict[str, str]:
    """``{name: path}`` of the configs shipped in ``seqnorm_jax/studies/configs``."""
    folder = resources.files("seqnorm_jax.studies") / "configs"
    return {p.name.removesuffix(".json"): str(p) for p in sorted(
        folder.iterdir(), key=lambda p: p.name) if p.name.endswith(".json")}


def config_path(name: str | os.PathLike) -> str:
    """The JSON file of ``name``: a path, or the name of a packaged config.

    Raises:
      ValueError: neither (the message suggests the closest packaged name), or a folder.
    """
    path = os.fspath(name)
    if os.path.isdir(path):
        raise ValueError(f"experiment config {path!r} is a folder; give one JSON file of it "
                         f"(`seqnorm-jax experiment --list --configs-dir {path}` lists them).")
    if os.path.isfile(path):
        return path
    packaged = _packaged()
    stem = os.path.basename(path).removesuffix(".json")
    if stem in packaged and os.sep not in path:
        return packaged[stem]
    raise ValueError(f"no such experiment config {path!r}; `seqnorm-jax experiment --list` "
                     f"shows the configs.{checks.suggest(stem, packaged)}")


def list_experiments(directory: str | os.PathLike | None = None) -> list[Experiment]:
    """Every ``*.json`` config in ``directory`` (default: the packaged configs), loaded and
    validated, sorted by name."""
    if directory is None:
        return [load_experiment(p) for p in _packaged().values()]
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ValueError(f"no experiment directory {directory!r}; pass a folder of configs, "
                         "or leave it out for the packaged ones.")
    return [load_experiment(os.path.join(directory, f))
            for f in sorted(os.listdir(directory)) if f.endswith(".json")]


# ---------------------------------------------------------------------------- running


def run_experiment(exp: Experiment | str | os.PathLike, scale: str | None = None,
                   out_dir: str | os.PathLike | None = None, *,
                   seeds: Sequence[int] | None = None, progress: bool = True,
                   command: str | None = None, replot: bool = False, resume: bool = False,
                   overwrite: bool = False) -> dict[str, Any]:
    """Run ``exp`` at ``scale`` and write its results into ``out_dir``.

    Args:
      exp: an :class:`Experiment` (loaded, or already resolved at a scale), or a config
        path or packaged name.
      scale: ``"full"``, ``"cpu"`` or ``"smoke"``; default: the scale ``exp`` is
        resolved at, ``"cpu"`` for a loaded one. A resolved experiment runs at its own
        scale only.
      out_dir: where ``results.{json,csv,md}``, ``curves.png``, the kind's plot and
        ``runs/<label>_seed<k>/`` (config, metrics, analysis) go (default
        ``runs/experiments/<name>/<scale>``).
      seeds: override the seeds of the scale.
      progress: show progress bars.
      command: the command line to record in ``results.md``.
      replot: train nothing; rewrite the tables and plots from the runs saved in
        ``out_dir/results.json`` (after a change to a plot, say).
      resume: continue the experiment in ``out_dir``: finished runs are kept, a run
        stopped by a signal continues from its checkpoint (or starts over when the kind
        records every step, e.g. landscape), the others are trained.
      overwrite: delete an earlier experiment's files in ``out_dir`` first. Without
        ``resume`` or ``overwrite`` a folder holding one is refused.

    Returns:
      The content of ``results.json``: ``experiment`` (the resolved config),
      ``environment``, ``summary`` (one row per run label), ``runs`` and ``seconds``.
    """
    exp = exp if isinstance(exp, Experiment) else load_experiment(exp)
    exp = exp.resolve(scale or ("cpu" if exp.scale == "full" else exp.scale))
    if seeds is not None:
        exp.seeds = [int(s) for s in seeds]
        exp.validate()
    out_dir = os.fspath(out_dir or default_out_dir(exp))
    if replot:
        if resume or overwrite:
            raise ValueError("replot trains nothing: drop --resume/--overwrite.")
        return _replot(exp, out_dir, command)
    from seqnorm_jax.studies.compare import RESULT_FILES
    from seqnorm_jax.studies.tune import TUNE_FILES, TUNE_STAGES
    from seqnorm_jax.train.files import run_lock
    from seqnorm_jax.train.files import claim_run_folder

    with run_lock(out_dir, "out_dir (--out)"):
        claim_run_folder(out_dir, "out_dir (--out)", resume=resume, overwrite=overwrite,
                         files=RESULT_FILES + TUNE_FILES, marks=RESULT_FILES[:1] + TUNE_STAGES)
        t0 = time.perf_counter()
        kind = KINDS[exp.kind]
        if kind.run is not None:
            payload = {"experiment": _describe(exp), "environment": environment(),
                       **kind.run(exp, out_dir, progress, resume),
                       "seconds": round(time.perf_counter() - t0, 1), "command": command}
            if is_writer():
                report.write_json(os.path.join(out_dir, "results.json"), payload, compact=True)
            return payload
        records = _run(exp, out_dir, progress, resume)
        return _write(exp, out_dir, records, time.perf_counter() - t0, command)


def default_out_dir(exp: Experiment) -> str:
    """``runs/experiments/<name>/<scale>``: where a resolved experiment writes by default."""
    return os.path.join("runs", "experiments", exp.name, exp.scale)


def _run(exp: Experiment, out_dir: str, progress: bool, resume: bool = False
         ) -> list[dict[str, Any]]:
    kind = KINDS[exp.kind]
    smoke = exp.scale == "smoke"
    sources = SourceCache(exp.seeds[0], mock_steps=SMOKE_STEPS if smoke else None,
                          image_shape=exp.image_shape)

    def analyse(trainer, state, hooks):
        out = {}
        config = trainer.config
        if config.validation_size and kind.scores_test:
            # tuned on the hold-out; the test split is scored once, at the end
            test = trainer.evaluate(state, sources.test_split(config))
            out.update(final_test_accuracy=test["eval_accuracy"], final_test_loss=test["eval_loss"])
        return {**out, **kind.analyse(exp, trainer, state, hooks, sources)}

    settings = [Setting(run["label"], config, {"series": run.get("series"), "x": run.get("x")})
                for run, config in exp.configs()]
    return run_settings(
        settings, exp.seeds, out_dir, sources=sources,
        hooks=lambda trainer: kind.hooks(exp, trainer), analyse=analyse,
        unfit=lambda s, e: f"experiment {exp.name!r}, run {s.label!r}: {e}",
        progress=progress, run_progress=progress and not smoke, desc=exp.name,
        split=_split(exp), resume=resume)


def _replot(exp: Experiment, out_dir: str, replot_command: str | None) -> dict[str, Any]:
    path = os.path.join(out_dir, "results.json")
    if not os.path.exists(path):
        raise ValueError(f"replot: no {path}; run the experiment first (without --replot).")
    with open(path) as f:
        saved = json.load(f)
    if KINDS[exp.kind].run is not None or saved["experiment"]["name"] != exp.name:
        raise ValueError(f"replot: {path} holds no runs of experiment {exp.name!r}.")
    exp.seeds = saved["experiment"]["seeds"]
    return _write(exp, out_dir, saved["runs"], saved["seconds"], saved.get("command"),
                  env=saved["environment"], replot_command=replot_command or "--replot")


def _describe(exp: Experiment) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(exp).items()
            if k not in ("cpu", "smoke", "image_shape")}


def _split(exp: Experiment) -> str:
    return "validation" if exp.base.get("validation_size") else "test"


# ---------------------------------------------------------------------------- outputs


def _summary(exp: Experiment, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    kind = KINDS[exp.kind]
    rows = report.summarize(records, _split(exp))
    exp.check_baseline([r["label"] for r in records])
    baseline = exp.analysis.get("baseline")
    ok = report.finished(records)  # diverged runs: counted, not summed
    for row in rows:
        rs = [r for r in records if r["label"] == row["label"]]
        row["series"], row["x"] = rs[0].get("series"), rs[0].get("x")
        rs = [r for r in ok if r["label"] == row["label"]]
        if not rs:
            continue
        if all("final_test_accuracy" in r for r in rs):
            row["final_test_accuracy_mean"], row["final_test_accuracy_std"] = report.mean_std(
                r["final_test_accuracy"] for r in rs)
        row.update(kind.summary(exp, rs))
        if baseline is not None:
            row.update(report.paired_differences(rs, [r for r in ok if r["label"] == baseline]))
    return rows


def _table(exp: Experiment, summary: list[dict[str, Any]]) -> str:
    split = _split(exp)
    acc = report.accuracy_name(split)
    skip = {"label", "spec", "seeds", f"{acc}_mean", f"{acc}_std", f"best_{acc}_mean",
            "train_loss_mean", "train_loss_std", "epoch_time_mean", "series", "x", "runs",
            "steps"}
    extra = [k for k in summary[0] if k not in skip and not k.endswith("_std")
             and not k.startswith(("layer", "acc_at_"))]
    names = {"final_test_accuracy_mean": "test accuracy (scored once, at the end)",
             "delta_vs_baseline_accuracy_mean": f"minus {exp.analysis.get('baseline')!r}, "
                                                "paired by seed",
             "seeds_better_than_baseline": "seeds above it"}
    head = ["run", "spec", f"{'validation' if split == 'validation' else 'eval'} accuracy "
            "(mean +- std)", "final train loss",
            *(names.get(k, k.removesuffix("_mean").replace("_", " ")) for k in extra),
            "s/epoch", "seeds"]

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else "" if v is None else str(v)

    def cell(r, k):
        std = r.get(k.removesuffix("_mean") + "_std", r.get(k + "_std"))
        if "accuracy" in k and r[k] is not None:
            return report.percent(r[k], std)
        return fmt(r[k]) + ("" if std is None or r["seeds"] < 2 else f" +- {fmt(std)}")

    return report.markdown_table(head, (
        [r["label"], f"`{r['spec']}`", cell(r, f"{acc}_mean"),
         "-" if r["train_loss_mean"] is None else f"{r['train_loss_mean']:.4f}",
         *(cell(r, k) for k in extra),
         "-" if r["epoch_time_mean"] is None else f"{r['epoch_time_mean']:.1f}", str(r["seeds"])]
        for r in summary))


def _write(exp, out_dir, records, seconds, command, env=None,
           replot_command=None) -> dict[str, Any]:
    kind = KINDS[exp.kind]
    records = kind.prepare(exp, records)
    summary = _summary(exp, records)
    env = env or environment()
    payload = {"experiment": _describe(exp), "environment": env, "summary": summary,
               "runs": report.jsonable(records), "seconds": round(seconds, 1),
               "command": command}
    if not is_writer():  # a multi-process run: process 0 writes
        return payload
    for r in records:  # each run's analysis as runs/<label>_seed<k>/<kind>.json
        out = {k: r[k] for k in (exp.kind, "example_weight_test") if k in r}
        if out:
            run_dir = run_path(out_dir) / "runs" / report.run_dir_name(r["label"], r["seed"])
            run_dir.mkdir(parents=True, exist_ok=True)
            report.write_text(os.fspath(run_dir / f"{exp.kind}.json"),
                              json.dumps(report.jsonable(out)))
    report.write_json(os.path.join(out_dir, "results.json"), payload, compact=True)
    report.write_csv(os.path.join(out_dir, "results.csv"), summary)
    b = exp.base
    title = (f"{exp.name} ({exp.scale}): {b.get('model')} on {b.get('dataset')}, "
             f"{b.get('epochs')} epochs, seeds {exp.seeds}")
    report.plot_curves(records, os.path.join(out_dir, "curves.png"), title, _split(exp))
    plots = ["curves.png"]
    if any(r.get("x") is not None for r in records):
        # the test split when the runs validated on a hold-out, else the evaluation split
        acc = report.accuracy_name(_split(exp))
        points = [r for r in summary if r.get("x") is not None and r[f"{acc}_mean"] is not None]
        test = all("final_test_accuracy_mean" in r for r in points)
        report.plot_sweep(summary, os.path.join(out_dir, "sweep.png"), title,
                          key="final_test_accuracy" if test else acc,
                          ylabel="test accuracy (%)" if test else "eval accuracy (%)",
                          x_label=exp.x_label, x_log=exp.x_log)
        plots.append("sweep.png")
    # the kind's analysis exists for the runs that did not diverge
    ok = report.finished(records)
    by_label = {lab: [r for r in ok if r["label"] == lab]
                for lab in dict.fromkeys(r["label"] for r in ok)}
    kind_plots, extra_md = kind.report(exp, out_dir, by_label, summary, title)
    plots += kind_plots
    machine = (f"Machine: {env['cpu']} ({env['cpu_count']} cores), {env['backend']} backend, "
               f"Python {env['python']}, jax {env['jax']}, flax {env['flax']}; "
               f"{seconds / 60:.1f} min.\n\n")
    report.write_text(os.path.join(out_dir, "results.md"), "".join([
        f"# {exp.name}: {exp.title}\n\n",
        f"Paper {exp.paper}, {exp.ref}; scale `{exp.scale}`; {title}.\n\n",
        f"Command: `{command}`\n\n" if command else "",
        f"Tables and plots redrawn from `results.json` by `{replot_command}`.\n\n"
        if replot_command else "", machine, _table(exp, summary) + extra_md + "\n\n",
        *(f"![{p}]({p})\n" for p in plots)]))
    return payload
