"""Heterologous Normalization (paper 003): the mean and the std from different sets."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from seqnorm_jax import stats
from seqnorm_jax.functional._call import BatchSizeError, Call, normalization
from seqnorm_jax.functional._maps import batch_set, finish, finish_view, normalizer
from seqnorm_jax.stats import Moments

Array = jax.Array


class NormSet(NamedTuple):
    """A normalization set of Heterologous Normalization.

    Attributes:
      over_batch: the set pools the samples of the batch.
      channels: how it pools channels: ``"one"`` (each channel alone), ``"all"``
        (every channel) or ``"groups"`` (by the set's group count).
    """

    over_batch: bool
    channels: str


NORM_SETS: dict[str, NormSet] = {
    "batch": NormSet(over_batch=True, channels="one"),
    "instance": NormSet(over_batch=False, channels="one"),
    "layer": NormSet(over_batch=False, channels="all"),
    "group": NormSet(over_batch=False, channels="groups"),
    "extended": NormSet(over_batch=True, channels="groups"),
    "extended_groups": NormSet(over_batch=True, channels="groups"),
}
"""The normalization sets of ``heterologous_norm``'s ``mean_set`` and ``std_set``."""
STD_CENTERS = ("mean_set", "pooled")
"""The values of ``heterologous_norm``'s ``std_center``: the variance around the mean set's
means or around the pooled mean."""


class _Set(NamedTuple):
    """A normalization set resolved for a call: does it pool the batch, and its channel
    groups (``None``: each channel alone)."""

    over_batch: bool
    groups: int | None


class _Source(NamedTuple):
    """The moments a set is pooled from, their counts and their offset (:func:`stats.pool`)."""

    moments: Moments
    weight: Array | None
    offset: Array | None


def _resolve_set(call: Call, name: str, groups: int, groups_name: str, what: str) -> _Set:
    """The set ``name`` with its channel groups, checked to have more than one element."""
    kind = NORM_SETS[call.choice(name, NORM_SETS, what)]
    g = {"one": None, "all": 1}.get(kind.channels)
    if kind.channels == "groups":
        g = call.channel_groups(groups, None, groups_name=groups_name)
    if not kind.over_batch or call.training:
        call.check_set_size(
            call.n if kind.over_batch and call.axis_name is None else 1,
            1 if g is None else call.c // g, f"{name!r}",
            BatchSizeError if kind.over_batch else ValueError,
            f"Use a larger batch, or a set with more elements than {name!r} (fewer "
            "mean_groups/std_groups, or a set that pools channels or the batch).")
    return _Set(kind.over_batch, g)


@normalization
def heterologous_norm(
    call: Call, x: Array, scale: Array | None = None, bias: Array | None = None, *,
    mean_set: str = "batch", std_set: str = "extended", mean_groups: int = 1,
    std_groups: int = 1, std_center: str = "mean_set",
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
    mean_of = _resolve_set(call, mean_set, mean_groups, "mean_groups", "mean_set")
    std_of = _resolve_set(call, std_set, std_groups, "std_groups", "std_set")
    around_mean = call.choice(std_center, STD_CENTERS, "std_center") == "mean_set"
    if (mean_of.over_batch and std_of.over_batch and around_mean
            and call.whole_local_batch and (call.training or call.plain_inference)):
        # Both sets pool the batch: everything follows from per-channel statistics.
        return _batch_sets_norm(call, x, scale, bias, mean_of.groups, std_of.groups)

    # m: each sample's moments of x - k; per-channel batch moments in training, the running
    # ones (blended) in inference, their mean relative to k (a batch mean loses no digits).
    k, m = stats.sample_moments_about(x, axis=call.axis,
                                      use_fast_variance=call.use_fast_variance, mask=call.mask)
    per_channel, update = batch_set(call, m, batch_groups=1, channel_groups=None, k=k, offset=k)
    per_channel = Moments(*(jnp.broadcast_to(a, (call.n, call.c)) for a in per_channel))
    batch = _Source(Moments(per_channel.mean + k, per_channel.var), None, None)
    sample = _Source(m, call.weight, k)
    source = lambda s: batch if s.over_batch else sample
    if mean_of.over_batch and mean_of.groups is None:
        mean = per_channel.mean
    else:
        src = source(mean_of)
        mean = stats.pool(src.moments, batch_groups=None, channel_groups=mean_of.groups,
                          weight=src.weight, relative_to=k, offset=src.offset).mean
    if std_of.over_batch and call.training and around_mean and not mean_of.over_batch:
        # A center that differs per sample: pool (v + (m - center)^2) over the batch. (A
        # batch mean set gives a per-channel center, which the per-channel moments above
        # hold already, with no second cross-device reduction.)
        var = stats.pool(m, batch_groups=1, channel_groups=std_of.groups, center=mean,
                         axis_name=call.axis_name, axis_index_groups=call.axis_index_groups,
                         weight=call.weight, offset=k).var
    else:
        src = source(std_of)
        center = None if not around_mean else mean if src.offset is not None else mean + k
        var = stats.pool(src.moments, batch_groups=None, channel_groups=std_of.groups,
                         center=center, weight=src.weight, offset=src.offset).var
    y = finish(call, x, normalizer(Moments(mean, var), call.epsilon), k, scale, bias)
    return y, update


def _batch_sets_norm(call: Call, x: Array, scale, bias, mean_groups: int | None,
                     std_groups: int | None):
    """Heterologous normalization whose mean and std sets both pool the batch: the
    per-channel batch statistics (one reduction of x; the running ones at inference,
    where the layer is one multiply-add) pooled over channel groups as ``(C,)`` vectors."""
    c = call.c
    view = stats.GroupView(x.shape, call.axis, 1, None)
    if call.training:
        k, st = stats.group_moments(x, view, use_fast_variance=call.use_fast_variance)
        k, per_channel = k.reshape(1, c), Moments(st.mean.reshape(1, c), st.var.reshape(1, c))
        update = Moments(k[0] + per_channel.mean[0], per_channel.var[0])
    else:
        k = lax.stop_gradient(call.running.mean)
        per_channel, update = Moments(jnp.zeros_like(k), call.running.var), None
    mean = per_channel.mean
    if mean_groups is not None:
        mean = stats.pool(per_channel, batch_groups=None, channel_groups=mean_groups,
                          offset=k, relative_to=k).mean
    # the variance around the subtracted mean (relative to k, like the moments)
    var = stats.pool(per_channel, batch_groups=None, channel_groups=std_groups, center=mean,
                     offset=k).var
    a, b = normalizer(Moments(mean[0], var[0]), call.epsilon)
    y = finish_view(call, x, view, (view.channels(a), view.channels(b)), view.channels(k[0]),
                    scale, bias)
    return y, update
