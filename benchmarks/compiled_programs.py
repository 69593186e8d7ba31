"""Fingerprints of the compiled programs of the layer benchmark, to compare two trees
without timing them: a layer whose compiled XLA program is the same instruction for
instruction runs in the same time, whatever the machine's load.

Run it once per tree and compare the two files:

    PYTHONPATH=/path/to/tree-a python benchmarks/compiled_programs.py --json a.json
    PYTHONPATH=/path/to/tree-b python benchmarks/compiled_programs.py --json b.json
    python benchmarks/compiled_programs.py --compare a.json b.json

Each program (shape, dtype, layer, mode: training forward, forward+backward, inference,
as ``benchmarks/layers.py`` compiles them) is fingerprinted by the SHA-256 of its optimized
HLO text without metadata (source lines, op names) and with its instructions renumbered,
together with its count of x-sized reads and writes (:func:`layers.x_passes`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re

import jax
import jax.numpy as jnp

from layers import SHAPES, _configs, layer_modes, x_passes

_METADATA = re.compile(r",?\s*metadata=\{[^}]*\}|,?\s*stack_frame_id=\d+")
_NAME = re.compile(r"%?[A-Za-z_][\w-]*\.\d+(?:\.\d+)*|%[\w.-]+")


def fingerprint(hlo: str) -> str:
    """SHA-256 of ``hlo``'s computations (not the header's tables of source files, functions
    and stack frames) without metadata, with every ``%name`` renumbered in order."""
    lines = hlo.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(("%", "ENTRY")))
    text = _METADATA.sub("", "\n".join(lines[first:]))
    names: dict[str, str] = {}
    text = _NAME.sub(lambda m: names.setdefault(m.group(0), f"%v{len(names)}"), text)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def programs(shapes: list[str], dtypes: list[str], only: str | None) -> dict[str, dict]:
    out = {}
    for name in shapes:
        for dtype in dtypes:
            x = (jax.random.normal(jax.random.key(2), SHAPES[name]) * 2.0 + 1.0).astype(dtype)
            for lname, (module, has_running) in _configs(SHAPES[name], only).items():
                for mode, (fn, args) in layer_modes(module, x, has_running).items():
                    hlo = fn.lower(*args).compile().as_text()
                    out[f"{name} {dtype} {lname} {mode}"] = {
                        "sha": fingerprint(hlo), "x_passes": x_passes(hlo, x.size)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="dense,cifar-256")
    p.add_argument("--dtypes", default="float32")
    p.add_argument("--layers", default=None, help="name prefixes, as layers.py --layers")
    p.add_argument("--json", help="write the fingerprints to this file")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"),
                   help="compare two files written by --json and exit")
    args = p.parse_args()
    if args.compare:
        a, b = (json.load(open(f)) for f in args.compare)
        for key in sorted(set(a) & set(b)):
            same = a[key]["sha"] == b[key]["sha"]
            print(f"{key:60s} {'same' if same else 'DIFFERENT'}  x-sized passes "
                  f"{a[key]['x_passes']} -> {b[key]['x_passes']}")
        return
    out = programs(args.shapes.split(","), [jnp.dtype(d).name for d in args.dtypes.split(",")],
                   args.layers)
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}: {len(out)} programs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
