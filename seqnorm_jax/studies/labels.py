"""The studies' names that the command line shows: the layer labels of a comparison and the
metrics a tuner selects by. Plain data, importing nothing, so that ``seqnorm-jax compare
--help`` and ``tune --help`` need no jax."""

from __future__ import annotations

__all__ = ["DEFAULT_NORMS", "LABELS", "METRICS"]

# The layers of the default comparison, by short label.
DEFAULT_NORMS = ("none", "bn", "ghost", "gn", "seqnorm", "hn", "gn+")
"""The layers of the default comparison (``seqnorm-jax compare``), by short label."""
# Every short label default_norm_specs knows (others are taken as norm specs).
LABELS = ("none", "bn", "ghost", "gn", "seqnorm", "hn", "gn+", "bgn", "fourthings", "noisybn")

# The selectable metrics: name -> (description, higher is better).
METRICS: dict[str, tuple[str, bool]] = {
    "eval_accuracy": ("validation accuracy after the last epoch", True),
    "best_eval_accuracy": ("best validation accuracy over the epochs", True),
    "eval_loss": ("validation loss after the last epoch", False),
}
"""The selectable metrics: name -> (description, whether higher is better)."""
