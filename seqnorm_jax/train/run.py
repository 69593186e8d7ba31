"""One :meth:`~seqnorm_jax.train.Trainer.fit` while it runs: epochs, metric windows, divergence.

The compiled step adds each step's metrics to a device-side accumulator; every
``log_every`` steps the run swaps in a fresh one and starts copying the old one to the
host without waiting, and reads it one window later (at epoch ends, checkpoints and
stops: at once). So the host never waits for the device inside an epoch, and a
divergence (flagged by the step itself, which then leaves the state unchanged) is seen
at most two windows after it happened.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
from jax.sharding import Mesh

from seqnorm_jax.distributed import replicate
from seqnorm_jax.train.checkpoint import Checkpointer
from seqnorm_jax.train.compiled import init_accumulator, reset_accumulator
from seqnorm_jax.train.config import TrainConfig
from seqnorm_jax.train.files import raise_if_requested, requested
from seqnorm_jax.train.metrics import MetricsWriter, progress_bar
from seqnorm_jax.train.state import TrainState

__all__ = ["Logger", "Run", "RunParts", "empty_window"]


def empty_window() -> dict[str, float]:
    return {"loss": 0.0, "accuracy": 0.0, "n": 0, "lr": 0.0,
            "epoch_loss": 0.0, "epoch_accuracy": 0.0, "epoch_n": 0}


@dataclasses.dataclass(frozen=True)
class RunParts:
    """What a :class:`Run` works with, built once by its :class:`~seqnorm_jax.train.Trainer`.

    Attributes:
      config: the run's hyperparameters.
      mesh: the data mesh (the metrics accumulator is replicated on it).
      steps_per_epoch, total_steps: the run's length in optimizer steps.
      desc: the label of the progress bar and the run's messages.
      max_steps: stop after this global step (``None``: run all epochs).
      hooks: the step hooks (``hook(state, batch, step)``, optional ``on_epoch_end``).
      batches: ``batches(epoch, start_step, first_step)`` -> ``(n, batch)`` pairs: one
        batch, or with ``n > 1`` a chunk of ``n`` stacked batches for ``loop_steps``.
      loop_step: the compiled step ``(state, batch, acc) -> (state, acc)``.
      loop_steps: its scan over a chunk of batches (``None``: one step per call).
      hook_input: a batch as the model sees it (normalised), for the hooks.
      evaluate: ``evaluate(state)`` -> ``{"eval_loss", "eval_accuracy", ...}``.
      save_checkpoints: write the periodic and epoch-end checkpoints.
      new_checkpointer: opens the run's checkpoints when a stop must save one in a run
        that writes no periodic checkpoints (``None``: the run has no folder).
    """

    config: TrainConfig
    mesh: Mesh
    steps_per_epoch: int
    total_steps: int
    desc: str
    max_steps: int | None
    hooks: Sequence[Any]
    batches: Callable[[int, int, int], Iterable[tuple[int, Any]]]
    loop_step: Callable[..., Any]
    loop_steps: Callable[..., Any] | None
    hook_input: Callable[[Any], Any]
    evaluate: Callable[[TrainState], dict[str, float]]
    save_checkpoints: bool
    new_checkpointer: Callable[[], Checkpointer] | None


class Run:
    """The mutable part of one :meth:`Trainer.fit`: state, metric windows, divergence.

    The compiled step adds each step's metrics to a device-side accumulator; every
    ``log_every`` steps the loop swaps in a fresh one and starts copying the old one to
    the host without waiting, and reads it one window later (at epoch ends, checkpoints
    and stops: at once). So the host never waits for the device inside an epoch, and a
    divergence (flagged by the step itself, which then leaves the state unchanged) is
    seen at most two windows after it happened. A stop signal
    (:func:`~seqnorm_jax.train.files.stop_on_signals`) is seen after the step in flight:
    the run writes the metrics and a checkpoint of that step and raises
    :class:`~seqnorm_jax.train.files.Preempted`.
    """

    def __init__(self, parts: RunParts, state: TrainState, window: dict[str, float],
                 log: Logger, checkpointer: Checkpointer | None):
        self.parts, self.state, self.window, self.log = parts, state, window, log
        self.checkpointer = checkpointer
        # room for a window: rows every log_every steps; flushes at checkpoints come sooner
        self.acc = replicate(init_accumulator(parts.config.log_every), parts.mesh)
        self.pending: list[tuple[Any, dict[str, Any]]] = []
        self.diverged: dict[str, Any] | None = None
        self.skipped: list[tuple[int, str]] = []
        self.t_window = time.perf_counter()

    def loop(self, epoch: int, step_in_epoch: int) -> None:
        p, c = self.parts, self.parts.config
        self.bar = progress_bar(total=p.total_steps, initial=int(jax.device_get(self.state.step)),
                                desc=p.desc, enabled=c.progress, unit="step", leave=False)
        try:
            while epoch < c.epochs:
                # a signal before the first step or during an epoch's evaluation
                if requested() and self._stop_preempted(epoch, step_in_epoch, 0):
                    break
                stopped = self._epoch(epoch, step_in_epoch)
                if stopped:
                    break
                epoch, step_in_epoch = epoch + 1, 0
        finally:
            self.bar.close()

    # -------------------------------------------------------------- metric windows
    def _end_window(self, step: int, epoch_frac: float, n_steps: int) -> None:
        """Queue the current accumulator (copy to host started) and swap in a fresh one."""
        acc = self.acc
        for leaf in acc:
            leaf.copy_to_host_async()
        now = time.perf_counter()
        self.pending.append((acc, dict(step=step, epoch=epoch_frac, n_steps=n_steps,
                                       seconds=now - self.t_window)))
        self.t_window = now
        self.acc = _reset(acc)

    def _drain(self, keep: int) -> None:
        """Read queued accumulators (all but the newest ``keep``) and write their rows."""
        p, c = self.parts, self.parts.config
        while len(self.pending) > keep:
            acc, meta = self.pending.pop(0)
            a = jax.device_get(acc)
            n = int(a.steps)
            w = self.window
            for loss, accuracy in zip(a.loss[:n].tolist(), a.accuracy[:n].tolist()):
                w["loss"] += loss
                w["accuracy"] += accuracy
                w["n"] += 1
                w["epoch_loss"] += loss
                w["epoch_accuracy"] += accuracy
                w["epoch_n"] += 1
            if n:
                w["lr"] = float(a.lr)
            if int(a.diverged_step) >= 0 and self.diverged is None:
                self.diverged = {"step": int(a.diverged_step),
                                 "loss": float(a.diverged_loss)}
            if not meta.get("row") or w["n"] == 0:
                continue
            secs = meta["seconds"]
            ips = meta["n_steps"] * c.batch_size / secs if secs > 0 else None
            step, epoch = meta["step"], meta["epoch"]
            if self.diverged is not None and c.on_divergence == "stop" \
                    and self.diverged["step"] < step:
                # the steps after the diverging one did nothing: the row ends there
                step = self.diverged["step"]
                epoch = step / p.steps_per_epoch
            row = self.log.write(dict(
                kind="train", step=step, epoch=epoch, loss=w["loss"] / w["n"],
                accuracy=w["accuracy"] / w["n"], lr=w["lr"], images_per_sec=ips,
                wall_time=time.time()))
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.3f}",
                                 img_s=f"{ips:.0f}" if ips else "-", refresh=False)
            w.update(loss=0.0, accuracy=0.0, n=0)

    def _flush(self, step: int, epoch_frac: float, n_steps: int, row: bool) -> None:
        """End the window and read everything queued (the host waits for the device)."""
        self._end_window(step, epoch_frac, n_steps)
        self.pending[-1][1]["row"] = row
        self._drain(0)

    # -------------------------------------------------------------------- epochs
    def _epoch(self, epoch: int, start: int) -> bool:
        p, c = self.parts, self.parts.config
        t_epoch = time.perf_counter()
        self.t_window = t_epoch
        step0 = int(jax.device_get(self.state.step))
        spe = p.steps_per_epoch
        step_in_epoch, n_window = start, 0
        stop_on_divergence = c.on_divergence == "stop"
        for n, batch in p.batches(epoch, start, step0):
            if step_in_epoch >= spe:
                break
            step = step0 + step_in_epoch - start
            if n > 1:  # a chunk of steps no hook records (RunParts.loop_steps)
                self.state, self.acc = p.loop_steps(self.state, batch, self.acc)
            else:
                if p.hooks:
                    normalized = p.hook_input(batch)  # hooks see the model's input
                    for hook in p.hooks:
                        hook(self.state, normalized, step)
                self.state, self.acc = p.loop_step(self.state, batch, self.acc)
            step_in_epoch += n
            n_window += n
            self.bar.update(n)
            step += n
            at_end = step_in_epoch == spe
            if step % c.log_every == 0:
                self._end_window(step, epoch + step_in_epoch / spe, n_window)
                self.pending[-1][1]["row"] = True
                n_window = 0
                self._drain(1)
                if self.diverged is not None and stop_on_divergence:
                    return self._stop_diverged()
            if p.max_steps is not None and step >= p.max_steps and not at_end:
                self._flush(step, epoch + step_in_epoch / spe, n_window, False)
                n_window = 0
                if self.diverged is not None and stop_on_divergence:
                    return self._stop_diverged()
                self.save(epoch, step_in_epoch, self.window)
                return True
            if c.checkpoint_every and step % c.checkpoint_every == 0 and not at_end:
                self._flush(step, epoch + step_in_epoch / spe, n_window, False)
                n_window = 0
                if self.diverged is not None and stop_on_divergence:
                    return self._stop_diverged()
                self.save(epoch, step_in_epoch, self.window)
            if not at_end and requested():
                return self._stop_preempted(epoch, step_in_epoch, n_window)
        if step_in_epoch != spe:
            raise RuntimeError(f"the loader gave {step_in_epoch - start} batches in epoch {epoch} "
                               f"after step {start}; expected {spe - start}.")
        end_step = step0 + spe - start
        self._flush(end_step, float(epoch + 1), n_window, True)
        if self.diverged is not None and stop_on_divergence:
            return self._stop_diverged()
        epoch_time = time.perf_counter() - t_epoch
        metrics = p.evaluate(self.state)
        w = self.window
        train_loss = w["epoch_loss"] / max(w["epoch_n"], 1)
        self.log.write(dict(kind="eval", step=end_step, epoch=epoch + 1,
                            eval_loss=metrics["eval_loss"],
                            eval_accuracy=metrics["eval_accuracy"],
                            example_weight=c.example_weight, loss=train_loss,
                            accuracy=w["epoch_accuracy"] / max(w["epoch_n"], 1),
                            epoch_time=epoch_time, wall_time=time.time()))
        w.update(epoch_loss=0.0, epoch_accuracy=0.0, epoch_n=0)
        if c.progress:
            self.bar.write(f"{p.desc} epoch {epoch + 1}/{c.epochs}: train loss "
                           f"{train_loss:.4f}, eval loss {metrics['eval_loss']:.4f}, eval "
                           f"accuracy {metrics['eval_accuracy']:.4f} ({epoch_time:.1f} s)")
        for hook in p.hooks:
            if hasattr(hook, "on_epoch_end"):
                hook.on_epoch_end(self.state, epoch)
        self.save(epoch + 1, 0, w)
        return p.max_steps is not None and end_step >= p.max_steps

    def save(self, epoch: int, step_in_epoch: int, window: dict[str, float],
             force: bool = False) -> None:
        """Checkpoint the state at its data position (``force``: also in a run that writes
        no periodic checkpoints, e.g. a study's run stopped by a signal)."""
        if self.checkpointer is None or not (self.parts.save_checkpoints or force):
            return
        if int(jax.device_get(self.state.step)) in self.checkpointer.all_steps():
            return
        self.checkpointer.save(self.state, {"epoch": epoch, "step_in_epoch": step_in_epoch,
                                            "window": dict(window)})

    def _stop_preempted(self, epoch: int, step_in_epoch: int, n_window: int) -> bool:
        """Stop on a signal: write the metrics, checkpoint this step (also in a run that
        writes no periodic checkpoints), raise :class:`~seqnorm_jax.train.files.Preempted`
        (the caller waits for Orbax to commit). A divergence seen in the metrics just read
        wins: the run stops as diverged (returns True)."""
        p, c = self.parts, self.parts.config
        step = int(jax.device_get(self.state.step))
        self._flush(step, epoch + step_in_epoch / p.steps_per_epoch, n_window, False)
        if self.diverged is not None and c.on_divergence == "stop":
            return self._stop_diverged()  # a divergence is the run's result
        if self.checkpointer is None and p.new_checkpointer is not None:
            self.checkpointer = p.new_checkpointer()
        self.save(epoch, step_in_epoch, self.window, force=True)
        if c.progress:
            self.bar.write(f"{p.desc}: preempted at step {step}; checkpointed")
        raise_if_requested(step)
        return False  # pragma: no cover - raise_if_requested raised

    def _stop_diverged(self) -> bool:
        """Stop a diverged run: read what is queued, checkpoint the last finite state."""
        self._drain(0)
        p = self.parts
        last = int(jax.device_get(self.state.step))  # the step loop left it unchanged since
        epoch, step_in_epoch = divmod(last, p.steps_per_epoch)
        self.save(epoch, step_in_epoch, empty_window())
        self.diverged["last_finite_step"] = last
        if p.config.progress:
            self.bar.write(f"{p.desc}: diverged at step {self.diverged['step']} (loss "
                           f"{self.diverged['loss']}); kept the state of step {last}")
        return True


_reset = jax.jit(reset_accumulator)


class Logger:
    def __init__(self, writer: MetricsWriter | None, rows: list[dict[str, Any]]):
        self.writer, self.rows = writer, rows

    def write(self, row: dict[str, Any]) -> dict[str, Any]:
        row = {k: v for k, v in row.items() if v is not None}
        if self.writer is not None:
            row = self.writer.write(row)
        self.rows.append(row)
        return row
