"""The base of the analysis step hooks: compute on the device, fetch to the host in groups."""

from __future__ import annotations

from typing import Any

import jax


class DeviceRecorder:
    """A :class:`~seqnorm_jax.train.Trainer` step hook that keeps results on the device.

    Subclasses compute a result in ``__call__`` and hand it to :meth:`_push`; the results
    are fetched with one ``jax.device_get`` per ``fetch_every`` of them (and after every
    epoch, and whenever :meth:`flush` is called), so recording does not stall each step.
    Each fetched result goes to :meth:`_store`.
    """

    def __init__(self, fetch_every: int = 32):
        self.fetch_every = fetch_every
        self._pending: list[tuple[int, Any]] = []

    def _push(self, step: int, out: Any) -> None:
        self._pending.append((int(step), out))
        if len(self._pending) >= self.fetch_every:
            self.flush()

    def _store(self, step: int, out: Any) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _after_flush(self) -> None:
        """Called at the end of every :meth:`flush` (e.g. to trim a window)."""

    def on_epoch_end(self, state, epoch: int) -> None:
        """Fetch the pending results (the Trainer calls this after each epoch)."""
        del state, epoch
        self.flush()

    def flush(self) -> None:
        """Fetch every pending result to the host and store it."""
        if self._pending:
            pending, self._pending = self._pending, []
            fetched = jax.device_get([out for _, out in pending])
            for (step, _), out in zip(pending, fetched):
                self._store(step, out)
        self._after_flush()
