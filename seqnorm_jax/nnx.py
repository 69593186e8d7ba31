"""Flax NNX layers: the twins of :mod:`seqnorm_jax.linen`, shaped like ``flax.nnx.BatchNorm``.

Every layer takes ``num_features`` first, its settings as keywords and ``rngs``
(``nnx.Rngs``); it holds ``scale``/``bias`` as ``nnx.Param`` and, when it keeps
running statistics, ``mean``/``var`` as ``nnx.BatchStat`` (shape ``(C,)``,
float32), the names ``flax.nnx.BatchNorm`` uses. ``use_running_average`` is an
attribute (``model.train()`` / ``model.eval()`` set it, and
``nnx.view(model, use_running_average=True)`` through ``set_view``) and a call
argument that takes precedence. The computation is the same pure function of
:mod:`seqnorm_jax.functional`, run by the same :func:`seqnorm_jax.layers_common.normalize`
as the linen layers, so an NNX layer and its linen twin agree bit for bit.

Layers with running statistics take ``flax.nnx.BatchNorm``'s keywords
(``use_running_average=False``, ``axis=-1``, ``momentum=0.99``, ``epsilon=1e-5``,
``dtype``, ``param_dtype``, ``use_bias``, ``use_scale``, ``bias_init``,
``scale_init``, ``axis_name``, ``axis_index_groups``, ``use_fast_variance``,
``bias_metadata``, ``scale_metadata``) and ``example_weight`` (alpha of "Four
Things", used at inference; also settable through ``nnx.view``). ``GroupNorm`` takes
``flax.nnx.GroupNorm``'s. Differences from flax: the output is in ``dtype`` or the
input's dtype (there is no ``promote_dtype``), statistics are float32 or wider,
and complex inputs are not supported.

Example::

    import seqnorm_jax.nnx as snn
    layer = snn.GhostNorm(64, batch_groups=4, rngs=nnx.Rngs(0))
    y = layer(x)            # training: batch statistics, running ones updated
    layer.eval()
    y = layer(x[:1])        # inference: running statistics, any batch size
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import initializers

from seqnorm_jax import checks
from seqnorm_jax import functional as F
from seqnorm_jax import layers_common as common
from seqnorm_jax.stats import Moments

Array = jax.Array
Dtype = Any
Initializer = Any

__all__ = [
    "BatchNorm",
    "GhostNorm",
    "GroupNorm",
    "SeqNorm",
    "BatchGroupNorm",
    "HeterologousNorm",
    "GNPlus",
    "BGN",
    "NoisyBatchNorm",
]

_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _affine_params(num_features: int, *, use_scale: bool, use_bias: bool, scale_init,
                   bias_init, param_dtype, rngs: nnx.Rngs, scale_metadata, bias_metadata):
    """``scale`` and ``bias`` as ``nnx.Param`` of shape ``(C,)`` (``None`` when off), keyed
    from ``rngs.params()`` in flax's order."""
    shape = (num_features,)
    scale = (nnx.Param(scale_init(rngs.params(), shape, param_dtype), **scale_metadata)
             if use_scale else nnx.data(None))
    bias = (nnx.Param(bias_init(rngs.params(), shape, param_dtype), **bias_metadata)
            if use_bias else nnx.data(None))
    return scale, bias


def _value(param) -> Array | None:
    return param[...] if param is not None else None


def _mode(who: str, call: bool | None, attribute: bool | None) -> bool:
    """``use_running_average``: the call's if given, else the attribute's."""
    mode = call if call is not None else attribute
    if mode is None:
        raise ValueError(
            f"{who}: use_running_average is not set; pass it to the constructor or the "
            "call, or use model.train() / model.eval() or "
            "nnx.view(model, use_running_average=True)."
        )
    return common.check_mode(who, mode)


