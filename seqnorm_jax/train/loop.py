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

What a run guarantees (see the README's "Runs that never hang" section):

* settings are checked when the ``Trainer`` is built, before any work: the config's
  types and ranges, ``out_dir``, and the norm layers against the batch, the mesh and the
  model (:func:`seqnorm_jax.train.validate.check_step`);
* one writer per ``out_dir`` (:func:`seqnorm_jax.train.lock.run_lock`);
* ``resume`` refuses a config that differs from the saved one (except
  :data:`~seqnorm_jax.train.config.RESUME_SAFE_FIELDS` and ``allow_changes``) and skips
  damaged checkpoints;
* a write fault raises :class:`~seqnorm_jax.train.metrics.RunFileError` naming the file,
  after a bounded wait for Orbax's background writes;
* a non-finite loss is caught inside the compiled step; by default the state stays the
  last finite one, is checkpointed, and :attr:`FitResult.diverged` says where.

The step keeps its metrics on the device; the host fetches them every ``log_every``
steps, one window late, so it never waits for the device inside an epoch, and batches
are put on the devices two steps ahead (:func:`seqnorm_jax.data.prefetch_to_device`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from seqnorm_jax.distributed import (
    batch_sharding,
    data_mesh,
    mesh_batch_axis,
    mesh_context,
    replicate,
    shard_batch,
)
from seqnorm_jax.train.checkpoint import Checkpointer
from seqnorm_jax.train.config import RESUME_SAFE_FIELDS, TrainConfig, config_changes
from seqnorm_jax.train.lock import check_out_dir, run_lock
from seqnorm_jax.train.metrics import MetricsWriter, RunFileError
from seqnorm_jax.train.optim import make_optimizer, make_schedule, model_norm_paths
from seqnorm_jax.train.state import TrainState, create_train_state
from seqnorm_jax.train.compiled import (
    init_accumulator,
    jit_eval_step,
    jit_loop_step,
    jit_train_step,
    normalize_images,
    reset_accumulator,
)

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
      diverged: ``None``, or where the training loss first became non-finite:
        ``{"step": N, "loss": value}`` (1-based global step), plus, when the run stopped
        there (``on_divergence="stop"``), ``"last_finite_step"``: the step of the
        returned and checkpointed state.
      skipped_checkpoints: ``(step, reason)`` of damaged checkpoints a resume skipped.
    """

    state: TrainState
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]
    diverged: dict[str, Any] | None = None
    skipped_checkpoints: list[tuple[int, str]] = dataclasses.field(default_factory=list)


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
    axis = mesh_batch_axis(mesh)
    eval_step = jit_eval_step(mesh, axis_name=axis) if eval_step is None else eval_step
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
        sums = eval_step(state, shard_batch(_pad_batch(batch, padded), mesh, axis),
                         example_weight)
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
        if self.out_dir is not None:
            check_out_dir(self.out_dir, "out_dir (--out)", create=False)
        self.mesh = data_mesh() if mesh is None else mesh
        self.batch_axis = mesh_batch_axis(self.mesh)
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
            grad_clip_norm=config.grad_clip_norm, b1=config.b1, b2=config.b2,
            norm_paths=model_norm_paths(self.model, self._sample_input()))
        step_kw = dict(micro_batches=config.grad_accum_steps,
                       output_noise=config.output_noise, axis_name=self.batch_axis)
        self.train_step = jit_train_step(self.mesh, self.schedule, **step_kw)
        # the loop ships uint8 pixels and normalises them inside its compiled step
        info = train_source.info
        self.image_norm = (tuple(np.asarray(info.mean, np.float32).tolist()),
                           tuple(np.asarray(info.std, np.float32).tolist()))
        self.loop_step = jit_loop_step(self.mesh, self.schedule, **step_kw,
                                       stop_on_divergence=config.on_divergence == "stop",
                                       image_norm=self.image_norm)
        self._hook_batch = jax.jit(lambda b: normalize_images(b, self.image_norm))
        self.eval_step = jit_eval_step(self.mesh, axis_name=self.batch_axis)
        from seqnorm_jax.train.validate import check_step

        check_step(self)

    # ------------------------------------------------------------------------ state
    def _sample_input(self) -> np.ndarray:
        """One zero image: what ``model.init`` runs on (only its shape matters)."""
        return np.zeros((1, *self.train_source.info.image_shape), np.float32)

    def init_state(self) -> TrainState:
        """A fresh state (seeded by ``config.seed``), replicated on the mesh."""
        with mesh_context(self.mesh):
            state = create_train_state(self.model, jax.random.key(self.config.seed),
                                       self._sample_input(), self.tx)
            return replicate(state, self.mesh)

    def _loader(self, epoch: int, start_step: int, normalize: bool = True
                ) -> Iterable[dict[str, np.ndarray]]:
        from seqnorm_jax import data

        c = self.config
        return data.make_loader(self.train_source, batch_size=self.local_batch, train=True,
                                seed=c.seed, epoch=epoch, augment=c.augment,
                                drop_remainder=True, non_iid_classes=c.non_iid_classes,
                                num_workers=c.data_workers, start_step=start_step,
                                normalize=normalize, **self.shard)

    def _device_batches(self, epoch: int, start_step: int):
        """The epoch's training batches ``{"image": uint8, "label"}``, put on the mesh two
        ahead (:func:`seqnorm_jax.data.prefetch_to_device`)."""
        from seqnorm_jax.data import prefetch_to_device

        batches = ({"image": b["image"], "label": b["label"]}
                   for b in self._loader(epoch, start_step, normalize=False))
        devices = list(self.mesh.devices.flat)
        if jax.process_count() == 1 and devices == jax.devices()[:1]:
            sharding = None  # one device, the default one: a plain device_put of the batch
        else:
            sharding = batch_sharding(self.mesh, self.batch_axis)
        return prefetch_to_device(batches, size=2, sharding=sharding)

    def evaluate(self, state: TrainState, source=None, example_weight: float | None = None
                 ) -> dict[str, float]:
        """:func:`evaluate` on ``source`` (default: the evaluation source)."""
        with mesh_context(self.mesh):
            return evaluate(state, self.eval_source if source is None else source,
                            batch_size=self.config.eval_batch_size,
                            example_weight=(self.config.example_weight if example_weight is None
                                            else example_weight),
                            mesh=self.mesh, eval_step=self.eval_step)

    # ------------------------------------------------------------------------ fit
    def fit(self, resume: bool = False, *, allow_changes: Iterable[str] = ()) -> FitResult:
        """Train for ``config.epochs`` epochs (or up to ``max_steps``); see the module docstring.

        Args:
          resume: continue from the newest intact checkpoint in ``out_dir/checkpoints`` if
            there is one (a fresh start otherwise). The saved ``config.json`` must equal
            this config except in :data:`~seqnorm_jax.train.config.RESUME_SAFE_FIELDS`
            and the fields named in ``allow_changes``.
          allow_changes: TrainConfig fields that a resumed run may change although they
            change what is computed (e.g. ``"lr"``); a change of the state's structure
            (model, norm layer's variables, optimizer) is refused regardless.

        Raises:
          RunLockedError: another process is writing into ``out_dir``.
          ValueError: resume with a changed config, or no intact checkpoint.
          RunFileError: a file or checkpoint of the run cannot be written (names it).
        """
        if self.out_dir is None:
            if resume:
                raise ValueError("Trainer.fit(resume=True) needs an out_dir with checkpoints.")
            return self._fit(False, ())
        if jax.process_index() != 0:  # one writer: process 0 holds the lock, writes the files
            return self._fit(resume, tuple(allow_changes))
        with run_lock(self.out_dir, "out_dir (--out)"):
            return self._fit(resume, tuple(allow_changes))

    def _fit(self, resume: bool, allow_changes: tuple[str, ...]) -> FitResult:
        c = self.config
        if resume:
            self._check_resume_config(allow_changes)
        state = self.init_state()
        epoch, step_in_epoch = 0, 0
        window = _empty_window()
        checkpointer = None
        if self.save_checkpoints or resume:
            checkpointer = Checkpointer(os.path.join(self.out_dir, "checkpoints"),
                                        keep=c.keep_checkpoints)
        try:
            resume_step = None
            skipped: list[tuple[int, str]] = []
            if resume and checkpointer._step_folders():
                state, position, skipped = checkpointer.restore_newest_intact(state)
                for step, why in skipped:
                    print(f"{self.desc}: skipped damaged checkpoint "
                          f"{os.path.join(checkpointer.directory, str(step))} ({why}); moved to "
                          f"{checkpointer.directory}.damaged", file=sys.stderr)
                epoch, step_in_epoch = int(position["epoch"]), int(position["step_in_epoch"])
                window = {**_empty_window(), **dict(position.get("window") or {})}
                resume_step = int(jax.device_get(state.step))
            writer = None
            if self.out_dir is not None and jax.process_index() == 0:
                config_path = os.path.join(self.out_dir, "config.json")
                try:
                    c.to_json(config_path)
                except OSError as e:
                    raise RunFileError(config_path, e.strerror or str(e)) from e
                writer = MetricsWriter(self.out_dir, resume_step=resume_step)
            run = _Run(self, state, window, _Logger(writer, [] if writer is None
                                                    else list(writer.rows)), checkpointer)
            run.skipped = skipped
            with mesh_context(self.mesh):
                run.loop(epoch, step_in_epoch)
        except BaseException:
            if checkpointer is not None:
                try:
                    checkpointer.close()
                except RunFileError:
                    pass  # the error already propagating is the one to report
            raise
        if checkpointer is not None:
            checkpointer.close()
        rows = run.log.rows
        return FitResult(state=run.state, train_rows=[r for r in rows if r["kind"] == "train"],
                         eval_rows=[r for r in rows if r["kind"] == "eval"],
                         diverged=run.diverged, skipped_checkpoints=skipped)

    def _check_resume_config(self, allow_changes: tuple[str, ...]) -> None:
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(allow_changes) - names)
        if unknown:
            raise ValueError(f"allow_changes: unknown TrainConfig field(s) {unknown}; valid "
                             f"fields are {sorted(names)}.")
        path = os.path.join(self.out_dir, "config.json")
        if not os.path.exists(path):
            return
        try:
            with open(path) as f:
                saved = json.load(f)
            if not isinstance(saved, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot read the saved config ({e}); repair it or "
                             "start a new --out.") from None
        changes = config_changes(saved, self.config.to_dict())
        refused = {k: v for k, v in changes.items()
                   if k not in RESUME_SAFE_FIELDS and k not in allow_changes}
        if refused:
            listed = ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in refused.items())
            raise ValueError(
                f"resume: the config differs from the run's saved {path} in {listed}; resume "
                f"with the saved config, start a new --out, or accept the change with "
                f"--allow-change {','.join(refused)} (freely changeable: "
                f"{', '.join(RESUME_SAFE_FIELDS)}).")

    def _save(self, checkpointer, state, epoch, step_in_epoch, window):
        if checkpointer is None or not self.save_checkpoints:
            return
        if int(jax.device_get(state.step)) in checkpointer.all_steps():
            return
        checkpointer.save(state, {"epoch": epoch, "step_in_epoch": step_in_epoch,
                                  "window": dict(window)})


def _empty_window() -> dict[str, float]:
    return {"loss": 0.0, "accuracy": 0.0, "n": 0, "lr": 0.0,
            "epoch_loss": 0.0, "epoch_accuracy": 0.0, "epoch_n": 0}


class _Run:
    """The mutable part of one :meth:`Trainer.fit`: state, metric windows, divergence.

    The compiled step adds each step's metrics to a device-side accumulator; every
    ``log_every`` steps the loop swaps in a fresh one and starts copying the old one to
    the host without waiting, and reads it one window later (at epoch ends, checkpoints
    and stops: at once). So the host never waits for the device inside an epoch, and a
    divergence (flagged by the step itself, which then leaves the state unchanged) is
    seen at most two windows after it happened.
    """

    def __init__(self, trainer: Trainer, state, window, log, checkpointer):
        self.t, self.state, self.window, self.log = trainer, state, window, log
        self.checkpointer = checkpointer
        # room for a window: rows every log_every steps; flushes at checkpoints come sooner
        self.acc = replicate(init_accumulator(trainer.config.log_every), trainer.mesh)
        self.pending: list[tuple[Any, dict[str, Any]]] = []
        self.diverged: dict[str, Any] | None = None
        self.skipped: list[tuple[int, str]] = []
        self.t_window = time.perf_counter()

    def loop(self, epoch: int, step_in_epoch: int) -> None:
        from tqdm.auto import tqdm

        t, c = self.t, self.t.config
        self.bar = tqdm(total=t.total_steps, initial=int(jax.device_get(self.state.step)),
                        desc=t.desc, disable=not c.progress, unit="step", dynamic_ncols=True,
                        leave=False)
        try:
            while epoch < c.epochs:
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
        t, c = self.t, self.t.config
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
                epoch = step / t.steps_per_epoch
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
        t, c = self.t, self.t.config
        t_epoch = time.perf_counter()
        self.t_window = t_epoch
        step0 = int(jax.device_get(self.state.step))
        spe = t.steps_per_epoch
        step_in_epoch, n_window = start, 0
        stop_on_divergence = c.on_divergence == "stop"
        for batch in t._device_batches(epoch, start):
            if step_in_epoch >= spe:
                break
            step = step0 + step_in_epoch - start
            if t.step_hooks:
                normalized = t._hook_batch(batch)  # hooks see the model's input
                for hook in t.step_hooks:
                    hook(self.state, normalized, step)
            self.state, self.acc = t.loop_step(self.state, batch, self.acc)
            step_in_epoch += 1
            n_window += 1
            self.bar.update(1)
            step += 1
            at_end = step_in_epoch == spe
            if step % c.log_every == 0:
                self._end_window(step, epoch + step_in_epoch / spe, n_window)
                self.pending[-1][1]["row"] = True
                n_window = 0
                self._drain(1)
                if self.diverged is not None and stop_on_divergence:
                    return self._stop_diverged()
            if t.max_steps is not None and step >= t.max_steps and not at_end:
                self._flush(step, epoch + step_in_epoch / spe, n_window, False)
                n_window = 0
                if self.diverged is not None and stop_on_divergence:
                    return self._stop_diverged()
                t._save(self.checkpointer, self.state, epoch, step_in_epoch, self.window)
                return True
            if c.checkpoint_every and step % c.checkpoint_every == 0 and not at_end:
                self._flush(step, epoch + step_in_epoch / spe, n_window, False)
                n_window = 0
                if self.diverged is not None and stop_on_divergence:
                    return self._stop_diverged()
                t._save(self.checkpointer, self.state, epoch, step_in_epoch, self.window)
        if step_in_epoch != spe:
            raise RuntimeError(f"the loader gave {step_in_epoch - start} batches in epoch {epoch} "
                               f"after step {start}; expected {spe - start}.")
        end_step = step0 + spe - start
        self._flush(end_step, float(epoch + 1), n_window, True)
        if self.diverged is not None and stop_on_divergence:
            return self._stop_diverged()
        epoch_time = time.perf_counter() - t_epoch
        metrics = t.evaluate(self.state)
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
            self.bar.write(f"{t.desc} epoch {epoch + 1}/{c.epochs}: train loss "
                           f"{train_loss:.4f}, eval loss {metrics['eval_loss']:.4f}, eval "
                           f"accuracy {metrics['eval_accuracy']:.4f} ({epoch_time:.1f} s)")
        for hook in t.step_hooks:
            if hasattr(hook, "on_epoch_end"):
                hook.on_epoch_end(self.state, epoch)
        t._save(self.checkpointer, self.state, epoch + 1, 0, w)
        return t.max_steps is not None and end_step >= t.max_steps

    def _stop_diverged(self) -> bool:
        """Stop a diverged run: read what is queued, checkpoint the last finite state."""
        self._drain(0)
        t = self.t
        last = int(jax.device_get(self.state.step))  # the step loop left it unchanged since
        epoch, step_in_epoch = divmod(last, t.steps_per_epoch)
        t._save(self.checkpointer, self.state, epoch, step_in_epoch, _empty_window())
        self.diverged["last_finite_step"] = last
        if t.config.progress:
            self.bar.write(f"{t.desc}: diverged at step {self.diverged['step']} (loss "
                           f"{self.diverged['loss']}); kept the state of step {last}")
        return True


_reset = jax.jit(reset_accumulator)


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
