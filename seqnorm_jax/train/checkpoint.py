"""Orbax checkpoints of the train state together with the data position (for exact resume).

Faults end cleanly: every failure to write a checkpoint (a full disk, a folder that
stopped accepting writes, the folder replaced by a file) surfaces from :meth:`save`,
:meth:`wait` or :meth:`close` as one :class:`~seqnorm_jax.train.files.RunFileError`
naming the checkpoint folder and the cause; :meth:`close` waits a bounded time for
Orbax's background writes, so a stuck write cannot keep the process alive. The
checkpoints written before the fault stay intact (Orbax commits a step by an atomic
rename of its temporary folder).

Damaged checkpoints fall back: :meth:`restore_newest_intact` restores the newest step
that reads back whole, and reports every newer one it skipped with the reason; a step
whose saved tree does not match the template (another model, norm or optimizer) is
refused before Orbax reads it, with the differing entries.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from seqnorm_jax.train.files import RunFileError, run_path
from seqnorm_jax.train.state import TrainState

__all__ = ["CLOSE_TIMEOUT_S", "Checkpointer", "CheckpointMismatchError"]

# How long close() waits for Orbax's background writes before giving up on them.
CLOSE_TIMEOUT_S = 60.0


class CheckpointMismatchError(ValueError):
    """A checkpoint's saved tree does not match the state it is restored into."""


def _one_line(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return " ".join(ln.strip() for ln in text.strip().splitlines() if ln.strip())[:300]


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """``{"params/dense1/kernel": shape}`` for every array leaf of a state or of Orbax's
    metadata tree (attribute and dict keys spelled alike)."""
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, dict))[0]
    return {"/".join(_key_name(k) for k in path): tuple(np.shape(leaf))
            for path, leaf in leaves if leaf is not None and hasattr(leaf, "shape")}


