"""What the linen and NNX layers share, so that both are thin holders of variables.

A layer names its pure function of :mod:`seqnorm_jax.functional` (``function``) and
passes it its fields **by name**: every keyword of the function that is a field of the
layer is that field (:func:`arguments`), but for the few rules of :data:`RULES`; the call's
own arguments (``mask``, ``example_weight``, the running statistics) and what is not a
field (GN+'s ``mixing`` parameter, the noise key) are given. The function checks its
arguments once per call (``functional._call.setup``, messages naming the layer); the
layer checks what only it has (``momentum``, the mode).

* :func:`normalize`: the training / inference / init rule and the running-statistics
  update (:func:`seqnorm_jax.stats.ema`).

A layer here is any object with the named attributes: a ``flax.linen`` module
(its dataclass fields) or a ``flax.nnx`` module (its attributes) alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from seqnorm_jax import checks
from seqnorm_jax import functional as F
from seqnorm_jax import stats
from seqnorm_jax.functional._call import keyword_names
from seqnorm_jax.stats import Moments

Array = jax.Array

__all__ = ["RULES", "arguments", "normalize", "num_features", "check_mode", "noise_rng_error"]


# ----------------------------------------------------------------------------
# a layer's fields, bound to its pure function by name
# ----------------------------------------------------------------------------

# The keywords a layer with running statistics does not pass as its field of the same
# name, and why: (keyword, value from (field value, the other keywords)).
RULES: dict[str, Callable[[Any, dict[str, Any]], Any]] = {
    # a group_size overrides the default group count (GNPlus, BGN)
    "num_groups": lambda v, kw: None if kw.get("group_size") is not None else v,
    # no noise key (init, inference): no noise (NoisyBatchNorm)
    "noise_std": lambda v, kw: v if kw.get("rng") is not None else 0.0,
}


def arguments(layer: Any, function: Callable[..., Any], **given: Any) -> dict[str, Any]:
    """The keywords of ``function`` for ``layer``: each one in ``given`` (call arguments,
    GN+'s ``mixing``, a noise ``rng``), else the layer's attribute of that name, if any."""
    out = {}
    for name in keyword_names(function):
        if name in given:
            out[name] = given[name]
        elif hasattr(layer, name):
            out[name] = getattr(layer, name)
    return out


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
# the training / inference rule
# ----------------------------------------------------------------------------


def normalize(
    layer: Any,
    function: Callable[..., Any],
    x: Array,
    scale: Array | None,
    bias: Array | None,
    running: Moments,
    *,
    use_running_average: bool,
    mask: Array | None,
    example_weight: float | Array,
    initializing: bool = False,
    **given: Any,
) -> tuple[Array, Moments | None]:
    """Run ``layer``'s pure ``function``: its output and its new running statistics
    (``None``: unchanged). ``given``: the keywords that are not fields (:func:`arguments`).

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
    who = type(layer).__name__
    momentum = checks.momentum(layer.momentum, who)
    kw = arguments(layer, function, mask=mask, example_weight=example_weight,
                   return_stats=True, **given)
    for name, rule in RULES.items():
        if name in kw:
            kw[name] = rule(kw[name], kw)
    axis_name = kw.pop("axis_name")  # training only (flax's rule; inference is local)
    norm = function.named(who)
    inference = dict(running_mean=running.mean, running_var=running.var, axis_name=None)
    if use_running_average:
        y, _ = norm(x, scale, bias, **kw, **inference)
        return y, None
    if initializing:
        try:
            y, _ = norm(x, scale, bias, **kw, axis_name=None)
        except F.BatchSizeError:
            y, _ = norm(x, scale, bias, **kw, **inference)
        return y, None
    y, target = norm(x, scale, bias, **kw, axis_name=axis_name)
    new = Moments(stats.ema(running.mean, target.mean, momentum),
                  stats.ema(running.var, target.var, momentum))
    if mask is not None:  # a batch whose mask keeps nothing has no statistics to move towards
        kept = stats.any_kept(mask, axis_name, kw["axis_index_groups"])
        new = Moments(*(jnp.where(kept, a, b) for a, b in zip(new, running)))
    return y, new


def noise_rng_error(who: str, noise_std: float, how: str) -> ValueError:
    """The error of a NoisyBatchNorm asked to train without a noise key."""
    return ValueError(f"{who}: training with noise_std={noise_std} needs an rng: {how}.")
