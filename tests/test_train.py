"""seqnorm_jax.train: schedules, weight decay switch, clipping, steps, example weighing,
mixed precision, the loop's metrics files and exact checkpoint resume.

Runs on the 4 fake CPU devices of tests/conftest.py: the steps and the loop shard every
batch over a ``data_mesh`` of all of them. Models are tiny and the data is scikit-learn's
digits (8x8) or a fixed synthetic batch.
"""

import csv
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
from seqnorm_jax import distributed
from seqnorm_jax.train import (
    METRIC_COLUMNS,
    TrainConfig,
    Trainer,
    create_train_state,
    cross_entropy_loss,
    eval_step,
    example_weight_scope,
    jit_eval_step,
    jit_train_step,
    linear_one_cycle,
    make_optimizer,
    make_schedule,
    model_norm_paths,
    norm_param_labels,
    output_noise_scope,
    read_jsonl,
    step_decay,
    train_step,
    warmup_cosine,
    weight_decay_towards,
)

N_DEV = 4


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() >= N_DEV, "tests/conftest.py sets 4 CPU devices"
    return distributed.data_mesh()


class TinyCNN(nn.Module):
    """conv -> norm -> relu -> mean pool -> dense, with the norm given as a factory."""

    norm: object = snj.BatchNorm
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(8, (3, 3), use_bias=False, dtype=self.dtype, name="conv")(
            jnp.asarray(x, self.dtype))
        x = self.norm(use_running_average=not train, dtype=self.dtype, name="norm")(x)
        x = nn.relu(x).mean(axis=(1, 2))
        return nn.Dense(10, dtype=self.dtype, name="head")(x)


def fixed_batch(n=16, seed=0, hw=6):
    rng = np.random.default_rng(seed)
    return {"image": (rng.normal(size=(n, hw, hw, 1)) * 2 + 1).astype(np.float32),
            "label": rng.integers(0, 10, size=n).astype(np.int32)}


# ----------------------------------------------------------------------------- schedules


def test_warmup_cosine_hand_values():
    lr = warmup_cosine(1.0, total_steps=10, warmup_steps=2, init_lr=0.1, end_lr=0.0)
    # linear 0.1 -> 1.0 over 2 steps, then 0.5 * (1 + cos(pi * (t - 2) / 8))
    expected = {0: 0.1, 1: 0.55, 2: 1.0, 4: 0.5 * (1 + math.cos(math.pi * 2 / 8)),
                6: 0.5, 10: 0.0, 12: 0.0}
    for t, want in expected.items():
        np.testing.assert_allclose(float(lr(t)), want, atol=1e-6, err_msg=f"step {t}")
    plain = warmup_cosine(0.4, total_steps=4)
    np.testing.assert_allclose([float(plain(t)) for t in range(5)],
                               [0.4, 0.2 * (1 + math.cos(math.pi / 4)), 0.2,
                                0.2 * (1 + math.cos(3 * math.pi / 4)), 0.0], atol=1e-6)


def test_linear_one_cycle_paper000_values():
    # paper 000: 0.1 -> 3.0 in 15 epochs, -> 0.1 in 15, -> 0.003 in the last 10 (1 step/epoch)
    lr = linear_one_cycle(40, 3.0, init_lr=0.1, final_lr=0.003, pct_up=15 / 40,
                          pct_down=15 / 40)
    expected = {0: 0.1, 5: 0.1 + 2.9 * 5 / 15, 15: 3.0, 20: 3.0 - 2.9 * 5 / 15, 30: 0.1,
                35: 0.1 + (0.003 - 0.1) * 5 / 10, 40: 0.003, 45: 0.003}
    for t, want in expected.items():
        np.testing.assert_allclose(float(lr(t)), want, rtol=1e-5, err_msg=f"step {t}")
    # defaults: init = peak / 30, final = init * 0.03
    default = linear_one_cycle(40, 3.0, pct_up=15 / 40, pct_down=15 / 40)
    np.testing.assert_allclose([float(default(0)), float(default(40))], [0.1, 0.003], rtol=1e-5)