class _RunningNorm(nnx.Module):
    """Base of the layers with running statistics: ``flax.nnx.BatchNorm``'s interface.

    Each subclass names its pure function (``function``, a key of
    :data:`seqnorm_jax.functional.FUNCTIONS`), which gets the layer's attributes by name
    (:func:`seqnorm_jax.layers_common.arguments`); ``_given(training, rngs)`` returns what
    is not an attribute (GN+'s ``lambda_``, the noise key drawn from ``rngs``, the call's
    key source).

    Args:
      num_features: the number of channels ``C``.
      use_running_average: True: normalize with the running statistics (inference);
        False: with the batch's, and update the running statistics.
      axis: the feature axis (the batch axis is 0).
      momentum: decay of the running statistics' moving average, in [0, 1].
      epsilon: added to the variance, > 0.
      dtype: the output dtype (default: the input's).
      param_dtype: the dtype of ``scale`` and ``bias``.
      use_bias / use_scale: whether to learn ``bias`` (beta) / ``scale`` (gamma).
      bias_init / scale_init: their initializers.
      axis_name / axis_index_groups: the device axis (``shard_map``) the training
        statistics are pooled over, and its groups.
      use_fast_variance: one-pass variance (shifted by a per-channel center).
      example_weight: at inference, alpha in [0, 1] of "Four Things": 0 the running
        statistics, 1 each example's own.
      rngs: the ``nnx.Rngs`` that key the initializers.
      bias_metadata / scale_metadata: metadata of the ``nnx.Param``s.
    """

    function: ClassVar[str] = "batch_norm"

    def _given(self, training: bool, rngs) -> dict[str, Any]:
        return {}

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = initializers.zeros_init(),
        scale_init: Initializer = initializers.ones_init(),
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        example_weight: float = 0.0,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _EMPTY,
        scale_metadata: Mapping[str, Any] = _EMPTY,
    ):
        who = type(self).__name__
        checks.momentum(momentum, who)  # checked when called too; here, early
        checks.epsilon(epsilon, who)
        checks.example_weight(example_weight, who)
        shape = (num_features,)
        self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
        self.scale, self.bias = _affine_params(
            num_features, use_scale=use_scale, use_bias=use_bias, scale_init=scale_init,
            bias_init=bias_init, param_dtype=param_dtype, rngs=rngs,
            scale_metadata=scale_metadata, bias_metadata=bias_metadata)
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.example_weight = example_weight

    def __call__(
        self,
        x: Array,
        use_running_average: bool | None = None,
        *,
        mask: Array | None = None,
        example_weight: float | Array | None = None,
    ) -> Array:
        """Normalize ``x`` (shape ``(N, ..., C)``, features on ``axis``).

        Args:
          x: the input.
          use_running_average: overrides the attribute for this call.
          mask: boolean, broadcastable to ``x``: the entries the statistics are
            computed over (as flax's ``mask``); every entry is normalized.
          example_weight: overrides the attribute for this call (inference only).

        Returns:
          The normalized input, same shape, in ``dtype`` or the input's dtype.
        """
        return self._apply(x, use_running_average, mask, example_weight, rngs=None)

    def _apply(self, x, use_running_average, mask, example_weight, rngs) -> Array:
        who = type(self).__name__
        use_ra = _mode(who, use_running_average, self.use_running_average)
        weight = self.example_weight if example_weight is None else example_weight
        y, new = common.normalize(
            self, F.FUNCTIONS[self.function], x, _value(self.scale), _value(self.bias),
            Moments(self.mean[...], self.var[...]), use_running_average=use_ra, mask=mask,
            example_weight=weight, **self._given(not use_ra, rngs),
        )
        if new is not None:  # statistics, not a path for gradients (as flax.nnx.BatchNorm)
            self.mean[...], self.var[...] = jax.lax.stop_gradient(new)
        return y

    def set_view(self, use_running_average: bool | None = None,
                 example_weight: float | None = None):
        """Class method used by ``nnx.view``.

        Args:
          use_running_average: if True, normalize with the running statistics.
          example_weight: alpha in [0, 1] of "Four Things" at inference.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average
        if example_weight is not None:
            checks.example_weight(example_weight, type(self).__name__)
            self.example_weight = example_weight


class BatchNorm(_RunningNorm):
    """BatchNorm, equal to ``flax.nnx.BatchNorm`` to float32 rounding."""


class GhostNorm(_RunningNorm):
    """GhostNorm: BatchNorm per ghost batch (see :class:`seqnorm_jax.linen.GhostNorm`).

    Args:
      batch_groups / ghost_size: the number of ghost batches, or their size.
      grouping: ``"contiguous"`` or ``"strided"``.
      **kwargs: the keywords of :class:`_RunningNorm` (``flax.nnx.BatchNorm``'s).
    """

    function: ClassVar[str] = "ghost_norm"

    def __init__(self, num_features: int, *, batch_groups: int | None = None,
                 ghost_size: int | None = None, grouping: str = "contiguous", **kwargs):
        super().__init__(num_features, **kwargs)
        self.batch_groups = batch_groups
        self.ghost_size = ghost_size
        self.grouping = grouping


class BatchGroupNorm(_RunningNorm):
    """"Four Things" batch/group normalization (see :class:`seqnorm_jax.linen.BatchGroupNorm`).

    Args:
      batch_groups / ghost_size: sample groups (default 1).
      channel_groups / channel_group_size: channel groups (default: one channel each).
      grouping: ``"contiguous"`` or ``"strided"`` sample groups.
      **kwargs: the keywords of :class:`_RunningNorm` (``flax.nnx.BatchNorm``'s).
    """

    function: ClassVar[str] = "batch_group_norm"

    def __init__(self, num_features: int, *, batch_groups: int | None = None,
                 ghost_size: int | None = None, channel_groups: int | None = None,
                 channel_group_size: int | None = None, grouping: str = "contiguous",
                 **kwargs):
        super().__init__(num_features, **kwargs)
        self.batch_groups = batch_groups
        self.ghost_size = ghost_size
        self.channel_groups = channel_groups
        self.channel_group_size = channel_group_size
        self.grouping = grouping


class SeqNorm(_RunningNorm):
    """SeqNorm: GroupNorm (no affine) then GhostNorm (see :class:`seqnorm_jax.linen.SeqNorm`).

    Args:
      channel_groups / channel_group_size: the group step's channel groups (default 1).
      batch_groups / ghost_size: the ghost step's sample groups (default 1).
      order: ``"group_first"`` or ``"ghost_first"``.
      grouping: ``"contiguous"`` or ``"strided"`` ghost batches.
      **kwargs: the keywords of :class:`_RunningNorm` (``flax.nnx.BatchNorm``'s).
    """

    function: ClassVar[str] = "seq_norm"

    def __init__(self, num_features: int, *, channel_groups: int | None = None,
                 channel_group_size: int | None = None, batch_groups: int | None = None,
                 ghost_size: int | None = None, order: str = "group_first",
                 grouping: str = "contiguous", **kwargs):
        super().__init__(num_features, **kwargs)
        self.channel_groups = channel_groups
        self.channel_group_size = channel_group_size
        self.batch_groups = batch_groups
        self.ghost_size = ghost_size
        self.order = order
        self.grouping = grouping


class HeterologousNorm(_RunningNorm):
    """Heterologous Normalization (see :class:`seqnorm_jax.linen.HeterologousNorm`).

    Args:
      mean_set / std_set: the normalization sets of the mean and the std.
      mean_groups / std_groups: channel groups of ``group`` / ``extended`` sets.
      std_center: ``"mean_set"`` or ``"pooled"``.
      **kwargs: the keywords of :class:`_RunningNorm` (``flax.nnx.BatchNorm``'s).
    """

    function: ClassVar[str] = "heterologous_norm"

    def __init__(self, num_features: int, *, mean_set: str = "batch",
                 std_set: str = "extended", mean_groups: int = 1, std_groups: int = 1,
                 std_center: str = "mean_set", **kwargs):
        super().__init__(num_features, **kwargs)
        self.mean_set = mean_set
        self.std_set = std_set
        self.mean_groups = mean_groups
        self.std_groups = std_groups
        self.std_center = std_center


class GNPlus(_RunningNorm):
    """GN+: GroupNorm and BatchNorm mixed by ``sigmoid(lambda_)`` (see
    :class:`seqnorm_jax.linen.GNPlus`, whose ``params/lambda`` is ``lambda_`` here).

    Args:
      num_groups / group_size: GroupNorm's channel groups (default 32).
      variant: ``"gn_first"``, ``"bn_first"`` or ``"parallel"``.
      lambda_init: initial value of the learnable scalar ``lambda_``.
      **kwargs: the keywords of :class:`_RunningNorm` (``flax.nnx.BatchNorm``'s).
    """

    function: ClassVar[str] = "gn_plus"

    def __init__(self, num_features: int, *, num_groups: int | None = 32,
                 group_size: int | None = None, variant: str = "gn_first",
                 lambda_init: float = 1.0, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_groups = num_groups
        self.group_size = group_size
        self.variant = variant
        self.lambda_init = lambda_init
        self.lambda_ = nnx.Param(jnp.full((), lambda_init, self.param_dtype))

    def _given(self, training, rngs):
        return {"mixing": self.lambda_[...]}


class BGN(_RunningNorm):
    """Batch Group Normalization (see :class:`seqnorm_jax.linen.BGN`).

    Args:
      num_groups / group_size: contiguous channel groups (default 1).
      **kwargs: the keywords of :class:`_RunningNorm` (``flax.nnx.BatchNorm``'s).
    """

    function: ClassVar[str] = "bgn"

    def __init__(self, num_features: int, *, num_groups: int | None = 1,
                 group_size: int | None = None, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_groups = num_groups
        self.group_size = group_size


class NoisyBatchNorm(_RunningNorm):
    """BatchNorm with Gaussian input noise in training (paper 000's ablation).

    The noise is drawn like ``nnx.Dropout``'s mask: from the call's ``rngs`` (a key
    or ``nnx.Rngs``) if given, else from a fork of the constructor's
    ``rngs[rng_collection]`` stream.

    Args:
      noise_std: standard deviation of the noise (paper's best 3e-4).
      rng_collection: the ``rngs`` stream the noise is drawn from.
      **kwargs: the keywords of :class:`_RunningNorm` (``flax.nnx.BatchNorm``'s).
    """

    function: ClassVar[str] = "noisy_batch_norm"

    def __init__(self, num_features: int, *, noise_std: float = 3e-4,
                 rng_collection: str = "noise", rngs: nnx.Rngs, **kwargs):
        super().__init__(num_features, rngs=rngs, **kwargs)
        self.noise_std = noise_std
        self.rng_collection = rng_collection
        self.rngs = rngs[rng_collection].fork()

    def __call__(self, x: Array, use_running_average: bool | None = None, *,
                 mask: Array | None = None, example_weight: float | Array | None = None,
                 rngs: nnx.Rngs | nnx.RngStream | Array | None = None) -> Array:
        """As :meth:`BatchNorm.__call__`; ``rngs`` (a key, stream or ``nnx.Rngs``) draws
        this call's noise instead of the layer's own stream."""
        return self._apply(x, use_running_average, mask, example_weight, rngs)

    def _given(self, training, rngs):
        key = None
        if training and self.noise_std:
            source = rngs if rngs is not None else self.rngs
            if isinstance(source, nnx.Rngs):
                key = source[self.rng_collection]()
            elif isinstance(source, nnx.RngStream):
                key = source()
            elif isinstance(source, jax.Array):
                key = source
            else:
                raise common.noise_rng_error(
                    "NoisyBatchNorm", self.noise_std,
                    f"pass rngs= (a key or nnx.Rngs) to the call, got {type(source).__name__}")
        return {"rng": key}


class GroupNorm(nnx.Module):
    """GroupNorm with ``flax.nnx.GroupNorm``'s arguments, order and defaults.

    Batch-independent: no running statistics. ``use_running_average`` (an attribute,
    set by ``model.train()``/``model.eval()`` and ``nnx.view``) and the call's
    ``use_running_average``/``example_weight`` are accepted so that a model written
    for BatchNorm takes GroupNorm unchanged; they change nothing.

    Args:
      num_features: the number of channels (the last axis).
      num_groups: the number of channel groups (default 32); ``None`` with
        ``group_size``.
      group_size: channels per group.
      **rest: ``epsilon``, ``dtype``, ``param_dtype``, ``use_bias``, ``use_scale``,
        ``bias_init``, ``scale_init``, ``reduction_axes``, ``axis_name``,
        ``axis_index_groups``, ``use_fast_variance``, ``rngs``, ``bias_metadata`` and
        ``scale_metadata``: as ``flax.nnx.GroupNorm``.
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int | None = 32,
        group_size: int | None = None,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = initializers.zeros_init(),
        scale_init: Initializer = initializers.ones_init(),
        reduction_axes: Any = None,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _EMPTY,
        scale_metadata: Mapping[str, Any] = _EMPTY,
        use_running_average: bool | None = None,
    ):
        who = type(self).__name__
        checks.epsilon(epsilon, who)  # checked when called too; here, early
        groups = F.resolve_groups(
            num_features, num_groups, group_size, who=who, groups_name="num_groups",
            size_name="group_size", what=f"number of features, num_features={num_features}")
        self.num_groups = groups
        self.group_size = num_features // groups
        self.scale, self.bias = _affine_params(
            num_features, use_scale=use_scale, use_bias=use_bias, scale_init=scale_init,
            bias_init=bias_init, param_dtype=param_dtype, rngs=rngs,
            scale_metadata=scale_metadata, bias_metadata=bias_metadata)
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.reduction_axes = reduction_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.use_running_average = use_running_average

    def __call__(self, x: Array, use_running_average: bool | None = None, *,
                 mask: Array | None = None, example_weight: float | Array | None = None
                 ) -> Array:
        """Group-normalize ``x`` (features on the last axis); ``mask`` as in flax."""
        who = type(self).__name__
        checks.example_weight(0.0 if example_weight is None else example_weight, who)
        return F.group_norm.named(who)(
            x, _value(self.scale), _value(self.bias),
            **common.arguments(self, F.group_norm, mask=mask, group_size=None))

    def set_view(self, use_running_average: bool | None = None):
        """Class method used by ``nnx.view``; GroupNorm has no running statistics, so
        ``use_running_average`` is recorded and changes nothing."""
        if use_running_average is not None:
            self.use_running_average = use_running_average
