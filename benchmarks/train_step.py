"""Train-step benchmark: one optax step of a model with each norm layer, against the
same model with flax's BatchNorm, measured in the same run.

Models: the CIFAR ResNet-20 (batch 128 of 32x32x3) and paper 000's SimpleNet MLP
(784-512-300-10, batch 128). One step = forward, backward, running-statistics update
and an SGD-with-momentum update (``seqnorm_jax.train.train_step``), jit-compiled, with
the state donated as in a real loop. Repetitions are interleaved across layers and the
median is reported.

    python benchmarks/train_step.py                 # both models
    python benchmarks/train_step.py --models resnet20 --rounds 9 --json out.json
"""

from __future__ import annotations

import argparse
import functools
import json
from typing import Any

import flax.linen as nn
import jax
import optax

from layers import machine_info, measure  # benchmarks/layers.py

from seqnorm_jax.models import get_model
from seqnorm_jax.train import create_train_state, train_step

MODELS = {
    # name: (input shape per example, batch size, norm specs)
    "resnet20": ((32, 32, 3), 128, {
        "BatchNorm": "bn", "GhostNorm(G_M=8)": "ghost:batch_groups=8",
        "GroupNorm(G=8)": "gn:num_groups=8", "SeqNorm(G_C=4,G_M=8)": "seqnorm:channel_groups=4,batch_groups=8",
        "BatchGroupNorm(G_M=8,G_C=8)": "batchgroupnorm:batch_groups=8,channel_groups=8",
        "HeterologousNorm": "hn", "GNPlus(G=8)": "gnplus:num_groups=8", "BGN(G=8)": "bgn:num_groups=8",
        "none": "none"}),
    "simplenet": ((28, 28, 1), 128, {
        "BatchNorm": "bn", "GhostNorm(G_M=8)": "ghost:batch_groups=8",
        "GroupNorm(G=4)": "gn:num_groups=4", "SeqNorm(G_C=4,G_M=8)": "seqnorm:channel_groups=4,batch_groups=8",
        "BatchGroupNorm(G_M=8,G_C=4)": "batchgroupnorm:batch_groups=8,channel_groups=4",
        "HeterologousNorm": "hn", "GNPlus(G=4)": "gnplus:num_groups=4", "BGN(G=4)": "bgn:num_groups=4",
        "none": "none"}),
}
TARGETS = {"GhostNorm": 1.05, "SeqNorm": 1.15}


def step_runner(model_name: str, norm, shape, batch: int):
    model = get_model(model_name, norm=norm, num_classes=10)
    x = jax.random.normal(jax.random.key(0), (batch, *shape))
    labels = jax.random.randint(jax.random.key(1), (batch,), 0, 10)
    tx = optax.sgd(0.05, momentum=0.9)
    state = create_train_state(model, jax.random.key(0), x[:1], tx)
    step = jax.jit(train_step, donate_argnums=0)
    data = {"image": x, "label": labels}
    box = [state]

    def run():
        box[0], metrics = step(box[0], data)
        return metrics["loss"]

    return run


def bench_model(model_name: str, rounds: int) -> dict[str, Any]:
    shape, batch, specs = MODELS[model_name]
    runs = {"flax BatchNorm": step_runner(model_name, functools.partial(nn.BatchNorm), shape, batch)}
    for label, spec in specs.items():
        runs[label] = step_runner(model_name, spec, shape, batch)
    med = measure(runs, rounds)
    base = med["flax BatchNorm"]
    rows = [{"layer": k, "ms": v * 1e3, "ratio": v / base} for k, v in med.items()]
    return {"model": model_name, "batch": batch, "rows": rows}


def print_table(res: dict[str, Any]) -> None:
    print(f"\n{res['model']} (batch {res['batch']}), one optax SGD step")
    print(f"{'layer':32s} | {'ms':>9s} {'xBN':>6s}")
    print("-" * 51)
    for row in res["rows"]:
        print(f"{row['layer']:32s} | {row['ms']:9.2f} {row['ratio']:6.2f}")
    for prefix, bound in TARGETS.items():
        r = next(row["ratio"] for row in res["rows"] if row["layer"].startswith(prefix))
        print(f"  target {prefix} <= {bound:.2f}x: {r:.2f}x {'met' if r <= bound else 'MISSED'}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated among {list(MODELS)}")
    p.add_argument("--rounds", type=int, default=11, help="interleaved repetitions (median)")
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args(argv)
    names = args.models.split(",")
    for n in names:
        if n not in MODELS:
            p.error(f"unknown model {n!r}; choose among {list(MODELS)}")
    machine = machine_info(args.rounds)
    results = []
    for n in names:
        res = bench_model(n, args.rounds)
        print_table(res)
        results.append(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rounds": args.rounds, "results": results}, f, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
