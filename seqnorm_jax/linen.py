"""Flax linen modules: drop-in replacements for ``flax.linen.BatchNorm`` and ``GroupNorm``.

Each module owns its parameters (``params/scale``, ``params/bias``, shape ``(C,)``)
and, for layers with running statistics, ``batch_stats/mean`` and
``batch_stats/var`` (shape ``(C,)``, float32), exactly as ``flax.linen.BatchNorm``
names them; the computation is the pure function of :mod:`seqnorm_jax.functional`,
run by :func:`seqnorm_jax.layers_common.normalize` (shared with :mod:`seqnorm_jax.nnx`).

The layers with running statistics have ``flax.linen.BatchNorm``'s fields, in its
order and with its defaults (``use_running_average`` given once, through the field
or the call; ``axis=-1``; ``momentum=0.99``; ``epsilon=1e-5``; ``dtype``;
``param_dtype``; ``use_bias``; ``use_scale``; ``bias_init``; ``scale_init``;
``axis_name``; ``axis_index_groups``; ``use_fast_variance``;
``force_float32_reductions``), then their own. :class:`GroupNorm` has
``flax.linen.GroupNorm``'s fields in its order, then ``use_running_average`` (a
compatibility field that changes nothing). Every ``__call__`` takes
``(x, use_running_average=None, *, mask=None, example_weight=0.0)``, and behaves as
flax's: the running statistics are not updated during ``init``, ``axis_name`` is
ignored there, and ``mask`` (boolean, broadcastable to ``x``) restricts the
statistics to the entries it marks. Differences from flax:

* the output is in ``dtype`` when given, else in the input's dtype (flax
  promotes a bfloat16 input with float32 parameters to float32);
* statistics are always computed in float32 or wider, so
  ``force_float32_reductions`` must stay True; complex inputs are not supported;
* calls take ``example_weight`` (keyword, inference only): the "Four Things"
  blend of each example's own statistics into the running ones.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import initializers

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
    "Identity",
]


def _check_float32_reductions(module: nn.Module) -> None:
    if not module.force_float32_reductions:
        raise ValueError(
            f"{type(module).__name__}: force_float32_reductions=False is not supported; "
            "seqnorm-jax always computes statistics in float32 or wider. Leave it True."
        )


def _params(module: nn.Module, c: int) -> tuple[Array | None, Array | None]:
    """The layer's ``scale`` and ``bias`` of shape ``(C,)`` (``None`` when switched off)."""
    scale = (module.param("scale", module.scale_init, (c,), module.param_dtype)
             if module.use_scale else None)
    bias = (module.param("bias", module.bias_init, (c,), module.param_dtype)
            if module.use_bias else None)
    return scale, bias


class _BatchNormFields(nn.Module):
    """``flax.linen.BatchNorm``'s fields and defaults, shared by the layers with running
    statistics and by ``Identity`` (which ignores them)."""

    use_running_average: bool | None = None
    axis: int = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True


class _RunningNorm(_BatchNormFields):
    """Base of the layers that keep running statistics; see the module docstring.

    Each subclass names its pure function (``function``, a key of
    :data:`seqnorm_jax.functional.FUNCTIONS`), which gets the layer's fields by name
    (:func:`seqnorm_jax.layers_common.arguments`); ``_given(training)`` returns what is
    not a field (GN+'s ``lambda``, the noise key) and may create the layer's own
    parameters.
    """

    function: ClassVar[str] = "batch_norm"

    def _given(self, training: bool) -> dict[str, Any]:
        return {}

    @nn.compact
    def __call__(
        self,
        x: Array,
        use_running_average: bool | None = None,
        *,
        mask: Array | None = None,
        example_weight: float | Array = 0.0,
    ) -> Array:
        """Normalize ``x`` (shape ``(N, ..., C)`` with the features on ``axis``).

        Args:
          x: the input.
          use_running_average: if True, normalize with the running statistics in
            ``batch_stats`` (any batch size works); otherwise with the batch's,
            and move the running statistics towards them (pass
            ``mutable=["batch_stats"]`` to ``apply``).
          mask: boolean, broadcastable to ``x``: the entries the statistics are
            computed over (as flax's ``mask``); every entry is normalized.
          example_weight: inference only: alpha in ``[0, 1]`` of "Four Things"
            (paper 002): 0 uses the running statistics, 1 the example's own.

        Returns:
          The normalized input, same shape, in ``dtype`` or the input's dtype.
        """
        who = type(self).__name__
        _check_float32_reductions(self)
        use_ra = common.check_mode(who, nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average))
        c = common.num_features(x, self.axis)
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (c,))
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (c,))
        scale, bias = _params(self, c)
        y, new = common.normalize(
            self, F.FUNCTIONS[self.function], x, scale, bias,
            Moments(ra_mean.value, ra_var.value), use_running_average=use_ra, mask=mask,
            example_weight=example_weight, initializing=self.is_initializing(),
            **self._given(not use_ra),
        )
        if new is not None:
            ra_mean.value, ra_var.value = new
        return y


