"""One layer's training step on the accelerator compilers, against flax's BatchNorm.

Compiles, without the hardware (:mod:`seqnorm_jax.aot`), one norm layer's training step
(forward, backward to the input and the parameters, the updated running statistics)
with the batch sharded over every chip, and prints per layer: the all-reduces (count and
bytes per chip), the other collectives, and either the bytes accessed per chip (TPU, the
compiler's cost analysis) or the kernels of the entry computation (GPU: fusions and
custom calls, each a pass over memory), next to flax ``nn.BatchNorm`` compiled the same
way; and the x-sized arrays each program reads and writes per device
(``benchmarks/layers.py``'s ``x_passes``: a GPU kernel that touches ``x``, ``dy``, ``dx``
or an intermediate of their size counts once per such array). Next to each accelerator
figure it prints the same step compiled by XLA:CPU for one device's share of the batch
(bytes accessed from XLA:CPU's cost analysis, x-sized arrays), and the speed targets:
bytes accessed per TPU chip <= 1.1x flax BatchNorm's, x-sized arrays per GPU <= flax
BatchNorm's.

    python benchmarks/compilers.py --topology v5e:16x16            # TPU, both shapes
    python benchmarks/compilers.py --topology h100:8 --shapes 32x32x64
    python benchmarks/compilers.py --topology v5e:4x4 --layers bn,ghost --json out.json

Needs the compiler extra of the topology (``pip install -e ".[tpu]"`` or ``".[cuda]"``).
:func:`layer_step` and :func:`analyze_layer` are also what ``tests/compilers/`` compiles.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import seqnorm_jax as snj
from seqnorm_jax import aot
from seqnorm_jax.aot import P

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.compilers
    from layers import x_passes
except ImportError:
    from benchmarks.layers import x_passes

# name -> layer constructor given the number of devices the batch is split over. Ghost
# groups: one per device (aligned with the shards); SeqNorm and the Four Things layer with
# their papers' channel groups.
LAYERS: dict[str, Callable[[int], Any]] = {
    "flax_bn": lambda d: nn.BatchNorm(),
    "bn": lambda d: snj.BatchNorm(),
    "ghost": lambda d: snj.GhostNorm(batch_groups=d),
    "ghost_2x": lambda d: snj.GhostNorm(batch_groups=2 * d),
    "seqnorm": lambda d: snj.SeqNorm(channel_groups=4, batch_groups=d),
    "seqnorm_sync": lambda d: snj.SeqNorm(channel_groups=4, batch_groups=1),
    "batchgroup": lambda d: snj.BatchGroupNorm(batch_groups=d, channel_groups=4),
    "hn": lambda d: snj.HeterologousNorm(),
    "gnplus": lambda d: snj.GNPlus(num_groups=32),
    "bgn": lambda d: snj.BGN(num_groups=16),
    "noisy_bn": lambda d: snj.NoisyBatchNorm(),
    "groupnorm": lambda d: snj.GroupNorm(num_groups=32),
    "flax_gn": lambda d: nn.GroupNorm(num_groups=32),
}
# Layers whose statistics pool over the whole batch: their collectives are compared with
# flax BatchNorm's.
SYNCHRONIZED = ("bn", "seqnorm_sync", "hn", "gnplus", "bgn", "noisy_bn")
# Ghost groups aligned with the devices: no statistics collective.
ALIGNED = ("ghost", "ghost_2x", "seqnorm", "batchgroup")


def training(layer: Any) -> Any:
    """``layer`` set to training (``use_running_average=False``) where it has the field
    (flax's ``GroupNorm`` has none: it is always per sample)."""
    if any(f.name == "use_running_average" for f in dataclasses.fields(layer)):
        return layer.clone(use_running_average=False)
    return layer


def layer_step(layer: Any) -> Callable[..., Any]:
    """``step(variables, x, dy) -> (dx, parameter gradients, updated batch_stats)``: the
    training forward of ``layer`` with its output cotangent ``dy`` pulled back, as a
    training step runs it (a layer without running statistics returns an empty
    ``batch_stats``)."""
    layer = training(layer)

    def step(variables, x, dy):
        def fwd(params, x):
            return layer.apply({**variables, "params": params}, x, mutable=["batch_stats"],
                               rngs={"noise": jax.random.key(0)})

        _, pull, updated = jax.vjp(fwd, variables["params"], x, has_aux=True)
        dparams, dx = pull(dy)
        return dx, dparams, updated

    return step


def training_output(layer: Any) -> Callable[..., Any]:
    """``f(variables, x) -> y``: the training forward alone (no running statistics)."""
    layer = training(layer)

    def f(variables, x):
        return layer.apply(variables, x, rngs={"noise": jax.random.key(0)},
                           mutable=["batch_stats"])[0]

    return f


def abstract_inputs(layer: Any, shape: Sequence[int], dtype: Any, mesh: Any,
                    spec: P = P("data")) -> tuple[Any, Any, Any]:
    """``(variables, x, dy)`` as sharded ``ShapeDtypeStruct`` s: the variables replicated
    (from ``jax.eval_shape`` of ``init``), ``x`` and ``dy`` of ``shape`` sharded ``spec``."""
    x, layer = jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype)), training(layer)
    variables = jax.eval_shape(
        lambda x: layer.init({"params": jax.random.key(0), "noise": jax.random.key(1)}, x),
        x)
    variables = aot.abstract(variables, mesh, P())
    xs = aot.sharded(shape, dtype, mesh, spec)
    return variables, xs, xs


