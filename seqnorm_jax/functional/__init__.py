"""Pure normalization functions: moments -> per-(n, c) scale and shift -> ``x * a + b``.

Every function here takes an input ``x`` of shape ``(N, ..., C)`` (feature axis
``axis``, batch axis 0), optional per-channel ``scale`` (gamma) and ``bias``
(beta) of shape ``(C,)``, and returns the normalized output in ``dtype`` (default:
the input's dtype). Statistics are computed by :mod:`seqnorm_jax.stats` in float32
(or wider); the output is produced by one elementwise pass ``x * a[n, c] + b[n, c]``.

Training and inference
----------------------
Functions of layers that keep running statistics (batch norm family, SeqNorm,
HN, GN+, BGN) use the batch statistics unless ``running_mean`` and
``running_var`` (shape ``(C,)``) are given, in which case they run in inference
mode and accept any batch size. In inference, ``example_weight`` (alpha of
"Four Things", paper 002) blends each example's own statistics into the
running ones (0: plain inference, 1: the example normalized by itself).

With ``return_stats=True`` they return ``(y, stats)`` where ``stats`` is a
:class:`~seqnorm_jax.stats.Moments` of ``(C,)`` arrays: the values the running
statistics move towards (``None`` in inference mode). See
:func:`seqnorm_jax.stats.ema`.

Layout
------
Each function checks its input and shared arguments once (:mod:`._call`, which also
writes the shared keywords once and gives every function its signature), resolves its
own groups, and then does its math: statistics from :mod:`seqnorm_jax.stats`, reduced as
the call's plan says (:func:`seqnorm_jax.stats.plan`), normalization maps and the final
pass from :mod:`._maps`. The batch family is in
:mod:`.batch`, GroupNorm in :mod:`.group`, SeqNorm and GN+ in :mod:`.two_step`, and
Heterologous Normalization in :mod:`.heterologous`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from seqnorm_jax.checks import resolve_groups
from seqnorm_jax.functional._call import BatchSizeError
from seqnorm_jax.functional.batch import (batch_group_norm, batch_norm, bgn, ghost_norm,
                                          noisy_batch_norm)
from seqnorm_jax.functional.group import group_norm
from seqnorm_jax.functional.heterologous import NORM_SETS, STD_CENTERS, NormSet, heterologous_norm
from seqnorm_jax.functional.two_step import GN_PLUS_VARIANTS, SEQ_NORM_ORDERS, gn_plus, seq_norm

__all__ = [
    "batch_norm",
    "ghost_norm",
    "group_norm",
    "seq_norm",
    "batch_group_norm",
    "heterologous_norm",
    "gn_plus",
    "bgn",
    "noisy_batch_norm",
    "resolve_groups",
    "BatchSizeError",
    "NORM_SETS",
    "NormSet",
    "GN_PLUS_VARIANTS",
    "SEQ_NORM_ORDERS",
    "STD_CENTERS",
    "FUNCTIONS",
]

FUNCTIONS: dict[str, Callable[..., Any]] = {
    "batch_norm": batch_norm,
    "ghost_norm": ghost_norm,
    "group_norm": group_norm,
    "seq_norm": seq_norm,
    "batch_group_norm": batch_group_norm,
    "heterologous_norm": heterologous_norm,
    "gn_plus": gn_plus,
    "bgn": bgn,
    "noisy_batch_norm": noisy_batch_norm,
}
"""Every pure function of this module, by name."""
