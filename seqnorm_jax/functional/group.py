"""GroupNorm: per sample, over the spatial axes and a group of channels."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from seqnorm_jax import stats
from seqnorm_jax.functional._call import GN_FIX, check_input, normalization, setup
from seqnorm_jax.functional._maps import (affine_map, centered, finish, fused, normalizer,
                                          sample_set)
from seqnorm_jax.stats import Moments

Array = jax.Array


@normalization(shared=False)
def group_norm(
    caller: str | None, x: Array, scale: Array | None = None, bias: Array | None = None, *,
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
    check_input(who, x, mask)
    if reduction_axes is not None or x.ndim == 1:
        return _over_samples(
            lambda xs, ms: group_norm.named(caller)(
                xs, scale, bias, num_groups=num_groups, group_size=group_size, epsilon=epsilon,
                use_fast_variance=use_fast_variance, dtype=dtype, axis_name=axis_name,
                axis_index_groups=axis_index_groups, mask=ms),
            x, mask, reduction_axes, axis, who)
    call = setup(who, x, axis=axis, epsilon=epsilon, dtype=dtype,
                 use_fast_variance=use_fast_variance, axis_name=axis_name,
                 axis_index_groups=axis_index_groups, mask=mask, caller=caller)
    g = call.channel_groups(num_groups, group_size, groups_name="num_groups",
                            size_name="group_size")
    if axis_name is None:
        call.check_set_size(1, call.c // g, "sample's group", fix=GN_FIX, per_sample=True)
    plan = stats.plan(x, axis=call.axis, family="sample", training=True,
                      plain_inference=False, masked=mask is not None, axis_name=axis_name,
                      channel_groups=g)
    if plan.regime == "view":
        # Dense: straight to the (N, G) statistics (per-sample moments would be x itself),
        # gamma and beta as a second map (folded, the map would be as large as x).
        view = plan.view
        return fused(call, x, view, (scale, bias), lambda m, p: normalizer(m, epsilon),
                     lambda m, p: affine_map(view, None, p), view.reduce)[0]
    k, m = stats.sample_moments_about(x, axis=call.axis, use_fast_variance=use_fast_variance,
                                      mask=mask)
    if axis_name is None:
        st = sample_set(m, g, call.weight, k, offset=k)
    else:  # each sample's group merged across the devices that hold parts of it
        w = call.weight
        count = jnp.full(m.mean.shape, float(call.spatial), m.mean.dtype) if w is None else w
        local = sample_set(m, g, count, offset=k)
        group_count = stats.pool(Moments(count, count), batch_groups=None, channel_groups=g).mean
        st = centered(stats.cross_device_merge(local, group_count, axis_name,
                                               axis_index_groups), k)
    return finish(call, x, normalizer(st, epsilon), k, scale, bias)


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
