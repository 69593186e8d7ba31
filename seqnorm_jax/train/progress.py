"""Progress of long work: a tqdm bar on a terminal, plain lines in a log.

tqdm redraws its bar with carriage returns and cursor moves, which a log file (stderr
redirected, a batch job, CI) keeps as control codes, one redraw after another, and nested
bars (a study's runs, each run's steps) interleave there. :func:`progress_bar` gives the
bar only when its stream is a terminal; otherwise a :class:`LogProgress` with the same
methods writes one plain line at most every ``interval`` seconds and one at the end. Its
rate counts from the first update, so the compilation before the first step does not
drag it down.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO

__all__ = ["LogProgress", "progress_bar"]


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
