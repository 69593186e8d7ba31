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
STD_CENTERS = ("mean_set", "pooled")


def _channel_groups(call: Call, kind: str, groups: int, name: str) -> int | None:
    """The channel groups a set pools over (``None``: each channel alone)."""
    pooling = NORM_SETS[kind].channels
    if pooling == "one":
        return None
    if pooling == "all":
        return 1
    return call.channel_groups(groups, None, groups_name=name)


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
    mean_kind = NORM_SETS[call.choice(mean_set, NORM_SETS, "mean_set")]
    std_kind = NORM_SETS[call.choice(std_set, NORM_SETS, "std_set")]
    call.choice(std_center, STD_CENTERS, "std_center")
    mg = _channel_groups(call, mean_set, mean_groups, "mean_groups")
    sg = _channel_groups(call, std_set, std_groups, "std_groups")
    for name, kind, g in ((mean_set, mean_kind, mg), (std_set, std_kind, sg)):
        if not kind.over_batch or call.training:
            samples = call.n if kind.over_batch and call.axis_name is None else 1
            call.check_set_size(
                samples, 1 if g is None else call.c // g, f"{name!r}",
                BatchSizeError if kind.over_batch else ValueError,
                f"Use a larger batch, or a set with more elements than {name!r} (fewer "
                "mean_groups/std_groups, or a set that pools channels or the batch).")
    around_mean = std_center == "mean_set"
    if (mean_kind.over_batch and std_kind.over_batch and around_mean
            and call.whole_local_batch and (call.training or call.plain_inference)):
        # Both sets pool the batch: everything follows from per-channel statistics.
        return _batch_sets_norm(call, x, scale, bias, mg, sg)

    k, m = stats.sample_moments_about(x, axis=call.axis, use_fast_variance=call.use_fast_variance,
                                      mask=call.mask)
    w = call.weight
    # Per-channel batch moments in training, running ones (blended) in inference; the
    # mean relative to k, so that a batch mean set loses no digits.
    per_channel_rel, update = batch_set(call, m, batch_groups=1, channel_groups=None, k=k,
                                        offset=k)
    per_channel_rel = Moments(*(jnp.broadcast_to(a, (call.n, call.c)) for a in per_channel_rel))
    per_channel = Moments(per_channel_rel.mean + k, per_channel_rel.var)

    def source(kind: NormSet):
        # Sets over the batch start from the per-channel batch (or running) moments;
        # per-sample sets from the sample's own (moments of x - k, count-weighted under
        # a mask).
        return (per_channel, None, None) if kind.over_batch else (m, w, k)

    if mean_kind.over_batch and mg is None:
        mean = per_channel_rel.mean
    else:
        src, weight, offset = source(mean_kind)
        mean = stats.pool(src, batch_groups=None, channel_groups=mg, weight=weight,
                          relative_to=k, offset=offset).mean
    center = mean if around_mean else None  # relative to k
    src, weight, offset = source(std_kind)
    if std_kind.over_batch and call.training and around_mean and not mean_kind.over_batch:
        # A center that differs per sample: pool (v + (m - center)^2) over the batch.
        # (A mean set over the batch gives a per-channel center: then the per-channel
        # batch moments above already hold the whole set, with no second cross-device
        # reduction.)
        var = stats.pool(m, batch_groups=1, channel_groups=sg, center=center,
                         axis_name=call.axis_name, axis_index_groups=call.axis_index_groups,
                         weight=w, offset=k).var
    else:
        if center is not None and offset is None:
            center = center + k  # the frame of the per-channel (absolute) moments
        var = stats.pool(src, batch_groups=None, channel_groups=sg, center=center,
                         weight=weight, offset=offset).var
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
