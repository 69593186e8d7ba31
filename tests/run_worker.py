"""A ``seqnorm-jax`` command in a subprocess that pauses at a chosen moment for a signal.

``python tests/run_worker.py MOMENT -- ARGV...`` runs ``seqnorm_jax.cli.main(ARGV)`` and
exits with its status. At ``MOMENT`` it prints ``ready`` on stdout and waits, so the test
can send a signal exactly then (it synchronises on that line, not on a clock):

* ``step:K``: before the update of global step K+1 (the step in flight when the signal
  arrives), in the first run that reaches it;
* ``save:K``: right after the asynchronous checkpoint save of step K was started (Orbax
  is still writing it in the background);
* ``eval``: at the start of the first evaluation;
* ``load``: at the start of the data load, until a line arrives on stdin;
* ``fill:K:PATH``: before the checkpoint save of step K (the earlier ones committed),
  fills the file system of ``PATH`` with the file ``PATH``; ``enospc:K``: makes that
  save's write call fail with ``ENOSPC`` instead;
* ``twice:K``: like ``step:K``, then prints ``got one`` and waits for a second signal;
* ``run:N:K``: like ``step:K`` in the N-th run (1-based) of a study.

The wait for a signal polls the run's own stop flag, which only the signal sets.
"""

import errno
import os
import sys
import time

from seqnorm_jax.train import Checkpointer, Trainer, files, loop


def _say(text: str) -> None:
    print(text, flush=True)


def _wait_for_signal(count: int = 1) -> None:
    _say("ready")
    while files.requested() is None:  # set by the signal handler
        time.sleep(0.005)
    if count > 1:
        _say("got one")
        while True:  # the second signal ends the process from its handler
            time.sleep(0.005)


def _fill(path: str) -> None:
    """Write zeros to ``path`` until its file system is full."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise


def main() -> int:
    moment = sys.argv[1]
    argv = sys.argv[sys.argv.index("--") + 1:]
    kind, _, arg = moment.partition(":")
    fired = []

    if kind in ("step", "twice", "run"):
        run_index, _, k = arg.rpartition(":")
        target_run, target_step = int(run_index or 1), int(k)
        runs = []
        init = Trainer.__init__

        def hook(state, batch, step):
            if step == target_step and len(runs) == target_run and not fired:
                fired.append(step)
                _wait_for_signal(2 if kind == "twice" else 1)

        def patched_init(self, *args, **kwargs):
            init(self, *args, **kwargs)
            self.step_hooks.append(hook)

        fit = Trainer.fit

        def patched_fit(self, *args, **kwargs):
            runs.append(self)
            return fit(self, *args, **kwargs)

        Trainer.__init__ = patched_init
        Trainer.fit = patched_fit
    elif kind == "save":
        save = Checkpointer.save

        def patched_save(self, state, position):
            save(self, state, position)
            if int(state.step) == int(arg) and not fired:
                fired.append(arg)
                _wait_for_signal()

        Checkpointer.save = patched_save
    elif kind in ("fill", "enospc"):
        step, _, path = arg.partition(":")
        save = Checkpointer.save

        def patched_save(self, state, position):
            if int(state.step) == int(step) and not fired:
                fired.append(step)
                self.wait()  # the earlier checkpoints are committed; then the disk is full
                if kind == "fill":
                    _fill(path)
                else:  # no small file system here: the write call fails as on a full disk
                    def full(*args, **kwargs):
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.directory)
                    self.manager.save = full
            save(self, state, position)

        Checkpointer.save = patched_save
    elif kind == "eval":
        evaluate = Trainer.evaluate

        def patched_evaluate(self, *args, **kwargs):
            if not fired:
                fired.append(True)
                _wait_for_signal()
            return evaluate(self, *args, **kwargs)

        Trainer.evaluate = patched_evaluate
    elif kind == "load":
        load = loop.load_sources

        def patched_load(*args, **kwargs):
            _say("ready")
            sys.stdin.readline()
            return load(*args, **kwargs)

        loop.load_sources = patched_load
    else:
        raise SystemExit(f"run_worker: unknown moment {moment!r}")

    from seqnorm_jax.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
