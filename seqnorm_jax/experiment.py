"""Paper experiments as JSON configs: load, resolve a scale, run, write results and plots.

An experiment config (``experiments/configs/*.json``, one per table or figure of the
papers) names a *kind* of study, a full-scale base :class:`~seqnorm_jax.train.TrainConfig`,
a list of runs (each a label and the fields it changes), the seeds, and two scaled-down
versions: ``"cpu"`` (real data, minutes on a laptop-class CPU) and ``"smoke"`` (a few
steps of a tiny model on mock data, for CI). ``seqnorm-jax experiment`` is the command-line
front end::

    seqnorm-jax experiment experiments/configs/000_fig2_a3_mnist_simplenet_landscape.json \\
        --scale cpu --out experiments/results/000_fig2_a3_mnist_simplenet_landscape
    seqnorm-jax experiment --list

Kinds (what is run for every run and seed, and what is written besides the accuracy
table ``results.md``/``results.csv``, ``results.json`` and ``curves.png``):

* ``compare``: training only; ``sweep.png`` when the runs carry ``x`` (and ``series``).

Every kind: with ``analysis.baseline`` (a run label) the table adds each run's accuracy
minus the baseline's, paired by seed, and on how many seeds it is higher. When the runs
validate on a hold-out (``validation_size``), the test split is scored once at the end
(``final_test_accuracy``) and the paired differences use it.
* ``landscape``: :class:`~seqnorm_jax.analysis.LandscapeRecorder` during training
  (``analysis``: ``step_sizes``, ``every``); ``landscape.png``.
* ``fluctuation``: :class:`~seqnorm_jax.analysis.StatisticsRecorder` over the last
  ``analysis.last_steps`` steps; ``fluctuation.png``/``fluctuation.csv``.
* ``example_weight``: after training, accuracy over ``analysis.example_weights`` on the
  evaluation source (and, when the config holds out a validation set, alpha chosen there
  and applied to the test split); ``example_weight.png``/``example_weight.csv``.
* ``output_range``: after training, the chosen norm layer's normalized output in training
  and inference mode against the bound ``sqrt(m - 1)``; ``output_range.png``.
* ``tune``: :func:`~seqnorm_jax.analysis.sequential_tune` (``analysis``:
  ``batch_groups``, ``channel_groups``).

Scales: ``full`` is the config as written; ``cpu`` and ``smoke`` update ``base`` with their
own ``base`` (``model_kwargs`` replaced whole), replace ``runs``/``seeds`` when given and
update ``analysis``. ``smoke`` also forces one epoch of two steps, one seed and mock data
(random images of the dataset's shape, or ``smoke.image_shape``, which also turns the
augmentation off: its crops are defined for the real image size).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import os
import platform
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from seqnorm_jax.train.compare import _mean_std, _run_line, _safe, run_record, strict_json
from seqnorm_jax.train.metrics import _opened
from seqnorm_jax.train.config import TrainConfig

__all__ = [
    "KINDS",
    "SCALES",
    "Experiment",
    "environment",
    "list_experiments",
    "load_experiment",
    "mock_sources",
    "run_experiment",
]

KINDS = ("compare", "landscape", "fluctuation", "example_weight", "output_range", "tune")
SCALES = ("full", "cpu", "smoke")
_TOP_KEYS = {"name", "paper", "ref", "title", "claim", "kind", "base", "runs", "seeds",
             "analysis", "x_label", "x_log", "compute", "gaps", "notes", "cpu", "smoke"}
_SCALE_KEYS = {"base", "runs", "seeds", "analysis", "image_shape", "notes"}
_RUN_META = ("label", "series", "x")
# The ``analysis`` options each kind reads (``baseline``: every kind but ``tune``).
ANALYSIS_KEYS = {
    "compare": (),
    "landscape": ("step_sizes", "every", "relative_to_lr", "smooth"),
    "fluctuation": ("last_steps", "trajectory_neurons"),
    "example_weight": ("example_weights",),
    "output_range": ("layer", "example_weight", "num_examples"),
    "tune": ("batch_groups", "channel_groups", "tolerance", "metric", "norm_fields"),
}
SMOKE_STEPS = 2
_FLUCT_KEYS = ("bn_mean_fluct", "bn_std_fluct", "en_mean_fluct", "en_std_fluct")


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
    """A loaded experiment config (see the module docstring for the fields)."""

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

    def resolve(self, scale: str = "full") -> Experiment:
        """This experiment at ``scale`` (``"full"``, ``"cpu"`` or ``"smoke"``), validated."""
        if scale not in SCALES:
            raise ValueError(f"scale={scale!r}: choose one of {list(SCALES)}.")
        if scale == "full":
            out = copy.deepcopy(self)
        else:
            section = getattr(self, scale)
            if section is None:
                raise ValueError(f"experiment {self.name!r} has no {scale!r} section; add one "
                                 f"or run another scale.")
            out = copy.deepcopy(self)
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
        out._scale = scale
        out.validate()
        return out

    @property
    def scale(self) -> str:
        return getattr(self, "_scale", "full")

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
        where = f"experiment {self.name!r}"
        if self.kind not in KINDS:
            raise ValueError(f"{where}: kind={self.kind!r}; choose one of {list(KINDS)}.")
        if not self.seeds or not all(isinstance(s, int) for s in self.seeds):
            raise ValueError(f"{where}: seeds must be a non-empty list of integers.")
        known = set(ANALYSIS_KEYS[self.kind]) | ({"baseline"} if self.kind != "tune" else set())
        unknown = sorted(set(self.analysis) - known)
        if unknown:
            raise ValueError(f"{where}: analysis option(s) {unknown} are not read by kind "
                             f"{self.kind!r}; its options are {sorted(known)}.")
        if self.kind == "tune":
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
        baseline = self.analysis.get("baseline")
        if baseline is not None and baseline not in labels:
            raise ValueError(f"{where}: analysis.baseline={baseline!r} is not a run label; "
                             f"choose one of {sorted(labels)}.")
        from seqnorm_jax.factory import norm_factory

        for run, config in self.configs():
            try:
                norm_factory(config.norm)
            except ValueError as e:
                raise ValueError(f"{where}, run {run['label']!r}: {e}") from None


def load_experiment(path: str | os.PathLike) -> Experiment:
    """Load and validate an experiment config (all three scales are checked)."""
    path = os.fspath(path)
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: an experiment config must be a JSON object.")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; valid keys are {sorted(_TOP_KEYS)}.")
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
                             f"{sorted(_SCALE_KEYS)}.")
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


def list_experiments(directory: str | os.PathLike = "experiments/configs") -> list[Experiment]:
    """Every ``*.json`` config in ``directory``, loaded and validated, sorted by name."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ValueError(f"no experiment directory {directory!r}; run from the repository root "
                         "or pass the configs' directory.")
    return [load_experiment(os.path.join(directory, f))
            for f in sorted(os.listdir(directory)) if f.endswith(".json")]


