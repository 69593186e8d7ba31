"""Evaluation over a whole data source: every example once, one compilation for all batches.

The batches are padded to one fixed size that the mesh's devices divide (the padding
is masked out), and in a multi-process run every process runs the same number of
steps (they are collective): a process whose shard has fewer batches finishes with
fully masked ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from seqnorm_jax.distributed import data_mesh, mesh_batch_axis, shard_batch
from seqnorm_jax.train.compiled import jit_eval_step
from seqnorm_jax.train.state import TrainState

__all__ = ["evaluate"]


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
    shard = dict(shard_index=jax.process_index(), shard_count=procs) if procs > 1 else {}
    loader = data.make_loader(source, batch_size=local_batch, train=False, drop_remainder=False,
                              **shard)
    # Every process must run the same number of steps (they are collective): the first
    # process has the most batches; the others finish with fully masked ones.
    num_batches = data.steps_per_epoch(source, local_batch, False, procs, shard_index=0)
    # a process with no batch left (or none at all) runs an empty, fully masked one
    empty = {"image": np.zeros((0, *source.info.image_shape), np.float32),
             "label": np.zeros((0,), np.int32)}
    totals = None
    batches = iter(loader)
    for _ in range(num_batches):
        batch = next(batches, empty)
        sums = eval_step(state, shard_batch(_pad_batch(batch, padded), mesh, axis),
                         example_weight)
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    if totals is None:
        raise ValueError("evaluate: the evaluation source is empty.")
    totals = jax.device_get(totals)
    count = float(totals["count"])
    return {"eval_loss": float(totals["loss_sum"]) / count,
            "eval_accuracy": float(totals["correct"]) / count, "count": count}
