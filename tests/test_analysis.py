"""seqnorm_jax.analysis: loss landscape, output bound, statistics fluctuation, example weighing.

Each tool is checked against an independent reference: a direct computation of the loss
and gradients at ``theta - eta * g`` with NumPy distances, hand-counted normalization set
sizes, an outlier input that attains ``sqrt(m - 1)``, NumPy float64 statistics of the
captured layer inputs, and ``evaluate`` itself for the sweep. Models are tiny; the data
is synthetic or scikit-learn's digits, trained for a few steps on the 4 fake CPU devices.
"""

import functools
import json
import math
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import seqnorm_jax as snj
from seqnorm_jax import analysis as A
from seqnorm_jax.models import get_model
from seqnorm_jax.models._common import bind_norm
from seqnorm_jax.train import (
    TrainConfig,
    Trainer,
    create_train_state,
    cross_entropy_loss,
    evaluate,
    step_rngs,
)


def _batch(n=16, shape=(4, 4, 1), seed=1):
    kx, ky = jax.random.split(jax.random.key(seed))
    return {"image": jax.random.normal(kx, (n, *shape)),
            "label": jax.random.randint(ky, (n,), 0, 10)}


def _state(model, batch, seed=0):
    return create_train_state(model, jax.random.key(seed), batch["image"][:1], optax.sgd(0.1))


def _flat(tree):
    return np.concatenate([np.asarray(x, np.float64).ravel()
                           for x in jax.tree_util.tree_leaves(tree)])


# ----------------------------------------------------------------------------- landscape

def test_landscape_probe_matches_direct_computation():
    # NoisyBatchNorm: the probe must also use the step's noise rngs.
    model = get_model("mlp", norm="noisybn:noise_std=0.2", num_classes=10, features=(8, 6))
    batch = _batch()
    state = _state(model, batch)
    rngs = step_rngs(state)

    def loss_fn(params):
        logits, _ = model.apply({"params": params, "batch_stats": state.batch_stats},
                                batch["image"], train=True, rngs=rngs, mutable=["batch_stats"])
        return cross_entropy_loss(logits, batch["label"]).mean()

    loss, grad = jax.jit(loss_fn), jax.jit(jax.grad(loss_fn))
    g0 = grad(state.params)
    etas = [0.0, 0.1, 0.4, 0.8]
    out = A.landscape_probe(state, batch, etas)
    assert out["loss"].shape == out["grad_distance"].shape == (4,)
    np.testing.assert_allclose(float(out["loss0"]), float(loss(state.params)), rtol=1e-6)
    np.testing.assert_allclose(float(out["grad_norm"]), np.linalg.norm(_flat(g0)), rtol=1e-5)
    for i, eta in enumerate(etas):
        moved = jax.tree_util.tree_map(lambda p, g: p - eta * g, state.params, g0)
        np.testing.assert_allclose(float(out["loss"][i]), float(loss(moved)), rtol=1e-5,
                                   atol=1e-6)
        dist = np.linalg.norm(_flat(g0) - _flat(grad(moved)))
        np.testing.assert_allclose(float(out["grad_distance"][i]), dist, rtol=1e-4, atol=1e-6)
    # eta = 0 is the starting point itself.
    np.testing.assert_allclose(float(out["loss"][0]), float(out["loss0"]), rtol=1e-6)
    assert float(out["grad_distance"][0]) < 1e-6
    # A real step changes the gradient.
    assert float(out["grad_distance"][-1]) > 1e-3


def test_landscape_probe_errors():
    model = get_model("mlp", norm="bn", num_classes=10, features=(4,))
    batch = _batch(8)
    state = _state(model, batch)
    with pytest.raises(ValueError, match="step_sizes"):
        A.landscape_probe(state, batch, [])
    with pytest.raises(ValueError, match="label"):
        A.landscape_probe(state, {"image": batch["image"]}, [0.1])
    with pytest.raises(ValueError, match="every"):
        A.LandscapeRecorder(every=0)


