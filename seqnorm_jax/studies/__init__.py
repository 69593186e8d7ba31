"""Studies: train settings x seeds, summarize over seeds, write tables, files and plots.

One engine runs every study; the commands ``compare``, ``tune`` and ``experiment`` are
thin users of it:

* :mod:`~seqnorm_jax.studies.engine` -- settings x seeds -> Trainer runs -> records
  (:func:`run_settings`, :class:`Setting`, :class:`SourceCache`, :func:`norm_widths`,
  :func:`mock_sources`);
* :mod:`~seqnorm_jax.studies.report` -- records -> mean +- std, paired differences,
  tables, the JSON/CSV writers and the shared plots;
* :mod:`~seqnorm_jax.studies.compare` -- one model, several norm layers:
  :func:`compare`, :func:`default_norm_specs`;
* :mod:`~seqnorm_jax.studies.tune` -- paper 000's sequential tuner of ``G_M`` then
  ``G_C``: :func:`sequential_tune` (its selection rule in
  :mod:`~seqnorm_jax.studies.selection`, its result in
  :mod:`~seqnorm_jax.studies.tune_report`);
* :mod:`~seqnorm_jax.studies.experiment` -- the papers' tables and figures as JSON
  configs (shipped in ``seqnorm_jax/studies/configs``): :func:`load_experiment`,
  :func:`run_experiment`, :func:`list_experiments`;
* :mod:`~seqnorm_jax.studies.kinds` -- the registry of experiment kinds
  (:data:`KINDS`): each kind's hooks, per-run analysis, summary columns and plots.
"""

from typing import TYPE_CHECKING

from seqnorm_jax._extras import lazy_exports, require_train

require_train("seqnorm_jax.studies")

if TYPE_CHECKING:
    from seqnorm_jax.studies.compare import (
        CompareResult,
        compare,
        default_norm_specs,
        format_table,
        model_norm_widths,
        write_outputs,
    )
    from seqnorm_jax.studies.engine import (
        Setting,
        SourceCache,
        mock_sources,
        norm_widths,
        run_settings,
    )
    from seqnorm_jax.studies.experiment import (
        SCALES,
        Experiment,
        list_experiments,
        load_experiment,
        run_experiment,
    )
    from seqnorm_jax.studies.kinds import KINDS, Kind
    from seqnorm_jax.studies.labels import DEFAULT_NORMS, METRICS
    from seqnorm_jax.studies.report import summarize
    from seqnorm_jax.studies.selection import (
        VALIDATION_FRACTION,
        select,
        valid_batch_groups,
        valid_channel_groups,
    )
    from seqnorm_jax.studies.tune import sequential_tune
    from seqnorm_jax.studies.tune_report import TuneResult, format_stage

__all__ = [
    "DEFAULT_NORMS",
    "KINDS",
    "METRICS",
    "SCALES",
    "VALIDATION_FRACTION",
    "CompareResult",
    "Experiment",
    "Kind",
    "Setting",
    "SourceCache",
    "TuneResult",
    "compare",
    "default_norm_specs",
    "format_stage",
    "format_table",
    "list_experiments",
    "load_experiment",
    "mock_sources",
    "model_norm_widths",
    "norm_widths",
    "run_experiment",
    "run_settings",
    "select",
    "sequential_tune",
    "summarize",
    "valid_batch_groups",
    "valid_channel_groups",
    "write_outputs",
]

__getattr__, __dir__ = lazy_exports(__name__, __file__)
