"""What a run reports: metrics files, TensorBoard event files and progress bars.

Metrics: one JSON object per line (``metrics.jsonl``), the same rows as CSV, and
TensorBoard event files (``tensorboard/``, written with tensorboardX, no TensorFlow);
with ``TrainConfig.wandb_project``, the same scalars in a Weights & Biases run as well.

Non-finite numbers (a diverged run's loss) are written as the JSON strings ``"nan"``,
``"inf"`` and ``"-inf"``, so every line is strict JSON (``json.loads`` without the
``NaN`` extension; other tools' JSON readers), and as ``nan``/``inf``/``-inf`` in the
CSV; :func:`read_jsonl` turns those strings back into floats.

Progress: tqdm redraws its bar with carriage returns and cursor moves, which a log file
(stderr redirected, a batch job, CI) keeps as control codes, one redraw after another,
and nested bars (a study's runs, each run's steps) interleave there.
:func:`progress_bar` gives the bar only when its stream is a terminal; otherwise a
:class:`LogProgress` with the same methods writes one plain line at most every
``interval`` seconds and one at the end. Its rate counts from the first update, so the
compilation before the first step does not drag it down.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO

from seqnorm_jax.train.files import is_local, open_run_file, run_file_errors, run_path

__all__ = ["EVAL_FILE", "EVENTS_FOLDER", "METRIC_COLUMNS", "LogProgress", "MetricsWriter",
           "SCALAR_TAGS", "WANDB_FILE", "append_eval_rows", "progress_bar", "read_jsonl"]

# Train rows fill step..images_per_sec (means over the steps since the previous train row);
# eval rows (one per epoch) fill eval_*, example_weight, epoch_time and, in loss and
# accuracy, the means over the epoch's training steps.
METRIC_COLUMNS = ("kind", "step", "epoch", "loss", "accuracy", "lr", "images_per_sec",
                  "eval_loss", "eval_accuracy", "example_weight", "epoch_time", "wall_time")
"""The columns of ``metrics.csv`` (and the keys of a ``metrics.jsonl`` row), in order."""


# The TensorBoard scalar of each column, by row kind: ``tensorboard --logdir <runs>`` shows
# the training curves (means over the steps since the previous train row), the evaluation
# after each epoch, and the epoch's means of the training loss and accuracy.
EVENTS_FOLDER = "tensorboard"
# `seqnorm-jax eval`'s results, one JSON object per evaluation, in the run's folder.
EVAL_FILE = "eval.jsonl"
WANDB_FILE = "wandb.json"
"""The run folder's record of its Weights & Biases run (project and run id), which a
resumed run continues."""
SCALAR_TAGS = {
    "train": {"loss": "train/loss", "accuracy": "train/accuracy", "lr": "train/lr",
              "images_per_sec": "train/images_per_sec"},
    "eval": {"eval_loss": "eval/loss", "eval_accuracy": "eval/accuracy",
             "example_weight": "eval/example_weight", "loss": "epoch/train_loss",
             "accuracy": "epoch/train_accuracy", "epoch_time": "epoch/seconds"},
}

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


class _EventFile:
    """A TensorBoard event file written synchronously, one event per metrics row, with
    tensorboardX's protocol buffers and record writer (no TensorFlow, no writer thread: a
    write error is this process's :class:`RunFileError`, as for the JSONL, and nothing is
    left queued when the run stops). ``purge_step``: TensorBoard hides the events of
    earlier files from that step on (a resumed run)."""

    def __init__(self, folder, purge_step: int | None):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        self._event = Event
        # one file per writer, in the order written (a resume within the same second as
        # the start would otherwise reuse the file name, which has whole seconds)
        self.folder = os.fspath(folder)
        with run_file_errors(self.folder):
            folder.mkdir(parents=True, exist_ok=True)
            self._writer = EventsWriter(os.path.join(self.folder, "events"),
                                        f".{time.time_ns()}")
            if purge_step is not None:
                self._writer.write_event(Event(step=purge_step, wall_time=time.time(),
                                               session_log=SessionLog(status=SessionLog.START)))
            self._writer.flush()

    def add(self, values: dict[str, float], step: int, wall_time: float | None) -> None:
        from tensorboardX.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=tag, simple_value=value)
                                 for tag, value in values.items()])
        with run_file_errors(self.folder):
            self._writer.write_event(self._event(step=step, summary=summary,
                                                 wall_time=wall_time or time.time()))
            self._writer.flush()

    def close(self) -> None:
        with run_file_errors(self.folder):
            self._writer.close()


class _WandbRun:
    """The metric rows' scalars in a Weights & Biases run: the same tags, steps and sink
    interface as :class:`_EventFile`. The run id is kept in the folder's
    :data:`WANDB_FILE`, so a resumed run continues its W&B run (W&B keeps the points the
    interrupted run logged after the checkpoint; it has no purge step). W&B's own files go
    to ``<folder>/wandb/``; entity, mode (``WANDB_MODE=offline``) and key come from its
    ``WANDB_*`` environment variables."""

    def __init__(self, folder, project: str, config: dict[str, Any], resume: bool):
        import wandb

        record = folder / WANDB_FILE
        kept = json.loads(record.read_text()) if resume and record.exists() else {}
        if kept.get("project") != project:
            kept = {"project": project, "id": secrets.token_hex(8)}
            with run_file_errors(os.fspath(record)):
                record.write_text(json.dumps(kept) + "\n")
        try:
            self._run = wandb.init(project=project, id=kept["id"], name=folder.name,
                                   dir=os.fspath(folder), config=config, resume="allow")
        except Exception as err:  # W&B's own errors (no key, no network) have no common base
            raise ValueError(
                f"TrainConfig.wandb_project={project!r}: Weights & Biases could not start "
                f"the run ({type(err).__name__}: {err}); log in (wandb login, WANDB_API_KEY) "
                "or set WANDB_MODE=offline to keep the run on disk.") from err

    def add(self, values: dict[str, float], step: int, wall_time: float | None) -> None:
        self._run.log(values, step=step)

    def close(self) -> None:
        self._run.finish()


class MetricsWriter:
    """Append metric rows to ``<dir>/metrics.jsonl`` and ``<dir>/metrics.csv``, and their
    scalars (:data:`SCALAR_TAGS`) to TensorBoard event files in ``<dir>/tensorboard/``.

    Every row has the columns of :data:`METRIC_COLUMNS` (empty in the CSV where a row
    has no value). ``kind`` is ``"train"`` (a mean over the steps since the previous
    train row) or ``"eval"`` (after an epoch). Event files are written for local folders
    (a ``gs://`` run keeps its JSONL and CSV). On resume the events of the interrupted run
    after ``resume_step`` are hidden from TensorBoard, as its JSONL rows are dropped:
    TensorBoard shows one uninterrupted run.

    Args:
      directory: where the files go (created if needed).
      resume_step: when resuming from a checkpoint at this step, rows logged after it
        by the interrupted run are dropped (and a partial last line), so the files read
        as one uninterrupted run; ``None`` starts fresh files.
      wandb_project: also log the scalars to this Weights & Biases project (the
        ``wandb`` extra), under the same tags and steps as the event files.
      config: the run's configuration, recorded with the W&B run.

    A file deleted (or moved away) while the run writes is written anew at the next row,
    whole: every row of the run so far, as if it had never gone.

    Attributes:
      rows: the rows kept from the interrupted run (floats, as :func:`read_jsonl`).

    Raises:
      RunFileError: a file cannot be written (names it and the cause).
    """

    def __init__(self, directory: str | os.PathLike, *, resume_step: int | None = None,
                 wandb_project: str | None = None, config: dict[str, Any] | None = None):
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
        self._sinks: list[_EventFile | _WandbRun] = []
        if is_local(self.jsonl_path):
            self._sinks.append(_EventFile(folder / EVENTS_FOLDER,
                                          None if resume_step is None else resume_step + 1))
        if wandb_project is not None:
            self._sinks.append(_WandbRun(folder, wandb_project, config or {},
                                         resume=resume_step is not None))

    def write(self, row: dict[str, Any]) -> dict[str, Any]:
        """Append one row (keys among :data:`METRIC_COLUMNS`); returns the cleaned row."""
        unknown = set(row) - set(METRIC_COLUMNS)
        if unknown:
            raise ValueError(f"MetricsWriter.write: unknown column(s) {sorted(unknown)}; "
                             f"columns are {list(METRIC_COLUMNS)}.")
        clean = {k: _clean(v) for k, v in row.items()}
        self._append(self.jsonl_path, _json_line(clean))
        self._append(self.csv_path, _csv_lines(clean))
        self._add_scalars(_restore(clean))
        return row

    def _add_scalars(self, row: dict[str, Any]) -> None:
        """``row`` as :func:`read_jsonl` gives it (plain numbers, non-finite ones as floats)."""
        if not self._sinks or "step" not in row:
            return
        values = {tag: float(row[column])
                  for column, tag in SCALAR_TAGS.get(row.get("kind"), {}).items()
                  if isinstance(row.get(column), (int, float))}
        if values:
            for sink in self._sinks:
                sink.add(values, row["step"], row.get("wall_time"))

    def close(self) -> None:
        """Flush and close the event file and the W&B run (the JSONL and CSV are complete
        after each row)."""
        while self._sinks:
            self._sinks.pop(0).close()

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


def append_eval_rows(run_dir: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Add ``rows`` (``seqnorm-jax eval``'s results) to ``<run_dir>/eval.jsonl``, after the
    earlier evaluations (the file is written whole: local folders and ``gs://`` alike).

    Raises:
      RunFileError: the file cannot be written (names it and the cause).
    """
    path = run_path(run_dir) / EVAL_FILE
    text = "".join(_json_line({k: _clean(v) for k, v in r.items()})
                   for r in [*read_jsonl(path, truncate_partial=True), *rows])
    with open_run_file(path, "wb") as f:
        f.write(text.encode())


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


# ---------------------------------------------------------------------- progress
def progress_bar(iterable: Iterable | None = None, *, total: int | None = None,
                 initial: int = 0, desc: str = "", unit: str = "it", enabled: bool = True,
                 leave: bool = True, file: TextIO | None = None, interval: float = 30.0):
    """A tqdm bar if ``file`` (default ``sys.stderr``) is a terminal, else a
    :class:`LogProgress`; nothing shown if not ``enabled``. Either has ``update``,
    ``set_postfix``, ``write``, ``close`` and iterates over ``iterable``."""
    stream = sys.stderr if file is None else file
    isatty = getattr(stream, "isatty", None)
    if enabled and isatty is not None and isatty():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit,
                    dynamic_ncols=True, leave=leave, file=stream)
    return LogProgress(iterable, total=total, initial=initial, desc=desc, unit=unit,
                       enabled=enabled, file=stream, interval=interval)