def test_landscape_recorder_every_and_rows():
    model = get_model("mlp", norm="ghost:batch_groups=2", num_classes=10, features=(8,))
    batch = _batch()
    state = _state(model, batch)
    rec = A.LandscapeRecorder(step_sizes=(0.1, 0.3), every=3, fetch_every=2)
    for step in range(8):
        rec(state, batch, step)
    assert rec.step_sizes == A.LandscapeRecorder(step_sizes=[0.1, 0.3]).step_sizes
    assert [r["step"] for r in rec.rows] == [0, 3, 6]
    direct = A.landscape_probe(state, batch, [0.1, 0.3])
    for row in rec.rows:
        assert set(row) == {"step", "loss0", "grad_norm", "loss", "grad_distance", "loss_min",
                            "loss_max", "grad_distance_min", "grad_distance_max", "step_sizes"}
        assert all(type(v) is float for v in row["loss"] + row["grad_distance"])
        assert all(type(row[k]) is float for k in row if k not in ("step", "loss",
                                                                   "grad_distance", "step_sizes"))
        np.testing.assert_allclose(row["step_sizes"], [0.1, 0.3], rtol=1e-6)
        np.testing.assert_allclose(row["loss"], np.asarray(direct["loss"]), rtol=1e-6)
        assert row["loss_min"] == min(row["loss"]) and row["loss_max"] == max(row["loss"])
        assert row["grad_distance_max"] == max(row["grad_distance"])
    json.dumps(rec.to_dict())
    assert A.LandscapeRecorder().step_sizes == pytest.approx([0.1 * k for k in range(1, 9)])
    # step sizes relative to the learning rate of the step (paper 000's ResNet-56 probe)
    rel = A.LandscapeRecorder(step_sizes=(0.5, 2.0), lr_schedule=lambda step: 0.2 / (1 + step))
    rel(state, batch, 1)
    (row,) = rel.rows
    np.testing.assert_allclose(row["step_sizes"], [0.05, 0.2], rtol=1e-6)
    direct = A.landscape_probe(state, batch, [0.05, 0.2])
    np.testing.assert_allclose(row["loss"], np.asarray(direct["loss"]), rtol=1e-6)


def _rows(widths, gwidths, base=1.0):
    return [{"step": 10 * i, "loss0": base, "grad_norm": 1.0, "loss": [base, base + w],
             "grad_distance": [0.5, 0.5 + gw], "loss_min": base, "loss_max": base + w,
             "grad_distance_min": 0.5, "grad_distance_max": 0.5 + gw}
            for i, (w, gw) in enumerate(zip(widths, gwidths))]


def test_summarize_landscape_hand_numbers():
    runs = [_rows([1.0, 3.0], [0.2, 0.4]), _rows([2.0, 2.0], [0.1, 0.1])]
    s = A.summarize_landscape(runs)
    assert s["runs"] == 2 and s["steps"] == 2
    assert s["landscape_width"] == pytest.approx(2.0)
    assert s["landscape_width_std"] == pytest.approx(0.0)
    assert s["landscape_width_max"] == pytest.approx(2.5)  # per-run max 3 and 2
    assert s["landscape_width_max_std"] == pytest.approx(math.sqrt(0.5))  # ddof=1
    assert s["grad_pred_width"] == pytest.approx((0.3 + 0.1) / 2)
    assert s["grad_pred_width_max"] == pytest.approx((0.4 + 0.1) / 2)
    assert s["loss_max"] == pytest.approx(3.0)  # mean of 1+{1,3} and 1+{2,2}
    single = A.summarize_landscape(runs[0])  # one run's rows
    assert single["runs"] == 1 and single["landscape_width"] == pytest.approx(2.0)
    assert single["landscape_width_std"] == 0.0
    with pytest.raises(ValueError, match="at least one probed row"):
        A.summarize_landscape([[]])


# ----------------------------------------------------------------------------- output range

class NormOnly(nn.Module):
    """One norm layer (BatchNorm-style binding) then a dense head."""

    norm: object = snj.BatchNorm

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = bind_norm(self.norm, use_running_average=not train)(name="norm")(x)
        return nn.Dense(3, name="head")(x.reshape((x.shape[0], -1)))