# ---------------------------------------------------------------------------- data


def mock_sources(dataset: str, *, num_train: int, num_eval: int, image_shape=None,
                 seed: int = 0):
    """Random uint8 images and labels shaped like ``dataset`` (smoke runs; no files read).

    Every class appears in both sources (round-robin labels, shuffled), so class-based
    samplers (non-i.i.d. batches, stratified hold-outs) work on them.
    """
    from seqnorm_jax.data import ArraySource, dataset_info

    info = dataset_info(dataset)
    if image_shape is not None:
        info = dataclasses.replace(info, image_shape=tuple(int(d) for d in image_shape))
    rng = np.random.default_rng(seed)

    def make(n):
        images = rng.integers(0, 256, size=(n, *info.image_shape), dtype=np.uint8)
        labels = rng.permutation(np.arange(n) % info.num_classes)
        return ArraySource(images, labels, info)

    return make(num_train), make(num_eval)


class _Sources:
    """Load each distinct dataset selection once (shared by the runs of an experiment).

    At the smoke scale every batch size gets mock data of exactly ``SMOKE_STEPS`` batches,
    so one epoch is ``SMOKE_STEPS`` steps followed by the evaluation.
    """

    def __init__(self, exp: Experiment, image_shape=None):
        self.exp, self.cache, self.image_shape = exp, {}, image_shape

    def __call__(self, config: TrainConfig):
        from seqnorm_jax.train import load_sources

        if self.exp.scale == "smoke":
            key = ("mock", config.dataset, config.batch_size)
            if key not in self.cache:
                self.cache[key] = mock_sources(
                    config.dataset, num_train=SMOKE_STEPS * config.batch_size,
                    num_eval=min(64, 2 * config.batch_size), image_shape=self.image_shape)
            return self.cache[key]
        key = (config.dataset, config.data_dir, config.data_source, config.train_size,
               config.validation_size, config.eval_split)
        if key not in self.cache:
            self.cache[key] = load_sources(config.replace(seed=self.exp.seeds[0]))
        return self.cache[key]

    def test_split(self, config: TrainConfig):
        from seqnorm_jax import data

        if self.exp.scale == "smoke":
            return self(config)[1]
        key = ("test", config.dataset, config.data_dir, config.data_source, config.eval_split)
        if key not in self.cache:
            self.cache[key] = data.load(config.dataset, config.eval_split,
                                        data_dir=config.data_dir, source=config.data_source)
        return self.cache[key]


