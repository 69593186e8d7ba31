"""The paper table of ``seqnorm-jax plan --paper-table`` from a compile cache (no compiler:
every step is cached, so nothing compiles): the arithmetic of its rows, the order of its
topologies, and when a cached step is served (lowering and compiling are stood in for)."""

import json
import os
from types import SimpleNamespace

import pytest

from seqnorm_jax.studies.experiment import load_experiment
from seqnorm_jax.train import plan_table as plan

GIB = 2 ** 30


def _record(step_seconds, total, fits=True):
    return {"step_seconds": step_seconds,
            "memory": {"total": total, "hbm": 16 * GIB, "fits": fits}}


def test_table_row_from_cached_steps(tmp_path):
    exp = load_experiment("003_fluctuation_mlp4").resolve("full")
    configs = [c for _, c in exp.configs()]            # batches 128, 4, 128, 4 on MNIST
    topology = plan.table_topology(configs)
    assert topology == "v5e:1x1"                        # batch 4 does not split over 8
    seconds = [1e-3, 2e-3, 3e-3, 4e-3]
    for c, s in zip(configs, seconds):
        key = plan.step_key(c, topology, exp.image_shape)
        with open(os.path.join(tmp_path, key + ".json"), "w") as f:
            json.dump({"code": plan.code_fingerprint(), "program": "p",
                       "step": _record(s, int(0.5 * GIB) if s < 4e-3 else 2 * GIB)}, f)
    out = tmp_path / "table.md"
    text = plan.plan_table(["003_fluctuation_mlp4"], str(tmp_path), out=str(out))
    assert out.read_text() == text
    row = text.splitlines()[2].split(" | ")
    steps = [60_000 // c.batch_size * c.epochs for c in configs]
    wall = sum(s * n for s, n in zip(seconds, steps)) * len(exp.seeds)
    assert wall == pytest.approx(3 * 20 * (468e-3 + 15000 * 2e-3 + 468 * 3e-3 + 15000 * 4e-3))
    assert row[1:4] == ["v5e:1x1", "4 of 4", "1.000 ms - 4.000 ms"]
    assert row[4] == plan.format_seconds(wall)
    assert row[5] == "2.00 GiB / 16.00 GiB" and row[6] == "yes |"


def test_table_without_compiling_shows_what_the_cache_holds(tmp_path, monkeypatch):
    # two of the four steps cached by this code: the table plans those two and neither
    # lowers nor compiles the others (nor writes anything for them)
    exp = load_experiment("003_fluctuation_mlp4").resolve("full")
    configs = [c for _, c in exp.configs()]
    keys = [plan.step_key(c, "v5e:1x1", exp.image_shape) for c in configs]
    assert len(set(keys)) == 4
    for c, s in zip(configs[:2], (1e-3, 2e-3)):
        _cache_entry(tmp_path, c, plan.code_fingerprint(), "p", _record(s, GIB),
                     image_shape=exp.image_shape)

    def no_lowering(*args, **kwargs):
        raise AssertionError("lowered")

    monkeypatch.setattr(plan, "lower_step", no_lowering)
    out = tmp_path / "table.md"
    text = plan.plan_table(["003_fluctuation_mlp4"], str(tmp_path), out=str(out),
                           compile=False)
    assert out.read_text() == text
    row = text.splitlines()[2].split(" | ")
    assert row[1:4] == ["v5e:1x1", "2 of 4", "1.000 ms - 2.000 ms"]
    assert "(planned runs only)" in row[4]
    assert sorted(p.name for p in tmp_path.glob("*.json")) == sorted(k + ".json"
                                                                      for k in keys[:2])


def test_step_key_ignores_constants_not_the_step():
    exp = load_experiment("003_fluctuation_mlp4").resolve("full")
    c = exp.configs()[0][1]
    assert plan.step_key(c, "v5e:1x1") == plan.step_key(c.replace(lr=0.5, epochs=3), "v5e:1x1")
    assert plan.step_key(c, "v5e:1x1") != plan.step_key(c.replace(norm="hn"), "v5e:1x1")
    assert plan.step_key(c, "v5e:1x1") != plan.step_key(c, "v5e:2x4")


class _Lowered:
    """Stands in for :class:`plan.LoweredStep`: a program fingerprint and a compile count."""

    def __init__(self, program, record):
        self.program, self.record, self.compiles = program, record, 0

    def program_fingerprint(self):
        return self.program

    def compile(self, progress=None):
        self.compiles += 1
        return SimpleNamespace(to_dict=lambda: self.record)


def _cache_entry(tmp_path, config, code, program, record, image_shape=None):
    path = tmp_path / (plan.step_key(config, "v5e:1x1", image_shape) + ".json")
    path.write_text(json.dumps({"code": code, "program": program, "step": record}))
    return path


@pytest.fixture
def config():
    return load_experiment("003_fluctuation_mlp4").resolve("full").configs()[0][1]


def test_cached_step_same_code_is_served_without_lowering(tmp_path, monkeypatch, config):
    _cache_entry(tmp_path, config, plan.code_fingerprint(), "p", _record(1e-3, GIB))

    def no_lowering(*args, **kwargs):
        raise AssertionError("lowered")

    monkeypatch.setattr(plan, "lower_step", no_lowering)
    assert plan.cached_step(config, "v5e:1x1", str(tmp_path)) == _record(1e-3, GIB)


def test_cached_step_other_code_same_program_is_served(tmp_path, monkeypatch, config):
    # other sources (or versions) that lower to the same program: served, not compiled,
    # and recorded with this code's fingerprint
    path = _cache_entry(tmp_path, config, "0" * 12, "p", _record(1e-3, GIB))
    lowered = _Lowered("p", _record(9e-3, 2 * GIB))
    monkeypatch.setattr(plan, "lower_step", lambda *a, **k: lowered)
    assert plan.cached_step(config, "v5e:1x1", str(tmp_path)) == _record(1e-3, GIB)
    assert lowered.compiles == 0
    assert json.loads(path.read_text()) == {"code": plan.code_fingerprint(), "program": "p",
                                            "step": _record(1e-3, GIB)}


def test_cached_step_other_program_is_compiled_again(tmp_path, monkeypatch, config):
    path = _cache_entry(tmp_path, config, "0" * 12, "p", _record(1e-3, GIB))
    lowered = _Lowered("q", _record(9e-3, 2 * GIB))
    monkeypatch.setattr(plan, "lower_step", lambda *a, **k: lowered)
    assert plan.cached_step(config, "v5e:1x1", str(tmp_path)) == _record(9e-3, 2 * GIB)
    assert lowered.compiles == 1
    assert json.loads(path.read_text()) == {"code": plan.code_fingerprint(), "program": "q",
                                            "step": _record(9e-3, 2 * GIB)}


def test_cached_step_records_a_config_that_cannot_be_planned(tmp_path, monkeypatch, config):
    def refused(*args, **kwargs):
        raise ValueError("batch_groups=3 does not divide the batch of 4")

    monkeypatch.setattr(plan, "lower_step", refused)
    step = plan.cached_step(config, "v5e:1x1", str(tmp_path))
    assert step == {"error": "batch_groups=3 does not divide the batch of 4",
                    "does_not_fit": False}
    entry = json.loads((tmp_path / (plan.step_key(config, "v5e:1x1") + ".json")).read_text())
    assert entry == {"code": plan.code_fingerprint(), "program": None, "step": step}


def _mlp4_cache(tmp_path, cached):
    """The first ``cached`` of 003_fluctuation_mlp4's four steps cached by this code
    (1, 2, 3, 4 ms; 1 GiB, the last 2 GiB); returns the experiment and its configs."""
    exp = load_experiment("003_fluctuation_mlp4").resolve("full")
    configs = [c for _, c in exp.configs()]
    for i, c in enumerate(configs[:cached]):
        _cache_entry(tmp_path, c, plan.code_fingerprint(), "p",
                     _record((i + 1) * 1e-3, (2 if i == 3 else 1) * GIB),
                     image_shape=exp.image_shape)
    return exp, configs


@pytest.mark.parametrize("cached", [4, 2])
def test_plot_draws_the_table_rows(tmp_path, monkeypatch, cached):
    # each bar is its row's figures: training hours (all planned runs x seeds) and the
    # peak memory's share of HBM; a row with runs left unplanned is hatched and labelled
    from seqnorm_jax.analysis import plots

    exp, configs = _mlp4_cache(tmp_path, cached)
    drawn = {}
    save = plots.save_figure

    def keep(fig, path, **kw):
        drawn["fig"] = fig
        return save(fig, path, **kw)

    monkeypatch.setattr(plots, "save_figure", keep)
    monkeypatch.setattr(plan, "lower_step", lambda *a, **k: pytest.fail("lowered"))
    png = tmp_path / "table.png"
    plan.plan_table(["003_fluctuation_mlp4"], str(tmp_path), plot=png, compile=False)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    left, right = drawn["fig"].axes
    (time_bar,), (memory_bar,) = left.patches, right.patches
    steps = [60_000 // c.batch_size * c.epochs for c in configs][:cached]
    hours = sum((i + 1) * 1e-3 * n for i, n in enumerate(steps)) * len(exp.seeds) / 3600
    assert time_bar.get_width() == pytest.approx(hours, rel=1e-12)
    assert memory_bar.get_width() == pytest.approx(100 * (2 if cached == 4 else 1) / 16)
    assert left.get_xscale() == "log"
    label = left.get_yticklabels()[0].get_text()
    if cached == 4:
        assert label == "003_fluctuation_mlp4" and time_bar.get_hatch() is None
    else:
        assert label == "003_fluctuation_mlp4  (2 of 4 runs)" and time_bar.get_hatch() == "//"


def test_plot_errors(tmp_path, monkeypatch):
    # a path that is not a PNG: refused before anything is planned
    monkeypatch.setattr(plan, "cached_step", lambda *a, **k: pytest.fail("planned"))
    with pytest.raises(ValueError, match=r"plot='t.svg' is drawn as a PNG: .*\.png"):
        plan.plan_table(["003_fluctuation_mlp4"], str(tmp_path), plot="t.svg")
    # nothing planned yet: nothing to draw, said so once the table is written
    monkeypatch.undo()
    with pytest.raises(ValueError, match="no config has a planned step yet"):
        plan.plan_table(["003_fluctuation_mlp4"], str(tmp_path), plot=tmp_path / "t.png",
                        out=tmp_path / "t.md", compile=False)
    assert "| 003_fluctuation_mlp4 | v5e:1x1 | 0 of 4 | | | | |" in (tmp_path / "t.md").read_text()
    assert not (tmp_path / "t.png").exists()
