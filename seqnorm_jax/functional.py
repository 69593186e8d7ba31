"""Pure normalization functions: moments -> per-(n, c) scale and shift -> ``x * a + b``.

Every function here takes an input ``x`` of shape ``(N, ..., C)`` (feature axis
``axis``, batch axis 0), optional per-channel ``scale`` (gamma) and ``bias``
(beta) of shape ``(C,)``, and returns the normalized output in ``dtype`` (default:
the input's dtype). Statistics are computed by :mod:`seqnorm_jax.stats` in float32
(or wider); the output is produced by one elementwise pass ``x * a[n, c] + b[n, c]``.

Training and inference
----------------------
Functions of layers that keep running statistics (batch norm family, SeqNorm,
HN, GN+, BGN) use the batch statistics unless ``running_mean`` and
``running_var`` (shape ``(C,)``) are given, in which case they run in inference
mode and accept any batch size. In inference, ``example_weight`` (alpha of
"Four Things", paper 002) blends each example's own statistics into the
running ones (0: plain inference, 1: the example normalized by itself).

With ``return_stats=True`` they return ``(y, stats)`` where ``stats`` is a
:class:`~seqnorm_jax.stats.Moments` of ``(C,)`` arrays: the values the running
statistics move towards (``None`` in inference mode). See
:func:`seqnorm_jax.stats.ema`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from seqnorm_jax import stats
from seqnorm_jax.stats import Moments
from jax.sharding import AxisType, PartitionSpec

Array = jax.Array
# (a, b): the per-(n, c) map x -> (x - k) * a + b, where k is a per-(n, c) (or
# per-channel) center fixed for the whole layer: the sample's own mean when the
# moments are computed, else the running mean. Writing maps around k instead of
# as x * a + b' avoids the cancellation of two large terms when |mean| >> std.
Affine = tuple[Array, Array]

__all__ = [
    "batch_norm",
    "ghost_norm",
    "group_norm",
    "seq_norm",
    "batch_group_norm",
    "heterologous_norm",
    "gn_plus",
    "bgn",
    "noisy_batch_norm",
    "resolve_groups",
    "BatchSizeError",
    "NORM_SETS",
    "GN_PLUS_VARIANTS",
    "SEQ_NORM_ORDERS",
]

# Normalization sets of Heterologous Normalization (paper 003): whether the set
# pools over the batch, and how it pools channels ("groups": by the set's group
# count; "all": every channel; None: one channel).
NORM_SETS = {
    "batch": (True, None),
    "instance": (False, None),
    "layer": (False, "all"),
    "group": (False, "groups"),
    "extended": (True, "groups"),
    "extended_groups": (True, "groups"),
}
GN_PLUS_VARIANTS = ("gn_first", "bn_first", "parallel")
SEQ_NORM_ORDERS = ("group_first", "ghost_first")
STD_CENTERS = ("mean_set", "pooled")


# ----------------------------------------------------------------------------
# meshes with Explicit axes
# ----------------------------------------------------------------------------


def _explicit_spec(x) -> PartitionSpec | None:
    """The ``PartitionSpec`` of ``x`` when it is sharded over ``Explicit`` mesh axes, else None.

    ``jax.make_mesh`` makes ``Explicit`` axes by default: there the sharding is part of
    the array's type, and a reshape that splits a sharded batch axis into groups does
    not type-check without an explicit output sharding.
    """
    try:
        sharding = jax.typeof(x).sharding
    except (AttributeError, TypeError):
        return None
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or getattr(mesh, "empty", True):
        return None
    explicit = {name for name, kind in zip(mesh.axis_names, mesh.axis_types)
                if kind == AxisType.Explicit}
    used = set()
    for entry in sharding.spec:
        used.update(entry if isinstance(entry, tuple) else (entry,))
    return sharding.spec if explicit & used else None


def _any_mesh(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` on ``Auto`` axes when its input is sharded over ``Explicit`` ones.

    Inside, XLA partitions the group reshapes and reductions exactly as on an ``Auto``
    mesh (the same collectives: ``tests/test_hlo_collectives.py``); the output keeps
    the input's sharding and the running-statistics targets come back replicated.
    """

    @functools.wraps(fn)
    def wrapper(x, *args, **kwargs):
        spec = _explicit_spec(x)
        if spec is None:
            return fn(x, *args, **kwargs)
        arrays = {k: v for k, v in kwargs.items() if isinstance(v, jax.Array)}
        rest = {k: v for k, v in kwargs.items() if k not in arrays}
        out = (spec, PartitionSpec()) if kwargs.get("return_stats") else spec
        run = lambda x, args, arrays: fn(x, *args, **rest, **arrays)
        # auto_axes needs the mesh in context: the input's, whether or not the caller set
        # one with jax.set_mesh.
        with jax.sharding.use_abstract_mesh(jax.typeof(x).sharding.mesh.abstract_mesh):
            return jax.sharding.auto_axes(run, out_sharding=out)(x, args, arrays)

    return wrapper


# ----------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------


def _check_input(x: Array, who: str) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(
            f"{who}: x must be a floating-point array, got dtype {jnp.result_type(x)} "
            f"(shape {jnp.shape(x)}); cast it first, e.g. x.astype(jnp.float32)."
        )


class BatchSizeError(ValueError):
    """The batch cannot be split as the layer asks (training only; inference takes any batch)."""


def resolve_groups(
    total: int,
    groups: int | None,
    size: int | None,
    *,
    who: str,
    groups_name: str,
    size_name: str,
    what: str,
    default: int | None = None,
    fix: str = "",
    error: type[ValueError] = ValueError,
) -> int:
    """Number of groups of ``total`` items given either a group count or a group size.

    Raises ``ValueError`` naming the argument when both or neither are given, or
    when they do not divide ``total``.
    """
    if groups is not None and size is not None:
        raise ValueError(
            f"{who}: give either {groups_name} or {size_name}, not both "
            f"(got {groups_name}={groups}, {size_name}={size})."
        )
    if groups is None and size is None:
        if default is None:
            raise ValueError(f"{who}: one of {groups_name} or {size_name} is required.")
        groups = default
    name, value = (size_name, size) if size is not None else (groups_name, groups)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{who}: {name} must be a positive int, got {value!r}.")
    if total % value:
        raise error(
            f"{who}: {name}={value} does not divide the {what}, {total}; "
            f"use {name} in {stats.divisors(total)}{fix}."
        )
    return total // size if size is not None else groups


