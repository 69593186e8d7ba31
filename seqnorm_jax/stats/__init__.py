"""The statistics core: every mean and variance in seqnorm-jax is computed here.

Every layer of the library normalizes ``x[n, ..., c]`` with a mean and a variance
that depend only on the sample ``n`` and the channel ``c``. They are all derived
from the per-sample, per-channel spatial moments of ``x`` (an ``(N, C)`` pair of
arrays, see :func:`sample_moments`), pooled over contiguous (or strided) groups
of samples and/or channels (:func:`pool`).

Numerical conventions
---------------------
* Statistics are computed in float32, or in the input's precision when it is
  wider (float64). Half-precision inputs never produce half-precision statistics.
* Variances are *biased* (divide by the count).
* Pooling uses Chan's parallel merge of (mean, variance) pairs, so it never
  subtracts two large raw second moments: a float32 input with mean 1e4 and
  standard deviation 1 gives variances within 1e-5 relative of float64.
* Sums are shifted by a value of each group (exact at ``|mean| >> std``), except on
  XLA:CPU with one device, where the plain sums are kept when every group has
  ``mean^2 <= 16 var`` (faster there; see ``moments._moments_of``).

Everything here is a pure function of arrays: no Flax, no state. The moments are in
:mod:`seqnorm_jax.stats.moments`, pooling and the cross-device reductions in
:mod:`seqnorm_jax.stats.pooling`, and :func:`normalize` (statistics, maps and the output
pass of per-sample channel groups in one custom VJP) in :mod:`seqnorm_jax.stats.fused`,
and the choice of how a call reduces its statistics (:func:`plan`) in
:mod:`seqnorm_jax.stats.plans`; all are read through this module.
"""

from seqnorm_jax.checks import divisors
from seqnorm_jax.stats.fused import normalize
from seqnorm_jax.stats.moments import (
    GROUPINGS,
    GroupView,
    Moments,
    ema,
    expand,
    feature_axis,
    group_moments,
    map_moments,
    mix,
    moments_of_affine,
    sample_counts,
    sample_moments,
    sample_moments_about,
    spatial_axes,
    stat_dtype,
)
from seqnorm_jax.stats.plans import Plan, plan
from seqnorm_jax.stats.pooling import (
    any_kept,
    cross_device_mean,
    cross_device_merge,
    merge,
    pool,
    pool_with_target,
    running_target,
)

__all__ = [
    "GROUPINGS",
    "GroupView",
    "Moments",
    "any_kept",
    "cross_device_mean",
    "cross_device_merge",
    "divisors",
    "ema",
    "expand",
    "feature_axis",
    "group_moments",
    "map_moments",
    "merge",
    "mix",
    "moments_of_affine",
    "normalize",
    "Plan",
    "plan",
    "pool",
    "pool_with_target",
    "running_target",
    "sample_counts",
    "sample_moments",
    "sample_moments_about",
    "spatial_axes",
    "stat_dtype",
]
