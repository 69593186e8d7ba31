"""Train-loop benchmark: an epoch of ``seqnorm-jax train``, run as a user runs it, against
a lean hand-written flax + optax loop on the same data, in the same run.

``seqnorm-jax train`` runs as a subprocess of the console script (``python -c`` of
``seqnorm_jax.cli.main`` where the script is not installed), with its defaults: the
loader, metrics on the device written to ``metrics.jsonl``/``metrics.csv``, the divergence
guard, the progress bar (to a pipe), an evaluation and an Orbax checkpoint after every
epoch. Its epoch time is the ``epoch_time`` it logs (the training steps, up to the
last step's metrics on the host; the evaluation and the checkpoint come after).

The lean loop is the project's reference loop (``minimal_loop.py``, copied here): the
training images normalised once to float32 and held in memory, a NumPy permutation per
epoch, one jitted step per batch (forward, backward, running statistics, optax SGD with
momentum) called on the NumPy slices, no metrics, and no host synchronisation until the
epoch's end. Its SimpleNet is the reference's MLP (784-512-300-10, flax's ``BatchNorm``
before each hidden ReLU); its CNN the same layers as the ``cnn`` model
(conv32-BN-ReLU, conv64-BN-ReLU-pool, conv64-BN-ReLU-pool, dense), with flax's layers.
It also runs in a subprocess of this script (``--lean MODEL``).

Both take SGD with momentum 0.9 at a constant 0.05, batch 128, on Fashion-MNIST's training
set (the CNN on 6400 examples: 50 steps an epoch). Each round starts one run of each,
``--epochs`` epochs long, alternating which goes first; the first epoch of every run
(compilation) is left out and the medians over all other epochs are compared.

    python benchmarks/train_loop.py                           # SimpleNet and the CNN
    python benchmarks/train_loop.py --models simplenet --rounds 5 --epochs 4

``--causes`` breaks SimpleNet's step down instead (in this process, batch 128, the same
10 random batches): the lean loop's step; the same step with the ``simplenet`` model and
a ``TrainState``; then adding, one at a time, what ``train_step`` and the loop's compiled
step add (the gradient norm and accuracy; the finiteness check of everything the step
writes, ``step_finite``; the divergence guard as a ``lax.cond`` between the new and the
old state, as before, or as an elementwise select, as now); the loop's own compiled step
(``Trainer.loop_step``: the metrics accumulator, uint8 images normalised in the step); and
the host's share per batch: ``jax.device_put`` of a batch against the step taking the
NumPy batch, and one batch of the loader. Each is timed over ``--steps`` steps, rounds
interleaved; the median wall and process CPU time per step are printed (CPU time is the
steadier figure on a loaded machine).

    python benchmarks/train_loop.py --causes --rounds 30 --steps 50
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

TARGET = 1.1
FOLDER = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist (IDX files)
MODELS = {"simplenet": None, "cnn": 6400}  # name: training examples (None: all 60000)
BATCH, LR, MOMENTUM = 128, 0.05, 0.9


# ---------------------------------------------------------------------- the lean loop
def load_train(train_size: int | None):
    import numpy as np

    with gzip.open(f"{FOLDER}/train-images-idx3-ubyte.gz") as f:
        xs = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28, 1)
    with gzip.open(f"{FOLDER}/train-labels-idx1-ubyte.gz") as f:
        ys = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int32)
    n = len(xs) if train_size is None else train_size
    return xs[:n], ys[:n]


def lean_model(model_name: str):
    """The lean loop's flax model: the reference's MLP, or the ``cnn`` model's layers."""
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = x.reshape(x.shape[0], -1)
            for w in (512, 300):
                x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Dense(w)(x)))
            return nn.Dense(10)(x)

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            for i, w in enumerate((32, 64, 64)):
                x = nn.Conv(w, (3, 3))(x)
                x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
                if i:
                    x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
            return nn.Dense(10)(x.reshape(x.shape[0], -1))

    return MLP() if model_name == "simplenet" else CNN()


def lean_step(m, tx):
    """The lean loop's jitted step: ``step(params, batch_stats, opt_state, x, y)``."""
    import jax
    import optax

    @jax.jit
    def step(p, bs_, opt, x, y):
        def loss(p):
            lg, upd = m.apply({"params": p, "batch_stats": bs_}, x, train=True,
                              mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(lg, y).mean(), upd
        (l, upd), g = jax.value_and_grad(loss, has_aux=True)(p)
        u, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, u), upd["batch_stats"], opt, l

    return step


