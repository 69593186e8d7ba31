"""Helpers shared by the models: binding a norm factory, conv defaults, input checks."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from seqnorm_jax import checks
from seqnorm_jax.linen import Identity

ModuleDef = Callable[..., nn.Module]
Dtype = Any

# He et al. (2015) normal initialization with fan-out, the convention of the
# ResNet, Wide ResNet and VGG reference implementations (torchvision, the WRN Torch
# code): variance 2 / (k_h * k_w * out_channels).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def layer_class(norm: ModuleDef) -> type | None:
    """The module class behind a norm factory (a class or nested ``functools.partial``).

    Returns ``None`` for any other callable, whose accepted keywords are unknown.
    """
    fn = norm
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn if isinstance(fn, type) else None


def is_identity(norm: ModuleDef) -> bool:
    """True when ``norm`` builds :class:`seqnorm_jax.Identity` (``norm_factory("none")``).

    The models give their convolutions and dense layers a bias exactly when this
    is true: otherwise the norm's own bias follows them and a layer bias would be
    redundant (the norm subtracts it again).
    """
    cls = layer_class(norm)
    return cls is not None and issubclass(cls, Identity)


def bind_norm(norm: ModuleDef, **fields: Any) -> ModuleDef:
    """Bind ``fields`` to ``norm``, keeping only the fields its layer class declares.

    This lets one model body drive every layer: ``use_running_average`` and
    ``dtype`` are dropped for layers without such a field (``Identity``, and
    flax's ``nn.GroupNorm``/``nn.LayerNorm``, which have no running statistics), and
    ``scale_init`` for layers without a scale. A callable that is not a module
    class (or a partial of one) gets every field.
    """
    cls = layer_class(norm)
    if cls is not None and dataclasses.is_dataclass(cls):
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in fields.items() if k in names}
    return functools.partial(norm, **fields)


def conv_layers(module: nn.Module, train: bool, **conv_fields: Any) -> tuple[ModuleDef, ModuleDef]:
    """The ``(norm, conv)`` factories of a convolutional model's ``__call__``.

    ``norm`` is ``module.norm`` bound to ``use_running_average=not train`` and the
    model's ``dtype``; ``conv`` is ``nn.Conv`` with "SAME" padding, He fan-out init, the
    model's dtype, and a bias only when the norm is absent (the norm's beta is the bias
    otherwise), plus ``conv_fields``.
    """
    norm = bind_norm(module.norm, use_running_average=not train, dtype=module.dtype)
    conv = functools.partial(nn.Conv, **{"padding": "SAME", "use_bias": is_identity(module.norm),
                                         "kernel_init": conv_init, "dtype": module.dtype,
                                         **conv_fields})
    return norm, conv


def check_images(model: str, x: jax.Array) -> None:
    """Raise ``ValueError`` unless ``x`` is a floating-point NHWC batch."""
    if np.ndim(x) != 4:
        raise ValueError(
            f"{model}: x must be a batch of NHWC images, shape (N, H, W, C); got shape "
            f"{np.shape(x)}. Add a channel axis for grayscale images (x[..., None])."
        )
    check_float(model, x)


def check_float(model: str, x: jax.Array) -> None:
    """Raise ``ValueError`` unless ``x`` has a floating-point dtype."""
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(
            f"{model}: x must be floating point, got dtype {jnp.result_type(x)}; convert "
            "and scale the images first, e.g. x.astype(jnp.float32) / 255."
        )


def check_choice(model: str, name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{model}: {name}={value!r} is not valid; choose one of {list(choices)}."
                         f"{checks.suggest(value, choices)}")


def is_int(value: Any) -> bool:
    """True for Python and NumPy integers (not bools)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_positive(model: str, **values: Any) -> None:
    """Raise ``ValueError`` unless every value is a positive int."""
    for name, value in values.items():
        checks.positive_int(value, name, model)


def check_rate(model: str, name: str, value: float) -> None:
    """Raise ``ValueError`` unless ``0 <= value < 1``."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{model}: {name} must be in [0, 1), got {value!r}.")


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Average over the spatial axes of an NHWC batch: ``(N, H, W, C) -> (N, C)``."""
    return jnp.mean(x, axis=(1, 2))


def _pool_matrix(size_in: int, size_out: int) -> np.ndarray:
    """``(size_out, size_in)`` averaging weights of adaptive average pooling.

    Output cell ``i`` averages inputs ``floor(i * n / m) .. ceil((i + 1) * n / m) - 1``
    (PyTorch's ``AdaptiveAvgPool2d`` bins), so it also upsamples when ``m > n``.
    """
    weights = np.zeros((size_out, size_in), np.float32)
    for i in range(size_out):
        start = (i * size_in) // size_out
        end = -((-(i + 1) * size_in) // size_out)
        weights[i, start:end] = 1.0 / (end - start)
    return weights


def adaptive_avg_pool(x: jax.Array, output_size: tuple[int, int]) -> jax.Array:
    """Adaptive average pooling of an NHWC batch to ``output_size = (H', W')``.

    The bins are PyTorch's ``AdaptiveAvgPool2d``'s, so VGG's ImageNet classifier
    sees a 7x7 map for any input size; for a map already of that size this is the
    identity.
    """
    h, w = x.shape[1:3]
    if (h, w) == tuple(output_size):
        return x
    ph = jnp.asarray(_pool_matrix(h, output_size[0]), x.dtype)
    pw = jnp.asarray(_pool_matrix(w, output_size[1]), x.dtype)
    return jnp.einsum("ih,nhwc,jw->nijc", ph, x, pw)


def logits(x: jax.Array) -> jax.Array:
    """Return the classifier output as float32 logits, whatever the compute dtype."""
    return jnp.asarray(x, jnp.float32)
