"""CIFAR ResNet v1: He, Zhang, Ren & Sun, "Deep Residual Learning for Image
Recognition", CVPR 2016, Sec. 4.2.

A 3x3 convolution with 16 filters, then three stages of ``n`` basic blocks with 16,
32 and 64 filters on 32x32, 16x16 and 8x8 maps (the first block of the second and
third stage has stride 2), global average pooling and a dense classifier:
``6n + 2`` weighted layers. ResNet-20 (n = 3, 0.27M parameters) and ResNet-56
(n = 9, 0.85M; the model of paper 000's loss-landscape study on CIFAR-10) are the
registry's ``resnet20`` and ``resnet56``. As in the paper, the shortcuts are
identities, and where the shape changes (option A) the input is subsampled and
zero-padded in the channels, so the shortcuts have no parameters; option B
(``shortcut="B"``) uses a strided 1x1 convolution and a norm instead.
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
    bind_norm,
    check_choice,
    check_images,
    check_positive,
    global_avg_pool,
    is_int,
    logits,
)

__all__ = ["CifarBasicBlock", "CifarResNet"]


class CifarBasicBlock(nn.Module):
    """conv3x3(stride)-norm-relu-conv3x3-norm, plus the shortcut, then ReLU.

    Attributes:
      features: output channels.
      norm: norm factory, already bound to ``use_running_average`` and ``dtype``.
      conv: ``nn.Conv`` factory with the model's bias, init and dtype.
      strides: stride of the first convolution (and of the shortcut).
      shortcut: ``"A"`` (subsample and zero-pad, no parameters) or ``"B"`` (1x1
        convolution and norm) where the shape changes.
      zero_init: initialize the scale of the last norm to zero, so the block
        starts as its shortcut.
    """

    features: int
    norm: ModuleDef
    conv: ModuleDef
    strides: int = 1
    shortcut: str = "A"
    zero_init: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the block to NHWC ``x``."""
        y = self.conv(self.features, (3, 3), strides=self.strides, name="conv1")(x)
        y = nn.relu(self.norm(name="norm1")(y))
        y = self.conv(self.features, (3, 3), name="conv2")(y)
        last_norm = (bind_norm(self.norm, scale_init=nn.initializers.zeros)
                     if self.zero_init else self.norm)
        y = last_norm(name="norm2")(y)
        residual = x
        if self.strides != 1 or x.shape[-1] != self.features:
            if self.shortcut == "A":
                residual = x[:, :: self.strides, :: self.strides, :]
                extra = self.features - x.shape[-1]
                residual = jnp.pad(residual, ((0, 0), (0, 0), (0, 0),
                                              (extra // 2, extra - extra // 2)))
            else:
                residual = self.conv(self.features, (1, 1), strides=self.strides,
                                     name="proj_conv")(x)
                residual = self.norm(name="proj_norm")(residual)
        return nn.relu(y + residual)


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet v1 of depth ``6n + 2`` (see the module docstring).

    Attributes:
      num_classes: number of output logits.
      norm: norm factory (see :class:`~seqnorm_jax.models.MLP`); the convolutions
        have a bias only when it is ``Identity``.
      dtype: computation dtype; parameters and logits stay float32.
      depth: ``6n + 2`` with ``n >= 1``: 20, 32, 44, 56, 110, ...
      width: filters of the first stage (16 in the paper); the stages have
        ``width``, ``2 * width`` and ``4 * width``.
      shortcut: ``"A"`` (the paper's CIFAR choice, parameter-free) or ``"B"``
        (projection) where the shape changes.
      zero_init_residual: initialize the last norm scale of each block to zero
        (Goyal et al. 2017); no effect for layers without a scale.
    """

    num_classes: int
    norm: ModuleDef = BatchNorm
    dtype: Any = jnp.float32
    depth: int = 20
    width: int = 16
    shortcut: str = "A"
    zero_init_residual: bool = False

    def __post_init__(self):
        name = type(self).__name__
        check_positive(name, num_classes=self.num_classes, width=self.width)
        if not is_int(self.depth) or self.depth < 8 or (self.depth - 2) % 6:
            raise ValueError(
                f"{name}: depth={self.depth!r} is not of the form 6n + 2 with n >= 1 (CIFAR "
                "ResNet v1 has 3 stages of n two-layer blocks plus the first convolution and "
                "the classifier); use e.g. 8, 14, 20, 32, 44, 56 or 110."
            )
        check_choice(name, "shortcut", self.shortcut, ("A", "B"))
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        """Logits ``(N, num_classes)`` (float32) of NHWC images ``x``; see ``MLP.__call__``."""
        check_images(type(self).__name__, x)
        norm, conv = conv_layers(self, train)
        blocks_per_stage = (self.depth - 2) // 6
        x = jnp.asarray(x, self.dtype)
        x = conv(self.width, (3, 3), name="stem_conv")(x)
        x = nn.relu(norm(name="stem_norm")(x))
        for stage in range(3):
            for block in range(blocks_per_stage):
                x = CifarBasicBlock(
                    features=self.width * 2**stage,
                    norm=norm,
                    conv=conv,
                    strides=2 if stage > 0 and block == 0 else 1,
                    shortcut=self.shortcut,
                    zero_init=self.zero_init_residual,
                    name=f"stage{stage + 1}_block{block + 1}",
                )(x)
        x = global_avg_pool(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
        return logits(x)
