"""Two normalizations in a row: SeqNorm (group step, ghost step) and GN+ (GN and BN mixed).

Both are one per-sample step over channel groups (GroupNorm) and one step over the batch
(GhostNorm; BatchNorm for GN+), in either order, then gamma and beta; GN+ mixes the second
step's output with its input by ``S = sigmoid(lambda)`` (or the two steps side by side).
:func:`_two_steps` is that math, once. How the statistics are reduced is the call's plan
(:func:`seqnorm_jax.stats.plan`): the first step is affine per ``(n, c)``, so the statistics
of its output follow from the input's per-sample moments
(:func:`seqnorm_jax.stats.map_moments`, ``"per_sample"``); on dense inputs, where those
would be as large as ``x``, the second step's statistics come from one more reduction of
``x``: in training through one custom VJP (``"fused"``,
:func:`~seqnorm_jax.functional._maps.fused_two_steps`), or, when the batch is split over
devices so that a group spans them, from blocks (``"blocks"``,
:func:`~seqnorm_jax.functional._maps.two_steps`); in inference the running step is a fixed
map (``"running"``, :func:`~seqnorm_jax.functional._maps.inference_two_steps`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqnorm_jax import stats
from seqnorm_jax.functional._call import GHOST_FIX, GN_FIX, BatchSizeError, Call, normalization
from seqnorm_jax.functional._maps import (ScaleShift, affine_map, batch_set, blend, compose,
                                          finish, finish_view, fused_two_steps,
                                          inference_two_steps, normalizer, sample_set,
                                          two_steps)
from seqnorm_jax.stats import GROUPINGS, Moments

Array = jax.Array

SEQ_NORM_ORDERS = ("group_first", "ghost_first")
"""The values of ``seq_norm``'s ``order``: the group step first (the papers') or the ghost
step first."""
# SeqNorm's group step without channel_groups or channel_group_size: one group of every
# channel (the ghost step's default is the library's, one sample group: the whole batch).
SEQ_NORM_CHANNEL_GROUPS = 1
GN_PLUS_VARIANTS = ("gn_first", "bn_first", "parallel")
"""The values of ``gn_plus``'s ``variant``: where GroupNorm and BatchNorm sit in GN+."""


def _mixed(mixing: Array | None, second: ScaleShift, group_first: bool) -> ScaleShift:
    """The second step's map, mixed with its input by ``S = sigmoid(mixing)`` (GN+; None:
    as it is): ``S u + (1 - S) BN(u)`` after the group step, ``S GN(u) + (1 - S) u`` after
    the batch step, as maps of the first step's output ``u``."""
    if mixing is None:
        return second
    a2, b2 = second
    s = jax.nn.sigmoid(jnp.asarray(mixing, a2.dtype))
    return (s + (1 - s) * a2, (1 - s) * b2) if group_first else (s * a2 + (1 - s), s * b2)


def _two_steps(call: Call, x: Array, scale, bias, *, order: str, channel_groups: int,
               batch_groups: int, grouping: str, mixing: Array | None = None):
    """A per-sample step over ``channel_groups`` and a batch step over ``batch_groups``
    sample groups, ``order`` ``"group_first"``, ``"batch_first"`` or ``"parallel"`` (side
    by side, mixed), the second map mixed by ``mixing`` (:func:`_mixed`), then gamma and
    beta. Returns ``(y, the running-statistics target: the batch step's input's)``."""
    group_first, eps = order == "group_first", call.epsilon
    plan = stats.plan(x, axis=call.axis, family="two_steps", training=call.training,
                      plain_inference=call.plain_inference, masked=call.mask is not None,
                      axis_name=call.axis_name, batch_groups=batch_groups,
                      channel_groups=channel_groups, grouping=grouping,
                      sequential=order != "parallel")
    view = plan.view
    if plan.regime == "running":
        k, f1, f2 = inference_two_steps(call, x, view, group_first)
        f2 = _mixed(mixing, f2, group_first)
        return finish_view(call, x, view, f1, k, scale, bias, f2), None
    if plan.regime == "fused":
        second = lambda m, p: affine_map(view, _mixed(p[2], normalizer(m, eps), group_first),
                                         p[:2])
        params = (scale, bias, None if mixing is None else jnp.asarray(mixing))
        y, k, st1, st2 = fused_two_steps(call, x, view, params, not group_first, second)
    elif plan.regime == "blocks":  # a group spans devices: statistics merged from blocks
        k, f1, st1, st2 = two_steps(call, x, view, first_over_batch=not group_first)
        y = finish_view(call, x, view, f1, k, scale, bias,
                        _mixed(mixing, normalizer(st2, eps), group_first))
    if plan.regime in ("fused", "blocks"):
        batch = st2 if group_first else Moments(k + st1.mean, st1.var)
        return y, Moments(view.per_channel(batch.mean), view.per_channel(batch.var))

    # m: the moments of x - k. The first step's statistics are relative to k; the second
    # step's input (the first step's output) is centered already.
    k, m = stats.sample_moments_about(x, axis=call.axis,
                                      use_fast_variance=call.use_fast_variance, mask=call.mask)
    group = lambda mm, center=None: normalizer(
        sample_set(mm, channel_groups, call.weight, center, offset=center), eps)
    batch = lambda mm, center=None: batch_set(
        call, mm, batch_groups=batch_groups, channel_groups=None, grouping=grouping,
        k=center, offset=center)
    if order == "parallel":
        st, update = batch(m, k)
        ab = blend(jax.nn.sigmoid(jnp.asarray(mixing, st.mean.dtype)), group(m, k),
                   normalizer(st, eps))
    elif group_first:
        f1 = group(m, k)
        st2, update = batch(stats.map_moments(m, *f1))
        ab = compose(f1, _mixed(mixing, normalizer(st2, eps), group_first))
    else:
        st1, update = batch(m, k)
        f1 = normalizer(st1, eps)
        ab = compose(f1, _mixed(mixing, group(stats.map_moments(m, *f1)), group_first))
    # GN+'s inference map (a blend of two steps) is computed before the pass on XLA:CPU
    maps_first = mixing is not None and not call.training
    return finish(call, x, ab, k, scale, bias, maps_first=maps_first), update


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
    call.choice(order, SEQ_NORM_ORDERS, "order")
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
    return _two_steps(call, x, scale, bias, order=order.replace("ghost", "batch"),
                      channel_groups=g_c, batch_groups=g_m, grouping=grouping)


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
    order = {"gn_first": "group_first", "bn_first": "batch_first"}.get(variant, variant)
    return _two_steps(call, x, scale, bias, order=order, channel_groups=g, batch_groups=1,
                      grouping="contiguous", mixing=mixing)
