"""Two processes (``jax.distributed`` over gloo, 2 CPU devices each) train like one.

tests/multiprocess_worker.py runs in two local processes that join one
``jax.distributed`` job; each feeds its half of the global batch through
``seqnorm_jax.distributed.shard_batch`` into a data mesh over all 4 devices and
trains a small SeqNorm CNN. Both must end with the parameters, ``batch_stats`` and
losses of the same training in this process on its 4 devices (tests/conftest.py),
with the same global batches.
"""

import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import numpy as np
import portpicker
import pytest

import multiprocess_worker as worker
from conftest import FAST_COMPILE  # the compile flags the suite runs with
from seqnorm_jax import distributed

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
TIMEOUT_S = 100


def run_workers(tmp_path: Path) -> list[dict]:
    port = portpicker.pick_unused_port()
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(DEVICES_PER_PROCESS), "JAX_PLATFORMS": "cpu"}
    # No device-count flag of the developer's; only tests/conftest.py's compile-time flags
    # (LLVM -O0, classic emitters: the same computation, compiled in a fraction of the time).
    env["XLA_FLAGS"] = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                                if f.split("=")[0] in FAST_COMPILE)
    outs = [tmp_path / f"process{i}.npz" for i in range(NUM_PROCESSES)]
    logs = [open(tmp_path / f"process{i}.log", "w+") for i in range(NUM_PROCESSES)]
    procs = [
        subprocess.Popen(
            [sys.executable, worker.__file__, str(i), str(NUM_PROCESSES), str(port), str(out)],
            env=env, stdout=logs[i], stderr=subprocess.STDOUT)
        for i, out in enumerate(outs)
    ]
    failed = []
    try:
        for i, p in enumerate(procs):
            try:
                if p.wait(timeout=TIMEOUT_S) != 0:
                    failed.append(f"process {i} exited with code {p.returncode}")
            except subprocess.TimeoutExpired:
                failed.append(f"process {i} did not finish within {TIMEOUT_S} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if failed:
        output = []
        for i, log in enumerate(logs):
            log.seek(0)
            output.append(f"--- process {i} output ---\n{log.read()[-6000:]}")
        pytest.fail("; ".join(failed) + "\n" + "\n".join(output))
    for log in logs:
        log.close()
    return [dict(np.load(out)) for out in outs]


def test_two_processes_agree_with_one(tmp_path):
    results = run_workers(tmp_path)

    mesh = distributed.data_mesh(jax.devices()[:NUM_PROCESSES * DEVICES_PER_PROCESS])
    want = worker.flatten(worker.train(mesh, slice(None)))
    assert set(want) == {k for k in results[0] if "/" in k or k == "losses"}
    for i, got in enumerate(results):
        assert int(got["device_count"]) == NUM_PROCESSES * DEVICES_PER_PROCESS
        assert int(got["local_device_count"]) == DEVICES_PER_PROCESS
        chex.assert_trees_all_close({k: got[k] for k in want}, want, atol=2e-5, rtol=1e-4,
                                    custom_message=f"process {i}")
    # Training changed the state: the comparison is not between initial values.
    assert np.all(results[0]["losses"] > 0)
    for name in ("norm0", "norm1"):
        assert not np.allclose(results[0][f"batch_stats/{name}/var"], 1.0)
