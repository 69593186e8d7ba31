"""The loop's compiled steps: the train and eval steps jitted for a data-parallel mesh.

:func:`jit_train_step` and :func:`jit_eval_step` compile
:func:`~seqnorm_jax.train.train_step` and :func:`~seqnorm_jax.train.eval_step` with the
batch sharded over the ``"data"`` axis and the state replicated (one device works the
same). XLA partitions the norm layers' statistics over the sharded batch itself, so a
``GhostNorm`` with groups aligned to the devices needs no communication and
``BatchNorm`` reduces across them. :func:`jit_loop_step` is the training loop's step:
its metrics stay on the device in a :class:`StepAccumulator`, and a divergence is
caught inside the compiled step (:func:`guarded_step`).

Several steps per call, for models whose step is shorter than its dispatch: a tiny model
(paper 003's 4x128 MLP at batch 4) computes a step in microseconds, and the host's work
per step (one jitted call, one batch put on the device, the loop's bookkeeping) then
sets the pace. :func:`jit_loop_steps` compiles a ``lax.scan`` of the loop's own step
(:func:`loop_step_fn`) over ``n`` stacked batches, so one call takes ``n`` steps; the
state, the metrics accumulator and the divergence guard go through it exactly as through
``n`` calls of :func:`jit_loop_step`, with the same results bit for bit
(``tests/test_multistep.py``).

The loop (``Trainer(steps_per_call=n)``) cuts each epoch into such chunks with
:func:`chunk_length`: a chunk ends where the one-step loop does something between two
steps (a metrics row, a checkpoint, ``max_steps``, the epoch's end) and never covers a
step that a step hook records (a hook with a ``records(step)`` method, such as
:class:`~seqnorm_jax.analysis.StatisticsRecorder`, is asked; a hook without one runs at
every step, so the loop takes one step per call). Chunk lengths are powers of two, so at
most ``log2(n) + 1`` scans are compiled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from seqnorm_jax import checks
from seqnorm_jax.distributed import DATA_AXIS, batch_sharding, replicated_sharding
from seqnorm_jax.train.state import TrainState
from seqnorm_jax.train.step import eval_step, train_step

__all__ = [
    "StepAccumulator",
    "chunk_length",
    "device_chunks",
    "guarded_step",
    "init_accumulator",
    "jit_eval_step",
    "jit_loop_step",
    "jit_loop_steps",
    "jit_train_step",
    "loop_step_fn",
    "normalize_images",
    "reset_accumulator",
]


class StepAccumulator(NamedTuple):
    """Training metrics kept on the device between two fetches, and the divergence flag.

    ``loss[:steps]`` and ``accuracy[:steps]`` hold the steps taken since the last reset
    (those before the run diverged, the diverging one included), one entry per step, so
    the host sums them in float64 step by step exactly as if it had fetched each step;
    ``lr`` is the last such step's rate. ``diverged_step`` is the 1-based global step
    whose loss, gradient or new state was first non-finite (-1: none) and
    ``diverged_loss`` that step's loss; both survive :func:`reset_accumulator`.
    """

    loss: jax.Array
    accuracy: jax.Array
    steps: jax.Array
    lr: jax.Array
    diverged_step: jax.Array
    diverged_loss: jax.Array


def init_accumulator(size: int) -> StepAccumulator:
    """An empty :class:`StepAccumulator` for up to ``size`` steps (no divergence)."""
    z = jnp.zeros((), jnp.float32)
    buf = jnp.zeros((size,), jnp.float32)
    return StepAccumulator(buf, buf, jnp.zeros((), jnp.int32), z, jnp.full((), -1, jnp.int32), z)


def reset_accumulator(acc: StepAccumulator) -> StepAccumulator:
    """Empty ``acc``, keeping its divergence fields."""
    return init_accumulator(acc.loss.shape[0])._replace(diverged_step=acc.diverged_step,
                                                        diverged_loss=acc.diverged_loss)


def guarded_step(step_fn: Callable[..., tuple[TrainState, dict[str, jax.Array]]],
                 state: TrainState, batch: Any, acc: StepAccumulator, *,
                 stop_on_divergence: bool = True) -> tuple[TrainState, StepAccumulator]:
    """One ``step_fn`` step with its metrics recorded in ``acc`` and divergence caught on
    the device.

    A step diverges when its loss, its gradient norm or anything it writes (parameters,
    optimizer state, running statistics) is not finite (``metrics["finite"]`` of
    :func:`~seqnorm_jax.train.train_step`). With
    ``stop_on_divergence`` (the default) that step and every later one return the state
    unchanged (``step_fn(state, batch, guard=...)``: a select on XLA:CPU, a ``lax.cond``
    elsewhere, in the compiled step; no host round trip), so the state stays the last
    finite one until the host sees ``acc.diverged_step`` and stops; otherwise the updates
    are applied as computed.
    ``acc`` must have room for the step (the caller resets it at least every
    ``acc.loss.shape[0]`` steps).
    """
    live = acc.diverged_step < 0 if stop_on_divergence else jnp.ones((), bool)
    if stop_on_divergence:
        new_state, m = step_fn(state, batch, guard=live)
    else:
        new_state, m = step_fn(state, batch)
    finite = m["finite"]
    first = (acc.diverged_step < 0) & ~finite

    def record(buf, value):
        return jnp.where(live, buf.at[acc.steps].set(value.astype(jnp.float32)), buf)

    acc = StepAccumulator(
        loss=record(acc.loss, m["loss"]),
        accuracy=record(acc.accuracy, m["accuracy"]),
        steps=acc.steps + live.astype(jnp.int32),
        lr=jnp.where(live, m["lr"], acc.lr),
        diverged_step=jnp.where(first, (state.step + 1).astype(jnp.int32), acc.diverged_step),
        diverged_loss=jnp.where(first, m["loss"], acc.diverged_loss))
    return new_state, acc


def jit_loop_step(mesh: Mesh | None = None, lr_fn: Callable[[Any], Any] | None = None, *,
                  donate: bool | None = None, micro_batches: int = 1,
                  output_noise: tuple[float, float] | None = None,
                  stop_on_divergence: bool = True, axis_name: str = DATA_AXIS,
                  image_norm: tuple[Any, Any] | None = None):
    """:func:`guarded_step` of :func:`train_step`, compiled like :func:`jit_train_step`.

    ``step(state, batch, acc) -> (state, acc)``: the training loop's step; its metrics
    stay on the device in the :class:`StepAccumulator` until the loop fetches them.
    With ``image_norm=(mean, std)`` the batch's images arrive as uint8 pixels and are
    normalised inside the step (:func:`seqnorm_jax.data.normalize_on_device`, fused by
    XLA into the first layer), so a quarter of the bytes cross to the device and the
    host does no per-batch arithmetic.
    """
    fn = loop_step_fn(lr_fn, micro_batches=micro_batches, output_noise=output_noise,
                      stop_on_divergence=stop_on_divergence, image_norm=image_norm)
    return _jit(fn, mesh, donate, axis_name, extra_in=1)


def loop_step_fn(lr_fn: Callable[[Any], Any] | None = None, *, micro_batches: int = 1,
                 output_noise: tuple[float, float] | None = None,
                 stop_on_divergence: bool = True, image_norm: tuple[Any, Any] | None = None):
    """The uncompiled ``step(state, batch, acc) -> (state, acc)`` that :func:`jit_loop_step`
    compiles (and :func:`jit_loop_steps` scans)."""
    step = _step_fn(lr_fn, micro_batches, output_noise)

    def fn(s, b, a):
        if image_norm is not None:
            b = normalize_images(b, image_norm)
        return guarded_step(step, s, b, a, stop_on_divergence=stop_on_divergence)

    return fn


def normalize_images(batch: dict[str, Any], image_norm: tuple[Any, Any]) -> dict[str, Any]:
    """``batch`` with its uint8 ``"image"`` normalised by ``image_norm = (mean, std)``."""
    from seqnorm_jax.data import normalize_on_device

    return {**batch, "image": normalize_on_device(batch["image"], *image_norm)}


def _step_fn(lr_fn, micro_batches, output_noise):
    return lambda s, b, guard=None: train_step(s, b, lr_fn, micro_batches=micro_batches,
                                               output_noise=output_noise, guard=guard)


def _jit(fn, mesh, donate, axis_name=DATA_AXIS, extra_in=0):
    if donate is None:
        donate = jax.default_backend() != "cpu"
    kwargs = {}
    if mesh is not None:
        rep = replicated_sharding(mesh)
        kwargs = dict(in_shardings=(rep, batch_sharding(mesh, axis_name), *([rep] * extra_in)),
                      out_shardings=(rep, rep))
    return jax.jit(fn, donate_argnums=(0,) if donate else (), **kwargs)


def jit_train_step(mesh: Mesh | None = None, lr_fn: Callable[[Any], Any] | None = None,
                   *, donate: bool | None = None, micro_batches: int = 1,
                   output_noise: tuple[float, float] | None = None,
                   axis_name: str = DATA_AXIS):
    """:func:`train_step` compiled for ``mesh``: batch sharded on ``"data"``, state replicated.

    Args:
      mesh: a :func:`seqnorm_jax.distributed.data_mesh`; ``None`` compiles without
        sharding constraints (inputs decide).
      lr_fn: the learning-rate schedule, for the logged ``lr``.
      donate: donate the input state's buffers (default: on accelerators, not on CPU,
        where XLA cannot reuse them).
      micro_batches: ``k > 1`` runs each batch as ``k`` accumulated micro-batches
        (:func:`~seqnorm_jax.train.train_step`'s ``micro_batches``; with BatchNorm this trains
        ``GhostNorm(batch_groups=k)``).
      output_noise: ``(mean, std)`` of Gaussian noise added to every norm layer's output
        in training (:func:`output_noise_scope`); ``None``: off.
      axis_name: the mesh axis the batch is split over.
    """
    return _jit(_step_fn(lr_fn, micro_batches, output_noise), mesh, donate, axis_name)


def jit_eval_step(mesh: Mesh | None = None, *, axis_name: str = DATA_AXIS):
    """:func:`eval_step` compiled for ``mesh``: ``step(state, batch, example_weight=0.0)``.

    A Python ``example_weight`` of 0 (plain running statistics, the default) calls a
    compilation with the weight as the constant 0, so the norm layers take their
    inference path (one multiply-add); any other weight, or a traced one, is an
    argument of a second compilation that serves every value.
    """
    kwargs2 = kwargs3 = {}
    if mesh is not None:
        rep, bat = replicated_sharding(mesh), batch_sharding(mesh, axis_name)
        kwargs2 = dict(in_shardings=(rep, bat), out_shardings=rep)
        kwargs3 = dict(in_shardings=(rep, bat, rep), out_shardings=rep)
    plain = jax.jit(lambda s, b: eval_step(s, b, 0.0), **kwargs2)
    weighted = jax.jit(lambda s, b, a: eval_step(s, b, a), **kwargs3)

    def step(state, batch, example_weight=0.0):
        if isinstance(example_weight, (int, float)) and example_weight == 0:
            return plain(state, batch)
        return weighted(state, batch, jnp.asarray(example_weight, jnp.float32))

    return step


# ----------------------------------------------------------- several steps per call
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
