"""The one registry of normalization layers: what is a norm layer, its sets, its spec.

Every part of seqnorm-jax that asks a question about a norm layer asks it here:

* :func:`is_norm_layer`: seqnorm-jax's linen and NNX layers (not ``Identity``) and
  flax's own ``BatchNorm``, ``GroupNorm``, ``LayerNorm``, ``RMSNorm`` and
  ``InstanceNorm`` (linen and NNX). The training step's output noise, the output-range
  analysis and the optimizer's norm-parameter labels all use it.
* :func:`takes_example_weight`: the layers with the "Four Things" ``example_weight``
  call argument (seqnorm-jax's own).
* :func:`normalization_set_size`: how many values each output is normalized over.
* :func:`feature_axes`: the layer's feature axes for an input of a given rank.
* :class:`NormSpec` and :func:`spec_of`: the typed ``"name:key=value,..."`` spec of a
  layer, parsed once (:meth:`NormSpec.parse`) and printed back (``str``).

A layer is described once, by a :class:`NormLayer` entry in :data:`NORM_LAYERS`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from flax import linen as nn
from flax import nnx as fnnx

from seqnorm_jax import checks
from seqnorm_jax import linen as snl
from seqnorm_jax import nnx as snx
from seqnorm_jax.functional._call import BATCH_GROUPS
from seqnorm_jax.functional.two_step import SEQ_NORM_CHANNEL_GROUPS
from seqnorm_jax.layers_common import RULES

__all__ = [
    "NormLayer",
    "NormSpec",
    "NORM_LAYERS",
    "NORM_TYPES",
    "entry_of",
    "is_norm_layer",
    "takes_example_weight",
    "feature_axes",
    "normalization_set_size",
    "spec_of",
    "parse_value",
]


@dataclasses.dataclass(frozen=True)
class Sizes:
    """An input's sizes as a norm layer sees them: batch, spatial product, channels."""

    n: int
    spatial: int
    c: int
    shape: tuple[int, ...]


SetSize = Callable[[Any, Sizes], "int | None"]


@dataclasses.dataclass(frozen=True)
class NormLayer:
    """One normalization layer: its names, its classes and how large its sets are.

    Attributes:
      name: the canonical name, seqnorm-jax's linen class name (``"SeqNorm"``).
      aliases: other names a spec may use (compared ignoring case, ``-`` and ``_``).
      classes: the module classes of this layer (linen, NNX; flax's own for theirs).
      set_size: ``(layer, sizes) -> m``, the elements of each normalization set in
        training (``None`` where no single set exists).
      ours: a seqnorm-jax layer (it takes ``mask`` and ``example_weight``, and has a spec).
    """

    name: str
    aliases: tuple[str, ...]
    classes: tuple[type, ...]
    set_size: SetSize | None
    ours: bool = True


# ----------------------------------------------------------------------------
# the size of each layer's normalization sets
# ----------------------------------------------------------------------------


def _groups(layer: Any, s: Sizes, what: str, groups: str, size: str,
            default: int | None) -> int:
    """The layer's number of groups of the batch or the channels; ``default`` (None: one
    channel per group) when it gives neither a count nor a size, as its pure function."""
    total = s.n if what == "batch" else s.c
    count = getattr(layer, groups, None)
    by_size = getattr(layer, size, None)
    if groups in RULES:  # a group_size overrides the default num_groups, as in the layers
        count = RULES[groups](count, {size: by_size})
    return checks.resolve_groups(
        total, count, by_size, who=type(layer).__name__, groups_name=groups, size_name=size,
        what=f"{'batch size' if what == 'batch' else 'number of channels'} of the input "
             f"(shape {s.shape})", default=s.c if default is None else default)


def _ghost(layer: Any, s: Sizes) -> int:
    return s.n // _groups(layer, s, "batch", "batch_groups", "ghost_size", BATCH_GROUPS)


def _channel_group(layer: Any, s: Sizes, default: int | None) -> int:
    return s.c // _groups(layer, s, "channels", "channel_groups", "channel_group_size",
                          default)


def _num_groups(layer: Any, s: Sizes) -> int:
    return s.c // _groups(layer, s, "channels", "num_groups", "group_size", None)


def _batch_size(layer: Any, s: Sizes) -> int:
    return s.n * s.spatial


