"""Test configuration: 4 fake CPU devices for the shard_map tests.

The device count must be set before JAX creates its CPU backend, so it is set
here, when pytest imports this file and before any test module runs JAX code.
"""

import jax

jax.config.update("jax_num_cpu_devices", 4)
