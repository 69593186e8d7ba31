"""The training loop: epochs, per-epoch evaluation, metrics files, checkpoints, exact resume.

>>> cfg = TrainConfig(model="cnn", norm="ghost:batch_groups=4", dataset="fashion_mnist",
...                   epochs=3, batch_size=128, lr=0.05)
>>> result = Trainer(cfg, out_dir="runs/ghost").fit()
>>> result.eval_rows[-1]["eval_accuracy"]

A run writes ``config.json``, ``metrics.jsonl``, ``metrics.csv`` and ``checkpoints/``
into ``out_dir``. ``fit(resume=True)`` continues from the newest checkpoint and ends
bit-identical to a run that was never interrupted: the state (parameters, optimizer,
running statistics, step) is restored exactly, each epoch's data order is a function of
``(seed, epoch)`` alone and the loader skips the steps already done, and each step's
rngs are a function of ``(seed, step)``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from seqnorm_jax.distributed import data_mesh, replicate, shard_batch
from seqnorm_jax.train.checkpoint import Checkpointer
from seqnorm_jax.train.config import TrainConfig
from seqnorm_jax.train.metrics import MetricsWriter
from seqnorm_jax.train.optim import make_optimizer, make_schedule
from seqnorm_jax.train.state import TrainState, create_train_state
from seqnorm_jax.train.steps import jit_eval_step, jit_train_step

__all__ = ["FitResult", "Trainer", "evaluate", "fit", "load_sources", "build_model"]


@dataclasses.dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns.

    Attributes:
      state: the final :class:`TrainState`.
      train_rows: the train metric rows (``step``, ``epoch``, ``loss``, ``accuracy``,
        ``lr``, ``images_per_sec``), including those of a resumed run's earlier part.
      eval_rows: one row per epoch: ``eval_loss``, ``eval_accuracy``; ``loss`` and
        ``accuracy``, the means over the epoch's training steps; ``epoch_time``, the
        seconds spent training in that epoch (the first includes compilation).
    """

    state: TrainState
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]


