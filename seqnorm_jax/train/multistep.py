"""Several training steps per compiled call, for models whose step is shorter than its dispatch.

A tiny model (paper 003's 4x128 MLP at batch 4) computes a step in microseconds, and
the host's work per step (one jitted call, one batch put on the device, the loop's
bookkeeping) then sets the pace. :func:`jit_loop_steps` compiles a ``lax.scan`` of the
loop's own step (:func:`~seqnorm_jax.train.compiled.loop_step_fn`) over ``n`` stacked
batches, so one call takes ``n`` steps; the state, the metrics accumulator and the
divergence guard go through it exactly as through ``n`` calls of
:func:`~seqnorm_jax.train.compiled.jit_loop_step`, with the same results bit for bit
(``tests/test_multistep.py``).

The loop (``Trainer(steps_per_call=n)``) cuts each epoch into such chunks with
:func:`chunk_length`: a chunk ends where the one-step loop does something between two
steps (a metrics row, a checkpoint, ``max_steps``, the epoch's end) and never covers a
step that a step hook records (a hook with a ``records(step)`` method, such as
:class:`~seqnorm_jax.analysis.StatisticsRecorder`, is asked; a hook without one runs at
every step, so the loop takes one step per call). Chunk lengths are powers of two, so
at most ``log2(n) + 1`` scans are compiled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from seqnorm_jax import checks
from seqnorm_jax.distributed import DATA_AXIS, batch_sharding, replicated_sharding
from seqnorm_jax.train.compiled import loop_step_fn

__all__ = ["chunk_length", "device_chunks", "jit_loop_steps"]


def jit_loop_steps(mesh: Mesh | None = None, lr_fn: Callable[[Any], Any] | None = None, *,
                   donate: bool | None = None, micro_batches: int = 1,
                   output_noise: tuple[float, float] | None = None,
                   stop_on_divergence: bool = True, axis_name: str = DATA_AXIS,
                   image_norm: tuple[Any, Any] | None = None):
    """``steps(state, batches, acc) -> (state, acc)``: the loop's step over stacked batches.

    Takes the arguments of :func:`~seqnorm_jax.train.compiled.jit_loop_step`.
    ``batches`` holds ``n`` batches stacked on a new leading axis (leaves ``(n, B, ...)``,
    the batch axis sharded over ``axis_name``); the call equals ``n`` calls of the
    one-step function in order. ``acc`` must have room for the ``n`` steps.
    """
    step = loop_step_fn(lr_fn, micro_batches=micro_batches, output_noise=output_noise,
                        stop_on_divergence=stop_on_divergence, image_norm=image_norm)

    def steps(state, batches, acc):
        def body(carry, batch):
            state, acc = carry
            return step(state, batch, acc), None

        (state, acc), _ = jax.lax.scan(body, (state, acc), batches)
        return state, acc

    if donate is None:
        donate = jax.default_backend() != "cpu"
    kwargs = {}
    if mesh is not None:
        rep = replicated_sharding(mesh)
        kwargs = dict(in_shardings=(rep, NamedSharding(mesh, P(None, axis_name)), rep),
                      out_shardings=(rep, rep))
    return jax.jit(steps, donate_argnums=(0,) if donate else (), **kwargs)


def _power_of_two_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def chunk_length(step: int, step_in_epoch: int, *, steps_per_call: int, steps_per_epoch: int,
                 log_every: int, checkpoint_every: int | None = None,
                 max_steps: int | None = None, hooks: Sequence[Any] = ()) -> int:
    """How many steps the loop takes in its next call, from global ``step`` (0-based).

    At most ``steps_per_call``; the chunk ends at the epoch's end, at the next multiple of
    ``log_every`` and of ``checkpoint_every``, and at ``max_steps``; it is 1 when a hook
    records ``step`` or has no ``records`` method, and otherwise stops before the first
    step a hook records. The result is rounded down to a power of two.
    """
    limits = [steps_per_call, steps_per_epoch - step_in_epoch, log_every - step % log_every]
    if checkpoint_every:
        limits.append(checkpoint_every - step % checkpoint_every)
    if max_steps is not None and max_steps > step:
        limits.append(max_steps - step)
    n = max(1, min(limits))
    for hook in hooks:
        records = getattr(hook, "records", None)
        if records is None:
            return 1
        for j in range(n):
            if records(step + j):
                n = max(j, 1)
                break
    return _power_of_two_floor(n)


def device_chunks(batches: Iterable[dict[str, np.ndarray]], next_length: Callable[[int], int],
                  mesh: Mesh | None = None, axis_name: str = DATA_AXIS
                  ) -> Iterator[tuple[int, dict[str, jax.Array]]]:
    """``(n, batch)`` pairs: the host ``batches`` grouped ``next_length(i)`` at a time (``i``:
    how many were grouped before) and put on the devices.

    ``n == 1`` gives the batch itself (the one-step call); ``n > 1`` stacks ``n``
    batches on a new leading axis (:func:`jit_loop_steps`). A short last group (the
    source ran out) gives fewer. With a ``mesh`` of more than one device the batch axis
    is sharded over ``axis_name``; one process only.
    """
    one = many = None
    if mesh is not None and mesh.devices.size > 1:
        one, many = batch_sharding(mesh, axis_name), NamedSharding(mesh, P(None, axis_name))
    it = iter(batches)
    done = 0
    while True:
        want = checks.positive_int(next_length(done), "next_length(i)", "device_chunks")
        group = [b for _, b in zip(range(want), it)]
        if not group:
            return
        done += len(group)
        if len(group) == 1:
            yield 1, jax.device_put(group[0], one)
        else:
            stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *group)
            yield len(group), jax.device_put(stacked, many)
