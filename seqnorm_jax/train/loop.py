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

What a run guarantees (see the documentation page "Run folders and reliability"):

* settings are checked when the ``Trainer`` is built, before any work: the config's
  types and ranges, ``out_dir``, and the norm layers against the batch, the mesh and the
  model (:func:`seqnorm_jax.train.build.check_step`);
* one writer per ``out_dir`` (:func:`seqnorm_jax.train.files.run_lock`), and a folder
  that holds an earlier run is refused unless ``resume`` or ``overwrite``
  (:func:`~seqnorm_jax.train.files.claim_run_folder`);
* SIGTERM and SIGINT stop the run after the step in flight, with the metrics and a
  checkpoint of that step written (:func:`seqnorm_jax.train.files.stop_on_signals`);
* ``resume`` refuses a config that differs from the saved one (except
  :data:`~seqnorm_jax.train.config.RESUME_SAFE_FIELDS` and ``allow_changes``) and skips
  damaged checkpoints;
* a write fault raises :class:`~seqnorm_jax.train.files.RunFileError` naming the file,
  after a bounded wait for Orbax's background writes;
* a non-finite loss is caught inside the compiled step; by default the state stays the
  last finite one, is checkpointed, and :attr:`FitResult.diverged` says where.

The step keeps its metrics on the device; the host fetches them every ``log_every``
steps, one window late, so it never waits for the device inside an epoch, and batches
are put on the devices two steps ahead (:func:`seqnorm_jax.data.prefetch_to_device`;
on one CPU device the compiled step takes the host batch itself).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from seqnorm_jax import checks
from seqnorm_jax._extras import require_wandb
from seqnorm_jax.distributed import (
    batch_sharding,
    data_mesh,
    mesh_batch_axis,
    mesh_context,
    replicate,
)
from seqnorm_jax.train.build import (
    build_model,
    check_step,
    checked_norm_paths,
    evaluate,
    load_sources,
    source_num_classes,
)
from seqnorm_jax.train.checkpoint import Checkpointer
from seqnorm_jax.train.compiled import (
    chunk_length,
    device_chunks,
    jit_eval_step,
    jit_loop_step,
    jit_loop_steps,
    jit_train_step,
    normalize_images,
)
from seqnorm_jax.train.config import TrainConfig, check_resume_config, write_config
from seqnorm_jax.train.files import (
    Preempted,
    RunFileError,
    check_out_dir,
    claim_run_folder,
    is_writer,
    run_lock,
    run_path,
    stop_on_signals,
)
from seqnorm_jax.train.metrics import MetricsWriter
from seqnorm_jax.train.run import Logger, Run, RunParts, empty_window
from seqnorm_jax.train.state import TrainState, create_train_state, make_optimizer, make_schedule

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
      donate: the compiled steps donate the input state's buffers (default: on
        accelerators, not on CPU; ``seqnorm-jax plan`` sets it to compile for them here).
      steps_per_call: take up to this many steps per compiled call, a ``lax.scan`` of
        the same step (:func:`seqnorm_jax.train.compiled.jit_loop_steps`; same results bit for bit):
        for tiny models, whose step is shorter than a call's dispatch. One process only.
    """

    def __init__(self, config: TrainConfig, *, out_dir: str | os.PathLike | None = None,
                 model: nn.Module | None = None, train_source=None, eval_source=None,
                 mesh: Mesh | None = None, save_checkpoints: bool = True,
                 max_steps: int | None = None, desc: str | None = None,
                 step_hooks: Iterable[Any] = (), donate: bool | None = None,
                 steps_per_call: int = 1):
        config.validate()
        self.steps_per_call = checks.positive_int(steps_per_call, "steps_per_call", "Trainer")
        if steps_per_call > 1 and jax.process_count() > 1:
            raise ValueError(f"Trainer: steps_per_call={steps_per_call} needs one process; "
                             f"this run has {jax.process_count()}. Use steps_per_call=1.")
        self.config = config
        self.out_dir = None if out_dir is None else os.fspath(run_path(out_dir))
        if self.out_dir is not None:
            check_out_dir(self.out_dir, "out_dir (--out)", create=False)
        if config.wandb_project is not None:
            if self.out_dir is None:
                raise ValueError("TrainConfig.wandb_project: Weights & Biases logs the metric "
                                 "rows of a run folder; give the Trainer an out_dir (--out).")
            require_wandb("TrainConfig.wandb_project (--wandb-project)")
        self.mesh = data_mesh() if mesh is None else mesh
        self.batch_axis = mesh_batch_axis(self.mesh)
        if (train_source is None) != (eval_source is None):
            raise ValueError("Trainer: pass both train_source and eval_source, or neither.")
        if train_source is None:
            train_source, eval_source = load_sources(config)
        self.train_source, self.eval_source = train_source, eval_source
        self.model = build_model(config, source_num_classes(train_source)) if model is None else model
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
        norm_paths = checked_norm_paths(self.model, self._sample_input(), config, self.mesh)
        self.tx = make_optimizer(
            config.optimizer, self.schedule, momentum=config.momentum,
            weight_decay=config.weight_decay, norm_decay=config.norm_weight_decay,
            grad_clip_norm=config.grad_clip_norm, b1=config.b1, b2=config.b2,
            norm_paths=norm_paths)
        step_kw = dict(micro_batches=config.grad_accum_steps,
                       output_noise=config.output_noise, axis_name=self.batch_axis,
                       donate=donate)
        self.train_step = jit_train_step(self.mesh, self.schedule, **step_kw)
        # the loop ships uint8 pixels and normalises them inside its compiled step
        info = train_source.info
        self.image_norm = (tuple(np.asarray(info.mean, np.float32).tolist()),
                           tuple(np.asarray(info.std, np.float32).tolist()))
        self.loop_step = jit_loop_step(self.mesh, self.schedule, **step_kw,
                                       stop_on_divergence=config.on_divergence == "stop",
                                       image_norm=self.image_norm)
        self.loop_steps = (None if self.steps_per_call == 1 else jit_loop_steps(
            self.mesh, self.schedule, **step_kw, image_norm=self.image_norm,
            stop_on_divergence=config.on_divergence == "stop"))
        self._hook_input = jax.jit(lambda b: normalize_images(b, self.image_norm))
        self.eval_step = jit_eval_step(self.mesh, axis_name=self.batch_axis)
        check_step(self.loop_step, self.model, self.tx, config, self.mesh, self.batch_axis,
                   train_source.info.image_shape)

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
        ahead (:func:`seqnorm_jax.data.prefetch_to_device`); on one CPU device, the host
        batches themselves."""
        from seqnorm_jax.data import prefetch_to_device

        batches = ({"image": b["image"], "label": b["label"]}
                   for b in self._loader(epoch, start_step, normalize=False))
        devices = list(self.mesh.devices.flat)
        if jax.process_count() == 1 and devices == jax.devices()[:1]:
            if devices[0].platform == "cpu":
                # the host is the device: no transfer to overlap, and the compiled step's
                # own dispatch takes a NumPy batch ~0.1 ms faster than jax.device_put
                return batches
            sharding = None  # one device, the default one: a plain device_put of the batch
        else:
            sharding = batch_sharding(self.mesh, self.batch_axis)
        return prefetch_to_device(batches, size=2, sharding=sharding)

    def _step_batches(self, epoch: int, start_step: int, first_step: int):
        """``(n, batch)`` for the epoch from ``start_step`` (global step ``first_step``): one
        batch per step, or with ``steps_per_call > 1`` chunks of ``n`` stacked batches
        that end where the loop acts between steps (:func:`~seqnorm_jax.train.compiled.
        chunk_length`)."""
        if self.steps_per_call == 1:
            return ((1, b) for b in self._device_batches(epoch, start_step))
        c = self.config

        def length(done: int) -> int:
            return chunk_length(first_step + done, start_step + done,
                                steps_per_call=self.steps_per_call,
                                steps_per_epoch=self.steps_per_epoch, log_every=c.log_every,
                                checkpoint_every=c.checkpoint_every, max_steps=self.max_steps,
                                hooks=self.step_hooks)

        return device_chunks(self._loader(epoch, start_step, normalize=False), length,
                             self.mesh, self.batch_axis)

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
    def fit(self, resume: bool = False, *, allow_changes: Iterable[str] = (),
            overwrite: bool = False) -> FitResult:
        """Train for ``config.epochs`` epochs (or up to ``max_steps``); see the module docstring.

        Args:
          resume: continue from the newest intact checkpoint in ``out_dir/checkpoints``;
            with none there, the run starts from step 0 and says so on stderr. The saved
            ``config.json`` must equal this config except in
            :data:`~seqnorm_jax.train.config.RESUME_SAFE_FIELDS` and the fields named in
            ``allow_changes``.
          allow_changes: TrainConfig fields that a resumed run may change although they
            change what is computed (e.g. ``"lr"``); a change of the state's structure
            (model, norm layer's variables, optimizer) is refused regardless.
          overwrite: delete an earlier run's files in ``out_dir`` first (without it, and
            without ``resume``, a folder holding a run is refused).

        Raises:
          RunLockedError: another process is writing into ``out_dir``.
          RunFolderUsedError: ``out_dir`` holds an earlier run (neither resume nor overwrite).
          Preempted: SIGTERM or SIGINT stopped the run; its last step is checkpointed.
          ValueError: resume with a changed config, or no intact checkpoint.
          RunFileError: a file or checkpoint of the run cannot be written (names it).
        """
        if self.out_dir is None:
            if resume:
                raise ValueError("Trainer.fit(resume=True) needs an out_dir with checkpoints.")
            return self._fit(False, ())
        if not is_writer():  # one writer: process 0 holds the lock, writes the files
            return self._fit(resume, tuple(allow_changes))
        with run_lock(self.out_dir, "out_dir (--out)"):
            claim_run_folder(self.out_dir, "out_dir (--out)", resume=resume, overwrite=overwrite)
            if jax.process_count() > 1:  # the processes would not stop at the same step
                return self._fit(resume, tuple(allow_changes))
            with stop_on_signals():
                return self._fit(resume, tuple(allow_changes))

    def checkpointer(self) -> Checkpointer:
        """The :class:`Checkpointer` of ``out_dir/checkpoints``."""
        return Checkpointer(run_path(self.out_dir) / "checkpoints",
                            keep=self.config.keep_checkpoints)

    def _fit(self, resume: bool, allow_changes: tuple[str, ...]) -> FitResult:
        c = self.config
        if resume:
            check_resume_config(self.out_dir, c, allow_changes)
        state = self.init_state()
        epoch, step_in_epoch = 0, 0
        window = empty_window()
        checkpointer = None
        if self.save_checkpoints or resume:
            checkpointer = self.checkpointer()
        run = None
        try:
            resume_step = None
            skipped: list[tuple[int, str]] = []
            if resume and not checkpointer.step_folders():
                print(f"{self.desc}: --resume: no checkpoint in {checkpointer.directory}; "
                      "starting from step 0", file=sys.stderr)
            if resume and checkpointer.step_folders():
                state, position, skipped = checkpointer.restore_newest_intact(state)
                for step, why in skipped:
                    print(f"{self.desc}: skipped damaged checkpoint "
                          f"{os.path.join(checkpointer.directory, str(step))} ({why}); moved to "
                          f"{checkpointer.directory}.damaged", file=sys.stderr)
                epoch, step_in_epoch = int(position["epoch"]), int(position["step_in_epoch"])
                window = {**empty_window(), **dict(position.get("window") or {})}
                resume_step = int(jax.device_get(state.step))
            writer = None
            if self.out_dir is not None and is_writer():  # one writer: process 0
                write_config(self.out_dir, c)
                writer = MetricsWriter(self.out_dir, resume_step=resume_step,
                                       wandb_project=c.wandb_project, config=c.to_dict())
            run = Run(self._run_parts(), state, window,
                      Logger(writer, [] if writer is None else list(writer.rows)), checkpointer)
            run.skipped = skipped
            with mesh_context(self.mesh):
                run.loop(epoch, step_in_epoch)
        except Preempted:
            # the checkpoint of the stop must be committed: its write errors are the result
            checkpointer = run.checkpointer if run is not None else checkpointer
            if checkpointer is not None:
                checkpointer.close()
            raise
        except BaseException:
            checkpointer = run.checkpointer if run is not None else checkpointer
            if checkpointer is not None:
                try:
                    checkpointer.close()
                except RunFileError:
                    pass  # the error already propagating is the one to report
            raise
        if run.checkpointer is not None:
            run.checkpointer.close()
        if writer is not None:
            writer.close()
        rows = run.log.rows
        return FitResult(state=run.state, train_rows=[r for r in rows if r["kind"] == "train"],
                         eval_rows=[r for r in rows if r["kind"] == "eval"],
                         diverged=run.diverged, skipped_checkpoints=skipped)

    def _run_parts(self) -> RunParts:
        return RunParts(
            config=self.config, mesh=self.mesh, steps_per_epoch=self.steps_per_epoch,
            total_steps=self.total_steps, desc=self.desc, max_steps=self.max_steps,
            hooks=self.step_hooks, batches=self._step_batches, loop_step=self.loop_step,
            loop_steps=self.loop_steps, hook_input=self._hook_input, evaluate=self.evaluate,
            save_checkpoints=self.save_checkpoints,
            new_checkpointer=None if self.out_dir is None else self.checkpointer)


def fit(config: TrainConfig, *, out_dir: str | os.PathLike | None = None, resume: bool = False,
        **kwargs) -> FitResult:
    """``Trainer(config, out_dir=out_dir, **kwargs).fit(resume=resume)``."""
    return Trainer(config, out_dir=out_dir, **kwargs).fit(resume=resume)