def analyze_layer(layer: Any, topo: aot.Topology, shape: Sequence[int], dtype: Any = "bfloat16",
                  *, mesh: Any = None, spec: P = P("data"), shard_map: bool = False,
                  forward_only: bool = False, passes: bool = False) -> aot.Analysis:
    """Compile one layer's training step (:func:`layer_step`, or the forward alone) for
    ``topo`` and analyze it. ``shape`` is the global input shape; ``mesh`` defaults to
    all devices on one ``"data"`` axis with ``Auto`` axes. ``shard_map``: the step runs
    inside ``jax.shard_map`` over ``"data"`` with the layer's ``axis_name="data"``.
    ``passes``: return ``(analysis, x-sized arrays read and written per device)``
    (:func:`layers.x_passes` of the compiled program)."""
    mesh = aot.make_mesh(topo) if mesh is None else mesh
    layer = layer.clone(dtype=jnp.dtype(dtype))  # computes in dtype: y and dy are dtype too
    fn = training_output(layer) if forward_only else layer_step(layer)
    variables, x, dy = abstract_inputs(layer, shape, dtype, mesh, spec)
    args = (variables, x) if forward_only else (variables, x, dy)
    if shard_map:
        # The parameters are replicated (invariant) inputs: shard_map's autodiff sums
        # their gradients over the devices itself.
        batch = P("data")
        fn = jax.shard_map(fn, mesh=mesh, in_specs=(P(),) + (batch,) * (len(args) - 1),
                           out_specs=batch if forward_only else (batch, P(), P()))
    compiled = aot.compile_for(fn, *args, mesh=mesh)
    analysis = aot.analyze(compiled, topo)
    if not passes:
        return analysis
    return analysis, x_passes(compiled.as_text(), math.prod(shape) // topo.num_devices)


def cpu_step(layer: Any, shape: Sequence[int], dtype: Any = "bfloat16") -> tuple[float, int]:
    """``(bytes accessed, x-sized arrays read and written)`` of :func:`layer_step` compiled
    by XLA:CPU for one device and an input of ``shape`` (one device's share of a batch)."""
    layer = layer.clone(dtype=jnp.dtype(dtype))
    mesh = jax.sharding.Mesh(jax.devices("cpu")[:1], ("data",))
    compiled = aot.compile_for(layer_step(layer), *abstract_inputs(layer, shape, dtype, mesh),
                               mesh=mesh)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["bytes accessed"]), x_passes(compiled.as_text(), math.prod(shape))


TPU_BYTES_TARGET = 1.1  # bytes accessed per chip against flax BatchNorm's


def statistics_all_reduces(a: aot.Analysis) -> int:
    return a.collective_counts["all-reduce"]


