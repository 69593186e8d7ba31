"""Layer benchmark: every seqnorm-jax layer against flax's BatchNorm in the same run.

For each shape and dtype it times, jit-compiled and in steady state, the training
forward pass (output and running-statistics update), the forward+backward pass
(gradients with respect to the input and the parameters, given an output
cotangent) and, for layers with running statistics, inference. Repetitions are
interleaved across layers (one call of each layer per round) and the median is
reported, so slow drifts of the machine hit every layer alike.

Columns: time in ms; the ratio to flax BatchNorm measured in the same run; and the
fraction of the memory floor: the bytes a normalization layer must move (forward:
read x, write y; forward+backward: also read dy and x, write dx) divided by the
time, relative to the bandwidth of a copy (read x, write y) measured in the same run.

    python benchmarks/layers.py                      # all shapes, float32 and bfloat16
    python benchmarks/layers.py --quick              # one small shape, few rounds
    python benchmarks/layers.py --json results.json  # also write the figures
    python benchmarks/layers.py --tables results.json  # those figures as markdown tables
    python benchmarks/layers.py --passes             # x-sized reads and writes, compiled
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import seqnorm_jax as snj

SHAPES = {
    "dense": (512, 1024),
    "cifar-64": (128, 32, 32, 64),
    "cifar-256": (128, 8, 8, 256),
    "imagenet": (32, 56, 56, 256),
}


class NaiveSeqNorm(nn.Module):
    """The anti-goal: flax GroupNorm (no affine), materialized, then GhostNorm."""

    channel_groups: int
    batch_groups: int

    @nn.compact
    def __call__(self, x, use_running_average=None):
        g = nn.GroupNorm(num_groups=self.channel_groups, epsilon=1e-5, use_scale=False,
                         use_bias=False)(x)
        return snj.GhostNorm(batch_groups=self.batch_groups)(g, use_running_average)


class FlaxGroupNorm(nn.Module):
    """flax's GroupNorm with the call signature of the other layers."""

    num_groups: int

    @nn.compact
    def __call__(self, x, use_running_average=None):
        return nn.GroupNorm(num_groups=self.num_groups)(x)


class HandWrittenGroupNorm(nn.Module):
    """A reference for per-sample statistics in a few lines of jnp, in the formulation
    XLA:CPU runs fastest (per-(n, c) sums over the spatial axes, then pooled over each
    group of channels; on dense inputs a reduction of the split channel axis): GroupNorm
    with flax's unshifted one-pass variance, gamma and beta. With
    ``use_running_average`` it is followed by a fixed per-channel map from running
    statistics, which is what SeqNorm and GN+ compute at inference."""

    num_groups: int

    @nn.compact
    def __call__(self, x, use_running_average=None):
        n, c, g = x.shape[0], x.shape[-1], self.num_groups
        mean = self.variable("batch_stats", "mean", jnp.zeros, (c,))
        var = self.variable("batch_stats", "var", jnp.ones, (c,))
        gamma = self.param("scale", nn.initializers.ones, (c,))
        beta = self.param("bias", nn.initializers.zeros, (c,))
        v = x.astype(jnp.float32)
        spatial = tuple(range(1, x.ndim - 1))
        s1, s2 = v.mean(spatial), (v * v).mean(spatial)  # (N, C); v itself when dense
        m = s1.reshape(n, g, -1).mean(-1, keepdims=True)
        r = jax.lax.rsqrt(s2.reshape(n, g, -1).mean(-1, keepdims=True) - m * m + 1e-5)
        a = (r * gamma.reshape(g, -1)).reshape(n, c)
        b = beta - (m * r * gamma.reshape(g, -1)).reshape(n, c)
        if use_running_average:
            fix = jax.lax.rsqrt(var.value + 1e-5)
            a, b = a * fix, (b - mean.value) * fix
        ex = lambda u: u.reshape(n, *(1,) * len(spatial), c)
        return (v * ex(a) + ex(b)).astype(x.dtype)


