"""One writer per run folder: an exclusive ``fcntl.flock`` on ``<folder>/run.lock``.

A run (``Trainer.fit`` with an ``out_dir``, ``compare``, ``tune``, ``experiment``) takes
the lock of its folder before it writes anything there and holds it until it ends; a
second process that asks for the same folder is refused with :class:`RunLockedError`,
which names the holder (pid, host and start time, written into the lock file).

The operating system releases a ``flock`` when its process ends, however it ends
(``SIGKILL`` included), so a lock file left behind by a dead run is never a stale lock:
the next run takes it and overwrites the holder line. Locks are re-entrant within one
process (a ``compare`` holds its folder while its ``Trainer`` runs lock their own
sub-folders; a ``Trainer`` inside a locked CLI call re-takes the same lock).

Network file systems that do not implement ``flock`` across hosts cannot enforce the
rule; the lock then only protects against runs on the same host. Run folders that are
URLs (``gs://bucket/run``) have no lock at all.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import threading
import time
from collections.abc import Iterator

from seqnorm_jax.train.paths import is_local, run_path

__all__ = ["LOCK_NAME", "RunLockedError", "check_out_dir", "run_lock"]

LOCK_NAME = "run.lock"

_held: dict[str, tuple[int, int]] = {}  # realpath of the lock file -> (fd, depth)
_guard = threading.Lock()


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
    with _guard:
        if path in _held:
            fd, depth = _held[path]
            _held[path] = (fd, depth + 1)
        else:
            _held[path] = (_acquire(path, os.fspath(directory), flag), 1)
    try:
        yield path
    finally:
        with _guard:
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