# ---------------------------------------------------------------------------- running


def _mesh_for(batch_size: int):
    """All devices, or (one process) the most that divide a batch smaller than their count.

    A batch-size sweep down to 2 examples must also run on 4 or 8 devices; its small
    batches then use a sub-mesh of ``gcd(batch_size, devices)`` devices.
    """
    import jax

    from seqnorm_jax.distributed import data_mesh

    n = jax.device_count()
    k = math.gcd(batch_size, n)
    if k == n or jax.process_count() > 1:
        return None
    return data_mesh(jax.devices()[:k])


def _hooks(exp: Experiment, trainer) -> list[Any]:
    from seqnorm_jax import analysis

    a = exp.analysis
    if exp.kind == "landscape":
        kwargs = {k: a[k] for k in ("step_sizes", "every") if k in a}
        if a.get("relative_to_lr"):
            kwargs["lr_schedule"] = trainer.schedule
        return [analysis.LandscapeRecorder(**kwargs)]
    if exp.kind == "fluctuation":
        return [analysis.StatisticsRecorder(last_steps=int(a.get("last_steps", 200)),
                                            total_steps=trainer.total_steps)]
    return []


def _after(exp: Experiment, trainer, state, hooks, sources, config) -> dict[str, Any]:
    """The kind's per-run analysis, as JSON-ready values."""
    from seqnorm_jax import analysis

    a = exp.analysis
    out: dict[str, Any] = {}
    if exp.kind == "landscape":
        out["landscape"] = hooks[0].rows
    elif exp.kind == "fluctuation":
        out["fluctuation"] = hooks[0].to_dict(neurons=_trajectory_neurons(exp))
    elif exp.kind == "example_weight":
        alphas = [float(v) for v in a.get("example_weights", [0.0, 0.25, 0.5, 0.75, 1.0])]
        out["example_weight"] = analysis.example_weight_sweep(
            state, trainer.eval_source, alphas, batch_size=config.eval_batch_size,
            mesh=trainer.mesh)
        if config.validation_size:
            best = analysis.best_example_weight(out["example_weight"])
            test = sources.test_split(config)
            rows = analysis.example_weight_sweep(
                state, test, sorted({0.0, float(best)}), batch_size=config.eval_batch_size,
                mesh=trainer.mesh)
            out["example_weight_test"] = {"chosen_on_validation": float(best), "rows": rows}
    elif exp.kind == "output_range":
        from seqnorm_jax import data

        n = int(a.get("num_examples", 256))
        n = min(n, config.batch_size) if exp.scale == "smoke" else n
        batch = next(iter(data.make_loader(trainer.train_source, batch_size=n, train=False,
                                           drop_remainder=True)))
        variables = {"params": state.params}
        if state.batch_stats:
            variables["batch_stats"] = state.batch_stats
        result = analysis.output_range(trainer.model, variables, np.asarray(batch["image"]),
                                       a.get("layer", -1),
                                       example_weight=float(a.get("example_weight", 0.0)))
        out["output_range"] = _jsonable(result)
    return out


def _trajectory_neurons(exp: Experiment) -> int:
    """How many neurons' trajectories a fluctuation result keeps (the summary covers all)."""
    return int(exp.analysis.get("trajectory_neurons", 2))


