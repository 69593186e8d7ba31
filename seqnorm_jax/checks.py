"""The small argument checks every part of seqnorm-jax shares.

Each raises ``ValueError`` naming the argument, what it got and how to fix it, and
returns the checked value, so a caller checks and reads in one line::

    steps = checks.positive_int(steps, "steps", "Trainer")
    order = checks.choice(order, ("group_first", "ghost_first"), "order", "seq_norm")

``who`` (a function, layer or flag name) prefixes the message; leave it empty where
the name says enough.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp

__all__ = ["positive_int", "choice", "suggest", "divisors", "resolve_groups", "static_number",
           "example_weight", "momentum", "epsilon", "noise_std", "static_bool"]

T = TypeVar("T")


def _prefix(who: str) -> str:
    return f"{who}: " if who else ""


def positive_int(value: Any, name: str, who: str = "", *, allow_zero: bool = False,
                 fix: str = "") -> int:
    """``value`` as an ``int`` if it is a positive integer (``>= 0`` with ``allow_zero``).

    Booleans are refused (``True`` is not a count); integral NumPy scalars are accepted.
    """
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or value < (0 if allow_zero else 1):
        kind = "a non-negative int" if allow_zero else "a positive int"
        raise ValueError(f"{_prefix(who)}{name} must be {kind}, got {value!r}"
                         f"{'; ' + fix if fix else '.'}")
    return int(value)


def static_number(value: Any) -> bool:
    """A Python or NumPy real number (not a traced or device array): checkable now."""
    return isinstance(value, numbers.Real) and not isinstance(value, jax.Array)


def example_weight(value: Any, who: str = "") -> Any:
    """The inference example weight (alpha of "Four Things"), in ``[0, 1]``.

    A static number outside ``[0, 1]`` is refused. A traced one (under ``jax.jit``)
    cannot raise, so it is clipped to ``[0, 1]``: ``-0.5`` acts as 0 (the running
    statistics) and ``1.5`` as 1 (the example's own), never as an extrapolation whose
    variance may be negative.
    """
    if static_number(value):
        if not 0 <= value <= 1:
            raise ValueError(
                f"{_prefix(who)}example_weight must be in [0, 1] (0: the running statistics, "
                f"1: the example's own), got {value!r}; pass a weight in [0, 1]."
            )
        return value
    return jnp.clip(value, 0, 1)


def momentum(value: Any, who: str = "") -> Any:
    """A running-statistics ``momentum`` (the old statistics' weight in the moving
    average), in ``[0, 1]``: 1 freezes the running statistics, 0 keeps the last batch's.
    A traced value (under ``jax.jit``) is not checked."""
    if static_number(value) and not 0 <= value <= 1:
        raise ValueError(
            f"{_prefix(who)}momentum must be in [0, 1] (the weight of the old running "
            f"statistics in the moving average), got {value!r}; flax's default is 0.99 "
            "(PyTorch's momentum m corresponds to 1 - m)."
        )
    return value


def epsilon(value: Any, who: str = "") -> Any:
    """``epsilon``, added to the variance before ``1/sqrt``: a positive finite number.
    A traced value (under ``jax.jit``) is not checked."""
    if static_number(value) and not (value > 0 and math.isfinite(value)):
        raise ValueError(
            f"{_prefix(who)}epsilon must be a positive finite number, got {value!r}; it is "
            "added to the variance before 1/sqrt, so use a small positive value such as 1e-5."
        )
    return value


def noise_std(value: Any, who: str = "") -> Any:
    """The standard deviation of a noisy BatchNorm's input noise: a finite number ``>= 0``.
    A traced value (under ``jax.jit``) is not checked."""
    if static_number(value) and not (value >= 0 and math.isfinite(value)):
        raise ValueError(
            f"{_prefix(who)}noise_std must be a finite number >= 0, got {value!r}; "
            "0 turns the noise off (paper 000's best is 3e-4)."
        )
    return value


def static_bool(value: Any, name: str, who: str = "", *, fix: str = "") -> bool:
    """``value`` as a ``bool`` if it is known when tracing; a traced value (under
    ``jax.jit``) is refused with an error naming ``name`` and the fix."""
    try:
        return bool(value)
    except jax.errors.ConcretizationTypeError:  # TracerBoolConversionError included
        raise ValueError(
            f"{_prefix(who)}{name} must be a Python bool known when the function is traced, "
            f"got a traced value; {fix or f'mark it static: jax.jit(f, static_argnames={name!r})'}."
        ) from None


def suggest(word: Any, choices: Iterable[Any]) -> str:
    """``" Did you mean 'x'?"`` for the choice closest to ``word``, or ``""``."""
    names = [str(c) for c in choices]
    close = difflib.get_close_matches(str(word), names, n=1, cutoff=0.6)
    if not close:  # case and separators: "SeqNorm" for "seq-norm"
        key = lambda s: s.lower().replace("-", "").replace("_", "")
        close = [c for c in names if key(c) == key(str(word))][:1]
    return f" Did you mean {close[0]!r}?" if close else ""


def choice(value: T, choices: Iterable[Any], name: str, who: str = "") -> T:
    """``value`` if it is one of ``choices``; otherwise the error lists them."""
    choices = tuple(choices)
    try:
        ok = value in choices
    except TypeError:  # an unhashable value in a set or dict of choices
        ok = False
    if not ok:
        raise ValueError(f"{_prefix(who)}{name} must be one of {choices}, got {value!r}."
                         f"{suggest(value, choices)}")
    return value


def divisors(n: int) -> list[int]:
    """The divisors of ``n``: the group counts that split ``n`` items evenly (for messages)."""
    return [d for d in range(1, n + 1) if n % d == 0]


def resolve_groups(
    total: int,
    groups: int | None,
    size: int | None,
    *,
    who: str,
    groups_name: str,
    size_name: str,
    what: str,
    default: int | None = None,
    fix: str = "",
    error: type[ValueError] = ValueError,
) -> int:
    """The number of groups of ``total`` items, given a group count or a group size.

    ``groups`` and ``size`` are the two ways a layer names its grouping (e.g.
    ``batch_groups``/``ghost_size``); at most one may be given, and ``default`` (a
    count) applies when neither is. ``what`` names the items in the message ("batch
    size of x (shape ...)"); a count or size that does not divide ``total`` raises
    ``error`` listing the divisors, followed by ``fix``.
    """
    if groups is not None and size is not None:
        raise ValueError(
            f"{who}: give either {groups_name} or {size_name}, not both "
            f"(got {groups_name}={groups}, {size_name}={size})."
        )
    if groups is None and size is None:
        if default is None:
            raise ValueError(f"{who}: one of {groups_name} or {size_name} is required.")
        groups = default
    name, value = (size_name, size) if size is not None else (groups_name, groups)
    value = positive_int(value, name, who)
    if total % value:
        raise error(
            f"{who}: {name}={value} does not divide the {what}, {total}; "
            f"use {name} in {divisors(total)}{fix}."
        )
    return total // value if size is not None else value
