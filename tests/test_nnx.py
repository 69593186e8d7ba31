"""The NNX layers (``seqnorm_jax.nnx``): equal to their linen twins bit for bit, and at home
in NNX (``train``/``eval``/``nnx.view``, ``nnx.jit`` + ``nnx.Optimizer``,
``nnx.vmap``/``nnx.scan``, ``nnx.state`` through Orbax)."""

import functools
import inspect

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import seqnorm_jax as snj
import seqnorm_jax.nnx as snn
from seqnorm_jax import functional as F

C = 8
# (NNX class, linen class, the layer's own settings)
TWINS = {
    "BatchNorm": (snn.BatchNorm, snj.BatchNorm, {}),
    "GhostNorm": (snn.GhostNorm, snj.GhostNorm, {"batch_groups": 2}),
    "GhostNorm_strided": (snn.GhostNorm, snj.GhostNorm,
                          {"ghost_size": 2, "grouping": "strided"}),
    "SeqNorm": (snn.SeqNorm, snj.SeqNorm, {"channel_groups": 2, "batch_groups": 2}),
    "BatchGroupNorm": (snn.BatchGroupNorm, snj.BatchGroupNorm,
                       {"batch_groups": 2, "channel_groups": 4}),
    "HeterologousNorm": (snn.HeterologousNorm, snj.HeterologousNorm, {"std_groups": 2}),
    "GNPlus": (snn.GNPlus, snj.GNPlus, {"num_groups": 4, "variant": "parallel",
                                        "lambda_init": 0.3}),
    "BGN": (snn.BGN, snj.BGN, {"num_groups": 2}),
    "NoisyBatchNorm": (snn.NoisyBatchNorm, snj.NoisyBatchNorm, {"noise_std": 0.0}),
}
UNIFORM = nn.initializers.uniform(1.0)


def batches(n_steps=3, shape=(8, 3, C)):
    keys = jax.random.split(jax.random.key(7), n_steps)
    return [jax.random.normal(k, shape) * 1.5 + 0.5 for k in keys]


def load_linen(layer: nnx.Module, variables) -> None:
    """Copy a linen layer's variables into its NNX twin (``params/lambda`` is ``lambda_``)."""
    for name, value in variables["params"].items():
        getattr(layer, "lambda_" if name == "lambda" else name)[...] = value
    for name, value in variables.get("batch_stats", {}).items():
        getattr(layer, name)[...] = value


@pytest.mark.parametrize("name", sorted(TWINS))
def test_nnx_equals_linen_bit_for_bit(name):
    """Three training steps (one with a mask), then inference with and without
    ``example_weight``: identical outputs and running statistics."""
    nnx_cls, linen_cls, own = TWINS[name]
    common = dict(momentum=0.8, epsilon=1e-4, bias_init=UNIFORM, scale_init=UNIFORM)
    xs = batches()
    mask = jnp.arange(8)[:, None, None] % 3 != 0
    linen_layer = linen_cls(**common, **own)
    variables = linen_layer.init(jax.random.key(0), xs[0], use_running_average=False)
    layer = nnx_cls(C, **common, **own, rngs=nnx.Rngs(1))
    load_linen(layer, variables)
    for step, x in enumerate(xs):
        m = mask if step == 1 else None
        y_linen, state = linen_layer.apply(variables, x, use_running_average=False, mask=m,
                                           mutable=["batch_stats"])
        variables = {**variables, **state}
        y = layer(x, mask=m)
        np.testing.assert_array_equal(y, y_linen)
        np.testing.assert_array_equal(layer.mean[...], variables["batch_stats"]["mean"])
        np.testing.assert_array_equal(layer.var[...], variables["batch_stats"]["var"])
    assert not np.allclose(layer.var[...], 1.0)
    layer.eval()
    for weight in (0.0, 0.4):
        y_linen = linen_layer.apply(variables, xs[0], use_running_average=True,
                                    example_weight=weight)
        np.testing.assert_array_equal(layer(xs[0], example_weight=weight), y_linen)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.float16])
@pytest.mark.parametrize("use_fast_variance", [True, False])
def test_nnx_equals_linen_across_dtypes(dtype, param_dtype, use_fast_variance):
    """flax's own NNX-vs-linen product (dtype x param_dtype x use_fast_variance, with and
    without a mask), on GhostNorm."""
    own = dict(batch_groups=2, dtype=dtype, param_dtype=param_dtype,
               use_fast_variance=use_fast_variance, scale_init=UNIFORM, bias_init=UNIFORM)
    x = batches(1)[0].astype(dtype)
    mask = jnp.arange(8)[:, None, None] % 4 != 1
    linen_layer = snj.GhostNorm(**own)
    variables = linen_layer.init(jax.random.key(0), x, use_running_average=False)
    layer = snn.GhostNorm(C, **own, rngs=nnx.Rngs(1))
    load_linen(layer, variables)
    for m in (None, mask):
        y_linen, state = linen_layer.apply(variables, x, use_running_average=False, mask=m,
                                           mutable=["batch_stats"])
        variables = {**variables, **state}
        y = layer(x, mask=m)
        assert y.dtype == dtype
        np.testing.assert_array_equal(y, y_linen)
        np.testing.assert_array_equal(layer.var[...], variables["batch_stats"]["var"])


