"""``norm_factory``: one spec names any layer, for models and command lines.

Grammar: ``NAME[:KEY=VALUE[,KEY=VALUE...]]``, e.g. ``"seqnorm:channel_groups=4,batch_groups=8"``,
``"ghostnorm:ghost_size=16"``, ``"hn:std_groups=8"``, ``"gnplus:variant=parallel"``, ``"none"``.
``NAME`` is a layer's class name or one of its aliases (case and ``-``/``_``
ignored); ``KEY`` is any field of that layer; ``VALUE`` is parsed as an int,
float, ``true``/``false``, ``none``, or else kept as a string. Parse a spec once
with :meth:`NormSpec.parse` (the typed spec lives in :mod:`seqnorm_jax.registry`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from flax import linen as nn

from seqnorm_jax.registry import ALIASES, NormSpec, parse_value

__all__ = ["norm_factory", "NormSpec", "ALIASES", "parse_value"]


def norm_factory(spec: str | NormSpec | Callable[..., nn.Module],
                 **overrides) -> Callable[..., nn.Module]:
    """A constructor of a norm layer from a spec.

    Args:
      spec: ``"NAME:KEY=VALUE,..."``, a :class:`NormSpec`, or already a callable
        (returned with ``overrides`` bound).
      **overrides: fields set in code (they win over the spec's).

    Returns:
      ``functools.partial(LayerClass, **fields)``: call it (optionally with
      ``name=...`` or more fields) to build a module.

    Raises:
      ValueError: an unknown layer name, an unknown field, or a malformed item,
        with the valid choices (and the closest one) in the message.
    """
    if callable(spec):
        return functools.partial(spec, **overrides)
    return NormSpec.parse(spec).factory(**overrides)