def _ghost_size(layer: Any, s: Sizes) -> int:
    return _ghost(layer, s) * s.spatial


def _batch_group_size(layer: Any, s: Sizes) -> int:
    return _ghost(layer, s) * s.spatial * _channel_group(layer, s, None)


def _group_size(layer: Any, s: Sizes) -> int | None:
    if getattr(layer, "reduction_axes", None) is not None:
        return None  # flax's reduction_axes: any axes
    return s.spatial * _num_groups(layer, s)


def _bgn_size(layer: Any, s: Sizes) -> int:
    return s.n * s.spatial * _num_groups(layer, s)


def _seq_size(layer: Any, s: Sizes) -> int:
    # The set of the last step, whose output the layer returns (each step is
    # scale-invariant, so the first does not change the bound of the second).
    if layer.order == "ghost_first":
        return s.spatial * _channel_group(layer, s, SEQ_NORM_CHANNEL_GROUPS)
    return _ghost(layer, s) * s.spatial


def _reduced_size(layer: Any, s: Sizes) -> int:
    axes = getattr(layer, "reduction_axes", -1)
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    return math.prod(s.shape[a] for a in axes)


def _instance_size(layer: Any, s: Sizes) -> int:
    return s.spatial


NORM_LAYERS: tuple[NormLayer, ...] = (
    NormLayer("BatchNorm", ("bn", "batchnorm"), (snl.BatchNorm, snx.BatchNorm), _batch_size),
    NormLayer("GhostNorm", ("ghost", "ghostbn"), (snl.GhostNorm, snx.GhostNorm), _ghost_size),
    NormLayer("GroupNorm", ("gn",), (snl.GroupNorm, snx.GroupNorm), _group_size),
    NormLayer("SeqNorm", (), (snl.SeqNorm, snx.SeqNorm), _seq_size),
    NormLayer("BatchGroupNorm", ("fourthings",), (snl.BatchGroupNorm, snx.BatchGroupNorm),
              _batch_group_size),
    # Mean and variance from different sets, and a mixture of two outputs: no single set.
    NormLayer("HeterologousNorm", ("hn",), (snl.HeterologousNorm, snx.HeterologousNorm), None),
    NormLayer("GNPlus", ("gn+",), (snl.GNPlus, snx.GNPlus), None),
    NormLayer("BGN", (), (snl.BGN, snx.BGN), _bgn_size),
    # The noise is added before normalizing: BatchNorm's sets.
    NormLayer("NoisyBatchNorm", ("noisybn",), (snl.NoisyBatchNorm, snx.NoisyBatchNorm),
              _batch_size),
    # flax's own layers
    NormLayer("flax.BatchNorm", (), (nn.BatchNorm, fnnx.BatchNorm), _batch_size, ours=False),
    NormLayer("flax.GroupNorm", (), (nn.GroupNorm, fnnx.GroupNorm), _group_size, ours=False),
    NormLayer("flax.LayerNorm", (), (nn.LayerNorm, fnnx.LayerNorm), _reduced_size, ours=False),
    NormLayer("flax.InstanceNorm", (), (nn.InstanceNorm, fnnx.InstanceNorm), _instance_size,
              ours=False),
    # RMSNorm does not subtract a mean: the centered-set bounds do not apply.
    NormLayer("flax.RMSNorm", (), (nn.RMSNorm, fnnx.RMSNorm), None, ours=False),
)
"""The registry: one :class:`NormLayer` entry per norm layer of this library."""

# The linen classes of every norm layer (for ``isinstance``).
NORM_TYPES: tuple[type, ...] = tuple(
    cls for e in NORM_LAYERS for cls in e.classes if issubclass(cls, nn.Module))
"""The linen classes of every norm layer of this library (for ``isinstance``)."""

_BY_CLASS: dict[type, NormLayer] = {cls: e for e in NORM_LAYERS for cls in e.classes}


def entry_of(module: Any) -> NormLayer | None:
    """The registry entry of ``module`` (an instance or a class), ``None`` if it is none."""
    cls = module if isinstance(module, type) else type(module)
    for base in cls.__mro__:  # a user's subclass of a norm layer is that norm layer
        if base in _BY_CLASS:
            return _BY_CLASS[base]
    return None