def lean(model_name: str, epochs: int) -> list[float]:
    """Seconds of each epoch of the lean loop (the first includes compilation)."""
    import jax
    import numpy as np
    import optax

    xs, ys = load_train(MODELS[model_name])
    xs = (xs.astype(np.float32) / 255. - 0.286) / 0.353
    if model_name == "simplenet":
        xs = xs.reshape(len(xs), -1)
    m = lean_model(model_name)
    v = m.init(jax.random.key(0), xs[:2], train=False)
    tx = optax.sgd(LR, momentum=MOMENTUM)
    opt = tx.init(v["params"])
    step = lean_step(m, tx)

    p, b = v["params"], v["batch_stats"]
    rng = np.random.default_rng(0)
    times = []
    for _ in range(epochs):
        t = time.perf_counter()
        perm = rng.permutation(len(xs))
        for i in range(len(xs) // BATCH):
            idx = perm[i * BATCH:(i + 1) * BATCH]
            p, b, opt, l = step(p, b, opt, xs[idx], ys[idx])
        jax.block_until_ready(l)
        times.append(time.perf_counter() - t)
    return times


# ----------------------------------------------------------------- the CLI, as a user runs it
def cli_command() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "seqnorm-jax")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-c", "import sys; from seqnorm_jax.cli import main; sys.exit(main())"]


def cli(model_name: str, epochs: int) -> list[float]:
    """The ``epoch_time`` of each epoch of a ``seqnorm-jax train`` run."""
    out = tempfile.mkdtemp(prefix=f"train_loop_{model_name}_")
    try:
        args = ["train", "--out", out, "--model", model_name, "--norm", "bn",
                "--dataset", "fashion_mnist", "--data-dir", FOLDER, "--epochs", str(epochs),
                "--batch-size", str(BATCH), "--optimizer", "sgd", "--lr", str(LR),
                "--momentum", str(MOMENTUM), "--schedule", "constant", "--overwrite"]
        if MODELS[model_name] is not None:
            args += ["--train-size", str(MODELS[model_name])]
        done = subprocess.run(cli_command() + args, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"seqnorm-jax train failed ({done.returncode}): "
                             f"{done.stderr.strip().splitlines()[-1:]}")
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        return [r["epoch_time"] for r in rows if r["kind"] == "eval"]
    finally:
        shutil.rmtree(out, ignore_errors=True)


def lean_subprocess(model_name: str, epochs: int) -> list[float]:
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--lean", model_name,
                           "--epochs", str(epochs)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"lean loop failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench(model_name: str, rounds: int, epochs: int) -> dict:
    ours, theirs = [], []
    for r in range(rounds):
        runs = [(cli, ours), (lean_subprocess, theirs)]
        for fn, into in (runs if r % 2 == 0 else runs[::-1]):
            into.extend(fn(model_name, epochs)[1:])  # the first epoch compiles
    m_ours, m_lean = statistics.median(ours), statistics.median(theirs)
    return dict(model=model_name, cli_s=m_ours, lean_s=m_lean, ratio=m_ours / m_lean,
                cli_all=ours, lean_all=theirs)


