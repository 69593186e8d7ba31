"""What the linen and NNX layers share, so that both are thin holders of variables.

* :class:`Settings`: the fields every layer with running statistics passes to its
  pure function unchanged (feature axis, epsilon, dtype, devices), plus its
  momentum, read from a layer once per call and checked;
* one binder per layer (:func:`ghost_norm`, :func:`seq_norm`, ...): which pure
  function of :mod:`seqnorm_jax.functional` the layer calls, with which of its own
  fields, bound explicitly by name;
* :func:`normalize`: the training / inference / init rule and the running-statistics
  update (:func:`seqnorm_jax.stats.ema`);
* the checks of call arguments (``example_weight``, ``momentum``, ``epsilon``).

A layer here is any object with the named attributes: a ``flax.linen`` module
(its dataclass fields) or a ``flax.nnx`` module (its attributes) alike.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from seqnorm_jax import checks
from seqnorm_jax import functional as F
from seqnorm_jax import stats
from seqnorm_jax.stats import Moments

Array = jax.Array
# A pure function of ``functional`` with the layer's own fields bound:
# ``norm(x, scale, bias, **Settings.kwargs(), running_mean=..., ...)``.
Normalize = Callable[..., Any]

__all__ = [
    "Settings",
    "normalize",
    "num_features",
    "check_epsilon",
    "check_momentum",
    "check_example_weight",
    "check_mode",
    "noise_rng_error",
    "batch_norm",
    "ghost_norm",
    "batch_group_norm",
    "seq_norm",
    "heterologous_norm",
    "gn_plus",
    "bgn",
    "noisy_batch_norm",
]


# ----------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------


def check_epsilon(who: str, epsilon: Any) -> None:
    """``epsilon`` must be a positive number (:func:`checks.epsilon`)."""
    checks.epsilon(epsilon, who)


def check_momentum(who: str, momentum: Any) -> None:
    """``momentum`` must lie in [0, 1] (:func:`checks.momentum`)."""
    checks.momentum(momentum, who)


def check_example_weight(who: str, example_weight: Any, training: bool) -> None:
    """``example_weight`` (alpha of "Four Things"): in [0, 1] (:func:`checks.example_weight`),
    and inference only."""
    checks.example_weight(example_weight, who)
    if training and not (checks.static_number(example_weight) and example_weight == 0):
        raise ValueError(
            f"{who}: example_weight={example_weight!r} applies at inference only; call with "
            "use_running_average=True (or leave example_weight at 0)."
        )


def check_mode(who: str, use_running_average: Any) -> bool:
    """``use_running_average`` as a bool: it picks the computation, so it must be static."""
    return checks.static_bool(
        use_running_average, "use_running_average", who,
        fix="it selects batch or running statistics, so it must be known when tracing: "
        "pass a Python bool (mark it static, e.g. jax.jit(f, static_argnames="
        "'use_running_average'), or jit one function per mode)")


def num_features(x: Array, axis: int) -> int:
    """The number of channels ``C`` of ``x``: the size of its feature axis.

    A rank-1 ``x`` is one sample of ``C`` features, as in ``flax.linen.BatchNorm``
    (the pure function says what it accepts).
    """
    if x.ndim == 1 and axis in (0, -1):
        return x.shape[0]
    return x.shape[stats.feature_axis(x.ndim, axis)]


# ----------------------------------------------------------------------------
# the shared fields, and the training / inference rule
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    """The fields of a running-statistics layer that its pure function takes as they are.

    ``axis_name`` is used in training only (flax's rule; inference and ``init`` are
    local), so :func:`normalize` passes it, not :meth:`kwargs`.
    """

    axis: int
    momentum: float
    epsilon: float
    dtype: Any
    axis_name: str | None
    axis_index_groups: Any
    use_fast_variance: bool

    @classmethod
    def of(cls, who: str, layer: Any) -> Settings:
        """Read a layer's settings and check them (``ValueError`` naming the field)."""
        check_momentum(who, layer.momentum)
        check_epsilon(who, layer.epsilon)
        return cls(axis=layer.axis, momentum=layer.momentum, epsilon=layer.epsilon,
                   dtype=layer.dtype, axis_name=layer.axis_name,
                   axis_index_groups=layer.axis_index_groups,
                   use_fast_variance=layer.use_fast_variance)

    def kwargs(self) -> dict[str, Any]:
        return {"axis": self.axis, "epsilon": self.epsilon, "dtype": self.dtype,
                "axis_index_groups": self.axis_index_groups,
                "use_fast_variance": self.use_fast_variance}


