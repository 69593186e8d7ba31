"""Models of ``seqnorm_jax.models``: every model with every layer family, exact
parameter counts, NumPy references, the drop-in promise, bfloat16, errors.

The models are built at tiny widths and 8x8/16x16 inputs so that the whole file
runs in well under a minute on 2 CPU cores; the full-size models are only traced
(``jax.eval_shape``) to count their parameters.
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import reference as ref
import seqnorm_jax as snj
from seqnorm_jax.models import (
    MODELS,
    BasicBlock,
    BottleneckBlock,
    CifarBasicBlock,
    CifarResNet,
    ResNet,
    SimpleNet,
    SmallCNN,
    VGG,
    WideResNet,
    adaptive_avg_pool,
    get_model,
)
from seqnorm_jax.models._common import _pool_matrix

BATCH = 8


def key(seed):
    """A PRNG key of the "rbg" implementation: XLA's RngBitGenerator compiles in a
    fraction of the time threefry takes on CPU, which dominates the cost of ``init``."""
    return jax.random.key(seed, impl="rbg")


# Tiny models compile in a fraction of the time at XLA optimization level 0 and run
# in microseconds either way.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


# One spec per layer family, with groups that divide the tiny models' batch of 8
# and their channel counts (all even).
LAYERS = {
    "bn": "bn",
    "ghost": "ghost:batch_groups=2",
    "gn": "gn:num_groups=2",
    "seqnorm": "seqnorm:channel_groups=2,batch_groups=2",
    "batchgroupnorm": "batchgroupnorm:batch_groups=2,channel_groups=2",
    "hn": "hn:std_groups=2",
    "gn+": "gn+:num_groups=2",
    "bgn": "bgn:num_groups=2",
    "noisybn": "noisybn",
    "none": "none",
}
# Layers without running statistics: no batch_stats collection at all.
STATELESS = {"gn", "none"}

# Tiny versions of every registry entry: (fields, input shape without the batch).
# The tiny ResNets have one block per stage and 2-8 filters; the ImageNet ones two
# stages (the first with the stride-1 and the second with the stride-2 projection).
TINY = {
    "simplenet": ({}, (28, 28, 1)),
    "mlp": ({"features": (16, 8)}, (4, 4, 1)),
    "mlp4": ({}, (4, 4, 1)),
    "cnn": ({"features": (4, 8)}, (8, 8, 1)),
    "cifar_resnet": ({"depth": 8, "width": 4}, (8, 8, 3)),
    "resnet20": ({"width": 4}, (8, 8, 3)),
    "resnet56": ({"width": 2}, (8, 8, 3)),
    "wrn": ({"depth": 10, "widen_factor": 1, "dropout_rate": 0.3}, (8, 8, 3)),
    "wrn28_10": ({"depth": 10, "widen_factor": 1}, (8, 8, 3)),
    "resnet18": ({"num_filters": 4, "stage_sizes": (1, 1)}, (16, 16, 3)),
    "resnet50": ({"num_filters": 2, "stage_sizes": (1, 1)}, (16, 16, 3)),
    "vgg11": ({"layers": (4, "M", 8, "M", 8, "M")}, (8, 8, 3)),
}
# One registry entry per architecture is trained (each costs an XLA compile); the
# presets that differ only in depth or width share its code and are checked by the
# tracing-only tests below.
TRAINED = ["simplenet", "cnn", "cifar_resnet", "wrn", "resnet18", "resnet50", "vgg11"]


def tiny(name, norm="bn", **extra):
    fields, shape = TINY[name]
    model = get_model(name, norm=norm, num_classes=5, **{**fields, **extra})
    x = normal(1, (BATCH, *shape))
    return model, x


def leaves(tree):
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def sgd_step(model, variables, x, labels, rng):
    """One optax SGD step on the cross-entropy; returns (loss, new variables)."""
    noise_key, dropout_key = jax.random.split(rng)

    def loss_fn(params):
        out, updates = model.apply(
            {**variables, "params": params}, x, train=True, mutable=["batch_stats"],
            rngs={"noise": noise_key, "dropout": dropout_key},
        )
        return optax.softmax_cross_entropy_with_integer_labels(out, labels).mean(), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    tx = optax.sgd(0.1)
    steps, _ = tx.update(grads, tx.init(variables["params"]), variables["params"])
    return loss, {**variables, **updates, "params": optax.apply_updates(variables["params"], steps)}


def init_step_infer(model, x):
    """init, one training step, then inference on 3 examples (running statistics, no
    rngs, nothing mutable, another batch size)."""
    variables = model.init(key(0), x, train=False)
    labels = jnp.arange(x.shape[0]) % model.num_classes
    loss, new = sgd_step(model, variables, x, labels, key(2))
    return variables, loss, new, model.apply(new, x[:3], train=False)


# The training cases: id -> (model, input, has no running statistics). Every
# architecture with BatchNorm, every layer family in the small CNN, and some
# combinations (option-B shortcuts, no norm, VGG's ImageNet head, bfloat16, flax's own
# layers as the factory).
CASES = {f"{name}-bn": (*tiny(name), False) for name in TRAINED}
CASES.update({f"cnn-{layer}": (*tiny("cnn", spec), layer in STATELESS)
              for layer, spec in LAYERS.items() if layer != "bn"})
CASES.update({
    "cifar_resnet-ghost-optionB": (*tiny("cifar_resnet", LAYERS["ghost"], shortcut="B"), False),
    "cifar_resnet-none": (*tiny("cifar_resnet", LAYERS["none"]), True),
    "wrn-gn": (*tiny("wrn", LAYERS["gn"]), True),
    "resnet18-seqnorm-cifar_stem": (*tiny("resnet18", LAYERS["seqnorm"], stem="cifar"), False),
    "vgg11-none-imagenet_head": (*tiny("vgg11", "none", head="imagenet", hidden=8), True),
    "cnn-ghost-bfloat16": (*tiny("cnn", LAYERS["ghost"], dtype=jnp.bfloat16), False),
    "cnn-flax_BatchNorm": (*tiny("cnn", functools.partial(nn.BatchNorm, momentum=0.9)), False),
    # flax's GroupNorm has no use_running_average field: bind_norm leaves it out.
    "cnn-flax_GroupNorm": (*tiny("cnn", functools.partial(nn.GroupNorm, num_groups=2)), True),
})


@pytest.fixture(scope="module")
def trained():
    """All training cases in one jitted function.

    XLA's per-compilation overhead dominates these tiny models on CPU, so one
    compilation of all of them (at optimization level 0, see ``fast_jit``) costs a
    fraction of one per model.
    """
    ids = list(CASES)
    run = fast_jit(lambda models, xs: [init_step_infer(m, x) for m, x in zip(models, xs)],
                   static_argnums=0)
    results = run(tuple(CASES[i][0] for i in ids), tuple(CASES[i][1] for i in ids))
    return dict(zip(ids, results))


@pytest.mark.parametrize("case", list(CASES))
def test_one_training_step_and_inference(case, trained):
    model, _, stateless = CASES[case]
    variables, loss, new, out = trained[case]
    assert np.isfinite(float(loss))
    # Every parameter moved (all receive a gradient in one step) and stays float32.
    for path, before in leaves(variables["params"]).items():
        after = leaves(new["params"])[path]
        assert after.dtype == jnp.float32, path
        assert not np.allclose(before, after, rtol=0, atol=0), f"{path} did not change"
    if stateless:
        assert "batch_stats" not in variables
    else:
        stats_before, stats_after = leaves(variables["batch_stats"]), leaves(new["batch_stats"])
        assert stats_before
        for path, before in stats_before.items():
            assert stats_after[path].dtype == jnp.float32, path
            assert not np.allclose(before, stats_after[path], rtol=0, atol=0), (
                f"{path} was not updated")
    assert out.shape == (3, model.num_classes) and out.dtype == jnp.float32
    assert np.all(np.isfinite(out))


def count_params(model, shape):
    variables = jax.eval_shape(lambda: model.init(key(0), jnp.zeros(shape),
                                                  train=False))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables["params"]))


# Exact counts, derived by hand (convolutions have no bias next to a norm; a norm has
# scale and bias; running statistics are not parameters):
# * resnet20 (0.27M in He et al. 2016, Table 6): stem 3*9*16 + 32 = 464; stage 1: 6 convs
#   16->16 (2304 + 32 norm) = 14,016; stage 2: 16->32 (4608) + 5 x 32->32 (9216) + 6 x 64
#   = 51,072; stage 3: 32->64 (18,432) + 5 x 36,864 + 6 x 128 = 203,520; head 64*10 + 10 =
#   650; total 269,722 (option A shortcuts have no parameters).
# * resnet56 (0.85M): the same with 18 convs per stage: 464 + 42,048 + 162,432 + 647,424
#   + 650 = 853,018.
# * wrn28_10 (36.5M in Zagoruyko & Komodakis 2016): stem 432; stage 1 (16->160): 16->160
#   (23,040) + 7 x 160->160 (230,400) + 1x1 shortcut 2,560 + norms 2 x (16 + 160) + 6 x
#   160 ... = 1,640,672; stage 2: 460,800 + 7 x 921,600 + 51,200 + 4,800 = 6,968,000;
#   stage 3: 1,843,200 + 7 x 3,686,400 + 204,800 + 9,600 = 27,862,400; final norm 1,280;
#   head 6,410; total 36,479,194.
# * resnet18 / resnet50 with 1000 classes: 11,689,512 / 25,557,032, torchvision's counts
#   (same layers, no conv bias, norms with scale and bias, projection shortcuts).
# * vgg11, ImageNet head, 1000 classes: torchvision's vgg11 (no norm, conv biases)
#   has 132,863,336 (Simonyan & Zisserman: 133M); with a norm the 2,752 conv biases
#   (64 + 128 + 2*256 + 4*512) go and 2 x 2,752 norm parameters come: 132,866,088.
# * vgg11, CIFAR head, 10 classes: convs 9,220,480 with biases (the common CIFAR
#   VGG-11, 9.23M with its norms) + head 512*10 + 10 = 9,225,610 without a norm;
#   9,225,610 - 2,752 + 5,504 = 9,228,362 with one.
# * simplenet: 784*512 + 512*300 + 300*10 + 10 + 2 x (512 + 300) = 559,642 with a
#   norm; 784*512 + 512 + 512*300 + 300 + 3,010 = 558,830 without.
@pytest.mark.parametrize("name, norm, shape, num_classes, expected", [
    ("resnet20", "bn", (1, 32, 32, 3), 10, 269_722),
    ("resnet56", "bn", (1, 32, 32, 3), 10, 853_018),
    ("wrn28_10", "bn", (1, 32, 32, 3), 10, 36_479_194),
    ("resnet18", "bn", (1, 224, 224, 3), 1000, 11_689_512),
    ("resnet50", "bn", (1, 224, 224, 3), 1000, 25_557_032),
    ("vgg11", "bn", (1, 224, 224, 3), 1000, 132_866_088),
    ("vgg11", "none", (1, 224, 224, 3), 1000, 132_863_336),
    ("vgg11", "bn", (1, 32, 32, 3), 10, 9_228_362),
    ("vgg11", "none", (1, 32, 32, 3), 10, 9_225_610),
    ("simplenet", "bn", (1, 28, 28, 1), 10, 559_642),
    ("simplenet", "none", (1, 28, 28, 1), 10, 558_830),
])
def test_published_parameter_counts(name, norm, shape, num_classes, expected):
    assert count_params(get_model(name, norm=norm, num_classes=num_classes), shape) == expected


def test_resnet_depths_give_the_paper_counts():
    # He et al. 2016, Table 6: ResNet-32 0.46M (464,154), ResNet-44 0.66M (658,586),
    # ResNet-110 1.7M (1,727,962): each extra block per stage adds 2 x (2304 + 32),
    # 2 x (9216 + 64) and 2 x (36,864 + 128), i.e. 97,216 per n.
    for depth, expected in [(32, 464_154), (44, 658_586), (110, 1_727_962)]:
        got = count_params(get_model("cifar_resnet", depth=depth), (1, 32, 32, 3))
        assert got == expected == 269_722 + 97_216 * ((depth - 20) // 6)


def tree_shapes(model, x):
    variables = jax.eval_shape(lambda: model.init(key(0), x, train=False))
    return jax.tree.map(lambda s: (s.shape, s.dtype), variables)


@pytest.mark.parametrize("name", sorted(TINY))
def test_ghostnorm_is_a_drop_in_replacement(name):
    model, x = tiny(name, "bn")
    ghost, _ = tiny(name, LAYERS["ghost"])
    assert tree_shapes(ghost, x) == tree_shapes(model, x)


def test_every_layer_with_running_stats_keeps_the_batchnorm_tree():
    model, x = tiny("cifar_resnet", "bn")
    bn = tree_shapes(model, x)
    for layer in ("seqnorm", "batchgroupnorm", "bgn", "hn", "noisybn"):
        other, _ = tiny("cifar_resnet", LAYERS[layer])
        assert tree_shapes(other, x) == bn, layer


@pytest.mark.parametrize("name", sorted(TINY))
def test_bias_only_without_norm(name):
    for norm, with_bias in (("bn", False), ("none", True)):
        model, x = tiny(name, norm)
        params = jax.eval_shape(lambda: model.init(key(0), x, train=False))["params"]
        for path in leaves(params):
            if not path.endswith("['kernel']"):
                continue
            layer = path[: -len("['kernel']")]
            has_bias = f"{layer}['bias']" in leaves(params)
            is_classifier = "head" in layer or "fc" in layer
            assert has_bias == (with_bias or is_classifier), (norm, path)


def test_simplenet_matches_numpy_reference():
    """Training (ghost batches) and inference (running stats) against float64 NumPy."""
    model = SimpleNet(num_classes=3, norm=snj.norm_factory("ghost:batch_groups=2"),
                      features=(6, 4))
    x = normal(3, (BATCH, 2, 3, 1))
    shapes = jax.eval_shape(lambda: model.init(key(0), x, train=False))["params"]
    noise = jax.tree.map(lambda a: 0.1 * normal(5, a.shape), shapes)  # scale, bias != 1, 0

    @fast_jit
    def run(x, noise):
        variables = model.init(key(0), x, train=False)
        variables = {**variables, "params": jax.tree.map(jnp.add, variables["params"], noise)}
        train_out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        return variables["params"], train_out, updates, model.apply(
            {**variables, **updates}, x, train=False)

    params, train_out, updates, inference_out = run(x, noise)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

    def forward(norm):
        h = np.asarray(x, np.float64).reshape(BATCH, -1)
        for i in (1, 2):
            h = h @ p[f"dense{i}"]["kernel"]
            h = np.maximum(norm(i, h), 0.0)
        return h @ p["head"]["kernel"] + p["head"]["bias"]

    want = forward(lambda i, h: ref.ghost_norm(h, 2, 1e-5, p[f"norm{i}"]["scale"],
                                               p[f"norm{i}"]["bias"]))
    chex.assert_trees_all_close(train_out, want, atol=1e-5, rtol=1e-5)

    stats = jax.tree.map(lambda a: np.asarray(a, np.float64), updates["batch_stats"])

    def inference(i, h):
        s = stats[f"norm{i}"]
        return ((h - s["mean"]) / np.sqrt(s["var"] + 1e-5) * p[f"norm{i}"]["scale"]
                + p[f"norm{i}"]["bias"])

    chex.assert_trees_all_close(inference_out, forward(inference), atol=1e-5, rtol=1e-5)


def test_unnormalized_mlp_matches_numpy_reference():
    model = get_model("mlp", norm="none", num_classes=3, features=(5,))
    x = normal(3, (4, 7))
    variables = model.init(key(0), x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    h = np.maximum(np.asarray(x, np.float64) @ p["dense1"]["kernel"] + p["dense1"]["bias"], 0)
    want = h @ p["head"]["kernel"] + p["head"]["bias"]
    chex.assert_trees_all_close(model.apply(variables, x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("strides, c_in, c_out", [(2, 4, 8), (1, 4, 4), (2, 3, 8)])
def test_option_a_shortcut_subsamples_and_zero_pads(strides, c_in, c_out):
    conv = functools.partial(nn.Conv, padding="SAME", use_bias=True)
    block = CifarBasicBlock(c_out, norm=snj.Identity, conv=conv, strides=strides)
    x = normal(0, (2, 6, 6, c_in))
    variables = block.init(key(1), x)
    assert "proj_conv" not in variables["params"]
    zeros = jax.tree.map(jnp.zeros_like, variables)  # residual branch outputs 0
    xs = np.asarray(x)[:, ::strides, ::strides, :]
    before = (c_out - c_in) // 2
    want = np.zeros(xs.shape[:3] + (c_out,))
    want[..., before: before + c_in] = xs
    chex.assert_trees_all_close(block.apply(zeros, x), np.maximum(want, 0), atol=0, rtol=0)


def test_option_b_and_v15_shapes():
    model = get_model("cifar_resnet", depth=8, width=4, shortcut="B")
    shapes = tree_shapes(model, jnp.zeros((2, 8, 8, 3)))["params"]
    assert shapes["stage2_block1"]["proj_conv"]["kernel"][0] == (1, 1, 4, 8)
    assert "proj_conv" not in shapes["stage1_block1"]
    # ResNet-50 v1.5: the stride is on the 3x3 convolution of the bottleneck.
    model = get_model("resnet50", num_filters=2, stage_sizes=(1, 1))
    x = jnp.zeros((1, 16, 16, 3))
    _, state = jax.eval_shape(lambda: model.apply(model.init(key(0), x, train=False), x,
                                                  train=False, capture_intermediates=True))
    block = state["intermediates"]["stage2_block1"]
    assert block["conv1"]["__call__"][0].shape == (1, 4, 4, 4)   # 1x1, stride 1
    assert block["conv2"]["__call__"][0].shape == (1, 2, 2, 4)   # 3x3, stride 2
    assert block["conv3"]["__call__"][0].shape == (1, 2, 2, 16)  # 1x1, expansion 4


def test_zero_init_residual():
    cases = [("resnet18", "bn", "norm2", 6), ("resnet50", "gn", "norm3", 9),
             ("resnet20", "none", "norm2", 0)]  # expected scales: stem, blocks, projections
    built = [tiny(name, LAYERS[layer], zero_init_residual=True) for name, layer, _, _ in cases]
    inits = fast_jit(lambda models, xs: [m.init(key(0), x, train=False)
                                         for m, x in zip(models, xs)], static_argnums=0)(
        tuple(m for m, _ in built), tuple(x for _, x in built))
    for (name, layer, last, count), variables in zip(cases, inits):
        scales = {p: v for p, v in leaves(variables["params"]).items()
                  if p.endswith("['scale']")}
        assert len(scales) == count, (name, layer)
        for path, value in scales.items():
            assert np.all(value == (0.0 if f"['{last}']" in path else 1.0)), (name, path)


def test_bfloat16_activations_float32_params_and_stats():
    """Traced only: the dtypes of every activation, parameter and statistic."""
    model, x = tiny("resnet18", LAYERS["ghost"], dtype=jnp.bfloat16)

    def train_apply():
        variables = model.init(key(0), x, train=False)
        out, state = model.apply(variables, x, train=True, capture_intermediates=True,
                                 mutable=["batch_stats", "intermediates"])
        return variables, out, state

    variables, out, state = jax.eval_shape(train_apply)
    assert out.dtype == jnp.float32
    for path, value in leaves(variables["params"]).items():
        assert value.dtype == jnp.float32, path
    for path, value in leaves(state["batch_stats"]).items():
        assert value.dtype == jnp.float32, path
    activations = {p: v for p, v in leaves(state["intermediates"]).items()
                   if "conv" in p or "norm" in p}
    # stem conv and norm; 2 blocks of 2 convs and 2 norms; 1 projection conv and norm.
    assert len(activations) == 2 + 2 * 4 + 2
    for path, value in activations.items():
        assert value.dtype == jnp.bfloat16, path


@pytest.mark.parametrize("size_in, size_out", [(4, 2), (5, 3), (4, 7), (7, 7), (1, 7)])
def test_adaptive_avg_pool_matches_pytorch_bins(size_in, size_out):
    x = np.random.default_rng(0).normal(size=(2, size_in, size_in + 1, 3))
    want = np.zeros((2, size_out, size_out, 3))
    for i in range(size_out):
        h0, h1 = int(np.floor(i * size_in / size_out)), int(np.ceil((i + 1) * size_in / size_out))
        for j in range(size_out):
            w0 = int(np.floor(j * (size_in + 1) / size_out))
            w1 = int(np.ceil((j + 1) * (size_in + 1) / size_out))
            want[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
    got = adaptive_avg_pool(jnp.asarray(x, jnp.float32), (size_out, size_out))
    chex.assert_trees_all_close(got, want, atol=1e-6, rtol=1e-6)
    assert _pool_matrix(size_in, size_out).sum(axis=1).tolist() == pytest.approx([1] * size_out)


def test_vgg_heads():
    x_small, x_large = jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 64, 64, 3))
    layers = (4, "M", 4, "M")
    for head, x, has_fc in (("auto", x_small, False), ("auto", x_large, True),
                            ("imagenet", x_small, True), ("cifar", x_large, False)):
        params = tree_shapes(VGG(num_classes=3, layers=layers, head=head, hidden=8), x)["params"]
        assert ("fc1" in params) == has_fc, (head, x.shape)
        if has_fc:
            assert params["fc1"]["kernel"][0] == (7 * 7 * 4, 8)


def test_registry_presets():
    assert set(MODELS) >= {"simplenet", "mlp4", "cnn", "resnet20", "resnet56", "wrn28_10",
                           "wrn", "resnet18", "resnet50", "vgg11"}
    assert get_model("resnet56").depth == 56
    wrn = get_model("WRN-28-10", num_classes=100)
    assert (wrn.depth, wrn.widen_factor, wrn.num_classes) == (28, 10, 100)
    assert get_model("wrn", depth=16, widen_factor=4).depth == 16
    assert get_model("mlp4").features == (128,) * 4
    assert get_model("simplenet").features == (512, 300)
    assert get_model("resnet50").block_cls is BottleneckBlock
    assert get_model("resnet18").block_cls is BasicBlock
    assert get_model("resnet20", depth=32).depth == 32  # a preset's field can be overridden
    mlp = get_model("mlp", features=[8, 4])  # lists become tuples: the module stays hashable
    assert mlp.features == (8, 4) and isinstance(hash(mlp), int)
    model = get_model("cnn", norm="ghost:batch_groups=4", dtype=jnp.bfloat16)
    assert model.norm.func is snj.GhostNorm and model.norm.keywords == {"batch_groups": 4}
    assert model.dtype == jnp.bfloat16
    assert get_model("cnn", norm=snj.GroupNorm).norm.func is snj.GroupNorm
    assert isinstance(get_model("resnet18"), ResNet)
    assert isinstance(get_model("wrn28_10"), WideResNet)
    assert isinstance(get_model("resnet20"), CifarResNet)


@pytest.mark.parametrize("call, match", [
    (lambda: get_model("resnet21"), r"unknown model 'resnet21'; choose one of \[.*'resnet20'"),
    (lambda: get_model("cifar_resnet", depth=21), r"depth=21 is not of the form 6n \+ 2"),
    (lambda: get_model("resnet20", depth=2), r"depth=2 is not of the form 6n \+ 2"),
    (lambda: get_model("wrn", depth=28.0), r"depth=28.0 is not of the form 6n \+ 4"),
    (lambda: get_model("wrn", depth=27), r"depth=27 is not of the form 6n \+ 4"),
    (lambda: get_model("wrn", widen_factor=0), r"widen_factor must be a positive int"),
    (lambda: get_model("wrn", dropout_rate=1.0), r"dropout_rate must be in \[0, 1\)"),
    (lambda: get_model("resnet18", widht=3), r"has no field\(s\) \['widht'\]; its fields are"),
    (lambda: get_model("resnet18", stem="tiny"), r"stem='tiny' is not valid; choose one of"),
    (lambda: get_model("resnet18", stage_sizes=()), r"stage_sizes must name at least one"),
    (lambda: get_model("resnet18", block_cls=3), r"block_cls must be a module class"),
    (lambda: get_model("resnet20", shortcut="C"), r"shortcut='C' is not valid"),
    (lambda: get_model("vgg11", head="big"), r"head='big' is not valid"),
    (lambda: get_model("vgg11", layers=(64, "P")), r"layers\[1\] \(a width, or 'M'"),
    (lambda: get_model("mlp", features=(8, -1)), r"features\[1\] must be a positive int"),
    (lambda: get_model("cnn", num_classes=0), r"num_classes must be a positive int"),
    (lambda: get_model("cnn", norm="ghostly"), r"unknown norm layer 'ghostly'"),
])
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_input_errors():
    model = SmallCNN(num_classes=3)
    with pytest.raises(ValueError,
                       match=r"SmallCNN: x must be a batch of NHWC images.*\(8, 28, 28\)"):
        model.init(key(0), jnp.zeros((8, 28, 28)))
    with pytest.raises(ValueError, match=r"x must be floating point, got dtype uint8.*/ 255"):
        model.init(key(0), jnp.zeros((8, 28, 28, 1), jnp.uint8))
    with pytest.raises(ValueError, match=r"MLP: x must be floating point"):
        get_model("mlp").init(key(0), jnp.zeros((8, 784), jnp.int32))


def test_noisy_batchnorm_needs_the_noise_stream():
    model, x = tiny("cnn", "noisybn")
    with pytest.raises(ValueError, match=r"rngs=\{'noise': key\}"):
        jax.eval_shape(lambda: model.apply(model.init(key(0), x, train=False), x, train=True,
                                           mutable=["batch_stats"]))
