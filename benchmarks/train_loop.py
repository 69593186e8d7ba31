"""Train-loop benchmark: an epoch of ``seqnorm-jax train``'s ``Trainer`` against a minimal
hand-written flax + optax loop over the same in-memory data, model, batch size and
optimizer, measured in the same run.

The ``Trainer`` runs as ``seqnorm-jax train`` does: its data loader, device prefetch,
metrics accumulated on the device and written to ``metrics.jsonl``/``metrics.csv``,
divergence check, the progress bar (to stderr) and an Orbax checkpoint at the end of the
epoch; its epoch time is the ``epoch_time`` it logs (training only; the evaluation and
the checkpoint come after). The minimal loop shuffles NumPy arrays already in memory
(normalised once), puts each batch on the device and calls one jitted step (forward,
backward, running statistics, the same optax optimizer), with no metrics, no host
synchronisation until the epoch's end. Epochs alternate between the two (first epoch of
each, with compilation, left out), and the medians are compared.

    python benchmarks/train_loop.py                          # SimpleNet and the small CNN
    python benchmarks/train_loop.py --models simplenet --epochs 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
import optax

from layers import machine_info  # benchmarks/layers.py

from seqnorm_jax import data
from seqnorm_jax.train import TrainConfig, Trainer, cross_entropy_loss, load_sources

TARGET = 1.1
MODELS = {  # name: (dataset, model, norm, train examples (None: all))
    "simplenet": ("fashion_mnist", "simplenet", "bn", None),
    "cnn": ("fashion_mnist", "cnn", "bn", 6400),
}


def minimal_loop(trainer: Trainer, images: np.ndarray, labels: np.ndarray):
    """A hand-written epoch over ``images``/``labels`` (normalised float32, in memory)."""
    batch = trainer.config.batch_size
    steps = len(images) // batch
    model, tx = trainer.model, trainer.tx

    @jax.jit
    def step(params, batch_stats, opt_state, x, y):
        def loss_fn(p):
            logits, updates = model.apply({"params": p, "batch_stats": batch_stats}, x,
                                          train=True, mutable=["batch_stats"])
            return cross_entropy_loss(logits, y).mean(), updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    state = trainer.init_state()
    carry = [state.params, state.batch_stats, state.opt_state]
    rng = np.random.default_rng(0)

    def epoch() -> float:
        order = rng.permutation(len(images))
        t0 = time.perf_counter()
        loss = None
        for i in range(steps):
            idx = order[i * batch:(i + 1) * batch]
            x, y = jax.device_put(images[idx]), jax.device_put(labels[idx])
            *carry[:], loss = step(*carry, x, y)
        jax.block_until_ready((carry, loss))
        return time.perf_counter() - t0

    return epoch


def bench(name: str, epochs: int, batch: int) -> dict:
    dataset, model, norm, train_size = MODELS[name]
    config = TrainConfig(model=model, norm=norm, dataset=dataset, epochs=1, batch_size=batch,
                         train_size=train_size, eval_batch_size=2000, optimizer="sgd", lr=0.05,
                         momentum=0.9, schedule="cosine", progress=True)
    train, evaluation = load_sources(config)
    evaluation = data.SubsetSource(evaluation, np.arange(2000))  # a short evaluation
    out = tempfile.mkdtemp(prefix=f"train_loop_{name}_")
    trainer = Trainer(config, out_dir=out, train_source=train, eval_source=evaluation)
    # the same examples, normalised once, in memory (what the loader produces per batch)
    whole = next(iter(data.make_loader(train, batch_size=len(train), train=False)))
    images, labels = np.asarray(whole["image"]), np.asarray(whole["label"]).astype(np.int32)
    minimal = minimal_loop(trainer, images, labels)
    ours, theirs = [], []
    for i in range(epochs + 1):  # alternate; the first of each includes compilation
        result = trainer.fit(overwrite=True)  # each epoch a run of its own in the folder
        t_ours = result.eval_rows[-1]["epoch_time"]
        t_min = minimal()
        if i:
            ours.append(t_ours)
            theirs.append(t_min)
    m_ours, m_min = statistics.median(ours), statistics.median(theirs)
    return dict(model=name, steps=trainer.steps_per_epoch, batch=batch,
                trainer_s=m_ours, minimal_s=m_min, ratio=m_ours / m_min,
                trainer_all=ours, minimal_all=theirs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="simplenet,cnn")
    parser.add_argument("--epochs", type=int, default=5, help="measured epochs of each loop")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args(argv)
    machine = machine_info(args.epochs)
    print(f"{machine['cpu']}, {os.cpu_count()} cores, {jax.device_count()} device(s); batch "
          f"{args.batch_size}; median of {args.epochs} interleaved epochs after one warm-up "
          "epoch each")
    print("| model | steps/epoch | Trainer epoch (s) | minimal loop epoch (s) | ratio | target |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        r = bench(name.strip(), args.epochs, args.batch_size)
        verdict = "PASS" if r["ratio"] <= TARGET else "MISS"
        print(f"| {r['model']} | {r['steps']} | {r['trainer_s']:.3f} | {r['minimal_s']:.3f} | "
              f"{r['ratio']:.3f} | {verdict} (<= {TARGET}) |", flush=True)
        print(f"  epochs (s): Trainer {[round(t, 3) for t in r['trainer_all']]}, minimal "
              f"{[round(t, 3) for t in r['minimal_all']]}", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.exit(main())
