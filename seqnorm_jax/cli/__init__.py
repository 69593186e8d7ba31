"""The ``seqnorm-jax`` command line: ``train``, ``eval``, ``compare``, ``tune`` and ``experiment``.

``seqnorm-jax --help`` lists the commands with examples; ``seqnorm-jax COMMAND --help``
lists a command's flags with their defaults. Every field of
:class:`~seqnorm_jax.train.TrainConfig` is a flag (``--batch-size``,
``--norm-weight-decay``, ...); ``--config FILE`` loads a JSON config first and the flags
given override it. ``python -m seqnorm_jax`` is the same command.

Exit status: 0 done; 2 an ``error:`` message on stderr -- invalid flags, configurations
or norm specs (checked before any training), a missing dataset, a run folder in use by
another run or holding an earlier run (without ``--resume`` or ``--overwrite``), a resume
whose config differs, or a file that cannot be written (``error: <path>: <cause>``; the
last checkpoint written stays usable); 3 a training run diverged (``diverged at step N
(loss nan)`` on stderr; the last finite state is checkpointed), or every candidate of a
``tune`` stage diverged; 75 preempted: SIGTERM or SIGINT stopped ``train``, ``compare``, ``tune`` or
``experiment`` after the step in flight with its state checkpointed (``preempted at step
N; resume with --resume``), a second signal ends the process at once with 128 + the
signal's number (143, 130); 130 interrupted (Ctrl-C in another command).
``--traceback`` shows the Python traceback instead.

Layout: :mod:`~seqnorm_jax.cli.parser` builds the parser (flags, help, defaults) and
parses flag values; :mod:`~seqnorm_jax.cli.commands` runs each command; this module
runs a command and turns its errors into the ``error:`` message and the exit status.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from seqnorm_jax._extras import MissingExtraError, lazy_exports, require_train

__all__ = ["COMPARE_DEFAULTS", "DIVERGED", "PREEMPTED", "build_parser", "error_text", "main",
           "parse_groups", "parse_norms", "parse_seeds"]


STOPPABLE = ("train", "compare", "tune", "experiment")

# The parser's and the commands' names, imported when first used: importing this package
# (the console script does) needs nothing of the training extra until a command runs, so
# that a missing extra ends in ``main``'s one-line error.
if TYPE_CHECKING:
    from seqnorm_jax.cli.commands import DIVERGED, PREEMPTED
    from seqnorm_jax.cli.parser import (
        COMPARE_DEFAULTS,
        build_parser,
        parse_groups,
        parse_norms,
        parse_seeds,
    )

__getattr__, __dir__ = lazy_exports(__name__, __file__)


def error_text(err: BaseException) -> str:
    """An exception's message for the ``error:`` line: blank lines and trailing spaces
    dropped, line breaks kept (numbered lists, "Tried:" sections stay one item a line)."""
    text = str(err) or type(err).__name__
    return "\n".join(ln.rstrip() for ln in text.strip().splitlines() if ln.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    try:
        require_train("the seqnorm-jax command")
    except MissingExtraError as err:
        print(f"seqnorm-jax: error: {err}", file=sys.stderr)
        return 2
    # the parser and the config it reads import no jax: --help answers at once
    from seqnorm_jax.cli.parser import build_parser

    parser = build_parser()
    args = parser.parse_args(argv)
    from seqnorm_jax.cli.commands import COMMANDS
    try:
        from absl import logging as absl_logging

        # TFDS's notes about absent folders; Orbax's logs of a failed background write
        # (the failure is reported once, as this command's error line)
        absl_logging.set_verbosity(absl_logging.FATAL)
    except ImportError:  # pragma: no cover - absl comes with jax's dependencies
        pass
    from seqnorm_jax.data import DatasetNotFoundError
    from seqnorm_jax.train.files import PREEMPTED, Preempted, stop_on_signals

    try:
        if args.command in STOPPABLE:  # SIGTERM/SIGINT: stop at a step, checkpointed
            with stop_on_signals():
                return COMMANDS[args.command](args)
        return COMMANDS[args.command](args)
    except Preempted as err:
        print(f"seqnorm-jax {args.command}: {err}", file=sys.stderr)
        return PREEMPTED
    except (ValueError, DatasetNotFoundError, FileNotFoundError, MissingExtraError) as err:
        if args.traceback:
            raise
        print(f"seqnorm-jax {args.command}: error: {error_text(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # a file or folder of the run cannot be written
        if args.traceback:
            raise
        text = (f"{err.filename}: {err.strerror}" if getattr(err, "filename", None)
                and err.strerror else error_text(err))
        print(f"seqnorm-jax {args.command}: error: {text}", file=sys.stderr)
        _exit_if_stuck(2)
        return 2
    except KeyboardInterrupt:
        print(f"seqnorm-jax {args.command}: interrupted", file=sys.stderr)
        return 130


def _exit_if_stuck(code: int) -> None:
    """End the process now if a write fault left non-daemon threads behind (Orbax's
    background writers), which would otherwise keep the interpreter from exiting."""
    stuck = [t for t in threading.enumerate()
             if t is not threading.main_thread() and t.is_alive() and not t.daemon]
    if stuck:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
