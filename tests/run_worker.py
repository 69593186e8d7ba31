"""A ``seqnorm-jax`` command in a subprocess that pauses at a chosen moment for a signal.

``python tests/run_worker.py MOMENT MARKER -- ARGV...`` runs ``seqnorm_jax.cli.main(ARGV)``
and exits with its status. At ``MOMENT`` it creates the file ``MARKER`` and waits, so the
test can send a signal exactly then (it synchronises on the marker, not on a clock):

* ``step:K``: before the update of global step K+1 (the step in flight when the signal
  arrives), in the first run that reaches it;
* ``save:K``: right after the asynchronous checkpoint save of step K was started (Orbax
  is still writing it in the background);
* ``eval``: at the start of the first evaluation;
* ``load``: at the start of the data load, until the file ``MARKER.go`` appears;
* ``twice:K``: like ``step:K``, then waits for a second signal forever;
* ``run:N:K``: like ``step:K`` in the N-th run (1-based) of a study.

The wait for a signal polls the run's own stop flag, which only the signal sets.
"""

import os
import sys
import time

from seqnorm_jax.train import Checkpointer, Trainer, loop, preempt


def _wait_for_signal(marker: str, count: int = 1) -> None:
    open(marker, "w").close()
    while preempt.requested() is None:  # set by the signal handler
        time.sleep(0.005)
    if count > 1:
        open(marker + ".got1", "w").close()
        while True:  # the second signal ends the process from its handler
            time.sleep(0.005)


def main() -> int:
    moment, marker = sys.argv[1], sys.argv[2]
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
                _wait_for_signal(marker, 2 if kind == "twice" else 1)

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
                _wait_for_signal(marker)

        Checkpointer.save = patched_save
    elif kind == "eval":
        evaluate = Trainer.evaluate

        def patched_evaluate(self, *args, **kwargs):
            if not fired:
                fired.append(True)
                _wait_for_signal(marker)
            return evaluate(self, *args, **kwargs)

        Trainer.evaluate = patched_evaluate
    elif kind == "load":
        load = loop.load_sources

        def patched_load(*args, **kwargs):
            open(marker, "w").close()
            while not os.path.exists(marker + ".go"):
                time.sleep(0.005)
            return load(*args, **kwargs)

        loop.load_sources = patched_load
    else:
        raise SystemExit(f"run_worker: unknown moment {moment!r}")

    from seqnorm_jax.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
