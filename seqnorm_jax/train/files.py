"""A run's folder: its paths, its one writer, the files that mark it, and stop signals.

Paths are :func:`run_path` s (``etils.epath``, what Orbax uses), so ``gs://bucket/run``
works as a run folder; a local path is made absolute. In a multi-process run only
process 0 writes the run's files (:func:`is_writer`); every process reads them.

One writer per run folder: an exclusive ``fcntl.flock`` on ``<folder>/run.lock``
(:func:`run_lock`). A run (``Trainer.fit`` with an ``out_dir``, ``compare``, ``tune``,
``experiment``) takes the lock of its folder before it writes anything there and holds
it until it ends; a second process that asks for the same folder is refused with
:class:`RunLockedError`, which names the holder (pid, host and start time, written into
the lock file). The operating system releases a ``flock`` when its process ends, however
it ends (``SIGKILL`` included), so a lock file left behind by a dead run is never a stale
lock. Locks are re-entrant within one process (a ``compare`` holds its folder while its
``Trainer`` runs lock their own sub-folders). Network file systems that do not implement
``flock`` across hosts cannot enforce the rule; URLs (``gs://bucket/run``) have no lock.

Preemption: schedulers (Slurm, Kubernetes, cloud TPU/GPU preemption) end a job with
``SIGTERM`` and a grace period; a user ends it with Ctrl-C (``SIGINT``). While a run
holds :func:`stop_on_signals`, the first of these signals only sets a flag: the training
loop finishes the step in flight, writes the metrics and a checkpoint of that step,
waits (bounded) for Orbax to commit it and raises :class:`Preempted`; the command line
prints ``preempted at step N; resume with --resume`` and exits with :data:`PREEMPTED`
(75, ``EX_TEMPFAIL``). A second signal ends the process at once with status
``128 + signal`` (143 for SIGTERM, 130 for SIGINT). The handlers are installed only from
the main thread (Python's rule) and only by the outermost :func:`stop_on_signals`.

Nothing here imports jax: the command line's parser and the config use these names.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator

from etils import epath

__all__ = ["CONFIG_NAME", "LOCK_NAME", "PREEMPTED", "RUN_FILES", "Preempted", "RunFileError",
           "RunFolderUsedError", "RunLockedError", "check_out_dir", "claim_run_folder",
           "is_local", "is_writer", "open_run_file", "raise_if_requested", "requested",
           "run_file_errors", "run_lock", "run_path", "stop_on_signals"]

# the name of a run's saved config (TrainConfig.to_json) in its folder
CONFIG_NAME = "config.json"
# What a training run writes into its folder (a study's run record included): a folder
# holding any of them holds a run.
RUN_FILES = (CONFIG_NAME, "metrics.jsonl", "metrics.csv", "tensorboard", "checkpoints",
             "checkpoints.damaged", "eval.jsonl", "record.json", "wandb", "wandb.json")


# ----------------------------------------------------------------------------- paths
def is_local(path: str | os.PathLike) -> bool:
    """True for a path on this machine's file system (not a URL like ``gs://...``)."""
    return "://" not in os.fspath(path)


def run_path(path: str | os.PathLike) -> epath.Path:
    """``path`` as an ``epath.Path``: absolute if local, unchanged if a URL."""
    text = os.fspath(path)
    return epath.Path(os.path.abspath(text) if is_local(text) else text)


def is_writer() -> bool:
    """Whether this process writes the run's files (process 0 of a multi-process run)."""
    import jax  # only when asked: the parser and the config never are

    return jax.process_index() == 0


# ------------------------------------------------------------------------ file errors
class RunFileError(OSError):
    """A run's output file or folder cannot be written; ``str()`` is ``"<path>: <cause>"``."""

    def __init__(self, path: str, cause: str):
        super().__init__(f"{path}: {cause}")
        self.path, self.cause = path, cause


