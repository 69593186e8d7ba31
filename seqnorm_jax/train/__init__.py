"""Training: optax optimizers and schedules, train/eval steps, the loop, checkpoints, metrics.

>>> from seqnorm_jax.train import TrainConfig, Trainer
>>> config = TrainConfig(model="cnn", norm="seqnorm:channel_groups=4,batch_groups=8",
...                      dataset="fashion_mnist", epochs=5, batch_size=128, lr=0.05)
>>> result = Trainer(config, out_dir="runs/seqnorm").fit()

Building blocks, usable on their own with any flax model:

* :class:`TrainState` / :func:`create_train_state` -- flax's ``TrainState`` plus
  ``batch_stats`` and a base rng;
* :func:`make_optimizer`, :func:`make_schedule` and the schedules
  (:func:`warmup_cosine`, :func:`linear_one_cycle`, :func:`cosine_one_cycle`,
  :func:`step_decay`); :func:`weight_decay_towards`, the optax transformation with
  paper 002's switch for the norm layers' gamma/beta;
* :func:`train_step` / :func:`eval_step` and their compiled, sharded forms
  :func:`jit_train_step` / :func:`jit_eval_step`; :func:`example_weight_scope` for
  "Four Things" inference example weighing;
* :class:`Trainer` / :func:`fit` (epochs, evaluation, metrics, Orbax checkpoints, exact
  resume), :class:`Checkpointer`, :class:`MetricsWriter`, :class:`TrainConfig`;
* ``train_step(..., micro_batches=k)``, :func:`accumulate_gradients` and
  :class:`MicroBatchStats` (gradient accumulation, which through BatchNorm is GhostNorm;
  ``TrainConfig.grad_accum_steps``); :func:`apply_model`, the one forward pass of a
  state; :func:`norm_calls`, the norm layers a model calls;
* :func:`run_lock` (one writer per run folder), :class:`RunFileError` (a run's file
  cannot be written), :func:`guarded_step` / :func:`jit_loop_step` (the loop's step:
  metrics kept on the device, divergence caught inside the compiled step).

The modules, in the order of their imports: each imports only modules listed before it
and none of their private (``_name``) names (``tests/test_train_layout.py`` checks it).

* :mod:`~seqnorm_jax.train.files` -- a run's folder: paths (local or ``gs://``), the
  one-writer lock, the files that mark a run, file errors, and stop signals.
* :mod:`~seqnorm_jax.train.config` -- :class:`TrainConfig`, the names its fields take,
  its field docs (the command line's ``--help``) and what a resume may change; no jax.
* :mod:`~seqnorm_jax.train.metrics` -- the metrics files, TensorBoard events and
  progress bars a run writes.
* :mod:`~seqnorm_jax.train.norm_calls` -- the norm layers a model calls, and the
  interceptors that pass the example weight and output noise to them.
* :mod:`~seqnorm_jax.train.state` -- the train state, optax optimizers, schedules and
  the norm layers' weight decay.
* :mod:`~seqnorm_jax.train.step` -- the pure train and eval steps, micro-batches.
* :mod:`~seqnorm_jax.train.compiled` -- those steps jitted for a mesh, the loop's step
  with device-side metrics and a divergence guard, several steps per call.
* :mod:`~seqnorm_jax.train.checkpoint` -- Orbax checkpoints of the state and the data
  position, damaged ones skipped.
* :mod:`~seqnorm_jax.train.build` -- a config's model and data, the checks of a run's
  step before any work, and evaluation over a whole source.
* :mod:`~seqnorm_jax.train.run` -- one fit while it runs: epochs, metric windows,
  divergence and stop handling, checkpoints at their points.
* :mod:`~seqnorm_jax.train.loop` -- :class:`Trainer` and :func:`fit`: builds the parts
  of a run, locks and claims its folder, resumes and returns the result.
* :mod:`~seqnorm_jax.train.plan` -- a run's step compiled for a TPU or GPU pod without
  one (``seqnorm-jax plan``).
* :mod:`~seqnorm_jax.train.plan_table` -- every paper config planned for a pod, each
  distinct step compiled once and cached (``seqnorm-jax plan --paper-table``).

Every name here is imported when first used (PEP 562), so ``import seqnorm_jax.train``
loads no jax.
"""