def _batch_groups(x, batch_groups, ghost_size, axis_name, who, default=1) -> int:
    """Number of sample groups of the local batch's global counterpart."""
    n = x.shape[0]
    if axis_name is not None:
        # The global batch is split over devices: check divisibility in stats.pool.
        if ghost_size is not None:
            raise ValueError(
                f"{who}: use batch_groups (groups of the global batch), not ghost_size, "
                f"with axis_name={axis_name!r}."
            )
        g = default if batch_groups is None else batch_groups
        if not isinstance(g, int) or g <= 0:
            raise ValueError(f"{who}: batch_groups must be a positive int, got {g!r}.")
        return g
    return resolve_groups(
        n, batch_groups, ghost_size, who=who, groups_name="batch_groups",
        size_name="ghost_size", what=f"batch size of x (shape {tuple(x.shape)})",
        default=default, error=BatchSizeError,
        fix=" or a batch size that is a multiple of the number of groups "
        "(drop the last incomplete batch, e.g. drop_remainder=True)",
    )


def _channel_groups(x, axis, groups, size, who, groups_name="channel_groups",
                    size_name="channel_group_size", default=None) -> int:
    c = x.shape[stats.feature_axis(x.ndim, axis)]
    return resolve_groups(
        c, groups, size, who=who, groups_name=groups_name, size_name=size_name,
        what=f"number of channels of x (shape {tuple(x.shape)}, axis={axis})",
        default=c if default is None else default,
    )


def _check_set_size(x, axis, samples: int, channels: int, who: str, what: str,
                    error: type[ValueError] = ValueError, fix: str = "") -> None:
    spatial = 1
    for i in stats.spatial_axes(x.ndim, axis):
        spatial *= x.shape[i]
    if samples * spatial * channels < 2:
        raise error(
            f"{who}: each {what} normalization set has a single element "
            f"(x.shape={tuple(x.shape)}: {samples} sample(s) x {spatial} spatial x "
            f"{channels} channel(s)), so its variance is 0 and the output is undefined. "
            f"{fix or 'Use fewer groups (larger groups) or a larger batch.'}"
        )


_GHOST_FIX = "Use fewer batch_groups (a larger ghost_size) or a larger batch."
_GROUP_FIX = ("Use fewer batch_groups (a larger ghost_size) or fewer channel_groups (a larger "
              "channel_group_size), or a larger batch.")
_GN_FIX = "Use fewer num_groups (a larger group_size)."


def _check_choice(value, choices, name, who):
    if value not in choices:
        raise ValueError(f"{who}: {name} must be one of {tuple(choices)}, got {value!r}.")


# ----------------------------------------------------------------------------
# moments -> affine maps
# ----------------------------------------------------------------------------


def _normalizer(m: Moments, epsilon: float) -> Affine:
    """The map ``x -> (x - mean) / sqrt(var + eps)`` as ``(a, b)``, for moments of ``x - k``.

    ``m.mean`` is the mean *relative to the layer's center* ``k`` (see :func:`_finish`),
    or the plain mean where the input of the map is centered at 0 already.
    """
    a = lax.rsqrt(m.var + epsilon)
    return a, -m.mean * a


def _centered(m: Moments, k: Array) -> Moments:
    """Moments of ``x - k``: the input of the maps above."""
    return Moments(m.mean - k, m.var)


def _compose(first: Affine, second: Affine) -> Affine:
    """``second(first(x))``."""
    return first[0] * second[0], first[1] * second[0] + second[1]


def _blend(s: Array, f: Affine, g: Affine) -> Affine:
    """``s * f(x) + (1 - s) * g(x)``."""
    return s * f[0] + (1 - s) * g[0], s * f[1] + (1 - s) * g[1]


@functools.partial(jax.checkpoint, static_argnums=(4, 5))
def _affine_pass(x: Array, k: Array, a: Array, b: Array, axis: int, dtype) -> Array:
    """The one elementwise pass ``(x - k) * a + b`` over ``x``, in the statistics dtype.

    Checkpointed: the backward pass recomputes ``x - k`` from ``x`` in its fused
    loops instead of storing it, so what autodiff keeps is ``x`` and ``(N, C)``
    arrays.
    """
    sdt = a.dtype
    ex = lambda v: stats.expand(v, x.ndim, axis)
    y = (x.astype(sdt) - ex(k)) * ex(a) + ex(b)
    return y.astype(dtype)


def _finish(x: Array, ab: Affine, k: Array, scale, bias, axis: int, dtype,
            mask: Array | None = None) -> Array:
    """Apply gamma and beta, then the single elementwise pass ``(x - k) * a + b``.

    With a ``mask``, the entries it drops are normalized like the others (as flax
    does) but through a copy of the map that carries no gradient to the statistics or
    the parameters, and the kept entries never read them: a NaN there stays there.
    """
    a, b = ab
    sdt = a.dtype
    if scale is not None:
        scale = jnp.asarray(scale, sdt)
        a, b = a * scale, b * scale
    if bias is not None:
        b = b + jnp.asarray(bias, sdt)
    k = jnp.asarray(k, sdt)
    out = jnp.dtype(x.dtype if dtype is None else dtype)
    if mask is None:
        return _affine_pass(x, k, a, b, axis, out)
    w = jnp.broadcast_to(mask, x.shape)
    kept = _affine_pass(jnp.where(w, x, stats.expand(k, x.ndim, axis).astype(x.dtype)), k, a,
                        b, axis, out)
    dropped = _affine_pass(x, k, lax.stop_gradient(a), lax.stop_gradient(b), axis, out)
    return jnp.where(w, kept, dropped)


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


def _finish_view(x: Array, view: stats.GroupView, ab: Affine, k: Array, scale, bias,
                 dtype, second: Affine | None = None) -> Array:
    """:func:`_finish` for statistics kept in the shape of ``view``'s groups; ``second`` is
    a map applied after ``ab`` (gamma and beta go into the last map)."""
    a, b = ab
    a2, b2 = second if second is not None else (None, None)
    sdt = a.dtype
    if scale is not None:
        scale = view.channels(jnp.asarray(scale, sdt))
        if second is None:
            a, b = a * scale, b * scale
        else:
            a2, b2 = a2 * scale, b2 * scale
    if bias is not None:
        bias = view.channels(jnp.asarray(bias, sdt))
        if second is None:
            b = b + bias
        else:
            b2 = b2 + bias
    out = jnp.dtype(x.dtype if dtype is None else dtype)
    return _view_pass(x, k.astype(sdt), a, b, a2, b2, out, view.view_shape)


