"""The batch family: statistics per (sample group, channel group) over the batch.

:func:`batch_group_norm` ("Four Things") is the general case; :func:`batch_norm`,
:func:`ghost_norm`, :func:`bgn` and :func:`noisy_batch_norm` are its settings.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from seqnorm_jax import checks, stats
from seqnorm_jax.functional._call import GHOST_FIX, GROUP_FIX, BatchSizeError, Call, normalization
from seqnorm_jax.functional._maps import batch_set, finish, finish_view, normalizer
from seqnorm_jax.stats import GROUPINGS, Moments

Array = jax.Array


def _batch_groups_norm(call: Call, x: Array, scale, bias, *, batch_groups: int | None,
                       ghost_size: int | None, channel_groups: int, grouping: str):
    """:func:`batch_group_norm` of a resolved call with ``channel_groups`` resolved.

    Settings that are BatchNorm (one sample group, one channel per group) accept
    one-element sets, as flax's BatchNorm does (the output there is the bias).
    """
    call.choice(grouping, GROUPINGS, "grouping")
    g_c, c = channel_groups, call.c
    if call.training:
        g_m = call.batch_groups(batch_groups, ghost_size)
        batch_norm_sets = g_m == 1 and g_c == c
        if call.axis_name is None and (call.n == 0 or not batch_norm_sets):
            call.check_set_size(call.n // g_m, c // g_c, "group's", BatchSizeError,
                                GHOST_FIX if g_c == c else GROUP_FIX)
    else:
        g_m = 1  # unused in inference: any batch size works
    plan = stats.plan(x, axis=call.axis, family="batch", training=call.training,
                      plain_inference=call.plain_inference, masked=call.mask is not None,
                      axis_name=call.axis_name, batch_groups=g_m,
                      channel_groups=None if g_c == c else g_c, grouping=grouping)
    if plan.regime == "view":  # straight to the (G_M, G_C) group statistics
        view = plan.view
        k, st = stats.group_moments(x, view, use_fast_variance=call.use_fast_variance)
        y = finish_view(call, x, view, normalizer(st, call.epsilon), k, scale, bias)
        update = Moments(view.per_channel(k + st.mean), view.per_channel(st.var))
        return y, update
    if plan.regime == "running":  # one multiply-add pass, no reduction over x
        m, k = None, lax.stop_gradient(call.running.mean)
    else:
        k, m = stats.sample_moments_about(x, axis=call.axis,
                                          use_fast_variance=call.use_fast_variance,
                                          mask=call.mask)
    st, update = batch_set(call, m, batch_groups=g_m, channel_groups=g_c, grouping=grouping,
                           k=k, offset=None if m is None else k)
    y = finish(call, x, normalizer(st, call.epsilon), k, scale, bias)
    return y, update


@normalization
def batch_group_norm(
    call: Call,
    x: Array,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    batch_groups: int | None = None,
    ghost_size: int | None = None,
    channel_groups: int | None = None,
    channel_group_size: int | None = None,
    grouping: str = "contiguous",
):
    """Batch/group normalization of "Four Things" (paper 002, section 4).

    Statistics per (sample group, channel group), over the samples of the group,
    the spatial axes and the channels of the group. ``channel_groups=C`` (the
    default) is GhostNorm; ``batch_groups=N`` is GroupNorm (in training);
    both 1 pools everything. Running statistics: the average over sample groups
    of each group's mean and biased variance, per channel (equal within a channel
    group).
    """
    return _batch_groups_norm(
        call, x, scale, bias, batch_groups=batch_groups, ghost_size=ghost_size,
        channel_groups=call.channel_groups(channel_groups, channel_group_size),
        grouping=grouping)


def _rank1_is_one_sample(fn):
    """A rank-1 ``(C,)`` ``x`` is one sample of ``C`` features, as in flax's BatchNorm
    (which reduces over no axis there: the output is ``bias``), wherever ``fn`` is
    BatchNorm: one sample group."""

    @functools.wraps(fn)
    def wrapper(x, *args, mask=None, return_stats=False, **kwargs):
        one_group = all(kwargs.get(k) in (None, 1) for k in ("batch_groups", "ghost_size"))
        if jnp.ndim(x) != 1 or not one_group:
            return fn(x, *args, mask=mask, return_stats=return_stats, **kwargs)
        mask = None if mask is None else jnp.broadcast_to(mask, jnp.shape(x))[None]
        out = fn(x[None], *args, mask=mask, return_stats=return_stats,
                 **dict(kwargs, axis=-1))
        return (out[0][0], out[1]) if return_stats else out[0]

    return wrapper


@normalization(rank1=_rank1_is_one_sample)
def batch_norm(call: Call, x: Array, scale: Array | None = None, bias: Array | None = None):
    """BatchNorm: statistics per channel over the batch and spatial axes (Ioffe & Szegedy).

    Equal to ``flax.linen.BatchNorm`` to float32 rounding, including its inputs: a
    rank-1 ``(C,)`` input is one sample (flax reduces over no axis: the output is
    ``bias``), and ``mask`` takes the statistics over the entries where it is True.
    """
    return _batch_groups_norm(call, x, scale, bias, batch_groups=1, ghost_size=None,
                              channel_groups=call.c, grouping="contiguous")


@normalization(rank1=_rank1_is_one_sample)
def ghost_norm(
    call: Call, x: Array, scale: Array | None = None, bias: Array | None = None, *,
    batch_groups: int | None = None, ghost_size: int | None = None,
    grouping: str = "contiguous",
):
    """GhostNorm (Hoffer et al. 2017; papers 000/001): BatchNorm per ghost batch.

    The batch is split into ``batch_groups`` groups ("ghost batches") of
    ``ghost_size`` samples, contiguous by default (``grouping="strided"`` for
    Keras' ``virtual_batch_size`` layout), each normalized with its own
    per-channel statistics. Running statistics move towards the whole-batch mean
    and the mean of the per-ghost biased variances. ``batch_groups=1`` is
    :func:`batch_norm`, rank-1 input included.
    """
    return _batch_groups_norm(call, x, scale, bias, batch_groups=batch_groups,
                              ghost_size=ghost_size, channel_groups=call.c, grouping=grouping)


@normalization
def bgn(call: Call, x: Array, scale: Array | None = None, bias: Array | None = None, *,
        num_groups: int | None = None, group_size: int | None = None):
    """Batch Group Normalization (Zhou et al. 2020): channel groups over the whole batch.

    Statistics per group of ``C / num_groups`` contiguous channels over the batch,
    the spatial axes and the channels of the group. ``num_groups=C`` is
    BatchNorm; ``num_groups=1`` pools everything. Running statistics per group.
    """
    groups = call.channel_groups(num_groups, group_size, groups_name="num_groups",
                                 size_name="group_size")
    return _batch_groups_norm(call, x, scale, bias, batch_groups=1, ghost_size=None,
                              channel_groups=groups, grouping="contiguous")


@normalization
def noisy_batch_norm(call: Call, x: Array, scale: Array | None = None,
                     bias: Array | None = None, *, noise_std: float = 3e-4,
                     rng: Array | None = None):
    """BatchNorm with Gaussian noise ``N(0, noise_std^2)`` added to its input in training.

    The noise (paper 000's ablation; best ``noise_std=3e-4``) needs ``rng`` in
    training; inference (running statistics given) adds none.
    """
    noise_std = checks.noise_std(noise_std, call.who)
    if call.training and noise_std:
        if rng is None:
            raise ValueError(
                f"{call.who}: training with noise_std={noise_std} needs an rng key; pass rng= "
                "(in linen: rngs={'noise': key} to apply)."
            )
        noise = jax.random.normal(rng, x.shape, stats.stat_dtype(x.dtype)) * noise_std
        x = (x.astype(noise.dtype) + noise).astype(x.dtype)
    return _batch_groups_norm(call, x, scale, bias, batch_groups=1, ghost_size=None,
                              channel_groups=call.c, grouping="contiguous")
