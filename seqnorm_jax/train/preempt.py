"""Preemption: SIGTERM and SIGINT stop a run at a step boundary with its state checkpointed.

Schedulers (Slurm, Kubernetes, cloud TPU/GPU preemption) end a job with ``SIGTERM`` and a
grace period; a user ends it with Ctrl-C (``SIGINT``). While a run holds
:func:`stop_on_signals` (``Trainer.fit`` with an ``out_dir``, and the ``train``,
``compare``, ``tune`` and ``experiment`` commands), the first of these signals only sets
a flag: the training loop finishes the step in flight, writes the metrics and a
checkpoint of that step, waits (bounded) for Orbax to commit it and raises
:class:`Preempted`; the command line prints ``preempted at step N; resume with
--resume`` and exits with :data:`PREEMPTED` (75, ``EX_TEMPFAIL``: try again). A second
signal ends the process at once with status ``128 + signal`` (143 for SIGTERM, 130 for
SIGINT), without waiting for anything.

The handlers are installed only from the main thread (Python's rule) and only by the
outermost :func:`stop_on_signals`; the previous handlers come back when it ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

__all__ = ["PREEMPTED", "Preempted", "raise_if_requested", "requested", "stop_on_signals"]

PREEMPTED = 75  # the exit status of a preempted command (sysexits.h EX_TEMPFAIL)
SIGNALS = (signal.SIGTERM, signal.SIGINT)

_state: dict = {"depth": 0, "signal": None, "previous": {}}
_guard = threading.Lock()


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
    with _guard:
        outer = _state["depth"] == 0
        _state["depth"] += 1
        if outer:
            _state["signal"] = None
            _state["previous"] = {s: signal.signal(s, _handle) for s in SIGNALS}
    try:
        yield
    finally:
        with _guard:
            _state["depth"] -= 1
            if _state["depth"] == 0:
                for s, previous in _state["previous"].items():
                    signal.signal(s, previous)
                _state["previous"] = {}
                _state["signal"] = None
        sys.stderr.flush()
