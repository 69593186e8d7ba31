"""Cases of ``tests/test_multistep.py`` run in a child process under XLA's default compiler
flags: ``Trainer(steps_per_call=n)`` gives the run of ``steps_per_call=1`` bit for bit.

The test session's ``conftest.py`` compiles with LLVM at optimization level 0 and XLA:CPU's
classic emitters (a fifth of the compile time); under those flags a ``lax.scan`` body is
not compiled like the lone step and the last bits differ (~1e-5 after 16 steps of an MLP).
The bit-identity is a property of the compiler setting runs use, XLA's default, so
``test_multistep.py`` runs this file with it. Not collected by the normal session.
"""

import jax
import numpy as np

from seqnorm_jax.analysis import StatisticsRecorder
from seqnorm_jax.train import TrainConfig, Trainer


def _config(**changes):
    base = dict(model="mlp", model_kwargs={"features": [16, 16]}, norm="bn", dataset="digits",
                epochs=2, batch_size=4, eval_batch_size=128, lr=0.05, momentum=0.9,
                weight_decay=5e-4, log_every=22, progress=False, seed=5)
    base.update(changes)
    return TrainConfig(**base)


def _counted(trainer):
    """Wrap the trainer's compiled calls to log how many steps each call takes."""
    calls = []
    one, many = trainer.loop_step, trainer.loop_steps

    def loop_step(state, batch, acc):
        calls.append((int(state.step), 1))
        return one(state, batch, acc)

    def loop_steps(state, batches, acc):
        calls.append((int(state.step), int(batches["label"].shape[0])))
        return many(state, batches, acc)

    trainer.loop_step = loop_step
    if many is not None:
        trainer.loop_steps = loop_steps
    return calls


def _fit(config, steps_per_call, last_steps=23, **kwargs):
    probe = Trainer(config, save_checkpoints=False)
    rec = StatisticsRecorder(last_steps=last_steps, total_steps=probe.total_steps, fetch_every=7)
    trainer = Trainer(config, save_checkpoints=False, step_hooks=[rec],
                      steps_per_call=steps_per_call, **kwargs)
    calls = _counted(trainer)
    return trainer, trainer.fit(), rec, calls


def _assert_same_run(a, b):
    leaves_a = jax.tree_util.tree_leaves(jax.device_get((a.state.params, a.state.opt_state,
                                                         a.state.batch_stats, a.state.step)))
    leaves_b = jax.tree_util.tree_leaves(jax.device_get((b.state.params, b.state.opt_state,
                                                         b.state.batch_stats, b.state.step)))
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bit for bit
    drop = ("wall_time", "images_per_sec", "epoch_time")
    rows = lambda r: [{k: v for k, v in row.items() if k not in drop} for row in r]
    assert rows(a.train_rows) == rows(b.train_rows)
    assert rows(a.eval_rows) == rows(b.eval_rows)
    assert a.diverged == b.diverged


def test_steps_per_call_is_bit_identical_with_the_fluctuation_recording():
    cfg = _config()
    t1, one, rec1, calls1 = _fit(cfg, 1)
    t16, many, rec16, calls16 = _fit(cfg, 16)
    total = t1.total_steps
    assert total == 2 * t1.steps_per_epoch and t1.steps_per_epoch % 22 != 0
    _assert_same_run(one, many)
    # the recorder saw the same last 23 steps with the same statistics, bit for bit
    assert rec1.steps == rec16.steps == list(range(total - 23, total))
    d1, d16 = rec1.data, rec16.data
    assert list(d1) == list(d16) and len(d1) == 2
    for path in d1:
        for k in d1[path]:
            np.testing.assert_array_equal(d1[path][k], d16[path][k])
    assert rec1.summary() == rec16.summary()
    # one step per call without steps_per_call; with 16, chunks of powers of two that end at
    # every metrics row (step % 22) and epoch end, and single steps in the recorded window
    assert calls1 == [(s, 1) for s in range(total)]
    assert sum(n for _, n in calls16) == total
    assert [s for s, _ in calls16] == list(np.cumsum([0] + [n for _, n in calls16])[:-1])
    spe = t16.steps_per_epoch
    for start, n in calls16:
        assert n in (1, 2, 4, 8, 16)
        end = start + n
        assert start // 22 == (end - 1) // 22 and start // spe == (end - 1) // spe
        if end > total - 23:
            assert n == 1
    assert calls16[:3] == [(0, 16), (16, 4), (20, 2)]  # log_every=22 cuts 16 + 16 to 16 + 4 + 2
    assert len(calls16) < total / 3


def test_steps_per_call_with_max_steps_and_a_hook_without_records_and_divergence():
    cfg = _config(epochs=1, log_every=50)

    class EveryStep:
        def __init__(self):
            self.steps = []

        def __call__(self, state, batch, step):
            self.steps.append(step)

    hook = EveryStep()
    t = Trainer(cfg, save_checkpoints=False, step_hooks=[hook], steps_per_call=32, max_steps=37)
    calls = _counted(t)
    t.fit()
    assert hook.steps == list(range(37)) and calls == [(s, 1) for s in range(37)]
    # stopped at max_steps: chunks end there, and the state is the one-step loop's
    one = Trainer(cfg, save_checkpoints=False, max_steps=37).fit()
    t = Trainer(cfg, save_checkpoints=False, steps_per_call=32, max_steps=37)
    calls = _counted(t)
    _assert_same_run(one, t.fit())
    assert calls == [(0, 32), (32, 4), (36, 1)]
    # a run that diverges inside a chunk stops at the same step with the same state
    bad = _config(epochs=1, lr=1e6, momentum=0.0, norm="none", log_every=50)
    a = Trainer(bad, save_checkpoints=False).fit()
    b = Trainer(bad, save_checkpoints=False, steps_per_call=32).fit()
    assert a.diverged is not None and a.diverged["step"] < 32
    _assert_same_run(a, b)
