"""``norm_factory``: one string names any layer, for models and command lines.

Grammar: ``NAME[:KEY=VALUE[,KEY=VALUE...]]``, e.g. ``"seqnorm:channel_groups=4,batch_groups=8"``,
``"ghostnorm:ghost_size=16"``, ``"hn:std_groups=8"``, ``"gnplus:variant=parallel"``, ``"none"``.
``NAME`` is a layer's class name or one of its aliases (case and ``-``/``_``
ignored); ``KEY`` is any field of that layer; ``VALUE`` is parsed as an int,
float, ``true``/``false``, ``none``, or else kept as a string.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from flax import linen as nn

from seqnorm_jax.linen import LAYERS, layer_fields

__all__ = ["norm_factory", "ALIASES"]

ALIASES: dict[str, str] = {
    "batchnorm": "BatchNorm", "bn": "BatchNorm",
    "ghostnorm": "GhostNorm", "ghost": "GhostNorm", "ghostbn": "GhostNorm",
    "groupnorm": "GroupNorm", "gn": "GroupNorm",
    "seqnorm": "SeqNorm",
    "batchgroupnorm": "BatchGroupNorm", "fourthings": "BatchGroupNorm",
    "heterologousnorm": "HeterologousNorm", "hn": "HeterologousNorm",
    "gnplus": "GNPlus", "gn+": "GNPlus",
    "bgn": "BGN",
    "noisybatchnorm": "NoisyBatchNorm", "noisybn": "NoisyBatchNorm",
    "none": "Identity", "identity": "Identity",
}


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "").replace("-", "")


def parse_value(text: str):
    """A ``KEY=VALUE`` value: bool, None, int, float, else the stripped text."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def norm_factory(spec: str | Callable[..., nn.Module], **overrides) -> Callable[..., nn.Module]:
    """Parse ``spec`` into a constructor of a norm layer.

    Args:
      spec: ``"NAME:KEY=VALUE,..."``, or already a callable (returned with
        ``overrides`` bound).
      **overrides: fields set in code (they win over the string's).

    Returns:
      ``functools.partial(LayerClass, **fields)``: call it (optionally with
      ``name=...`` or more fields) to build a module.

    Raises:
      ValueError: an unknown layer name, an unknown field, or a malformed item,
        with the valid choices in the message.
    """
    if callable(spec):
        return functools.partial(spec, **overrides)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"norm spec must be a non-empty string like 'seqnorm:channel_groups=4', "
                         f"got {spec!r}.")
    name, _, rest = spec.partition(":")
    cls_name = ALIASES.get(_key(name)) or {_key(k): k for k in LAYERS}.get(_key(name))
    if cls_name is None:
        raise ValueError(
            f"unknown norm layer {name.strip()!r} in {spec!r}; choose one of "
            f"{sorted(set(ALIASES) | {k.lower() for k in LAYERS})}."
        )
    cls = LAYERS[cls_name]
    fields = layer_fields(cls)
    kwargs = {}
    for item in filter(None, (i.strip() for i in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"malformed item {item!r} in norm spec {spec!r}: expected KEY=VALUE.")
        if key not in fields:
            raise ValueError(
                f"{cls_name} has no field {key!r} (in norm spec {spec!r}); its fields are "
                f"{sorted(fields)}."
            )
        kwargs[key] = parse_value(value)
    for key in overrides:
        if key not in fields and key != "name":
            raise ValueError(f"{cls_name} has no field {key!r}; its fields are {sorted(fields)}.")
    kwargs.update(overrides)
    return functools.partial(cls, **kwargs)
