"""The calls of a model's norm layers: intercepted (output noise, example weight) or listed.

Which modules are norm layers is the registry's answer
(:func:`seqnorm_jax.registry.is_norm_layer`: seqnorm-jax's layers but ``Identity``, and
flax's ``BatchNorm``, ``GroupNorm``, ``LayerNorm``, ``RMSNorm``, ``InstanceNorm``);
this module only watches their ``__call__`` through ``flax.linen.intercept_methods``:

* :func:`output_noise_scope` adds Gaussian noise to every norm layer's output (paper
  004's robustness study);
* :func:`example_weight_scope` passes "Four Things" ``example_weight`` to the layers
  that take it;
* :class:`NormCallInterceptor` runs a callback on every outermost norm-layer call (the
  analysis tools capture inputs and outputs with it);
* :func:`norm_calls` traces a function abstractly (``jax.eval_shape``, nothing computed)
  and lists the norm layers it calls: path, fields, input shape. The optimizer labels
  the norm layers' parameters by these paths; the analysis tools choose layers by them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from seqnorm_jax import registry

__all__ = [
    "NormCall",
    "NormCallInterceptor",
    "example_weight_scope",
    "module_path",
    "norm_calls",
    "output_noise_scope",
]


def module_path(module: nn.Module) -> str:
    """``'/'.join(module.path)``: the module's name path inside the model."""
    return "/".join(str(p) for p in module.path)


def _is_norm_call(context: Any) -> bool:
    return context.method_name == "__call__" and registry.is_norm_layer(context.module)


class NormCallInterceptor:
    """``callback(module, args, kwargs, out)`` on every outermost norm-layer call.

    Inner calls of a norm layer that itself calls another (e.g. a user's wrapper) are
    not reported. A callback that returns a value replaces the layer's output.
    """

    def __init__(self, callback: Callable[[nn.Module, tuple, dict, Any], Any]):
        self.callback = callback
        self.depth = 0

    def __call__(self, next_fun, args, kwargs, context):
        if not _is_norm_call(context):
            return next_fun(*args, **kwargs)
        self.depth += 1
        try:
            out = next_fun(*args, **kwargs)
        finally:
            self.depth -= 1
        if self.depth == 0:
            replaced = self.callback(context.module, args, kwargs, out)
            if replaced is not None:
                return replaced
        return out


@dataclasses.dataclass(frozen=True)
class NormCall:
    """One norm layer as a traced call saw it.

    Attributes:
      path: ``'/'.join(module.path)`` (``"stage1_block1/norm1"``), also the layer's key
        path in the ``params`` tree.
      module: the layer, unbound (its fields only).
      input_shape: the shape of its input.
    """

    path: str
    module: nn.Module
    input_shape: tuple[int, ...]


def norm_calls(fn: Callable[..., Any], *args: Any) -> list[NormCall]:
    """The norm layers ``fn(*args)`` calls, in call order (a layer called twice once).

    ``fn`` runs under ``jax.eval_shape``: ``args`` may be arrays or
    ``jax.ShapeDtypeStruct`` and nothing is computed. E.g. every norm layer of a model:
    ``norm_calls(lambda x: model.init(jax.random.key(0), x, train=False), x)``.
    """
    found: dict[str, NormCall] = {}

    def record(module, call_args, kwargs, out):
        path = module_path(module)
        if path not in found:
            found[path] = NormCall(path, module.clone(parent=None),
                                   tuple(jnp.shape(call_args[0])))

    with nn.intercept_methods(NormCallInterceptor(record)):
        jax.eval_shape(fn, *args)
    return list(found.values())


@contextlib.contextmanager
def example_weight_scope(example_weight: float | jax.Array):
    """Pass ``example_weight`` to every seqnorm-jax norm layer called inside the scope.

    The "Four Things" inference example weighing (paper 002) is a call argument of the
    layers (``layer(x, example_weight=a)``). This scope sets it on every call of a layer
    that takes it (:func:`seqnorm_jax.registry.takes_example_weight`) through
    ``flax.linen.intercept_methods``, so a model needs no extra argument to forward it.
    Use it around inference (``train=False``) only: the layers reject a non-zero weight
    in training.
    """

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and registry.takes_example_weight(context.module):
            kwargs = {**kwargs, "example_weight": example_weight}
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield


@contextlib.contextmanager
def output_noise_scope(mean: float, std: float, rng_name: str = "output_noise"):
    """Add Gaussian noise ``N(mean, std**2)`` to the output of every norm layer in the scope.

    Paper 004's robustness study (section 3, Figures 5 and 11) distorts the output
    distribution of every normalization layer with ``mean=1e-3, std=1.001`` during
    training. The noise is drawn per element with ``module.make_rng(rng_name)``, so
    ``apply`` needs ``rngs={rng_name: key}`` (:func:`~seqnorm_jax.train.step_rngs`
    provides ``"output_noise"``). It perturbs every norm layer of the registry
    (:func:`seqnorm_jax.registry.is_norm_layer`; flax's ``LayerNorm`` included, not
    ``Identity``); :func:`~seqnorm_jax.train.train_step` uses it when given
    ``output_noise``.
    """

    def interceptor(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        if _is_norm_call(context):
            noise = jax.random.normal(context.module.make_rng(rng_name), y.shape, jnp.float32)
            y = y + (mean + std * noise).astype(y.dtype)
        return y

    with nn.intercept_methods(interceptor):
        yield


def noise_context(output_noise: tuple[float, float] | None):
    """:func:`output_noise_scope` for ``output_noise=(mean, std)``; nothing for ``None``."""
    if output_noise is None:
        return contextlib.nullcontext()
    mean, std = output_noise
    return output_noise_scope(mean, std)