def _dtype(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def build_model(config: TrainConfig, num_classes: int) -> nn.Module:
    """``seqnorm_jax.models.get_model`` for ``config`` (model, norm, dtype, model_kwargs)."""
    from seqnorm_jax.models import get_model

    return get_model(config.model, norm=config.norm, num_classes=num_classes,
                     dtype=_dtype(config.dtype), **config.model_kwargs)


def load_sources(config: TrainConfig):
    """The training and evaluation sources of ``config`` (via ``seqnorm_jax.data.load``).

    With ``validation_size`` the evaluation source is the held-out part of the training
    set (``"validation"``) and training uses the rest (``"train_minus_val"``); otherwise
    the training source is ``"train"`` and the evaluation one ``config.eval_split``.
    ``train_size`` then keeps a stratified random subset of the training source
    (``seqnorm_jax.data.stratified_holdout``, seeded by ``seed``).

    Raises:
      seqnorm_jax.data.DatasetNotFoundError: the dataset is not available locally.
    """
    from seqnorm_jax import data

    common = dict(data_dir=config.data_dir, source=config.data_source, seed=config.seed)
    if config.validation_size:
        common["validation_size"] = config.validation_size
        train = data.load(config.dataset, "train_minus_val", **common)
        evaluation = data.load(config.dataset, "validation", **common)
    else:
        train = data.load(config.dataset, "train", **common)
        evaluation = data.load(config.dataset, config.eval_split, **common)
    if config.train_size and config.train_size != len(train):
        if config.train_size > len(train):
            raise ValueError(f"train_size={config.train_size} is larger than the training set "
                             f"({len(train)} examples); use at most {len(train)} or leave it "
                             "unset.")
        train = data.SubsetSource(
            train, data.stratified_holdout(train.labels, config.train_size, config.seed))
    return train, evaluation


def _num_classes(source) -> int:
    info = getattr(source, "info", None)
    if info is None or not hasattr(info, "num_classes"):
        raise ValueError("the data source has no .info.num_classes; pass num_classes to Trainer.")
    return int(info.num_classes)


def _pad_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Pad ``batch`` to ``size`` examples (zeros) and add a 0/1 ``mask``."""
    n = len(batch["label"])
    out = {k: np.asarray(v) for k, v in batch.items() if k in ("image", "label")}
    mask = np.ones((n,), np.float32)
    if n < size:
        pad = size - n
        out = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])
               for k, v in out.items()}
        mask = np.concatenate([mask, np.zeros((pad,), np.float32)])
    out["mask"] = mask
    return out


def evaluate(state: TrainState, source, *, batch_size: int = 1000, example_weight: float = 0.0,
             mesh: Mesh | None = None, eval_step=None) -> dict[str, float]:
    """Loss and accuracy of ``state`` on all of ``source`` (running statistics).

    The batches are padded to a fixed size that the mesh's devices divide (padded
    examples are masked out), so every example counts once and one compilation serves
    all batches.

    Args:
      state: the train state (replicated on ``mesh``).
      source: a random-access data source (``seqnorm_jax.data.load``).
      batch_size: examples per evaluation batch (rounded up to a multiple of the
        number of devices).
      example_weight: "Four Things" alpha passed to every norm layer.
      mesh: the data mesh (default: all devices).
      eval_step: a compiled :func:`~seqnorm_jax.train.jit_eval_step` to reuse.

    Returns:
      ``{"eval_loss", "eval_accuracy", "count"}``.
    """
    from seqnorm_jax import data

    mesh = data_mesh() if mesh is None else mesh
    eval_step = jit_eval_step(mesh) if eval_step is None else eval_step
    devices = mesh.devices.size
    procs = jax.process_count()
    local_batch = -(-batch_size // procs)
    local_devices = max(1, devices // procs)
    padded = -(-local_batch // local_devices) * local_devices
    shard = dict(shard_index=jax.process_index(), shard_count=procs)
    loader = data.make_loader(source, batch_size=local_batch, train=False, drop_remainder=False,
                              **shard)
    # Every process must run the same number of steps (they are collective): the first
    # process has the most batches; the others finish with fully masked ones.
    num_batches = data.steps_per_epoch(source, local_batch, False, procs, shard_index=0)
    filler = None
    totals = None
    batches = iter(loader)
    for _ in range(num_batches):
        batch = next(batches, None)
        if batch is None:
            batch = {k: v[:0] for k, v in filler.items()}
        filler = batch
        sums = eval_step(state, shard_batch(_pad_batch(batch, padded), mesh),
                         jnp.float32(example_weight))
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    if totals is None:
        raise ValueError("evaluate: the evaluation source is empty.")
    totals = jax.device_get(totals)
    count = float(totals["count"])
    return {"eval_loss": float(totals["loss_sum"]) / count,
            "eval_accuracy": float(totals["correct"]) / count, "count": count}


class Trainer:
    """Train ``config`` on a data-parallel mesh, evaluating after every epoch.

    Args:
      config: the hyperparameters.
      out_dir: where ``config.json``, the metrics files and ``checkpoints/`` go;
        ``None`` writes nothing (and cannot resume).
      model: a flax module overriding ``config.model``/``config.norm``.
      train_source, eval_source: random-access sources overriding the dataset of
        ``config`` (both or neither).
      mesh: the data mesh (default: all devices, :func:`seqnorm_jax.distributed.data_mesh`).
      save_checkpoints: write Orbax checkpoints into ``out_dir/checkpoints`` (at epoch
        ends and every ``config.checkpoint_every`` steps).
      max_steps: stop after this global step (simulates an interruption; the
        checkpoint at that point allows ``fit(resume=True)`` to continue).
      desc: the progress bar's label.
      step_hooks: callables ``hook(state, batch, step)`` run before every optimizer step
        with the state before the update, the sharded batch ``{"image", "label"}`` and
        the 0-based global step (e.g. :class:`seqnorm_jax.analysis.LandscapeRecorder`);
        a hook's optional ``on_epoch_end(state, epoch)`` method runs after each epoch's
        evaluation. Hooks must not change the state; they do not see skipped steps of a
        resumed run.
    """

    def __init__(self, config: TrainConfig, *, out_dir: str | os.PathLike | None = None,
                 model: nn.Module | None = None, train_source=None, eval_source=None,
                 mesh: Mesh | None = None, save_checkpoints: bool = True,
                 max_steps: int | None = None, desc: str | None = None,
                 step_hooks: Iterable[Any] = ()):
        config.validate()
        self.config = config
        self.out_dir = None if out_dir is None else os.fspath(out_dir)
        self.mesh = data_mesh() if mesh is None else mesh
        if (train_source is None) != (eval_source is None):
            raise ValueError("Trainer: pass both train_source and eval_source, or neither.")
        if train_source is None:
            train_source, eval_source = load_sources(config)
        self.train_source, self.eval_source = train_source, eval_source
        self.model = build_model(config, _num_classes(train_source)) if model is None else model
        self.save_checkpoints = save_checkpoints and self.out_dir is not None
        self.max_steps = max_steps
        self.desc = desc or f"{config.model}/{config.norm}"
        self.step_hooks = list(step_hooks)
        for hook in self.step_hooks:
            if not callable(hook):
                raise ValueError(f"Trainer: step_hooks must be callables hook(state, batch, step); "
                                 f"got {hook!r}.")

        devices = self.mesh.devices.size
        if config.batch_size % devices:
            raise ValueError(
                f"batch_size={config.batch_size} is not divisible by the {devices} devices of "
                f"the mesh; use a multiple of {devices}.")
        procs = jax.process_count()
        self.local_batch = config.batch_size // procs
        self.shard = (dict(shard_index=jax.process_index(), shard_count=procs)
                      if procs > 1 else {})
        from seqnorm_jax import data

        self.steps_per_epoch = data.steps_per_epoch(
            train_source, self.local_batch, True, procs if procs > 1 else None)
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"batch_size={config.batch_size} is larger than the training set "
                f"({len(train_source)} examples); use a smaller batch size.")
        self.total_steps = self.steps_per_epoch * config.epochs
        self.schedule = make_schedule(
            config.schedule, lr=config.lr, total_steps=self.total_steps,
            steps_per_epoch=self.steps_per_epoch, warmup_epochs=config.warmup_epochs,
            warmup_init_lr=config.warmup_init_lr, end_lr=config.end_lr,
            one_cycle_init_lr=config.one_cycle_init_lr,
            one_cycle_final_lr=config.one_cycle_final_lr,
            one_cycle_pct_up=config.one_cycle_pct_up,
            one_cycle_pct_down=config.one_cycle_pct_down,
            decay_epochs=config.decay_epochs, decay_factor=config.decay_factor)
        self.tx = make_optimizer(
            config.optimizer, self.schedule, momentum=config.momentum,
            weight_decay=config.weight_decay, norm_decay=config.norm_weight_decay,
            grad_clip_norm=config.grad_clip_norm, b1=config.b1, b2=config.b2)
        self.train_step = jit_train_step(self.mesh, self.schedule,
                                         num_micro_batches=config.grad_accum_steps,
                                         output_noise=config.output_noise)
        self.eval_step = jit_eval_step(self.mesh)

    # ------------------------------------------------------------------------ state
    def init_state(self) -> TrainState:
        """A fresh state (seeded by ``config.seed``), replicated on the mesh."""
        sample = np.zeros((1, *self.train_source.info.image_shape), np.float32)
        state = create_train_state(self.model, jax.random.key(self.config.seed), sample, self.tx)
        return replicate(state, self.mesh)

    def _loader(self, epoch: int, start_step: int) -> Iterable[dict[str, np.ndarray]]:
        from seqnorm_jax import data

        c = self.config
        return data.make_loader(self.train_source, batch_size=self.local_batch, train=True,
                                seed=c.seed, epoch=epoch, augment=c.augment,
                                drop_remainder=True, non_iid_classes=c.non_iid_classes,
                                num_workers=c.data_workers, start_step=start_step,
                                **self.shard)

    def evaluate(self, state: TrainState, source=None, example_weight: float | None = None
                 ) -> dict[str, float]:
        """:func:`evaluate` on ``source`` (default: the evaluation source)."""
        return evaluate(state, self.eval_source if source is None else source,
                        batch_size=self.config.eval_batch_size,
                        example_weight=(self.config.example_weight if example_weight is None
                                        else example_weight),
                        mesh=self.mesh, eval_step=self.eval_step)

    # ------------------------------------------------------------------------ fit
    def fit(self, resume: bool = False) -> FitResult:
        """Train for ``config.epochs`` epochs (or up to ``max_steps``); see the module docstring.

        Args:
          resume: continue from the newest checkpoint in ``out_dir/checkpoints`` if there
            is one (a fresh start otherwise).
        """
        c = self.config
        state = self.init_state()
        epoch, step_in_epoch = 0, 0
        window = {"loss": 0.0, "accuracy": 0.0, "n": 0, "lr": 0.0,
                  "epoch_loss": 0.0, "epoch_accuracy": 0.0, "epoch_n": 0}
        checkpointer = None
        if self.save_checkpoints or resume:
            if self.out_dir is None:
                raise ValueError("Trainer.fit(resume=True) needs an out_dir with checkpoints.")
            checkpointer = Checkpointer(os.path.join(self.out_dir, "checkpoints"),
                                        keep=c.keep_checkpoints)
        resume_step = None
        if resume and checkpointer.latest_step() is not None:
            state, position = checkpointer.restore(state)
            epoch, step_in_epoch = int(position["epoch"]), int(position["step_in_epoch"])
            window = dict(position["window"])
            resume_step = int(jax.device_get(state.step))
        writer = None
        if self.out_dir is not None:
            os.makedirs(self.out_dir, exist_ok=True)
            c.to_json(os.path.join(self.out_dir, "config.json"))
            writer = MetricsWriter(self.out_dir, resume_step=resume_step)
        rows = [] if writer is None else _read_rows(writer.jsonl_path)
        log = _Logger(writer, rows)

        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, initial=int(jax.device_get(state.step)),
                   desc=self.desc, disable=not c.progress, unit="step", dynamic_ncols=True,
                   leave=False)
        try:
            while epoch < c.epochs:
                state, step_in_epoch, window, stopped = self._run_epoch(
                    state, epoch, step_in_epoch, window, log, bar, checkpointer)
                if stopped:
                    break
                epoch, step_in_epoch = epoch + 1, 0
        finally:
            bar.close()
            if checkpointer is not None:
                checkpointer.close()
        train_rows = [r for r in log.rows if r["kind"] == "train"]
        eval_rows = [r for r in log.rows if r["kind"] == "eval"]
        return FitResult(state=state, train_rows=train_rows, eval_rows=eval_rows)

    def _run_epoch(self, state, epoch, start, window, log, bar, checkpointer):
        c = self.config
        t_epoch = time.perf_counter()
        t_window, n_window_steps = time.perf_counter(), 0
        pending = []
        step_in_epoch = start
        step0 = int(jax.device_get(state.step))

        def flush(state, force_row: bool):
            nonlocal t_window, n_window_steps, pending
            for m in jax.device_get(pending):
                loss, accuracy = float(m["loss"]), float(m["accuracy"])
                window["loss"] += loss
                window["accuracy"] += accuracy
                window["n"] += 1
                window["epoch_loss"] += loss
                window["epoch_accuracy"] += accuracy
                window["epoch_n"] += 1
                window["lr"] = float(m["lr"])
            pending = []
            if not force_row or window["n"] == 0:
                return
            elapsed = time.perf_counter() - t_window
            ips = (n_window_steps * c.batch_size / elapsed
                   if n_window_steps and elapsed > 0 else None)
            row = log.write(dict(kind="train", step=step0 + step_in_epoch - start,
                                 epoch=epoch + step_in_epoch / self.steps_per_epoch,
                                 loss=window["loss"] / window["n"],
                                 accuracy=window["accuracy"] / window["n"], lr=window["lr"],
                                 images_per_sec=ips, wall_time=time.time()))
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.3f}",
                            img_s=f"{ips:.0f}" if ips else "-", refresh=False)
            window.update(loss=0.0, accuracy=0.0, n=0)
            t_window, n_window_steps = time.perf_counter(), 0

        for batch in self._loader(epoch, start):
            if step_in_epoch >= self.steps_per_epoch:
                break
            sharded = shard_batch({"image": batch["image"], "label": batch["label"]}, self.mesh)
            for hook in self.step_hooks:
                hook(state, sharded, step0 + step_in_epoch - start)
            state, metrics = self.train_step(state, sharded)
            pending.append(metrics)
            step_in_epoch += 1
            n_window_steps += 1
            bar.update(1)
            step = step0 + step_in_epoch - start
            if step % c.log_every == 0:
                flush(state, True)
            at_end = step_in_epoch == self.steps_per_epoch
            if self.max_steps is not None and step >= self.max_steps and not at_end:
                flush(state, False)
                self._save(checkpointer, state, epoch, step_in_epoch, window)
                return state, step_in_epoch, window, True
            if (c.checkpoint_every and step % c.checkpoint_every == 0 and not at_end):
                flush(state, False)
                self._save(checkpointer, state, epoch, step_in_epoch, window)
        if step_in_epoch != self.steps_per_epoch:
            raise RuntimeError(f"the loader gave {step_in_epoch - start} batches in epoch {epoch} "
                               f"after step {start}; expected {self.steps_per_epoch - start}.")
        flush(state, True)
        epoch_time = time.perf_counter() - t_epoch
        metrics = self.evaluate(state)
        train_loss = window["epoch_loss"] / max(window["epoch_n"], 1)
        log.write(dict(kind="eval", step=step0 + step_in_epoch - start, epoch=epoch + 1,
                       eval_loss=metrics["eval_loss"], eval_accuracy=metrics["eval_accuracy"],
                       example_weight=c.example_weight, loss=train_loss,
                       accuracy=window["epoch_accuracy"] / max(window["epoch_n"], 1),
                       epoch_time=epoch_time, wall_time=time.time()))
        window.update(epoch_loss=0.0, epoch_accuracy=0.0, epoch_n=0)
        if c.progress:
            bar.write(f"{self.desc} epoch {epoch + 1}/{c.epochs}: train loss {train_loss:.4f}, "
                      f"eval loss {metrics['eval_loss']:.4f}, eval accuracy "
                      f"{metrics['eval_accuracy']:.4f} ({epoch_time:.1f} s)")
        for hook in self.step_hooks:
            if hasattr(hook, "on_epoch_end"):
                hook.on_epoch_end(state, epoch)
        self._save(checkpointer, state, epoch + 1, 0, window)
        stopped = self.max_steps is not None and step0 + step_in_epoch - start >= self.max_steps
        return state, 0, window, stopped

    def _save(self, checkpointer, state, epoch, step_in_epoch, window):
        if checkpointer is None or not self.save_checkpoints:
            return
        checkpointer.save(state, {"epoch": epoch, "step_in_epoch": step_in_epoch,
                                  "window": dict(window)})


class _Logger:
    def __init__(self, writer: MetricsWriter | None, rows: list[dict[str, Any]]):
        self.writer, self.rows = writer, rows

    def write(self, row: dict[str, Any]) -> dict[str, Any]:
        row = {k: v for k, v in row.items() if v is not None}
        if self.writer is not None:
            row = self.writer.write(row)
        self.rows.append(row)
        return row


def _read_rows(path: str) -> list[dict[str, Any]]:
    from seqnorm_jax.train.metrics import read_jsonl

    return read_jsonl(path)


def fit(config: TrainConfig, *, out_dir: str | os.PathLike | None = None, resume: bool = False,
        **kwargs) -> FitResult:
    """``Trainer(config, out_dir=out_dir, **kwargs).fit(resume=resume)``."""
    return Trainer(config, out_dir=out_dir, **kwargs).fit(resume=resume)
