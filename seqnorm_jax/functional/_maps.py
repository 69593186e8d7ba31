"""From statistics to the output: normalization maps, the sets they come from, one pass.

A normalization is a per-(n, c) map ``x -> (x - k) * a + b`` (a :data:`ScaleShift`
``(a, b)`` around a center ``k`` fixed for the whole layer: the sample's own offset
when moments are computed, else the running mean; writing maps around ``k`` avoids
the cancellation of two large terms when ``|mean| >> std``). This module turns
pooled statistics into such maps (:func:`normalizer`, :func:`compose`, :func:`blend`),
pools the statistics of batch and sample sets (:func:`batch_set`, :func:`sample_set`),
and applies the final map with gamma and beta in one elementwise pass over ``x``
(:func:`finish`, or :func:`finish_view` for statistics kept per group).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from seqnorm_jax import stats
from seqnorm_jax.functional._call import Call, is_zero
from seqnorm_jax.stats import Moments

Array = jax.Array
# (a, b): the per-(n, c) map x -> (x - k) * a + b (or x * a + b for a centered input).
ScaleShift = tuple[Array, Array]


def normalizer(m: Moments, epsilon: float) -> ScaleShift:
    """The map ``x -> (x - mean) / sqrt(var + eps)`` as ``(a, b)``, for moments of ``x - k``.

    ``m.mean`` is the mean *relative to the layer's center* ``k``, or the plain mean
    where the input of the map is centered at 0 already.
    """
    a = lax.rsqrt(m.var + epsilon)
    return a, -m.mean * a


def centered(m: Moments, k: Array) -> Moments:
    """Moments of ``x - k``: the input of the maps above."""
    return Moments(m.mean - k, m.var)


def compose(first: ScaleShift, second: ScaleShift) -> ScaleShift:
    """``second(first(x))``."""
    return first[0] * second[0], first[1] * second[0] + second[1]


def blend(s: Array, f: ScaleShift, g: ScaleShift) -> ScaleShift:
    """``s * f(x) + (1 - s) * g(x)``."""
    return s * f[0] + (1 - s) * g[0], s * f[1] + (1 - s) * g[1]


# ----------------------------------------------------------------------------
# the statistics of normalization sets
# ----------------------------------------------------------------------------


def batch_set(
    call: Call,
    m: Moments | None,
    *,
    batch_groups: int,
    channel_groups: int | None,
    grouping: str = "contiguous",
    k: Array | None = None,
    offset: Array | None = None,
) -> tuple[Moments, Moments | None]:
    """Statistics of a set over the batch: pooled over sample groups and channel groups.

    Training: pool the batch moments (count-weighted under the call's mask), and return
    the values for the running statistics (the average over sample groups; across
    devices too). Inference: the running statistics, blended with the example's own
    moments by ``example_weight``, pooled over the channel groups. ``m`` holds the
    moments of ``x - offset`` when ``offset`` is given
    (:func:`stats.sample_moments_about`); the returned mean is relative to ``k`` when
    given.
    """
    if call.training:
        return stats.pool_with_target(
            m, batch_groups=batch_groups, channel_groups=channel_groups, grouping=grouping,
            axis_name=call.axis_name, axis_index_groups=call.axis_index_groups,
            weight=call.weight, relative_to=k, offset=offset,
        )
    src = call.running
    if not is_zero(call.example_weight):
        own = m if offset is None else Moments(offset + m.mean, m.var)
        src = stats.mix(src, own, call.example_weight)
    if channel_groups is not None and channel_groups != src.mean.shape[1]:
        return stats.pool(src, batch_groups=None, channel_groups=channel_groups,
                          relative_to=k), None
    return (src if k is None else centered(src, k)), None


def sample_set(m: Moments, channel_groups: int | None, weight: Array | None = None,
               k: Array | None = None, offset: Array | None = None) -> Moments:
    """Statistics of a per-sample set (group / layer / instance norm): ``m`` pooled over
    channel groups (as :func:`batch_set` for ``weight``, ``k`` and ``offset``)."""
    return stats.pool(m, batch_groups=None, channel_groups=channel_groups, weight=weight,
                      relative_to=k, offset=offset)


# ----------------------------------------------------------------------------
# the one elementwise pass
# ----------------------------------------------------------------------------


def _with_affine(ab: ScaleShift, scale, bias, channels=lambda v: v) -> ScaleShift:
    """``ab`` followed by gamma and beta (``channels`` lays a ``(C,)`` vector out as ``a``)."""
    a, b = ab
    if scale is not None:
        scale = channels(jnp.asarray(scale, a.dtype))
        a, b = a * scale, b * scale
    if bias is not None:
        b = b + channels(jnp.asarray(bias, a.dtype))
    return a, b


@functools.partial(jax.checkpoint, static_argnums=(4, 5))
def _affine_pass(x: Array, k: Array, a: Array, b: Array, axis: int, dtype) -> Array:
    """The one elementwise pass ``(x - k) * a + b`` over ``x``, in the statistics dtype.

    Checkpointed: the backward pass recomputes ``x - k`` from ``x`` in its fused
    loops instead of storing it, so what autodiff keeps is ``x`` and ``(N, C)``
    arrays.
    """
    ex = lambda v: stats.expand(v, x.ndim, axis)
    y = (x.astype(a.dtype) - ex(k)) * ex(a) + ex(b)
    return y.astype(dtype)


def computed_first(*maps: Array) -> tuple[Array, ...]:
    """``maps`` (small arrays the output pass broadcasts) computed before that pass.

    On XLA:CPU the arithmetic that makes a map is otherwise fused into the x-sized output
    loop and redone for every element (an optimization barrier does not stop it); for
    GN+'s inference, whose map blends two normalizations with gamma and beta, that is the
    larger part of the loop. A conditional does stop it: both branches return the maps'
    values unchanged (the second, taken when the first map has a non-finite entry,
    through an exact identity XLA does not fold), so the loop reads the computed maps
    (GN+'s inference at cifar-64: 1.72-1.75x -> 1.30-1.44x flax BatchNorm; SeqNorm's
    simpler map gained nothing; ``benchmarks/RESULTS.md``). Other backends get the maps as
    they are (XLA:GPU reads a conditional's predicate on the host)."""
    def on_cpu():
        same = lambda v: jnp.where(jnp.isfinite(v), v + 0 * v, v)  # v, exactly
        return lax.cond(jnp.all(jnp.isfinite(maps[0])), lambda: maps,
                        lambda: tuple(same(v) for v in maps))
    return lax.platform_dependent(cpu=on_cpu, default=lambda: maps)


def finish(call: Call, x: Array, ab: ScaleShift, k: Array, scale, bias, *,
           maps_first: bool = False) -> Array:
    """Apply gamma and beta, then the single elementwise pass ``(x - k) * a + b``
    (``maps_first``: the maps computed before it, :func:`computed_first`).

    With a mask, the entries it drops are normalized like the others (as flax does)
    but through a copy of the map that carries no gradient to the statistics or the
    parameters, and the kept entries never read them: a NaN there stays there.
    """
    a, b = _with_affine(ab, scale, bias)
    k = jnp.asarray(k, a.dtype)
    if maps_first:
        k, a, b = computed_first(k, a, b)
    if call.mask is None:
        return _affine_pass(x, k, a, b, call.axis, call.dtype)
    w = jnp.broadcast_to(call.mask, x.shape)
    kept = _affine_pass(jnp.where(w, x, stats.expand(k, x.ndim, call.axis).astype(x.dtype)),
                        k, a, b, call.axis, call.dtype)
    dropped = _affine_pass(x, k, lax.stop_gradient(a), lax.stop_gradient(b), call.axis,
                           call.dtype)
    return jnp.where(w, kept, dropped)


def _folds_small(a: Array, view: stats.GroupView, scale, bias) -> bool:
    """Whether gamma and beta folded into a map of ``a``'s shape make a map smaller than
    ``x`` (measured: folding into a ``(G_M, C)`` map is faster than a second map, folding
    into an ``(N, C)`` one on a dense input 1.2x slower)."""
    if scale is None and bias is None:
        return True
    channels = view.channels(jnp.asarray(scale if scale is not None else bias)).shape
    return math.prod(jnp.broadcast_shapes(a.shape, channels)) < math.prod(view.shape)


@functools.partial(jax.checkpoint, static_argnums=(6, 7))
def _view_pass(x: Array, k: Array, a: Array, b: Array, a2, b2, dtype,
               shape: tuple[int, ...]) -> Array:
    """:func:`_affine_pass` on ``x.reshape(shape)``, a :class:`~seqnorm_jax.stats.GroupView`
    of ``x`` whose group statistics broadcast against it as they are:
    ``((x - k) * a + b) * a2 + b2`` (the second map, of another granularity, only for
    two-step layers). Returns ``x``'s shape; the view is taken inside, so that reverse mode
    keeps ``x`` itself."""
    y = (x.reshape(shape).astype(a.dtype) - k) * a + b
    if a2 is not None:
        y = y * a2 + b2
    return y.astype(dtype).reshape(x.shape)


def finish_view(call: Call, x: Array, view: stats.GroupView, ab: ScaleShift, k: Array, scale,
                bias, second: ScaleShift | None = None) -> Array:
    """:func:`finish` for statistics kept in the shape of ``view``'s groups; ``second`` is
    a map applied after ``ab`` (gamma and beta go into the last map). Per-sample groups of
    channels (GroupNorm on dense inputs) keep gamma and beta as a second map: folded into
    ``ab`` they would make an ``(N, C)`` map, as large as ``x``, and its gradient a
    reduction over the split channel axis."""
    if second is None and _folds_small(ab[0], view, scale, bias):
        (a, b), (a2, b2) = _with_affine(ab, scale, bias, view.channels), (None, None)
    elif second is None:
        one = jnp.ones((), ab[0].dtype)
        (a, b), (a2, b2) = ab, _with_affine((one, 0 * one), scale, bias, view.channels)
    else:
        (a, b), (a2, b2) = ab, _with_affine(second, scale, bias, view.channels)
    return _view_pass(x, k.astype(a.dtype), a, b, a2, b2, call.dtype, view.view_shape)


def affine_map(view: stats.GroupView, ab: ScaleShift | None, params) -> ScaleShift:
    """``ab`` (None: the identity) followed by gamma and beta, ``params = (scale, bias)``
    laid out as the view's channels; ``(None, None)`` when there is nothing to apply."""
    scale, bias = params
    if ab is None:
        if scale is None and bias is None:
            return None, None
        given = scale if scale is not None else bias
        one = jnp.ones(view.channels(jnp.zeros(view.shape[view.axis])).shape,
                       stats.stat_dtype(jnp.result_type(given)))
        ab = (one, jnp.zeros_like(one))
    return _with_affine(ab, scale, bias, view.channels)


def fused(call: Call, x: Array, view: stats.GroupView, params, first, second, red1,
          red2=None) -> tuple[Array, Array, Moments, Moments | None]:
    """:func:`stats.normalize` of ``x`` seen through ``view``, in the call's dtype."""
    return stats.normalize(x, params, first, second, shape=view.view_shape, red1=red1,
                           red2=red2, use_fast_variance=call.use_fast_variance,
                           dtype=call.dtype)


def fused_two_steps(call: Call, x: Array, view: stats.GroupView, params, first_over_batch: bool,
                    second) -> tuple[Array, Array, Moments, Moments]:
    """SeqNorm's and GN+'s two steps on dense inputs (:func:`stats.normalize`): the first
    normalization over the sample group's members when ``first_over_batch``, else over the
    channel group's; ``second(moments of its output, params) -> (a2, b2)`` the second
    map, gamma and beta included. Returns ``(y, k, first statistics relative to k,
    second statistics)``."""
    over_batch = view.axes(batch=True, channels=False)
    over_channels = view.axes(batch=False, channels=True)
    red1, red2 = ((over_batch, over_channels) if first_over_batch
                  else (over_channels, over_batch))
    return fused(call, x, view, params, lambda m, p: normalizer(m, call.epsilon), second,
                 red1, red2)


# ----------------------------------------------------------------------------
# two normalizations in a row, straight from x (SeqNorm and GN+ on dense inputs)
# ----------------------------------------------------------------------------


def two_steps(call: Call, x: Array, view: stats.GroupView,
              first_over_batch: bool) -> tuple[Array, ScaleShift, Moments, Moments]:
    """The two normalizations of SeqNorm and GN+ straight from ``x`` (dense inputs, where
    per-sample moments would be as large as ``x``): the first step's statistics from
    one reduction of ``x`` (over the sample group's members when ``first_over_batch``,
    else over the channel group's), the second's from one more reduction of the first
    step's output, recomputed from ``x``. Returns ``(k, first map, first statistics
    relative to k, second statistics)``."""
    k, st1 = stats.group_moments(x, view, use_fast_variance=call.use_fast_variance,
                                 axes=view.axes(batch=first_over_batch,
                                                channels=not first_over_batch))
    f1 = normalizer(st1, call.epsilon)
    st2 = stats.moments_of_affine(x, k, *f1,
                                  view.axes(batch=not first_over_batch,
                                            channels=first_over_batch),
                                  call.use_fast_variance, view=view)
    return k, f1, st1, st2


def inference_two_steps(call: Call, x: Array, view: stats.GroupView,
                        group_first: bool) -> tuple[Array, ScaleShift, ScaleShift]:
    """Plain inference of SeqNorm and GN+ on dense inputs: the per-sample group step from
    one reduction of ``x`` (or of the running-statistics step's output, recomputed from
    ``x``) and the step with running statistics as a fixed per-channel map. Returns
    ``(k, first map, second map)`` for :func:`finish_view`. (Feature maps go through
    per-sample moments, cheaper on XLA:CPU than a split channel axis.)"""
    ch = lambda a: view.channels(a[0])
    running = call.running
    run = normalizer(Moments(ch(running.mean), ch(running.var)), call.epsilon)
    if group_first:  # GN on x, then the running map on its (centered) output
        k, st = stats.group_moments(x, view, use_fast_variance=call.use_fast_variance)
        return k, normalizer(st, call.epsilon), run
    # the running map on x (centered at the running mean), then GN on its output
    k, first = ch(lax.stop_gradient(running.mean)), (run[0], jnp.zeros_like(run[0]))
    st = stats.moments_of_affine(x, k, *first, view.reduce, call.use_fast_variance,
                                 view.view_shape)
    return k, first, normalizer(st, call.epsilon)
