"""Paper 003's second observation (Sec. 4.6): is BN_mean further from EN_mean than BN_std from EN_std?

Reads a fluctuation experiment's ``results.json`` and prints, per run and layer, the mean
over the recorded steps and neurons (the trajectories kept in the file: the first 2 neurons
of each layer) of ``abs(BN_mean - EN_mean)`` and ``abs(BN_std - EN_std)``, mean +- std over seeds.

    python experiments/full_scale/fluctuation_gaps.py experiments/results/003_fluctuation_mlp4_full
"""

from __future__ import annotations

import collections
import json
import os
import sys

import numpy as np


def gaps(results_dir: str) -> list[tuple[str, str, list[float], list[float]]]:
    with open(os.path.join(results_dir, "results.json")) as f:
        runs = json.load(f)["runs"]
    per = collections.defaultdict(lambda: ([], []))
    for run in runs:
        fl = run["fluctuation"]
        for layer in fl["layers"]:
            s = {k: np.asarray(v, np.float64) for k, v in fl["stats"][layer].items()}
            mean_gap = np.abs(s["bn_mean"] - s["en_mean"][:, None]).mean()
            std_gap = np.abs(s["bn_std"] - s["en_std"][:, None]).mean()
            per[(run["label"], layer)][0].append(float(mean_gap))
            per[(run["label"], layer)][1].append(float(std_gap))
    return [(label, layer, m, s) for (label, layer), (m, s) in per.items()]


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not os.path.isfile(os.path.join(argv[0], "results.json")):
        print("usage: fluctuation_gaps.py RESULTS_DIR (a folder with a fluctuation "
              "experiment's results.json)", file=sys.stderr)
        return 2
    fmt = lambda v: f"{np.mean(v):.3g} +- {np.std(v, ddof=1) if len(v) > 1 else 0.0:.2g}"
    print("| run | layer | abs(BN_mean - EN_mean) | abs(BN_std - EN_std) | seeds |")
    print("| --- | --- | --- | --- | --- |")
    for label, layer, m, s in gaps(argv[0]):
        print(f"| {label} | {layer} | {fmt(m)} | {fmt(s)} | {len(m)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
