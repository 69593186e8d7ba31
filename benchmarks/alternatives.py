"""Alternatives measured for the per-sample channel-group misses of ``layers.py`` (the
reasons in ``benchmarks/RESULTS.md``). Every ratio is to flax BatchNorm in the same
interleaved rounds (median), float32.

1. GroupNorm's statistics from one fused two-stage reduction of ``x`` to ``(N, G)``
   (``stats.GroupView`` + ``stats.group_moments``) applied as ``(N, C)`` maps, against the
   library's GroupNorm (per-sample moments pooled with Chan's merge) and the hand-written
   reference of ``layers.py``: training forward and forward+backward.
2. GN+ (``gn_first``) inference with its blended map composed into one ``(N, C)`` map,
   factored into an ``(N, C)`` map followed by a per-channel one, and materialised by a
   ``lax.cond`` before the output pass (hand-written jnp, the same statistics).
3. The HLO instructions in the entry computation of the GroupNorm training forward, the
   library's against the hand-written reference.
4. GroupNorm as the leanest hand-written ``jax.custom_vjp`` (per-(n, c) sums of ``x`` in
   the forward, of ``dy`` and ``dy * x`` in the backward, one elementwise pass each with
   ``(N, C)`` maps: 10 x-sized reads and writes against flax BatchNorm's 11): what a
   custom VJP can reach on feature maps.
5. Per-sample inference (GroupNorm's statistics, then a fixed per-channel map: SeqNorm's
   and GN+'s inference) run over blocks of samples with ``lax.map``, so that a block's
   reduction and output pass could share the cache, against the same math unblocked.
6. The x-sized arrays that the per-(n, c) sums of a bfloat16 ``x`` in float32 read and
   write on XLA:CPU (``jnp.sum(x.astype(float32), spatial)``, the moments' two sums), from
   the compiled HLO: where a float32 copy of ``x`` is written before the reductions.
7. GN+'s inference in the library, its maps computed before the output pass
   (``_maps.computed_first``, what the layer does on XLA:CPU) against the same layer with
   them fused into the pass (the function replaced by the identity while it traces).

    python benchmarks/alternatives.py                      # cifar-64 and cifar-256
    python benchmarks/alternatives.py --shapes cifar-256 --rounds 25
"""

from __future__ import annotations

import argparse
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from layers import (SHAPES, HandWrittenGroupNorm, compile_layer, machine_info, measure,
                    x_passes)

import seqnorm_jax as snj
from seqnorm_jax import stats
from seqnorm_jax.functional._call import setup
from seqnorm_jax.functional import _maps
from seqnorm_jax.functional._maps import finish, normalizer

GROUPS = 32


class GroupStatsAsMaps(nn.Module):
    """GroupNorm whose ``(N, G)`` statistics come straight from the group view (one fused
    two-stage reduction), broadcast to ``(N, C)`` maps for the library's output pass."""

    @nn.compact
    def __call__(self, x, use_running_average=None):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        call = setup("group_norm", x, axis=-1, epsilon=1e-6, dtype=None,
                     use_fast_variance=True, axis_name=None, axis_index_groups=None, mask=None)
        view = stats.GroupView(x.shape, call.axis, None, GROUPS)
        k, st = stats.group_moments(x, view)
        a, b = normalizer(st, 1e-6)
        spatial = view.axes(batch=False, channels=False)
        kept = tuple(1 if i in spatial else d for i, d in enumerate(view.view_shape))
        nc = lambda v: jnp.broadcast_to(v, kept).reshape(x.shape[0], c)
        return finish(call, x, (nc(a), nc(b)), nc(k), scale, bias)