def _two_steps(x, view: stats.GroupView, first_over_batch: bool, epsilon,
               use_fast_variance) -> tuple[Array, Affine, Moments, Moments]:
    """The two normalizations of SeqNorm and GN+ straight from ``x`` (dense inputs, where
    per-sample moments would be as large as ``x``): the first step's statistics from
    one reduction of ``x`` (over the sample group's members when ``first_over_batch``,
    else over the channel group's), the second's from one more reduction of the first
    step's output, recomputed from ``x``. Returns ``(k, first map, first statistics
    relative to k, second statistics)``."""
    k, st1 = stats.group_moments(x, view, use_fast_variance=use_fast_variance,
                                 axes=view.axes(batch=first_over_batch,
                                                channels=not first_over_batch))
    f1 = _normalizer(st1, epsilon)
    st2 = stats.moments_of_affine(x, k, *f1,
                                  view.axes(batch=not first_over_batch,
                                            channels=first_over_batch), use_fast_variance,
                                  view.view_shape)
    return k, f1, st1, st2


def _inference_two_steps(x, view: stats.GroupView, running: Moments, group_first: bool,
                         epsilon, use_fast_variance) -> tuple[Array, Affine, Affine]:
    """Plain inference (``example_weight=0``) of SeqNorm and GN+ on dense inputs: the
    per-sample group step from one reduction of ``x`` (or of the running-statistics step's
    output, recomputed from ``x``) and the step with running statistics as a fixed
    per-channel map. Returns ``(k, first map, second map)`` for :func:`_finish_view`.
    (Feature maps go through per-sample moments, cheaper on XLA:CPU than a split channel
    axis.)"""
    ch = lambda a: view.channels(a[0])
    run = _normalizer(Moments(ch(running.mean), ch(running.var)), epsilon)
    if group_first:  # GN on x, then the running map on its (centered) output
        k, st = stats.group_moments(x, view, use_fast_variance=use_fast_variance)
        return k, _normalizer(st, epsilon), run
    # the running map on x (centered at the running mean), then GN on its output
    k, first = ch(lax.stop_gradient(running.mean)), (run[0], jnp.zeros_like(run[0]))
    st = stats.moments_of_affine(x, k, *first, view.reduce, use_fast_variance,
                                 view.view_shape)
    return k, first, _normalizer(st, epsilon)


def _is_zero(alpha) -> bool:
    return isinstance(alpha, (int, float)) and alpha == 0


def _running(x, axis, running_mean, running_var, who) -> Moments | None:
    """Running statistics as ``(1, C)`` moments in the statistics dtype of ``x``."""
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{who}: give both running_mean and running_var, or neither.")
    if running_mean is None:
        return None
    c = x.shape[stats.feature_axis(x.ndim, axis)]
    for name, r in (("running_mean", running_mean), ("running_var", running_var)):
        if jnp.shape(r) != (c,):
            raise ValueError(f"{who}: {name} must have shape ({c},) (the channels of x, shape "
                             f"{tuple(x.shape)}), got {jnp.shape(r)}.")
    dt = stats.stat_dtype(jnp.result_type(x))
    return Moments(jnp.asarray(running_mean, dt)[None], jnp.asarray(running_var, dt)[None])


def _check_mask(x, mask, who) -> None:
    """flax's ``mask``: a boolean array that broadcasts to ``x``."""
    if mask is None:
        return
    shape = jnp.shape(mask)
    try:
        ok = jnp.broadcast_shapes(shape, x.shape) == tuple(x.shape)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{who}: mask of shape {shape} does not broadcast to x of shape "
                         f"{tuple(x.shape)}; give a boolean mask of x's shape (or one that "
                         "broadcasts to it, e.g. (N, 1, 1, 1) to drop whole samples).")
    if jnp.result_type(mask) != jnp.bool_:
        raise ValueError(f"{who}: mask must be boolean (True where the statistics are taken), "
                         f"got dtype {jnp.result_type(mask)}; pass mask.astype(bool).")


def _check_example_weight(example_weight, who) -> None:
    if isinstance(example_weight, (int, float)) and not 0 <= example_weight <= 1:
        raise ValueError(f"{who}: example_weight must be in [0, 1] (0: the running "
                         f"statistics, 1: the example's own), got {example_weight!r}.")


def _batch_set(
    m: Moments,
    *,
    batch_groups: int,
    channel_groups: int | None,
    grouping: str,
    running: Moments | None,
    example_weight,
    axis_name,
    axis_index_groups,
    weight: Array | None = None,
    k: Array | None = None,
    offset: Array | None = None,
) -> tuple[Moments, Moments | None]:
    """Statistics of a normalization set pooled over sample groups and channel groups.

    Training: pool the batch moments (count-weighted by ``weight``), and return the
    values for the running statistics (the average over sample groups; across devices
    too). Inference: the running statistics, blended with the example's own moments
    by ``example_weight``, pooled over the channel groups. ``m`` holds the moments of
    ``x - offset`` when ``offset`` is given (:func:`stats.sample_moments_about`); the
    returned mean is relative to ``k`` when given (see :func:`_normalizer`).
    """
    if running is None:
        return stats.pool_with_target(
            m, batch_groups=batch_groups, channel_groups=channel_groups, grouping=grouping,
            axis_name=axis_name, axis_index_groups=axis_index_groups, weight=weight,
            relative_to=k, offset=offset,
        )
    src = running
    if not _is_zero(example_weight):
        own = m if offset is None else Moments(offset + m.mean, m.var)
        src = stats.mix(src, own, example_weight)
    if channel_groups is not None and channel_groups != src.mean.shape[1]:
        return stats.pool(src, batch_groups=None, channel_groups=channel_groups,
                          relative_to=k), None
    return (src if k is None else _centered(src, k)), None


