"""How a call computes its statistics: one declared plan, chosen in one function.

A layer's math is the same whatever its input (METHODS.md: moments, a little arithmetic
on ``(N, C)`` arrays, one elementwise pass); *how* the statistics are reduced from ``x``
depends on the input and the call, and is chosen here once (:func:`plan`):

* ``"view"``: straight from ``x`` seen as groups (:class:`~seqnorm_jax.stats.GroupView`,
  :func:`~seqnorm_jax.stats.group_moments`): no per-sample moments, which on a dense
  ``(N, C)`` input would be as large as ``x``;
* ``"fused"``: two normalizations in a row (SeqNorm, GN+) on a dense input in training:
  both steps' statistics, maps and the output pass in one custom VJP
  (:func:`~seqnorm_jax.stats.normalize`);
* ``"blocks"``: the same two steps when a sample group spans the devices of a batch
  sharded under ``jax.jit``: each step's statistics from per-device blocks merged from one
  all-reduce (:meth:`~seqnorm_jax.stats.GroupView.over_blocks`);
* ``"running"``: inference from the running statistics alone: no statistics of the batch
  (the per-sample step of a two-step layer from one reduction of the view);
* ``"per_sample"``: the ``(N, C)`` per-sample moments pooled over groups
  (:func:`~seqnorm_jax.stats.pool`): masks, device axes (``shard_map``), the example weight,
  and channel groups of feature maps (XLA:CPU's backward of a reduction over a split channel
  axis is 2-5x slower, ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from seqnorm_jax.stats.moments import GroupView
from seqnorm_jax.stats.pooling import spanning_blocks

REGIMES = ("view", "fused", "blocks", "running", "per_sample")
FAMILIES = ("batch", "two_steps", "sample")


@dataclasses.dataclass(frozen=True)
class Plan:
    """The regime of a call (see the module docstring) and the view of ``x`` it reduces
    (``None`` for ``"per_sample"`` and the batch family's ``"running"``)."""

    regime: str
    view: GroupView | None = None


def plan(x: Any, *, axis: int, family: str, training: bool, plain_inference: bool,
           masked: bool, axis_name: str | None, batch_groups: int = 1,
           channel_groups: int | None = None, grouping: str = "contiguous",
           sequential: bool = True) -> Plan:
    """The plan of a call on ``x`` (feature axis ``axis``, already checked).

    ``family``: ``"batch"`` (statistics per (sample group, channel group) over the batch:
    BatchNorm, GhostNorm, BatchGroupNorm, BGN), ``"two_steps"`` (a per-sample channel-group
    step and a batch step, SeqNorm and GN+; ``sequential=False``: side by side) or
    ``"sample"`` (per-sample channel groups: GroupNorm). ``channel_groups=None`` is one
    channel per group. ``plain_inference``: running statistics and no example weight.
    """
    shape = tuple(x.shape)
    dense = len(shape) == 2
    whole = not masked and axis_name is None  # the statistics may come straight from x
    if family == "batch":
        if training and whole and (channel_groups is None or dense):
            return Plan("view", GroupView(shape, axis, batch_groups, channel_groups, grouping))
        return Plan("running" if plain_inference else "per_sample")
    if family == "sample":
        if whole and dense:
            return Plan("view", GroupView(shape, axis, None, channel_groups))
        return Plan("per_sample")
    if dense and sequential and not masked and plain_inference:
        return Plan("running", GroupView(shape, axis, None, channel_groups))
    if dense and sequential and whole and training:
        view = GroupView(shape, axis, batch_groups, channel_groups, grouping)
        blocks = spanning_blocks(x, batch_groups, grouping)
        return Plan("fused" if blocks == 1 else "blocks", view)
    return Plan("per_sample")