def _per_channel(v, c):
    return jnp.repeat(v, c // GROUPS, axis=1)


def _nc(v, ndim):
    return v.reshape(v.shape[0], *(1,) * (ndim - 2), v.shape[1])


def gn_plus_inference(shape) -> dict:
    """Jitted GN+ inference variants (and flax BatchNorm's map) on one input of ``shape``."""
    x = jax.random.normal(jax.random.key(0), shape)
    n, c = shape[0], shape[-1]
    spatial = tuple(range(1, len(shape) - 1))
    gamma, beta = jnp.linspace(0.5, 1.5, c), jnp.linspace(-1, 1, c)
    mu, sigma, s = jnp.linspace(-0.1, 0.1, c), jnp.linspace(0.9, 1.1, c), 0.3
    ex = lambda v: _nc(v, len(shape))

    def group_map(x):  # per-sample group statistics as (N, C) maps, centred at k
        m, sq = x.mean(spatial), (x * x).mean(spatial)
        mg = m.reshape(n, GROUPS, -1).mean(-1)
        r = lax.rsqrt(sq.reshape(n, GROUPS, -1).mean(-1) - mg * mg + 1e-5)
        per_c = lambda v: _per_channel(v, c)
        return m, per_c(r), (m - per_c(mg)) * per_c(r)  # centred at k = the (n, c) mean

    def composed(x):
        k, a, b = group_map(x)
        a2, b2 = (1 - s) / sigma, -(1 - s) * mu / sigma
        big_a, big_b = a * (s + a2) * gamma, (b * (s + a2) + b2) * gamma + beta
        return (x - ex(k)) * ex(big_a) + ex(big_b)

    def factored(x):
        k, a, b = group_map(x)
        a2, b2 = gamma * (s + (1 - s) / sigma), beta - gamma * (1 - s) * mu / sigma
        return ((x - ex(k)) * ex(a) + ex(b)) * a2 + b2

    def materialised(x):  # the composed map out of a cond XLA cannot fold away
        k, a, b = group_map(x)
        a2, b2 = (1 - s) / sigma, -(1 - s) * mu / sigma
        big_a, big_b = a * (s + a2) * gamma, (b * (s + a2) + b2) * gamma + beta
        big_a, big_b = lax.cond(jnp.isfinite(big_a[0, 0]), lambda: (big_a, big_b),
                                lambda: (big_b, big_a))
        return (x - ex(k)) * ex(big_a) + ex(big_b)

    def flax_bn(x):  # flax BatchNorm's inference: one per-channel map
        return (x - mu) * (gamma / sigma) + beta

    fns = {"flax BatchNorm map": flax_bn, "composed": composed, "factored": factored,
           "materialised (cond)": materialised}
    jitted = {name: jax.jit(f) for name, f in fns.items()}
    return {name: (lambda f=f: f(x)) for name, f in jitted.items()}


def _lean_stats(x):
    """Per-sample group mean and ``1 / std`` ``(N, G)`` from per-(n, c) sums of ``x``."""
    n, c = x.shape[0], x.shape[-1]
    spatial, count = tuple(range(1, x.ndim - 1)), x.size // (n * GROUPS)
    group = lambda v: v.reshape(n, GROUPS, -1).sum(-1)
    mean = group(x.sum(spatial)) / count
    var = group((x * x).sum(spatial)) / count - mean * mean
    return mean, lax.rsqrt(jnp.maximum(var, 0.0) + 1e-5)  # layers.py's hand-written eps


def _lean_gn_fwd(x, scale, bias):
    mean, r = _lean_stats(x)
    a = _per_channel(r, x.shape[-1]) * scale
    b = bias - _per_channel(mean, x.shape[-1]) * a
    return x * _nc(a, x.ndim) + _nc(b, x.ndim), (x, scale, mean, r)


def _lean_gn_bwd(res, dy):
    x, scale, mean, r = res
    n, c = x.shape[0], x.shape[-1]
    spatial, count = tuple(range(1, x.ndim - 1)), x.size // (n * GROUPS)
    t1, t2 = dy.sum(spatial), (dy * x).sum(spatial)  # (N, C)
    m, rr = _per_channel(mean, c), _per_channel(r, c)
    dy_xhat = rr * (t2 - m * t1)  # sum over space of dy * xhat
    group_mean = lambda v: _per_channel(v.reshape(n, GROUPS, -1).sum(-1), c) / count
    m1, m2 = group_mean(scale * t1), group_mean(scale * dy_xhat)
    p, q = -rr * rr * m2, rr * rr * m * m2 - rr * m1
    dx = dy * _nc(rr * scale, x.ndim) + x * _nc(p, x.ndim) + _nc(q, x.ndim)
    return dx, dy_xhat.sum(0), t1.sum(0)


_lean_gn = jax.custom_vjp(lambda x, scale, bias: _lean_gn_fwd(x, scale, bias)[0])
_lean_gn.defvjp(_lean_gn_fwd, _lean_gn_bwd)


class CustomVjpGroupNorm(nn.Module):
    """GroupNorm (unshifted one-pass variance, gamma and beta) as the hand-written custom
    VJP of item 4."""

    @nn.compact
    def __call__(self, x, use_running_average=None):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        return _lean_gn(x, scale, bias)


def sample_block_inference(shape, blocks=(2, 8)) -> dict:
    """Per-sample inference (item 5): GroupNorm statistics, then a per-channel map, on the
    whole batch and over ``lax.map`` blocks of samples."""
    x = jax.random.normal(jax.random.key(0), shape)
    c = shape[-1]
    mu, sigma = jnp.linspace(-0.1, 0.1, c), jnp.linspace(0.9, 1.1, c)

    def whole(x):
        mean, r = _lean_stats(x)
        a = _per_channel(r, c) / sigma
        b = -_per_channel(mean, c) * a - mu / sigma
        return x * _nc(a, x.ndim) + _nc(b, x.ndim)

    def blocked(size):
        def run(x):
            y = lax.map(whole, x.reshape(x.shape[0] // size, size, *x.shape[1:]))
            return y.reshape(x.shape)
        return run

    def flax_bn(x):
        return (x - mu) / sigma

    fns = {"flax BatchNorm map": flax_bn, "whole batch": whole}
    fns.update({f"blocks of {b}": blocked(b) for b in blocks if shape[0] % b == 0})
    jitted = {name: jax.jit(f) for name, f in fns.items()}
    return {name: (lambda f=f: f(x)) for name, f in jitted.items()}


def vjp_difference(a: nn.Module, b: nn.Module, x) -> float:
    """The largest difference between two modules' input and parameter gradients, relative
    to the largest gradient of each array (the same math: the custom VJP against autodiff
    of the hand-written reference)."""
    dy = jax.random.normal(jax.random.key(3), x.shape)

    def grads(m):
        v = m.init(jax.random.key(0), x)
        _, vjp = jax.vjp(lambda p, x: m.apply({**v, "params": p}, x), v["params"], x)
        return vjp(dy)

    diff = jax.tree.map(lambda u, w: jnp.max(jnp.abs(u - w)) / jnp.max(jnp.abs(w)),
                        grads(a), grads(b))
    return float(max(jax.tree.leaves(diff)))


def gn_plus_library_inference(shape) -> dict:
    """GN+'s inference (item 7): the library's, and the same with its maps fused into the
    output pass (``_maps.computed_first`` replaced by the identity while it traces)."""
    x = jax.random.normal(jax.random.key(0), shape) * 2.0 + 1.0
    layer = snj.GNPlus(num_groups=GROUPS, use_running_average=True)
    variables = layer.init(jax.random.key(1), x)
    runs, computed_first = {}, _maps.computed_first
    for name, maps in (("maps computed first", computed_first),
                       ("maps fused into the pass", lambda *m: m)):
        _maps.computed_first = maps
        try:
            f = jax.jit(lambda x: layer.apply(variables, x))
            jax.block_until_ready(f(x))  # traced and compiled now, with this choice
        finally:
            _maps.computed_first = computed_first
        runs[name] = (lambda f=f: f(x))
    return runs


def sum_passes(shape, dtype) -> int:
    """x-sized reads and writes (``layers.x_passes``) of the two per-(n, c) sums of ``x``
    (``x`` and ``x * x`` over the spatial axes, in float32) for an input of ``dtype``."""
    spatial = tuple(range(1, len(shape) - 1))

    def sums(x):
        v = x.astype(jnp.float32)
        return v.sum(spatial), (v * v).sum(spatial)

    hlo = jax.jit(sums).lower(jax.ShapeDtypeStruct(shape, dtype)).compile().as_text()
    return x_passes(hlo, math.prod(shape))


def hlo_instructions(module: nn.Module, x) -> int:
    """Instructions of the compiled training forward's entry computation, without
    parameters, constants, bitcasts and tuple accesses."""
    v = module.init(jax.random.key(0), x, use_running_average=False)
    f = jax.jit(lambda v, x: module.apply(v, x, use_running_average=False,
                                          mutable=["batch_stats"]))
    text = f.lower(v, x).compile().as_text()
    entry = text[text.index("\nENTRY"):]
    entry = entry[:entry.index("\n}")]
    skip = r"parameter\(|constant\(|bitcast\(|get-tuple-element\("
    return sum(1 for line in entry.splitlines()[1:] if line.strip() and not re.search(skip, line))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="cifar-64,cifar-256",
                   help=f"comma-separated names among {list(SHAPES)} (feature maps)")
    p.add_argument("--rounds", type=int, default=15, help="interleaved repetitions (median)")
    args = p.parse_args(argv)
    shapes = args.shapes.split(",")
    for name in shapes:
        if name not in SHAPES or len(SHAPES[name]) != 4:
            p.error(f"--shapes: {name!r} is not one of the feature-map shapes "
                    f"{[k for k, v in SHAPES.items() if len(v) == 4]}")
    machine_info(args.rounds)  # prints the header
    for name in shapes:
        shape = SHAPES[name]
        x = jax.random.normal(jax.random.key(2), shape) * 2.0 + 1.0
        modules = {"flax BatchNorm": nn.BatchNorm(), "GroupNorm (library)":
                   snj.GroupNorm(num_groups=GROUPS), "group stats as (N, C) maps":
                   GroupStatsAsMaps(), "hand-written GroupNorm": HandWrittenGroupNorm(GROUPS),
                   "custom-VJP GroupNorm": CustomVjpGroupNorm()}
        runs = {f"{lname}|{mode}": run for lname, module in modules.items()
                for mode, run in compile_layer(module, x, False).items()}
        runs.update({f"GN+ {k}|infer": run for k, run in gn_plus_inference(shape).items()})
        library = gn_plus_library_inference(shape)
        runs.update({f"GN+ library, {k}|infer": run for k, run in library.items()})
        blocks = sample_block_inference(shape)
        runs.update({f"per-sample {k}|infer": run for k, run in blocks.items()})
        med = measure(runs, args.rounds)
        print(f"\n{name} {shape} float32, ratio to flax BatchNorm:")
        for lname in modules:
            print(f"  {lname:30s} fwd {med[f'{lname}|fwd'] / med['flax BatchNorm|fwd']:5.2f}x"
                  f"   fwd+bwd {med[f'{lname}|fwd+bwd'] / med['flax BatchNorm|fwd+bwd']:5.2f}x")
        base = med["GN+ flax BatchNorm map|infer"]
        for k in ("composed", "factored", "materialised (cond)"):
            print(f"  GN+ inference, map {k:20s} {med[f'GN+ {k}|infer'] / base:5.2f}x")
        for k in library:
            print(f"  GN+ inference (library), {k:25s} "
                  f"{med[f'GN+ library, {k}|infer'] / med['GN+ flax BatchNorm map|infer']:5.2f}x")
        base = med["per-sample flax BatchNorm map|infer"]
        for k in blocks:
            if k != "flax BatchNorm map":
                print(f"  per-sample inference, {k:16s} {med[f'per-sample {k}|infer'] / base:5.2f}x")
        print(f"  custom-VJP GroupNorm against autodiff of the hand-written one: largest "
              f"relative gradient difference {vjp_difference(modules['custom-VJP GroupNorm'], modules['hand-written GroupNorm'], x):.1e}")
        print(f"  the two per-(n, c) sums in float32, x-sized reads and writes: float32 x "
              f"{sum_passes(shape, jnp.float32)}, bfloat16 x {sum_passes(shape, jnp.bfloat16)}")
        print(f"  HLO instructions, training forward: library GroupNorm "
              f"{hlo_instructions(modules['GroupNorm (library)'], x)}, hand-written "
              f"{hlo_instructions(modules['hand-written GroupNorm'], x)}")


if __name__ == "__main__":
    main()
