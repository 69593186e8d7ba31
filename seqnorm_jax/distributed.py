"""Data parallelism on JAX's own runtime: a 1-D ``"data"`` mesh and sharded batches.

The layers need nothing from this module: under ``jax.jit`` with a batch sharded
over a mesh axis, XLA partitions their statistics itself, and under ``jax.shard_map``
the layers take ``axis_name`` / ``axis_index_groups`` like flax's ``BatchNorm``.
This module only names the few steps every data-parallel training loop repeats:

>>> mesh = data_mesh()                         # all devices of all processes
>>> batch = shard_batch({"image": x, "label": y}, mesh)   # host-local -> global
>>> state = replicate(state, mesh)

and checks what a compiled step communicates (:func:`collective_counts`).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None, axis_name: str = DATA_AXIS) -> Mesh:
    """A one-dimensional mesh named ``axis_name`` over ``devices`` (default: all devices).

    With several processes (``jax.distributed.initialize``) the default covers the
    devices of every process, in ``jax.devices()`` order. The axis is
    ``AxisType.Auto``: XLA propagates the batch sharding through the layers' reshapes
    into groups (``jax.make_mesh`` defaults to ``Explicit`` axes on newer jax, where
    every such reshape would need an explicit output sharding).
    """
    if devices is None:
        return jax.make_mesh((jax.device_count(),), (axis_name,), axis_types=(AxisType.Auto,))
    devices = list(devices)
    if not devices:
        raise ValueError("data_mesh: `devices` is empty; pass at least one device or None for all.")
    return Mesh(np.asarray(devices), (axis_name,), axis_types=(AxisType.Auto,))


def mesh_batch_axis(mesh: Mesh) -> str:
    """The axis of ``mesh`` that a batch is split over: ``"data"``, or a 1-D mesh's only axis.

    Any mesh works, whatever its axis types (``jax.make_mesh``'s default ``Explicit``
    or ``Auto``): ``jax.make_mesh((n,), ("batch",))`` splits the batch over ``"batch"``.

    Raises:
      ValueError: a mesh of several axes has none named ``"data"``.
    """
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh (e.g. jax.make_mesh((n,), "
                         f"('data',))), got {type(mesh).__name__}.")
    names = tuple(mesh.axis_names)
    if DATA_AXIS in names:
        return DATA_AXIS
    if len(names) == 1:
        return names[0]
    raise ValueError(f"mesh axes {names}: name the axis that splits the batch {DATA_AXIS!r} "
                     f"(e.g. jax.make_mesh((n, m), ('data', 'model'))), or pass a 1-D mesh.")


def mesh_context(mesh: Mesh | None):
    """``jax.set_mesh(mesh)`` (the context under which steps trace on ``Explicit`` axes);
    a no-op for ``None``."""
    import contextlib

    if mesh is None:
        return contextlib.nullcontext()
    set_mesh = getattr(jax, "set_mesh", None) or jax.sharding.use_mesh
    return set_mesh(mesh)


def batch_sharding(mesh: Mesh, axis_name: str = DATA_AXIS) -> NamedSharding:
    """Sharding of a batch: the leading (batch) axis split over ``axis_name``."""
    return NamedSharding(mesh, P(axis_name))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of parameters and optimizer state: a full copy on every device."""
    return NamedSharding(mesh, P())


def _local_batch_divisible(tree: Any, mesh: Mesh, axis_name: str) -> None:
    local = len([d for d in mesh.devices.flat if d.process_index == jax.process_index()])
    for leaf in jax.tree_util.tree_leaves(tree):
        n = np.shape(leaf)[0] if np.ndim(leaf) else None
        if n is None or n % max(local, 1):
            raise ValueError(
                f"shard_batch: this process's batch has leading size {n}, which its {local} "
                f"device(s) on mesh axis {axis_name!r} cannot split evenly; use a per-process "
                f"batch size that is a multiple of {local}."
            )


def shard_batch(tree: Any, mesh: Mesh, axis_name: str = DATA_AXIS) -> Any:
    """Turn each process's local batch (NumPy arrays) into global ``jax.Array`` s.

    Every process passes its own slice of the global batch (its per-process shard of
    the data); the result is sharded ``P(axis_name)`` over the mesh, with global batch
    size = local size x process count. In one process this is ``jax.device_put``.
    """
    _local_batch_divisible(tree, mesh, axis_name)
    sharding = batch_sharding(mesh, axis_name)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree_util.tree_map(
        lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), tree
    )


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place ``tree`` (parameters, optimizer state, ...) in full on every device of ``mesh``."""
    return jax.device_put(tree, replicated_sharding(mesh))


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")


def collectives(compiled: Any) -> list[tuple[str, str]]:
    """The cross-device collectives of a compiled computation, in program order.

    Args:
      compiled: ``jax.jit(f).lower(*args).compile()`` (anything with ``as_text()``),
        or its HLO text.

    Returns:
      ``(op, result shape)`` for each all-reduce, all-gather, reduce-scatter,
      collective-permute and all-to-all instruction (asynchronous ``-start``/``-done``
      pairs count once), e.g. ``("all-reduce", "(f32[8]{0}, f32[8]{0})")``: XLA merges
      independent all-reduces into one instruction with a tuple result.
    """
    from seqnorm_jax.aot import hlo_collectives

    text = compiled if isinstance(compiled, str) else getattr(compiled, "as_text", None)
    text = text() if callable(text) else text
    if not isinstance(text, str):
        raise ValueError("collectives: pass a compiled computation (jit(f).lower(...).compile()) "
                         f"or its HLO text, got {type(compiled).__name__}.")
    return [(c.kind, c.shape) for c in hlo_collectives(text)]


def collective_counts(compiled: Any) -> dict[str, int]:
    """How many of each collective a compiled computation runs (see :func:`collectives`).

    Every name of :data:`COLLECTIVES` is a key (0 when absent). Use it to check that a
    training step communicates no more than expected:

    >>> step = jax.jit(train_step).lower(state, batch).compile()
    >>> collective_counts(step)["all-reduce"]
    """
    counts = dict.fromkeys(COLLECTIVES, 0)
    for op, _ in collectives(compiled):
        counts[op] += 1
    return counts
