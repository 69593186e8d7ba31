"""Orbax checkpoints of the train state together with the data position (for exact resume)."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from seqnorm_jax.train.state import TrainState

__all__ = ["Checkpointer"]


class Checkpointer:
    """An ``orbax.checkpoint.CheckpointManager`` holding ``state`` and ``position`` per step.

    Each checkpoint has two items: ``state`` (the :class:`TrainState` arrays: step,
    params, opt_state, batch_stats, rng) and ``position`` (a JSON dict: the epoch, the
    steps done in it, and anything else the loop needs to rebuild its data iterator).
    Only the ``keep`` newest checkpoints are kept.

    Args:
      directory: the checkpoint directory (created if needed; absolute or relative).
      keep: how many checkpoints to keep.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2):
        if keep < 1:
            raise ValueError(f"Checkpointer: keep={keep} must be >= 1.")
        self.directory = os.path.abspath(os.fspath(directory))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def latest_step(self) -> int | None:
        """The newest saved step, or ``None`` if there is none."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """All kept steps, oldest first."""
        return sorted(self.manager.all_steps())

    def save(self, state: TrainState, position: dict[str, Any]) -> None:
        """Save ``state`` and ``position`` under ``int(state.step)`` (asynchronously)."""
        step = int(jax.device_get(state.step))
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), position=ocp.args.JsonSave(position)))

    def restore(self, template: TrainState, step: int | None = None
                ) -> tuple[TrainState, dict[str, Any]]:
        """Restore the checkpoint at ``step`` (default: the newest) into ``template``'s structure.

        ``template`` is a state of the same model and optimizer (e.g. a freshly created
        one); its arrays give the shapes, dtypes and shardings of the restored arrays,
        and its ``apply_fn`` and ``tx`` are kept.

        Raises:
          FileNotFoundError: no checkpoint in the directory (or not that step).
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
        def abstract_leaf(x):
            x = x if isinstance(x, jax.Array) else jnp.asarray(x)
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)

        abstract = jax.tree_util.tree_map(abstract_leaf, template)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), position=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["position"])

    def wait(self) -> None:
        """Block until pending asynchronous saves are written."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
