"""Wide ResNet: Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016.

Pre-activation basic blocks (norm-relu-conv3x3, norm-relu-[dropout]-conv3x3, He et
al.'s "Identity Mappings in Deep Residual Networks", ECCV 2016) in three stages of
``n = (depth - 4) / 6`` blocks with ``16k``, ``32k`` and ``64k`` filters (``k`` is
the widening factor) after a 16-filter 3x3 convolution, then a final norm-relu,
global average pooling and a dense classifier. Where a block changes the shape,
its shortcut is a (strided) 1x1 convolution of the block's pre-activated input, as
in the authors' code. WRN-28-10 (36.5M parameters) is the CIFAR-10/100 model of
papers 000 and 001 (registry name ``wrn28_10``; ``wrn`` takes ``depth`` and
``widen_factor``).
"""

from __future__ import annotations

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
    check_rate,
    global_avg_pool,
    is_int,
    logits,
)

__all__ = ["WideBasicBlock", "WideResNet"]


class WideBasicBlock(nn.Module):
    """Pre-activation block: norm-relu-conv3x3(stride), norm-relu-dropout-conv3x3, + shortcut.

    Attributes:
      features: output channels.
      norm: norm factory, already bound to ``use_running_average`` and ``dtype``.
      conv: ``nn.Conv`` factory with the model's bias, init and dtype.
      strides: stride of the first convolution (and of the shortcut).
      dropout_rate: dropout between the two convolutions (0 disables it).
      train: whether dropout is active.
    """

    features: int
    norm: ModuleDef
    conv: ModuleDef
    strides: int = 1
    dropout_rate: float = 0.0
    train: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the block to NHWC ``x``."""
        activated = nn.relu(self.norm(name="norm1")(x))
        if self.strides != 1 or x.shape[-1] != self.features:
            residual = self.conv(self.features, (1, 1), strides=self.strides,
                                 name="proj_conv")(activated)
        else:
            residual = x
        y = self.conv(self.features, (3, 3), strides=self.strides, name="conv1")(activated)
        y = nn.relu(self.norm(name="norm2")(y))
        if self.dropout_rate > 0:
            y = nn.Dropout(self.dropout_rate, deterministic=not self.train)(y)
        y = self.conv(self.features, (3, 3), name="conv2")(y)
        return y + residual


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` (see the module docstring).

    Attributes:
      num_classes: number of output logits.
      norm: norm factory (see :class:`~seqnorm_jax.models.MLP`); the convolutions
        have a bias only when it is ``Identity``.
      dtype: computation dtype; parameters and logits stay float32.
      depth: ``6n + 4`` with ``n >= 1``: 10, 16, 22, 28, 40, ...
      widen_factor: ``k``, the widening factor (10 for WRN-28-10).
      dropout_rate: dropout inside each block (the paper uses 0.3 in some runs; 0
        here by default). With a rate above 0, training needs ``rngs={"dropout": key}``.
    """

    num_classes: int
    norm: ModuleDef = BatchNorm
    dtype: Any = jnp.float32
    depth: int = 28
    widen_factor: int = 10
    dropout_rate: float = 0.0

    def __post_init__(self):
        name = type(self).__name__
        check_positive(name, num_classes=self.num_classes, widen_factor=self.widen_factor)
        if not is_int(self.depth) or self.depth < 10 or (self.depth - 4) % 6:
            raise ValueError(
                f"{name}: depth={self.depth!r} is not of the form 6n + 4 with n >= 1 (3 stages "
                "of n two-layer blocks, the first convolution, the shortcut convolutions "
                "counted once and the classifier); use e.g. 10, 16, 22, 28 or 40."
            )
        check_rate(name, "dropout_rate", self.dropout_rate)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        """Logits ``(N, num_classes)`` (float32) of NHWC images ``x``; see ``MLP.__call__``."""
        check_images(type(self).__name__, x)
        norm, conv = conv_layers(self, train)
        blocks_per_stage = (self.depth - 4) // 6
        x = jnp.asarray(x, self.dtype)
        x = conv(16, (3, 3), name="stem_conv")(x)
        for stage in range(3):
            for block in range(blocks_per_stage):
                x = WideBasicBlock(
                    features=16 * 2**stage * self.widen_factor,
                    norm=norm,
                    conv=conv,
                    strides=2 if stage > 0 and block == 0 else 1,
                    dropout_rate=self.dropout_rate,
                    train=train,
                    name=f"stage{stage + 1}_block{block + 1}",
                )(x)
        x = nn.relu(norm(name="final_norm")(x))
        x = global_avg_pool(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
        return logits(x)
