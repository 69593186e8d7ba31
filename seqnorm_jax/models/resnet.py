"""ImageNet ResNets: He, Zhang, Ren & Sun, "Deep Residual Learning for Image
Recognition", CVPR 2016 (Table 1), in the "v1.5" form.

A 7x7/2 convolution with 64 filters, norm, ReLU and a 3x3/2 max pool, four stages
with 64, 128, 256 and 512 base filters (the first block of stages 2-4 has stride 2),
global average pooling and a dense classifier. ResNet-18 stacks (2, 2, 2, 2) basic
blocks (11.69M parameters with 1000 classes), ResNet-50 (3, 4, 6, 3) bottleneck
blocks (25.56M). v1.5 puts a bottleneck's stride on its 3x3 convolution rather than
on the first 1x1 (as torchvision and NVIDIA's reference do); shortcuts that change
the shape are a strided 1x1 convolution and a norm (option B). Paper 000 reports
ImageNet results with ResNet-18 v1.5; papers 002 and 003 use ResNet-18 on CIFAR-100,
SVHN and ImageNet, where ``stem="cifar"`` (a 3x3/1 convolution and no max pool)
keeps the resolution of 32x32 inputs. ``zero_init_residual=True`` initializes the
scale of the last norm of every block to zero (Goyal et al., "Accurate, Large
Minibatch SGD", 2017) through the norm factory's ``scale_init``.
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
    bind_norm,
    check_choice,
    check_images,
    check_positive,
    global_avg_pool,
    logits,
)

__all__ = ["BasicBlock", "BottleneckBlock", "ResNet", "ResNet18", "ResNet50"]


def _last_norm(norm: ModuleDef, zero_init: bool) -> ModuleDef:
    return bind_norm(norm, scale_init=nn.initializers.zeros) if zero_init else norm


def _shortcut(block: nn.Module, x: jax.Array, features: int) -> jax.Array:
    """Identity, or a strided 1x1 convolution and norm where the shape changes."""
    if block.strides == 1 and x.shape[-1] == features:
        return x
    x = block.conv(features, (1, 1), strides=block.strides, name="proj_conv")(x)
    return block.norm(name="proj_norm")(x)


class BasicBlock(nn.Module):
    """conv3x3(stride)-norm-relu-conv3x3-norm, plus the shortcut, then ReLU.

    Attributes:
      filters: channels of both convolutions (and of the output).
      norm: norm factory, already bound to ``use_running_average`` and ``dtype``.
      conv: ``nn.Conv`` factory with the model's bias, init and dtype.
      strides: stride of the first convolution and of the shortcut.
      zero_init: initialize the last norm's scale to zero.
    """

    filters: int
    norm: ModuleDef
    conv: ModuleDef
    strides: int = 1
    zero_init: bool = False

    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the block to NHWC ``x``."""
        y = self.conv(self.filters, (3, 3), strides=self.strides, name="conv1")(x)
        y = nn.relu(self.norm(name="norm1")(y))
        y = self.conv(self.filters, (3, 3), name="conv2")(y)
        y = _last_norm(self.norm, self.zero_init)(name="norm2")(y)
        return nn.relu(y + _shortcut(self, x, self.filters))