def test_normalization_set_size_hand_counts():
    s = (8, 4, 4, 6)  # N=8, spatial 16, C=6
    cases = [
        (snj.BatchNorm(), 128), (nn.BatchNorm(), 128), (snj.NoisyBatchNorm(), 128),
        (snj.GhostNorm(batch_groups=2), 64), (snj.GhostNorm(ghost_size=2), 32),
        (snj.GroupNorm(num_groups=3), 32), (snj.GroupNorm(num_groups=None, group_size=3), 48),
        (nn.GroupNorm(num_groups=2), 48),
        (snj.BatchGroupNorm(batch_groups=4, channel_groups=3), 2 * 16 * 2),
        (snj.BatchGroupNorm(), 128), (snj.BatchGroupNorm(ghost_size=2, channel_group_size=3), 96),
        (snj.BGN(), 8 * 16 * 6), (snj.BGN(num_groups=3), 8 * 16 * 2),
        (snj.SeqNorm(channel_groups=2, batch_groups=4), 2 * 16),
        (snj.SeqNorm(channel_groups=2, batch_groups=4, order="ghost_first"), 16 * 3),
        (snj.HeterologousNorm(), None), (snj.GNPlus(num_groups=2), None),
    ]
    for module, m in cases:
        assert A.normalization_set_size(module, s) == m, module
    assert A.normalization_set_size(snj.BatchNorm(), (8, 6)) == 8
    assert A.normalization_set_size(snj.GroupNorm(num_groups=2), (8, 6)) == 3
    assert A.normalization_set_size(snj.GhostNorm(batch_groups=4), (8, 6)) == 2
    with pytest.raises(ValueError, match="batch_groups=3"):
        A.normalization_set_size(snj.GhostNorm(batch_groups=3), s)
    with pytest.raises(ValueError, match="not a norm layer"):
        A.normalization_set_size(nn.Dense(3), s)