class BatchNorm(_RunningNorm):
    """BatchNorm, equal to ``flax.linen.BatchNorm`` to float32 rounding.

    Statistics per channel over the batch and spatial axes.
    """


class GhostNorm(_RunningNorm):
    """GhostNorm: BatchNorm applied to each of ``batch_groups`` ghost batches.

    Attributes:
      batch_groups: ``G_M``, number of ghost batches (1 is BatchNorm). Under
        ``shard_map`` with ``axis_name``, the number of groups of the global
        batch (a multiple or a divisor of the number of devices).
      ghost_size: samples per ghost batch (instead of ``batch_groups``).
      grouping: ``"contiguous"`` (ghost ``g`` is ``x[g*S:(g+1)*S]``, the
        papers' layout) or ``"strided"`` (ghost ``g`` is ``x[g::G_M]``, as Keras 2's
        ``virtual_batch_size``).

    Running statistics move towards the whole-batch mean and the mean over ghost
    batches of their biased variances, once per call (see docs/running-statistics.md for how
    Keras and PyTorch implementations differ).
    """

    function: ClassVar[str] = "ghost_norm"

    batch_groups: int | None = None
    ghost_size: int | None = None
    grouping: str = "contiguous"


class BatchGroupNorm(_RunningNorm):
    """The batch/group generalization of "Four Things" (paper 002).

    Statistics per (sample group, channel group). ``channel_groups=C`` (default)
    is GhostNorm; ``batch_groups=N`` is GroupNorm in training.

    Attributes:
      batch_groups / ghost_size: sample groups, as in :class:`GhostNorm` (default 1).
      channel_groups / channel_group_size: contiguous channel groups (default: one
        channel per group).
      grouping: ``"contiguous"`` or ``"strided"`` sample groups.
    """

    function: ClassVar[str] = "batch_group_norm"

    batch_groups: int | None = None
    ghost_size: int | None = None
    channel_groups: int | None = None
    channel_group_size: int | None = None
    grouping: str = "contiguous"


class SeqNorm(_RunningNorm):
    """SeqNorm (papers 000/001): GroupNorm (no affine) then GhostNorm, one gamma/beta.

    Attributes:
      channel_groups / channel_group_size: ``G_C`` of the group step (default 1).
      batch_groups / ghost_size: ``G_M`` of the ghost step (default 1).
      order: ``"group_first"`` (SeqNorm) or ``"ghost_first"`` (the paper's ablation).
      grouping: ``"contiguous"`` or ``"strided"`` ghost batches.

    Paper settings: CIFAR-100 ``channel_groups=4, batch_groups=8``; CIFAR-10
    ``16, 8``; ImageNet ``4, 4``. Running statistics are those of the ghost
    step's input.
    """

    function: ClassVar[str] = "seq_norm"

    channel_groups: int | None = None
    channel_group_size: int | None = None
    batch_groups: int | None = None
    ghost_size: int | None = None
    order: str = "group_first"
    grouping: str = "contiguous"


class HeterologousNorm(_RunningNorm):
    """Heterologous Normalization (paper 003): mean and std from different sets.

    Attributes:
      mean_set / std_set: one of ``batch``, ``instance``, ``layer``, ``group``,
        ``extended``, ``extended_groups`` (default: the paper's HN, BN mean and
        EN std).
      mean_groups / std_groups: channel groups of ``group`` / ``extended`` sets
        (``std_groups=8`` gives the paper's HN_G8).
      std_center: ``"mean_set"`` (variance around the subtracted mean: for HN the
        average of per-channel BN variances) or ``"pooled"``.

    Running statistics: per-channel batch mean and variance, pooled at use time.
    """

    function: ClassVar[str] = "heterologous_norm"

    mean_set: str = "batch"
    std_set: str = "extended"
    mean_groups: int = 1
    std_groups: int = 1
    std_center: str = "mean_set"


