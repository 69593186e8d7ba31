"""The device end of the input pipeline: batches moved ahead of the step, normalised there.

Loaders built with ``make_loader(..., normalize=False)`` hand over uint8 images;
:func:`prefetch_to_device` starts their transfer a few batches ahead of the
step that consumes them (``jax.device_put`` is asynchronous), and the jitted
step normalises them with :func:`normalize_on_device`, where XLA fuses the
conversion into the first layer's input. Per image that moves a quarter of the
bytes of float32 from host to device.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from seqnorm_jax import checks

__all__ = ["normalize_on_device", "prefetch_to_device"]


def normalize_on_device(images: jax.Array, mean: Sequence[float], std: Sequence[float],
                        dtype=jnp.float32) -> jax.Array:
    """``(images / 255 - mean) / std`` per channel, for use inside a jitted step.

    The same arithmetic as the host's :func:`~seqnorm_jax.data.normalize`
    (float32 throughout), then a cast to ``dtype``.

    Args:
      images: uint8 (or float, in the 0..255 scale) ``(..., C)`` pixels.
      mean, std: ``C`` per-channel constants in the ``[0, 1]`` scale
        (``src.info.mean`` / ``src.info.std``), Python or NumPy values (static).
      dtype: the result's dtype (``jnp.bfloat16`` for a bfloat16 model).

    Returns:
      ``images.shape``, ``dtype``.

    Raises:
      ValueError: ``mean``/``std`` do not hold one value per channel.
    """
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    channels = images.shape[-1] if images.ndim else None
    if mean.shape != (channels,) or std.shape != (channels,):
        raise ValueError(f"normalize_on_device: `mean` and `std` need one value per channel "
                         f"(the last axis of `images`, {channels}), got shapes {mean.shape} "
                         f"and {std.shape}.")
    x = images.astype(jnp.float32) * np.float32(1 / 255)
    return ((x - mean) / std).astype(dtype)


def prefetch_to_device(iterator: Iterable, size: int = 2,
                       sharding: jax.sharding.Sharding | None = None) -> Iterator:
    """Yield the batches of ``iterator`` already on the device, ``size`` transfers ahead.

    Each batch (any pytree of host arrays) is put with ``jax.device_put`` as
    soon as it is read, so up to ``size`` transfers overlap the computation on
    the batches before. With a ``sharding``, each leaf becomes a global array
    assembled from this process's part (``jax.make_array_from_process_local_data``,
    also right for one process); without one, it goes to the default device.

    Args:
      iterator: host batches (e.g. a :class:`~seqnorm_jax.data.Loader`).
      size: batches in flight, ``>= 1`` (2: the next one is ready while the
        current one is used).
      sharding: how each leaf is laid out over the devices, e.g.
        ``NamedSharding(mesh, P("data"))``.

    Yields:
      The batches, in order, as ``jax.Array`` pytrees.
    """
    checks.positive_int(size, "`size`", "prefetch_to_device")
    if sharding is None:
        put = jax.device_put
    else:
        def put(batch):
            return jax.tree_util.tree_map(
                lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
    iterator = iter(iterator)
    queue = collections.deque()

    def enqueue(n: int) -> None:
        for batch in itertools.islice(iterator, n):
            queue.append(put(batch))

    enqueue(size)
    while queue:
        yield queue.popleft()
        enqueue(1)