class LogProgress:
    """Progress as plain lines: ``<desc>: <n>/<total> <unit>s (<pct>%), <rate> <unit>/s,
    <postfix>`` at most every ``interval`` seconds and when closed; :meth:`write` prints a
    line of its own. ``clock`` is for tests."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None,
                 initial: int = 0, desc: str = "", unit: str = "it", enabled: bool = True,
                 file: TextIO | None = None, interval: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.iterable, self.desc, self.unit, self.enabled = iterable, desc, unit, enabled
        self.total = len(iterable) if total is None and hasattr(iterable, "__len__") else total
        self.n, self.file, self.interval, self.clock = initial, file, interval, clock
        self.postfix = ""
        self._first: tuple[float, int] | None = None    # (time, n) at the first update
        self._last_line = clock()
        self._last_n: int | None = None
        self._closed = False

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        now = self.clock()
        if self._first is None:
            self._first = (now, self.n)
        self.n += n
        if now - self._last_line >= self.interval:
            self._line(now)

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True,
                    **values: Any) -> None:
        """As tqdm's: the ``key=value`` pairs shown after the counts (``refresh`` is
        tqdm's redraw flag; a log line waits for its interval)."""
        values = {**(ordered_dict or {}), **values}
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def write(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.file or sys.stderr, flush=True)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.n != self._last_n:     # not just written by the last update
                self._line(self.clock())

    def _line(self, now: float) -> None:
        self._last_line, self._last_n = now, self.n
        parts = [f"{self.n}/{self.total} {self.unit}s" if self.total else
                 f"{self.n} {self.unit}s"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        if self._first is not None and now > self._first[0] and self.n > self._first[1] + 1:
            # from the end of the first update: its time is mostly compilation
            rate = (self.n - self._first[1] - 1) / (now - self._first[0])
            parts.append(f"{rate:.3g} {self.unit}/s")
        if self.postfix:
            parts.append(self.postfix)
        self.write(f"{self.desc}: " + ", ".join(parts) if self.desc else ", ".join(parts))
