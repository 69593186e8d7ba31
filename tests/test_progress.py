"""Progress in logs: plain lines, no control codes, a rate that leaves out compilation."""

import io

from seqnorm_jax.train.metrics import LogProgress, progress_bar


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_log_gets_plain_lines_at_most_every_interval():
    out, clock = io.StringIO(), Clock()
    bar = LogProgress(total=100, desc="run", unit="step", file=out, interval=30.0, clock=clock)
    clock.now = 20.0
    bar.update()                 # the first step: 20 s, mostly compilation
    for _ in range(59):          # 59 more steps, 0.5 s each
        clock.now += 0.5
        bar.update()
        if bar.n == 40:
            bar.set_postfix(loss="0.5000")
    bar.write("run epoch 1/2: done")
    bar.close()
    bar.close()                  # a second close writes nothing
    assert out.getvalue().splitlines() == [
        "run: 21/100 steps (21%), 2 step/s",          # at 30 s: 20 steps in 10 s after the first
        "run epoch 1/2: done",
        "run: 60/100 steps (60%), 2 step/s, loss=0.5000",
    ]
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_iterating_counts_and_closes():
    out, clock = io.StringIO(), Clock()
    bar = LogProgress(["a", "b", "c"], desc="study", unit="run", file=out, clock=clock)
    assert list(bar) == ["a", "b", "c"]
    assert out.getvalue() == "study: 3/3 runs (100%)\n"   # no time passed: no rate


def test_progress_bar_is_lines_off_a_terminal_and_silent_when_disabled():
    assert isinstance(progress_bar(total=3, file=io.StringIO()), LogProgress)
    quiet = io.StringIO()
    silent = progress_bar(total=5, enabled=False, file=quiet)
    silent.update(5)
    silent.write("not shown")
    silent.close()
    assert quiet.getvalue() == ""


def test_close_right_after_a_line_adds_none():
    out, clock = io.StringIO(), Clock()
    bar = LogProgress(total=2, desc="study", unit="run", file=out, interval=30.0, clock=clock)
    clock.now = 40.0
    bar.update()
    clock.now = 80.0
    bar.update()                 # the interval has passed: the line of 2/2 is written here
    bar.close()
    assert out.getvalue() == "study: 1/2 runs (50%)\nstudy: 2/2 runs (100%), 0.025 run/s\n"