@contextlib.contextmanager
def run_file_errors(path: str | os.PathLike):
    """Turn any ``OSError`` inside into :class:`RunFileError` naming ``path`` (one error
    line at the CLI)."""
    try:
        yield
    except RunFileError:
        raise
    except OSError as e:
        raise RunFileError(os.fspath(path), e.strerror or str(e)) from e


@contextlib.contextmanager
def open_run_file(path: str | os.PathLike, mode: str):
    """``path`` opened (a local path or a URL, :func:`run_path`),
    with any ``OSError`` of opening, writing or closing turned into :class:`RunFileError`."""
    with run_file_errors(path), run_path(path).open(mode) as f:
        yield f


# ------------------------------------------------------------------------ run folder
class RunFolderUsedError(ValueError):
    """A run folder holds an earlier run, and neither resume nor overwrite was asked for."""


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


# --------------------------------------------------------------------- one writer
LOCK_NAME = "run.lock"

_held: dict[str, tuple[int, int]] = {}  # realpath of the lock file -> (fd, depth)
_lock_guard = threading.Lock()


class RunLockedError(ValueError):
    """Another process is writing into the run folder."""


def check_out_dir(directory: str | os.PathLike, flag: str = "out_dir", *,
                  create: bool = True) -> str:
    """Check that ``directory`` is (or can become) a writable folder; create it if ``create``.

    Without ``create`` nothing is written: the nearest existing ancestor must be a
    writable folder.

    Raises:
      ValueError: ``directory`` is empty, or it (or one of its parents) is a file, or it
        cannot be created or written; the message names ``flag``, the path and the cause.
    """
    shown = os.fspath(directory)
    if not shown.strip():
        raise ValueError(f"{flag} is empty ({shown!r}); give a folder path, e.g. runs/my_run.")
    if not is_local(shown):  # a URL (gs://...): nothing to check before writing
        remote = run_path(shown)
        if remote.exists() and not remote.is_dir():
            raise ValueError(f"{flag} {shown!r} is a file, not a folder; choose a folder path.")
        if create:
            remote.mkdir(parents=True, exist_ok=True)
        return os.fspath(remote)
    path = os.fspath(run_path(shown))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {shown!r} is a file, not a folder; choose a folder path "
                         "(it is created if missing).")
    if not create:
        parent = path
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise ValueError(f"{flag} {shown!r}: {parent} is a file, not a folder; choose "
                             "another path.")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(f"{flag} {shown!r}: {parent} is not writable; choose a writable "
                             "location.")
        return path
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag} {os.fspath(directory)!r} cannot be created "
                         f"({e.strerror or e}); choose a writable location.") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {os.fspath(directory)!r} is not writable; choose a writable "
                         "location.")
    return path


@contextlib.contextmanager
def run_lock(directory: str | os.PathLike, flag: str = "out_dir") -> Iterator[str | None]:
    """Hold the exclusive lock of run folder ``directory`` (created if needed) in the block.

    A folder this call created that holds nothing but the lock file when the lock is
    released (a run refused before it wrote anything) is removed again.

    Yields:
      The lock file's path (``None`` for a URL such as ``gs://bucket/run``: no lock).

    Raises:
      RunLockedError: another process holds the lock (the message names it).
      ValueError: the folder is a file or cannot be written (see :func:`check_out_dir`).
    """
    created = is_local(os.fspath(directory)) and not os.path.exists(run_path(directory))
    folder = check_out_dir(directory, flag)
    if not is_local(folder):  # object stores have no flock: one writer is the user's rule
        yield None
        return
    path = os.path.join(os.path.realpath(folder), LOCK_NAME)
    with _lock_guard:
        if path in _held:
            fd, depth = _held[path]
            _held[path] = (fd, depth + 1)
        else:
            _held[path] = (_acquire(path, os.fspath(directory), flag), 1)
    try:
        yield path
    finally:
        with _lock_guard:
            fd, depth = _held[path]
            if depth > 1:
                _held[path] = (fd, depth - 1)
            else:
                del _held[path]
                if created:
                    _remove_if_unused(folder, path)
                os.close(fd)  # closing the descriptor releases the flock


