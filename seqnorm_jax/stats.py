"""The statistics core: every mean and variance in seqnorm-jax is computed here.

Every layer of the library normalizes ``x[n, ..., c]`` with a mean and a variance
that depend only on the sample ``n`` and the channel ``c``. They are all derived
from the per-sample, per-channel spatial moments of ``x`` (an ``(N, C)`` pair of
arrays, see :func:`sample_moments`), pooled over contiguous (or strided) groups
of samples and/or channels (:func:`pool`).

Numerical conventions
---------------------
* Statistics are computed in float32, or in the input's precision when it is
  wider (float64). Half-precision inputs never produce half-precision statistics.
* Variances are *biased* (divide by the count).
* Pooling uses Chan's parallel merge of (mean, variance) pairs, so it never
  subtracts two large raw second moments: a float32 input with mean 1e4 and
  standard deviation 1 gives variances within 1e-5 relative of float64.

Everything here is a pure function of arrays: no Flax, no state.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

__all__ = [
    "Moments",
    "stat_dtype",
    "feature_axis",
    "spatial_axes",
    "sample_moments",
    "sample_moments_about",
    "GroupView",
    "group_moments",
    "moments_of_affine",
    "merge",
    "pool",
    "expand",
    "mix",
    "affine",
    "ema",
    "running_target",
    "pool_with_target",
    "cross_device_mean",
    "cross_device_merge",
    "sample_counts",
]

GROUPINGS = ("contiguous", "strided")


class Moments(NamedTuple):
    """A mean and a biased variance of the same shape, over ``count`` values each."""

    mean: Array
    var: Array


def stat_dtype(dtype: Any) -> jnp.dtype:
    """The dtype statistics are computed in: at least float32, float64 kept."""
    return jnp.promote_types(dtype, jnp.float32)


def feature_axis(ndim: int, axis: int) -> int:
    """Canonical (non-negative) feature axis; the batch axis is always 0."""
    if not isinstance(axis, int):
        raise ValueError(
            f"axis must be a single int (the feature axis), got {axis!r}. "
            "seqnorm-jax layers normalize one feature axis; reshape or transpose the "
            "input so the channels form one axis."
        )
    if ndim < 2:
        raise ValueError(
            f"x must have a batch axis and a feature axis (rank >= 2), got rank {ndim}. "
            "Add a batch axis, e.g. x[None]."
        )
    ax = axis % ndim if -ndim <= axis < ndim else None
    if ax is None or ax == 0:
        raise ValueError(
            f"axis={axis} is not a valid feature axis for an input of rank {ndim}: "
            "axis 0 is the batch axis; use axis=-1 for channels-last inputs."
        )
    return ax


def spatial_axes(ndim: int, axis: int) -> tuple[int, ...]:
    """All axes of an ``ndim`` input except the batch axis 0 and the feature axis."""
    ax = feature_axis(ndim, axis)
    return tuple(i for i in range(1, ndim) if i != ax)


def _to_nc(a: Array, ndim: int, axis: int) -> Array:
    """Squeeze the reduced spatial axes of ``a`` (kept as size 1) to ``(N, C)``."""
    return a.reshape(a.shape[0], a.shape[feature_axis(ndim, axis)])


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _moments_over(x: Array, red: tuple[int, ...], use_fast_variance: bool,
                  shape: tuple[int, ...] | None = None) -> tuple[Array, Array, Array]:
    """``(k, mean, var)`` of ``x`` over the axes ``red`` (kept as size 1), in the
    statistics dtype: ``k`` is the first value along ``red`` and the moments are those
    of ``x - k``.

    Both sums are shifted by ``k``, so they neither cancel nor lose the low digits of
    the mean. (Measured on XLA:CPU: two plain reductions of ``x - k`` beat one variadic
    reduction of both sums, whose loop emitter is 1.3-2x slower than the vectorized
    reduction, see benchmarks/RESULTS.md.) The custom JVP below keeps the backward
    pass lean whatever the forward does. ``shape``: reduce ``x.reshape(shape)`` (a view,
    taken inside so that reverse mode keeps ``x`` itself).
    """
    x = x if shape is None else x.reshape(shape)
    xf = x.astype(stat_dtype(x.dtype))
    index = tuple(slice(0, 1) if i in red else slice(None) for i in range(x.ndim))
    k = lax.stop_gradient(xf[index])
    d = xf - k
    s1 = jnp.mean(d, axis=red, keepdims=True)
    if use_fast_variance:
        var = jnp.maximum(jnp.mean(d * d, axis=red, keepdims=True) - s1 * s1, 0.0)
    else:
        var = jnp.mean(jnp.square(d - s1), axis=red, keepdims=True)
    return k, s1, var


@functools.partial(jax.checkpoint, static_argnums=(4, 5))
def _centered_mean_product(x: Array, k: Array, mean: Array, t: Array,
                           red: tuple[int, ...], shape: tuple[int, ...] | None = None) -> Array:
    """``mean((x - k - mean) * t)`` over ``red`` (of ``x.reshape(shape)``). Checkpointed:
    reverse mode keeps ``x`` and recomputes ``x - k - mean`` in the backward loop instead of
    storing it."""
    x = x if shape is None else x.reshape(shape)
    return jnp.mean(((x.astype(mean.dtype) - k) - mean) * t, axis=red, keepdims=True)


@_moments_over.defjvp
def _moments_over_jvp(red, use_fast_variance, shape, primals, tangents):
    (x,), (dx,) = primals, tangents
    k, mean, var = _moments_over(x, red, use_fast_variance, shape)
    dx = (dx if shape is None else dx.reshape(shape)).astype(mean.dtype)
    # d mean = mean(dx); d var = 2 mean((x - k - mean) dx): what autodiff would derive,
    # written so that the backward pass keeps x, not an x-sized difference. k is a constant.
    dmean = jnp.mean(dx, axis=red, keepdims=True)
    dvar = 2 * _centered_mean_product(x, k, mean, dx, red, shape)
    return (k, mean, var), (jnp.zeros_like(k), dmean, dvar)


class GroupView:
    """An input's layout resolved once: ``x`` seen as groups of samples and of channels.

    ``view(x)`` reshapes ``(N, ..., C, ...)`` (features on ``axis``) to
    ``(G_M, N // G_M, ..., G_C, C // G_C, ...)`` (``"contiguous"`` sample groups) or
    ``(N // G_M, G_M, ...)`` (``"strided"``) without moving data; ``batch_groups=None``
    keeps each sample alone (no batch split) and ``channel_groups=None`` each channel.
    :func:`group_moments` reduces the view straight to the statistics of each group,
    which broadcast against the view in the final elementwise pass: no ``(N, C)``
    intermediate where a layer does not need one.
    """

    def __init__(self, shape: Sequence[int], axis: int, batch_groups: int | None,
                 channel_groups: int | None, grouping: str = "contiguous"):
        _check_grouping(grouping)
        self.shape = tuple(shape)
        self.axis = feature_axis(len(self.shape), axis)
        n, c = self.shape[0], self.shape[self.axis]
        self.pool_batch = batch_groups is not None
        g_m, g_c = (batch_groups or 1), (channel_groups or c)
        if self.pool_batch and g_m == 1:  # the whole batch: no split
            batch, member = (n,), 0
        elif grouping == "strided" and self.pool_batch:
            batch, member = (n // g_m, g_m), 0
        elif self.pool_batch:
            batch, member = (g_m, n // g_m), 1
        else:
            batch, member = (n,), None
        # One channel per group: no channel split (a trailing axis of size 1 would cost
        # XLA:CPU its vectorized loops).
        chan = (g_c, c // g_c) if g_c != c else (c,)
        self.view_shape = batch + self.shape[1:self.axis] + chan + self.shape[self.axis + 1:]
        shift = len(batch) - 1
        self.channel_axis = self.axis + shift  # the G_C axis of the view
        self.channel_width = len(chan)  # the view's axes that hold the channels
        extra = len(chan) - 1
        spatial = [i + shift if i < self.axis else i + shift + extra
                   for i in range(1, len(self.shape)) if i != self.axis]
        members = [member] if member is not None else []
        if extra:
            members.append(self.channel_axis + 1)
        self.reduce = tuple(sorted(members + spatial))
        self._member, self._spatial = member, spatial

    def axes(self, *, batch: bool, channels: bool) -> tuple[int, ...]:
        """The view's axes to reduce for statistics over the spatial axes and, when asked,
        the members of each sample group (``batch``) and of each channel group."""
        red = list(self._spatial)
        if batch and self._member is not None:
            red.append(self._member)
        if channels and self.channel_width == 2:
            red.append(self.channel_axis + 1)
        return tuple(sorted(red))

    def view(self, a: Array) -> Array:
        return a.reshape(self.view_shape)

    def unview(self, a: Array) -> Array:
        return a.reshape(self.shape)

    def channels(self, v: Array) -> Array:
        """A per-channel ``(C,)`` vector broadcast against the view."""
        shape = [1] * len(self.view_shape)
        end = self.channel_axis + self.channel_width
        shape[self.channel_axis:end] = self.view_shape[self.channel_axis:end]
        return v.reshape(shape)

    def per_channel(self, a: Array) -> Array:
        """Group statistics (dims kept) averaged over the sample groups, as ``(C,)``."""
        chan = range(self.channel_axis, self.channel_axis + self.channel_width)
        a = jnp.mean(a, axis=tuple(i for i in range(a.ndim) if i not in chan))
        width = self.view_shape[self.channel_axis:self.channel_axis + self.channel_width]
        return jnp.broadcast_to(a, width).reshape(self.shape[self.axis])


def group_moments(x: Array, view: GroupView, *, use_fast_variance: bool = True,
                  axes: tuple[int, ...] | None = None) -> tuple[Array, Moments]:
    """The statistics of each group of ``view``, as ``(k, moments of x - k)`` (dims kept).

    One reduction of ``x`` itself: ``k`` is the group's first value (a constant, no
    gradient), so ``x - k`` is exact and neither sum cancels when ``|mean| >> std``.
    ``axes`` (from :meth:`GroupView.axes`) picks a finer granularity than the view's.
    """
    red = view.reduce if axes is None else axes
    k, mean, var = _moments_over(x, red, use_fast_variance, view.view_shape)
    return lax.stop_gradient(k), Moments(mean, var)


@functools.partial(jax.checkpoint, static_argnums=(4, 5, 6))
def moments_of_affine(x: Array, k: Array, a: Array, b: Array, red: tuple[int, ...],
                      use_fast_variance: bool = True,
                      shape: tuple[int, ...] | None = None) -> Moments:
    """Moments over ``red`` of ``z = (x - k) * a + b`` (on ``x.reshape(shape)``), an already
    normalized (order-1) map of ``x``, without keeping ``z``: checkpointed, so the backward
    pass recomputes it from ``x`` (the second step of SeqNorm and GN+ on dense inputs)."""
    xv = x if shape is None else x.reshape(shape)
    z = (xv.astype(a.dtype) - k) * a + b
    # Shifted by the group's first value of z, for the same reason as _moments_over: a
    # group of z whose spread is much smaller than its mean (two close channels).
    index = tuple(slice(0, 1) if i in red else slice(None) for i in range(z.ndim))
    d = z - lax.stop_gradient(z[index])
    s1 = jnp.mean(d, axis=red, keepdims=True)
    if use_fast_variance:
        var = jnp.maximum(jnp.mean(d * d, axis=red, keepdims=True) - s1 * s1, 0.0)
    else:
        var = jnp.mean(jnp.square(d - s1), axis=red, keepdims=True)
    return Moments(lax.stop_gradient(z[index]) + s1, var)


def sample_moments(x: Array, *, axis: int = -1, use_fast_variance: bool = True,
                   mask: Array | None = None) -> Moments:
    """Per-sample, per-channel moments over the spatial axes of ``x``.

    Args:
      x: input of shape ``(N, ..., C)`` (the feature axis is ``axis``); every axis
        other than 0 and ``axis`` is reduced.
      axis: the feature axis.
      use_fast_variance: if True, one pass over ``x`` with sums shifted by the
        first spatial value of each ``(n, c)`` map (fast and stable unless that
        value is an outlier far from the map's mean); if False, two passes
        (exact mean first, then squared deviations), stable for any data.
      mask: optional boolean array broadcastable to ``x`` (flax's ``mask``): the
        moments are taken over the entries where it is True only; the others
        may hold anything, NaN included. A map with no entry has mean and
        variance 0 and weight 0 (:func:`sample_counts`).

    Returns:
      ``Moments`` of shape ``(N, C)`` in :func:`stat_dtype` of ``x``. With no
      spatial axes (dense input) the mean is ``x`` and the variance is zero.
    """
    k, m = sample_moments_about(x, axis=axis, use_fast_variance=use_fast_variance, mask=mask)
    return Moments(k + m.mean, m.var)


def sample_moments_about(x: Array, *, axis: int = -1, use_fast_variance: bool = True,
                         mask: Array | None = None) -> tuple[Array, Moments]:
    """:func:`sample_moments` as ``(k, moments of x - k)``: ``k`` is an ``(N, C)`` constant
    near each map's values (its first value; under a mask its masked mean) and carries
    no gradient. ``x - k`` is exact in the input's precision, so means kept relative to
    ``k`` (and pooled with ``offset=k``, :func:`pool`) keep every digit when
    ``|mean| >> std``, where ``k + mean`` would round them away.
    """
    red = spatial_axes(x.ndim, axis)
    sdt = stat_dtype(x.dtype)
    if not red:
        xf = x.astype(sdt) if mask is None else jnp.where(mask, x, 0).astype(sdt)
        k = lax.stop_gradient(xf)
        return k, Moments(xf - k, jnp.zeros_like(xf))
    if mask is not None:
        k, mean, var = _masked_spatial_moments(x, jnp.broadcast_to(mask, x.shape), axis,
                                               use_fast_variance)
    else:
        k, mean, var = _moments_over(x, red, use_fast_variance)
    nc = lambda a: _to_nc(a, x.ndim, axis)
    return lax.stop_gradient(nc(k)), Moments(nc(mean), nc(var))


def sample_counts(mask: Array | None, shape: tuple[int, ...], axis: int = -1) -> Array | None:
    """How many entries of each ``(n, c)`` map a ``mask`` keeps: ``(N, C)``, or None without a mask.

    These are the weights of a count-weighted :func:`merge` of masked moments.
    """
    if mask is None:
        return None
    red = spatial_axes(len(shape), axis)
    w = jnp.broadcast_to(mask, shape).astype(jnp.float32)
    return _to_nc(jnp.sum(w, axis=red, keepdims=True), len(shape), axis)


def _masked_spatial_moments(x: Array, w: Array, axis: int, use_fast_variance: bool):
    """:func:`_moments_over` (spatial axes) over the entries where ``w`` is True (NaN-safe elsewhere)."""
    red = spatial_axes(x.ndim, axis)
    sdt = stat_dtype(x.dtype)
    count = jnp.sum(w, axis=red, keepdims=True, dtype=sdt)
    safe = jnp.maximum(count, 1)
    xf = jnp.where(w, x, 0).astype(sdt)
    # Shift: the first kept entry of each map would need a search; the map's masked
    # mean from a first pass is as good and costs one read.
    k = lax.stop_gradient(jnp.sum(xf, axis=red, keepdims=True) / safe)
    d = jnp.where(w, xf - k, 0)
    s1 = jnp.sum(d, axis=red, keepdims=True) / safe
    if use_fast_variance:
        var = jnp.maximum(jnp.sum(d * d, axis=red, keepdims=True) / safe - s1 * s1, 0.0)
    else:
        var = jnp.sum(jnp.where(w, jnp.square(d - s1), 0), axis=red, keepdims=True) / safe
    return k, s1, var


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
        equal weights when None.
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


def divisors(n: int) -> list[int]:
    """The divisors of ``n``: the group counts that split ``n`` items evenly (for messages)."""
    return [d for d in range(1, n + 1) if n % d == 0]


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


def _check_grouping(grouping: str) -> None:
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}.")


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
    return _pool(m, batch_groups, channel_groups, grouping, center, axis_name,
                 axis_index_groups, weight, relative_to, offset, with_target=False)[0]


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
    return _pool(m, batch_groups, channel_groups, grouping, None, axis_name,
                 axis_index_groups, weight, relative_to, offset, with_target=True)


def _pool(m, batch_groups, channel_groups, grouping, center, axis_name, axis_index_groups,
          weight, relative_to, offset, with_target):
    """:func:`pool` / :func:`pool_with_target`: ``(pooled, target or None)``."""
    _check_grouping(grouping)
    n, c = m.mean.shape
    g_c = c if channel_groups is None else channel_groups
    g_m = n if batch_groups is None else batch_groups
    full = lambda a: None if a is None else jnp.broadcast_to(a, (n, c))
    center, relative_to, weight, offset = (full(a) for a in (center, relative_to, weight,
                                                              offset))
    if axis_name is not None and batch_groups is not None:
        n_dev, position, members = _device_group(axis_name, axis_index_groups)
        if g_m % n_dev == 0:
            # Groups lie within shards: pool locally, no communication for the output.
            local = _local_groups(n, g_m, n_dev, grouping, axis_name)
            pooled, target = _pool(m, local, g_c, grouping, center, None, None, weight,
                                   relative_to, offset, with_target)
            if target is not None:
                both = cross_device_mean(jnp.stack(target), axis_name, axis_index_groups)
                target = Moments(both[0], both[1])
            return pooled, target
        # Each group spans n_dev // g_m shards: one all-reduce, count-weighted merge.
        ref, delta, var = _gathered_groups(m, g_m, g_c, grouping, axis_name, n_dev, members,
                                           center, weight, offset)
        mine = lambda a: _ungroup(lax.dynamic_index_in_dim(
            a, position // (n_dev // g_m), axis=0, keepdims=False).reshape(1, 1, g_c, 1),
            n, c, "contiguous")
        pooled = Moments(_relative(mine(ref), mine(delta), relative_to), mine(var))
        target = None
        if with_target:
            target = Moments(*(_channels(jnp.mean(a, axis=0)[:, None], c)
                               for a in (ref + delta, var)))
        return pooled, target
    view = lambda a: None if a is None else _group_view(a, g_m, g_c, grouping)
    ref, delta, var = _merge(Moments(view(m.mean), view(m.var)), (1, 3), weight=view(weight),
                             center=view(center), offset=view(offset))
    un = lambda a: _ungroup(a, n, c, grouping)
    pooled = Moments(_relative(un(ref), un(delta), relative_to), un(var))
    target = None
    if with_target:
        target = Moments(*(_channels(jnp.mean(a, axis=(0, 1)), c) for a in (ref + delta, var)))
    return pooled, target


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


def _gathered_groups(m, g_m, g_c, grouping, axis_name, n_dev, members, center=None,
                     weight=None, offset=None) -> tuple[Array, Array, Array]:
    """Statistics ``(G_M, G_C)`` of every group of the global batch when each group spans
    ``n_dev // g_m`` shards, as ``(ref, delta, var)`` (see :func:`_merge`): one gather
    (:func:`_gather`) of the per-shard ``(ref, delta, var, count)``, then a count-weighted
    merge of each group's shards on every device."""
    _check_spanning(g_m, n_dev, grouping, axis_name)
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
    # Each shard's mean relative to the first shard's reference of its group.
    ref0 = gathered[:, :1, 0]
    rel = (gathered[:, :, 0] - ref0) + gathered[:, :, 1]
    # With a center, each shard's variance is already taken around it: average the
    # variances without a between-shard term (center each shard on its own mean).
    r, d, v = _merge(Moments(rel, gathered[:, :, 2]), 1, weight=gathered[:, :, 3],
                     center=None if center is None else rel)
    return ref0[:, 0], (r + d)[:, 0], v[:, 0]


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


def expand(a: Array, ndim: int, axis: int) -> Array:
    """Broadcast an ``(N, C)`` (or ``(C,)``) per-sample, per-channel array against an input of rank ``ndim``."""
    ax = feature_axis(ndim, axis)
    if a.ndim == 1:
        a = a[None]
    shape = [1] * ndim
    shape[0], shape[ax] = a.shape
    return a.reshape(shape)


def mix(a: Moments, b: Moments, weight_b: Array | float) -> Moments:
    """Moments of the mixture ``(1 - w) * A + w * B`` of two distributions.

    ``mean = (1-w) a.mean + w b.mean`` and ``var = (1-w) a.var + w b.var +
    w (1-w) (a.mean - b.mean)**2``: the same as blending the raw second moments
    (``E[x^2]``) and subtracting the squared mean, without the cancellation.
    This is inference example weighing (Four Things, paper 002) with ``A`` the
    running statistics and ``B`` the example's own.
    """
    w = jnp.asarray(weight_b, a.mean.dtype)
    mean = (1 - w) * a.mean + w * b.mean
    var = (1 - w) * a.var + w * b.var + w * (1 - w) * jnp.square(a.mean - b.mean)
    return Moments(mean, var)


def affine(m: Moments, scale: Array, shift: Array) -> Moments:
    """Moments of ``x * scale + shift`` given those of ``x`` (same broadcasting)."""
    return Moments(m.mean * scale + shift, m.var * jnp.square(scale))


def ema(running: Array, value: Array, momentum: float) -> Array:
    """Exponential moving average: ``momentum * running + (1 - momentum) * value``."""
    return momentum * running + (1 - momentum) * value.astype(running.dtype)