def layers(shape) -> dict[str, tuple[nn.Module, bool]]:
    """name -> (module, has running statistics), configured for ``shape``."""
    n, c = shape[0], shape[-1]
    g_m = 8 if n % 8 == 0 else 1
    g_c = 32 if c % 32 == 0 else 1
    return {
        "flax BatchNorm": (nn.BatchNorm(), True),
        "flax GroupNorm": (FlaxGroupNorm(num_groups=g_c), False),
        "BatchNorm": (snj.BatchNorm(), True),
        f"GhostNorm(G_M={g_m})": (snj.GhostNorm(batch_groups=g_m), True),
        f"GroupNorm(G={g_c})": (snj.GroupNorm(num_groups=g_c), False),
        f"SeqNorm(G_C=4,G_M={g_m})": (snj.SeqNorm(channel_groups=4, batch_groups=g_m), True),
        f"BatchGroupNorm(G_M={g_m},G_C={c // 4})": (
            snj.BatchGroupNorm(batch_groups=g_m, channel_groups=c // 4), True),
        "HeterologousNorm": (snj.HeterologousNorm(), True),
        f"GNPlus(G={g_c})": (snj.GNPlus(num_groups=g_c), True),
        f"BGN(G={g_c})": (snj.BGN(num_groups=g_c), True),
        f"naive SeqNorm(G_C=4,G_M={g_m})": (NaiveSeqNorm(channel_groups=4, batch_groups=g_m),
                                             True),
        f"hand-written GroupNorm(G={g_c})": (HandWrittenGroupNorm(num_groups=g_c), True),
    }


def compile_layer(module: nn.Module, x: jax.Array, has_running: bool) -> dict[str, Callable]:
    """Jitted closures of the three modes, each taking no argument and returning arrays."""
    return {mode: functools.partial(fn, *args)
            for mode, (fn, args) in layer_modes(module, x, has_running).items()}


def layer_modes(module: nn.Module, x: jax.Array,
                has_running: bool) -> dict[str, tuple[Callable, tuple]]:
    """mode -> (jitted function, its arguments) for the three modes."""
    variables = module.init(jax.random.key(0), x, use_running_average=False)
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}
    dy = jax.random.normal(jax.random.key(1), x.shape, x.dtype)

    def train_fwd(params, x):
        y, upd = module.apply({**rest, "params": params}, x, use_running_average=False,
                              mutable=["batch_stats"])
        return y, upd

    @jax.jit
    def fwd(params, x):
        return train_fwd(params, x)

    @jax.jit
    def fwd_bwd(params, x, dy):
        y, vjp_fn = jax.vjp(lambda p, x: train_fwd(p, x)[0], params, x)
        # flax promotes a bfloat16 input to float32 output; the cotangent follows y
        return vjp_fn(dy.astype(y.dtype))

    @jax.jit
    def infer(params, x):
        return module.apply({**rest, "params": params}, x, use_running_average=True)

    modes = {"fwd": (fwd, (params, x)), "fwd+bwd": (fwd_bwd, (params, x, dy))}
    if has_running:
        modes["infer"] = (infer, (params, x))
    return modes


_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%(\S+) = (?:\(.*?\)|\S+?\[([\d,]*)\]\S*) "
                          r"(fusion|custom-call|copy|reduce|dot|conditional)\((.*?)\)")
_SHAPE = re.compile(r"\s*(?:ROOT )?%(\S+) = \S+?\[([\d,]*)\]")


def x_passes(hlo: str, size: int) -> int:
    """The x-sized arrays a compiled program reads and writes: over the instructions of its
    entry computation that run a loop (fusions, custom calls, copies, reductions, dots),
    each operand and each output with at least ``size`` elements counts one; slices (which
    read a part) and conditionals (whose branches are not all run) do not. Independent
    of the machine's load, unlike the times."""
    entry = hlo[hlo.index("\nENTRY"):]
    elements, count = {}, 0
    for line in entry.splitlines():
        m = _SHAPE.match(line)
        if m:
            elements[m.group(1)] = math.prod(int(d) for d in m.group(2).split(",") if d)
        m = _INSTRUCTION.match(line)
        if not m or m.group(3) == "conditional" or "slice" in m.group(1):
            continue
        operands = set(re.findall(r"%([\w.-]+)", m.group(4)))
        count += sum(elements.get(o, 0) >= size for o in operands)
        count += elements.get(m.group(1), 0) >= size
    return count


