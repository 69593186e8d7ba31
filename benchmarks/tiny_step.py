"""Tiny-model step overhead: the ``Trainer`` at batch 4 against a lean ``lax.scan`` loop.

Paper 003's 4x128 MLP (``mlp4``, BatchNorm) on Fashion-MNIST at batch 4 with its SGD
(lr 0.1 x 4/128, momentum 0.9, weight decay 5e-4): a step computes in microseconds, so
what the loop does around it sets the pace. Per-step time (epoch time / steps, training
only, the epoch with compilation left out) of

* the ``Trainer`` with one step per call (``steps_per_call=1``, the default) and with
  ``steps_per_call=64`` (:func:`seqnorm_jax.train.compiled.jit_loop_steps`: a ``lax.scan``
  of the same step, chunks cut at each metrics row), each as ``seqnorm-jax`` runs it (loader,
  metrics, divergence guard, progress bar off);
* a lean loop: the epoch's batches normalised and already on the device, one jitted
  ``lax.scan`` over all of them of forward, backward, running statistics and the same
  optax update; nothing else (the floor).

Epochs alternate between the three and the medians are compared.

    python benchmarks/tiny_step.py                       # 2,500 steps per epoch, 3 epochs
    python benchmarks/tiny_step.py --train-size 4000 --epochs 5
    python benchmarks/tiny_step.py --breakdown           # also: where the scanned step's time goes

``--breakdown`` times a ``lax.scan`` of 256 steps of the bare ``train_step``, of the same
step with the divergence guard (``guard=True``) and of the loop's whole step (guard and
metrics accumulator), on batches already normalised on the device.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import numpy as np
import optax

from layers import machine_info  # benchmarks/layers.py

from seqnorm_jax import data
from seqnorm_jax.train import TrainConfig, Trainer, cross_entropy_loss, load_sources, train_step
from seqnorm_jax.train.compiled import init_accumulator, loop_step_fn


def lean_scan_loop(trainer: Trainer, images: np.ndarray, labels: np.ndarray):
    """One jitted ``lax.scan`` over an epoch of batches already on the device."""
    batch = trainer.config.batch_size
    steps = len(images) // batch
    model, tx = trainer.model, trainer.tx

    def step(carry, xy):
        params, batch_stats, opt_state = carry
        x, y = xy

        def loss_fn(p):
            logits, updates = model.apply({"params": p, "batch_stats": batch_stats}, x,
                                          train=True, mutable=["batch_stats"])
            return cross_entropy_loss(logits, y).mean(), updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

    epoch_fn = jax.jit(lambda carry, xs: jax.lax.scan(step, carry, xs))
    state = trainer.init_state()
    carry = [(state.params, state.batch_stats, state.opt_state)]
    rng = np.random.default_rng(0)

    def epoch() -> float:
        order = rng.permutation(len(images))[:steps * batch]
        xs = jax.device_put((images[order].reshape(steps, batch, *images.shape[1:]),
                             labels[order].reshape(steps, batch)))
        jax.block_until_ready(xs)
        t0 = time.perf_counter()
        carry[0], losses = epoch_fn(carry[0], xs)
        jax.block_until_ready((carry[0], losses))
        return time.perf_counter() - t0

    return epoch


def breakdown(trainer: Trainer, rounds: int = 3, steps: int = 256) -> None:
    """Per-step time of a scan of the bare step, with the guard, and the loop's step."""
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    shape = trainer.train_source.info.image_shape
    batches = jax.device_put({
        "image": rng.standard_normal((steps, trainer.config.batch_size, *shape)).astype(np.float32),
        "label": rng.integers(0, 10, (steps, trainer.config.batch_size)).astype(np.int32)})
    state, acc = trainer.init_state(), init_accumulator(steps)

    def scanned(step):
        body = lambda carry, batch: (step(carry[0], batch, carry[1]), None)
        return jax.jit(lambda s, b, a: jax.lax.scan(body, (s, a), b)[0])

    lr = trainer.schedule
    variants = {
        "bare train_step": scanned(lambda s, b, a: (train_step(s, b, lr)[0], a)),
        "train_step with the divergence guard": scanned(
            lambda s, b, a: (train_step(s, b, lr, guard=jnp.bool_(True))[0], a)),
        "the loop's step (guard and metrics)": scanned(loop_step_fn(lr)),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for f in variants.values():
        jax.block_until_ready(f(state, batches, acc))
    for _ in range(rounds):
        for k, f in variants.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(state, batches, acc))
            times[k].append((time.perf_counter() - t0) / steps * 1e6)
    print(f"| scan of {steps} steps | per step (us), median of {rounds} | all rounds |")
    print("| --- | --- | --- |")
    for k, v in times.items():
        print(f"| {k} | {statistics.median(v):.1f} | {[round(t) for t in v]} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-size", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=3, help="measured epochs of each loop")
    parser.add_argument("--steps-per-call", type=int, default=64)
    parser.add_argument("--breakdown", action="store_true",
                        help="also time scans of the bare step, with the guard, the loop's step")
    args = parser.parse_args(argv)
    machine_info(args.epochs)
    config = TrainConfig(model="mlp4", norm="bn", dataset="fashion_mnist", epochs=1,
                         batch_size=4, train_size=args.train_size, eval_batch_size=2000,
                         optimizer="sgd", lr=0.1 * 4 / 128, momentum=0.9, weight_decay=5e-4,
                         schedule="constant", progress=False)
    train, evaluation = load_sources(config)
    evaluation = data.SubsetSource(evaluation, np.arange(2000))  # a short evaluation
    trainers = {n: Trainer(config, train_source=train, eval_source=evaluation,
                           steps_per_call=n) for n in (1, args.steps_per_call)}
    whole = next(iter(data.make_loader(train, batch_size=len(train), train=False)))
    images, labels = np.asarray(whole["image"]), np.asarray(whole["label"]).astype(np.int32)
    lean = lean_scan_loop(trainers[1], images, labels)
    steps = trainers[1].steps_per_epoch
    times: dict[str, list[float]] = {"lean": [], **{f"trainer{n}": [] for n in trainers}}
    for i in range(args.epochs + 1):  # alternate; the first of each includes compilation
        row = {f"trainer{n}": t.fit().eval_rows[-1]["epoch_time"] for n, t in trainers.items()}
        row["lean"] = lean()
        if i:
            for k, v in row.items():
                times[k].append(v)
    per_step = {k: statistics.median(v) / steps * 1e6 for k, v in times.items()}
    print(f"{os.cpu_count()} cores, {jax.device_count()} device(s); mlp4 + BatchNorm, batch 4, "
          f"{steps} steps per epoch; median of {args.epochs} interleaved epochs after one "
          "warm-up epoch each")
    print("| loop | per step (us) | ratio to the lean scan |")
    print("| --- | --- | --- |")
    names = {"trainer1": "Trainer, one step per call",
             f"trainer{args.steps_per_call}":
                 f"Trainer, steps_per_call={args.steps_per_call}",
             "lean": "lean lax.scan over the epoch"}
    for k, label in names.items():
        print(f"| {label} | {per_step[k]:.1f} | {per_step[k] / per_step['lean']:.2f} |")
    print("epochs (s): " + ", ".join(f"{k} {[round(t, 3) for t in v]}" for k, v in times.items()))
    if args.breakdown:
        breakdown(trainers[1], args.epochs)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.exit(main())