class Checkpointer:
    """An ``orbax.checkpoint.CheckpointManager`` holding ``state`` and ``position`` per step.

    Each checkpoint has two items: ``state`` (the :class:`TrainState` arrays: step,
    params, opt_state, batch_stats, rng) and ``position`` (a JSON dict: the epoch, the
    steps done in it, and anything else the loop needs to rebuild its data iterator).
    Only the ``keep`` newest checkpoints are kept.

    Args:
      directory: the checkpoint directory (created if needed; absolute or relative).
      keep: how many checkpoints to keep.

    Raises:
      RunFileError: the directory cannot be created (names it and the cause).
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2):
        if keep < 1:
            raise ValueError(f"Checkpointer: keep={keep} must be >= 1.")
        self.path = run_path(directory)  # a local folder or a URL (gs://bucket/run)
        self.directory = os.fspath(self.path)
        self.keep = keep
        if self.path.exists() and not self.path.is_dir():
            raise RunFileError(self.directory, "is a file, not a checkpoint folder")
        _ignore_closed_loop_callbacks()  # a failed write's late noise, see there
        self.manager = self._guard(lambda: ocp.CheckpointManager(
            self.path,
            # cleanup: a step folder left half-written by a killed run
            # (``N.orbax-checkpoint-tmp``) is deleted when the next run opens the folder
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 cleanup_tmp_directories=True),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "position": ocp.JsonCheckpointHandler()}))
        self._failed = False

    def _guard(self, fn):
        """Run ``fn``; any failure becomes a :class:`RunFileError` naming the folder."""
        try:
            return fn()
        except RunFileError:
            self._failed = True
            raise
        except Exception as e:  # noqa: BLE001 - Orbax raises many types from its threads
            self._failed = True
            path = getattr(e, "filename", None) or self.directory
            cause = getattr(e, "strerror", None) or _one_line(e)
            raise RunFileError(os.fspath(path), f"checkpoint not written ({cause})") from e

    def latest_step(self) -> int | None:
        """The newest saved step, or ``None`` if there is none."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """All kept steps, oldest first."""
        return sorted(self.manager.all_steps())

    def save(self, state: TrainState, position: dict[str, Any]) -> None:
        """Save ``state`` and ``position`` under ``int(state.step)`` (asynchronously).

        Raises:
          RunFileError: this save or the previous (asynchronous) one failed.
        """
        step = int(jax.device_get(state.step))
        if not self.path.is_dir():
            self._failed = True
            what = "is a file" if self.path.exists() else "was removed"
            raise RunFileError(self.directory, f"checkpoint folder {what}; checkpoint not "
                                               "written")
        self._guard(lambda: self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), position=ocp.args.JsonSave(position))))

    def check_compatible(self, template: TrainState, step: int) -> None:
        """Raise :class:`CheckpointMismatchError` if ``step``'s saved arrays are not those of
        ``template`` (names and shapes), listing the first differences."""
        meta = self.manager.item_metadata(step)["state"]
        if meta is None:
            raise ValueError(f"{os.path.join(self.directory, str(step), 'state')}: no readable "
                             "metadata")
        tree = getattr(meta, "tree", meta)
        saved, want = _shapes(tree), _shapes(template)
        if saved == want:
            return
        diffs = [f"{k}: saved {saved.get(k, 'absent')}, now {want.get(k, 'absent')}"
                 for k in sorted(set(saved) | set(want)) if saved.get(k) != want.get(k)]
        raise CheckpointMismatchError(
            f"{os.path.join(self.directory, str(step))} holds another model, norm layer or "
            f"optimizer than this config ({len(diffs)} arrays differ: "
            f"{'; '.join(diffs[:3])}{'; ...' if len(diffs) > 3 else ''}); resume with the "
            "run's own config or start a new --out.")

    def restore(self, template: TrainState, step: int | None = None
                ) -> tuple[TrainState, dict[str, Any]]:
        """Restore the checkpoint at ``step`` (default: the newest) into ``template``'s structure.

        ``template`` is a state of the same model and optimizer (e.g. a freshly created
        one); its arrays give the shapes, dtypes and shardings of the restored arrays,
        and its ``apply_fn`` and ``tx`` are kept.

        Raises:
          FileNotFoundError: no checkpoint in the directory (or not that step).
          CheckpointMismatchError: the checkpoint holds other arrays than ``template``.
        """
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no checkpoint in {self.directory}; train first "
                                        "(or check the directory).")
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                                    f"saved steps: {steps}.")
        self.check_compatible(template, step)

        def abstract_leaf(x):
            x = x if isinstance(x, jax.Array) else jnp.asarray(x)
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)

        abstract = jax.tree_util.tree_map(abstract_leaf, template)
        with _quiet_orbax():
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), position=ocp.args.JsonRestore()))
        position = restored["position"]
        if not isinstance(position, dict) or not {"epoch", "step_in_epoch"} <= set(position):
            raise ValueError(f"{os.path.join(self.directory, str(step), 'position')}: not a "
                             "data position (epoch, step_in_epoch).")
        state = restored["state"]
        if int(jax.device_get(state.step)) != step:
            raise ValueError(f"{os.path.join(self.directory, str(step))}: holds step "
                             f"{int(jax.device_get(state.step))}, not {step}.")
        return state, dict(position)

    def restore_newest_intact(self, template: TrainState
                              ) -> tuple[TrainState, dict[str, Any], list[tuple[int, str]]]:
        """Restore the newest checkpoint that reads back whole.

        Newer steps that fail to read (a truncated array file, a missing item, an empty
        step folder, garbage metadata) are moved out of the manager's folder to
        ``<directory>.damaged/<step>`` (kept for inspection, out of the way of the
        resumed run's own saves of those steps).

        Returns:
          ``(state, position, skipped)`` with ``skipped`` = ``[(step, reason), ...]``,
          newest first.

        Raises:
          FileNotFoundError: no checkpoint at all.
          CheckpointMismatchError: the newest readable tree belongs to another config.
          ValueError: no step reads back (names each step and why).
        """
        steps = self.step_folders()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}; train first "
                                    "(or check the directory).")
        skipped: list[tuple[int, str]] = []
        for step in sorted(steps, reverse=True):
            try:
                if step not in self.all_steps():
                    raise ValueError("not a finished Orbax checkpoint")
                with _stderr_silenced():
                    state, position = self.restore(template, step)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - any read failure means "damaged"
                skipped.append((step, _one_line(e)))
                continue
            if skipped:
                self._set_aside([s for s, _ in skipped])
            return state, position, skipped
        raise ValueError(f"no intact checkpoint in {self.directory}: "
                         + "; ".join(f"step {s}: {why}" for s, why in skipped))

    def step_folders(self) -> list[int]:
        """The steps that have a folder here, finished or not (a damaged or half-written
        one included; :meth:`all_steps` lists the finished ones), oldest first."""
        if not self.path.is_dir():
            return []
        return sorted(int(p.name) for p in self.path.iterdir() if p.name.isdigit())

    def _set_aside(self, steps: list[int]) -> None:
        aside = self.path.parent / (self.path.name + ".damaged")
        aside.mkdir(parents=True, exist_ok=True)
        for step in steps:
            target = aside / str(step)
            if target.exists():
                target.rmtree()
            (self.path / str(step)).rename(target)
        self.manager.reload()

    def wait(self) -> None:
        """Block until pending asynchronous saves are written.

        Raises:
          RunFileError: a pending save failed.
        """
        self._guard(self.manager.wait_until_finished)

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Finish pending saves (waiting at most ``timeout`` seconds) and release the manager.

        Raises:
          RunFileError: a pending save failed or did not finish in time.
        """
        error: list[BaseException] = []
        failed_before = self._failed

        def finish():
            try:
                with _quiet_orbax():
                    if not failed_before:
                        self.manager.wait_until_finished()
                    self.manager.close()
            except BaseException as e:  # noqa: BLE001 - reported in the calling thread
                error.append(e)

        worker = threading.Thread(target=finish, name="checkpoint-close", daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            self._failed = True
            raise RunFileError(self.directory, f"checkpoint writes did not finish within "
                                               f"{timeout:.0f} s")
        if error and not failed_before:  # after a reported failure, close's own is moot
            def reraise():
                raise error[0]
            self._guard(reraise)


def _ignore_closed_loop_callbacks() -> None:
    """Drop the ``RuntimeError('Event loop is closed')`` that tensorstore's late
    completions raise in Orbax's closed event loop after a failed write (e.g. a full
    disk), reported through ``sys.unraisablehook``, one traceback per array, from
    tensorstore threads, sometimes before the failure reaches the caller; the failure
    itself is reported once, as a :class:`RunFileError`. Other unraisable exceptions
    still reach the previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "_drops_closed_loop", False):
        return

    def hook(unraisable):
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        previous(unraisable)

    hook._drops_closed_loop = True
    sys.unraisablehook = hook


@contextlib.contextmanager
def _stderr_silenced():
    """Send file descriptor 2 to ``/dev/null`` in the block.

    When Orbax's restore of a damaged checkpoint fails, its event loop closes while
    tensorstore still completes the other reads of that checkpoint; each completion's
    callback then prints a ``RuntimeError('Event loop is closed')`` traceback from a
    tensorstore thread (one per array, below Python's exception hooks). The failure
    itself is reported once, as the skipped checkpoint's reason.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class _quiet_orbax:
    """Silence Orbax's own error logs (the caller reports the failure once, as one line)."""

    def __enter__(self):
        self.logger = logging.getLogger("absl")
        self.level = self.logger.level
        self.logger.setLevel(logging.CRITICAL)
        return self

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)
        return False
