"""Two normalizations in a row: SeqNorm (group step, ghost step) and GN+ (GN and BN mixed).

Both are computed in one pass over ``x``: the first step is affine per ``(n, c)``, so
the statistics of its output follow from the input's moments
(:func:`seqnorm_jax.stats.map_moments`); on dense inputs, where per-sample moments
would be as large as ``x``, the second step's statistics come from one more
reduction of ``x``: in training through one custom VJP
(:func:`~seqnorm_jax.functional._maps.fused_two_steps`), or, when the batch is split over
devices so that a group spans them, :func:`~seqnorm_jax.functional._maps.two_steps`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqnorm_jax import stats
from seqnorm_jax.functional._call import GHOST_FIX, GN_FIX, BatchSizeError, Call, normalization
from seqnorm_jax.functional._maps import (affine_map, batch_set, blend, compose, finish,
                                          finish_view, fused_two_steps, inference_two_steps,
                                          normalizer, sample_set, two_steps)
from seqnorm_jax.stats import GROUPINGS, Moments

Array = jax.Array

SEQ_NORM_ORDERS = ("group_first", "ghost_first")
# SeqNorm's group step without channel_groups or channel_group_size: one group of every
# channel (the ghost step's default is the library's, one sample group: the whole batch).
SEQ_NORM_CHANNEL_GROUPS = 1
GN_PLUS_VARIANTS = ("gn_first", "bn_first", "parallel")


@normalization
def seq_norm(
    call: Call, x: Array, scale: Array | None = None, bias: Array | None = None, *,
    channel_groups: int | None = None, channel_group_size: int | None = None,
    batch_groups: int | None = None, ghost_size: int | None = None,
    order: str = "group_first", grouping: str = "contiguous",
):
    """SeqNorm (papers 000/001): GroupNorm without affine, then GhostNorm, one gamma/beta.

    ``order="ghost_first"`` runs the two steps the other way round (the paper's
    ablation). Running statistics are those of the ghost step's input; at
    inference the group step is computed from the example and the ghost step
    uses the running statistics. Both steps use ``epsilon``.
    """
    group_first = call.choice(order, SEQ_NORM_ORDERS, "order") == "group_first"
    call.choice(grouping, GROUPINGS, "grouping")
    g_c = call.channel_groups(channel_groups, channel_group_size,
                              default=SEQ_NORM_CHANNEL_GROUPS)
    call.check_set_size(1, call.c // g_c, "sample's channel group",
                        fix="Use fewer channel_groups (a larger channel_group_size).",
                        per_sample=True)
    g_m = 1
    if call.training:
        g_m = call.batch_groups(batch_groups, ghost_size)
        if call.axis_name is None:
            call.check_set_size(call.n // g_m, 1, "ghost batch's", BatchSizeError, GHOST_FIX)

    if call.dense and call.mask is None and call.plain_inference:
        view = stats.GroupView(x.shape, call.axis, None, g_c)
        k, f1, f2 = inference_two_steps(call, x, view, group_first)
        return finish_view(call, x, view, f1, k, scale, bias, f2), None
    if call.dense and call.training and call.whole_local_batch:
        view = stats.GroupView(x.shape, call.axis, g_m, g_c, grouping)
        if stats.pooling.spanning_blocks(x, g_m, grouping) == 1:
            y, k, st1, st2 = fused_two_steps(
                call, x, view, (scale, bias), not group_first,
                lambda m, p: affine_map(view, normalizer(m, call.epsilon), p))
        else:  # ghost batches across devices: statistics merged from blocks (over_blocks)
            k, f1, st1, st2 = two_steps(call, x, view, first_over_batch=not group_first)
            y = finish_view(call, x, view, f1, k, scale, bias, normalizer(st2, call.epsilon))
        ghost_stats = st2 if group_first else Moments(k + st1.mean, st1.var)
        update = Moments(view.per_channel(ghost_stats.mean), view.per_channel(ghost_stats.var))
        return y, update

    k, m = stats.sample_moments_about(x, axis=call.axis, use_fast_variance=call.use_fast_variance,
                                      mask=call.mask)
    ghost = lambda mm, center=None: batch_set(call, mm, batch_groups=g_m, channel_groups=None,
                                              grouping=grouping, k=center, offset=center)
    group = lambda mm, center=None: sample_set(mm, g_c, call.weight, center, offset=center)
    # m holds the moments of x - k: the first step's statistics are relative to k, and
    # the second step's input (the first step's output) is centered already.
    if group_first:
        f1 = normalizer(group(m, k), call.epsilon)
        st2, update = ghost(stats.map_moments(m, *f1))
        f2 = normalizer(st2, call.epsilon)
    else:
        st1, update = ghost(m, k)
        f1 = normalizer(st1, call.epsilon)
        f2 = normalizer(group(stats.map_moments(m, *f1)), call.epsilon)
    y = finish(call, x, compose(f1, f2), k, scale, bias)
    return y, update


@normalization
def gn_plus(
    call: Call, x: Array, scale: Array | None = None, bias: Array | None = None,
    mixing: Array | float = 1.0, *, num_groups: int | None = 32, group_size: int | None = None,
    variant: str = "gn_first",
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
    call.choice(variant, GN_PLUS_VARIANTS, "variant")
    g = call.channel_groups(num_groups, group_size, groups_name="num_groups",
                            size_name="group_size")
    call.check_set_size(1, call.c // g, "sample's group", fix=GN_FIX, per_sample=True)
    if call.training and call.axis_name is None:
        call.check_set_size(call.n, 1, "batch", BatchSizeError)
    gn_first = variant == "gn_first"

    def mixed(s, a2, b2):
        # gn_first: S g + (1 - S) BN(g); bn_first: S GN(b) + (1 - S) b, as maps of g / b
        return ((s + (1 - s) * a2, (1 - s) * b2) if gn_first
                else (s * a2 + (1 - s), s * b2))

    if call.dense and call.mask is None and call.plain_inference and variant != "parallel":
        view = stats.GroupView(x.shape, call.axis, None, g)
        k, f1, (a2, b2) = inference_two_steps(call, x, view, gn_first)
        s = jax.nn.sigmoid(jnp.asarray(mixing, a2.dtype))
        return finish_view(call, x, view, f1, k, scale, bias, mixed(s, a2, b2)), None
    if (call.dense and call.training and call.whole_local_batch
            and variant != "parallel"):
        view = stats.GroupView(x.shape, call.axis, 1, g)
        if stats.pooling.spanning_blocks(x, 1) == 1:
            def second(m, p):
                s = jax.nn.sigmoid(jnp.asarray(p[2], m.mean.dtype))
                return affine_map(view, mixed(s, *normalizer(m, call.epsilon)), p[:2])

            y, k, st1, st2 = fused_two_steps(call, x, view, (scale, bias, jnp.asarray(mixing)),
                                             not gn_first, second)
        else:  # a batch split over devices: statistics merged from blocks (over_blocks)
            k, f1, st1, st2 = two_steps(call, x, view, first_over_batch=not gn_first)
            s = jax.nn.sigmoid(jnp.asarray(mixing, st1.mean.dtype))
            y = finish_view(call, x, view, f1, k, scale, bias,
                            mixed(s, *normalizer(st2, call.epsilon)))
        bn_stats = st2 if gn_first else Moments(k + st1.mean, st1.var)
        update = Moments(view.per_channel(bn_stats.mean), view.per_channel(bn_stats.var))
        return y, update

    k, mc = stats.sample_moments_about(x, axis=call.axis, use_fast_variance=call.use_fast_variance,
                                       mask=call.mask)  # the moments of x - k
    s = jax.nn.sigmoid(jnp.asarray(mixing, mc.mean.dtype))

    # Statistics of x are taken relative to k; those of a normalized x around 0.
    def bn(mm, center=None):
        st, update = batch_set(call, mm, batch_groups=1, channel_groups=None, k=center,
                               offset=center)
        return normalizer(st, call.epsilon), update

    gn = lambda mm, center=None: normalizer(sample_set(mm, g, call.weight, center,
                                                       offset=center), call.epsilon)
    if variant == "gn_first":
        f_gn = gn(mc, k)
        f_bn, update = bn(stats.map_moments(mc, *f_gn))
        ab = blend(s, f_gn, compose(f_gn, f_bn))
    elif variant == "bn_first":
        f_bn, update = bn(mc, k)
        ab = blend(s, compose(f_bn, gn(stats.map_moments(mc, *f_bn))), f_bn)
    else:
        f_bn, update = bn(mc, k)
        ab = blend(s, gn(mc, k), f_bn)
    y = finish(call, x, ab, k, scale, bias)
    return y, update
