"""Flax linen modules: drop-in replacements for ``flax.linen.BatchNorm``.

Each module owns its parameters (``params/scale``, ``params/bias``, shape ``(C,)``)
and, for layers with running statistics, ``batch_stats/mean`` and
``batch_stats/var`` (shape ``(C,)``, float32), exactly as ``flax.linen.BatchNorm``
names them; the computation is the pure function of :mod:`seqnorm_jax.functional`.

They share flax's fields and defaults (``use_running_average`` given once, through
the field or the call; ``axis=-1``; ``momentum=0.99``; ``epsilon=1e-5``;
``dtype``; ``param_dtype``; ``use_bias``; ``use_scale``; ``bias_init``;
``scale_init``; ``axis_name``; ``axis_index_groups``; ``use_fast_variance``;
``force_float32_reductions``) and its behaviour: the running statistics are not
updated during ``init``, and ``axis_name`` is ignored there. Differences from flax:

* the output is in ``dtype`` when given, else in the input's dtype (flax
  promotes a bfloat16 input with float32 parameters to float32);
* statistics are always computed in float32 or wider, so
  ``force_float32_reductions`` must stay True;
* the ``mask`` argument of flax's ``__call__`` is not supported;
* calls take ``example_weight`` (keyword, inference only): the "Four Things"
  blend of each example's own statistics into the running ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import initializers

from seqnorm_jax import functional as F
from seqnorm_jax import stats

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
    """Base of the layers that keep running statistics; see the module docstring."""

    # The layer's pure function; the fields a subclass adds are passed to it by name.
    function: ClassVar[Callable[..., Any]]

    def _normalize(self, x: Array, scale, bias, **kwargs):
        """Call the layer's pure function with its own fields and ``return_stats=True``.

        Must not create variables: it may run twice during ``init``.
        """
        base = {f.name for f in dataclasses.fields(_RunningNorm)}
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in base}
        return type(self).function(x, scale, bias, **own, **kwargs)

    def _extra_params(self) -> dict[str, Any]:
        """Create the layer's own parameters (beyond scale and bias), passed to ``_normalize``."""
        return {}

    @nn.compact
    def __call__(
        self,
        x: Array,
        use_running_average: bool | None = None,
        *,
        example_weight: float | Array = 0.0,
    ) -> Array:
        """Normalize ``x`` (shape ``(N, ..., C)`` with the features on ``axis``).

        Args:
          x: the input.
          use_running_average: if True, normalize with the running statistics in
            ``batch_stats`` (any batch size works); otherwise with the batch's,
            and move the running statistics towards them (pass
            ``mutable=["batch_stats"]`` to ``apply``).
          example_weight: inference only: alpha in ``[0, 1]`` of "Four Things"
            (paper 002): 0 uses the running statistics, 1 the example's own.

        Returns:
          The normalized input, same shape, in ``dtype`` or the input's dtype.
        """
        _check_float32_reductions(self)
        use_ra = nn.merge_param("use_running_average", self.use_running_average,
                                use_running_average)
        c = x.shape[stats.feature_axis(x.ndim, self.axis)]
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (c,))
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (c,))
        scale = (self.param("scale", self.scale_init, (c,), self.param_dtype)
                 if self.use_scale else None)
        bias = self.param("bias", self.bias_init, (c,), self.param_dtype) if self.use_bias else None
        extra = self._extra_params()
        if not use_ra and not (isinstance(example_weight, (int, float)) and example_weight == 0):
            raise ValueError(
                f"{type(self).__name__}: example_weight={example_weight!r} applies at inference "
                "only; call with use_running_average=True (or leave example_weight at 0)."
            )
        common = dict(
            epsilon=self.epsilon,
            axis=self.axis,
            use_fast_variance=self.use_fast_variance,
            dtype=self.dtype,
            axis_index_groups=self.axis_index_groups,
            return_stats=True,
            **extra,
        )
        inference = dict(running_mean=ra_mean.value, running_var=ra_var.value,
                         example_weight=example_weight, axis_name=None)
        if use_ra:
            y, _ = self._normalize(x, scale, bias, **common, **inference)
            return y
        if self.is_initializing():
            # Like flax: no axis_name and no running-statistics update during init.
            # A dummy init batch that the grouping cannot split (e.g. batch 1 for
            # GhostNorm(batch_groups=8)) is normalized with the initial running stats;
            # any other bad setting raises here.
            try:
                y, _ = self._normalize(x, scale, bias, **common, axis_name=None)
            except F.BatchSizeError:
                y, _ = self._normalize(x, scale, bias, **common, **inference)
            return y
        y, update = self._normalize(x, scale, bias, **common, axis_name=self.axis_name)
        ra_mean.value = stats.ema(ra_mean.value, update.mean, self.momentum)
        ra_var.value = stats.ema(ra_var.value, update.var, self.momentum)
        return y


def _groups(layer) -> dict[str, int | None]:
    """``num_groups``/``group_size`` of a layer where a ``group_size`` overrides the default count."""
    if layer.group_size is not None:
        return {"num_groups": None, "group_size": layer.group_size}
    return {"num_groups": layer.num_groups, "group_size": None}