def _write_run_files(exp: Experiment, out_dir: str, records: list[dict[str, Any]]) -> None:
    """Each run's analysis result as ``runs/<label>_seed<k>/<kind>.json``."""
    keys = [k for k in (exp.kind, "example_weight_test") if k != "compare"]
    for r in records:
        out = {k: r[k] for k in keys if k in r}
        if out:
            run_dir = os.path.join(out_dir, "runs", f"{_safe(r['label'])}_seed{r['seed']}")
            os.makedirs(run_dir, exist_ok=True)
            with open(os.path.join(run_dir, f"{exp.kind}.json"), "w") as f:
                json.dump(_jsonable(out), f)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "__array__") and not isinstance(value, (str, bytes)):
        arr = np.asarray(value)
        return arr.tolist() if arr.ndim else arr.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def run_experiment(exp: Experiment | str | os.PathLike, scale: str = "cpu",
                   out_dir: str | os.PathLike | None = None, *,
                   seeds: Sequence[int] | None = None, progress: bool = True,
                   command: str | None = None, replot: bool = False) -> dict[str, Any]:
    """Run ``exp`` at ``scale`` and write its results into ``out_dir``.

    Args:
      exp: an :class:`Experiment` or the path of its config.
      scale: ``"full"``, ``"cpu"`` or ``"smoke"``.
      out_dir: where ``results.{json,csv,md}``, ``curves.png``, the kind's plot and
        ``runs/<label>_seed<k>/`` (config, metrics, analysis) go (default
        ``runs/experiments/<name>/<scale>``).
      seeds: override the seeds of the scale.
      progress: show progress bars.
      command: the command line to record in ``results.md``.
      replot: train nothing; rewrite the tables and plots from the runs saved in
        ``out_dir/results.json`` (after a change to a plot, say).

    Returns:
      The content of ``results.json``: ``experiment`` (the resolved config),
      ``environment``, ``summary`` (one row per run label), ``runs`` and ``seconds``.
    """
    if not isinstance(exp, Experiment):
        exp = load_experiment(exp)
    exp = exp.resolve(scale) if exp.scale == "full" else exp
    if seeds is not None:
        exp.seeds = [int(s) for s in seeds]
        exp.validate()
    out_dir = os.fspath(out_dir or os.path.join("runs", "experiments", exp.name, scale))
    if replot:
        return _replot(exp, out_dir, command)
    from seqnorm_jax.train.lock import run_lock

    with run_lock(out_dir, "out_dir (--out)"):
        return _run_locked(exp, out_dir, progress, command)


def _run_locked(exp: Experiment, out_dir: str, progress: bool, command: str | None
                ) -> dict[str, Any]:
    t0 = time.perf_counter()
    if exp.kind == "tune":
        return _run_tune(exp, out_dir, progress, command, t0)

    from tqdm.auto import tqdm

    from seqnorm_jax.train import Trainer

    sources = _Sources(exp, image_shape=exp.image_shape)

    def make_trainer(run, config, seed):
        label = run["label"]
        config = config.replace(seed=seed, progress=progress and exp.scale != "smoke")
        train_src, eval_src = sources(config)
        return Trainer(config, out_dir=os.path.join(out_dir, "runs", f"{_safe(label)}_seed{seed}"),
                       train_source=train_src, eval_source=eval_src, save_checkpoints=False,
                       desc=f"{label} seed {seed}", mesh=_mesh_for(config.batch_size))

    # Every run's norm against its batch, devices and model before any training (a
    # Trainer checks on construction); the first seed's trainers are then used as built.
    first = {}
    for run, config in exp.configs():
        try:
            first[run["label"]] = make_trainer(run, config, exp.seeds[0])
        except ValueError as e:
            raise ValueError(f"experiment {exp.name!r}, run {run['label']!r}: {e}") from None
    jobs = [(run, config, seed) for run, config in exp.configs() for seed in exp.seeds]
    outer = tqdm(jobs, desc=exp.name, disable=not progress, unit="run", dynamic_ncols=True)
    records = []
    for run, config, seed in outer:
        label = run["label"]
        outer.set_postfix(run=label, seed=seed, refresh=True)
        trainer = (first.pop(label) if seed == exp.seeds[0] and label in first
                   else make_trainer(run, config, seed))
        config = trainer.config
        hooks = _hooks(exp, trainer)
        trainer.step_hooks.extend(hooks)
        result = trainer.fit()
        record = run_record(result, label=label, spec=config.norm, series=run.get("series"),
                            x=run.get("x"), seed=seed)
        if result.diverged is None:
            if config.validation_size and exp.kind != "example_weight":
                # tuned on the hold-out; the test split is scored once, at the end
                test = trainer.evaluate(result.state, sources.test_split(config))
                record.update(final_test_accuracy=test["eval_accuracy"],
                              final_test_loss=test["eval_loss"])
            record.update(_after(exp, trainer, result.state, hooks, sources, config))
        records.append(record)
        if progress:
            outer.write(_run_line(label, seed, record))
    outer.close()
    return _write(exp, out_dir, records, time.perf_counter() - t0, command)