def test_step_decay_and_make_schedule_epochs():
    lr = step_decay(0.1, [10, 20], 0.1)
    got = [float(lr(t)) for t in (0, 9, 10, 19, 20, 100)]
    np.testing.assert_allclose(got, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)
    # epochs -> steps (10 steps per epoch), with a 1-epoch warm-up from 0
    lr = make_schedule("step", lr=0.2, total_steps=50, steps_per_epoch=10, warmup_epochs=1,
                       decay_epochs=[2.5], decay_factor=0.5)
    got = [float(lr(t)) for t in (0, 5, 10, 24, 25, 49)]
    np.testing.assert_allclose(got, [0.0, 0.1, 0.2, 0.2, 0.1, 0.1], rtol=1e-6)
    cyc = make_schedule("cosine_one_cycle", lr=1.0, total_steps=100, steps_per_epoch=10,
                        one_cycle_pct_up=0.3)
    np.testing.assert_allclose([float(cyc(0)), float(cyc(30))], [1.0 / 25, 1.0], rtol=1e-5)


def test_schedule_errors_name_the_argument():
    with pytest.raises(ValueError, match="warmup_steps=10 must be smaller than total_steps=10"):
        warmup_cosine(1.0, 10, 10)
    with pytest.raises(ValueError, match="schedule must be one of .*got 'linear'"):
        make_schedule("linear", lr=0.1, total_steps=10, steps_per_epoch=1)
    with pytest.raises(ValueError, match="boundaries must be increasing"):
        step_decay(0.1, [20, 10])


# ------------------------------------------------------------------------ weight decay

PARAMS = {"dense": {"kernel": jnp.array([2.0, -1.0]), "bias": jnp.array([3.0])},
          "norm": {"scale": jnp.array([1.5, 0.5]), "bias": jnp.array([0.5, -2.0])}}


NORM_PATHS = ("norm",)  # the norm layer of PARAMS


def test_norm_param_labels_on_models():
    assert norm_param_labels(PARAMS, NORM_PATHS) == {
        "dense": {"kernel": "weight", "bias": "weight"},
        "norm": {"scale": "norm_scale", "bias": "norm_bias"}}
    model = TinyCNN(norm=snj.norm_factory("gn+:num_groups=2"))
    image = fixed_batch()["image"]
    params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                            image)["params"]
    assert model_norm_paths(model, image) == ("norm",)
    assert norm_param_labels(params, model_norm_paths(model, image)) == {
        "conv": {"kernel": "weight"}, "head": {"kernel": "weight", "bias": "weight"},
        "norm": {"scale": "norm_scale", "bias": "norm_bias", "lambda": "norm_other"}}


@pytest.mark.parametrize("mode, norm_scale, norm_bias", [
    ("zero", [0.15, 0.05], [0.05, -0.2]),     # wd * gamma, wd * beta
    ("one", [0.05, -0.05], [0.05, -0.2]),     # wd * (gamma - 1), wd * beta
    ("off", [0.0, 0.0], [0.0, 0.0]),
])
def test_weight_decay_towards_hand_values(mode, norm_scale, norm_bias):
    tx = weight_decay_towards(0.1, norm_decay=mode,
                              labels=norm_param_labels(PARAMS, NORM_PATHS))
    grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.25), PARAMS)
    updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    expected = {"dense": {"kernel": [0.25 + 0.2, 0.25 - 0.1], "bias": [0.25 + 0.3]},
                "norm": {"scale": [0.25 + v for v in norm_scale],
                         "bias": [0.25 + v for v in norm_bias]}}
    chex.assert_trees_all_close(updates, jax.tree_util.tree_map(
        jnp.asarray, expected, is_leaf=lambda x: isinstance(x, list)),
                                atol=1e-7)


def test_weight_decay_towards_with_a_schedule():
    tx = weight_decay_towards(lambda count: 0.1 * (count + 1), norm_decay="one",
                              labels=lambda params: norm_param_labels(params, NORM_PATHS))
    zeros = jax.tree_util.tree_map(jnp.zeros_like, PARAMS)
    state = tx.init(PARAMS)
    first, state = tx.update(zeros, state, PARAMS)
    second, _ = tx.update(zeros, state, PARAMS)
    chex.assert_trees_all_close(first["norm"]["scale"], jnp.array([0.05, -0.05]), atol=1e-7)
    chex.assert_trees_all_close(second["norm"]["scale"], jnp.array([0.1, -0.1]), atol=1e-7)
    chex.assert_trees_all_close(second["dense"]["kernel"], jnp.array([0.4, -0.2]), atol=1e-7)
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update(zeros, state)


