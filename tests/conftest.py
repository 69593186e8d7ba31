"""Test configuration: 4 fake CPU devices for the shard_map tests, and cheaper XLA
compilation for the session.

The device count and the XLA flags must be set before JAX creates its CPU backend, so
they are set here, when pytest imports this file and before any test module runs JAX code.

XLA compilation is most of the suite's time on CPU (every ``Trainer`` compiles its own
steps; the models and batches are tiny), so XLA:CPU compiles at LLVM optimization level 0
with its classic elemental emitters rather than its MLIR fusion emitters: a train step
compiles in about a fifth of the time and still runs in milliseconds. Neither flag changes
what is computed (no fast-math; IEEE float32/float64 as before). A flag the developer
already set in ``XLA_FLAGS`` is left as it is.

(A persistent compilation cache is deliberately not used: with it, a tune smoke run in
tests/test_experiments.py aborted inside XLA in 2 of 4 runs of that file; none in 4
without. With the flags above a cache hit saves no time anyway.)
"""

import os

import jax

jax.config.update("jax_num_cpu_devices", 4)

FAST_COMPILE = {"--xla_backend_optimization_level": "0",
                "--xla_cpu_use_fusion_emitters": "false"}
_flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
    [_flags, *(f"{k}={v}" for k, v in FAST_COMPILE.items() if k not in _flags)]).strip()

# tests/compilers/ compile for TPU and GPU pods with the accelerator compilers (the [tpu]
# and [cuda] extras), in their own pytest process and venv (docs/tests.md):
#   pytest -q --confcutdir=tests/compilers tests/compilers
# The normal suite never collects them (and --confcutdir keeps this file's fake CPU
# devices and compile flags out of theirs).
collect_ignore = ["compilers"]