class GNPlus(_RunningNorm):
    """GN+ (paper 004): GroupNorm and BatchNorm mixed by ``sigmoid(lambda)``.

    Attributes:
      num_groups / group_size: GroupNorm's channel groups (default 32, as the paper;
        a ``group_size`` overrides ``num_groups``).
      variant: ``"gn_first"`` (the paper's best), ``"bn_first"`` or ``"parallel"``.
      lambda_init: initial value of the learnable scalar ``params/lambda``.

    Running statistics are those of the BN part's input.
    """

    function: ClassVar[str] = "gn_plus"

    num_groups: int | None = 32
    group_size: int | None = None
    variant: str = "gn_first"
    lambda_init: float = 1.0

    def _given(self, training):
        lam = self.param("lambda", initializers.constant(self.lambda_init), (), self.param_dtype)
        return {"mixing": lam}


class BGN(_RunningNorm):
    """Batch Group Normalization (Zhou et al. 2020): channel groups over the whole batch.

    Attributes:
      num_groups / group_size: contiguous channel groups (default 1: everything
        pooled, the paper's choice for tiny batches; ``num_groups=C`` is BatchNorm;
        a ``group_size`` overrides ``num_groups``).
    """

    function: ClassVar[str] = "bgn"

    num_groups: int | None = 1
    group_size: int | None = None


class NoisyBatchNorm(_RunningNorm):
    """BatchNorm with Gaussian input noise in training (paper 000's ablation).

    Attributes:
      noise_std: standard deviation of the noise (paper's best 3e-4).
      rng_collection: the rng stream the noise is drawn from: pass
        ``rngs={"noise": key}`` to ``apply`` in training.
    """

    function: ClassVar[str] = "noisy_batch_norm"

    noise_std: float = 3e-4
    rng_collection: str = "noise"

    def _given(self, training):
        rng = None
        if training and self.noise_std and not self.is_initializing():
            if not self.has_rng(self.rng_collection):
                raise common.noise_rng_error(
                    "NoisyBatchNorm", self.noise_std,
                    f"pass rngs={{'{self.rng_collection}': key}} to apply")
            rng = self.make_rng(self.rng_collection)
        return {"rng": rng}


class GroupNorm(nn.Module):
    """GroupNorm, equal to ``flax.linen.GroupNorm``: its fields, order, defaults and call.

    ``num_groups`` comes first, as in flax (``GroupNorm(8)`` is 8 groups); pass
    ``num_groups=None`` with ``group_size``. ``reduction_axes`` (default: every axis
    but the first), ``axis_name`` and ``axis_index_groups`` mean what they mean in
    flax; the features are on the last axis.

    Batch-independent, so it keeps no running statistics. The trailing field
    ``use_running_average`` and the call's ``use_running_average`` and
    ``example_weight`` are accepted so that a model written for BatchNorm
    (``partial(norm, use_running_average=not train)``) takes it unchanged; they
    change nothing.
    """

    num_groups: int | None = 32
    group_size: int | None = None
    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    reduction_axes: Any = None
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    use_running_average: bool | None = None

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None, *,
                 mask: Array | None = None, example_weight: float | Array = 0.0) -> Array:
        """Group-normalize ``x`` (features on the last axis); ``mask`` as in flax."""
        who = type(self).__name__
        _check_float32_reductions(self)
        checks.example_weight(example_weight, who)  # accepted, changes nothing
        scale, bias = _params(self, x.shape[-1])
        return F.group_norm.named(who)(x, scale, bias,
                                       **common.arguments(self, F.group_norm, mask=mask))


class Identity(_BatchNormFields):
    """No normalization (baselines): returns ``x``.

    It has ``flax.linen.BatchNorm``'s fields and call signature, all ignored, so a model
    that builds its norm layers as ``partial(norm, use_running_average=not train,
    dtype=...)`` takes ``Identity`` unchanged.
    """

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None, *,
                 mask: Array | None = None, example_weight: float | Array = 0.0) -> Array:
        return x


LAYERS: dict[str, type[nn.Module]] = {
    cls.__name__: cls
    for cls in (BatchNorm, GhostNorm, GroupNorm, SeqNorm, BatchGroupNorm, HeterologousNorm,
                GNPlus, BGN, NoisyBatchNorm, Identity)
}


def layer_fields(cls: type[nn.Module]) -> tuple[str, ...]:
    """The configurable fields of a layer class (its dataclass fields but parent/name)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name"))
