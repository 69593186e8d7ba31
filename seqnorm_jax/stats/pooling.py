"""Pooling moments over groups of samples and channels, on one device or many.

Chan's parallel merge (:func:`merge`), pooling ``(N, C)`` moments over sample
groups and channel groups (:func:`pool`, :func:`pool_with_target`), and the
cross-device reductions that make groups span devices (:func:`cross_device_mean`,
:func:`cross_device_merge`, :func:`running_target`; under ``jax.jit`` with a sharded
batch, :func:`spanning_blocks` and :func:`merge_blocks`: per-device blocks of each group,
merged from one all-reduce).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType

from seqnorm_jax import checks
from seqnorm_jax.checks import divisors
from seqnorm_jax.stats.moments import GROUPINGS, Moments

Array = jax.Array

def merge(
    m: Moments,
    axis: int | Sequence[int],
    *,
    weight: Array | None = None,
    center: Array | None = None,
    keepdims: bool = True,
) -> Moments:
    """Chan's merge of several (mean, variance) pairs along ``axis``.

    The pooled mean is the (weighted) average of the means; the pooled variance
    is the average of ``var + (mean - center)**2`` where ``center`` is the pooled
    mean (the total variance of the union) unless given, in which case it is the
    mean squared deviation of the union around ``center`` (which must broadcast
    against ``m.mean``).

    Args:
      m: moments to merge.
      axis: the axes whose entries are merged.
      weight: optional non-negative weights (counts) broadcastable to ``m.mean``;
        equal weights when None. Entries whose weights are all 0 merge to mean and
        variance 0.
      center: optional point the variance is taken around.
      keepdims: keep the merged axes with size 1.
    """
    ref, delta, var = _merge(m, axis, weight=weight, center=center)
    mean = ref + delta
    if not keepdims:
        axis = (axis,) if isinstance(axis, int) else tuple(axis)
        mean, var = jnp.squeeze(mean, axis), jnp.squeeze(var, axis)
    return Moments(mean, var)


def _merge(m: Moments, axis, *, weight=None, center=None,
           offset=None) -> tuple[Array, Array, Array]:
    """:func:`merge` with the pooled mean kept as ``ref + delta`` (dims kept).

    ``ref`` is the pooled mean as rounded, so ``delta`` and the deviations
    ``m.mean - ref`` are small and exact where the means are large and close
    (float32 means of 1e6 with a spread of 1): a caller that needs ``k - mean`` for
    a nearby ``k`` computes ``(k - ref) - delta`` without losing the low digits.
    """
    axis = (axis,) if isinstance(axis, int) else tuple(axis)
    if weight is None:
        avg = lambda a: jnp.mean(a, axis=axis, keepdims=True)
    else:
        weight = jnp.broadcast_to(weight.astype(m.mean.dtype), m.mean.shape)
        total = jnp.sum(weight, axis=axis, keepdims=True)
        # A set with no weight (every entry masked out) has mean and variance 0, not 0/0.
        total = jnp.where(total > 0, total, 1)
        avg = lambda a: jnp.sum(weight * a, axis=axis, keepdims=True) / total
    # ref: the pooled mean as rounded; the deviations from it are then exact. (A ref
    # taken from one entry would do as well on one device, but under jit with the
    # batch sharded it would cost a collective of its own; the rounded pooled mean
    # comes from the same all-reduce as before, the deviations from a second one.)
    if offset is None:  # the entries' means are m.mean
        ref = lax.stop_gradient(avg(m.mean))
        dev = m.mean - ref
    else:  # the entries' means are offset + m.mean, offset a constant (exact differences)
        offset = jnp.broadcast_to(offset, m.mean.shape)
        ref = lax.stop_gradient(avg(offset + m.mean))
        dev = (offset - ref) + m.mean
    delta = avg(dev)
    if center is None:
        # Around the pooled mean ref + delta: E[dev^2] - delta^2, with delta tiny (ref is
        # the pooled mean up to rounding), so nothing cancels, and both sums travel in
        # the same all-reduce.
        var = jnp.maximum(avg(m.var + jnp.square(dev)) - jnp.square(delta), 0.0)
    else:  # center is in the frame of m.mean: relative to offset when given
        c = center - ref if offset is None else (offset - ref) + center
        var = avg(m.var + jnp.square(dev - c))
    return ref, delta, var


def _group_view(a: Array, batch_groups: int, channel_groups: int, grouping: str) -> Array:
    """``(N, C)`` -> ``(G_M, N // G_M, G_C, C // G_C)``: group index, member index."""
    n, c = a.shape
    if grouping == "contiguous":
        return a.reshape(batch_groups, n // batch_groups, channel_groups, c // channel_groups)
    # strided: sample n belongs to group n % G_M (Keras' virtual_batch_size layout)
    a = a.reshape(n // batch_groups, batch_groups, channel_groups, c // channel_groups)
    return jnp.swapaxes(a, 0, 1)


def _ungroup(a: Array, n: int, c: int, grouping: str) -> Array:
    """Inverse of :func:`_group_view` after a merge that kept dims: back to ``(N, C)``."""
    g_m, _, g_c, _ = a.shape
    a = jnp.broadcast_to(a, (g_m, n // g_m, g_c, c // g_c))
    if grouping == "strided":
        a = jnp.swapaxes(a, 0, 1)
    return a.reshape(n, c)


def pool(
    m: Moments,
    *,
    batch_groups: int | None,
    channel_groups: int | None,
    grouping: str = "contiguous",
    center: Array | None = None,
    axis_name: str | None = None,
    axis_index_groups: Any = None,
    weight: Array | None = None,
    relative_to: Array | None = None,
    offset: Array | None = None,
) -> Moments:
    """Pool ``(N, C)`` moments over groups of samples and of channels.

    Args:
      m: per-sample, per-channel moments, shape ``(N, C)``, each over the same count
        unless ``weight`` gives the counts.
      batch_groups: ``G_M``, number of sample groups of the batch (1: the whole
        batch); ``None``: no pooling over samples (each sample alone).
      channel_groups: ``G_C``, number of contiguous channel groups (1: all
        channels); ``None``: no pooling over channels.
      grouping: ``"contiguous"`` (sample groups ``x[:N/G_M]``, ...) or
        ``"strided"`` (group ``g`` holds samples ``g, g + G_M, ...``).
      center: optional ``(N, C)`` (or broadcastable) point to take the variance
        around instead of each group's own mean.
      axis_name: when set (inside ``shard_map``), ``N`` is the local shard of a
        batch split over this named axis, and ``batch_groups`` counts the groups
        of the *global* batch. It must be a multiple of the axis size (groups lie
        within shards: no communication) or divide it (each group spans several
        shards: one all-reduce gathering the per-shard moments, count-weighted).
      axis_index_groups: as in :func:`jax.lax.psum`: sub-groups of devices that
        form separate batches.
      weight: optional ``(N, C)`` counts of the moments (:func:`sample_counts` of a
        mask): a count-weighted merge.
      relative_to: optional ``(N, C)`` (or broadcastable) point: the returned mean
        is ``pooled mean - relative_to``, computed without rounding the pooled
        mean first (exact where both are large and close).
      offset: optional ``(N, C)`` constant: the entries' means are ``offset + m.mean``
        (moments from :func:`sample_moments_about`), merged without rounding; a
        ``center`` is then relative to ``offset`` too.

    Returns:
      Pooled moments broadcast back to ``(N, C)``: entry ``(n, c)`` holds the
      statistics of the group that contains sample ``n`` and channel ``c``.
    """
    return _pool(m, batch_groups=batch_groups, channel_groups=channel_groups,
                 grouping=grouping, center=center, axis_name=axis_name,
                 axis_index_groups=axis_index_groups, weight=weight, relative_to=relative_to,
                 offset=offset)[0]


def pool_with_target(
    m: Moments,
    *,
    batch_groups: int,
    channel_groups: int | None,
    grouping: str = "contiguous",
    axis_name: str | None = None,
    axis_index_groups: Any = None,
    weight: Array | None = None,
    relative_to: Array | None = None,
    offset: Array | None = None,
) -> tuple[Moments, Moments]:
    """:func:`pool` over sample groups, and the running-statistics target, together.

    Returns ``(pooled, target)``: ``pooled`` as :func:`pool` (``(N, C)``), and
    ``target`` the group statistics averaged over the sample groups of the global
    batch, shape ``(C,)`` (what :func:`running_target` computes from ``pooled``).
    Taking the average from the ``(G_M, C)`` group statistics rather than from the
    ``(N, C)`` broadcast costs no extra reduction over the batch: under ``jax.jit``
    with a sharded batch, SyncBN's target needs no collective of its own; under
    ``shard_map`` with ``axis_name``, groups that lie within shards need one
    all-reduce of the stacked ``(2, C)`` target, and groups that span shards none
    beyond the one all-reduce that gathers the per-shard moments.
    """
    return _pool(m, batch_groups=batch_groups, channel_groups=channel_groups,
                 grouping=grouping, axis_name=axis_name, axis_index_groups=axis_index_groups,
                 weight=weight, relative_to=relative_to, offset=offset, with_target=True)


@dataclasses.dataclass(frozen=True)
class PoolPlan:
    """How :func:`pool` reduces a batch to its sample groups (:func:`pool_plan`): the
    ``regime`` ``"local"`` (one device, or a batch seen whole), ``"blocks"`` (under
    ``jax.jit``, groups spanning a sharded batch's devices: :func:`merge_blocks`),
    ``"shards"`` (``shard_map``, groups within shards; the target averaged over devices)
    or ``"spanning"`` (``shard_map``, every group gathered from one all-reduce); the
    ``groups`` reduced here (all for ``"spanning"``), ``blocks`` per group (1: within one
    device) and the device sub-group (:func:`_device_group`)."""

    regime: str
    groups: int
    blocks: int = 1
    devices: int = 1
    position: Any = None
    members: Any = None


def pool_plan(mean: Array, batch_groups: int | None, grouping: str, axis_name: str | None,
              axis_index_groups: Any) -> PoolPlan:
    """The regime of :func:`pool` for ``(N, C)`` moments whose means are ``mean``."""
    n = mean.shape[0]
    g_m = max(n, 1) if batch_groups is None else batch_groups  # per sample; empty: one
    if axis_name is None or batch_groups is None:
        blocks = spanning_blocks(mean, g_m, grouping)
        return PoolPlan("blocks" if blocks > 1 else "local", g_m, blocks)
    n_dev, position, members = _device_group(axis_name, axis_index_groups)
    if g_m % n_dev == 0:
        local = _local_groups(n, g_m, n_dev, grouping, axis_name)
        return PoolPlan("shards", local, spanning_blocks(mean, local, grouping), n_dev,
                        position, members)
    _check_spanning(g_m, n_dev, grouping, axis_name)
    return PoolPlan("spanning", g_m, devices=n_dev, position=position, members=members)


def _pool(m: Moments, *, batch_groups: int | None, channel_groups: int | None,
          grouping: str = "contiguous", center: Array | None = None,
          axis_name: str | None = None, axis_index_groups: Any = None,
          weight: Array | None = None, relative_to: Array | None = None,
          offset: Array | None = None, with_target: bool = False):
    """:func:`pool` / :func:`pool_with_target`: ``(pooled, target or None)``. Each group's
    ``(ref, delta, var)`` (:func:`_merge`, shape ``(G, 1, G_C, 1)``) by the plan's regime,
    broadcast back to ``(N, C)``; the target averaged over groups (and devices: shards)."""
    checks.choice(grouping, GROUPINGS, "grouping")
    n, c = m.mean.shape
    g_c = c if channel_groups is None else channel_groups
    full = lambda a: None if a is None else jnp.broadcast_to(a, (n, c))
    center, weight, offset = full(center), full(weight), full(offset)
    plan = pool_plan(m.mean, batch_groups, grouping, axis_name, axis_index_groups)
    if plan.regime == "spanning":
        ref, delta, var = (a[:, None, :, None] for a in _gathered_groups(
            m, plan.groups, g_c, axis_name, plan.devices, plan.members, center, weight,
            offset))
        mine = plan.position // (plan.devices // plan.groups)  # this device's group
        un = lambda a: _ungroup(lax.dynamic_index_in_dim(a, mine, 0), n, c, "contiguous")
    else:
        ref, delta, var = _group_stats(m, plan, g_c, grouping, center, weight, offset)
        un = lambda a: _ungroup(a, n, c, grouping)
    pooled = Moments(_relative(un(ref), un(delta), full(relative_to)), un(var))
    if not with_target:
        return pooled, None
    target = jnp.stack([_channels(jnp.mean(a, axis=(0, 1)), c) for a in (ref + delta, var)])
    if plan.regime == "shards":
        target = cross_device_mean(target, axis_name, axis_index_groups)
    return pooled, Moments(target[0], target[1])


def _group_stats(m: Moments, plan: PoolPlan, g_c: int, grouping: str, center, weight,
                 offset) -> tuple[Array, Array, Array]:
    """``(ref, delta, var)`` of the ``plan.groups`` sample groups of this device's moments
    and the ``g_c`` channel groups, shape ``(G, 1, G_C, 1)``."""
    n, c = m.mean.shape
    if plan.blocks == 1:
        view = lambda a: None if a is None else _group_view(a, plan.groups, g_c, grouping)
        return _merge(Moments(view(m.mean), view(m.var)), (1, 3), weight=view(weight),
                      center=view(center), offset=view(offset))
    # Chan's merge within each block of a device, then of the blocks, from one all-reduce.
    view = lambda a: None if a is None else a.reshape(
        plan.groups, plan.blocks, n // (plan.groups * plan.blocks), g_c, c // g_c)
    ref, delta, var = _merge(Moments(view(m.mean), view(m.var)), (2, 4), weight=view(weight),
                             center=view(center), offset=view(offset))
    count = None if weight is None else jnp.sum(view(weight), axis=(2, 4), keepdims=True)
    merged = merge_blocks(ref, delta, var, count, 1, centered=center is not None)
    return tuple(a[:, 0] for a in merged)


def _relative(ref: Array, delta: Array, relative_to: Array | None) -> Array:
    """``ref + delta - relative_to``, exact where ``ref`` and ``relative_to`` are close."""
    return ref + delta if relative_to is None else (ref - relative_to) + delta


def _channels(a: Array, c: int) -> Array:
    """``(G_C, 1)`` per-channel-group values broadcast to ``(C,)``."""
    g_c = a.shape[0]
    return jnp.broadcast_to(a, (g_c, c // g_c)).reshape(c)


def _local_groups(n: int, g_m: int, n_dev: int, grouping: str, axis_name: str) -> int:
    """Groups per device when ``g_m`` groups lie within the shards of ``n_dev`` devices."""
    local = g_m // n_dev
    if n % local:
        raise ValueError(
            f"batch_groups={g_m} over {n_dev} devices of axis {axis_name!r} puts {local} "
            f"groups on each device, which do not divide the per-device batch ({n}); use a "
            f"per-device batch that is a multiple of {local}."
        )
    if grouping == "strided" and local != g_m:
        raise ValueError(
            f"grouping='strided' with axis_name={axis_name!r} would interleave "
            "samples of different devices; use grouping='contiguous'."
        )
    return local


def _check_spanning(g_m: int, n_dev: int, grouping: str, axis_name: str) -> None:
    if n_dev % g_m != 0:
        raise ValueError(
            f"batch_groups={g_m} must be a multiple or a divisor of the size of axis "
            f"{axis_name!r} ({n_dev} devices) so that ghost batches align with shards; "
            f"use batch_groups in {divisors(n_dev)} "
            f"or a multiple of {n_dev}."
        )
    if grouping == "strided" and g_m != 1:
        raise ValueError(
            f"grouping='strided' with axis_name={axis_name!r} spreads each group over every "
            "device; use grouping='contiguous'."
        )


def _gathered_groups(m, g_m, g_c, axis_name, n_dev, members, center=None, weight=None,
                     offset=None) -> tuple[Array, Array, Array]:
    """Statistics ``(G_M, G_C)`` of every group of the global batch when each group spans
    ``n_dev // g_m`` shards, as ``(ref, delta, var)`` (see :func:`_merge`): one gather
    (:func:`_gather`) of the per-shard ``(ref, delta, var, count)``, then a count-weighted
    merge of each group's shards on every device."""
    n, c = m.mean.shape
    cview = lambda a: None if a is None else a.reshape(n, g_c, c // g_c)
    ref, delta, var = (jnp.squeeze(a, (0, 2)) for a in _merge(
        Moments(cview(m.mean), cview(m.var)), (0, 2), weight=cview(weight),
        center=cview(center), offset=cview(offset)))  # (G_C,) each
    if weight is None:
        count = jnp.full((g_c,), float(n * (c // g_c)), var.dtype)
    else:
        count = jnp.sum(cview(weight), axis=(0, 2)).astype(var.dtype)
    gathered = _gather(jnp.stack([ref, delta, var, count]), axis_name,
                       members)  # (n_dev, 4, G_C)
    gathered = gathered.reshape(g_m, n_dev // g_m, 4, g_c)
    ref, delta, var = _merge_gathered(*(gathered[:, :, i] for i in range(4)), 1,
                                      centered=center is not None)
    return ref[:, 0], delta[:, 0], var[:, 0]


def _merge_gathered(ref, delta, var, count, axis: int, *, centered: bool = False):
    """Chan's merge along ``axis`` of the ``(ref, delta, var)`` of blocks (shards) of the
    same groups, every block already on this device; ``count`` weighs them (None: equal).
    Each block's mean ``ref + delta`` is taken relative to the first block's ``ref``, so
    the merge subtracts no two large values: returns ``(first ref, pooled mean relative
    to it, pooled var)``, dims kept. ``centered``: each block's variance is already taken
    around a common center, so no between-block term is added."""
    ref0 = lax.index_in_dim(ref, 0, axis, keepdims=True)
    rel = (ref - ref0) + delta
    r, d, v = _merge(Moments(rel, var), axis, weight=count, center=rel if centered else None)
    return ref0, r + d, v


def spanning_blocks(a: Array, groups: int, grouping: str = "contiguous") -> int:
    """Blocks per group when ``groups`` contiguous groups of the batch of ``a`` (traced under
    ``jax.jit``) may span the devices it is split over: 1 when every group lies within a
    device's shard (or ``a`` is not on a mesh), else the blocks of each group that lie
    within one, ``lcm(groups, devices) / groups``.

    The devices are those of the mesh axes in ``a``'s type that are not ``Manual`` (the
    batch may be split over any of them on ``Auto`` axes): blocks at least as fine as the
    shards. Strided groups, and a batch the blocks do not divide, keep 1.
    """
    try:
        mesh = jax.typeof(a).sharding.mesh
    except (AttributeError, TypeError):
        return 1
    if mesh is None or getattr(mesh, "empty", True):
        return 1
    devices = math.prod(size for size, kind in zip(mesh.axis_sizes, mesh.axis_types)
                        if kind != AxisType.Manual)
    if devices <= 1 or groups % devices == 0 or grouping != "contiguous":
        return 1
    total = math.lcm(groups, devices)
    return total // groups if a.shape[0] % total == 0 else 1


def merge_blocks(ref: Array, delta: Array, var: Array, count: Array | None, axis: int, *,
                 centered: bool = False) -> tuple[Array, Array, Array]:
    """Chan's merge along ``axis`` of per-block statistics ``(ref, delta, var)`` (the block's
    mean is ``ref + delta``; ``count`` its weight, None: equal) whose blocks lie on
    different devices of a batch sharded under ``jax.jit``: one all-reduce.

    Every block's statistics are stacked, each device fills the slots of its own blocks
    of a zero array and XLA sums it over the blocks' devices (adding zeros is exact), so
    every device then holds all blocks and merges them around the first block's ``ref``
    (:func:`_merge_gathered`): no value is fetched from another device before the sums,
    and nothing cancels when ``|mean| >> std``. Returns ``(ref, delta, var)`` of the
    merged blocks, dims kept.
    """
    parts = [ref, delta, var] + ([] if count is None else [jnp.broadcast_to(count, var.shape)])
    stacked = jnp.stack(jnp.broadcast_arrays(*parts))
    b, axis = stacked.shape[axis + 1], axis + 1
    # out[.., j, ..] = sum_i [i == j] stacked[.., i, ..]: a reduction over the sharded block
    # axis, which XLA partitions as one all-reduce of the (blocks, ...) stack.
    eye = jnp.eye(b, dtype=stacked.dtype).reshape(
        (1,) * axis + (b, b) + (1,) * (stacked.ndim - axis - 1))
    gathered = jnp.sum(eye * jnp.expand_dims(stacked, axis + 1), axis=axis)
    return _merge_gathered(*gathered[:3], None if count is None else gathered[3], axis - 1,
                           centered=centered)


def _device_group(axis_name: str, axis_index_groups: Any) -> tuple[int, Array, Array | None]:
    """This device's sub-group of ``axis_name``: its size, this device's position in
    it, and the (static) member indices of the sub-group (None: the whole axis)."""
    idx = lax.axis_index(axis_name)
    if axis_index_groups is None:
        return lax.axis_size(axis_name), idx, None
    groups = [list(g) for g in axis_index_groups]
    sizes = {len(g) for g in groups}
    members = sorted(d for g in groups for d in g)
    if len(sizes) != 1 or members != list(range(lax.axis_size(axis_name))):
        raise ValueError(
            f"axis_index_groups={axis_index_groups!r} must split the {lax.axis_size(axis_name)} "
            f"devices of axis {axis_name!r} into groups of equal size."
        )
    group_of, position = [0] * len(members), [0] * len(members)
    for gi, g in enumerate(groups):
        for p, d in enumerate(g):
            group_of[d], position[d] = gi, p
    table = jnp.asarray(groups)
    return sizes.pop(), jnp.asarray(position)[idx], table[jnp.asarray(group_of)[idx]]


def _gather(a: Array, axis_name: str, members: Array | None) -> Array:
    """Stack ``a`` from every device of this device's sub-group (``members`` from
    :func:`_device_group`; None: the whole axis): ``(group size, *a.shape)``.

    One all-reduce: each device puts ``a`` in its own slot of a zero ``(axis size,
    *a.shape)`` array and the slots are summed over the axis (adding zeros is exact).
    Unlike ``lax.all_gather``, the result over the whole axis is device-invariant,
    so statistics built from it may leave ``shard_map`` with a replicated
    ``out_specs``. Sub-groups are selected locally, which works wherever ``psum``
    over the whole axis does (``psum`` with ``axis_index_groups`` does not under
    ``shard_map``).
    """
    n_dev = lax.axis_size(axis_name)
    slot = jnp.arange(n_dev) == lax.axis_index(axis_name)
    gathered = lax.psum(jnp.where(slot.reshape((n_dev,) + (1,) * a.ndim), a[None], 0), axis_name)
    return gathered if members is None else gathered[members]


def cross_device_mean(a: Array, axis_name: str | None, axis_index_groups: Any = None) -> Array:
    """Average ``a`` over the devices of ``axis_name`` (identity when None), or over
    this device's sub-group of them."""
    if axis_name is None:
        return a
    if axis_index_groups is None:
        return lax.pmean(a, axis_name)
    _, _, members = _device_group(axis_name, axis_index_groups)
    return jnp.mean(_gather(a, axis_name, members), axis=0)


def any_kept(mask: Array, axis_name: str | None = None, axis_index_groups: Any = None) -> Array:
    """Whether ``mask`` keeps any entry, on this device or (``axis_name``) on any device of
    its group: a scalar bool, the same on every device."""
    kept = jnp.any(mask).astype(jnp.float32)
    return cross_device_mean(kept, axis_name, axis_index_groups) > 0


def cross_device_merge(m: Moments, count: Array, axis_name: str,
                       axis_index_groups: Any = None) -> Moments:
    """Chan's merge of each device's moments of the same statistics over ``axis_name``:
    count-weighted, two all-reduces (the pooled mean, then the deviations around it)."""
    total = cross_device_mean(count, axis_name, axis_index_groups)
    safe = jnp.where(total > 0, total, 1)
    mean = cross_device_mean(count * m.mean, axis_name, axis_index_groups) / safe
    var = cross_device_mean(count * (m.var + jnp.square(m.mean - mean)), axis_name,
                            axis_index_groups) / safe
    return Moments(mean, var)


def running_target(pooled: Moments, axis_name: str | None = None,
                   axis_index_groups: Any = None) -> Moments:
    """What running statistics move towards: group statistics averaged over sample groups.

    ``pooled`` is the output of :func:`pool` (``(N, C)``, each sample holding its
    group's statistics; groups have equal sizes, so averaging over samples averages
    over groups). Across devices the mean and variance travel stacked, as one
    ``(2, C)`` collective.
    """
    target = jnp.stack([jnp.mean(pooled.mean, 0), jnp.mean(pooled.var, 0)])
    target = cross_device_mean(target, axis_name, axis_index_groups)
    return Moments(target[0], target[1])
