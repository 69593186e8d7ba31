"""One table of the pure functions of ``seqnorm_jax.functional``, one entry per configuration.

The gradient checks (``test_grads.py``), the backward-residual checks (``test_lean.py``), the
large-mean numerics and the masked-gradient check (``test_numerics_masks.py``) all run over
this table through ``cases(check)``: a ``pytest.param`` (id: the case's ``id``) of every case
that applies to ``check``. A case that does not apply to a check says so in ``not_for``, with
the reason; where a check needs a looser tolerance for a case at one input layout, the case
declares it in ``tolerance``, with the figure measured and the reason.

The group counts are written for a channel count and a batch both divisible by 8 (the
shapes those tests use): with 8 channels, ``num_groups=4`` puts two channels in each group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import pytest

from seqnorm_jax import functional as F

CHECKS = {
    "training_gradients": "test_grads.py: check_grads of the training output, order 2",
    "inference_gradients": "test_grads.py: check_grads of the output from running "
                           "statistics, example_weight included",
    "lean_backward": "test_lean.py: the backward pass keeps only x and (N, C)-sized arrays",
    "large_mean": "test_numerics_masks.py: float32 at mean 1e4, std 1 against float64",
    "two_pass_large_mean": "test_numerics_masks.py: the same at mean 1e6 with "
                           "use_fast_variance=False",
    "masked_nan_gradients": "test_numerics_masks.py: NaN in entries the mask drops reaches "
                            "no gradient",
}


@dataclass(frozen=True)
class Case:
    """A pure function and the keywords of one configuration of it."""

    id: str
    fn: Callable
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    mixing: float | None = None  # GN+'s lambda, its fourth positional argument
    noisy: bool = False  # draws noise in training: needs rng=
    not_for: Mapping[str, str] = field(default_factory=dict)  # check -> why not
    tolerance: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    # check -> {input layout -> a looser tolerance than the check's own}
    kept_input: str = "from the argument x"  # lean_backward: the one x-sized residual

    def __post_init__(self):
        unknown = (set(self.not_for) | set(self.tolerance)) - set(CHECKS)
        if unknown:
            raise ValueError(f"case {self.id}: unknown check(s) {sorted(unknown)}; "
                             f"the checks are {sorted(CHECKS)}")

    def args(self, x, scale, bias) -> tuple:
        """The positional arguments: ``x, scale, bias``, and GN+'s mixing weight."""
        return (x, scale, bias) + (() if self.mixing is None else (jnp.asarray(self.mixing),))

    def training_kwargs(self) -> dict:
        """The keywords, and the noise's key where the function draws noise."""
        return {**self.kwargs, **({"rng": jax.random.key(0)} if self.noisy else {})}


CASES = (
    Case("batch_norm", F.batch_norm),
    Case("batch_norm_two_pass", F.batch_norm, {"use_fast_variance": False},
         not_for={check: "the check sets use_fast_variance itself (and runs every case "
                         "both ways)" for check in ("large_mean", "two_pass_large_mean")}),
    Case("ghost_norm", F.ghost_norm, {"batch_groups": 4}),
    Case("ghost_norm_strided", F.ghost_norm, {"batch_groups": 2, "grouping": "strided"}),
    Case("group_norm", F.group_norm, {"num_groups": 4},
         not_for={"inference_gradients": "GroupNorm keeps no running statistics"}),
    Case("seq_norm", F.seq_norm, {"channel_groups": 4, "batch_groups": 2}),
    Case("seq_norm_ghost_first", F.seq_norm,
         {"channel_groups": 4, "batch_groups": 2, "order": "ghost_first"},
         # Measured at mean 1e6, two-pass (test_numerics_masks._error on x86_64 CPU, jax
         # 0.10.2): <= 1e-6 for the other cases and layouts but dense bn-first GN+ (4.3e-6),
         # 8.7e-6 here on dense input: the second step normalizes two-channel groups of the
         # first step's float32 output, whose spread can be tiny; that amplifies ordinary
         # float32 rounding, whatever the mean.
         tolerance={"two_pass_large_mean": {"dense": 2e-5}}),
    Case("batch_group_norm", F.batch_group_norm, {"batch_groups": 2, "channel_groups": 4}),
    Case("heterologous_norm", F.heterologous_norm),
    Case("heterologous_norm_std_groups", F.heterologous_norm, {"std_groups": 2}),
    Case("heterologous_norm_group_mean", F.heterologous_norm,
         {"mean_set": "group", "mean_groups": 4, "std_set": "extended", "std_groups": 2}),
    Case("heterologous_norm_pooled", F.heterologous_norm,
         {"mean_set": "group", "mean_groups": 4, "std_set": "batch", "std_center": "pooled"}),
    Case("gn_plus_gn_first", F.gn_plus, {"num_groups": 4, "variant": "gn_first"}, mixing=0.3),
    Case("gn_plus_bn_first", F.gn_plus, {"num_groups": 4, "variant": "bn_first"}, mixing=0.3),
    Case("gn_plus_parallel", F.gn_plus, {"num_groups": 4, "variant": "parallel"}, mixing=0.3),
    Case("bgn", F.bgn, {"num_groups": 4}),
    Case("noisy_batch_norm", F.noisy_batch_norm, {"noise_std": 0.1}, noisy=True,
         # its backward pass keeps the noisy input x + noise (in x's dtype) in place of x
         kept_input=r"output of \w+ from .* \(noisy_batch_norm\)",
         not_for={check: "the float32 and the float64 run draw different noise (it is drawn "
                         "in the statistics' dtype)"
                  for check in ("large_mean", "two_pass_large_mean")}),
)


def cases(check: str) -> list:
    """A ``pytest.param`` of each case that applies to ``check`` (one of ``CHECKS``)."""
    if check not in CHECKS:
        raise ValueError(f"unknown check {check!r}; the checks are {sorted(CHECKS)}")
    return [pytest.param(c, id=c.id) for c in CASES if check not in c.not_for]
