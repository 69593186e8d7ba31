"""The one engine of the studies: settings x seeds -> training runs -> records.

A study (``compare``, each stage of ``tune``, every paper experiment) is a list of
:class:`Setting` (a label, a :class:`~seqnorm_jax.train.TrainConfig` and the fields its
records carry), trained once per seed by :func:`run_settings`. Every setting is checked
against the batch, the devices and the model (a :class:`~seqnorm_jax.train.Trainer`
checks on construction) before the first run trains; the first seed's trainers are then
used as built. A run whose loss becomes non-finite stops there and is recorded as
diverged; the other runs go on. An experiment kind adds its Trainer hooks and its
per-run analysis through ``hooks`` and ``analyse``.

Data: :class:`SourceCache` loads each distinct dataset selection once for all the runs
of a study (or makes mock data, :func:`mock_sources`, for smoke runs); the norm layers'
feature widths of a model come from one abstract initialisation (:func:`norm_widths`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from seqnorm_jax.studies.report import run_dir_name, run_line, run_record
from seqnorm_jax.train.config import TrainConfig

__all__ = ["Setting", "SourceCache", "mock_sources", "norm_widths", "run_settings"]


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting of a study: trained once per seed.

    Attributes:
      label: names the setting in tables, plots and ``runs/<label>_seed<k>/``.
      config: the run's configuration (its ``seed`` is replaced per run).
      fields: extra fields every record of this setting carries (``series``, ``x``).
    """

    label: str
    config: TrainConfig
    fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def norm_widths(model, input_shape: Sequence[int]) -> list[int]:
    """The feature width of each norm layer of ``model``, in call order.

    One abstract ``model.init`` on a batch of two examples of ``input_shape``
    (:func:`seqnorm_jax.train.norm_calls.norm_calls`: under :func:`jax.eval_shape`,
    nothing is computed or allocated), each norm layer's width read from its input
    shape and feature axes (:func:`seqnorm_jax.registry.feature_axes`).
    """
    import jax

    from seqnorm_jax import registry
    from seqnorm_jax.train.norm_calls import norm_calls

    x = jax.ShapeDtypeStruct((2, *input_shape), np.float32)
    calls = norm_calls(lambda x: model.init(jax.random.key(0), x, train=False), x)
    return [math.prod(c.input_shape[a]
                      for a in registry.feature_axes(c.module, len(c.input_shape)))
            for c in calls]


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


class SourceCache:
    """``cache(config) -> (train, eval)``: each distinct dataset selection loaded once.

    Args:
      seed: the seed of the selection (``train_size`` subset, validation hold-out),
        the same for every run of a study.
      mock_steps: smoke runs: every batch size gets mock data of exactly this many
        batches (one epoch is ``mock_steps`` steps), no files read.
      image_shape: the mock images' shape (default: the dataset's).
    """

    def __init__(self, seed: int = 0, *, mock_steps: int | None = None, image_shape=None):
        self.seed, self.mock_steps, self.image_shape = seed, mock_steps, image_shape
        self.cache: dict[tuple, Any] = {}

    def __call__(self, config: TrainConfig):
        from seqnorm_jax.train import load_sources

        if self.mock_steps is not None:
            key = ("mock", config.dataset, config.batch_size)
            if key not in self.cache:
                self.cache[key] = mock_sources(
                    config.dataset, num_train=self.mock_steps * config.batch_size,
                    num_eval=min(64, 2 * config.batch_size), image_shape=self.image_shape)
            return self.cache[key]
        key = (config.dataset, config.data_dir, config.data_source, config.train_size,
               config.validation_size, config.eval_split)
        if key not in self.cache:
            self.cache[key] = load_sources(config.replace(seed=self.seed))
        return self.cache[key]

    def test_split(self, config: TrainConfig):
        """The test split of ``config``'s dataset (scored once after a validated run)."""
        from seqnorm_jax import data

        if self.mock_steps is not None:
            return self(config)[1]
        key = ("test", config.dataset, config.data_dir, config.data_source, config.eval_split)
        if key not in self.cache:
            self.cache[key] = data.load(config.dataset, config.eval_split,
                                        data_dir=config.data_dir, source=config.data_source)
        return self.cache[key]


def mesh_for(batch_size: int):
    """All devices (``None``), or, in one process, the most that divide a batch smaller
    than their count: a batch-size sweep down to 2 examples also runs on 4 or 8 devices,
    its small batches on a sub-mesh of ``gcd(batch_size, devices)`` devices."""
    import jax

    from seqnorm_jax.distributed import data_mesh

    n = jax.device_count()
    k = math.gcd(batch_size, n)
    if k == n or jax.process_count() > 1:
        return None
    return data_mesh(jax.devices()[:k])


SMALL_BATCH = 16  # at most this many examples per step: several steps per compiled call
SMALL_BATCH_STEPS_PER_CALL = 64


def steps_per_call(config: TrainConfig) -> int:
    """Steps per compiled call of a study's run: :data:`SMALL_BATCH_STEPS_PER_CALL` at batches
    of at most :data:`SMALL_BATCH` (a tiny step, paced by its dispatch; the results are
    those of one step per call, bit for bit,
    :func:`seqnorm_jax.train.compiled.jit_loop_steps`), else 1."""
    import jax

    if config.batch_size <= SMALL_BATCH and jax.process_count() == 1:
        return SMALL_BATCH_STEPS_PER_CALL
    return 1


def _no_hooks(trainer) -> list[Any]:
    return []


def _no_analysis(trainer, state, hooks) -> dict[str, Any]:
    return {}


