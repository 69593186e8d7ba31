"""Load a checkpoint of a model with flax's ``BatchNorm`` into the same model with another
norm layer.

Each layer keeps flax's variable names (``params/{scale,bias}``, ``batch_stats/{mean,var}``),
so a module named explicitly (``nn.BatchNorm(name="bn1")`` -> ``GhostNorm(name="bn1")``)
keeps its path and a checkpoint loads as it is. Flax names an unnamed module after its
class and its place among its siblings of that class (``BatchNorm_0``, ``BatchNorm_1``),
so a swapped unnamed layer moves: ``BatchNorm_0`` becomes ``GhostNorm_0``.
:func:`rename_norm_modules` renames those paths, and with ``like`` checks the result
against the new model's variables and adds what the new layer has that BatchNorm had not
(``GNPlus``'s ``lambda``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax

__all__ = ["rename_norm_modules"]

_AUTO_NAME = re.compile(r"^(?P<cls>[A-Za-z_][A-Za-z0-9_]*)_(?P<index>\d+)$")


def rename_norm_modules(variables: Mapping[str, Any], mapping: Mapping[str, str], *,
                        like: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``variables`` with every auto-named module ``<Old>_<i>`` renamed ``<New>_<i>``.

    Args:
      variables: a linen model's variables (``{"params": ..., "batch_stats": ...}``), as
        restored from a checkpoint; nested dicts or FrozenDicts of arrays.
      mapping: ``{old class name: new class name}``, e.g. ``{"BatchNorm": "GhostNorm"}``
        when every ``nn.BatchNorm`` of the model became a ``GhostNorm``. Flax numbers the
        modules of each class apart, so this is exact when every layer of a class was
        swapped for one class; rename by path yourself otherwise.
      like: the new model's variables (``model.init(...)``). The result must have the
        same paths and shapes; a variable that a renamed module lacks (a parameter
        that the new layer adds, such as GNPlus's ``lambda``) is taken from ``like``.

    Returns:
      The renamed variables as nested dicts (the arrays themselves are not copied).

    Raises:
      ValueError: ``mapping`` is empty or not strings, two modules would get one name,
        or (with ``like``) a path or shape differs; the message names the path.
    """
    if not mapping or not all(isinstance(k, str) and isinstance(v, str) and k and v
                              for k, v in mapping.items()):
        raise ValueError(f"mapping: expected {{old class name: new class name}} with "
                         f"non-empty strings, e.g. {{'BatchNorm': 'GhostNorm'}}; got "
                         f"{mapping!r}.")
    renamed = _rename(variables, dict(mapping), ())
    return renamed if like is None else _fill_like(renamed, like, ())


def _rename(tree: Any, mapping: dict[str, str], path: tuple[str, ...]) -> Any:
    if not isinstance(tree, Mapping):
        return tree
    out: dict[str, Any] = {}
    for key, value in tree.items():
        match = _AUTO_NAME.match(key)
        new = (f"{mapping[match['cls']]}_{match['index']}"
               if match and match["cls"] in mapping else key)
        if new in out:
            raise ValueError(
                f"mapping: two modules under {'/'.join(path) or 'the root'} would be named "
                f"{new!r}; the checkpoint already has a module of that name. Rename these "
                "paths one by one instead.")
        out[new] = _rename(value, mapping, (*path, new))
    return out


def _fill_like(tree: Any, like: Any, path: tuple[str, ...]) -> Any:
    where = "/".join(path) or "the root"
    if not isinstance(like, Mapping):
        if isinstance(tree, Mapping) or getattr(tree, "shape", None) != getattr(like, "shape",
                                                                                None):
            raise ValueError(f"like: {where} is {_describe(like)} in the new model but "
                             f"{_describe(tree)} after renaming.")
        return tree
    if not isinstance(tree, Mapping):
        raise ValueError(f"like: {where} is a module in the new model but "
                         f"{_describe(tree)} after renaming.")
    extra = sorted(set(tree) - set(like))
    if extra:
        raise ValueError(f"like: {where}/{extra[0]} is in the renamed checkpoint but not in "
                         f"the new model (new model's names there: {sorted(like)}); check "
                         "mapping.")
    out = {}
    for key, value in like.items():
        if key in tree:
            out[key] = _fill_like(tree[key], value, (*path, key))
        elif isinstance(value, jax.ShapeDtypeStruct):
            raise ValueError(f"like: {where}/{key} is new in the new model and is taken from "
                             "like, which holds only its shape: pass initialized variables "
                             "(model.init(...)), not jax.eval_shape's.")
        elif not isinstance(value, Mapping):
            out[key] = value  # a variable the new layer adds (GNPlus's lambda)
        else:
            raise ValueError(f"like: {where}/{key} is a module of the new model that the "
                             "renamed checkpoint lacks; check mapping.")
    return out


def _describe(x: Any) -> str:
    if isinstance(x, Mapping):
        return "a module"
    shape = getattr(x, "shape", None)
    return f"an array of shape {tuple(shape)}" if shape is not None else repr(x)
