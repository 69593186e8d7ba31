"""One process of the multi-process test (tests/test_multiprocess.py), and the shared model.

Run as ``python multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz`` with
``JAX_NUM_CPU_DEVICES`` set in the environment: it joins a ``jax.distributed`` job on
``localhost:PORT`` (CPU collectives over gloo), takes its slice of the global batch,
makes it global with ``seqnorm_jax.distributed.shard_batch`` and trains a small
SeqNorm CNN for a few steps on a data mesh over every process's devices. It writes the
replicated results (parameters, batch_stats, losses) to ``OUT.npz``.

Imported (not run), it provides the model, data and training loop, so that the test
computes the single-process reference with exactly the same code.
"""

from __future__ import annotations

import sys

GLOBAL_BATCH = 16
STEPS = 2
# Statistics over the whole global batch (across the processes), then one ghost
# batch per device (no communication).
NORMS = ("seqnorm:channel_groups=2,batch_groups=1", "seqnorm:channel_groups=2,batch_groups=4")


def global_data():
    """The global batches of every step: images (STEPS, 16, 6, 6, 3), labels (STEPS, 16)."""
    import numpy as np

    rng = np.random.default_rng(0)
    images = (rng.normal(size=(STEPS, GLOBAL_BATCH, 6, 6, 3)) * 2 + 1).astype(np.float32)
    labels = rng.integers(0, 3, size=(STEPS, GLOBAL_BATCH)).astype(np.int32)
    return images, labels


def train(mesh, process_slice):
    """Train on ``mesh``; ``process_slice`` is this process's rows of the global batch.

    Returns ``{"params": ..., "batch_stats": ..., "losses": ...}`` as NumPy arrays,
    read from this process's copy of the replicated results.
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import seqnorm_jax as snj
    from seqnorm_jax import distributed

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            for i, spec in enumerate(NORMS):
                x = nn.Conv(8, (3, 3))(x)
                x = snj.norm_factory(spec)(use_running_average=not train, name=f"norm{i}")(x)
                x = nn.relu(x)
            return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))

    model = Net()
    tx = optax.sgd(0.5, momentum=0.9)
    images, labels = global_data()
    variables = jax.jit(lambda k, x: model.init(k, x, train=False))(
        jax.random.key(1), jnp.zeros((1,) + images.shape[2:]))
    state = distributed.replicate(
        (variables["params"], variables["batch_stats"], tx.init(variables["params"])), mesh)

    @jax.jit
    def step(params, batch_stats, opt_state, x, y):
        def loss_fn(p):
            logits, upd = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                      mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

        (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), upd["batch_stats"], opt_state, loss

    losses = []
    for i in range(STEPS):
        x, y = distributed.shard_batch((images[i][process_slice], labels[i][process_slice]), mesh)
        *state, loss = step(*state, x, y)
        losses.append(loss)
    params, batch_stats, _ = state
    local = lambda a: np.asarray(a.addressable_data(0))  # replicated: any local copy
    return {"params": jax.tree_util.tree_map(local, params),
            "batch_stats": jax.tree_util.tree_map(local, batch_stats),
            "losses": np.stack([local(l) for l in losses])}


def flatten(tree, prefix=""):
    """``{"a/b": array}`` from a nested dict, for ``np.savez``."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out.update(flatten(value, name + "/") if isinstance(value, dict) else {name: value})
    return out


def main(argv):
    process_id, num_processes, port, out = int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
    import jax

    if "jax_cpu_collectives_implementation" in jax.config.values:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=60)
    import numpy as np

    from seqnorm_jax import distributed

    assert jax.process_count() == num_processes, jax.process_count()
    per_process = GLOBAL_BATCH // num_processes
    rows = slice(process_id * per_process, (process_id + 1) * per_process)
    mesh = distributed.data_mesh()
    # The global batch's rows are laid out over the mesh's devices in order; this
    # process's rows must land on its own devices.
    owners = [d.process_index for d in mesh.devices.flat]
    assert owners == sorted(owners), owners
    result = train(mesh, rows)
    np.savez(out, device_count=jax.device_count(),
             local_device_count=jax.local_device_count(), **flatten(result))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv)
