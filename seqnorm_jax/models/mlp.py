"""Multilayer perceptrons: the generic :class:`MLP` and paper 000's :class:`SimpleNet`.

* ``SimpleNet`` (Dimitriou & Arandjelović, paper 000 Sec. 4.1 and paper 001): the
  MNIST network of the loss-landscape study, 784-512-300-10, a norm after each
  hidden dense layer and before its ReLU.
* ``MLP(features=(128, 128, 128, 128))`` (the registry's ``mlp4``): the four-layer,
  128-unit network of the statistics-fluctuation analysis of paper 003 (Sec. 4.6),
  "BN and ReLU after the FC layer".
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
    ModuleDef,
    bind_norm,
    check_float,
    check_positive,
    is_identity,
    logits,
)

__all__ = ["MLP", "SimpleNet"]


class MLP(nn.Module):
    """Dense -> norm -> ReLU for each hidden width, then a dense classifier.

    The input is flattened to ``(N, prod(rest))``, so 28x28x1 images enter as 784
    features. The hidden dense layers have a bias only when ``norm`` is
    ``Identity`` (``norm_factory("none")``); otherwise the norm's bias replaces it.
    Dense kernels use flax's default (LeCun normal) initialization.

    Attributes:
      num_classes: number of output logits.
      norm: norm factory, e.g. ``seqnorm_jax.norm_factory("ghost:batch_groups=4")``
        (called as ``norm(name=..., use_running_average=..., dtype=...)``).
        ``NoisyBatchNorm`` needs ``rngs={"noise": key}`` in training.
      dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters stay float32
        and the logits are float32.
      features: hidden widths, in order.
    """

    num_classes: int
    norm: ModuleDef = BatchNorm
    dtype: Any = jnp.float32
    features: Sequence[int] = (128, 128, 128, 128)

    def __post_init__(self):
        check_positive(type(self).__name__, num_classes=self.num_classes,
                       **{f"features[{i}]": f for i, f in enumerate(self.features)})
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        """Logits ``(N, num_classes)`` (float32) of ``x`` of shape ``(N, ...)``.

        ``train=True`` normalizes with batch statistics and updates ``batch_stats``
        (apply with ``mutable=["batch_stats"]``); ``train=False`` uses the running ones.
        """
        check_float(type(self).__name__, x)
        norm = bind_norm(self.norm, use_running_average=not train, dtype=self.dtype)
        dense = functools.partial(nn.Dense, dtype=self.dtype)
        x = jnp.asarray(x, self.dtype).reshape((x.shape[0], -1))
        for i, width in enumerate(self.features, start=1):
            x = dense(width, use_bias=is_identity(self.norm), name=f"dense{i}")(x)
            x = norm(name=f"norm{i}")(x)
            x = nn.relu(x)
        x = dense(self.num_classes, name="head")(x)
        return logits(x)


class SimpleNet(MLP):
    """Paper 000's SimpleNet for MNIST: 784-512-300-10, norm before each hidden ReLU.

    An :class:`MLP` with ``features=(512, 300)``; see its attributes. With
    ``norm_factory("none")`` it is the paper's unnormalized baseline.
    """

    features: Sequence[int] = (512, 300)