def normalize(
    who: str,
    norm: Normalize,
    settings: Settings,
    x: Array,
    scale: Array | None,
    bias: Array | None,
    running: Moments,
    *,
    use_running_average: bool,
    mask: Array | None,
    example_weight: float | Array,
    initializing: bool = False,
) -> tuple[Array, Moments | None]:
    """Run a layer: its output and its new running statistics (``None``: unchanged).

    ``running`` holds the layer's running mean and variance, ``(C,)`` float32 each.

    * inference (``use_running_average``): the running statistics, blended with each
      example's own by ``example_weight``; any batch size;
    * training: the batch's statistics (across ``axis_name`` devices), and the running
      statistics move towards them by ``momentum`` (not at all when ``mask`` keeps no
      entry of the batch);
    * ``initializing`` (linen's ``init``): as flax, no ``axis_name`` and no update; a
      dummy batch the grouping cannot split (e.g. batch 1 for
      ``GhostNorm(batch_groups=8)``) is normalized with the running statistics.
    """
    check_example_weight(who, example_weight, training=not use_running_average)
    common = dict(settings.kwargs(), mask=mask, return_stats=True)
    inference = dict(running_mean=running.mean, running_var=running.var,
                     example_weight=example_weight, axis_name=None)
    if use_running_average:
        y, _ = norm(x, scale, bias, **common, **inference)
        return y, None
    if initializing:
        try:
            y, _ = norm(x, scale, bias, **common, axis_name=None)
        except F.BatchSizeError:
            y, _ = norm(x, scale, bias, **common, **inference)
        return y, None
    y, target = norm(x, scale, bias, **common, axis_name=settings.axis_name)
    new = Moments(stats.ema(running.mean, target.mean, settings.momentum),
                  stats.ema(running.var, target.var, settings.momentum))
    if mask is not None:  # a batch whose mask keeps nothing has no statistics to move towards
        kept = stats.any_kept(mask, settings.axis_name, settings.axis_index_groups)
        new = Moments(*(jnp.where(kept, a, b) for a, b in zip(new, running)))
    return y, new


# ----------------------------------------------------------------------------
# each layer's pure function with its own fields
# ----------------------------------------------------------------------------


def _groups(num_groups: int | None, group_size: int | None) -> dict[str, int | None]:
    """``num_groups``/``group_size`` where a ``group_size`` overrides the default count."""
    if group_size is not None:
        return {"num_groups": None, "group_size": group_size}
    return {"num_groups": num_groups, "group_size": None}


def batch_norm(layer: Any) -> Normalize:
    """BatchNorm has no fields of its own."""
    return F.batch_norm


def ghost_norm(layer: Any) -> Normalize:
    """GhostNorm's ghost batches: ``batch_groups`` or ``ghost_size``, ``grouping``."""
    return functools.partial(F.ghost_norm, batch_groups=layer.batch_groups,
                             ghost_size=layer.ghost_size, grouping=layer.grouping)


def batch_group_norm(layer: Any) -> Normalize:
    """The "Four Things" layer: sample groups and channel groups."""
    return functools.partial(F.batch_group_norm, batch_groups=layer.batch_groups,
                             ghost_size=layer.ghost_size, channel_groups=layer.channel_groups,
                             channel_group_size=layer.channel_group_size,
                             grouping=layer.grouping)


def seq_norm(layer: Any) -> Normalize:
    """SeqNorm: the group step's channel groups, the ghost step's sample groups, the order."""
    return functools.partial(F.seq_norm, channel_groups=layer.channel_groups,
                             channel_group_size=layer.channel_group_size,
                             batch_groups=layer.batch_groups, ghost_size=layer.ghost_size,
                             order=layer.order, grouping=layer.grouping)


def heterologous_norm(layer: Any) -> Normalize:
    """HN: the mean's and the std's normalization sets and their channel groups."""
    return functools.partial(F.heterologous_norm, mean_set=layer.mean_set,
                             std_set=layer.std_set, mean_groups=layer.mean_groups,
                             std_groups=layer.std_groups, std_center=layer.std_center)


def gn_plus(layer: Any, mixing: Array) -> Normalize:
    """GN+ with the layer's learnable ``lambda`` (``mixing``)."""
    def norm(x, scale, bias, **kwargs):
        return F.gn_plus(x, scale, bias, mixing, variant=layer.variant,
                         **_groups(layer.num_groups, layer.group_size), **kwargs)
    return norm


def bgn(layer: Any) -> Normalize:
    """BGN: channel groups over the whole batch."""
    return functools.partial(F.bgn, **_groups(layer.num_groups, layer.group_size))


def noisy_batch_norm(layer: Any, rng: Array | None) -> Normalize:
    """NoisyBatchNorm with a noise key; without one (init, inference) it adds no noise."""
    return functools.partial(F.noisy_batch_norm, rng=rng,
                             noise_std=layer.noise_std if rng is not None else 0.0)


def noise_rng_error(who: str, noise_std: float, how: str) -> ValueError:
    """The error of a NoisyBatchNorm asked to train without a noise key."""
    return ValueError(f"{who}: training with noise_std={noise_std} needs an rng: {how}.")
