"""Test configuration: 4 fake CPU devices for the shard_map tests, and cheaper XLA
compilation for the session.

The device count and the XLA flags must be set before JAX creates its CPU backend, so
they are set here, when pytest imports this file and before any test module runs JAX code.

XLA compilation is most of the suite's time on CPU (every ``Trainer`` compiles its own
steps; the models and batches are tiny), so:

* XLA:CPU compiles at LLVM optimization level 0 with its classic elemental emitters
  rather than its MLIR fusion emitters: a train step compiles in about a fifth of the
  time and still runs in milliseconds. Neither flag changes what is computed (no
  fast-math; IEEE float32/float64 as before). A flag the developer already set in
  ``XLA_FLAGS`` is left as it is.
* A persistent compilation cache in a temporary folder, removed when the session ends,
  lets an identical computation (same HLO, devices and options: each seed of a study,
  each run of the same tiny MLP) load the executable compiled earlier in the session
  instead of compiling it again; JAX's in-memory cache does not share it between two
  ``jax.jit`` of equal functions. Nothing carries over between sessions. A developer's
  own ``JAX_COMPILATION_CACHE_DIR`` is left as it is.
"""

import atexit
import os
import shutil
import tempfile

import jax

jax.config.update("jax_num_cpu_devices", 4)

_FAST_COMPILE = {"--xla_backend_optimization_level": "0",
                 "--xla_cpu_use_fusion_emitters": "false"}
_flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
    [_flags, *(f"{k}={v}" for k, v in _FAST_COMPILE.items() if k not in _flags)]).strip()

if not jax.config.jax_compilation_cache_dir:
    _XLA_CACHE = tempfile.mkdtemp(prefix="seqnorm-jax-tests-xla-cache-")
    atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
    # Only compilations worth keeping: the many tiny eager-op ones are cached in memory.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