def _sample_set(m: Moments, channel_groups: int | None, weight=None, k=None,
                offset=None) -> Moments:
    """Statistics of a per-sample normalization set (group / layer / instance norm)."""
    return stats.pool(m, batch_groups=None, channel_groups=channel_groups, weight=weight,
                      relative_to=k, offset=offset)


def _output(y, update, return_stats):
    return (y, update) if return_stats else y


# ----------------------------------------------------------------------------
# the layers
# ----------------------------------------------------------------------------


@_any_mesh
def batch_group_norm(
    x: Array,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    batch_groups: int | None = None,
    ghost_size: int | None = None,
    channel_groups: int | None = None,
    channel_group_size: int | None = None,
    grouping: str = "contiguous",
    epsilon: float = 1e-5,
    axis: int = -1,
    running_mean: Array | None = None,
    running_var: Array | None = None,
    example_weight: float | Array = 0.0,
    axis_name: str | None = None,
    axis_index_groups: Any = None,
    use_fast_variance: bool = True,
    dtype: Any = None,
    return_stats: bool = False,
    mask: Array | None = None,
    _who: str = "batch_group_norm",
):
    """Batch/group normalization of "Four Things" (paper 002, section 4).

    Statistics per (sample group, channel group), over the samples of the group,
    the spatial axes and the channels of the group. ``channel_groups=C`` (the
    default) is GhostNorm; ``batch_groups=N`` is GroupNorm (in training);
    both 1 pools everything. Running statistics: the average over sample groups
    of each group's mean and biased variance, per channel (equal within a channel
    group).
    """
    _check_input(x, _who)
    _check_choice(grouping, stats.GROUPINGS, "grouping", _who)
    _check_mask(x, mask, _who)
    _check_example_weight(example_weight, _who)
    running = _running(x, axis, running_mean, running_var, _who)
    g_c = _channel_groups(x, axis, channel_groups, channel_group_size, _who)
    c = x.shape[stats.feature_axis(x.ndim, axis)]
    if running is None:
        g_m = _batch_groups(x, batch_groups, ghost_size, axis_name, _who)
        if axis_name is None and not (_who == "batch_norm" and g_c == c):
            # (flax's BatchNorm takes a single-element set and returns the bias there)
            _check_set_size(x, axis, x.shape[0] // g_m, c // g_c, _who, "group's",
                            BatchSizeError, _GHOST_FIX if g_c == c else _GROUP_FIX)
    else:
        g_m = 1  # unused in inference: any batch size works
    if running is None and mask is None and axis_name is None and (g_c == c or x.ndim == 2):
        # Straight to the (G_M, G_C) group statistics: one reduction of x, and no
        # per-sample moments (on dense inputs those would be as large as x). Channel
        # groups of feature maps go through per-sample moments instead: XLA:CPU's
        # backward of a reduction over a split channel axis is 2-5x slower.
        view = stats.GroupView(x.shape, axis, g_m, g_c, grouping)
        k, st = stats.group_moments(x, view, use_fast_variance=use_fast_variance)
        y = _finish_view(x, view, _normalizer(st, epsilon), k, scale, bias, dtype)
        update = Moments(view.per_channel(k + st.mean), view.per_channel(st.var))
        return _output(y, update, return_stats)
    if running is None or not _is_zero(example_weight):
        k, m = stats.sample_moments_about(x, axis=axis, use_fast_variance=use_fast_variance,
                                           mask=mask)
    else:  # plain inference: one multiply-add pass, no reduction over x
        m, k = None, lax.stop_gradient(running.mean)
    st, update = _batch_set(
        m, batch_groups=g_m, channel_groups=g_c, grouping=grouping, running=running,
        example_weight=example_weight, axis_name=axis_name,
        axis_index_groups=axis_index_groups, weight=stats.sample_counts(mask, x.shape, axis),
        k=k, offset=None if m is None else k,
    )
    y = _finish(x, _normalizer(st, epsilon), k, scale, bias, axis, dtype, mask)
    return _output(y, update, return_stats)


@_any_mesh
def batch_norm(
    x: Array, scale: Array | None = None, bias: Array | None = None, *, epsilon: float = 1e-5,
    axis: int = -1, running_mean=None, running_var=None, example_weight=0.0, axis_name=None,
    axis_index_groups=None, use_fast_variance: bool = True, dtype=None, return_stats=False,
    mask=None,
):
    """BatchNorm: statistics per channel over the batch and spatial axes (Ioffe & Szegedy).

    Equal to ``flax.linen.BatchNorm`` to float32 rounding, including its inputs: a
    rank-1 ``(C,)`` input is one sample (flax reduces over no axis: the output is
    ``bias``), and ``mask`` takes the statistics over the entries where it is True.
    """
    if jnp.ndim(x) == 1:
        out = batch_norm(
            x[None], scale, bias, epsilon=epsilon, axis=-1, running_mean=running_mean,
            running_var=running_var, example_weight=example_weight, axis_name=axis_name,
            axis_index_groups=axis_index_groups, use_fast_variance=use_fast_variance,
            dtype=dtype, return_stats=return_stats,
            mask=None if mask is None else jnp.broadcast_to(mask, jnp.shape(x))[None])
        return (out[0][0], out[1]) if return_stats else out[0]
    return batch_group_norm(
        x, scale, bias, batch_groups=1, epsilon=epsilon, axis=axis, running_mean=running_mean,
        running_var=running_var, example_weight=example_weight, axis_name=axis_name,
        axis_index_groups=axis_index_groups, use_fast_variance=use_fast_variance, dtype=dtype,
        return_stats=return_stats, mask=mask, _who="batch_norm",
    )


@_any_mesh
def ghost_norm(
    x: Array, scale: Array | None = None, bias: Array | None = None, *,
    batch_groups: int | None = None, ghost_size: int | None = None,
    grouping: str = "contiguous", epsilon: float = 1e-5, axis: int = -1,
    running_mean=None, running_var=None, example_weight=0.0, axis_name=None,
    axis_index_groups=None, use_fast_variance: bool = True, dtype=None, return_stats=False,
    mask=None,
):
    """GhostNorm (Hoffer et al. 2017; papers 000/001): BatchNorm per ghost batch.

    The batch is split into ``batch_groups`` groups ("ghost batches") of
    ``ghost_size`` samples, contiguous by default (``grouping="strided"`` for
    Keras' ``virtual_batch_size`` layout), each normalized with its own
    per-channel statistics. Running statistics move towards the whole-batch mean
    and the mean of the per-ghost biased variances.
    """
    return batch_group_norm(
        x, scale, bias, batch_groups=batch_groups, ghost_size=ghost_size, grouping=grouping,
        epsilon=epsilon, axis=axis, running_mean=running_mean, running_var=running_var,
        example_weight=example_weight, axis_name=axis_name,
        axis_index_groups=axis_index_groups, use_fast_variance=use_fast_variance,
        dtype=dtype, return_stats=return_stats, mask=mask, _who="ghost_norm",
    )


