"""The training-time output bound of a normalization layer (paper 002, Appendix A/B).

In training, a value normalized over a set of ``m`` values (``eps -> 0``) lies in
``[-sqrt(m - 1), sqrt(m - 1)]``, and a single outlier attains the bound; at inference
(running statistics) the output is unbounded. :func:`output_range` measures a model's
norm layer in both modes, with the layer's affine undone, and :func:`plot_output_range`
draws the ranges against the bound.

The norm layers of a model are the registry's (:func:`seqnorm_jax.registry.is_norm_layer`:
seqnorm-jax's layers but ``Identity``, flax's ``BatchNorm``, ``GroupNorm``, ``LayerNorm``,
``RMSNorm``, ``InstanceNorm``), found by intercepting their calls
(:func:`seqnorm_jax.train.norm_calls`); :func:`norm_layer_paths` lists them in call
order, named by their module path (``"stage1_block1/norm1"``). Their set sizes are
:func:`seqnorm_jax.registry.normalization_set_size`.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from seqnorm_jax import registry
from seqnorm_jax.analysis.plots import label_colors, pyplot, save_figure
from seqnorm_jax.train.norm_calls import (
    NormCallInterceptor,
    example_weight_scope,
    module_path,
    norm_calls,
)

__all__ = [
    "NORM_TYPES",
    "norm_layer_paths",
    "normalization_set_size",
    "output_range",
    "plot_output_range",
]

NORM_TYPES = registry.NORM_TYPES  # the linen classes of every norm layer
"""The linen classes of every norm layer of this library
(``seqnorm_jax.registry.NORM_TYPES``)."""
feature_axes = registry.feature_axes
normalization_set_size = registry.normalization_set_size


def norm_layer_paths(model: nn.Module, variables: Any, x: Any) -> list[str]:
    """The module paths of ``model``'s norm layers, in the order they are called.

    Args:
      model: a flax module whose ``apply`` takes ``train=`` (any model of
        :func:`seqnorm_jax.models.get_model`).
      variables: its variables (``{"params", "batch_stats"}``); shapes suffice.
      x: an input batch (only its shape and dtype are used: nothing is computed).

    Returns:
      ``'/'.join(module.path)`` of each norm layer, e.g. ``["stem_norm",
      "stage1_block1/norm1", ...]`` (a layer called twice is listed once).
    """
    calls = norm_calls(lambda v, a: model.apply(v, a, train=False), variables, x)
    return [c.path for c in calls]


def resolve_layer(paths: Sequence[str], layer: int | str) -> str:
    """The path of ``layer``: an index into ``paths`` (negative counts from the end) or a path.

    Raises:
      ValueError: the model has no norm layer, or ``layer`` is not one of them.
    """
    if not paths:
        raise ValueError("the model has no norm layer (seqnorm-jax layers, nn.BatchNorm or "
                         "nn.GroupNorm); build it with a norm, e.g. get_model(..., norm='bn').")
    if isinstance(layer, str):
        if layer not in paths:
            raise ValueError(f"layer={layer!r} is not a norm layer of the model; its norm "
                             f"layers are {list(paths)}.")
        return layer
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not (
            -len(paths) <= layer < len(paths)):
        raise ValueError(f"layer={layer!r} must be an index in [{-len(paths)}, {len(paths)}) or "
                         f"one of the paths {list(paths)}.")
    return paths[int(layer)]


# ----------------------------------------------------------------------------- range

def _undo_affine(module: nn.Module, y: jax.Array) -> jax.Array:
    """``(y - bias) / scale`` with the layer's own ``params`` (missing ones skipped)."""
    params = module.variables.get("params", {})
    y = y.astype(jnp.promote_types(y.dtype, jnp.float32))
    feats = feature_axes(module, y.ndim)
    shape = [y.shape[i] if i in feats else 1 for i in range(y.ndim)]
    if "bias" in params and getattr(module, "use_bias", True):
        y = y - jnp.asarray(params["bias"], y.dtype).reshape(shape)
    if "scale" in params and getattr(module, "use_scale", True):
        y = y / jnp.asarray(params["scale"], y.dtype).reshape(shape)
    return y


def _normalized_outputs(model, path, variables, x, rngs, alpha):
    """The layer's normalized output (affine undone) in training and in inference mode."""
    def capture(train: bool):
        found: list[jax.Array] = []

        def grab(module, args, kwargs, out):
            if not found and module_path(module) == path:
                found.append(_undo_affine(module, out))

        with nn.intercept_methods(NormCallInterceptor(grab)):
            if train:
                model.apply(variables, x, train=True, rngs=rngs, mutable=["batch_stats"])
            else:
                with example_weight_scope(alpha):
                    model.apply(variables, x, train=False)
        return found[0]

    return capture(True), capture(False)


# One compilation per (model, layer, shapes): sweeping layers or inputs of a model reuses it.
_normalized_outputs_jit = jax.jit(_normalized_outputs, static_argnums=(0, 1))


