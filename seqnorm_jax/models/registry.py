"""``MODELS`` and ``get_model``: build any model by name with any norm layer."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from seqnorm_jax.factory import norm_factory
from seqnorm_jax.models._common import ModuleDef, layer_class
from seqnorm_jax.models.cifar_resnet import CifarResNet
from seqnorm_jax.models.cnn import SmallCNN
from seqnorm_jax.models.mlp import MLP, SimpleNet
from seqnorm_jax.models.resnet import ResNet18, ResNet50
from seqnorm_jax.models.vgg import VGG
from seqnorm_jax.models.wide_resnet import WideResNet

__all__ = ["MODELS", "get_model"]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "simplenet": SimpleNet,
    "mlp": MLP,
    "mlp4": functools.partial(MLP, features=(128, 128, 128, 128)),
    "cnn": SmallCNN,
    "cifar_resnet": CifarResNet,
    "resnet20": functools.partial(CifarResNet, depth=20),
    "resnet56": functools.partial(CifarResNet, depth=56),
    "wrn": WideResNet,
    "wrn28_10": functools.partial(WideResNet, depth=28, widen_factor=10),
    "resnet18": ResNet18,
    "resnet50": ResNet50,
    "vgg11": VGG,
}
"""Model constructors by name; each takes ``num_classes``, ``norm``, ``dtype`` and its
own fields (a preset's fields, e.g. ``depth`` of ``resnet20``, can be overridden)."""


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


def get_model(
    name: str,
    *,
    norm: str | ModuleDef = "bn",
    num_classes: int = 10,
    dtype: Any = jnp.float32,
    **fields: Any,
) -> nn.Module:
    """Build the model ``name`` with the norm layer ``norm``.

    Args:
      name: a key of :data:`MODELS`: ``simplenet``, ``mlp``, ``mlp4``, ``cnn``,
        ``cifar_resnet``, ``resnet20``, ``resnet56``, ``wrn``, ``wrn28_10``,
        ``resnet18``, ``resnet50``, ``vgg11`` (case, ``-`` and ``_`` ignored).
      norm: a :func:`~seqnorm_jax.norm_factory` spec such as
        ``"ghost:batch_groups=4"`` or ``"none"``, or a norm factory (a layer class
        or a ``functools.partial`` of one). ``NoisyBatchNorm`` needs
        ``rngs={"noise": key}`` when the model is applied in training.
      num_classes: number of output logits.
      dtype: computation dtype (``jnp.bfloat16`` for mixed precision; parameters,
        running statistics and logits stay float32).
      **fields: the model's other fields, e.g. ``depth=32`` for ``cifar_resnet``,
        ``widen_factor=4`` for ``wrn``, ``features=(256, 128)`` for ``mlp``,
        ``head="imagenet"`` for ``vgg11``.

    Returns:
      The (unbound) flax module; call ``init``/``apply`` with ``train=...``.

    Raises:
      ValueError: an unknown model name or field (the message lists the valid
        ones), an invalid norm spec, or invalid field values (e.g. a depth that is
        not ``6n + 2`` for the CIFAR ResNets).
    """
    keys = {_key(k): k for k in MODELS}
    if not isinstance(name, str) or _key(name) not in keys:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}.")
    constructor = MODELS[keys[_key(name)]]
    cls = layer_class(constructor)
    known = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(
            f"model {name!r} ({cls.__name__}) has no field(s) {unknown}; its fields are "
            f"{sorted(known - {'num_classes', 'norm', 'dtype'})} (num_classes, norm and dtype "
            "are arguments of get_model)."
        )
    # Lists (from a config file or command line) become tuples: a module's fields must be
    # hashable for it to be a static argument of jax.jit.
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    return constructor(num_classes=num_classes, norm=norm_factory(norm), dtype=dtype, **fields)