def test_sgd_adam_and_adamw_weight_decay_against_references():
    grads = jax.tree_util.tree_map(lambda p: 0.3 * p + 0.1, PARAMS)

    def run(tx, steps=3):
        params, state = PARAMS, tx.init(PARAMS)
        for _ in range(steps):
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
        return params

    # coupled L2 before heavy-ball momentum (PyTorch SGD weight_decay) == optax chain
    ours = run(make_optimizer("sgd", 0.1, momentum=0.9, weight_decay=0.01, norm_decay="zero"))
    ref = run(optax.chain(optax.add_decayed_weights(0.01), optax.sgd(0.1, momentum=0.9)))
    chex.assert_trees_all_close(ours, ref, atol=1e-6)
    # "off" == optax's masked decay that skips the norm parameters
    mask = {"dense": {"kernel": True, "bias": True}, "norm": {"scale": False, "bias": False}}
    ours = run(make_optimizer("adamw", 0.01, weight_decay=0.1, norm_decay="off",
                              norm_paths=NORM_PATHS))
    ref = run(optax.adamw(0.01, weight_decay=0.1, mask=mask))
    chex.assert_trees_all_close(ours, ref, atol=1e-6)
    ours = run(make_optimizer("adamw", 0.01, weight_decay=0.1, norm_decay="zero"))
    chex.assert_trees_all_close(ours, run(optax.adamw(0.01, weight_decay=0.1)), atol=1e-6)
    # "adam": PyTorch's Adam(weight_decay) -- L2 added to the gradient before the
    # moments -- against a float64 NumPy transcription of its update rule
    ours = run(make_optimizer("adam", 0.01, weight_decay=0.1, norm_decay="zero"))

    def torch_adam(p, g_fn, lr=0.01, wd=0.1, b1=0.9, b2=0.999, eps=1e-8, steps=3):
        p = np.asarray(p, np.float64)
        m = v = np.zeros_like(p)
        for t in range(1, steps + 1):
            g = np.asarray(g_fn(p), np.float64) + wd * p
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            p = p - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
        return p

    fixed = jax.tree_util.tree_map(np.asarray, grads)  # the gradient does not follow p here
    ref = jax.tree_util.tree_map(lambda p, g: torch_adam(p, lambda _: g), PARAMS, fixed)
    chex.assert_trees_all_close(ours, jax.tree_util.tree_map(np.float32, ref), atol=1e-6)
    # nesterov == optax's nesterov sgd
    ours = run(make_optimizer("nesterov", 0.1, momentum=0.9))
    chex.assert_trees_all_close(ours, run(optax.sgd(0.1, momentum=0.9, nesterov=True)),
                                atol=1e-6)


def test_one_sgd_step_gamma_towards_one_by_hand():
    # plain SGD (no momentum), lr 0.5, wd 0.1, zero gradients: p <- p - 0.5 * 0.1 * (p - target)
    tx = make_optimizer("sgd", 0.5, momentum=0.0, weight_decay=0.1, norm_decay="one",
                        norm_paths=NORM_PATHS)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, PARAMS)
    updates, _ = tx.update(zeros, tx.init(PARAMS), PARAMS)
    new = optax.apply_updates(PARAMS, updates)
    chex.assert_trees_all_close(new["norm"]["scale"], jnp.array([1.5 - 0.025, 0.5 + 0.025]),
                                atol=1e-7)
    chex.assert_trees_all_close(new["norm"]["bias"], jnp.array([0.5 * 0.95, -2.0 * 0.95]),
                                atol=1e-7)
    chex.assert_trees_all_close(new["dense"]["kernel"], jnp.array([2.0 * 0.95, -1.0 * 0.95]),
                                atol=1e-7)


def test_gradient_clipping_by_global_norm():
    params = {"a": jnp.zeros(3), "b": jnp.zeros(1)}
    grads = {"a": jnp.array([3.0, 0.0, 4.0]), "b": jnp.array([12.0])}  # global norm 13
    tx = make_optimizer("sgd", 1.0, momentum=0.0, grad_clip_norm=1.3)
    updates, _ = tx.update(grads, tx.init(params), params)
    chex.assert_trees_all_close(updates, {"a": jnp.array([-0.3, 0.0, -0.4]),
                                          "b": jnp.array([-1.2])}, atol=1e-6)
    small = {"a": jnp.array([0.3, 0.0, 0.4]), "b": jnp.array([0.0])}  # norm 0.5: unchanged
    updates, _ = tx.update(small, tx.init(params), params)
    chex.assert_trees_all_close(updates, jax.tree_util.tree_map(jnp.negative, small), atol=1e-7)


class Gain(nn.Module):
    """Not a norm layer: a learned per-channel gain and shift (params ``scale``, ``bias``)."""

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        return x * scale + self.param("bias", nn.initializers.zeros, (x.shape[-1],))


