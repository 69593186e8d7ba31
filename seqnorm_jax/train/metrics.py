"""Metrics files: one JSON object per line (``metrics.jsonl``) and the same rows as CSV.

Non-finite numbers (a diverged run's loss) are written as the JSON strings ``"nan"``,
``"inf"`` and ``"-inf"``, so every line is strict JSON (``json.loads`` without the
``NaN`` extension; other tools' JSON readers), and as ``nan``/``inf``/``-inf`` in the
CSV; :func:`read_jsonl` turns those strings back into floats.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
from typing import Any

from seqnorm_jax.train.paths import is_local, run_path

__all__ = ["METRIC_COLUMNS", "MetricsWriter", "RunFileError", "open_run_file", "read_jsonl"]

# Train rows fill step..images_per_sec (means over the steps since the previous train row);
# eval rows (one per epoch) fill eval_*, example_weight, epoch_time and, in loss and
# accuracy, the means over the epoch's training steps.
METRIC_COLUMNS = ("kind", "step", "epoch", "loss", "accuracy", "lr", "images_per_sec",
                  "eval_loss", "eval_accuracy", "example_weight", "epoch_time", "wall_time")


_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _clean(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _restore(row: dict[str, Any]) -> dict[str, Any]:
    return {k: _NON_FINITE.get(v, v) if isinstance(v, str) and k != "kind" else v
            for k, v in row.items()}


def read_jsonl(path: str | os.PathLike, *, truncate_partial: bool = False
               ) -> list[dict[str, Any]]:
    """All records of a JSONL metrics file (empty list if it does not exist).

    The strings ``"nan"``, ``"inf"``, ``"-inf"`` come back as floats. A last line that is
    not a complete JSON object (a run killed while writing it) is left out; with
    ``truncate_partial`` it is also cut off the file.

    Raises:
      ValueError: a line before the last is not valid JSON (names the file and line).
    """
    path = run_path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    rows, offset = [], 0
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        last = i == len(lines) - 1 or all(not x.strip() for x in lines[i + 1:])
        if line.strip():
            try:
                row = json.loads(line, parse_constant=_reject_constant)
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                if not last:
                    raise ValueError(f"{path}: line {i + 1} is not a JSON object ({e}); "
                                     "repair or delete the file.") from None
                if truncate_partial:
                    path.write_bytes(data[:offset])
                break
            rows.append(_restore(row))
        offset += len(line) + 1
    return rows


def _reject_constant(name: str):
    raise ValueError(f"{name} is not strict JSON")


class RunFileError(OSError):
    """A run's output file or folder cannot be written; ``str()`` is ``"<path>: <cause>"``."""

    def __init__(self, path: str, cause: str):
        super().__init__(f"{path}: {cause}")
        self.path, self.cause = path, cause


@contextlib.contextmanager
def open_run_file(path: str | os.PathLike, mode: str):
    """``path`` opened (a local path or a URL, :func:`~seqnorm_jax.train.paths.run_path`),
    with any ``OSError`` of opening, writing or closing turned into :class:`RunFileError`
    naming ``path`` (one error line at the CLI)."""
    try:
        with run_path(path).open(mode) as f:
            yield f
    except RunFileError:
        raise
    except OSError as e:
        raise RunFileError(os.fspath(path), e.strerror or str(e)) from e


class MetricsWriter:
    """Append metric rows to ``<dir>/metrics.jsonl`` and ``<dir>/metrics.csv``.

    Every row has the columns of :data:`METRIC_COLUMNS` (empty in the CSV where a row
    has no value). ``kind`` is ``"train"`` (a mean over the steps since the previous
    train row) or ``"eval"`` (after an epoch).

    Args:
      directory: where the files go (created if needed).
      resume_step: when resuming from a checkpoint at this step, rows logged after it
        by the interrupted run are dropped (and a partial last line), so the files read
        as one uninterrupted run; ``None`` starts fresh files.

    A file deleted (or moved away) while the run writes is written anew at the next row,
    whole: every row of the run so far, as if it had never gone.

    Attributes:
      rows: the rows kept from the interrupted run (floats, as :func:`read_jsonl`).

    Raises:
      RunFileError: a file cannot be written (names it and the cause).
    """

    def __init__(self, directory: str | os.PathLike, *, resume_step: int | None = None):
        folder = run_path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = os.fspath(folder / "metrics.jsonl")
        self.csv_path = os.fspath(folder / "metrics.csv")
        kept = []
        if resume_step is not None:
            kept = [r for r in read_jsonl(self.jsonl_path, truncate_partial=True)
                    if r.get("step", 0) <= resume_step]
        self.rows = kept
        kept = [{k: _clean(v) for k, v in r.items()} for r in kept]
        self._text = {self.jsonl_path: "", self.csv_path: _csv_lines(None)}
        for row in kept:
            self._text[self.jsonl_path] += _json_line(row)
            self._text[self.csv_path] += _csv_lines(row)
        for path, text in self._text.items():
            with open_run_file(path, "wb") as f:
                f.write(text.encode())

    def write(self, row: dict[str, Any]) -> dict[str, Any]:
        """Append one row (keys among :data:`METRIC_COLUMNS`); returns the cleaned row."""
        unknown = set(row) - set(METRIC_COLUMNS)
        if unknown:
            raise ValueError(f"MetricsWriter.write: unknown column(s) {sorted(unknown)}; "
                             f"columns are {list(METRIC_COLUMNS)}.")
        clean = {k: _clean(v) for k, v in row.items()}
        self._append(self.jsonl_path, _json_line(clean))
        self._append(self.csv_path, _csv_lines(clean))
        return row

    def _append(self, path: str, text: str) -> None:
        """Append ``text``. A file that is gone (deleted or moved while the run writes)
        is written anew, whole, from the rows kept in memory; an object store
        (``gs://``) cannot append, so the file is always written anew there."""
        self._text[path] += text
        if is_local(path) and os.path.exists(path):
            with open_run_file(path, "ab") as f:
                f.write(text.encode())
            return
        with open_run_file(path, "wb") as f:
            f.write(self._text[path].encode())


def _json_line(row: dict[str, Any]) -> str:
    return json.dumps(row, allow_nan=False) + "\n"


def _csv_lines(row: dict[str, Any] | None) -> str:
    """The CSV line of ``row`` (the header for ``None``)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=METRIC_COLUMNS)
    if row is None:
        writer.writeheader()
    else:
        writer.writerow({k: row.get(k, "") for k in METRIC_COLUMNS})
    return out.getvalue()