def test_group_norm_nnx_equals_linen_and_flax_nnx():
    x = batches(1, (4, 3, 3, C))[0]
    mask = jax.random.uniform(jax.random.key(3), x.shape) > 0.3
    ours = snn.GroupNorm(C, num_groups=2, scale_init=UNIFORM, bias_init=UNIFORM,
                         reduction_axes=(1, 2, 3), rngs=nnx.Rngs(0))
    theirs = nnx.GroupNorm(C, num_groups=2, scale_init=UNIFORM, bias_init=UNIFORM,
                           reduction_axes=(1, 2, 3), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(ours.scale[...], theirs.scale[...])  # flax's key order
    linen_layer = snj.GroupNorm(2, reduction_axes=(1, 2, 3))
    v = {"params": {"scale": ours.scale[...], "bias": ours.bias[...]}}
    for m in (None, mask):
        np.testing.assert_array_equal(ours(x, mask=m), linen_layer.apply(v, x, mask=m))
        np.testing.assert_allclose(ours(x, mask=m), theirs(x, mask=m), atol=2e-5)


def test_noisy_batch_norm_draws_from_its_stream_or_the_call():
    x = batches(1)[0]
    layer = snn.NoisyBatchNorm(C, noise_std=0.1, rngs=nnx.Rngs(0, noise=5))
    key = jax.random.key(11)
    y = layer(x, rngs=key)  # the call's key wins
    want = F.noisy_batch_norm(x, layer.scale[...], layer.bias[...], noise_std=0.1, rng=key)
    np.testing.assert_array_equal(y, want)
    y1, y2 = layer(x), layer(x)  # the layer's own stream advances
    assert not np.allclose(y1, y2)
    again = snn.NoisyBatchNorm(C, noise_std=0.1, rngs=nnx.Rngs(0, noise=5))
    np.testing.assert_array_equal(again(x), y1)
    layer.eval()
    np.testing.assert_array_equal(layer(x), layer(x))  # no noise in inference


# ----------------------------------------------------------------------------
# train / eval / view
# ----------------------------------------------------------------------------


class Model(nnx.Module):
    def __init__(self, norm, rngs):
        self.linear = nnx.Linear(4, C, rngs=rngs)
        self.norm = norm(C, rngs=rngs)
        self.out = nnx.Linear(C, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.norm(self.linear(x))))