def _replot(exp: Experiment, out_dir: str, replot_command: str | None) -> dict[str, Any]:
    path = os.path.join(out_dir, "results.json")
    if not os.path.exists(path):
        raise ValueError(f"replot: no {path}; run the experiment first (without --replot).")
    with open(path) as f:
        saved = json.load(f)
    if exp.kind == "tune" or saved["experiment"]["name"] != exp.name:
        raise ValueError(f"replot: {path} holds no runs of experiment {exp.name!r}.")
    exp.seeds = saved["experiment"]["seeds"]
    return _write(exp, out_dir, saved["runs"], saved["seconds"], saved.get("command"),
                  env=saved["environment"], replot_command=replot_command or "--replot")


def _run_tune(exp, out_dir, progress, command, t0):
    from seqnorm_jax import analysis

    base = TrainConfig.from_dict({**exp.base, "progress": progress and exp.scale != "smoke"})
    kwargs = {k: tuple(exp.analysis[k]) for k in ("batch_groups", "channel_groups")
              if k in exp.analysis}
    for key in ("tolerance", "metric", "norm_fields"):
        if key in exp.analysis:
            kwargs[key] = exp.analysis[key]
    result = analysis.sequential_tune(base, seeds=tuple(exp.seeds), out_dir=out_dir,
                                      progress=progress, **kwargs)
    payload = {"experiment": _describe(exp), "environment": environment(),
               "tune": _jsonable(result.to_dict()),
               "seconds": round(time.perf_counter() - t0, 1), "command": command}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(payload, f, separators=(",", ":"))  # compact: runs hold long lists
        f.write("\n")
    return payload


def _describe(exp: Experiment) -> dict[str, Any]:
    d = {k: v for k, v in dataclasses.asdict(exp).items()
         if k not in ("cpu", "smoke", "image_shape")}
    d["scale"] = exp.scale
    return d


# ---------------------------------------------------------------------------- outputs