def passes_table(name: str, shape, dtype, only: str | None = None) -> dict[str, Any]:
    """x-sized reads and writes (:func:`x_passes`) of each layer's compiled modes."""
    x = (jax.random.normal(jax.random.key(2), shape) * 2.0 + 1.0).astype(dtype)
    rows = []
    for lname, (module, has_running) in _configs(shape, only).items():
        row = {"layer": lname}
        for mode, (fn, args) in layer_modes(module, x, has_running).items():
            row[mode] = x_passes(fn.lower(*args).compile().as_text(), x.size)
        rows.append(row)
    return {"shape": name, "dims": list(shape), "dtype": jnp.dtype(dtype).name, "rows": rows}


def print_passes(res: dict[str, Any]) -> None:
    print(f"\n{res['shape']} {tuple(res['dims'])} {res['dtype']}: x-sized arrays read and "
          "written by the compiled program (ratio to flax BatchNorm)")
    base = res["rows"][0]
    for row in res["rows"]:
        cells = [f"{mode} {row[mode]:3d} ({row[mode] / base[mode]:4.2f}x)"
                 for mode in ("fwd", "fwd+bwd", "infer") if mode in row]
        print(f"  {row['layer']:34s} " + " | ".join(cells))


def copy_fn(x):
    f = jax.jit(lambda a: a * 2)
    return lambda: f(x)


def machine_info(rounds: int) -> dict[str, str]:
    """The device, jax and Python versions a benchmark ran on; printed as its header."""
    machine = {"device": str(jax.devices()[0].device_kind), "platform": jax.default_backend(),
               "jax": jax.__version__, "cpu": platform.processor() or platform.machine(),
               "python": platform.python_version()}
    print(f"jax {machine['jax']} on {machine['platform']} ({machine['device']}), "
          f"{rounds} interleaved rounds, median")
    return machine