def is_norm_layer(module: Any) -> bool:
    """True for a normalization layer: seqnorm-jax's (not ``Identity``) or flax's own."""
    return entry_of(module) is not None


def takes_example_weight(module: Any) -> bool:
    """True for a layer whose call takes ``example_weight`` (seqnorm-jax's own)."""
    entry = entry_of(module)
    return entry is not None and entry.ours


def feature_axes(module: Any, ndim: int) -> tuple[int, ...]:
    """The non-negative feature axes of a norm layer's input of rank ``ndim``.

    Layers with running statistics name them ``axis``; flax's ``LayerNorm``,
    ``RMSNorm`` and ``InstanceNorm`` ``feature_axes``; GroupNorm's are the last axis.
    """
    if hasattr(module, "axis"):
        axis = module.axis
    else:
        axis = getattr(module, "feature_axes", -1)
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % ndim for a in axes))


def normalization_set_size(module: Any, input_shape: Sequence[int]) -> int | None:
    """``m``: how many values each output of ``module`` is normalized over, in training.

    For an input of shape ``(N, spatial..., C)`` (``S`` the product of the spatial
    sizes): BatchNorm and NoisyBatchNorm ``N S``; GhostNorm ``(N / G_M) S``;
    BatchGroupNorm ``(N / G_M) S (C / G_C)``; GroupNorm ``S C / G``; BGN ``N S C / G``;
    SeqNorm the set of its last step (``(N / G_M) S`` for ``group_first``, ``S C / G_C``
    for ``ghost_first``); flax's LayerNorm the product of its reduction axes and
    InstanceNorm ``S``. ``None`` where no single set exists: HeterologousNorm, GNPlus,
    RMSNorm, and a GroupNorm with explicit ``reduction_axes``.

    Raises:
      ValueError: ``module`` is not a norm layer, or its groups do not divide the
        batch or the channels (the layer itself would raise in training).
    """
    entry = entry_of(module)
    if entry is None:
        raise ValueError(f"normalization_set_size: {type(module).__name__} is not a norm "
                         "layer; pass a seqnorm-jax layer or one of flax's norm layers.")
    shape = tuple(int(d) for d in input_shape)
    if len(shape) < 2:
        raise ValueError(f"input_shape must be (N, ..., C), got {shape}.")
    if entry.set_size is None:
        return None
    feats = feature_axes(module, len(shape))
    sizes = Sizes(n=shape[0], c=math.prod(shape[a] for a in feats),
                  spatial=math.prod(d for i, d in enumerate(shape) if i and i not in feats),
                  shape=shape)
    return entry.set_size(module, sizes)


# ----------------------------------------------------------------------------
# specs: "name:key=value,..." parsed once, printed back
# ----------------------------------------------------------------------------


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "").replace("-", "")


def _aliases() -> dict[str, str]:
    out = {_key(e.name): e.name for e in NORM_LAYERS if e.ours}
    out.update({_key(a): e.name for e in NORM_LAYERS if e.ours for a in e.aliases})
    out.update({"none": "Identity", "identity": "Identity"})
    return out


ALIASES: dict[str, str] = _aliases()
"""Every accepted layer name (class names and aliases, normalized: lower case without ``-``
and ``_``) -> the class name."""


def parse_value(text: str) -> Any:
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


def _format_value(value: Any) -> str:
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


@functools.cache
def _defaults(layer: str) -> Mapping[str, Any]:
    """The configurable fields of a linen layer and their defaults."""
    cls = snl.LAYERS[layer]
    return {f.name: f.default for f in dataclasses.fields(cls)
            if f.name not in ("parent", "name")}


def _canonical(name: Any, where: str = "") -> str:
    """The canonical layer name of a spec's ``NAME`` (a class name or an alias)."""
    layer = ALIASES.get(_key(name)) if isinstance(name, str) else None
    if layer is None:
        choices = sorted({e.name.lower() for e in NORM_LAYERS if e.ours} | set(ALIASES))
        raise ValueError(f"unknown norm layer {str(name).strip()!r}{where}; choose one of "
                         f"{choices}.{checks.suggest(name, choices)}")
    return layer