class BottleneckBlock(nn.Module):
    """v1.5 bottleneck: conv1x1-norm-relu, conv3x3(stride)-norm-relu, conv1x1(4x)-norm, + shortcut.

    Attributes:
      filters: channels of the first two convolutions; the output has ``4 * filters``.
      norm: norm factory, already bound to ``use_running_average`` and ``dtype``.
      conv: ``nn.Conv`` factory with the model's bias, init and dtype.
      strides: stride of the 3x3 convolution and of the shortcut.
      zero_init: initialize the last norm's scale to zero.
    """

    filters: int
    norm: ModuleDef
    conv: ModuleDef
    strides: int = 1
    zero_init: bool = False

    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the block to NHWC ``x``."""
        out = self.filters * self.expansion
        y = self.conv(self.filters, (1, 1), name="conv1")(x)
        y = nn.relu(self.norm(name="norm1")(y))
        y = self.conv(self.filters, (3, 3), strides=self.strides, name="conv2")(y)
        y = nn.relu(self.norm(name="norm2")(y))
        y = self.conv(out, (1, 1), name="conv3")(y)
        y = _last_norm(self.norm, self.zero_init)(name="norm3")(y)
        return nn.relu(y + _shortcut(self, x, out))


class ResNet(nn.Module):
    """ImageNet-style ResNet (see the module docstring).

    Attributes:
      num_classes: number of output logits (1000 for ImageNet).
      norm: norm factory (see :class:`~seqnorm_jax.models.MLP`); the convolutions
        have a bias only when it is ``Identity``.
      dtype: computation dtype; parameters and logits stay float32.
      stage_sizes: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
      block_cls: :class:`BasicBlock`, :class:`BottleneckBlock`, or a module class
        with their fields (``filters``, ``norm``, ``conv``, ``strides``, ``zero_init``).
      num_filters: base filters of the first stage (64); stage ``i`` has
        ``num_filters * 2**i``.
      stem: ``"imagenet"`` (7x7/2 convolution and 3x3/2 max pool) or ``"cifar"``
        (3x3/1 convolution, no pooling, for 32x32 inputs).
      zero_init_residual: zero-initialize the last norm scale of each block
        (no effect for layers without a scale).
    """

    num_classes: int
    norm: ModuleDef = BatchNorm
    dtype: Any = jnp.float32
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block_cls: type[nn.Module] = BasicBlock
    num_filters: int = 64
    stem: str = "imagenet"
    zero_init_residual: bool = False

    def __post_init__(self):
        name = type(self).__name__
        check_positive(name, num_classes=self.num_classes, num_filters=self.num_filters,
                       **{f"stage_sizes[{i}]": s for i, s in enumerate(self.stage_sizes)})
        if not self.stage_sizes:
            raise ValueError(
                f"{name}: stage_sizes must name at least one stage, e.g. (2, 2, 2, 2)."
            )
        if not (isinstance(self.block_cls, type) and issubclass(self.block_cls, nn.Module)):
            raise ValueError(
                f"{name}: block_cls must be a module class such as BasicBlock or "
                f"BottleneckBlock, got {self.block_cls!r}."
            )
        check_choice(name, "stem", self.stem, ("imagenet", "cifar"))
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        """Logits ``(N, num_classes)`` (float32) of NHWC images ``x``; see ``MLP.__call__``."""
        check_images(type(self).__name__, x)
        norm, conv = conv_layers(self, train)
        x = jnp.asarray(x, self.dtype)
        if self.stem == "imagenet":
            x = conv(self.num_filters, (7, 7), strides=2, padding=((3, 3), (3, 3)),
                     name="stem_conv")(x)
            x = nn.relu(norm(name="stem_norm")(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        else:
            x = conv(self.num_filters, (3, 3), name="stem_conv")(x)
            x = nn.relu(norm(name="stem_norm")(x))
        for stage, num_blocks in enumerate(self.stage_sizes):
            for block in range(num_blocks):
                x = self.block_cls(
                    filters=self.num_filters * 2**stage,
                    norm=norm,
                    conv=conv,
                    strides=2 if stage > 0 and block == 0 else 1,
                    zero_init=self.zero_init_residual,
                    name=f"stage{stage + 1}_block{block + 1}",
                )(x)
        x = global_avg_pool(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
        return logits(x)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
"""ResNet-18: :class:`ResNet` with (2, 2, 2, 2) basic blocks."""
ResNet18.__doc__ = "ResNet-18: :class:`ResNet` with (2, 2, 2, 2) basic blocks."
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckBlock)
"""ResNet-50 v1.5: :class:`ResNet` with (3, 4, 6, 3) bottleneck blocks."""
ResNet50.__doc__ = "ResNet-50 v1.5: :class:`ResNet` with (3, 4, 6, 3) bottleneck blocks."