class BatchNorm(_RunningNorm):
    """BatchNorm, equal to ``flax.linen.BatchNorm`` to float32 rounding.

    Statistics per channel over the batch and spatial axes.
    """

    function = staticmethod(F.batch_norm)


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
    batches of their biased variances, once per call (see the README for how
    Keras and PyTorch implementations differ).
    """

    batch_groups: int | None = None
    ghost_size: int | None = None
    grouping: str = "contiguous"

    function = staticmethod(F.ghost_norm)


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

    batch_groups: int | None = None
    ghost_size: int | None = None
    channel_groups: int | None = None
    channel_group_size: int | None = None
    grouping: str = "contiguous"

    function = staticmethod(F.batch_group_norm)


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

    channel_groups: int | None = None
    channel_group_size: int | None = None
    batch_groups: int | None = None
    ghost_size: int | None = None
    order: str = "group_first"
    grouping: str = "contiguous"

    function = staticmethod(F.seq_norm)


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

    mean_set: str = "batch"
    std_set: str = "extended"
    mean_groups: int = 1
    std_groups: int = 1
    std_center: str = "mean_set"

    function = staticmethod(F.heterologous_norm)


class GNPlus(_RunningNorm):
    """GN+ (paper 004): GroupNorm and BatchNorm mixed by ``sigmoid(lambda)``.

    Attributes:
      num_groups / group_size: GroupNorm's channel groups (default 32, as the paper;
        a ``group_size`` overrides ``num_groups``).
      variant: ``"gn_first"`` (the paper's best), ``"bn_first"`` or ``"parallel"``.
      lambda_init: initial value of the learnable scalar ``params/lambda``.

    Running statistics are those of the BN part's input.
    """

    num_groups: int | None = 32
    group_size: int | None = None
    variant: str = "gn_first"
    lambda_init: float = 1.0

    def _extra_params(self):
        lam = self.param("lambda", initializers.constant(self.lambda_init), (), self.param_dtype)
        return {"mixing": lam}

    function = staticmethod(F.gn_plus)

    def _normalize(self, x, scale, bias, mixing, **kwargs):
        return F.gn_plus(x, scale, bias, mixing, **_groups(self), variant=self.variant, **kwargs)


class BGN(_RunningNorm):
    """Batch Group Normalization (Zhou et al. 2020): channel groups over the whole batch.

    Attributes:
      num_groups / group_size: contiguous channel groups (default 1: everything
        pooled, the paper's choice for tiny batches; ``num_groups=C`` is BatchNorm;
        a ``group_size`` overrides ``num_groups``).
    """

    num_groups: int | None = 1
    group_size: int | None = None

    function = staticmethod(F.bgn)

    def _normalize(self, x, scale, bias, **kwargs):
        return F.bgn(x, scale, bias, **_groups(self), **kwargs)


class NoisyBatchNorm(_RunningNorm):
    """BatchNorm with Gaussian input noise in training (paper 000's ablation).

    Attributes:
      noise_std: standard deviation of the noise (paper's best 3e-4).
      rng_collection: the rng stream the noise is drawn from: pass
        ``rngs={"noise": key}`` to ``apply`` in training.
    """

    noise_std: float = 3e-4
    rng_collection: str = "noise"

    function = staticmethod(F.noisy_batch_norm)

    def _normalize(self, x, scale, bias, **kwargs):
        training = kwargs.get("running_mean") is None
        rng = None
        if training and self.noise_std and not self.is_initializing():
            if not self.has_rng(self.rng_collection):
                raise ValueError(
                    f"NoisyBatchNorm: training with noise_std={self.noise_std} needs an rng: "
                    f"pass rngs={{'{self.rng_collection}': key}} to apply."
                )
            rng = self.make_rng(self.rng_collection)
        noise_std = self.noise_std if rng is not None else 0.0
        return F.noisy_batch_norm(x, scale, bias, noise_std=noise_std, rng=rng, **kwargs)


class GroupNorm(nn.Module):
    """GroupNorm, equal to ``flax.linen.GroupNorm`` (same fields and defaults).

    Batch-independent, so it keeps no running statistics; ``use_running_average``
    (as a field, like ``flax.linen.BatchNorm``'s, or a call argument) and
    ``example_weight`` are accepted, so that a model written for BatchNorm
    (``partial(norm, use_running_average=not train)``) takes it unchanged, and they
    change nothing.
    """

    use_running_average: bool | None = None
    num_groups: int | None = 32
    group_size: int | None = None
    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis: int = -1
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None, *,
                 example_weight: float | Array = 0.0) -> Array:
        _check_float32_reductions(self)
        c = x.shape[stats.feature_axis(x.ndim, self.axis)]
        scale = (self.param("scale", self.scale_init, (c,), self.param_dtype)
                 if self.use_scale else None)
        bias = self.param("bias", self.bias_init, (c,), self.param_dtype) if self.use_bias else None
        return F.group_norm(x, scale, bias, num_groups=self.num_groups,
                            group_size=self.group_size, epsilon=self.epsilon, axis=self.axis,
                            use_fast_variance=self.use_fast_variance, dtype=self.dtype)


class Identity(_BatchNormFields):
    """No normalization (baselines): returns ``x``.

    It has ``flax.linen.BatchNorm``'s fields and call signature, all ignored, so a model
    that builds its norm layers as ``partial(norm, use_running_average=not train,
    dtype=...)`` takes ``Identity`` unchanged.
    """

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None, *,
                 example_weight: float | Array = 0.0) -> Array:
        return x


LAYERS: dict[str, type[nn.Module]] = {
    cls.__name__: cls
    for cls in (BatchNorm, GhostNorm, GroupNorm, SeqNorm, BatchGroupNorm, HeterologousNorm,
                GNPlus, BGN, NoisyBatchNorm, Identity)
}


def layer_fields(cls: type[nn.Module]) -> tuple[str, ...]:
    """The configurable fields of a layer class (its dataclass fields but parent/name)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name"))