RECORD_NAME = "record.json"  # a finished run's record, in its run folder


def _kept_record(run_dir: str, config: TrainConfig) -> dict[str, Any] | None:
    """The record of a finished run in ``run_dir`` (``None``: not finished), after checking
    that the run had ``config`` (:func:`~seqnorm_jax.train.config.check_resume_config`)."""
    import json

    from seqnorm_jax.train.files import run_path
    from seqnorm_jax.train.config import check_resume_config

    path = run_path(run_dir) / RECORD_NAME
    if not path.exists():
        return None
    check_resume_config(run_dir, config, ())
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the run's record ({e}); delete it to train "
                         "the run again.") from None
    if record.get("diverged") and record["diverged"].get("loss") is None:
        record["diverged"]["loss"] = math.nan  # strict JSON wrote the non-finite loss as null
    return record


def run_settings(settings: Sequence[Setting], seeds: Sequence[int], out_dir: str, *,
                 sources: Callable[[TrainConfig], Any],
                 hooks: Callable[[Any], list[Any]] = _no_hooks,
                 analyse: Callable[[Any, Any, list[Any]], dict[str, Any]] = _no_analysis,
                 unfit: Callable[[Setting, ValueError], str] | None = None,
                 progress: bool = True, run_progress: bool | None = None,
                 desc: str = "study", split: str = "test",
                 resume: bool = False) -> list[dict[str, Any]]:
    """Train every setting once per seed; return one record per run, in that order.

    Each finished run's record is written to ``runs/<label>_seed<k>/record.json``. With
    ``resume``, a run whose record is there is kept (its config checked against the
    setting's), a run stopped by a signal continues from its checkpoint (one with
    ``hooks``, which cannot see the steps already done, starts over) and the others are
    trained. A stop signal (:func:`seqnorm_jax.train.files.stop_on_signals`) ends the study
    with :class:`~seqnorm_jax.train.files.Preempted` naming the run.

    Args:
      settings: the settings (unique labels).
      seeds: the seeds of every setting.
      out_dir: per-run metrics go to ``out_dir/runs/<label>_seed<k>/`` (no checkpoints).
      sources: ``sources(config) -> (train, eval)`` (a :class:`SourceCache`).
      hooks: ``hooks(trainer) -> [hook, ...]``: Trainer step hooks of a run.
      analyse: ``analyse(trainer, state, hooks) -> dict`` added to the record of a run
        that did not diverge (a kind's per-run analysis).
      unfit: ``unfit(setting, error) -> message`` for a setting that does not fit the
        run (raised as ``ValueError`` before any training).
      progress: the outer progress bar and a line per finished run.
      run_progress: each run's own progress bar (default: ``progress``).
      desc: the outer bar's label.
      split: the evaluation split's name in the run lines.
      resume: continue the study in ``out_dir`` (see above).

    Returns:
      Records (:func:`~seqnorm_jax.studies.report.run_record`) with ``label``, ``spec``
      (``config.norm``), the setting's ``fields`` and ``seed``.
    """
    from seqnorm_jax.train.metrics import progress_bar

    from seqnorm_jax.studies.report import write_json
    from seqnorm_jax.train import Trainer
    from seqnorm_jax.train.files import Preempted, is_writer, raise_if_requested, stop_on_signals

    run_progress = progress if run_progress is None else run_progress

    def run_dir(setting: Setting, seed: int) -> str:
        return os.path.join(out_dir, "runs", run_dir_name(setting.label, seed))

    def make(setting: Setting, seed: int):
        config = setting.config.replace(seed=seed, progress=run_progress)
        train_src, eval_src = sources(config)
        return Trainer(config, out_dir=run_dir(setting, seed),
                       train_source=train_src, eval_source=eval_src, save_checkpoints=False,
                       desc=f"{setting.label} seed {seed}", mesh=mesh_for(config.batch_size),
                       steps_per_call=steps_per_call(config))

    first = {}
    for setting in settings:
        try:
            first[setting.label] = make(setting, seeds[0])
        except ValueError as e:
            if unfit is None:
                raise
            raise ValueError(unfit(setting, e)) from None
    jobs = [(setting, int(seed)) for setting in settings for seed in seeds]
    outer = progress_bar(jobs, desc=desc, enabled=progress, unit="run")
    records = []
    with stop_on_signals():  # also between the runs
        for setting, seed in outer:
            where = f"{setting.label} seed {seed}"
            raise_if_requested(None, where)
            outer.set_postfix(run=setting.label, seed=seed, refresh=True)
            folder = run_dir(setting, seed)
            kept = _kept_record(folder, setting.config.replace(seed=seed)) if resume else None
            if kept is not None:
                records.append(kept)
                if progress:
                    outer.write(f"{run_line(kept, split)} (kept)")
                continue
            trainer = (first.pop(setting.label) if seed == seeds[0] and setting.label in first
                       else make(setting, seed))
            run_hooks = hooks(trainer)
            trainer.step_hooks.extend(run_hooks)
            stopped = (resume and not run_hooks
                       and os.path.isdir(os.path.join(folder, "checkpoints")))
            try:
                result = trainer.fit(resume=stopped, overwrite=resume and not stopped)
            except Preempted as e:
                e.where = where
                raise
            record = run_record(result, label=setting.label, spec=trainer.config.norm,
                                **setting.fields, seed=seed)
            if result.diverged is None:
                record.update(analyse(trainer, result.state, run_hooks))
            if is_writer():
                write_json(os.path.join(folder, RECORD_NAME), record, compact=True)
            records.append(record)
            if progress:
                outer.write(run_line(record, split))
    outer.close()
    return records