def test_eval_any_batch_size_view_and_call_override():
    """Trained with 4 ghost batches of 2, evaluated on a batch of 1: the running statistics."""
    model = Model(functools.partial(snn.GhostNorm, batch_groups=4, momentum=0.5), nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (8, 4))
    model(x)
    model(x * 2.0)
    norm = model.norm
    h = model.linear(x[:1])
    want_norm = (h - norm.mean[...]) / jnp.sqrt(norm.var[...] + norm.epsilon) * norm.scale[...]
    want = model.out(nnx.relu(want_norm + norm.bias[...]))

    view = nnx.view(model, use_running_average=True)
    assert view.norm.use_running_average and not model.norm.use_running_average
    np.testing.assert_allclose(view(x[:1]), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(norm(h, use_running_average=True), view.norm(h))
    with pytest.raises(F.BatchSizeError):  # training on a batch of 1 cannot make 4 groups
        model(x[:1])
    model.eval()
    np.testing.assert_array_equal(model(x[:1]), view(x[:1]))
    model.train()
    assert model.norm.use_running_average is False


def test_example_weight_through_view_matches_linen():
    layer = snn.BatchNorm(C, momentum=0.5, rngs=nnx.Rngs(0))
    x = batches(1)[0]
    layer(x)
    view = nnx.view(layer, use_running_average=True, example_weight=1.0)
    variables = {"params": {"scale": layer.scale[...], "bias": layer.bias[...]},
                 "batch_stats": {"mean": layer.mean[...], "var": layer.var[...]}}
    want = snj.BatchNorm().apply(variables, x, use_running_average=True, example_weight=1.0)
    np.testing.assert_array_equal(view(x), want)
    assert layer.example_weight == 0.0
    with pytest.raises(ValueError, match=r"BatchNorm: example_weight must be in \[0, 1\]"):
        nnx.view(layer, use_running_average=True, example_weight=2.0)
    with pytest.raises(ValueError, match="example_weight=1.0 applies at inference only"):
        nnx.view(layer, example_weight=1.0)(x)


def test_group_norm_takes_batch_norm_style_calls():
    """A model written for BatchNorm (eval, view, use_running_average) takes GroupNorm."""
    model = Model(functools.partial(snn.GroupNorm, num_groups=2), nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (5, 4))
    y = model(x)
    model.eval()
    np.testing.assert_array_equal(model(x), y)
    np.testing.assert_array_equal(nnx.view(model, use_running_average=False)(x), y)


# ----------------------------------------------------------------------------
# nnx.jit + nnx.Optimizer; nnx.vmap / nnx.scan
# ----------------------------------------------------------------------------


class LinenModel(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        h = nn.Dense(C, name="linear")(x)
        h = snj.GhostNorm(batch_groups=4, momentum=0.5, name="norm")(h, not train)
        return nn.Dense(3, name="out")(nn.relu(h))


def test_jit_optimizer_step_equals_linen_and_optax():
    """``nnx.jit`` steps with ``nnx.Optimizer(wrt=nnx.Param)``: the same parameters and
    running statistics as the linen model stepped with optax by hand."""
    model = Model(functools.partial(snn.GhostNorm, batch_groups=4, momentum=0.5), nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    xs = batches(3, (8, 4))
    target = jnp.arange(8) % 3

    @nnx.jit
    def step(model, optimizer, x):
        def loss_fn(model):
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    params = {"linear": {"kernel": model.linear.kernel[...], "bias": model.linear.bias[...]},
              "norm": {"scale": model.norm.scale[...], "bias": model.norm.bias[...]},
              "out": {"kernel": model.out.kernel[...], "bias": model.out.bias[...]}}
    stats = {"norm": {"mean": model.norm.mean[...], "var": model.norm.var[...]}}
    tx = optax.sgd(0.1)
    opt_state = tx.init(params)

    def linen_loss(params, stats, x):
        logits, state = LinenModel().apply({"params": params, "batch_stats": stats}, x,
                                           train=True, mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()
        return loss, state["batch_stats"]

    losses = []
    for x in xs:
        losses.append(step(model, optimizer, x))
        (loss, stats), grads = jax.value_and_grad(linen_loss, has_aux=True)(params, stats, x)
        updates, opt_state = tx.update(grads, opt_state)
        params = optax.apply_updates(params, updates)
        np.testing.assert_allclose(losses[-1], loss, rtol=1e-5)
    chex.assert_trees_all_close(
        {"kernel": model.linear.kernel[...], "scale": model.norm.scale[...],
         "mean": model.norm.mean[...], "var": model.norm.var[...]},
        {"kernel": params["linear"]["kernel"], "scale": params["norm"]["scale"],
         "mean": stats["norm"]["mean"], "var": stats["norm"]["var"]}, atol=1e-5, rtol=1e-5)
    assert losses[-1] < losses[0]


def test_vmap_creates_and_scan_applies_a_stack_of_layers():
    """Three SeqNorm layers made by ``nnx.vmap`` and run by ``nnx.scan`` equal the three
    layers made and applied one by one (outputs and each layer's running statistics)."""
    make = lambda key: snn.SeqNorm(C, channel_groups=2, batch_groups=2, momentum=0.5,
                                   scale_init=UNIFORM, rngs=nnx.Rngs(key))
    keys = jax.random.split(jax.random.key(0), 3)
    stack = nnx.vmap(make, in_axes=0, out_axes=0)(keys)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(h, layer):
        return layer(h * 2.0 + 1.0)

    x = batches(1)[0]
    y = forward(x, stack)
    want = x
    for i, key in enumerate(keys):
        layer = make(key)
        want = layer(want * 2.0 + 1.0)
        np.testing.assert_array_equal(stack.scale[...][i], layer.scale[...])
        np.testing.assert_allclose(stack.mean[...][i], layer.mean[...], atol=1e-6)
        np.testing.assert_allclose(stack.var[...][i], layer.var[...], atol=1e-6)
    np.testing.assert_allclose(y, want, atol=1e-5)


@pytest.mark.parametrize("make", [
    lambda: snn.BatchNorm(C, momentum=0.5, rngs=nnx.Rngs(0)),
    lambda: snn.GhostNorm(C, batch_groups=4, momentum=0.5, rngs=nnx.Rngs(0)),
    lambda: snn.SeqNorm(C, channel_groups=2, batch_groups=8, momentum=0.5, rngs=nnx.Rngs(0)),
], ids=["BatchNorm", "GhostNorm_g4", "SeqNorm_g8"])
def test_jit_on_a_default_mesh_equals_one_device(make):
    """Under ``nnx.jit`` with the batch on ``jax.make_mesh``'s default (Explicit) axes: the
    one-device outputs and running statistics, and the output keeps the batch split."""
    mesh = jax.make_mesh((4,), ("data",))
    x = batches(1, (16, 3, C))[0]
    xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    step = nnx.jit(lambda layer, x: layer(x))
    one, sharded = make(), make()
    y_one, y = step(one, x), step(sharded, xs)
    assert len(y.addressable_shards) == 4
    np.testing.assert_allclose(y, y_one, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(sharded.mean[...], one.mean[...], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(sharded.var[...], one.var[...], atol=2e-5, rtol=1e-5)


def test_state_round_trip_through_orbax(tmp_path):
    model = Model(functools.partial(snn.GNPlus, num_groups=2, momentum=0.5), nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (6, 4))
    model(x)
    model.eval()
    want = model(x)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "state", nnx.state(model))
    checkpointer.wait_until_finished()

    fresh = nnx.eval_shape(lambda: Model(functools.partial(snn.GNPlus, num_groups=2),
                                         nnx.Rngs(9)))
    graphdef, abstract = nnx.split(fresh)
    restored = nnx.merge(graphdef, checkpointer.restore(tmp_path / "state", abstract))
    restored.eval()
    np.testing.assert_array_equal(restored(x), want)
    np.testing.assert_array_equal(restored.norm.lambda_[...], model.norm.lambda_[...])
    np.testing.assert_array_equal(restored.norm.var[...], model.norm.var[...])


# ----------------------------------------------------------------------------
# flax.nnx's interface; checks at construction
# ----------------------------------------------------------------------------


def init_params(cls):
    return [(p.name, p.kind, p.default) for p in inspect.signature(cls.__init__).parameters.values()
            if p.name not in ("self", "promote_dtype")]


def same_default(name, ours, theirs):
    if name.endswith("_init"):  # initializer objects: compare what they make
        make = lambda init: init(jax.random.key(0), (3,), jnp.float32)
        return np.array_equal(make(ours), make(theirs))
    return ours == theirs


def test_batch_norm_takes_flax_nnx_arguments_and_example_weight():
    """flax.nnx.BatchNorm's arguments, kinds and defaults, in order (but
    ``promote_dtype``: our output dtype rule), and ``example_weight`` before ``rngs``."""
    theirs = {name: (kind, default) for name, kind, default in init_params(nnx.BatchNorm)}
    ours = init_params(snn.BatchNorm)
    names = [name for name, _, _ in ours]
    assert [n for n in names if n != "example_weight"] == list(theirs)
    assert names.index("example_weight") == names.index("rngs") - 1
    for name, kind, default in ours:
        if name != "example_weight":
            assert kind == theirs[name][0], name
            assert same_default(name, default, theirs[name][1]), name


def test_group_norm_takes_flax_nnx_arguments():
    ours, theirs = init_params(snn.GroupNorm), init_params(nnx.GroupNorm)
    assert [p[0] for p in ours] == [p[0] for p in theirs] + ["use_running_average"]
    for (name, kind, default), (_, their_kind, their_default) in zip(ours, theirs):
        assert kind == their_kind and same_default(name, default, their_default), name
    layer = snn.GroupNorm(6, 3, rngs=nnx.Rngs(0))
    assert (layer.num_groups, layer.group_size) == (3, 2)
    layer = snn.GroupNorm(6, None, 3, rngs=nnx.Rngs(0))
    assert (layer.num_groups, layer.group_size) == (2, 3)


@pytest.mark.parametrize("make, match", [
    (lambda: snn.GroupNorm(6, 4, rngs=nnx.Rngs(0)), r"GroupNorm: num_groups=4 does not divide"),
    (lambda: snn.GroupNorm(6, 2, 3, rngs=nnx.Rngs(0)), r"GroupNorm: give either num_groups or "
                                                        r"group_size, not both"),
    (lambda: snn.BatchNorm(C, momentum=1.5, rngs=nnx.Rngs(0)),
     r"BatchNorm: momentum must be in \[0, 1\]"),
    (lambda: snn.SeqNorm(C, epsilon=0.0, rngs=nnx.Rngs(0)),
     r"SeqNorm: epsilon must be a positive finite number"),
    (lambda: snn.GhostNorm(C, example_weight=-0.5, rngs=nnx.Rngs(0)),
     r"GhostNorm: example_weight must be in \[0, 1\]"),
], ids=["groups", "both", "momentum", "epsilon", "example_weight"])
def test_bad_settings_raise_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_missing_mode_says_how_to_set_it():
    layer = snn.BatchNorm(C, use_running_average=None, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"BatchNorm: use_running_average is not set.*"
                                         r"nnx.view\(model, use_running_average=True\)"):
        layer(batches(1)[0])
