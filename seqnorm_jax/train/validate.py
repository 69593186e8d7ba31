"""Settings checked before any work: a norm spec against the batch, the mesh and the model.

:func:`check_step` traces the training step of a :class:`~seqnorm_jax.train.Trainer`
abstractly (``jax.eval_shape``: shapes only, nothing computed or compiled) on a batch of
the run's global size, sharded over the run's mesh. Every norm layer of the model then
sees the shape it will see in training, so a group count that does not divide the batch
or a layer's width, or a setting the mesh cannot shard, fails here in a second, with one
message naming the setting, instead of after other runs have trained. The layers' own
fields are range-checked on the way (``momentum`` in ``[0, 1]``, ``epsilon > 0``,
``noise_std >= 0``: the rules of :mod:`seqnorm_jax.checks`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from seqnorm_jax import checks, registry
from seqnorm_jax.distributed import batch_sharding, mesh_context, replicated_sharding
from seqnorm_jax.train.compiled import init_accumulator
from seqnorm_jax.train.optim import model_norm_paths
from seqnorm_jax.train.state import create_train_state

__all__ = ["check_norm_fields", "check_step", "checked_norm_paths", "fit_errors",
           "loop_step_arguments"]

# field -> its range rule, defined once in seqnorm_jax.checks
_FIELD_RULES = {"momentum": checks.momentum, "epsilon": checks.epsilon,
                "noise_std": checks.noise_std}


def check_norm_fields(module: nn.Module) -> None:
    """Raise ``ValueError`` if a norm layer's ``momentum``, ``epsilon`` or ``noise_std`` is
    not a number or out of its range (the rules of :mod:`seqnorm_jax.checks`)."""
    who = type(module).__name__
    for field, rule in _FIELD_RULES.items():
        v = getattr(module, field, None)
        if v is None:
            continue
        if not isinstance(v, (int, float, np.number)) or isinstance(v, bool):
            raise ValueError(f"{who}: {field} must be a number, got {v!r}.")
        rule(float(v), who)


def _check_fields(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and registry.is_norm_layer(context.module):
        check_norm_fields(context.module)
    return next_fun(*args, **kwargs)


def check_step(trainer: Any, flag: str = "TrainConfig.norm (--norm)") -> None:
    """Trace ``trainer``'s training step on an abstract batch of the run's global size.

    Args:
      trainer: a :class:`~seqnorm_jax.train.Trainer` (its model, optimizer, mesh,
        compiled step and config).
      flag: how the message names the norm setting.

    Raises:
      ValueError: the norm layers do not fit the batch, the devices or the model's
        widths, or a layer field is out of range; one line naming ``flag``, the spec,
        the run's batch and devices, and the layer's own message.
    """
    with fit_errors(trainer, flag), mesh_context(trainer.mesh), \
            nn.intercept_methods(_check_fields):
        jax.eval_shape(trainer.loop_step, *loop_step_arguments(trainer))


def loop_step_arguments(trainer: Any) -> tuple[Any, Any, Any]:
    """``(state, batch, accumulator)`` of ``trainer.loop_step`` as ``jax.ShapeDtypeStruct`` s
    sharded as in training (the batch of the run's global size split over the batch
    axis, the rest replicated); nothing is computed. Call it under
    ``mesh_context(trainer.mesh)``."""
    c, mesh = trainer.config, trainer.mesh
    shape = tuple(trainer.train_source.info.image_shape)
    sample = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    bat = batch_sharding(mesh, trainer.batch_axis)
    batch = {"image": jax.ShapeDtypeStruct((c.batch_size, *shape), jnp.uint8, sharding=bat),
             "label": jax.ShapeDtypeStruct((c.batch_size,), jnp.int32, sharding=bat)}
    rep = replicated_sharding(mesh)
    state = jax.eval_shape(
        lambda x: create_train_state(trainer.model, jax.random.key(0), x, trainer.tx), sample)
    state = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), state)
    acc = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
        jax.eval_shape(lambda: init_accumulator(c.log_every)))
    return state, batch, acc


def checked_norm_paths(trainer: Any, sample_input: Any) -> tuple[str, ...]:
    """:func:`~seqnorm_jax.train.model_norm_paths` of ``trainer.model``, with the norm
    layers' fields checked and any error named as :func:`check_step` names it (the
    optimizer needs the paths before the step can be traced)."""
    with fit_errors(trainer), nn.intercept_methods(_check_fields):
        return model_norm_paths(trainer.model, sample_input)


@contextlib.contextmanager
def fit_errors(trainer: Any, flag: str = "TrainConfig.norm (--norm)"):
    """Turn a norm layer's error inside the block into one line naming ``flag``, the spec,
    the run's model, batch and devices, and the layer's own message."""
    c, mesh = trainer.config, trainer.mesh
    try:
        yield
    except Exception as e:  # noqa: BLE001 - jax's sharding type errors are not public
        if not isinstance(e, (ValueError, TypeError, IndexError)) \
                and type(e).__name__ != "ShardingTypeError":
            raise
        text = " ".join(ln.strip() for ln in str(e).strip().splitlines() if ln.strip())
        text = text.split(" -------------------- ")[0]
        devices = mesh.devices.size
        raise ValueError(
            f"{flag}={c.norm!r} does not fit this run (model {c.model}, batch {c.batch_size} "
            f"over {devices} device{'s' if devices > 1 else ''}): {text}") from None
