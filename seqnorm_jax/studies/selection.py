"""Paper 000's rule for choosing among tuned candidates, and the candidate filters.

:func:`select` is section 3.2.1's choice ("the largest ``g_M`` for which the network
performs well; amongst similarly performing models, the one with the lowest variance");
:func:`valid_batch_groups` and :func:`valid_channel_groups` split candidates into the
usable ones and the skipped ones, with the reason. :func:`~seqnorm_jax.studies.tune.
sequential_tune` runs the stages; nothing here trains.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from seqnorm_jax import checks
from seqnorm_jax.studies.labels import METRICS

__all__ = [
    "METRICS",
    "STAGES",
    "VALIDATION_FRACTION",
    "best_and_tolerance",
    "nothing_left",
    "select",
    "valid_batch_groups",
    "valid_channel_groups",
]

# Share of the training split held out for validation when ``base.validation_size`` is
# None: paper 000 tunes on 5,000 of CIFAR's 50,000 training images ("randomly stratified").
VALIDATION_FRACTION = 0.1
"""The share of the training split held out for validation when ``base.validation_size`` is
None."""


# (parameter, sub-folder of out_dir, symbol) of each stage
STAGES = (("batch_groups", "stage1_batch_groups", "G_M"),
           ("channel_groups", "stage2_channel_groups", "G_C"))
_EPS = 1e-12  # slack for float comparisons of means and stds


# ---------------------------------------------------------------------------- selection
def select(rows: Sequence[Mapping[str, Any]], tolerance: float | None = None, *,
           maximize: bool = True) -> tuple[Mapping[str, Any], str]:
    """Paper 000's choice among tuned candidates (section 3.2.1).

    The paper keeps "the largest ``g_M`` for which the network performs well (amongst
    similarly performing models, select the one with the lowest variance)". Here:

    1. a candidate *performs well* if its mean metric over seeds is within ``tolerance``
       of the best mean (``best - mean <= tolerance``; for a metric to minimize,
       ``mean - best <= tolerance``);
    2. among those, the one with the lowest standard deviation over seeds wins;
    3. remaining ties (equal stds, e.g. one seed each): the largest value.

    Default tolerance: the best candidate's standard error of the mean (its sample std
    over seeds divided by ``sqrt(seeds)``) -- the "one-standard-error rule" of model
    selection. The paper gives no number; it calls ``G_M`` in ``(2, 4, 8)`` "similar" when
    all three reach 96.6 % validation accuracy on CIFAR-10, i.e. when they differ by less
    than the reported precision and the seed noise. The standard error measures how well
    the best mean itself is known, so candidates inside it cannot be told apart from the
    best with the seeds run; the seed std would be a looser rule that does not tighten
    with more seeds. With one seed there is no spread estimate, so the default reduces to
    the plain best mean. ``tolerance=0`` is the plain argmax (paper 000's CIFAR-10 ``G_C``
    choice, "slightly higher accuracy than the rest").

    Args:
      rows: candidates, each with ``value`` (the hyperparameter), ``mean``, ``std`` and,
        for the default tolerance, ``sem``; optional ``parameter`` (its name, for the
        reason). Rows with ``status == "skipped"`` or no ``mean`` are ignored.
      tolerance: absolute tolerance in the metric's units (0.005 = half a point of
        accuracy); ``None``: the best candidate's standard error.
      maximize: whether a higher metric is better.

    Returns:
      ``(chosen_row, reason)``: the chosen row (one of ``rows``) and a sentence that
      explains the choice.

    Raises:
      ValueError: no evaluated row, or a negative or non-finite ``tolerance``.
    """
    cands = [r for r in rows if r.get("status", "ok") == "ok" and r.get("mean") is not None]
    if not cands:
        raise ValueError("select: rows has no evaluated candidate (all are skipped or lack a "
                         "'mean'); pass rows with 'value', 'mean' and 'std'.")
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"select: tolerance={tolerance!r} must be a finite number >= 0 "
                         "(or None for the best candidate's standard error).")
    name = cands[0].get("parameter", "value")
    sign = 1.0 if maximize else -1.0
    best, tol = best_and_tolerance(cands, tolerance, maximize)
    if tolerance is None:
        tol_text = (f"the best candidate's standard error over {best.get('seeds', '?')} seeds, "
                    f"{tol:.4g}" if tol > 0 else
                    "0 (one seed or no spread: the best candidate's standard error is 0)")
    else:
        tol_text = f"{tol:.4g} (given)"
    well = [r for r in cands if sign * (best["mean"] - r["mean"]) <= tol + _EPS]
    low = min(r["std"] for r in well)
    lowest = [r for r in well if r["std"] <= low + _EPS]
    chosen = max(lowest, key=lambda r: r["value"])

    values = ", ".join(str(r["value"]) for r in well)
    reason = (f"best mean {best['mean']:.4f} at {name}={best['value']}; tolerance {tol_text}; "
              f"within it: {name} in ({values})")
    if len(well) == 1:
        reason += f"; chose {name}={chosen['value']}, the only one."
    elif len(lowest) == 1:
        reason += (f"; chose {name}={chosen['value']}, the lowest std among them "
                   f"({chosen['std']:.4f}).")
    else:
        tied = ", ".join(str(r["value"]) for r in lowest)
        reason += (f"; lowest std {low:.4f} shared by {name} in ({tied}); chose the largest, "
                   f"{name}={chosen['value']}.")
    return chosen, reason


def best_and_tolerance(cands: Sequence[Mapping[str, Any]], tolerance: float | None,
                        maximize: bool) -> tuple[Mapping[str, Any], float]:
    """The best evaluated row (ties: the larger value) and the tolerance in effect."""
    sign = 1.0 if maximize else -1.0
    best = max(cands, key=lambda r: (sign * r["mean"], r["value"]))
    tol = float(best.get("sem") or 0.0) if tolerance is None else float(tolerance)
    return best, tol


# ---------------------------------------------------------------------------- candidates
def _check_candidates(values: Sequence[int], arg: str) -> list[int]:
    """Positive ints, deduplicated and sorted; ``ValueError`` naming ``arg`` otherwise."""
    fix = f"every candidate must be a positive int, e.g. {arg}=(1, 2, 4, 8)."
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"sequential_tune: {arg}={values!r} must be a sequence of positive "
                         f"ints, e.g. {arg}=(1, 2, 4, 8).")
    if not values:
        raise ValueError(f"sequential_tune: {arg} is empty; give at least one candidate, e.g. "
                         f"{arg}=(1, 2, 4, 8).")
    return sorted({checks.positive_int(v, f"{arg} candidate", "sequential_tune", fix=fix)
                   for v in values})


def valid_batch_groups(candidates: Sequence[int], batch_size: int,
                       grad_accum_steps: int = 1) -> tuple[list[int], dict[int, str]]:
    """Split ``G_M`` candidates into usable ones and skipped ones with the reason.

    The norm layers see micro-batches of ``batch_size // grad_accum_steps`` examples; a
    candidate is usable if it divides that and leaves ghost batches of at least 2 examples
    (a ghost batch of one example normalizes each example by itself).

    Args:
      candidates: the ``batch_groups`` candidates (positive ints).
      batch_size: the global batch size.
      grad_accum_steps: gradient accumulation steps (micro-batches per batch).

    Returns:
      ``(kept, skipped)``: the usable candidates in increasing order, and
      ``{candidate: reason}`` for the others.
    """
    cands = _check_candidates(candidates, "batch_groups")
    micro = batch_size // grad_accum_steps
    where = (f"the batch of {batch_size}" if grad_accum_steps == 1 else
             f"the micro-batch of {micro} ({batch_size} / {grad_accum_steps} accumulation steps)")
    kept, skipped = [], {}
    for g in cands:
        if micro % g:
            skipped[g] = f"does not divide {where}"
        elif micro // g < 2:
            skipped[g] = f"leaves ghost batches of {micro // g} example of {where}"
        else:
            kept.append(g)
    return kept, skipped


def valid_channel_groups(candidates: Sequence[int],
                         channels: Sequence[int]) -> tuple[list[int], dict[int, str]]:
    """Split ``G_C`` candidates into those dividing every norm layer's channel count and
    the skipped ones with the reason.

    Args:
      candidates: the ``channel_groups`` candidates (positive ints).
      channels: the channel counts of the model's norm layers
        (:func:`~seqnorm_jax.studies.compare.model_norm_widths`).

    Returns:
      ``(kept, skipped)`` as in :func:`valid_batch_groups`.
    """
    cands = _check_candidates(candidates, "channel_groups")
    kept, skipped = [], {}
    for c in cands:
        bad = sorted({n for n in channels if n % c})
        if bad:
            skipped[c] = f"does not divide the norm layers' channel count(s) {bad}"
        else:
            kept.append(c)
    return kept, skipped


def nothing_left(arg: str, skipped: Mapping[int, str], fits: Sequence[int],
                 why: str) -> ValueError:
    """The error when no ``arg`` candidate is usable: each skipped one with its reason, and
    the values that would fit (``why`` says what they are)."""
    reasons = "; ".join(f"{k}: {v}" for k, v in skipped.items())
    return ValueError(f"sequential_tune: no {arg} candidate is usable ({reasons}); pass {arg} "
                      f"from {list(fits)} ({why}).")
