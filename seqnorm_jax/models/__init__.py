"""Flax linen models that take a norm factory, so any layer of seqnorm-jax drops in.

Every model has the fields ``num_classes``, ``norm`` (a norm factory, such as
``seqnorm_jax.norm_factory("ghost:batch_groups=4")``; default
:class:`seqnorm_jax.BatchNorm`) and ``dtype`` (the computation dtype; parameters,
running statistics and logits stay float32), plus its own width/depth fields, and
is called as ``model.apply(variables, x, train=...)``:

>>> model = get_model("resnet20", norm="seqnorm:channel_groups=4,batch_groups=8")
>>> variables = model.init(jax.random.key(0), x, train=False)
>>> logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])

Inputs are NHWC float arrays (the MLPs flatten whatever follows the batch axis);
the output is float32 logits ``(N, num_classes)``. The norm layers are named
``norm1``, ``norm2``, ... (``stem_norm``, ``proj_norm``, ``final_norm``) whatever
their class, so swapping BatchNorm for GhostNorm leaves the variable tree, and
checkpoints, unchanged. Convolutions and hidden dense layers carry a bias only
when the norm is ``norm_factory("none")`` (:class:`seqnorm_jax.Identity`);
otherwise the norm's bias takes its place. ``NoisyBatchNorm`` draws from the
``"noise"`` rng stream in training (``rngs={"noise": key}``); models with dropout
(``WideResNet(dropout_rate>0)``, VGG's ImageNet head) need ``rngs={"dropout": key}``.

Models: :class:`SimpleNet` and :class:`MLP` (papers 000, 003), :class:`SmallCNN`,
:class:`CifarResNet` (ResNet-20/56), :class:`WideResNet` (WRN-28-10),
:class:`ResNet` (ResNet-18, ResNet-50 v1.5) and :class:`VGG` (VGG-11).
"""

from seqnorm_jax.models._common import adaptive_avg_pool, bind_norm, is_identity
from seqnorm_jax.models.cifar_resnet import CifarBasicBlock, CifarResNet
from seqnorm_jax.models.cnn import SmallCNN
from seqnorm_jax.models.mlp import MLP, SimpleNet
from seqnorm_jax.models.registry import MODELS, get_model
from seqnorm_jax.models.resnet import BasicBlock, BottleneckBlock, ResNet, ResNet18, ResNet50
from seqnorm_jax.models.vgg import VGG, VGG11_LAYERS
from seqnorm_jax.models.wide_resnet import WideBasicBlock, WideResNet

__all__ = [
    "MLP",
    "MODELS",
    "VGG",
    "VGG11_LAYERS",
    "BasicBlock",
    "BottleneckBlock",
    "CifarBasicBlock",
    "CifarResNet",
    "ResNet",
    "ResNet18",
    "ResNet50",
    "SimpleNet",
    "SmallCNN",
    "WideBasicBlock",
    "WideResNet",
    "adaptive_avg_pool",
    "bind_norm",
    "get_model",
    "is_identity",
]
