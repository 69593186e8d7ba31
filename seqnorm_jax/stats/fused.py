"""Per-sample channel groups in one custom VJP: statistics, maps and the output pass.

:func:`normalize` computes ``y = ((v - k) * a1 + b1) * a2 + b2`` on a view ``v`` of ``x``
(:class:`~seqnorm_jax.stats.GroupView`), where ``(a1, b1)`` is a function of the
statistics of ``v`` over the axes ``red1`` and ``(a2, b2)`` one of the statistics of the
first map's output over ``red2`` (SeqNorm's and GN+'s second step) or of the parameters
alone (gamma and beta). Its backward pass is written out: the cotangents of the maps by
reductions of the output cotangent (sums over the last axis alone as one variadic
reduction), the maps' own VJP on those group-sized arrays, and one elementwise pass for
the input gradient, whose group-sized coefficients are computed once. Autodiff of the same
forward (a custom JVP for the moments and checkpointed passes) writes x-sized
intermediates on XLA:CPU where a channel group is split off the last axis of a dense
``(N, C)`` input: 27-28 reads and writes of x-sized arrays per forward+backward of
SeqNorm and GN+, 14 here, against flax BatchNorm's 11 (``benchmarks/layers.py --passes``,
``benchmarks/RESULTS.md``).

What the backward keeps is ``x``, the parameters and group-sized statistics. The rule is
a ``jax.custom_vjp``: reverse mode to any order, no forward mode (``jax.jvp``,
``jax.jacfwd``); the layers use it for dense inputs in training only.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from seqnorm_jax.stats.moments import Moments, _moments_of, _sums, reduce_in_order, stat_dtype

Array = jax.Array
# (moments or None, params) -> (a, b), arrays that broadcast against the view
MapFn = Callable[[Moments | None, Any], tuple[Array, Array]]


def sum_to(v: Array, shape: tuple[int, ...]) -> Array:
    """``v`` summed to ``shape`` (dims kept; ``shape`` broadcasts to ``v.shape``)."""
    red = tuple(i for i, (d, s) in enumerate(zip(v.shape, shape)) if s == 1 and d != 1)
    return reduce_in_order(jnp.sum, v, red) if red else v


def _count(shape: tuple[int, ...], red: tuple[int, ...]) -> int:
    return math.prod(shape[i] for i in red)


def _cotangents(ct_a: Array, ct_b: Array, a: Array, b: Array) -> tuple[Array, Array]:
    """The cotangents of a map ``(a, b)`` (``u -> u * a + b``) from ``ct_a = ct * u`` and
    ``ct_b = ct``, in the maps' dtypes.

    Both sums over the last axis alone (a channel group's members on dense inputs) are
    one variadic reduction: XLA:CPU emits it as one loop that broadcasts the group-sized
    factors of its operands itself, where its vectorized reductions first write each
    broadcast out as large as ``x`` (``benchmarks/RESULTS.md``)."""
    sa, sb, full = jnp.shape(a), jnp.shape(b), ct_a.shape
    if sa == sb and len(sa) == len(full) and sa[:-1] == full[:-1] and sa[-1] == 1 != full[-1]:
        zero = jnp.zeros((), ct_a.dtype)
        ra, rb = lax.reduce((ct_a, jnp.broadcast_to(ct_b, full)), (zero, zero),
                            lambda u, w: (u[0] + w[0], u[1] + w[1]), (len(full) - 1,))
        ra, rb = ra[..., None], rb[..., None]
    else:
        ra, rb = sum_to(ct_a, sa), sum_to(ct_b, sb)
    return ra.astype(jnp.result_type(a)), rb.astype(jnp.result_type(b))


def _forward(x, params, first, second, shape, red1, red2, sums, dtype):
    v = x.reshape(shape).astype(stat_dtype(x.dtype))
    k, mean1, var1 = _moments_of(v, red1, sums)
    m1 = Moments(mean1, var1)
    a1, b1 = first(m1, params)
    z = (v - k) * a1 + b1
    m2 = None
    if red2 is not None:
        kz, mean2, var2 = _moments_of(z, red2, sums)
        m2 = Moments(kz + mean2, var2)
    a2, b2 = second(m2, params)
    y = z if a2 is None else z * a2 + b2
    return y.astype(dtype).reshape(x.shape), k, m1, m2


def _affine_terms(d_mean: Array, d_var: Array, mean: Array, count: int):
    """``(p, q)`` with ``p * u + q = d_mean / count + 2 (u - mean) d_var / count``: the input
    cotangent of a mean and a variance over ``count`` values ``u``, computed once per
    group (an optimization barrier keeps XLA from recomputing them in every element of the
    x-sized pass that uses them)."""
    p = (2 / count) * d_var
    q = d_mean / count - p * mean
    p, q = lax.optimization_barrier((p, q))
    return p, q


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7, 8))
def _normalize(x, params, first, second, shape, red1, red2, sums, dtype):
    return _forward(x, params, first, second, shape, red1, red2, sums, dtype)


def _normalize_fwd(x, params, first, second, shape, red1, red2, sums, dtype):
    y, k, m1, m2 = _forward(x, params, first, second, shape, red1, red2, sums, dtype)
    return (y, k, m1, m2), (x, params, k, m1, m2)


def _normalize_bwd(first, second, shape, red1, red2, sums, dtype, res, cts):
    x, params, k, m1, m2 = res
    ct_y, _, ct_m1, ct_m2 = cts
    (a1, b1), vjp1 = jax.vjp(first, m1, params)
    (a2, b2), vjp2 = jax.vjp(second, m2, params)
    v = x.reshape(shape).astype(k.dtype)
    ct = ct_y.reshape(shape).astype(k.dtype)
    d = v - k
    # the second map: its cotangents, then the cotangent of its input z
    if a2 is None:
        ct_z, dp2 = ct, None
    else:
        z = d * a1 + b1
        dm2, dp2 = vjp2(_cotangents(ct * z, ct, a2, b2))
        ct_z = ct * a2
        if m2 is not None:
            p2, q2 = _affine_terms(dm2.mean + ct_m2.mean, dm2.var + ct_m2.var, m2.mean,
                                   _count(shape, red2))
            ct_z = ct_z + z * p2 + q2
    # the first map, then the input
    dm1, dp1 = vjp1(_cotangents(ct_z * d, ct_z, a1, b1))
    p1, q1 = _affine_terms(dm1.mean + ct_m1.mean, dm1.var + ct_m1.var, m1.mean,
                           _count(shape, red1))
    dx = ct_z * a1 + d * p1 + q1
    dp = dp1 if dp2 is None else jax.tree.map(jnp.add, dp1, dp2)
    return dx.astype(x.dtype).reshape(x.shape), dp


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


def normalize(x: Array, params: Any, first: MapFn, second: MapFn, *, shape: tuple[int, ...],
              red1: tuple[int, ...], red2: tuple[int, ...] | None,
              use_fast_variance: bool = True,
              dtype: Any = None) -> tuple[Array, Array, Moments, Moments | None]:
    """``y = ((v - k) * a1 + b1) * a2 + b2`` for the view ``v = x.reshape(shape)``, with
    its backward pass written out (module docstring).

    ``k, m1``: the shift and the moments of ``v - k`` over ``red1`` (``k`` each group's
    first value; summed as :func:`~seqnorm_jax.stats.moments._moments_of` sums for
    ``use_fast_variance``);
    ``(a1, b1) = first(m1, params)``. ``m2``: the moments of ``z = (v - k) * a1 + b1``
    over ``red2`` (mean included), or None when ``red2`` is None; ``(a2, b2) =
    second(m2, params)``, where ``a2 = None`` means no second map. ``first`` and
    ``second`` are pure functions of small arrays (autodiff takes their VJP); the
    arrays they use come through ``params`` (a pytree), never from a closure.

    Returns ``(y, k, m1, m2)`` (``y`` in ``dtype``, default ``x``'s, and ``x``'s shape;
    the statistics with dims kept and differentiable; ``k`` a constant). Reverse mode to
    any order; forward mode raises, as for any ``jax.custom_vjp``.
    """
    y, k, m1, m2 = _normalize(x, params, first, second, tuple(shape), tuple(red1),
                              None if red2 is None else tuple(red2), _sums(use_fast_variance),
                              jnp.dtype(x.dtype if dtype is None else dtype))
    return y, lax.stop_gradient(k), m1, m2
