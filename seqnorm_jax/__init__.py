"""seqnorm-jax: batch- and channel-grouped normalization layers for JAX and Flax.

GhostNorm, SeqNorm, the "Four Things" batch/group normalization and example
weighing, Heterologous Normalization, GN+ and Batch Group Normalization, as pure
functions (:mod:`seqnorm_jax.functional`, on the statistics core
:mod:`seqnorm_jax.stats`), as drop-in replacements for ``flax.linen.BatchNorm``
and ``GroupNorm`` (:mod:`seqnorm_jax.linen`, exported here) and as Flax NNX layers
(:mod:`seqnorm_jax.nnx`).

The names below are imported when first used (PEP 562, :func:`seqnorm_jax._extras.lazy_exports`):
``import seqnorm_jax`` is instant and ``seqnorm-jax --help`` never loads jax.
"""

from typing import TYPE_CHECKING

from seqnorm_jax._extras import lazy_exports

if TYPE_CHECKING:
    from seqnorm_jax import functional, nnx, stats
    from seqnorm_jax.factory import norm_factory
    from seqnorm_jax.linen import (
        BGN,
        BatchGroupNorm,
        BatchNorm,
        GhostNorm,
        GNPlus,
        GroupNorm,
        HeterologousNorm,
        Identity,
        NoisyBatchNorm,
        SeqNorm,
    )
    from seqnorm_jax.renaming import rename_norm_modules

__version__ = "0.1.0"

__all__ = [
    "BGN",
    "BatchGroupNorm",
    "BatchNorm",
    "GhostNorm",
    "GNPlus",
    "GroupNorm",
    "HeterologousNorm",
    "Identity",
    "NoisyBatchNorm",
    "SeqNorm",
    "functional",
    "nnx",
    "norm_factory",
    "rename_norm_modules",
    "stats",
]

__getattr__, __dir__ = lazy_exports(__name__, __file__)
