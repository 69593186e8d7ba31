"""Several steps per compiled call (``Trainer(steps_per_call=n)``): the same run bit for bit.

The whole-run comparisons live in ``tests/multistep_cases.py`` and run in a child pytest
under XLA's default compiler flags (see that file for why); the chunking rules are
checked here directly.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from seqnorm_jax.train import TrainConfig, Trainer
from seqnorm_jax.train.compiled import chunk_length, device_chunks

HERE = os.path.dirname(os.path.abspath(__file__))
# XLA's own defaults (conftest.py leaves flags already set in XLA_FLAGS alone)
DEFAULT_COMPILER = "--xla_backend_optimization_level=2 --xla_cpu_use_fusion_emitters=true"


def test_steps_per_call_runs_are_bit_identical_under_the_default_compiler():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "TF_CPP_"))}
    env.update(XLA_FLAGS=DEFAULT_COMPILER, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         os.path.join(HERE, "multistep_cases.py")],
        env=env, cwd=os.path.dirname(HERE), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[:3000]
    assert "2 passed" in out.stdout, out.stdout[-2000:]


def _config(**changes):
    base = dict(model="mlp", model_kwargs={"features": [16, 16]}, norm="bn", dataset="digits",
                epochs=1, batch_size=4, eval_batch_size=128, lr=0.05, progress=False, seed=5)
    base.update(changes)
    return TrainConfig(**base)


def test_chunk_length_hand_cases():
    kw = dict(steps_per_call=16, steps_per_epoch=100, log_every=50)
    assert chunk_length(0, 0, **kw) == 16
    assert chunk_length(40, 40, **kw) == 8  # 10 steps to the row at 50: 8, then 2
    assert chunk_length(48, 48, **kw) == 2
    assert chunk_length(195, 95, **kw) == 4  # 5 steps to the epoch's end
    assert chunk_length(10, 10, **kw, checkpoint_every=13) == 2
    assert chunk_length(10, 10, **kw, max_steps=13) == 2
    assert chunk_length(13, 13, **kw, max_steps=13) == 16  # at max_steps: no limit from it

    class Window:
        def records(self, step):
            return step >= 20

    assert chunk_length(0, 0, **kw, hooks=[Window()]) == 16
    assert chunk_length(16, 16, **kw, hooks=[Window()]) == 4
    assert chunk_length(20, 20, **kw, hooks=[Window()]) == 1
    assert chunk_length(0, 0, **kw, hooks=[lambda s, b, i: None]) == 1


def test_device_chunks_groups_and_errors():
    batches = [{"image": np.full((2, 3), i, np.uint8), "label": np.array([i, i])}
               for i in range(7)]
    lengths = iter([4, 1, 4, 4])
    out = list(device_chunks(batches, lambda done: next(lengths)))
    assert [n for n, _ in out] == [4, 1, 2]
    assert out[0][1]["image"].shape == (4, 2, 3) and out[1][1]["image"].shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(out[2][1]["label"]), [[5, 5], [6, 6]])
    with pytest.raises(ValueError, match="next_length"):
        list(device_chunks(batches, lambda done: 0))
    with pytest.raises(ValueError, match="steps_per_call must be a positive int"):
        Trainer(_config(), steps_per_call=0)