def output_range(model: nn.Module, variables: Mapping[str, Any], x: Any, layer: int | str = -1,
                 *, example_weight: float = 0.0, return_values: bool = True,
                 rng: jax.Array | None = None) -> dict[str, Any]:
    """The normalized output range of one norm layer in training vs inference.

    Runs ``model`` on ``x`` twice: in training mode (batch statistics; the running
    statistics update is discarded) and in inference mode (running statistics, with
    "Four Things" ``example_weight`` on the seqnorm-jax layers), captures the chosen
    layer's output and undoes its affine, ``(y - bias) / scale``, so the values are the
    normalized ones the bound of paper 002 applies to.

    Args:
      model: a flax module whose ``apply`` takes ``train=``.
      variables: its variables (``{"params", "batch_stats"}``).
      x: the input batch in training (its batch size sets the normalization sets).
      layer: index into :func:`norm_layer_paths` (default -1: the last norm layer) or a path.
      example_weight: alpha for the inference pass.
      return_values: include the normalized values (``train_values``, ``eval_values``).
      rng: key for the ``"noise"``/``"dropout"`` rngs of the training pass (default
        ``jax.random.key(0)``).

    Returns:
      ``{"layer", "set_size", "bound" (sqrt(m - 1), or None without a single set),
      "train_min", "train_max", "eval_min", "eval_max", "train_abs_max", "eval_abs_max"}``
      (python floats) and, with ``return_values``, ``"train_values"``/``"eval_values"``
      (float32 numpy arrays of the layer's output shape).
    """
    calls = norm_calls(lambda v, a: model.apply(v, a, train=False), variables, x)
    path = resolve_layer([c.path for c in calls], layer)
    call = next(c for c in calls if c.path == path)
    m = normalization_set_size(call.module, call.input_shape)
    rng = jax.random.key(0) if rng is None else rng
    rngs = dict(zip(("noise", "dropout"), jax.random.split(rng)))
    try:
        hash(model)
        run = functools.partial(_normalized_outputs_jit, model, path)
    except TypeError:  # a model with unhashable fields: compile for this call only
        run = jax.jit(functools.partial(_normalized_outputs, model, path))
    y_train, y_eval = jax.device_get(run(variables, x, rngs, jnp.float32(example_weight)))
    y_train = np.asarray(y_train, np.float32)
    y_eval = np.asarray(y_eval, np.float32)
    out: dict[str, Any] = {
        "layer": path,
        "set_size": m,
        "bound": None if m is None else math.sqrt(m - 1),
        "train_min": float(y_train.min()), "train_max": float(y_train.max()),
        "eval_min": float(y_eval.min()), "eval_max": float(y_eval.max()),
        "train_abs_max": float(np.abs(y_train).max()),
        "eval_abs_max": float(np.abs(y_eval).max()),
    }
    if return_values:
        out["train_values"], out["eval_values"] = y_train, y_eval
    return out


def plot_output_range(results: Mapping[str, Mapping[str, Any]], path: str | os.PathLike,
                      title: str | None = None, *, bins: int = 60) -> str:
    """Training vs inference output ranges per label, with the ``+-sqrt(m - 1)`` bound.

    The first panel shows, for each label, the ``[min, max]`` range in training (solid)
    and inference (hatched) and the bound (black ticks); one histogram panel per label
    follows when the results hold values (log counts, train vs eval, bound lines).

    Args:
      results: ``{label: output_range(...) dict}``.
      path: the PNG to write.
      title: figure title.
      bins: histogram bins.

    Returns:
      ``path``.
    """
    if not results:
        raise ValueError("plot_output_range: results is empty; pass {label: output_range(...)}.")
    plt = pyplot()
    labels = list(results)
    with_values = [lb for lb in labels if results[lb].get("train_values") is not None]
    panels = 1 + len(with_values)
    ncols = min(panels, 3)
    nrows = -(-panels // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.8 * nrows), squeeze=False)
    axes = axes.ravel()
    colors = label_colors(labels)
    ax = axes[0]
    for i, label in enumerate(labels):
        r = results[label]
        for dx, mode, hatch in ((-0.18, "train", None), (0.18, "eval", "//")):
            lo, hi = r[f"{mode}_min"], r[f"{mode}_max"]
            ax.bar(i + dx, hi - lo, bottom=lo, width=0.32, color=colors[label],
                   alpha=0.8 if mode == "train" else 0.35, hatch=hatch, edgecolor=colors[label],
                   label=mode if i == 0 else None)
        if r.get("bound") is not None:
            for sign in (1, -1):
                ax.hlines(sign * r["bound"], i - 0.42, i + 0.42, colors="k", linewidth=1.5,
                          label="+-sqrt(m-1)" if i == 0 and sign == 1 else None)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="normalized output (affine undone)", title="train vs inference range")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    for ax, label in zip(axes[1:], with_values):
        r = results[label]
        train = np.ravel(r["train_values"])
        evals = np.ravel(r["eval_values"])
        lo = float(min(train.min(), evals.min()))
        hi = float(max(train.max(), evals.max()))
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
        ax.hist(train, bins=edges, alpha=0.6, color=colors[label], label="train")
        ax.hist(evals, bins=edges, histtype="step", color="k", label="inference")
        if r.get("bound") is not None:
            for sign in (1, -1):
                ax.axvline(sign * r["bound"], color="r", ls="--", lw=1)
        ax.set_yscale("log")
        m = r.get("set_size")
        ax.set(title=f"{label} ({r['layer']}, m={m})", xlabel="value")
        ax.title.set_fontsize(8)
        ax.legend(fontsize=7)
    for ax in axes[panels:]:
        ax.set_visible(False)
    return save_figure(fig, path, title=title)
