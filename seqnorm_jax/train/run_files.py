"""The files of a run folder: where they live, ``config.json``, and what a resume may change.

Paths are :func:`~seqnorm_jax.train.paths.run_path` s, so ``gs://bucket/run`` works as
a run folder. In a multi-process run only process 0 writes the run's
files (:func:`is_writer`); every process reads them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from typing import Any

import jax

from seqnorm_jax.train.config import RESUME_SAFE_FIELDS, TrainConfig, config_changes
from seqnorm_jax.train.metrics import RunFileError
from seqnorm_jax.train.paths import run_path

__all__ = ["RUN_FILES", "RunFolderUsedError", "check_resume_config", "claim_run_folder",
           "is_writer", "write_config"]

CONFIG_NAME = "config.json"
# What a training run writes into its folder (a study's run record included): a folder
# holding any of them holds a run.
RUN_FILES = (CONFIG_NAME, "metrics.jsonl", "metrics.csv", "tensorboard", "checkpoints",
             "checkpoints.damaged", "eval.jsonl", "record.json")


class RunFolderUsedError(ValueError):
    """A run folder holds an earlier run, and neither resume nor overwrite was asked for."""


def is_writer() -> bool:
    """Whether this process writes the run's files (process 0 of a multi-process run)."""
    return jax.process_index() == 0


def write_config(out_dir: str | os.PathLike, config: TrainConfig) -> None:
    """Write ``out_dir/config.json``.

    Raises:
      RunFileError: it cannot be written (names the file and the cause).
    """
    path = run_path(out_dir) / CONFIG_NAME
    try:
        path.write_text(config.to_json())
    except OSError as e:
        raise RunFileError(os.fspath(path), e.strerror or str(e)) from e


def claim_run_folder(directory: str | os.PathLike, flag: str = "out_dir", *, resume: bool,
                     overwrite: bool, files: Iterable[str] = RUN_FILES,
                     marks: Iterable[str] | None = None) -> list[str]:
    """Make ``directory`` ready for a new run: refuse it if it holds an earlier one.

    A folder holding any of ``marks`` (default: ``files``) is used. A used folder is
    refused unless ``resume`` (the run continues it) or ``overwrite`` (``files`` are
    deleted first; nothing else in the folder is touched). Call it with the folder's
    lock held.

    Returns:
      The names of ``marks`` present.

    Raises:
      RunFolderUsedError: a used folder without ``resume`` or ``overwrite`` (the message
        names what it holds and the ways on).
      ValueError: ``resume`` and ``overwrite`` together.
    """
    if resume and overwrite:
        raise ValueError(f"{flag}: --resume continues the run in the folder and --overwrite "
                         "deletes it; give one of them.")
    folder = run_path(directory)
    files = tuple(files)
    present = [name for name in (files if marks is None else marks) if (folder / name).exists()]
    if not present or resume:
        return present
    if not overwrite:
        raise RunFolderUsedError(
            f"{flag} {os.fspath(directory)!r} holds an earlier run ({', '.join(present)}); "
            "continue it with --resume, replace it with --overwrite, or choose another "
            "folder.")
    for path in (folder / name for name in files):
        if not path.exists():
            continue
        try:
            path.rmtree() if path.is_dir() else path.unlink()
        except OSError as e:
            raise RunFileError(os.fspath(path), f"cannot delete it for --overwrite "
                                                f"({e.strerror or e})") from e
    return present


def check_resume_config(out_dir: str | os.PathLike, config: TrainConfig,
                        allow_changes: Iterable[str]) -> None:
    """Refuse to resume ``out_dir`` with a config that differs from its saved one.

    Fields of :data:`~seqnorm_jax.train.config.RESUME_SAFE_FIELDS` and those named in
    ``allow_changes`` may differ; a run without a saved config passes.

    Raises:
      ValueError: an unknown field in ``allow_changes``, an unreadable saved config, or
        a refused change (the message lists the changes and the ways on).
    """
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    allow_changes = tuple(allow_changes)
    unknown = sorted(set(allow_changes) - names)
    if unknown:
        raise ValueError(f"allow_changes: unknown TrainConfig field(s) {unknown}; valid "
                         f"fields are {sorted(names)}.")
    path = run_path(out_dir) / CONFIG_NAME
    if not path.exists():
        return
    try:
        saved: Any = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the saved config ({e}); repair it or "
                         "start a new --out.") from None
    changes = config_changes(saved, config.to_dict())
    refused = {k: v for k, v in changes.items()
               if k not in RESUME_SAFE_FIELDS and k not in allow_changes}
    if refused:
        listed = ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in refused.items())
        raise ValueError(
            f"resume: the config differs from the run's saved {path} in {listed}; resume "
            f"with the saved config, start a new --out, or accept the change with "
            f"--allow-change {','.join(refused)} (freely changeable: "
            f"{', '.join(RESUME_SAFE_FIELDS)}).")