@_any_mesh
def bgn(
    x: Array, scale: Array | None = None, bias: Array | None = None, *,
    num_groups: int | None = None, group_size: int | None = None, epsilon: float = 1e-5,
    axis: int = -1, running_mean=None, running_var=None, example_weight=0.0, axis_name=None,
    axis_index_groups=None, use_fast_variance: bool = True, dtype=None, return_stats=False,
    mask=None,
):
    """Batch Group Normalization (Zhou et al. 2020): channel groups over the whole batch.

    Statistics per group of ``C / num_groups`` contiguous channels over the batch,
    the spatial axes and the channels of the group. ``num_groups=C`` is
    BatchNorm; ``num_groups=1`` pools everything. Running statistics per group.
    """
    who = "bgn"
    c = x.shape[stats.feature_axis(x.ndim, axis)]
    g = _channel_groups(x, axis, num_groups, group_size, who, "num_groups", "group_size",
                        default=c)
    return batch_group_norm(
        x, scale, bias, batch_groups=1, channel_groups=g, epsilon=epsilon, axis=axis,
        running_mean=running_mean, running_var=running_var, example_weight=example_weight,
        axis_name=axis_name, axis_index_groups=axis_index_groups,
        use_fast_variance=use_fast_variance, dtype=dtype, return_stats=return_stats, mask=mask,
        _who=who,
    )