class GainLayerNormNet(nn.Module):
    """gain -> flax LayerNorm -> dense."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        return nn.Dense(3, name="head")(nn.LayerNorm(name="ln")(Gain(name="gain")(x)))


def test_only_the_registrys_norm_layers_get_the_norm_decay():
    model, x = GainLayerNormNet(), jnp.ones((2, 4))
    params = model.init(jax.random.key(0), x)["params"]
    paths = model_norm_paths(model, x)
    assert paths == ("ln",)
    assert norm_param_labels(params, paths) == {
        "gain": {"scale": "weight", "bias": "weight"},
        "ln": {"scale": "norm_scale", "bias": "norm_bias"},
        "head": {"kernel": "weight", "bias": "weight"}}
    # "off": the gain's scale (1.0) decays like any weight, LayerNorm's does not
    tx = make_optimizer("sgd", 1.0, momentum=0.0, weight_decay=0.1, norm_decay="off",
                        norm_paths=paths)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["gain"]["scale"], [-0.1] * 4, atol=1e-7)
    np.testing.assert_allclose(updates["ln"]["scale"], [0.0] * 4, atol=0)
    with pytest.raises(ValueError, match="norm_decay='off' needs the norm layers; pass "
                                         "norm_paths=model_norm_paths"):
        make_optimizer("sgd", 0.1, weight_decay=0.1, norm_decay="off")
    with pytest.raises(ValueError, match="norm_decay='one' needs the norm layers' parameters"):
        weight_decay_towards(0.1, norm_decay="one")


def test_layer_norm_outputs_get_output_noise_and_are_analysed():
    from seqnorm_jax import analysis

    model = GainLayerNormNet()
    x = jax.random.normal(jax.random.key(1), (8, 4))
    variables = model.init(jax.random.key(0), x)
    plain = model.apply(variables, x)
    with output_noise_scope(0.5, 0.0):  # std 0: +0.5 on every norm layer's output
        noisy = model.apply(variables, x, rngs={"output_noise": jax.random.key(2)})
    kernel = variables["params"]["head"]["kernel"]
    np.testing.assert_allclose(noisy - plain, jnp.broadcast_to(0.5 * kernel.sum(0), plain.shape),
                               atol=1e-5)
    r = analysis.output_range(model, variables, x, layer="ln")
    assert r["layer"] == "ln" and r["set_size"] == 4
    np.testing.assert_allclose(r["bound"], 3 ** 0.5, rtol=1e-7)
    assert 1.0 < r["train_abs_max"] <= 3 ** 0.5 + 1e-5


def test_make_optimizer_errors():
    with pytest.raises(ValueError, match="optimizer must be one of .*got 'adagrad'"):
        make_optimizer("adagrad", 0.1)
    with pytest.raises(ValueError, match="grad_clip_norm must be positive"):
        make_optimizer("sgd", 0.1, grad_clip_norm=0.0)
    with pytest.raises(ValueError, match="norm_decay must be one of"):
        make_optimizer("sgd", 0.1, weight_decay=1e-4, norm_decay="half")
    with pytest.raises(ValueError, match="'nesterov' needs momentum"):
        make_optimizer("nesterov", 0.1, momentum=0.0)


# ------------------------------------------------------------------------------ steps


def test_train_step_sharded_lowers_loss_and_updates_batch_stats(mesh):
    model = TinyCNN(norm=snj.norm_factory("ghost:batch_groups=4"))
    batch = fixed_batch()
    tx = make_optimizer("sgd", 0.1, momentum=0.9)
    state = create_train_state(model, jax.random.key(0), batch["image"][:1], tx)
    # reference for the running statistics: the layer's own update with the old params
    _, upd = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                         batch["image"], train=True, mutable=["batch_stats"])
    step = jit_train_step(mesh, lr_fn=optax.constant_schedule(0.1))
    sharded = distributed.shard_batch(batch, mesh)
    assert len(sharded["image"].sharding.device_set) == N_DEV
    new, metrics = step(distributed.replicate(state, mesh), sharded)
    # the loss of the step is the loss of the fixed batch at the old parameters
    logits, _ = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                            batch["image"], train=True, mutable=["batch_stats"])
    loss0 = cross_entropy_loss(logits, batch["label"]).mean()
    np.testing.assert_allclose(float(metrics["loss"]), float(loss0), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["lr"]), 0.1, rtol=1e-7)
    assert int(new.step) == 1
    chex.assert_trees_all_close(new.batch_stats, upd["batch_stats"], atol=1e-6)
    assert not np.allclose(new.batch_stats["norm"]["mean"], 0.0)
    # single-device, unsharded step gives the same state
    single, _ = jax.jit(train_step)(state, batch)
    chex.assert_trees_all_close(new.params, single.params, atol=2e-6, rtol=1e-5)
    # the loss on the same batch went down
    for _ in range(3):
        new, m = step(new, sharded)
        assert float(m["loss"]) < float(loss0)


def test_bfloat16_mixed_precision_state_dtypes(mesh):
    model = TinyCNN(norm=snj.norm_factory("seqnorm:channel_groups=2,batch_groups=2"),
                    dtype=jnp.bfloat16)
    batch = fixed_batch()
    tx = make_optimizer("sgd", 0.05, momentum=0.9, weight_decay=1e-4)
    state = distributed.replicate(
        create_train_state(model, jax.random.key(1), batch["image"][:1], tx), mesh)
    state, metrics = jit_train_step(mesh)(state, distributed.shard_batch(batch, mesh))
    for tree in (state.params, state.batch_stats, state.opt_state):
        for leaf in jax.tree_util.tree_leaves(tree):
            if jnp.issubdtype(leaf.dtype, jnp.floating):
                assert leaf.dtype == jnp.float32
    assert metrics["loss"].dtype == jnp.float32 and np.isfinite(float(metrics["loss"]))
    # the computation itself is in bfloat16
    hidden = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                         batch["image"], train=False, capture_intermediates=True,
                         mutable=["intermediates"])[1]["intermediates"]
    assert hidden["norm"]["__call__"][0].dtype == jnp.bfloat16


def test_eval_example_weight_zero_is_running_stats_and_one_is_instance_norm(mesh):
    model = TinyCNN(norm=snj.BatchNorm)
    batch = fixed_batch(n=12, seed=3)
    state = create_train_state(model, jax.random.key(2), batch["image"][:1],
                               make_optimizer("sgd", 0.1))
    rng = np.random.default_rng(7)
    state = state.replace(batch_stats={"norm": {
        "mean": jnp.asarray(rng.normal(size=8), jnp.float32),
        "var": jnp.asarray(rng.uniform(0.5, 2.0, size=8), jnp.float32)}})
    state = state.replace(params={**state.params, "norm": {
        "scale": jnp.asarray(rng.uniform(0.5, 1.5, size=8), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=8), jnp.float32)}})
    p = state.params

    def reference(norm_layer, variables):
        h = nn.Conv(8, (3, 3), use_bias=False).apply({"params": p["conv"]}, batch["image"])
        h = norm_layer.apply(variables, h)
        return nn.Dense(10).apply({"params": p["head"]}, nn.relu(h).mean(axis=(1, 2)))

    # alpha = 0: flax's BatchNorm with the running statistics
    ref0 = reference(nn.BatchNorm(use_running_average=True),
                     {"params": p["norm"], "batch_stats": state.batch_stats["norm"]})
    # alpha = 1: each example normalised by its own statistics = flax's InstanceNorm
    ref1 = reference(nn.InstanceNorm(epsilon=1e-5), {"params": p["norm"]})
    variables = {"params": p, "batch_stats": state.batch_stats}
    with example_weight_scope(0.0):
        out0 = model.apply(variables, batch["image"], train=False)
    with example_weight_scope(1.0):
        out1 = model.apply(variables, batch["image"], train=False)
    chex.assert_trees_all_close(out0, ref0, atol=2e-5, rtol=1e-5)
    chex.assert_trees_all_close(out1, ref1, atol=2e-4, rtol=1e-4)
    # eval_step (sharded, padded to 16 with a mask) sums the same losses
    padded = {"image": np.concatenate([batch["image"], batch["image"][:4]]),
              "label": np.concatenate([batch["label"], batch["label"][:4]]),
              "mask": np.concatenate([np.ones(12, np.float32), np.zeros(4, np.float32)])}
    ev = jit_eval_step(mesh)
    sharded = distributed.shard_batch(padded, mesh)
    for alpha, ref in ((0.0, ref0), (1.0, ref1)):
        sums = ev(distributed.replicate(state, mesh), sharded, jnp.float32(alpha))
        np.testing.assert_allclose(float(sums["count"]), 12)
        np.testing.assert_allclose(float(sums["loss_sum"]),
                                   float(cross_entropy_loss(ref, batch["label"]).sum()),
                                   rtol=1e-4)
        np.testing.assert_allclose(
            float(sums["correct"]), float((np.argmax(ref, -1) == batch["label"]).sum()))
    # unsharded, unpadded eval_step agrees
    plain = eval_step(state, batch, 1.0)
    np.testing.assert_allclose(float(plain["loss_sum"]),
                               float(cross_entropy_loss(ref1, batch["label"]).sum()), rtol=1e-4)


def test_train_step_noisy_bn_uses_step_rng():
    model = TinyCNN(norm=snj.norm_factory("noisybn:noise_std=0.5"))
    batch = fixed_batch()
    state = create_train_state(model, jax.random.key(4), batch["image"][:1],
                               make_optimizer("sgd", 0.1))
    a, ma = jax.jit(train_step)(state, batch)
    b, mb = jax.jit(train_step)(state, batch)  # same step -> same noise
    np.testing.assert_array_equal(np.asarray(ma["loss"]), np.asarray(mb["loss"]))
    c, mc = jax.jit(train_step)(state.replace(step=state.step + 1), batch)  # other noise
    assert float(mc["loss"]) != float(ma["loss"])


@pytest.mark.parametrize("layer", [snj.GroupNorm(num_groups=2), snj.BatchNorm(), nn.BatchNorm()])
def test_output_noise_scope_adds_gaussian_noise_to_norm_outputs(layer):
    x = jnp.asarray(fixed_batch(n=64, hw=16)["image"]).repeat(4, axis=-1)
    kw = {"use_running_average": False} if not isinstance(layer, snj.GroupNorm) else {}
    variables = layer.init(jax.random.key(0), x, **kw)
    run = lambda: layer.apply(variables, x, rngs={"output_noise": jax.random.key(1)},
                              mutable=["batch_stats"], **kw)[0]
    clean = run()
    with output_noise_scope(0.5, 0.0):           # a constant shift, exactly
        np.testing.assert_allclose(run() - clean, 0.5, atol=1e-6)
    with output_noise_scope(1e-3, 1.001):        # paper 004's noise: 65536 draws
        d = np.asarray(run() - clean, np.float64)
    assert abs(d.mean() - 1e-3) < 4 * 1.001 / np.sqrt(d.size)
    np.testing.assert_allclose(d.std(), 1.001, rtol=0.02)


def test_train_step_output_noise_only_in_training_and_identity_untouched():
    batch = fixed_batch()
    tx = make_optimizer("sgd", 0.1)
    state = create_train_state(TinyCNN(), jax.random.key(4), batch["image"][:1], tx)
    _, clean = jax.jit(train_step)(state, batch)
    step = jax.jit(lambda s, b: train_step(s, b, output_noise=(1e-3, 1.001)))
    _, noisy = step(state, batch)
    _, again = step(state, batch)                # the noise is a function of the step
    assert float(noisy["loss"]) != float(clean["loss"])
    assert float(noisy["loss"]) == float(again["loss"])
    # no norm layer ("none"): nothing to perturb
    plain = create_train_state(TinyCNN(norm=snj.norm_factory("none")), jax.random.key(4),
                               batch["image"][:1], tx)
    _, a = jax.jit(train_step)(plain, batch)
    _, b = step(plain, batch)
    assert float(a["loss"]) == float(b["loss"])


# ------------------------------------------------------------------- config and loop


def test_trainer_step_hooks_see_every_step_before_the_update():
    seen, epochs = [], []

    class Hook:
        def __call__(self, state, batch, step):
            seen.append((step, int(state.step), batch["image"].shape[0]))

        def on_epoch_end(self, state, epoch):
            epochs.append((epoch, int(state.step)))

    trainer = Trainer(digits_config(epochs=2), step_hooks=[Hook()], save_checkpoints=False)
    trainer.fit()
    n = trainer.steps_per_epoch
    assert seen == [(i, i, 32) for i in range(2 * n)]
    assert epochs == [(0, n), (1, 2 * n)]
    with pytest.raises(ValueError, match="step_hooks must be callables"):
        Trainer(digits_config(), step_hooks=[3])
    with pytest.raises(ValueError, match="TrainConfig.output_noise_std=-1"):
        digits_config(output_noise_std=-1)
    assert digits_config().output_noise is None
    assert digits_config(output_noise_mean=1e-3, output_noise_std=1.001).output_noise == (
        1e-3, 1.001)



def test_train_config_json_round_trip_and_errors(tmp_path):
    cfg = TrainConfig(model="mlp", norm="ghost:batch_groups=4", model_kwargs={"features": [16]},
                      decay_epochs=[3.0, 6.0], schedule="step", grad_clip_norm=1.0)
    path = tmp_path / "c.json"
    cfg.to_json(path)
    assert TrainConfig.from_json(path) == cfg
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match=r"unknown TrainConfig field\(s\) \['lr_max'\]"):
        TrainConfig.from_dict({"lr_max": 1.0})
    with pytest.raises(ValueError, match="TrainConfig.batch_size=0: must be an integer >= 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="TrainConfig.norm_weight_decay='two'"):
        TrainConfig(norm_weight_decay="two")
    with pytest.raises(ValueError,
                       match=r"TrainConfig: example_weight must be in \[0, 1\].*got 1\.5"):
        TrainConfig(example_weight=1.5)


def digits_config(**changes):
    base = dict(model="mlp", model_kwargs={"features": [16]}, norm="ghost:batch_groups=2",
                dataset="digits", epochs=2, batch_size=32, eval_batch_size=128, lr=0.1,
                log_every=8, progress=False, seed=3)
    base.update(changes)
    return TrainConfig(**base)


def _deterministic(rows):
    return [{k: v for k, v in r.items() if k not in ("wall_time", "images_per_sec", "epoch_time")}
            for r in rows]


def test_fit_writes_metrics_and_resume_is_bit_identical(tmp_path):
    # NoisyBatchNorm + weight decay + momentum: the noise, optimizer state and running
    # statistics must all be restored exactly.
    cfg = digits_config(norm="noisybn:noise_std=0.05", checkpoint_every=10)
    full = Trainer(cfg, out_dir=tmp_path / "full").fit()

    part = tmp_path / "part"
    stopped = Trainer(cfg, out_dir=part, max_steps=23).fit()  # mid-epoch 1 (45 steps/epoch)
    assert int(stopped.state.step) == 23
    assert sorted(os.listdir(part / "checkpoints")) == ["20", "23"]
    resumed = Trainer(cfg, out_dir=part).fit(resume=True)

    assert int(resumed.state.step) == int(full.state.step) == 2 * 45
    for a, b in zip(jax.tree_util.tree_leaves((full.state.params, full.state.batch_stats,
                                               full.state.opt_state)),
                    jax.tree_util.tree_leaves((resumed.state.params, resumed.state.batch_stats,
                                               resumed.state.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the metrics files read as one uninterrupted run
    rows_full = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    assert _deterministic(read_jsonl(part / "metrics.jsonl")) == _deterministic(rows_full)

    # files and columns
    with open(tmp_path / "full" / "metrics.csv") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == METRIC_COLUMNS
        csv_rows = list(reader)
    assert len(csv_rows) == len(rows_full)
    train_rows = [r for r in rows_full if r["kind"] == "train"]
    eval_rows = [r for r in rows_full if r["kind"] == "eval"]
    assert [r["step"] for r in train_rows] == [8, 16, 24, 32, 40, 45, 48, 56, 64, 72, 80, 88, 90]
    assert [r["epoch"] for r in eval_rows] == [1, 2]
    for r in train_rows:
        assert {"loss", "accuracy", "lr", "images_per_sec", "epoch"} <= set(r)
        assert np.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1
    for r in eval_rows:
        assert {"eval_loss", "eval_accuracy", "loss", "accuracy", "epoch_time"} <= set(r)
    # the logged lr is the schedule's (cosine from 0.1 over 90 steps) at the row's last step
    np.testing.assert_allclose(train_rows[0]["lr"], 0.05 * (1 + math.cos(math.pi * 7 / 90)),
                               rtol=1e-6)
    assert eval_rows[-1]["eval_accuracy"] > 0.8  # digits is easy
    assert json.loads((tmp_path / "full" / "config.json").read_text()) == cfg.to_dict()


def test_fit_with_gradient_accumulation_trains_ghost_norm():
    # BatchNorm with 2 accumulated micro-batches == GhostNorm(batch_groups=2), step by step
    accum = Trainer(digits_config(norm="bn", grad_accum_steps=2), max_steps=3).fit()
    ghost = Trainer(digits_config(norm="ghost:batch_groups=2"), max_steps=3).fit()
    assert int(accum.state.step) == int(ghost.state.step) == 3
    chex.assert_trees_all_close(accum.state.params, ghost.state.params, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(accum.state.batch_stats, ghost.state.batch_stats, atol=1e-6,
                                rtol=1e-5)
    with pytest.raises(ValueError, match="grad_accum_steps=3: must divide batch_size=32"):
        digits_config(grad_accum_steps=3)


def test_one_cpu_device_loop_takes_host_batches_and_trains_as_train_step():
    # on one CPU device the loop hands the loader's uint8 NumPy batches to its compiled step
    # (normalised there); the run equals train_step over the host-normalised batches, and
    # the run on the 4-device mesh (batches put on the devices ahead)
    cfg = digits_config(norm="bn", epochs=1)
    one = Trainer(cfg, mesh=distributed.data_mesh(jax.devices()[:1]), max_steps=6)
    first = next(iter(one._device_batches(0, 0)))
    assert isinstance(first["image"], np.ndarray) and first["image"].dtype == np.uint8
    result = one.fit()
    assert int(result.state.step) == 6

    state = one.init_state()
    step = jax.jit(train_step)
    for _, batch in zip(range(6), one._loader(0, 0)):
        state, _ = step(state, {"image": batch["image"], "label": batch["label"]})
    chex.assert_trees_all_close((result.state.params, result.state.batch_stats),
                                (state.params, state.batch_stats), atol=1e-6, rtol=1e-5)
    mesh = Trainer(cfg, max_steps=6).fit()
    chex.assert_trees_all_close(result.state.params, mesh.state.params, atol=1e-5, rtol=1e-5)


def test_evaluate_counts_every_example_once():
    cfg = digits_config(epochs=1, eval_batch_size=50)  # 50 -> 52 per batch on 4 devices
    trainer = Trainer(cfg)
    state = trainer.init_state()
    metrics = trainer.evaluate(state)
    assert metrics["count"] == len(trainer.eval_source)
    bigger = Trainer(cfg.replace(eval_batch_size=400)).evaluate(state)
    np.testing.assert_allclose(bigger["eval_loss"], metrics["eval_loss"], rtol=1e-5)
    assert bigger["eval_accuracy"] == metrics["eval_accuracy"]


def test_trainer_errors_name_the_problem():
    with pytest.raises(ValueError, match="batch_size=30 is not divisible by the 4 devices"):
        Trainer(digits_config(batch_size=30))
    with pytest.raises(ValueError, match="train_size=5000 is larger than the training set"):
        Trainer(digits_config(train_size=5000))
    with pytest.raises(ValueError, match="unknown model 'mlp9'"):
        Trainer(digits_config(model="mlp9"))


@pytest.mark.parametrize("make", [
    lambda: jax.make_mesh((N_DEV,), ("data",)),  # jax's default axis type: Explicit
    lambda: jax.make_mesh((N_DEV,), ("batch",)),  # a 1-D mesh's only axis splits the batch
    lambda: jax.make_mesh((N_DEV,), ("data",), axis_types=(jax.sharding.AxisType.Auto,)),
], ids=["explicit", "explicit-other-name", "auto"])
def test_trainer_accepts_a_users_mesh(make, tmp_path):
    mesh = make()
    cfg = digits_config(norm="bn", log_every=4)
    ref = Trainer(cfg, max_steps=6).fit()  # distributed.data_mesh(): Auto, all devices
    got = Trainer(cfg, mesh=mesh, max_steps=6, out_dir=tmp_path / "run").fit()
    assert int(got.state.step) == 6
    chex.assert_trees_all_close(got.state.params, ref.state.params, atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_close(got.state.batch_stats, ref.state.batch_stats, atol=1e-6,
                                rtol=1e-6)
    np.testing.assert_allclose([r["loss"] for r in got.train_rows],
                               [r["loss"] for r in ref.train_rows], rtol=1e-6)
    assert got.state.params["head"]["kernel"].sharding.mesh.axis_names == mesh.axis_names


def test_trainer_mesh_and_norm_errors_before_any_work(tmp_path):
    two_d = jax.make_mesh((2, 2), ("x", "y"))
    with pytest.raises(ValueError, match=r"mesh axes \('x', 'y'\): name the axis that splits "
                                         r"the batch 'data'"):
        Trainer(digits_config(), mesh=two_d)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"TrainConfig.norm \(--norm\)='ghost:batch_groups=3' "
                                         r"does not fit this run \(model mlp, batch 32 over 4 "
                                         r"devices\): .*batch_groups=3"):
        Trainer(digits_config(norm="ghost:batch_groups=3"), out_dir=out)
    with pytest.raises(ValueError, match=r"'seqnorm:channel_groups=3,batch_groups=2' does not "
                                         r"fit this run.*channel"):
        Trainer(digits_config(norm="seqnorm:channel_groups=3,batch_groups=2"), out_dir=out)
    assert not out.exists()