def _row(name: str, a: aot.Analysis, ref: aot.Analysis, gpu: bool, passes: int,
         ref_passes: int) -> dict[str, Any]:
    others = {k: v for k, v in a.collective_counts.items() if v and k != "all-reduce"}
    row = {"layer": name, "x_passes": passes, "flax_x_passes": ref_passes,
           "all_reduces": a.collective_counts["all-reduce"],
           "all_reduce_bytes": a.collective_bytes["all-reduce"], "other_collectives": others,
           "bytes_accessed": a.bytes_accessed, "temporaries": a.memory.temporaries,
           "kernels": a.num_kernels, "flax_all_reduces": ref.collective_counts["all-reduce"],
           "flax_bytes_accessed": ref.bytes_accessed, "flax_kernels": ref.num_kernels}
    row["ratio"] = (a.num_kernels / ref.num_kernels if gpu
                    else a.bytes_accessed / ref.bytes_accessed)
    return row


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--topology", default="v5e:16x16")
    ap.add_argument("--shapes", default="32x32x64,56x56x256",
                    help="per-example shapes HxWxC, comma-separated")
    ap.add_argument("--per-chip", type=int, default=64, help="examples per device")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--layers", default=",".join(LAYERS))
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    names = [n for n in args.layers.split(",") if n]
    unknown = [n for n in names if n not in LAYERS]
    if unknown:
        print(f"error: --layers: unknown {unknown}; choose from {list(LAYERS)}", file=sys.stderr)
        return 2
    try:
        shapes = [tuple(int(v) for v in hwc.split("x")) for hwc in args.shapes.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(not s or min(s) < 1 or s[-1] % 32 for s in shapes) or args.per_chip < 1:
        print(f"error: --shapes {args.shapes!r} --per-chip {args.per_chip}: give per-example "
              "shapes such as 32x32x64,56x56x256 (positive sizes, channels a multiple of 32 "
              "for the layers' groups) and at least one example per chip", file=sys.stderr)
        return 2
    try:
        topo = aot.topology(args.topology)
    except (ValueError, aot.CompilerNotInstalledError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    gpu = topo.chip.platform != "tpu"
    d = topo.num_devices
    print(f"# {topo.name}: {d} devices ({topo.devices[0].device_kind}), {args.dtype}, "
          f"{args.per_chip} examples per device, one layer's training step (forward, "
          f"backward, running statistics); jax {jax.__version__}; compiled on "
          f"{platform.machine()} ({platform.node() or 'host'})")
    rows = []
    for hwc, per_example in zip(args.shapes.split(","), shapes):
        shape = (args.per_chip * d,) + per_example
        ref, ref_passes = analyze_layer(LAYERS["flax_bn"](d), topo, shape, args.dtype,
                                        passes=True)
        per_device = (args.per_chip,) + per_example
        # on one device, one device's share: ghost groups aligned with the devices are
        # one group there (the layers built for one device)
        cpu_ref = cpu_step(LAYERS["flax_bn"](1), per_device, args.dtype)
        print(f"\n## {hwc} (global {shape}; XLA:CPU: one device's {per_device})\n")
        if gpu:
            print("| layer | all-reduces (bytes/device) | other collectives | entry kernels "
                  "| x-sized reads+writes | flax BatchNorm: all-reduces, kernels, x-sized "
                  "| target: x-sized <= flax's | XLA:CPU x-sized (flax's) |")
            print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        else:
            print("| layer | all-reduces (bytes/chip) | other collectives | bytes accessed "
                  f"per chip | vs flax BatchNorm | target <= {TPU_BYTES_TARGET}x | temporaries "
                  "| XLA:CPU bytes vs flax | XLA:CPU x-sized (flax's) |")
            print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for name in names:
            t0 = time.perf_counter()
            a, n_passes = ((ref, ref_passes) if name == "flax_bn" else
                           analyze_layer(LAYERS[name](d), topo, shape, args.dtype, passes=True))
            cpu_bytes, cpu_passes = (cpu_ref if name == "flax_bn" else
                                     cpu_step(LAYERS[name](1), per_device, args.dtype))
            row = _row(name, a, ref, gpu, n_passes, ref_passes) | {
                "shape": hwc, "compile_s": time.perf_counter() - t0,
                "cpu_bytes_accessed": cpu_bytes, "cpu_ratio": cpu_bytes / cpu_ref[0],
                "cpu_x_passes": cpu_passes, "cpu_flax_x_passes": cpu_ref[1]}
            row["target_met"] = (n_passes <= ref_passes if gpu
                                 else row["ratio"] <= TPU_BYTES_TARGET)
            verdict = "PASS" if row["target_met"] else "MISS"
            on_cpu = f"{cpu_passes} ({cpu_ref[1]})"
            rows.append(row)
            others = ", ".join(f"{v} {k}" for k, v in row["other_collectives"].items()) or "-"
            ar = f"{row['all_reduces']} ({row['all_reduce_bytes']:,})"
            if gpu:
                print(f"| {name} | {ar} | {others} | {row['kernels']} | {n_passes} | "
                      f"{row['flax_all_reduces']}, {row['flax_kernels']}, {ref_passes} | "
                      f"{verdict} | {on_cpu} |")
            else:
                print(f"| {name} | {ar} | {others} | {row['bytes_accessed'] / 1e6:.0f} MB | "
                      f"{row['ratio']:.2f}x | {verdict} | {row['temporaries'] / 1e6:.0f} MB | "
                      f"{row['cpu_ratio']:.2f}x | {on_cpu} |")
            sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"topology": topo.name, "devices": d, "dtype": args.dtype,
                       "per_chip": args.per_chip, "jax": jax.__version__, "rows": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
