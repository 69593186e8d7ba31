"""A small CNN for 28x28 images (MNIST, Fashion-MNIST): the CPU-scale convolutional model.

Three 3x3 convolutions, each followed by a norm and a ReLU, 2x2 max pooling after the
second and third, then a dense classifier on the flattened map:
conv32-norm-relu, conv64-norm-relu-pool, conv64-norm-relu-pool, dense. A 28x28 input
leaves a 7x7x64 map (3136 features). It is the convolutional counterpart of
:class:`~seqnorm_jax.models.SimpleNet` for quick comparisons of the layers on
normalization sets with spatial extent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from seqnorm_jax.linen import BatchNorm
from seqnorm_jax.models._common import (
    conv_layers,
    ModuleDef,
    check_images,
    check_positive,
    logits,
)

__all__ = ["SmallCNN"]


class SmallCNN(nn.Module):
    """conv-norm-relu blocks with 2x2 max pooling after all but the first, then dense.

    Attributes:
      num_classes: number of output logits.
      norm: norm factory (see :class:`~seqnorm_jax.models.MLP`); the convolutions
        have a bias only when it is ``Identity``.
      dtype: computation dtype; parameters and logits stay float32.
      features: output channels of the convolutions, in order (default 32, 64, 64).
    """

    num_classes: int
    norm: ModuleDef = BatchNorm
    dtype: Any = jnp.float32
    features: Sequence[int] = (32, 64, 64)

    def __post_init__(self):
        check_positive(type(self).__name__, num_classes=self.num_classes,
                       **{f"features[{i}]": f for i, f in enumerate(self.features)})
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        """Logits ``(N, num_classes)`` (float32) of NHWC images ``x``; see ``MLP.__call__``."""
        check_images(type(self).__name__, x)
        norm, conv = conv_layers(self, train, kernel_size=(3, 3))
        x = jnp.asarray(x, self.dtype)
        for i, width in enumerate(self.features, start=1):
            x = conv(width, name=f"conv{i}")(x)
            x = nn.relu(norm(name=f"norm{i}")(x))
            if i > 1:
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
        return logits(x)