def test_norm_layer_paths_in_call_order():
    model = get_model("resnet20", norm="gn:num_groups=4", num_classes=10)
    x = jnp.zeros((2, 8, 8, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    paths = A.norm_layer_paths(model, variables, x)
    assert paths[:3] == ["stem_norm", "stage1_block1/norm1", "stage1_block1/norm2"]
    assert len(paths) == 19
    plain = get_model("mlp", norm="none", features=(4,))
    variables = jax.eval_shape(lambda: plain.init(jax.random.key(0), x, train=False))
    assert A.norm_layer_paths(plain, variables, x) == []


def _outlier_variables(model, x, scale=3.0, bias=-2.0):
    variables = model.init(jax.random.key(0), x, train=False)
    params = dict(variables["params"])
    norm = dict(params["norm"])
    norm["scale"] = jnp.full_like(norm["scale"], scale)
    norm["bias"] = jnp.full_like(norm["bias"], bias)
    params["norm"] = norm
    return {**variables, "params": params}


@pytest.mark.parametrize("norm, shape, m, outliers", [
    # All zeros but one 1 in each normalization set (one per channel and sample group).
    (functools.partial(snj.BatchNorm, epsilon=1e-12), (8, 3), 8, [(0, slice(None))]),
    (functools.partial(nn.BatchNorm, epsilon=1e-12), (8, 3), 8, [(0, slice(None))]),
    (functools.partial(snj.GhostNorm, batch_groups=2, epsilon=1e-12), (8, 3), 4,
     [(0, slice(None)), (4, slice(None))]),
    # (N=2, 2x2, C=4), 2 groups of 2 channels: one per (sample, channel group).
    (functools.partial(snj.GroupNorm, num_groups=2, epsilon=1e-12), (2, 2, 2, 4), 8,
     [(slice(None), 0, 0, 0), (slice(None), 0, 0, 2)]),
    # (N=4, spatial 2, C=2), G_M=G_C=2: sets of 2 samples x 2 positions x 1 channel.
    (functools.partial(snj.BatchGroupNorm, batch_groups=2, channel_groups=2, epsilon=1e-12),
     (4, 2, 2), 4, [(0, 0, slice(None)), (2, 0, slice(None))]),
])
def test_output_range_outlier_attains_bound(norm, shape, m, outliers):
    # The outlier normalizes to sqrt(m-1), the others to -1/sqrt(m-1) (paper 002, App. A).
    x = np.zeros(shape, np.float32)
    for index in outliers:
        x[index] = 1.0
    model = NormOnly(norm=norm)
    variables = _outlier_variables(model, x)
    r = A.output_range(model, variables, x)
    assert r["layer"] == "norm" and r["set_size"] == m
    assert r["bound"] == pytest.approx(math.sqrt(m - 1))
    np.testing.assert_allclose(r["train_max"], math.sqrt(m - 1), rtol=1e-3)
    np.testing.assert_allclose(r["train_min"], -1 / math.sqrt(m - 1), rtol=1e-3)
    assert r["train_values"].shape == shape
    assert r["train_abs_max"] <= r["bound"] * (1 + 1e-5)


def test_output_range_inference_exceeds_bound():
    # Initial running statistics (mean 0, var 1): a far-out input keeps its size at
    # inference, while training maps it inside the bound.
    x = np.linspace(-1, 1, 24, dtype=np.float32).reshape(8, 3)
    x[0] = 10.0
    model = NormOnly(norm=functools.partial(snj.GhostNorm, batch_groups=2))
    r = A.output_range(model, _outlier_variables(model, x, 0.5, 0.1), x, layer="norm")
    assert r["set_size"] == 4
    assert r["train_abs_max"] <= r["bound"] + 1e-5
    assert r["eval_abs_max"] > 3 * r["bound"]
    np.testing.assert_allclose(r["eval_max"], 10.0 / math.sqrt(1 + 1e-5), rtol=1e-5)
    # example_weight = 1 normalizes each example by its own statistics at inference.
    r1 = A.output_range(model, _outlier_variables(model, x, 0.5, 0.1), x, example_weight=1.0,
                        return_values=False)
    assert "eval_values" not in r1 and r1["eval_abs_max"] < r["eval_abs_max"]


@pytest.mark.parametrize("norm", ["ghost:batch_groups=2", "gn:num_groups=2",
                                  "seqnorm:channel_groups=2,batch_groups=2"])
def test_output_range_within_bound_on_cnn(norm):
    model = get_model("cnn", norm=norm, num_classes=10, features=(4, 8))
    x = jax.random.normal(jax.random.key(3), (8, 8, 8, 1)) * 3 + 1
    variables = model.init(jax.random.key(0), x, train=False)
    paths = A.norm_layer_paths(model, variables, x)
    assert paths == ["norm1", "norm2"]
    for layer in (0, "norm2"):
        r = A.output_range(model, variables, x, layer=layer, return_values=False)
        assert r["layer"] == paths[layer] if isinstance(layer, int) else layer
        assert r["train_abs_max"] <= r["bound"] + 1e-4
    with pytest.raises(ValueError, match="norm3"):
        A.output_range(model, variables, x, layer="norm3")
    with pytest.raises(ValueError, match="index"):
        A.output_range(model, variables, x, layer=2)


# ----------------------------------------------------------------------------- fluctuation

def _captured_inputs(state, batch):
    """The inputs of every norm layer in training mode, by path (test-side interception)."""
    found = {}

    def grab(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, snj.BatchNorm):
            found["/".join(context.module.path)] = np.asarray(args[0], np.float64)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(grab):
        state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                       batch["image"], train=True, mutable=["batch_stats"])
    return found


@pytest.mark.parametrize("name, fields, shape", [
    ("cnn", {"features": (3, 4)}, (8, 6, 6, 1)),
    ("mlp", {"features": (5, 4)}, (8, 3, 3, 1)),
])
def test_statistics_recorder_matches_numpy(name, fields, shape):
    model = get_model(name, norm="bn", num_classes=10, **fields)
    batches = [_batch(8, shape[1:], seed=s) for s in range(5)]
    for b in batches:
        b["image"] = b["image"] * 2 + 0.5
    state = _state(model, batches[0])
    rec = A.StatisticsRecorder(last_steps=3, total_steps=5, fetch_every=2)
    for step, b in enumerate(batches):
        rec(state, b, step)
    assert rec.steps == [2, 3, 4]
    assert rec.layers == ["norm1", "norm2"]
    data = rec.data
    ref = {p: {k: [] for k in A.STAT_NAMES} for p in rec.layers}
    for b in batches[2:]:
        for path, x in _captured_inputs(state, b).items():
            per_channel = x.reshape(-1, x.shape[-1])
            ref[path]["bn_mean"].append(per_channel.mean(0))
            ref[path]["bn_std"].append(per_channel.std(0))
            ref[path]["en_mean"].append(x.mean())
            ref[path]["en_std"].append(x.std())
    for path in rec.layers:
        for k in A.STAT_NAMES:
            np.testing.assert_allclose(data[path][k], np.asarray(ref[path][k]), rtol=2e-5,
                                       atol=2e-6, err_msg=f"{path} {k}")
    rows = rec.summary()
    assert [r["layer"] for r in rows] == rec.layers
    for row in rows:
        r = {k: np.asarray(v) for k, v in ref[row["layer"]].items()}
        assert row["steps"] == 3 and row["channels"] == r["bn_mean"].shape[1]
        np.testing.assert_allclose(row["bn_mean_fluct"], r["bn_mean"].std(0).mean(), rtol=1e-4,
                                   atol=1e-7)
        np.testing.assert_allclose(row["bn_std_fluct"], r["bn_std"].std(0).mean(), rtol=1e-4,
                                   atol=1e-7)
        np.testing.assert_allclose(row["en_std_fluct"], r["en_std"].std(), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(row["en_mean_rel_fluct"],
                                   r["en_mean"].std() / np.abs(r["en_mean"]).mean(), rtol=1e-4)
        assert row["bn_mean_fluct"] > 0  # the batches differ
    full = json.loads(json.dumps(rec.to_dict()))
    # a slim copy for files: trajectories of the first neuron, every summary number kept
    slim = rec.to_dict(neurons=1)
    assert slim["summary"] == full["summary"]
    for layer, per in slim["stats"].items():
        assert np.shape(per["bn_mean"]) == (3, 1) and np.shape(per["bn_std"]) == (3, 1)
        np.testing.assert_array_equal(np.asarray(per["bn_std"])[:, 0],
                                      np.asarray(full["stats"][layer]["bn_std"])[:, 0])
        assert per["en_mean"] == full["stats"][layer]["en_mean"]
    with pytest.raises(ValueError, match="neurons must be a positive int"):
        rec.to_dict(neurons=0)


def test_statistics_recorder_window_layers_neurons():
    model = get_model("mlp", norm="ghost:batch_groups=2", num_classes=10, features=(5, 4, 3))
    batches = [_batch(8, (2, 2, 1), seed=s) for s in range(6)]
    state = _state(model, batches[0])
    rolling = A.StatisticsRecorder(last_steps=2, layers=[-1, "norm1"], neurons=2, fetch_every=1)
    everything = A.StatisticsRecorder(last_steps=None)
    for step, b in enumerate(batches):
        rolling(state, b, step)
        everything(state, b, step)
    assert rolling.steps == [4, 5] and everything.steps == list(range(6))
    assert rolling.layers == ["norm1", "norm3"]
    assert rolling.data["norm3"]["bn_mean"].shape == (2, 2)
    assert rolling.data["norm1"]["en_std"].shape == (2,)
    np.testing.assert_allclose(rolling.data["norm3"]["bn_std"],
                               everything.data["norm3"]["bn_std"][4:, :2], rtol=1e-6)
    with pytest.raises(ValueError, match="last_steps"):
        A.StatisticsRecorder(last_steps=0)
    with pytest.raises(ValueError, match="norm9"):
        A.StatisticsRecorder(layers=["norm9"])(state, batches[0], 0)


# ----------------------------------------------------------------------------- trainer hooks

def _digits_config(**changes):
    base = dict(model="mlp", model_kwargs={"features": [16]}, norm="ghost:batch_groups=2",
                dataset="digits", epochs=1, batch_size=32, eval_batch_size=128, lr=0.1,
                progress=False, seed=3)
    base.update(changes)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A 4-step digits run with both recorders as hooks, checkpointed at its last step."""
    out = tmp_path_factory.mktemp("run")
    land = A.LandscapeRecorder(step_sizes=(0.1, 0.5), every=2)
    stat = A.StatisticsRecorder(last_steps=2, total_steps=4)
    trainer = Trainer(_digits_config(), out_dir=out, max_steps=4, step_hooks=[land, stat])
    result = trainer.fit()
    return dict(out=out, trainer=trainer, result=result, land=land, stat=stat)


def test_recorders_as_trainer_hooks(digits_run):
    land, stat = digits_run["land"], digits_run["stat"]
    assert [r["step"] for r in land.rows] == [0, 2]
    assert all(np.isfinite(r["loss_max"]) and r["loss0"] > 0 for r in land.rows)
    assert stat.steps == [2, 3] and stat.layers == ["norm1"]
    assert stat.data["norm1"]["bn_mean"].shape == (2, 16)
    # At step 0 the state is the initial one: the probe's loss0 is the first step's loss.
    assert int(digits_run["result"].state.step) == 4


# ----------------------------------------------------------------------------- example weight

def test_example_weight_sweep_and_sweep_run(digits_run):
    trainer, state = digits_run["trainer"], digits_run["result"].state
    src = trainer.eval_source
    rows = A.example_weight_sweep(state, src, [0.0, 0.5, 1.0], batch_size=128)
    assert [r["example_weight"] for r in rows] == [0.0, 0.5, 1.0]
    plain = evaluate(state, src, batch_size=128)
    np.testing.assert_allclose(rows[0]["eval_loss"], plain["eval_loss"], rtol=1e-6)
    assert rows[0]["eval_accuracy"] == plain["eval_accuracy"]
    assert abs(rows[2]["eval_loss"] - rows[0]["eval_loss"]) > 1e-4
    mid = evaluate(state, src, batch_size=128, example_weight=0.5)
    np.testing.assert_allclose(rows[1]["eval_loss"], mid["eval_loss"], rtol=1e-6)

    again = A.sweep_run(digits_run["out"], [0.0, 0.5, 1.0], batch_size=128)
    for a, b in zip(again, rows):
        assert a["example_weight"] == b["example_weight"]
        np.testing.assert_allclose(a["eval_loss"], b["eval_loss"], rtol=1e-6)
        assert a["eval_accuracy"] == b["eval_accuracy"]
    train_rows = A.sweep_run(digits_run["out"], [0.0], split="train[:64]", batch_size=64)
    assert len(train_rows) == 1 and 0.0 <= train_rows[0]["eval_accuracy"] <= 1.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        A.example_weight_sweep(state, src, [1.5])
    with pytest.raises(FileNotFoundError, match="config.json"):
        A.sweep_run(digits_run["out"] / "nothing", [0.0])


def test_best_example_weight_ties_and_modes():
    rows = [{"example_weight": a, "eval_accuracy": acc, "eval_loss": loss}
            for a, acc, loss in ((0.0, 0.5, 1.0), (0.2, 0.7, 0.9), (0.4, 0.7, 0.8),
                                 (0.6, 0.6, 0.8))]
    assert A.best_example_weight(rows) == 0.2  # tie 0.7 -> smallest alpha
    assert A.best_example_weight(rows, "eval_loss") == 0.4  # loss: minimized, tie -> 0.4
    assert A.best_example_weight(rows, "eval_loss", mode="max") == 0.0
    with pytest.raises(ValueError, match="eval_acc"):
        A.best_example_weight(rows, "eval_acc")


# ----------------------------------------------------------------------------- plots

def test_moving_average_and_mean_std():
    chex.assert_trees_all_close(A.moving_average([1.0, 2.0, 3.0, 4.0], 2),
                                np.array([1.0, 1.5, 2.5, 3.5]))
    chex.assert_trees_all_close(A.moving_average([1.0, 3.0], 1), np.array([1.0, 3.0]))
    mean, std = A.mean_std([[1.0, 2.0], [3.0, 6.0]])
    chex.assert_trees_all_close(mean, np.array([2.0, 4.0]))
    chex.assert_trees_all_close(std, np.array([math.sqrt(2.0), math.sqrt(8.0)]))
    with pytest.raises(ValueError, match="window"):
        A.moving_average([1.0], 0)


def _png(path):
    with open(path, "rb") as f:
        head = f.read(8)
    return head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 1000


def test_plots_write_pngs(tmp_path, digits_run):
    runs = {"bn": [_rows([1, 2, 3], [0.1, 0.2, 0.1]), _rows([2, 2, 1], [0.3, 0.1, 0.2])],
            "ghost": [digits_run["land"]]}
    assert _png(A.plot_landscape(runs, tmp_path / "land.png", title="t", smooth=2))

    x = np.linspace(-1, 1, 24, dtype=np.float32).reshape(8, 3)
    results = {}
    for label, norm in (("bn", snj.BatchNorm), ("gn", functools.partial(snj.GroupNorm,
                                                                         num_groups=1))):
        model = NormOnly(norm=norm)
        results[label] = A.output_range(model, model.init(jax.random.key(0), x, train=False), x)
    results["hn"] = {**results["bn"], "bound": None, "set_size": None}
    assert _png(A.plot_output_range(results, tmp_path / "range.png", title="range"))

    stat = digits_run["stat"]
    assert _png(A.plot_fluctuation({"a": stat, "b": json.loads(json.dumps(stat.to_dict()))},
                                   tmp_path / "sub" / "fluct.png", neuron=1))

    sweep = [{"example_weight": a, "eval_accuracy": 0.5 + a / 4, "eval_loss": 1 - a / 3}
             for a in (0.0, 0.5, 1.0)]
    assert _png(A.plot_example_weight({"ghost": [sweep, sweep], "bn": sweep},
                                      tmp_path / "alpha.png", title="alpha"))
