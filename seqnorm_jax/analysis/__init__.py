"""Analysis tools of the papers, for any flax model whose ``apply`` takes ``train=``.

* :mod:`~seqnorm_jax.analysis.landscape` -- loss landscape and gradient predictiveness
  along the gradient (Santurkar et al. 2018; papers 000 and 004): :func:`landscape_probe`,
  the Trainer hook :class:`LandscapeRecorder`, :func:`summarize_landscape`,
  :func:`plot_landscape`;
* :mod:`~seqnorm_jax.analysis.output_range` -- the training-time output bound
  ``sqrt(m - 1)`` of paper 002: :func:`norm_layer_paths`, :func:`normalization_set_size`,
  :func:`output_range`, :func:`plot_output_range`;
* :mod:`~seqnorm_jax.analysis.fluctuation` -- BN vs EN statistics fluctuation (paper 003,
  4.6): the Trainer hook :class:`StatisticsRecorder`, :func:`plot_fluctuation`;
* :mod:`~seqnorm_jax.analysis.example_weight` -- the inference example weighing sweep of
  paper 002, also retroactive on a run directory: :func:`example_weight_sweep`,
  :func:`sweep_run`, :func:`best_example_weight`, :func:`plot_example_weight`.

Paper 000's sequential tuner trains rather than analyses: it is
:func:`seqnorm_jax.studies.sequential_tune`.

Trainer hooks are passed as ``Trainer(config, step_hooks=[recorder])``; each is called
as ``hook(state, batch, step)`` before every optimizer step.
"""

from seqnorm_jax._extras import require_train

require_train("seqnorm_jax.analysis")

from seqnorm_jax.analysis.example_weight import (
    best_example_weight,
    example_weight_sweep,
    plot_example_weight,
    sweep_run,
)
from seqnorm_jax.analysis.fluctuation import (
    STAT_NAMES,
    StatisticsRecorder,
    input_statistics,
    plot_fluctuation,
)
from seqnorm_jax.analysis.landscape import (
    PAPER_STEP_SIZES,
    LandscapeRecorder,
    landscape_probe,
    plot_landscape,
    summarize_landscape,
)
from seqnorm_jax.analysis.output_range import (
    NORM_TYPES,
    norm_layer_paths,
    normalization_set_size,
    output_range,
    plot_output_range,
)
from seqnorm_jax.analysis.plots import mean_std, moving_average

__all__ = [
    "NORM_TYPES",
    "PAPER_STEP_SIZES",
    "STAT_NAMES",
    "LandscapeRecorder",
    "StatisticsRecorder",
    "best_example_weight",
    "example_weight_sweep",
    "input_statistics",
    "landscape_probe",
    "mean_std",
    "moving_average",
    "norm_layer_paths",
    "normalization_set_size",
    "output_range",
    "plot_example_weight",
    "plot_fluctuation",
    "plot_landscape",
    "plot_output_range",
    "summarize_landscape",
    "sweep_run",
]
