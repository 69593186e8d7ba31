"""The training state: flax's ``TrainState`` plus running statistics and an rng."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax.training import train_state

__all__ = ["TrainState", "create_train_state", "step_rngs"]


class TrainState(train_state.TrainState):
    """``flax.training.train_state.TrainState`` with ``batch_stats`` and ``rng``.

    Attributes:
      step, apply_fn, params, tx, opt_state: as in flax (``step`` counts optimizer updates).
      batch_stats: the model's ``batch_stats`` collection (running statistics), ``{}``
        for models without any.
      rng: the run's base key as raw ``uint32`` key data (so checkpoints hold a plain
        array); each step derives its keys from it and ``step``, see :func:`step_rngs`.
    """

    batch_stats: Any = None
    rng: jax.Array | None = None


def _key_data(rng: jax.Array) -> jax.Array:
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    if rng.dtype != jnp.uint32:
        raise ValueError(f"rng must be a jax.random.key(...) or raw uint32 key data, got dtype "
                         f"{rng.dtype}; create it with jax.random.key(seed).")
    return rng


def step_rngs(state: TrainState,
              names: tuple[str, ...] = ("dropout", "noise", "output_noise")) -> dict:
    """The per-step rngs for ``apply``: ``{name: key}``, a function of ``(state.rng, state.step)``.

    Deterministic in the step, so a resumed run draws the same noise as an
    uninterrupted one. ``"noise"`` feeds ``NoisyBatchNorm``, ``"dropout"`` dropout layers,
    ``"output_noise"`` :func:`~seqnorm_jax.train.output_noise_scope`. The key of a name
    depends on its position only, so appending names leaves the earlier keys unchanged.
    """
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    return {name: jax.random.fold_in(key, i) for i, name in enumerate(names)}


def create_train_state(model: nn.Module, rng: jax.Array, sample_input: Any,
                       tx: optax.GradientTransformation) -> TrainState:
    """Initialise ``model`` on ``sample_input`` and wrap it with ``tx`` in a :class:`TrainState`.

    Args:
      model: a flax module with ``__call__(x, train: bool)``.
      rng: a key (``jax.random.key(seed)``); split into the init key and the run's
        base key for per-step rngs.
      sample_input: an input batch (only its shape and dtype matter); init runs in
        inference mode (``train=False``), so any batch size works.
      tx: the optax optimizer.

    Returns:
      The state at step 0. ``params`` and ``batch_stats`` are in the model's
      ``param_dtype`` (float32 by default, also for ``dtype=bfloat16`` models).
    """
    rng = _key_data(rng)
    init_key, run_key = jax.random.split(jax.random.wrap_key_data(rng))
    variables = jax.jit(lambda k, x: model.init({"params": k}, x, train=False))(
        init_key, sample_input)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                             batch_stats=batch_stats, rng=jax.random.key_data(run_key))
