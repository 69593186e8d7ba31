"""VGG: Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
Recognition", ICLR 2015; configuration A (VGG-11), with a norm after each convolution.

Eight 3x3 convolutions (64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M, where M
is a 2x2/2 max pool), each followed by the norm and a ReLU, then one of two heads:

* ``"imagenet"``: the paper's classifier, adaptive average pooling to 7x7 (as
  torchvision, so any input size works), dense 4096-ReLU-dropout twice, then dense
  ``num_classes``; with 1000 classes and no norm this is the paper's 133M-parameter
  network (torchvision's ``vgg11``: 132,863,336).
* ``"cifar"``: one dense layer on the flattened map (512 features for 32x32 inputs),
  the common CIFAR variant. Paper 004 (GN+) studies VGG-11 on CIFAR-10 because it
  trains without any normalization, which ``norm_factory("none")`` reproduces.

``head="auto"`` (default) picks ``"cifar"`` for inputs of at most 32x32 and
``"imagenet"`` otherwise.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from seqnorm_jax.linen import BatchNorm
from seqnorm_jax.models._common import (
    conv_layers,
    ModuleDef,
    adaptive_avg_pool,
    check_choice,
    check_images,
    check_positive,
    check_rate,
    logits,
)

__all__ = ["VGG", "VGG11_LAYERS"]

VGG11_LAYERS: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M",
                                       512, 512, "M")
"""Configuration A of Simonyan & Zisserman: conv widths, ``"M"`` for a 2x2 max pool."""


class VGG(nn.Module):
    """VGG with a norm after every convolution (see the module docstring).

    Attributes:
      num_classes: number of output logits.
      norm: norm factory (see :class:`~seqnorm_jax.models.MLP`); the convolutions
        have a bias only when it is ``Identity`` (the classifier's dense layers
        always have one).
      dtype: computation dtype; parameters and logits stay float32.
      layers: convolution widths and ``"M"`` for 2x2/2 max pooling
        (default :data:`VGG11_LAYERS`).
      head: ``"auto"``, ``"cifar"`` or ``"imagenet"``.
      hidden: width of the ImageNet head's two hidden dense layers (4096).
      dropout_rate: dropout after them (0.5); with a rate above 0, training needs
        ``rngs={"dropout": key}``. Unused by the CIFAR head.
    """

    num_classes: int
    norm: ModuleDef = BatchNorm
    dtype: Any = jnp.float32
    layers: Sequence[int | str] = VGG11_LAYERS
    head: str = "auto"
    hidden: int = 4096
    dropout_rate: float = 0.5

    def __post_init__(self):
        name = type(self).__name__
        check_positive(name, num_classes=self.num_classes, hidden=self.hidden)
        for i, layer in enumerate(self.layers):
            if layer != "M":
                check_positive(name, **{f"layers[{i}] (a width, or 'M' for max pooling)": layer})
        check_choice(name, "head", self.head, ("auto", "cifar", "imagenet"))
        check_rate(name, "dropout_rate", self.dropout_rate)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        """Logits ``(N, num_classes)`` (float32) of NHWC images ``x``; see ``MLP.__call__``."""
        check_images(type(self).__name__, x)
        head = self.head
        if head == "auto":
            head = "cifar" if max(x.shape[1:3]) <= 32 else "imagenet"
        norm, conv = conv_layers(self, train, kernel_size=(3, 3))
        dense = functools.partial(nn.Dense, dtype=self.dtype)
        x = jnp.asarray(x, self.dtype)
        i = 0
        for layer in self.layers:
            if layer == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
                continue
            i += 1
            x = conv(layer, name=f"conv{i}")(x)
            x = nn.relu(norm(name=f"norm{i}")(x))
        if head == "imagenet":
            x = adaptive_avg_pool(x, (7, 7)).reshape((x.shape[0], -1))
            for j in (1, 2):
                x = nn.relu(dense(self.hidden, name=f"fc{j}")(x))
                x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        else:
            x = x.reshape((x.shape[0], -1))
        x = dense(self.num_classes, name="head")(x)
        return logits(x)
