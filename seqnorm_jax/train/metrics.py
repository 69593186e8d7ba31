"""Metrics files: one JSON object per line (``metrics.jsonl``) and the same rows as CSV."""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any

__all__ = ["METRIC_COLUMNS", "MetricsWriter", "read_jsonl"]

# Train rows fill step..images_per_sec (means over the steps since the previous train row);
# eval rows (one per epoch) fill eval_*, example_weight, epoch_time and, in loss and
# accuracy, the means over the epoch's training steps.
METRIC_COLUMNS = ("kind", "step", "epoch", "loss", "accuracy", "lr", "images_per_sec",
                  "eval_loss", "eval_accuracy", "example_weight", "epoch_time", "wall_time")


def _clean(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a JSONL metrics file (empty list if it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsWriter:
    """Append metric rows to ``<dir>/metrics.jsonl`` and ``<dir>/metrics.csv``.

    Every row has the columns of :data:`METRIC_COLUMNS` (empty in the CSV where a row
    has no value). ``kind`` is ``"train"`` (a mean over the steps since the previous
    train row) or ``"eval"`` (after an epoch).

    Args:
      directory: where the files go (created if needed).
      resume_step: when resuming from a checkpoint at this step, rows logged after it
        by the interrupted run are dropped, so the files read as one uninterrupted
        run; ``None`` starts fresh files.
    """

    def __init__(self, directory: str | os.PathLike, *, resume_step: int | None = None):
        os.makedirs(directory, exist_ok=True)
        self.jsonl_path = os.path.join(directory, "metrics.jsonl")
        self.csv_path = os.path.join(directory, "metrics.csv")
        kept = []
        if resume_step is not None:
            kept = [r for r in read_jsonl(self.jsonl_path) if r.get("step", 0) <= resume_step]
        with open(self.jsonl_path, "w") as f:
            for row in kept:
                f.write(json.dumps(row) + "\n")
        with open(self.csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
            writer.writeheader()
            for row in kept:
                writer.writerow({k: row.get(k, "") for k in METRIC_COLUMNS})

    def write(self, row: dict[str, Any]) -> dict[str, Any]:
        """Append one row (keys among :data:`METRIC_COLUMNS`); returns the cleaned row."""
        unknown = set(row) - set(METRIC_COLUMNS)
        if unknown:
            raise ValueError(f"MetricsWriter.write: unknown column(s) {sorted(unknown)}; "
                             f"columns are {list(METRIC_COLUMNS)}.")
        row = {k: _clean(v) for k, v in row.items()}
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=METRIC_COLUMNS).writerow(
                {k: row.get(k, "") for k in METRIC_COLUMNS})
        return row
