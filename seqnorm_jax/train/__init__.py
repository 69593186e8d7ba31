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
* :func:`accumulated_train_step` and friends (gradient accumulation, which through
  BatchNorm is GhostNorm; ``TrainConfig.grad_accum_steps``);
* :func:`compare` -- one model with several layers and seeds, table and plot;
* :func:`run_lock` (one writer per run folder), :class:`RunFileError` (a run's file
  cannot be written), :func:`guarded_step` / :func:`jit_loop_step` (the loop's step:
  metrics kept on the device, divergence caught inside the compiled step).
"""

from seqnorm_jax.train.accumulation import (
    MicroBatchStats,
    accumulate_gradients,
    accumulated_train_step,
    init_micro_batch_stats,
    split_micro_batches,
    update_micro_batch_stats,
)
from seqnorm_jax.train.checkpoint import CheckpointMismatchError, Checkpointer
from seqnorm_jax.train.compare import (
    DEFAULT_NORMS,
    CompareResult,
    compare,
    default_norm_specs,
    norm_channels,
    summarize,
    write_outputs,
)
from seqnorm_jax.train.config import ON_DIVERGENCE, RESUME_SAFE_FIELDS, TrainConfig
from seqnorm_jax.train.lock import RunLockedError, run_lock
from seqnorm_jax.train.loop import FitResult, Trainer, build_model, evaluate, fit, load_sources
from seqnorm_jax.train.metrics import METRIC_COLUMNS, MetricsWriter, RunFileError, read_jsonl
from seqnorm_jax.train.optim import (
    NORM_DECAY_MODES,
    OPTIMIZERS,
    SCHEDULES,
    constant,
    cosine_one_cycle,
    linear_one_cycle,
    make_optimizer,
    make_schedule,
    norm_param_labels,
    step_decay,
    warmup_cosine,
    weight_decay_towards,
)
from seqnorm_jax.train.state import TrainState, create_train_state, step_rngs
from seqnorm_jax.train.steps import (
    StepAccumulator,
    cross_entropy_loss,
    guarded_step,
    init_accumulator,
    jit_loop_step,
    reset_accumulator,
    eval_step,
    example_weight_scope,
    jit_eval_step,
    jit_train_step,
    output_noise_scope,
    train_step,
)

__all__ = [
    "DEFAULT_NORMS",
    "MicroBatchStats",
    "accumulate_gradients",
    "accumulated_train_step",
    "init_micro_batch_stats",
    "split_micro_batches",
    "update_micro_batch_stats",
    "CheckpointMismatchError",
    "ON_DIVERGENCE",
    "RESUME_SAFE_FIELDS",
    "RunFileError",
    "RunLockedError",
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
    "CompareResult",
    "FitResult",
    "MetricsWriter",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "build_model",
    "compare",
    "constant",
    "cosine_one_cycle",
    "create_train_state",
    "cross_entropy_loss",
    "default_norm_specs",
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
    "norm_channels",
    "norm_param_labels",
    "output_noise_scope",
    "read_jsonl",
    "step_decay",
    "step_rngs",
    "summarize",
    "train_step",
    "warmup_cosine",
    "weight_decay_towards",
    "write_outputs",
]