def _summary(exp: Experiment, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from seqnorm_jax.train.compare import summarize

    rows = summarize(records)
    baseline = exp.analysis.get("baseline")
    if baseline is not None and baseline not in {r["label"] for r in records}:
        raise ValueError(f"experiment {exp.name!r}: analysis.baseline={baseline!r} is not a run "
                         f"label; choose one of {sorted({r['label'] for r in records})}.")
    ok = [r for r in records if not r.get("diverged")]  # diverged runs: counted, not summed
    for row in rows:
        rs = [r for r in records if r["label"] == row["label"]]
        row["series"], row["x"] = rs[0].get("series"), rs[0].get("x")
        rs = [r for r in rs if not r.get("diverged")]
        if not rs:
            continue
        row.update(_kind_summary(exp, rs))
        if baseline is not None:
            row.update(_paired(rs, [r for r in ok if r["label"] == baseline]))
    return rows


def _final_accuracy(record: dict[str, Any]) -> float:
    """The test accuracy when the run validated on a hold-out, else the final eval one."""
    return record.get("final_test_accuracy", record["eval_accuracy"][-1])


def _paired(rs: list[dict[str, Any]], base: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy minus the baseline's, seed by seed (same seed: same init and data order).

    Seeds share the initialisation and the data order across runs, so the per-seed
    difference cancels much of the seed-to-seed spread that the plain means carry.
    """
    by_seed = {r["seed"]: _final_accuracy(r) for r in base}
    diffs = [_final_accuracy(r) - by_seed[r["seed"]] for r in rs if r["seed"] in by_seed]
    if not diffs:
        return {}
    m, s = _mean_std(diffs)
    return {"delta_vs_baseline_accuracy_mean": m, "delta_vs_baseline_accuracy_std": s,
            "seeds_better_than_baseline": f"{sum(d > 0 for d in diffs)}/{len(diffs)}"}


def _kind_summary(exp: Experiment, rs: list[dict[str, Any]]) -> dict[str, Any]:
    from seqnorm_jax import analysis

    out: dict[str, Any] = {}
    if all("final_test_accuracy" in r for r in rs):
        m, s = _mean_std([r["final_test_accuracy"] for r in rs])
        out["final_test_accuracy_mean"], out["final_test_accuracy_std"] = m, s
    if exp.kind == "landscape":
        s = analysis.summarize_landscape([r["landscape"] for r in rs])
        out.update({k: v for k, v in s.items() if isinstance(v, (int, float))})
    elif exp.kind == "fluctuation":
        per_layer = [r["fluctuation"]["summary"] for r in rs]
        for i, layer in enumerate(per_layer[0]):
            for key in _FLUCT_KEYS:
                m, s = _mean_std([p[i][key] for p in per_layer])
                out[f"layer{i}_{key}_mean"], out[f"layer{i}_{key}_std"] = m, s
    elif exp.kind == "example_weight":
        curves = [r["example_weight"] for r in rs]
        for j, row in enumerate(curves[0]):
            m, s = _mean_std([c[j]["eval_accuracy"] for c in curves])
            out[f"acc_at_{row['example_weight']:g}_mean"] = m
            out[f"acc_at_{row['example_weight']:g}_std"] = s
        best = [analysis.best_example_weight(c) for c in curves]
        out["best_example_weight_mean"] = float(np.mean(best))
        gains = [max(x["eval_accuracy"] for x in c) - c[0]["eval_accuracy"] for c in curves]
        out["best_gain_mean"], out["best_gain_std"] = _mean_std(gains)
    elif exp.kind == "output_range":
        o = [r["output_range"] for r in rs]
        out["set_size"] = o[0].get("set_size")
        out["bound"] = o[0].get("bound")
        out["train_abs_max_mean"] = float(np.mean([x["train_abs_max"] for x in o]))
        out["eval_abs_max_mean"] = float(np.mean([x["eval_abs_max"] for x in o]))
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _table(exp: Experiment, summary: list[dict[str, Any]]) -> str:
    skip = {"label", "spec", "seeds", "test_accuracy_mean", "test_accuracy_std",
            "best_test_accuracy_mean", "train_loss_mean", "train_loss_std", "epoch_time_mean",
            "series", "x", "runs", "steps"}
    extra = [k for k in summary[0] if k not in skip and not k.endswith("_std")
             and not k.startswith(("layer", "acc_at_"))]
    split = "validation" if exp.base.get("validation_size") else "eval"
    names = {"final_test_accuracy_mean": "test accuracy (scored once, at the end)",
             "delta_vs_baseline_accuracy_mean": f"minus {exp.analysis.get('baseline')!r}, "
                                                "paired by seed",
             "seeds_better_than_baseline": "seeds above it"}
    head = ["run", "spec", f"{split} accuracy (mean +- std)", "final train loss",
            *(names.get(k, k.removesuffix("_mean").replace("_", " ")) for k in extra),
            "s/epoch", "seeds"]

    def cell(r, k):
        std = r.get(k.removesuffix("_mean") + "_std", r.get(k + "_std"))
        if "accuracy" in k:
            return f"{100 * r[k]:.2f}" + ("" if std is None else f" +- {100 * std:.2f}") + " %"
        return _fmt(r[k]) + ("" if std is None or r["seeds"] < 2 else f" +- {_fmt(std)}")

    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in summary:
        cells = [r["label"], f"`{r['spec']}`",
                 f"{100 * r['test_accuracy_mean']:.2f} +- {100 * r['test_accuracy_std']:.2f} %",
                 f"{r['train_loss_mean']:.4f}", *(cell(r, k) for k in extra),
                 f"{r['epoch_time_mean']:.1f}", str(r["seeds"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fluctuation_table(summary_runs: list[dict[str, Any]]) -> str:
    lines = ["| run | layer | BN mean fluct. | BN std fluct. | EN mean fluct. | EN std fluct. |",
             "| --- | --- | --- | --- | --- | --- |"]
    for label, rows in summary_runs:
        for i, layer in enumerate(rows):
            lines.append(f"| {label} | {layer['layer']} | " + " | ".join(
                f"{layer[k + '_mean']:.4g} +- {layer[k + '_std']:.2g}" for k in _FLUCT_KEYS)
                + " |")
    return "\n".join(lines)


def _write(exp, out_dir, records, seconds, command, env=None,
           replot_command=None) -> dict[str, Any]:
    from seqnorm_jax import analysis
    from seqnorm_jax.train.compare import _plot

    if exp.kind == "fluctuation":
        from seqnorm_jax.analysis.fluctuation import keep_neurons

        records = [{**r, "fluctuation": keep_neurons(r["fluctuation"], _trajectory_neurons(exp))}
                   if "fluctuation" in r else r for r in records]
    _write_run_files(exp, out_dir, records)
    summary = _summary(exp, records)
    env = env or environment()
    payload = {"experiment": _describe(exp), "environment": env, "summary": summary,
               "runs": _jsonable(records), "seconds": round(seconds, 1), "command": command}
    with _opened(os.path.join(out_dir, "results.json"), "w") as f:
        # compact: runs hold long lists; strict JSON: a diverged run's NaN loss is null
        json.dump(strict_json(payload), f, separators=(",", ":"), allow_nan=False)
        f.write("\n")
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    b = exp.base
    title = (f"{exp.name} ({exp.scale}): {b.get('model')} on {b.get('dataset')}, "
             f"{b.get('epochs')} epochs, seeds {exp.seeds}")
    _plot(records, os.path.join(out_dir, "curves.png"), title)
    plots = ["curves.png"]
    # the kind's analysis exists for the runs that did not diverge
    labels = list(dict.fromkeys(r["label"] for r in records if not r.get("diverged")))
    by_label = {lab: [r for r in records if r["label"] == lab and not r.get("diverged")]
                for lab in labels}
    if any(r.get("x") is not None for r in records):
        _sweep_plot(exp, summary, os.path.join(out_dir, "sweep.png"), title)
        plots.append("sweep.png")
    extra_md = ""
    if exp.kind == "landscape":
        analysis.plot_landscape({k: [r["landscape"] for r in v] for k, v in by_label.items()},
                                os.path.join(out_dir, "landscape.png"), title=title,
                                smooth=int(exp.analysis.get("smooth", 1)))
        plots.append("landscape.png")
    elif exp.kind == "fluctuation":
        # the per-layer means and stds over seeds that _kind_summary put in the summary
        rows = [(row["label"],
                 [{"layer": layer["layer"],
                   **{f"{key}_{stat}": row[f"layer{i}_{key}_{stat}"]
                      for key in _FLUCT_KEYS for stat in ("mean", "std")}}
                  for i, layer in enumerate(by_label[row["label"]][0]["fluctuation"]["summary"])])
                for row in summary if row["label"] in by_label]
        extra_md = "\n\n## Statistics fluctuation (std over steps; mean +- std over seeds)\n\n" \
            + _fluctuation_table(rows)
        with open(os.path.join(out_dir, "fluctuation.csv"), "w", newline="") as f:
            flat = [{"run": lab, **item} for lab, items in rows for item in items]
            writer = csv.DictWriter(f, fieldnames=list(flat[0]))
            writer.writeheader()
            writer.writerows(flat)
        analysis.plot_fluctuation({k: v[0]["fluctuation"] for k, v in by_label.items()},
                                  os.path.join(out_dir, "fluctuation.png"))
        plots.append("fluctuation.png")
    elif exp.kind == "example_weight":
        curves = {k: [r["example_weight"] for r in v] for k, v in by_label.items()}
        analysis.plot_example_weight(curves, os.path.join(out_dir, "example_weight.png"),
                                     title=title)
        plots.append("example_weight.png")
        with open(os.path.join(out_dir, "example_weight.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["run", "seed", "example_weight", "eval_accuracy", "eval_loss"])
            for r in (r for rs in by_label.values() for r in rs):
                for row in r["example_weight"]:
                    writer.writerow([r["label"], r["seed"], row["example_weight"],
                                     row["eval_accuracy"], row["eval_loss"]])
        extra_md = "\n\n" + _example_weight_table(by_label)
    elif exp.kind == "output_range":
        analysis.plot_output_range({k: v[0]["output_range"] for k, v in by_label.items()},
                                   os.path.join(out_dir, "output_range.png"), title=title)
        plots.append("output_range.png")
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(f"# {exp.name}: {exp.title}\n\n")
        f.write(f"Paper {exp.paper}, {exp.ref}; scale `{exp.scale}`; {title}.\n\n")
        if command:
            f.write(f"Command: `{command}`\n\n")
        if replot_command:
            f.write(f"Tables and plots redrawn from `results.json` by `{replot_command}`.\n\n")
        f.write(f"Machine: {env['cpu']} ({env['cpu_count']} cores), {env['backend']} backend, "
                f"Python {env['python']}, jax {env['jax']}, flax {env['flax']}; "
                f"{seconds / 60:.1f} min.\n\n")
        f.write(_table(exp, summary) + extra_md + "\n\n")
        f.write("".join(f"![{p}]({p})\n" for p in plots))
    return payload


def _example_weight_table(by_label) -> str:
    lines = ["| run | alpha | eval accuracy (mean +- std over seeds) | eval loss |",
             "| --- | --- | --- | --- |"]
    for lab, rs in by_label.items():
        for j, row in enumerate(rs[0]["example_weight"]):
            acc = _mean_std([r["example_weight"][j]["eval_accuracy"] for r in rs])
            loss = _mean_std([r["example_weight"][j]["eval_loss"] for r in rs])
            lines.append(f"| {lab} | {row['example_weight']:g} | {100 * acc[0]:.2f} +- "
                         f"{100 * acc[1]:.2f} % | {loss[0]:.4f} |")
    tests = [(lab, r["seed"], r["example_weight_test"]) for lab, rs in by_label.items()
             for r in rs if "example_weight_test" in r]
    if tests:
        lines += ["", "Alpha chosen on the validation set, applied to the test split:", "",
                  "| run | seed | chosen alpha | test accuracy at 0 | at the chosen alpha | gain |",
                  "| --- | --- | --- | --- | --- | --- |"]
        gains: dict[str, list[float]] = {}
        for lab, seed, t in tests:
            rows = {row["example_weight"]: row["eval_accuracy"] for row in t["rows"]}
            a = t["chosen_on_validation"]
            gains.setdefault(lab, []).append(rows[a] - rows[0.0])
            lines.append(f"| {lab} | {seed} | {a:g} | {100 * rows[0.0]:.2f} % | "
                         f"{100 * rows[a]:.2f} % | {100 * (rows[a] - rows[0.0]):+.2f} |")
        lines += ["", "| run | test gain from the chosen alpha (mean +- std over seeds) |",
                  "| --- | --- |"]
        for lab, g in gains.items():
            m, sd = _mean_std(g)
            lines.append(f"| {lab} | {100 * m:+.2f} +- {100 * sd:.2f} points |")
    return "\n".join(lines)


def _sweep_plot(exp, summary, path, title) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    points = [r for r in summary if r.get("x") is not None
              and r.get("test_accuracy_mean") is not None]  # a diverged point is left out
    # the test split when the runs validated on a hold-out, else the evaluation split
    key = ("final_test_accuracy" if all("final_test_accuracy_mean" in r for r in points)
           else "test_accuracy")
    for series in dict.fromkeys(r.get("series") or r["label"] for r in points):
        rs = sorted((r for r in points if (r.get("series") or r["label"]) == series),
                    key=lambda r: r["x"])
        x = np.asarray([r["x"] for r in rs], np.float64)
        m = 100 * np.asarray([r[f"{key}_mean"] for r in rs])
        s = 100 * np.asarray([r[f"{key}_std"] for r in rs])
        ax.errorbar(x, m, yerr=s, marker="o", ms=4, capsize=3, label=series)
    if exp.x_log:
        ax.set_xscale("log", base=2)
    ax.set(xlabel=exp.x_label or "x", ylabel=("test accuracy (%)" if key == "final_test_accuracy"
                                              else "eval accuracy (%)"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