@_any_mesh
def group_norm(
    x: Array, scale: Array | None = None, bias: Array | None = None, *,
    num_groups: int | None = 32, group_size: int | None = None, epsilon: float = 1e-6,
    axis: int = -1, use_fast_variance: bool = True, dtype=None, reduction_axes=None,
    axis_name: str | None = None, axis_index_groups: Any = None, mask: Array | None = None,
):
    """GroupNorm (Wu & He 2018): per sample, over the spatial axes and a channel group.

    Defaults and arguments as ``flax.linen.GroupNorm`` (``num_groups=32``,
    ``epsilon=1e-6``; pass ``num_groups=None`` with ``group_size``). With
    ``reduction_axes`` (which must include the last, feature, axis) the axes outside
    it index independent samples, as in flax; a rank-1 ``(C,)`` input is one sample.
    ``axis_name`` merges each sample's statistics across the devices of that axis
    (inputs whose reduced axes are sharded, e.g. a sequence split over devices), and
    ``mask`` takes them over the entries where it is True. Batch-independent: no
    running statistics.
    """
    who = "group_norm"
    _check_input(x, who)
    _check_mask(x, mask, who)
    if reduction_axes is not None or x.ndim == 1:
        return _over_samples(
            lambda xs, ms: group_norm(
                xs, scale, bias, num_groups=num_groups, group_size=group_size, epsilon=epsilon,
                use_fast_variance=use_fast_variance, dtype=dtype, axis_name=axis_name,
                axis_index_groups=axis_index_groups, mask=ms),
            x, mask, reduction_axes, axis, who)
    g = _channel_groups(x, axis, num_groups, group_size, who, "num_groups", "group_size")
    c = x.shape[stats.feature_axis(x.ndim, axis)]
    if axis_name is None:
        _check_set_size(x, axis, 1, c // g, who, "sample's group", fix=_GN_FIX)
    if mask is None and axis_name is None and x.ndim == 2:
        # Dense: straight to the (N, G) statistics (per-sample moments would be x itself).
        view = stats.GroupView(x.shape, axis, None, g)
        k, st = stats.group_moments(x, view, use_fast_variance=use_fast_variance)
        return _finish_view(x, view, _normalizer(st, epsilon), k, scale, bias, dtype)
    k, m = stats.sample_moments_about(x, axis=axis, use_fast_variance=use_fast_variance,
                                      mask=mask)
    w = stats.sample_counts(mask, x.shape, axis)
    if axis_name is None:
        st = _sample_set(m, g, w, k, offset=k)
    else:
        spatial = math.prod(x.shape[i] for i in stats.spatial_axes(x.ndim, axis))
        count = jnp.full(m.mean.shape, float(spatial), m.mean.dtype) if w is None else w
        local = _sample_set(m, g, count, offset=k)
        group_count = stats.pool(Moments(count, count), batch_groups=None, channel_groups=g).mean
        st = _centered(stats.cross_device_merge(local, group_count, axis_name,
                                                axis_index_groups), k)
    return _finish(x, _normalizer(st, epsilon), k, scale, bias, axis, dtype, mask)


def _over_samples(fn, x, mask, reduction_axes, axis, who):
    """Run ``fn(xs, mask)`` on ``x`` laid out as ``(samples, *reduced axes)`` (flax's
    ``reduction_axes``), and lay its output out as ``x``."""
    nd = x.ndim
    if stats.feature_axis(max(nd, 2), axis) != max(nd, 2) - 1:
        raise ValueError(f"{who}: reduction_axes needs the features on the last axis "
                         f"(axis=-1), got axis={axis}.")
    red = (-1,) if reduction_axes is None else (
        (reduction_axes,) if isinstance(reduction_axes, int) else tuple(reduction_axes))
    try:
        ok = all(-nd <= int(r) < nd for r in red)
    except TypeError:
        ok = False
    red = sorted({int(r) % nd for r in red}) if ok else []
    if not red or red[-1] != nd - 1:
        raise ValueError(f"{who}: reduction_axes={reduction_axes!r} must be axes of x (rank "
                         f"{nd}) and include the last (feature) axis, e.g. "
                         f"reduction_axes={tuple(range(1, nd)) if nd > 1 else (0,)}.")
    samples = [i for i in range(nd) if i not in red]
    perm = samples + red
    xt = jnp.transpose(x, perm)
    lead = math.prod(xt.shape[:len(samples)])
    xs = xt.reshape((lead,) + xt.shape[len(samples):])
    ms = None
    if mask is not None:
        mt = jnp.transpose(jnp.broadcast_to(mask, x.shape), perm)
        ms = mt.reshape(xs.shape)
    y = fn(xs, ms).reshape(xt.shape)
    return jnp.transpose(y, [perm.index(i) for i in range(nd)])


@_any_mesh
def seq_norm(
    x: Array, scale: Array | None = None, bias: Array | None = None, *,
    channel_groups: int | None = None, channel_group_size: int | None = None,
    batch_groups: int | None = None, ghost_size: int | None = None,
    order: str = "group_first", grouping: str = "contiguous", epsilon: float = 1e-5,
    axis: int = -1, running_mean=None, running_var=None, example_weight=0.0, axis_name=None,
    axis_index_groups=None, use_fast_variance: bool = True, dtype=None, return_stats=False,
    mask=None,
):
    """SeqNorm (papers 000/001): GroupNorm without affine, then GhostNorm, one gamma/beta.

    ``order="ghost_first"`` runs the two steps the other way round (the paper's
    ablation). Running statistics are those of the ghost step's input; at
    inference the group step is computed from the example and the ghost step
    uses the running statistics. Both steps use ``epsilon``. Computed in one
    pass: the group step is affine per ``(n, c)``, so the ghost statistics of its
    output follow from the input's moments.
    """
    who = "seq_norm"
    _check_input(x, who)
    _check_mask(x, mask, who)
    _check_example_weight(example_weight, who)
    _check_choice(order, SEQ_NORM_ORDERS, "order", who)
    _check_choice(grouping, stats.GROUPINGS, "grouping", who)
    running = _running(x, axis, running_mean, running_var, who)
    g_c = _channel_groups(x, axis, channel_groups, channel_group_size, who, default=1)
    c = x.shape[stats.feature_axis(x.ndim, axis)]
    _check_set_size(x, axis, 1, c // g_c, who, "sample's channel group",
                    fix="Use fewer channel_groups (a larger channel_group_size).")
    g_m = 1
    if running is None:
        g_m = _batch_groups(x, batch_groups, ghost_size, axis_name, who)
        if axis_name is None:
            _check_set_size(x, axis, x.shape[0] // g_m, 1, who, "ghost batch's",
                            BatchSizeError, _GHOST_FIX)
    if running is not None and mask is None and _is_zero(example_weight) and x.ndim == 2:
        view = stats.GroupView(x.shape, axis, None, g_c)
        k, f1, f2 = _inference_two_steps(x, view, running, order == "group_first", epsilon,
                                         use_fast_variance)
        return _output(_finish_view(x, view, f1, k, scale, bias, dtype, f2), None, return_stats)
    if x.ndim == 2 and running is None and mask is None and axis_name is None:
        view = stats.GroupView(x.shape, axis, g_m, g_c, grouping)
        group_first = order == "group_first"
        k, f1, st1, st2 = _two_steps(x, view, not group_first, epsilon, use_fast_variance)
        ghost_stats = st2 if group_first else Moments(k + st1.mean, st1.var)
        update = Moments(view.per_channel(ghost_stats.mean), view.per_channel(ghost_stats.var))
        y = _finish_view(x, view, f1, k, scale, bias, dtype, _normalizer(st2, epsilon))
        return _output(y, update, return_stats)
    k, m = stats.sample_moments_about(x, axis=axis, use_fast_variance=use_fast_variance,
                                      mask=mask)
    w = stats.sample_counts(mask, x.shape, axis)
    ghost = lambda mm, center=None: _batch_set(
        mm, batch_groups=g_m, channel_groups=None, grouping=grouping, running=running,
        example_weight=example_weight, axis_name=axis_name,
        axis_index_groups=axis_index_groups, weight=w, k=center, offset=center,
    )
    group = lambda mm, center=None: _sample_set(mm, g_c, w, center, offset=center)
    # m holds the moments of x - k: the first step's statistics are relative to k, and
    # the second step's input (the first step's output) is centered already.
    if order == "group_first":
        f1 = _normalizer(group(m, k), epsilon)
        st2, update = ghost(stats.affine(m, *f1))
        f2 = _normalizer(st2, epsilon)
    else:
        st1, update = ghost(m, k)
        f1 = _normalizer(st1, epsilon)
        f2 = _normalizer(group(stats.affine(m, *f1)), epsilon)
    y = _finish(x, _compose(f1, f2), k, scale, bias, axis, dtype, mask)
    return _output(y, update, return_stats)


@_any_mesh
def heterologous_norm(
    x: Array, scale: Array | None = None, bias: Array | None = None, *,
    mean_set: str = "batch", std_set: str = "extended", mean_groups: int = 1,
    std_groups: int = 1, std_center: str = "mean_set", epsilon: float = 1e-5, axis: int = -1,
    running_mean=None, running_var=None, example_weight=0.0, axis_name=None,
    axis_index_groups=None, use_fast_variance: bool = True, dtype=None, return_stats=False,
    mask=None,
):
    """Heterologous Normalization (paper 003): mean and std from different pixel sets.

    Sets (``NORM_SETS``): ``batch`` (per channel over the batch: BN), ``instance``
    (per sample and channel: IN), ``layer`` (per sample, all channels: LN),
    ``group`` (per sample, ``*_groups`` channel groups: GN), ``extended`` /
    ``extended_groups`` (over the batch and ``*_groups`` channel groups; with one
    group, the whole ``(N, spatial, C)`` set: EN). The default is the paper's HN:
    BN mean, EN std. ``std_center="mean_set"`` takes the variance around the mean
    the layer subtracts (for HN: each channel's own batch mean, i.e. the average
    of the per-channel BN variances of the group); ``"pooled"`` around the std
    set's own mean.

    Running statistics are the per-channel batch mean and variance; sets over
    the batch are pooled from them at use time, so inference is one fixed affine
    map per channel (foldable into the previous convolution).
    """
    who = "heterologous_norm"
    _check_input(x, who)
    _check_mask(x, mask, who)
    _check_example_weight(example_weight, who)
    _check_choice(mean_set, NORM_SETS, "mean_set", who)
    _check_choice(std_set, NORM_SETS, "std_set", who)
    _check_choice(std_center, STD_CENTERS, "std_center", who)
    running = _running(x, axis, running_mean, running_var, who)
    c = x.shape[stats.feature_axis(x.ndim, axis)]

    def channel_groups(kind, groups, name):
        pooling = NORM_SETS[kind][1]
        if pooling is None:
            return None
        if pooling == "all":
            return 1
        return _channel_groups(x, axis, groups, None, who, name)

    mg = channel_groups(mean_set, mean_groups, "mean_groups")
    sg = channel_groups(std_set, std_groups, "std_groups")
    for kind, g in ((mean_set, mg), (std_set, sg)):
        per_group = 1 if g is None else c // g
        if not NORM_SETS[kind][0] or running is None:
            samples = x.shape[0] if NORM_SETS[kind][0] and axis_name is None else 1
            _check_set_size(
                x, axis, samples, per_group, who, f"{kind!r}",
                BatchSizeError if NORM_SETS[kind][0] else ValueError,
                f"Use a larger batch, or a set with more elements than {kind!r} (fewer "
                "mean_groups/std_groups, or a set that pools channels or the batch).")
    if (NORM_SETS[mean_set][0] and NORM_SETS[std_set][0] and std_center == "mean_set"
            and mask is None and axis_name is None
            and (running is None or _is_zero(example_weight))):
        # Both sets pool the batch: everything follows from per-channel statistics.
        return _output(*_batch_sets_norm(x, scale, bias, mg, sg, std_center, running,
                                         epsilon, axis, use_fast_variance, dtype), return_stats)
    k, m = stats.sample_moments_about(x, axis=axis, use_fast_variance=use_fast_variance,
                                      mask=mask)
    w = stats.sample_counts(mask, x.shape, axis)
    n = m.mean.shape[0]

    # Per-channel batch moments in training, running ones (blended) in inference; the
    # mean relative to k, so that a batch mean set loses no digits.
    per_channel_rel, update = _batch_set(
        m, batch_groups=1, channel_groups=None, grouping="contiguous", running=running,
        example_weight=example_weight, axis_name=axis_name, axis_index_groups=axis_index_groups,
        weight=w, k=k, offset=k,
    )
    per_channel_rel = Moments(*(jnp.broadcast_to(a, (n, c)) for a in per_channel_rel))
    per_channel = Moments(per_channel_rel.mean + k, per_channel_rel.var)

    def source(kind):
        # Sets over the batch start from the per-channel batch (or running) moments;
        # per-sample sets from the sample's own (moments of x - k, count-weighted under
        # a mask).
        return (per_channel, None, None) if NORM_SETS[kind][0] else (m, w, k)

    if NORM_SETS[mean_set][0] and mg is None:
        mean = per_channel_rel.mean
    else:
        src, weight, offset = source(mean_set)
        mean = stats.pool(src, batch_groups=None, channel_groups=mg, weight=weight,
                          relative_to=k, offset=offset).mean
    center = mean if std_center == "mean_set" else None  # relative to k
    src, weight, offset = source(std_set)
    if (NORM_SETS[std_set][0] and running is None and center is not None
            and not NORM_SETS[mean_set][0]):
        # A center that differs per sample: pool (v + (m - center)^2) over the batch.
        # (A mean set over the batch gives a per-channel center: then the per-channel
        # batch moments below already hold the whole set, with no second cross-device
        # reduction.)
        var = stats.pool(m, batch_groups=1, channel_groups=sg, center=center,
                         axis_name=axis_name, axis_index_groups=axis_index_groups,
                         weight=w, offset=k).var
    else:
        if center is not None and offset is None:
            center = center + k  # the frame of the per-channel (absolute) moments
        var = stats.pool(src, batch_groups=None, channel_groups=sg, center=center,
                         weight=weight, offset=offset).var
    y = _finish(x, _normalizer(Moments(mean, var), epsilon), k, scale, bias, axis, dtype, mask)
    return _output(y, update, return_stats)


def _batch_sets_norm(x, scale, bias, mean_groups, std_groups, std_center, running, epsilon,
                     axis, use_fast_variance, dtype):
    """Heterologous normalization whose mean and std sets both pool the batch: the
    per-channel batch statistics (one reduction of x; the running ones at inference,
    where the layer is one multiply-add) pooled over channel groups as ``(C,)`` vectors."""
    c = x.shape[stats.feature_axis(x.ndim, axis)]
    view = stats.GroupView(x.shape, axis, 1, None)
    if running is None:
        k, st = stats.group_moments(x, view, use_fast_variance=use_fast_variance)
        k, per_channel = k.reshape(1, c), Moments(st.mean.reshape(1, c), st.var.reshape(1, c))
        update = Moments(k[0] + per_channel.mean[0], per_channel.var[0])
    else:
        k = lax.stop_gradient(running.mean)
        per_channel, update = Moments(jnp.zeros_like(k), running.var), None
    mean = per_channel.mean
    if mean_groups is not None:
        mean = stats.pool(per_channel, batch_groups=None, channel_groups=mean_groups,
                          offset=k, relative_to=k).mean
    center = mean if std_center == "mean_set" else None  # relative to k, like the moments
    var = stats.pool(per_channel, batch_groups=None, channel_groups=std_groups, center=center,
                     offset=k).var
    a, b = _normalizer(Moments(mean[0], var[0]), epsilon)
    y = _finish_view(x, view, (view.channels(a), view.channels(b)), view.channels(k[0]), scale,
                     bias, dtype)
    return y, update


@_any_mesh
def gn_plus(
    x: Array, scale: Array | None = None, bias: Array | None = None,
    mixing: Array | float = 1.0, *, num_groups: int | None = 32, group_size: int | None = None,
    variant: str = "gn_first", epsilon: float = 1e-5, axis: int = -1, running_mean=None,
    running_var=None, example_weight=0.0, axis_name=None, axis_index_groups=None,
    use_fast_variance: bool = True, dtype=None, return_stats=False, mask=None,
):
    """GN+ (paper 004): GroupNorm and BatchNorm outputs mixed by ``S = sigmoid(mixing)``.

    * ``gn_first``: ``g = GN(x)``; ``y = S g + (1 - S) BN(g)`` (the paper's best);
    * ``bn_first``: ``b = BN(x)``; ``y = S GN(b) + (1 - S) b``;
    * ``parallel``: ``y = S GN(x) + (1 - S) BN(x)``;

    then one gamma/beta. ``mixing`` is the learnable scalar lambda. The BN part is
    ordinary BatchNorm over ``(N, spatial)`` with running statistics of its
    input, following the paper's text; the paper's public code instead
    normalizes over the batch axis only with the unbiased std plus eps and keeps
    no running statistics (its evaluation output depends on the batch).
    """
    who = "gn_plus"
    _check_input(x, who)
    _check_mask(x, mask, who)
    _check_example_weight(example_weight, who)
    _check_choice(variant, GN_PLUS_VARIANTS, "variant", who)
    running = _running(x, axis, running_mean, running_var, who)
    g = _channel_groups(x, axis, num_groups, group_size, who, "num_groups", "group_size")
    c = x.shape[stats.feature_axis(x.ndim, axis)]
    _check_set_size(x, axis, 1, c // g, who, "sample's group", fix=_GN_FIX)
    if running is None and axis_name is None:
        _check_set_size(x, axis, x.shape[0], 1, who, "batch", BatchSizeError)
    if (running is not None and mask is None and _is_zero(example_weight) and x.ndim == 2
            and variant != "parallel"):
        view = stats.GroupView(x.shape, axis, None, g)
        gn_first = variant == "gn_first"
        k, f1, (a2, b2) = _inference_two_steps(x, view, running, gn_first, epsilon,
                                               use_fast_variance)
        s = jax.nn.sigmoid(jnp.asarray(mixing, a2.dtype))
        second = ((s + (1 - s) * a2, (1 - s) * b2) if gn_first
                  else (s * a2 + (1 - s), s * b2))
        return _output(_finish_view(x, view, f1, k, scale, bias, dtype, second), None,
                       return_stats)
    if (x.ndim == 2 and running is None and mask is None and axis_name is None
            and variant != "parallel"):
        view = stats.GroupView(x.shape, axis, 1, g)
        gn_first = variant == "gn_first"
        k, f1, st1, st2 = _two_steps(x, view, not gn_first, epsilon, use_fast_variance)
        s = jax.nn.sigmoid(jnp.asarray(mixing, st1.mean.dtype))
        a2, b2 = _normalizer(st2, epsilon)
        # gn_first: S g + (1 - S) BN(g); bn_first: S GN(b) + (1 - S) b, as maps of g / b
        second = ((s + (1 - s) * a2, (1 - s) * b2) if gn_first
                  else (s * a2 + (1 - s), s * b2))
        bn_stats = st2 if gn_first else Moments(k + st1.mean, st1.var)
        update = Moments(view.per_channel(bn_stats.mean), view.per_channel(bn_stats.var))
        y = _finish_view(x, view, f1, k, scale, bias, dtype, second)
        return _output(y, update, return_stats)
    k, mc = stats.sample_moments_about(x, axis=axis, use_fast_variance=use_fast_variance,
                                       mask=mask)  # the moments of x - k
    w = stats.sample_counts(mask, x.shape, axis)
    s = jax.nn.sigmoid(jnp.asarray(mixing, mc.mean.dtype))

    # Statistics of x are taken relative to k; those of a normalized x around 0.
    def bn(mm, center=None):
        st, update = _batch_set(
            mm, batch_groups=1, channel_groups=None, grouping="contiguous", running=running,
            example_weight=example_weight, axis_name=axis_name,
            axis_index_groups=axis_index_groups, weight=w, k=center, offset=center,
        )
        return _normalizer(st, epsilon), update

    gn = lambda mm, center=None: _normalizer(_sample_set(mm, g, w, center, offset=center),
                                             epsilon)
    if variant == "gn_first":
        f_gn = gn(mc, k)
        f_bn, update = bn(stats.affine(mc, *f_gn))
        ab = _blend(s, f_gn, _compose(f_gn, f_bn))
    elif variant == "bn_first":
        f_bn, update = bn(mc, k)
        ab = _blend(s, _compose(f_bn, gn(stats.affine(mc, *f_bn))), f_bn)
    else:
        f_bn, update = bn(mc, k)
        ab = _blend(s, gn(mc, k), f_bn)
    y = _finish(x, ab, k, scale, bias, axis, dtype, mask)
    return _output(y, update, return_stats)


@_any_mesh
def noisy_batch_norm(
    x: Array, scale: Array | None = None, bias: Array | None = None, *,
    noise_std: float = 3e-4, rng: Array | None = None, epsilon: float = 1e-5, axis: int = -1,
    running_mean=None, running_var=None, example_weight=0.0, axis_name=None,
    axis_index_groups=None, use_fast_variance: bool = True, dtype=None, return_stats=False,
    mask=None,
):
    """BatchNorm with Gaussian noise ``N(0, noise_std^2)`` added to its input in training.

    The noise (paper 000's ablation; best ``noise_std=3e-4``) needs ``rng`` in
    training; inference (running statistics given) adds none.
    """
    who = "noisy_batch_norm"
    _check_input(x, who)
    if running_mean is None and noise_std:
        if rng is None:
            raise ValueError(
                f"{who}: training with noise_std={noise_std} needs an rng key; pass rng= "
                "(in linen: rngs={'noise': key} to apply)."
            )
        noise = jax.random.normal(rng, x.shape, stats.stat_dtype(x.dtype)) * noise_std
        x = (x.astype(noise.dtype) + noise).astype(x.dtype)
    return batch_group_norm(
        x, scale, bias, batch_groups=1, epsilon=epsilon, axis=axis, running_mean=running_mean,
        running_var=running_var, example_weight=example_weight, axis_name=axis_name,
        axis_index_groups=axis_index_groups, use_fast_variance=use_fast_variance, dtype=dtype,
        return_stats=return_stats, mask=mask, _who=who,
    )


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "batch_norm": batch_norm,
    "ghost_norm": ghost_norm,
    "group_norm": group_norm,
    "seq_norm": seq_norm,
    "batch_group_norm": batch_group_norm,
    "heterologous_norm": heterologous_norm,
    "gn_plus": gn_plus,
    "bgn": bgn,
    "noisy_batch_norm": noisy_batch_norm,
}