from typing import TYPE_CHECKING

from seqnorm_jax._extras import lazy_exports, require_train

require_train("seqnorm_jax.train")

if TYPE_CHECKING:
    from seqnorm_jax.train.build import build_model, evaluate, load_sources
    from seqnorm_jax.train.checkpoint import CheckpointMismatchError, Checkpointer
    from seqnorm_jax.train.compiled import (
        StepAccumulator,
        guarded_step,
        init_accumulator,
        jit_eval_step,
        jit_loop_step,
        jit_train_step,
        reset_accumulator,
    )
    from seqnorm_jax.train.config import (
        NORM_DECAY_MODES,
        ON_DIVERGENCE,
        OPTIMIZERS,
        RESUME_SAFE_FIELDS,
        SCHEDULES,
        TrainConfig,
    )
    from seqnorm_jax.train.files import (
        PREEMPTED,
        Preempted,
        RunFileError,
        RunFolderUsedError,
        RunLockedError,
        run_lock,
        stop_on_signals,
    )
    from seqnorm_jax.train.loop import FitResult, Trainer, fit
    from seqnorm_jax.train.metrics import METRIC_COLUMNS, MetricsWriter, read_jsonl
    from seqnorm_jax.train.norm_calls import (
        NormCall,
        example_weight_scope,
        norm_calls,
        output_noise_scope,
    )
    from seqnorm_jax.train.state import (
        TrainState,
        constant,
        cosine_one_cycle,
        create_train_state,
        linear_one_cycle,
        make_optimizer,
        make_schedule,
        model_norm_paths,
        norm_param_labels,
        step_decay,
        step_rngs,
        warmup_cosine,
        weight_decay_towards,
    )
    from seqnorm_jax.train.step import (
        MicroBatchStats,
        accumulate_gradients,
        apply_model,
        cross_entropy_loss,
        eval_step,
        init_micro_batch_stats,
        split_micro_batches,
        step_finite,
        train_step,
        update_micro_batch_stats,
    )

__all__ = [
    "MicroBatchStats",
    "accumulate_gradients",
    "apply_model",
    "NormCall",
    "norm_calls",
    "init_micro_batch_stats",
    "split_micro_batches",
    "update_micro_batch_stats",
    "CheckpointMismatchError",
    "ON_DIVERGENCE",
    "RESUME_SAFE_FIELDS",
    "RunFileError",
    "RunLockedError",
    "RunFolderUsedError",
    "PREEMPTED",
    "Preempted",
    "stop_on_signals",
    "step_finite",
    "StepAccumulator",
    "guarded_step",
    "init_accumulator",
    "jit_loop_step",
    "reset_accumulator",
    "run_lock",
    "METRIC_COLUMNS",
    "NORM_DECAY_MODES",
    "OPTIMIZERS",
    "SCHEDULES",
    "Checkpointer",
    "FitResult",
    "MetricsWriter",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "build_model",
    "constant",
    "cosine_one_cycle",
    "create_train_state",
    "cross_entropy_loss",
    "eval_step",
    "evaluate",
    "example_weight_scope",
    "fit",
    "jit_eval_step",
    "jit_train_step",
    "linear_one_cycle",
    "load_sources",
    "make_optimizer",
    "make_schedule",
    "model_norm_paths",
    "norm_param_labels",
    "output_noise_scope",
    "read_jsonl",
    "step_decay",
    "step_rngs",
    "train_step",
    "warmup_cosine",
    "weight_decay_towards",
]

__getattr__, __dir__ = lazy_exports(__name__, __file__)