def _remove_if_unused(folder: str, lock_path: str) -> None:
    try:
        if os.listdir(folder) == [LOCK_NAME]:
            os.remove(lock_path)
            os.rmdir(folder)
    except OSError:
        pass  # only tidying: an error that ended the run is the one to report


def _acquire(path: str, shown: str, flag: str) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ValueError(f"{flag} {shown!r}: cannot create the lock file {path} "
                         f"({e.strerror or e}); choose a writable location.") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = ""
        try:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip()
        finally:
            os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ValueError(f"{flag} {shown!r}: cannot lock {path} ({e.strerror or e}).") \
                from None
        raise RunLockedError(
            f"{flag} {shown!r} is in use by another run ({holder or 'holder unknown'}); wait "
            f"for it to end or choose another folder.") from None
    line = (f"pid {os.getpid()} on host {socket.gethostname()} since "
            f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, line, 0)
    return fd


# ------------------------------------------------------------------------- signals
PREEMPTED = 75  # the exit status of a preempted command (sysexits.h EX_TEMPFAIL)
"""The exit status of a preempted command, 75 (``EX_TEMPFAIL``: try again with
``--resume``)."""
SIGNALS = (signal.SIGTERM, signal.SIGINT)

_state: dict = {"depth": 0, "signal": None, "previous": {}}
_signals_guard = threading.Lock()


class Preempted(Exception):
    """A run stopped on SIGTERM or SIGINT; its state at ``step`` is checkpointed.

    Attributes:
      step: the global step of the checkpointed state (``None``: stopped between runs).
      signal_name: ``"SIGTERM"`` or ``"SIGINT"``.
      where: the run of a study that stopped (``"bn seed 1"``), or ``None``.
    """

    def __init__(self, step: int | None, signal_name: str, where: str | None = None):
        super().__init__(step, signal_name, where)
        self.step, self.signal_name, self.where = step, signal_name, where

    def __str__(self) -> str:
        at = "before its next run" if self.step is None else f"at step {self.step}"
        run = f" (run {self.where})" if self.where else ""
        return f"preempted {at}{run}; resume with --resume"


def requested() -> str | None:
    """The name of the signal that asked the run to stop (``None``: none arrived)."""
    sig = _state["signal"]
    return None if sig is None else signal.Signals(sig).name


def raise_if_requested(step: int | None, where: str | None = None) -> None:
    """Raise :class:`Preempted` at ``step`` if a stop signal arrived."""
    name = requested()
    if name is not None:
        raise Preempted(step, name, where)


def _handle(signum, frame) -> None:
    if _state["signal"] is not None:  # the second signal: no more waiting
        try:
            os.write(2, f"{signal.Signals(signum).name} again: exiting at once\n".encode())
        finally:
            os._exit(128 + signum)
    _state["signal"] = signum
    try:
        os.write(2, f"{signal.Signals(signum).name}: stopping after the current step "
                    "(checkpoint and metrics written first; send it again to exit at "
                    "once)\n".encode())
    except OSError:  # pragma: no cover - stderr closed
        pass


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into a stop request in the block (see the module docstring).

    Re-entrant: only the outermost block installs the handlers and clears the request
    when it ends. Outside the main thread it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with _signals_guard:
        outer = _state["depth"] == 0
        _state["depth"] += 1
        if outer:
            _state["signal"] = None
            _state["previous"] = {s: signal.signal(s, _handle) for s in SIGNALS}
    try:
        yield
    finally:
        with _signals_guard:
            _state["depth"] -= 1
            if _state["depth"] == 0:
                for s, previous in _state["previous"].items():
                    signal.signal(s, previous)
                _state["previous"] = {}
                _state["signal"] = None
        sys.stderr.flush()