def _check_fields(layer: str, fields: Mapping[str, Any], where: str = "") -> None:
    defaults = _defaults(layer)
    for key in fields:
        if key not in defaults:
            raise ValueError(f"{layer} has no field {key!r}{where}; its fields are "
                             f"{sorted(defaults)}.{checks.suggest(key, defaults)}")


@dataclasses.dataclass(frozen=True)
class NormSpec:
    """A norm layer and the fields it sets: ``NormSpec("SeqNorm", {"channel_groups": 4})``.

    Parse text once with :meth:`parse` (grammar ``NAME[:KEY=VALUE,...]``; ``NAME`` is a
    class name or an alias, compared ignoring case, ``-`` and ``_``; values as
    :func:`parse_value`), pass the spec around, build layers with :meth:`factory`, and
    print it back with ``str(spec)`` (lower-case name, fields in the layer's order).
    """

    layer: str
    fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        layer = _canonical(self.layer)
        _check_fields(layer, self.fields)
        order = list(_defaults(layer))
        fields = dict(sorted(self.fields.items(), key=lambda kv: order.index(kv[0])))
        object.__setattr__(self, "layer", layer)
        object.__setattr__(self, "fields", _FrozenDict(fields))

    @classmethod
    def parse(cls, spec: str | NormSpec) -> NormSpec:
        """``"seqnorm:channel_groups=4,batch_groups=8"`` -> a spec (a spec is returned as is)."""
        if isinstance(spec, NormSpec):
            return spec
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"norm spec must be a non-empty string like "
                             f"'seqnorm:channel_groups=4', got {spec!r}.")
        name, _, rest = spec.partition(":")
        fields = {}
        for item in filter(None, (i.strip() for i in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"malformed item {item!r} in norm spec {spec!r}: expected "
                                 "KEY=VALUE.")
            fields[key.strip()] = parse_value(value)
        _check_fields(_canonical(name, f" in {spec!r}"), fields, f" (in norm spec {spec!r})")
        return cls(name.strip(), fields)

    def __str__(self) -> str:
        items = ",".join(f"{k}={_format_value(v)}" for k, v in self.fields.items())
        return self.layer.lower() + (f":{items}" if items else "")

    def get(self, field: str, default: Any = None) -> Any:
        """The value the spec sets for ``field``, else ``default``."""
        return self.fields.get(field, default)

    def value(self, field: str) -> Any:
        """``field``'s value in a layer built from this spec (set, else the layer's default)."""
        return self.fields.get(field, _defaults(self.layer)[field])

    def replace(self, **fields: Any) -> NormSpec:
        """A spec with ``fields`` set (over this one's)."""
        return NormSpec(self.layer, {**self.fields, **fields})

    def factory(self, **overrides: Any) -> Callable[..., nn.Module]:
        """``functools.partial(LinenClass, **fields, **overrides)``: a norm factory."""
        _check_fields(self.layer, {k: v for k, v in overrides.items() if k != "name"})
        return functools.partial(snl.LAYERS[self.layer], **{**self.fields, **overrides})


class _FrozenDict(Mapping):
    """A read-only, hashable mapping (a spec is a value: it can key a dict)."""

    def __init__(self, items: Mapping[str, Any]):
        self._items = dict(items)

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other)

    def __repr__(self) -> str:
        return repr(self._items)


def spec_of(module: Any) -> NormSpec:
    """The spec of a seqnorm-jax layer (linen or NNX): the fields it sets away from the
    defaults, for names, files and tables.

    Raises:
      ValueError: ``module`` is not a seqnorm-jax layer (flax's own layers have no spec).
    """
    entry = entry_of(module)
    cls = type(module) if not isinstance(module, type) else module
    name = entry.name if entry is not None and entry.ours else (
        "Identity" if issubclass(cls, (snl.Identity,)) else None)
    if name is None:
        raise ValueError(f"spec_of: {cls.__name__} is not a seqnorm-jax norm layer; specs "
                         "name seqnorm-jax's layers only.")
    fields = {}
    for key, default in _defaults(name).items():
        value = getattr(module, key, default)
        # Modes (use_running_average) and objects (dtypes, initializers) are not spec text.
        if (key != "use_running_average" and isinstance(value, _SCALARS)
                and isinstance(default, _SCALARS) and value != default):
            fields[key] = value
    return NormSpec(name, fields)


_SCALARS = (bool, int, float, str, type(None))
