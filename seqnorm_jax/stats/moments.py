"""Moments: every mean and variance of a normalization set starts here.

The per-sample, per-channel spatial moments of ``x`` (:func:`sample_moments`, and
:func:`sample_moments_about` relative to a per-(n, c) offset), the statistics of
whole groups straight from ``x`` (:class:`GroupView`, :func:`group_moments`), the
moments of a normalized ``x`` recomputed from ``x`` (:func:`moments_of_affine`),
and the small algebra of moments (:func:`mix`, :func:`map_moments`, :func:`ema`).
See :mod:`seqnorm_jax.stats` for the numerical conventions.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from seqnorm_jax import checks

Array = jax.Array

GROUPINGS = ("contiguous", "strided")
"""How samples are assigned to ghost batches: contiguous runs or strided (Keras 2's
``virtual_batch_size``)."""


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


# Plain sums are used where they are exact enough: every group's squared mean at most this
# many times its variance, so E[v^2] - E[v]^2 loses at most ~5 bits more than the shifted
# sums (float32: relative variance error ~1e-5 for typical group sizes, see _moments_of).
PLAIN_SUMS_MAX_MEAN2_OVER_VAR = 16.0


def _first(v: Array, red: tuple[int, ...]) -> Array:
    """The first value of each group of ``v`` along ``red`` (dims kept), as a constant."""
    index = tuple(slice(0, 1) if i in red else slice(None) for i in range(v.ndim))
    return lax.stop_gradient(v[index])


def _shifted_moments(v: Array, red: tuple[int, ...], use_fast_variance: bool):
    """``(k, mean of v - k, var)`` over ``red``, with ``k`` each group's first value: both
    sums are shifted, so they neither cancel nor lose the low digits of the mean."""
    k = _first(v, red)
    d = v - k
    s1 = jnp.mean(d, axis=red, keepdims=True)
    if use_fast_variance:
        var = jnp.maximum(jnp.mean(d * d, axis=red, keepdims=True) - s1 * s1, 0.0)
    else:
        var = jnp.mean(jnp.square(d - s1), axis=red, keepdims=True)
    return k, s1, var


def _plain_mean(a: Array, red: tuple[int, ...]) -> Array:
    """``mean(a, red)`` (dims kept) in the order of :func:`reduce_in_order`. Plain sums
    only: the shifted sums of one group share their ``k``."""
    return reduce_in_order(jnp.mean, a, red)


def reduce_in_order(reduce, a: Array, red: tuple[int, ...]) -> Array:
    """``reduce(a, axis=red, keepdims=True)`` (``jnp.sum`` or ``jnp.mean``) with the leading
    axes of ``red`` reduced first and the last axis after, when both are reduced: XLA:CPU's
    vectorized reductions keep the last axis, and reduce a view such as
    ``(G_M, N/G_M, G_C, C/G_C)`` over axes 1 and 3 in one loop 6x slower than in these
    two steps (dense BatchGroupNorm, benchmarks/RESULTS.md)."""
    last = a.ndim - 1
    if last in red and len(red) > 1:
        a = reduce(a, axis=tuple(i for i in red if i != last), keepdims=True)
        red = (last,)
    return reduce(a, axis=red, keepdims=True)


def _plain_then_shifted(v: Array, red: tuple[int, ...]):
    """:func:`_shifted_moments` (fast variance) from the plain sums of ``v`` and ``v * v``
    when every group is well conditioned, else from the shifted sums: XLA:CPU reduces
    ``v`` and ``v * v`` straight from ``v``, but writes ``v - k`` out once and reads it
    back for the shifted sums (1.2-1.5x a training forward, benchmarks/RESULTS.md). The
    check costs a few group-sized operations; the shifted pass runs only when a group
    fails it."""
    m = _plain_mean(v, red)
    var = _plain_mean(v * v, red) - m * m
    well = jnp.all(m * m <= PLAIN_SUMS_MAX_MEAN2_OVER_VAR * var)  # False for NaN too
    k = _first(v, red)
    return lax.cond(well, lambda: (k, m - k, var),
                    lambda: _shifted_moments(v, red, True))


def plain_sums_first() -> bool:
    """Whether XLA:CPU tries the plain sums first (:func:`_moments_of`): in a process with one
    CPU device. With several, ``x`` may be sharded over them and the check of all groups
    would add a collective, so the shifted sums run, as on accelerators (the collectives
    pinned by ``tests/test_hlo_collectives.py``)."""
    return jax.device_count("cpu") == 1


def _sums(use_fast_variance: bool) -> str:
    """How :func:`_moments_of` sums: ``"two-pass"``, ``"shifted"`` or ``"plain-first"``. A
    static argument of the traced functions, so that each way has its own trace."""
    if not use_fast_variance:
        return "two-pass"
    return "plain-first" if plain_sums_first() else "shifted"


def _moments_of(v: Array, red: tuple[int, ...], sums: str):
    """``(k, mean of v - k, var)`` over the axes ``red`` of ``v`` (dims kept), where ``k``
    is each group's first value, a constant near the group's values; ``sums`` from
    :func:`_sums`.

    The shifted sums stay exact when ``|mean| >> std``, where ``E[v^2] - E[v]^2`` (flax's
    fast variance) cancels. On XLA:CPU (one CPU device, :func:`plain_sums_first`), with the
    fast variance, the plain sums are taken first and kept when every group has
    ``mean^2 <= 16 var`` (:func:`_plain_then_shifted`; their error then is at most ~50
    float32 roundings of the variance, against ~3 for the shifted sums). GPU and TPU fuse
    ``v - k`` into the reduction and always shift.
    """
    if sums != "plain-first":
        return _shifted_moments(v, red, sums == "shifted")
    return lax.platform_dependent(
        cpu=lambda: _plain_then_shifted(v, red),
        default=lambda: _shifted_moments(v, red, True))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _moments_over(x: Array, red: tuple[int, ...], sums: str,
                  shape: tuple[int, ...] | None = None) -> tuple[Array, Array, Array]:
    """:func:`_moments_of` ``x`` in the statistics dtype. The custom JVP below keeps the
    backward pass lean whatever the forward does. ``shape``: reduce ``x.reshape(shape)``
    (a view, taken inside so that reverse mode keeps ``x`` itself).
    """
    x = x if shape is None else x.reshape(shape)
    return _moments_of(x.astype(stat_dtype(x.dtype)), red, sums)


@functools.partial(jax.checkpoint, static_argnums=(4, 5))
def _centered_mean_product(x: Array, k: Array, mean: Array, t: Array,
                           red: tuple[int, ...], shape: tuple[int, ...] | None = None) -> Array:
    """``mean((x - k - mean) * t)`` over ``red`` (of ``x.reshape(shape)``). Checkpointed:
    reverse mode keeps ``x`` and recomputes ``x - k - mean`` in the backward loop instead of
    storing it."""
    x = x if shape is None else x.reshape(shape)
    return jnp.mean(((x.astype(mean.dtype) - k) - mean) * t, axis=red, keepdims=True)


@_moments_over.defjvp
def _moments_over_jvp(red, sums, shape, primals, tangents):
    (x,), (dx,) = primals, tangents
    k, mean, var = _moments_over(x, red, sums, shape)
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
        checks.choice(grouping, GROUPINGS, "grouping")
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
        self.batch_groups, self.grouping = (g_m if self.pool_batch else None), grouping

    def axes(self, *, batch: bool, channels: bool) -> tuple[int, ...]:
        """The view's axes to reduce for statistics over the spatial axes and, when asked,
        the members of each sample group (``batch``) and of each channel group."""
        red = list(self._spatial)
        if batch and self._member is not None:
            red.append(self._member)
        if channels and self.channel_width == 2:
            red.append(self.channel_axis + 1)
        return tuple(sorted(red))

    def over_blocks(self, x: Array, red: tuple[int, ...], moments) -> tuple[Array, Array, Array]:
        """``moments(red, shape, blocked)`` -> ``(k, mean relative to k, var)`` over the axes
        ``red`` of ``x.reshape(shape)``, with each sample group cut into the blocks that lie
        within one device's shard when it spans several devices of a batch sharded under
        ``jax.jit`` (:func:`~seqnorm_jax.stats.pooling.spanning_blocks`): each block is
        shifted by its own values (no communication) and the blocks are merged from one
        all-reduce (:func:`~seqnorm_jax.stats.pooling.merge_blocks`). ``blocked(a)``
        reshapes an array that broadcasts against the view to broadcast against
        ``shape``. Without blocks, ``moments(red, self.view_shape, identity)``."""
        from seqnorm_jax.stats.pooling import merge_blocks, spanning_blocks  # imports us

        blocks = 1
        if self.batch_groups is not None and self._member in red:
            blocks = spanning_blocks(x, self.batch_groups, self.grouping)
        if blocks == 1:
            return moments(red, self.view_shape, lambda a: a)
        lead = 1 if self._member == 0 else 2  # the view's batch axes: (N,) or (G_M, N/G_M)
        g_m, n = self.batch_groups, self.shape[0]
        batch = (g_m, blocks, n // (g_m * blocks))

        def blocked(a: Array) -> Array:
            full = a.shape[:lead] == self.view_shape[:lead]
            return a.reshape((batch if full else (a.shape[0], 1, 1)) + a.shape[lead:])

        shape = batch + self.view_shape[lead:]
        red_b = tuple(sorted(2 if i == self._member else i - lead + 3 for i in red))
        k, mean, var = merge_blocks(*moments(red_b, shape, blocked), None, 1)
        kept = tuple(1 if i in red else d for i, d in enumerate(self.view_shape))
        return tuple(a.reshape(kept) for a in (k, mean, var))

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
    sums = _sums(use_fast_variance)
    k, mean, var = view.over_blocks(
        x, red, lambda red, shape, blocked: _moments_over(x, red, sums, shape))
    return lax.stop_gradient(k), Moments(mean, var)


def moments_of_affine(x: Array, k: Array, a: Array, b: Array, red: tuple[int, ...],
                      use_fast_variance: bool = True,
                      shape: tuple[int, ...] | None = None, *,
                      view: GroupView | None = None) -> Moments:
    """Moments over ``red`` of ``z = (x - k) * a + b`` (on ``x.reshape(shape)``, or on
    ``view``'s view of ``x``, whose sample groups may then span devices: see
    :meth:`GroupView.over_blocks`), an already normalized (order-1) map of ``x``, without
    keeping ``z``: checkpointed, so the backward pass recomputes it from ``x`` (the second
    step of SeqNorm and GN+ on dense inputs)."""
    sums = _sums(use_fast_variance)
    if view is None:
        kz, s1, var = _moments_of_affine(x, k, a, b, red, sums, shape)
    else:
        kz, s1, var = view.over_blocks(x, red, lambda red, shape, blocked: _moments_of_affine(
            x, *(blocked(v) for v in (k, a, b)), red, sums, shape))
    return Moments(kz + s1, var)


@functools.partial(jax.checkpoint, static_argnums=(4, 5, 6))
def _moments_of_affine(x: Array, k: Array, a: Array, b: Array, red: tuple[int, ...], sums: str,
                       shape: tuple[int, ...] | None) -> tuple[Array, Array, Array]:
    xv = x if shape is None else x.reshape(shape)
    z = (xv.astype(a.dtype) - k) * a + b
    # Shifted like _moments_over's sums, for the same reason: a group of z whose spread is
    # much smaller than its mean (two close channels).
    return _moments_of(z, red, sums)


def sample_moments(x: Array, *, axis: int = -1, use_fast_variance: bool = True,
                   mask: Array | None = None) -> Moments:
    """Per-sample, per-channel moments over the spatial axes of ``x``.

    Args:
      x: input of shape ``(N, ..., C)`` (the feature axis is ``axis``); every axis
        other than 0 and ``axis`` is reduced.
      axis: the feature axis.
      use_fast_variance: if True, one pass over ``x`` with sums shifted by the
        first spatial value of each ``(n, c)`` map (fast and stable unless that
        value is an outlier far from the map's mean; on one XLA:CPU device the
        plain sums when every map is well conditioned, see :func:`_moments_of`);
        if False, two passes
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
        k, mean, var = _moments_over(x, red, _sums(use_fast_variance))
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


def map_moments(m: Moments, scale: Array, shift: Array) -> Moments:
    """The moments of ``x * scale + shift`` given those of ``x`` (same broadcasting)."""
    return Moments(m.mean * scale + shift, m.var * jnp.square(scale))


def ema(running: Array, value: Array, momentum: float) -> Array:
    """Exponential moving average: ``momentum * running + (1 - momentum) * value``."""
    return momentum * running + (1 - momentum) * value.astype(running.dtype)