def measure(runs: dict[str, Callable], rounds: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds of each run, with the runs interleaved round by round."""
    for run in runs.values():
        for _ in range(warmup):
            jax.block_until_ready(run())
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for k, run in runs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(run())
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


FLOOR_BYTES = {"fwd": 2, "fwd+bwd": 5, "infer": 2}  # x-sized arrays each mode must move


def bench_shape(name: str, shape, dtype, rounds: int, only: str | None = None) -> dict[str, Any]:
    x = (jax.random.normal(jax.random.key(2), shape) * 2.0 + 1.0).astype(dtype)
    configs = _configs(shape, only)
    runs = {"copy": copy_fn(x)}
    for lname, (module, has_running) in configs.items():
        for mode, run in compile_layer(module, x, has_running).items():
            runs[f"{lname}|{mode}"] = run
    med = measure(runs, rounds)
    nbytes = x.size * x.dtype.itemsize
    copy_bw = 2 * nbytes / med["copy"]
    rows = []
    for lname in configs:
        row = {"layer": lname}
        for mode in ("fwd", "fwd+bwd", "infer"):
            t = med.get(f"{lname}|{mode}")
            if t is None:
                continue
            base = med[f"flax BatchNorm|{mode}"]
            row[mode] = {"ms": t * 1e3, "ratio": t / base,
                         "floor": FLOOR_BYTES[mode] * nbytes / t / copy_bw}
        rows.append(row)
    return {"shape": name, "dims": list(shape), "dtype": jnp.dtype(dtype).name,
            "copy_ms": med["copy"] * 1e3, "copy_GBps": copy_bw / 1e9, "rows": rows}


def _configs(shape, only: str | None) -> dict[str, tuple[nn.Module, bool]]:
    """:func:`layers` of ``shape``, restricted to the name prefixes in ``only`` (and the
    references)."""
    configs = layers(shape)
    if only:
        keep = ("flax BatchNorm", BOUND) + tuple(only.split(","))
        configs = {k: v for k, v in configs.items() if k.split("(")[0] in keep}
    return configs


def print_table(res: dict[str, Any]) -> None:
    print(f"\n{res['shape']} {tuple(res['dims'])} {res['dtype']}: copy {res['copy_ms']:.2f} ms "
          f"({res['copy_GBps']:.1f} GB/s)")
    head = f"{'layer':34s}"
    for mode in ("fwd", "fwd+bwd", "infer"):
        head += f" | {mode + ' ms':>11s} {'xBN':>5s} {'floor':>5s}"
    print(head)
    print("-" * len(head))
    for row in res["rows"]:
        line = f"{row['layer']:34s}"
        for mode in ("fwd", "fwd+bwd", "infer"):
            m = row.get(mode)
            line += (f" | {m['ms']:11.3f} {m['ratio']:5.2f} {m['floor']:5.2f}" if m
                     else f" | {'-':>11s} {'-':>5s} {'-':>5s}")
        print(line)


# The targets, per shape (not medians): (layer name prefix, mode) -> largest ratio to flax
# BatchNorm measured in the same run; SeqNorm and GNPlus get more room on dense inputs,
# where their second step needs a second reduction of x, and so does the forward+backward
# of every per-sample channel group there (its statistics split the last axis of x).
FAST = ("BatchNorm", "GhostNorm", "GroupNorm", "BatchGroupNorm", "HeterologousNorm", "BGN")
TWO_STEP = ("SeqNorm", "GNPlus")
RUNNING = ("BatchNorm", "GhostNorm", "BatchGroupNorm", "HeterologousNorm", "BGN")
# Layers with per-sample statistics of channel groups, whose misses are printed next to
# HandWrittenGroupNorm: its forward bounds GroupNorm's, its inference SeqNorm's and GN+'s.
PER_SAMPLE = ("GroupNorm", "SeqNorm", "GNPlus")
BOUND = "hand-written GroupNorm"


def target(prefix: str, mode: str, shape: str) -> float | None:
    """The bound for one layer, mode and shape, or None where there is none."""
    if mode in ("fwd", "fwd+bwd"):
        if prefix in PER_SAMPLE and mode == "fwd+bwd" and shape == "dense":
            return 1.5  # per-sample channel groups split the last axis of a dense input
        if prefix in FAST:
            return 1.15
        if prefix in TWO_STEP:
            return 1.5 if shape == "dense" else 1.3
    if mode == "infer":
        if prefix in RUNNING:
            return 1.1
        if prefix in TWO_STEP:
            return 1.3
    return None


def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One PASS/MISS line per layer, mode, shape and dtype against :func:`target`, and the
    SeqNorm speed-up over the naive GroupNorm-then-GhostNorm composition."""
    out = []
    print("\ntargets (ratio to flax BatchNorm in the same run, per shape):")
    for res in results:
        rows = {_prefix(row): row for row in res["rows"]}
        for prefix in FAST + TWO_STEP:
            for mode in ("fwd", "fwd+bwd", "infer"):
                bound = target(prefix, mode, res["shape"])
                m = rows.get(prefix, {}).get(mode)
                if bound is None or m is None:
                    continue
                met = m["ratio"] <= bound
                ref = rows.get(BOUND, {}).get(mode) if prefix in PER_SAMPLE else None
                out.append({"layer": prefix, "mode": mode, "shape": res["shape"],
                            "dtype": res["dtype"], "ratio": m["ratio"], "target": bound,
                            "met": met, "hand_written_bound": ref and ref["ratio"]})
                print(f"  {'PASS' if met else 'MISS'} {res['dtype']:8s} {res['shape']:9s} "
                      f"{mode:7s} {prefix:18s} {m['ratio']:5.2f}x (target <= {bound:.2f}x)"
                      + (f"; hand-written GroupNorm {ref['ratio']:.2f}x" if ref and not met
                         else ""))
        if "naive SeqNorm" not in rows or "SeqNorm" not in rows:
            continue
        naive = rows["naive SeqNorm"]["fwd+bwd"]["ms"] / rows["SeqNorm"]["fwd+bwd"]["ms"]
        print(f"       {res['dtype']:8s} {res['shape']:9s} SeqNorm fwd+bwd is {naive:.2f}x "
              "faster than the naive GroupNorm -> GhostNorm")
    f32 = [t for t in out if t["dtype"] == "float32"]
    print(f"\nfloat32: {sum(t['met'] for t in f32)}/{len(f32)} targets met; bfloat16 reported.")
    return out


MODE_TITLES = {"fwd+bwd": "Forward+backward", "fwd": "Training forward", "infer": "Inference"}


def _prefix(row: dict[str, Any]) -> str:
    """A row's layer name without its settings (``G_C`` differs between shapes)."""
    return row["layer"].split("(")[0]


def markdown_tables(data: dict[str, Any]) -> str:
    """The ratios of a ``--json`` file as one markdown table per mode and dtype (layers by
    shapes), the tables of ``benchmarks/RESULTS.md`` and the documentation (docs/speed.md)."""
    out = []
    for dtype in dict.fromkeys(r["dtype"] for r in data["results"]):
        res = [r for r in data["results"] if r["dtype"] == dtype]
        for mode, title in MODE_TITLES.items():
            names = list(dict.fromkeys(_prefix(row) for r in res for row in r["rows"]
                                       if mode in row))
            if not names:
                continue
            out.append(f"{title}, {dtype}, ratio to flax BatchNorm:\n")
            out.append("| layer | " + " | ".join(f"{r['shape']} {tuple(r['dims'])}"
                                                 for r in res) + " |")
            out.append("| --- " * (len(res) + 1) + "|")
            for n in names:
                cells = []
                for r in res:
                    m = next((row.get(mode) for row in r["rows"] if _prefix(row) == n), None)
                    cells.append(f"{m['ratio']:.2f}" if m else "-")
                out.append(f"| {n} | " + " | ".join(cells) + " |")
            out.append("")
    met = [t for t in data["targets"] if t["dtype"] == "float32"]
    out.append(f"float32 targets met: {sum(t['met'] for t in met)} of {len(met)}.")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES),
                   help=f"comma-separated names among {list(SHAPES)}")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--rounds", type=int, default=15, help="interleaved repetitions (median)")
    p.add_argument("--quick", action="store_true", help="cifar-256 float32, 5 rounds")
    p.add_argument("--layers", help="comma-separated name prefixes to time (flax BatchNorm and "
                   "the hand-written GroupNorm, the references, always run), e.g. "
                   "BatchNorm,GhostNorm")
    p.add_argument("--json", help="write the figures to this file")
    p.add_argument("--passes", action="store_true",
                   help="compile only and print the x-sized arrays each program reads and "
                   "writes (independent of the machine's load), instead of timing")
    p.add_argument("--tables", metavar="JSON",
                   help="print the ratios of a --json file as markdown tables and exit")
    args = p.parse_args(argv)
    if args.tables:
        try:
            with open(args.tables) as f:
                print(markdown_tables(json.load(f)))
        except (OSError, ValueError, KeyError) as e:
            p.error(f"--tables {args.tables}: not a file written by --json ({e})")
        return
    shapes = ["cifar-256"] if args.quick else args.shapes.split(",")
    dtypes = ["float32"] if args.quick else args.dtypes.split(",")
    rounds = 5 if args.quick else args.rounds
    for s in shapes:
        if s not in SHAPES:
            p.error(f"unknown shape {s!r}; choose among {list(SHAPES)}")
    if args.passes:
        print(f"jax {jax.__version__} on {jax.default_backend()}: compiled programs")
        tables = []
        for dtype in dtypes:
            for s in shapes:
                tables.append(passes_table(s, SHAPES[s], jnp.dtype(dtype), args.layers))
                print_passes(tables[-1])
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"jax": jax.__version__, "passes": tables}, f, indent=1)
            print(f"\nwrote {args.json}")
        return
    machine = machine_info(rounds)
    results = []
    for dtype in dtypes:
        for s in shapes:
            res = bench_shape(s, SHAPES[s], jnp.dtype(dtype), rounds, args.layers)
            print_table(res)
            results.append(res)
    summary = targets(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rounds": rounds, "results": results,
                       "targets": summary}, f, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