def causes(rounds: int, steps: int) -> None:
    """Per-step wall and CPU milliseconds of the lean step and of what the loop adds."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from seqnorm_jax import data
    from seqnorm_jax.train import (TrainConfig, Trainer, apply_model, cross_entropy_loss,
                                   step_finite)
    from seqnorm_jax.train.compiled import init_accumulator

    config = TrainConfig(model="simplenet", norm="bn", dataset="fashion_mnist",
                         data_dir=FOLDER, epochs=1, batch_size=BATCH, optimizer="sgd", lr=LR,
                         momentum=MOMENTUM, schedule="constant", progress=False)
    trainer = Trainer(config)
    rng = np.random.default_rng(0)
    x8 = rng.integers(0, 256, (10, BATCH, 28, 28, 1), dtype=np.uint8)
    ys = rng.integers(0, 10, (10, BATCH)).astype(np.int32)
    xf = ((x8 / 255. - 0.286) / 0.353).astype(np.float32)

    m, tx = lean_model("simplenet"), optax.sgd(LR, momentum=MOMENTUM)
    v = m.init(jax.random.key(0), xf[0], train=False)
    step_lean = lean_step(m, tx)

    def state_step(metrics=False, finite=False, guard=None):
        """The lean step on a TrainState with the simplenet model, plus the extras named."""
        @jax.jit
        def step(state, x, y):
            def loss_fn(p):
                logits, stats = apply_model(state, x, train=True, params=p)
                return cross_entropy_loss(logits, y).mean(), (stats, logits)
            (loss, (stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state.params)
            new = state.apply_gradients(grads=grads).replace(batch_stats=stats)
            out = {"loss": loss}
            if metrics:
                out["grad_norm"] = optax.tree.norm(grads)
                out["accuracy"] = jnp.mean(jnp.argmax(logits, -1) == y)
            if finite:
                ok = step_finite(loss, out["grad_norm"], new)
                out["finite"] = ok
                if guard == "cond":
                    new = jax.lax.cond(ok, lambda: new, lambda: state)
                elif guard == "select":
                    new = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, state)
            return new, out
        return step

    state0 = trainer.init_state()

    def run_lean():
        c = [v["params"], v["batch_stats"], tx.init(v["params"])]
        for i in range(steps):
            *c[:], loss = step_lean(*c, xf[i % 10], ys[i % 10])
        return c

    def run_state(step):
        def run():
            s = state0
            for i in range(steps):
                s, _ = step(s, xf[i % 10], ys[i % 10])
            return s
        return run

    def run_loop(put):
        def run():
            s, acc = state0, init_accumulator(config.log_every)
            for i in range(steps):
                if i % config.log_every == 0:
                    acc = init_accumulator(config.log_every)
                batch = {"image": x8[i % 10], "label": ys[i % 10]}
                s, acc = trainer.loop_step(s, jax.device_put(batch) if put else batch, acc)
            return s
        return run

    runs = {
        "lean loop's step (flax MLP, float32 batch)": run_lean,
        "the same step, simplenet model, TrainState": run_state(state_step()),
        "+ gradient norm and accuracy": run_state(state_step(metrics=True)),
        "+ finiteness check (step_finite)": run_state(state_step(True, True)),
        "+ guard as lax.cond (before)": run_state(state_step(True, True, "cond")),
        "+ guard as elementwise select (now)": run_state(state_step(True, True, "select")),
        "Trainer.loop_step, NumPy uint8 batch (now)": run_loop(put=False),
        "Trainer.loop_step, jax.device_put batch (before)": run_loop(put=True),
    }
    for run in runs.values():
        jax.block_until_ready(run())
    wall = {k: [] for k in runs}
    cpu = {k: [] for k in runs}
    for _ in range(rounds):
        for k, run in runs.items():
            t, c = time.perf_counter(), time.process_time()
            jax.block_until_ready(run())
            wall[k].append((time.perf_counter() - t) / steps * 1e3)
            cpu[k].append((time.process_time() - c) / steps * 1e3)
    base_w, base_c = (statistics.median(wall[next(iter(runs))]),
                      statistics.median(cpu[next(iter(runs))]))
    print("| SimpleNet step, batch 128 | wall ms | x lean | CPU ms | x lean |")
    print("| --- | --- | --- | --- | --- |")
    for k in runs:
        w, c = statistics.median(wall[k]), statistics.median(cpu[k])
        print(f"| {k} | {w:.3f} | {w / base_w:.3f} | {c:.3f} | {c / base_c:.3f} |")

    # the host's share per batch
    batch = {"image": x8[0], "label": ys[0]}
    loader = data.make_loader(trainer.train_source, batch_size=BATCH, train=True,
                              normalize=False)
    touch = jax.jit(lambda b: b["label"][0])
    host = {"jax.device_put(batch)": lambda: jax.device_put(batch),
            "a jitted call on the device batch": (lambda d=jax.device_put(batch): touch(d)),
            "a jitted call on the NumPy batch": lambda: touch(batch),
            "one loader batch (uint8, whole-array gather)": lambda: loader.dataset[0]}
    times = {k: [] for k in host}
    for fn in host.values():
        jax.block_until_ready(fn())  # compiles the jitted call
    for _ in range(rounds):
        for k, fn in host.items():
            t = time.perf_counter()
            for _ in range(200):
                out = fn()
            jax.block_until_ready(out)
            times[k].append((time.perf_counter() - t) / 200 * 1e6)
    for k, ts in times.items():
        print(f"  host, per batch: {k}: {statistics.median(ts):.0f} us")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="simplenet,cnn")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each loop")
    parser.add_argument("--epochs", type=int, default=3,
                        help="epochs per run (the first, with compilation, left out)")
    parser.add_argument("--causes", action="store_true",
                        help="break SimpleNet's step down instead (see the docstring)")
    parser.add_argument("--steps", type=int, default=50, help="steps per round (--causes)")
    parser.add_argument("--lean", metavar="MODEL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.lean:  # a run of the lean loop: its epoch times, as JSON
        print(json.dumps(lean(args.lean, args.epochs)))
        return 0
    load = lambda: " ".join(f"{x:.2f}" for x in os.getloadavg())
    if args.causes:
        print(f"{platform.machine()}, {os.cpu_count()} cores; {args.rounds} interleaved "
              f"rounds of {args.steps} steps, median; load average at start: {load()}")
        causes(args.rounds, args.steps)
        print(f"load average at the end: {load()}")
        return 0
    names = [n.strip() for n in args.models.split(",")]
    unknown = [n for n in names if n not in MODELS]
    if unknown or args.rounds < 1 or args.epochs < 2:
        parser.error(f"--models takes {', '.join(MODELS)} (got {unknown}); --rounds >= 1; "
                     "--epochs >= 2")
    print(f"{platform.machine()}, {os.cpu_count()} cores; batch {BATCH}; {args.rounds} "
          f"interleaved runs of each loop x {args.epochs - 1} epochs after the first, median; "
          f"load average at start: {load()}")
    print("| model | seqnorm-jax train epoch (s) | lean loop epoch (s) | ratio | target |")
    print("| --- | --- | --- | --- | --- |")
    for name in names:
        r = bench(name, args.rounds, args.epochs)
        verdict = "PASS" if r["ratio"] <= TARGET else "MISS"
        print(f"| {name} | {r['cli_s']:.3f} | {r['lean_s']:.3f} | {r['ratio']:.3f} | "
              f"{verdict} (<= {TARGET}) |", flush=True)
        print(f"  epochs (s): seqnorm-jax train {[round(t, 3) for t in r['cli_all']]}, lean "
              f"{[round(t, 3) for t in r['lean_all']]}; load average now: {load()}", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.exit(main())
