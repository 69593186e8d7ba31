"""Data parallelism under ``jax.jit`` with ``NamedSharding``: the sharded layer is the layer.

A batch sharded ``P("data")`` over a ``seqnorm_jax.distributed.data_mesh`` of the 4
fake CPU devices (tests/conftest.py) must give, for every layer, the outputs, input and
parameter gradients and ``batch_stats`` of the same layer on one device, with ghost
groups equal to, a multiple of and a divisor of the device count, and one group
(SyncBN). No ``axis_name`` is involved: XLA partitions the statistics itself.

Every test runs on the three meshes users meet: ``distributed.data_mesh`` (``AxisType.Auto``),
``jax.make_mesh`` with its default ``Explicit`` axes, and the same under ``jax.set_mesh``.
"""

import contextlib

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType

import seqnorm_jax as snj
from seqnorm_jax import distributed

N_DEV = 4
TOL = dict(atol=2e-5, rtol=1e-5)
GRAD_TOL = dict(atol=5e-5, rtol=1e-4)


MESHES = ["auto", "explicit", "explicit_set_mesh"]


@functools.lru_cache(maxsize=None)
def make_placement(kind: str):
    """``(mesh, context)``: the context sets the mesh with ``jax.set_mesh`` for the sharded
    run in the ``explicit_set_mesh`` case (the one-device reference runs outside it)."""
    assert jax.device_count() >= N_DEV, "tests/conftest.py sets 4 CPU devices"
    devices = jax.devices()[:N_DEV]
    if kind == "auto":
        m = distributed.data_mesh(devices)
    else:
        m = jax.make_mesh((N_DEV,), ("data",), axis_types=(AxisType.Explicit,), devices=devices)
    use = kind == "explicit_set_mesh"
    return m, (lambda: jax.set_mesh(m)) if use else contextlib.nullcontext


@pytest.fixture(scope="module", params=MESHES)
def placement(request):
    return make_placement(request.param)


def batch(shape=(16, 3, 3, 8), seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k1, shape) * 2.0 + jax.random.normal(k2, shape[-1:]) * 3.0


def train_apply(layer, variables, x):
    """Training output and updated batch_stats (empty for GroupNorm)."""
    y, upd = layer.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    return y, upd.get("batch_stats", {})


def grads(layer, variables, x, w):
    """Gradients of sum(sin(y) * w) w.r.t. the parameters and the input."""

    def loss(params, x):
        y, _ = train_apply(layer, {**variables, "params": params}, x)
        return jnp.sum(jnp.sin(y) * w)

    return jax.grad(loss, argnums=(0, 1))(variables["params"], x)


def step_fns(layer):
    return jax.jit(functools.partial(train_apply, layer)), jax.jit(functools.partial(grads, layer))


def on_one_device(tree):
    return jax.device_put(tree, jax.devices()[0])


BATCH_GROUPS = [1, 2, 4, 8]  # SyncBN, divisor of, equal to, multiple of the device count
CASES = [
    *[(f"ghost_g{g}", snj.GhostNorm(batch_groups=g)) for g in BATCH_GROUPS],
    *[(f"seqnorm_g{g}", snj.SeqNorm(channel_groups=2, batch_groups=g)) for g in BATCH_GROUPS],
    ("seqnorm_ghost_first_g8", snj.SeqNorm(channel_groups=4, batch_groups=8,
                                          order="ghost_first")),
    *[(f"batchgroup_g{g}", snj.BatchGroupNorm(batch_groups=g, channel_groups=4))
      for g in BATCH_GROUPS],
    ("batchnorm", snj.BatchNorm()),
    ("hn", snj.HeterologousNorm()),
    ("hn_g2_pooled", snj.HeterologousNorm(std_groups=2, std_center="pooled")),
    ("hn_group_mean", snj.HeterologousNorm(mean_set="group", mean_groups=2)),
    ("gnplus_gn_first", snj.GNPlus(num_groups=2)),
    ("gnplus_parallel", snj.GNPlus(num_groups=4, variant="parallel")),
    ("bgn", snj.BGN(num_groups=2)),
    ("groupnorm", snj.GroupNorm(num_groups=2)),
]


# jax.set_mesh changes where jit takes its mesh from, not what the layers compute: that
# case runs on layers covering each way of grouping the batch (CI time).
SET_MESH_CASES = ("ghost_g2", "ghost_g8", "seqnorm_g4", "batchnorm", "hn", "groupnorm")
JIT_PARAMS = [pytest.param(kind, layer, id=f"{kind}-{name}")
              for kind in MESHES for name, layer in CASES
              if kind != "explicit_set_mesh" or name in SET_MESH_CASES]


@pytest.mark.parametrize("kind,layer", JIT_PARAMS)
def test_jit_sharded_equals_one_device(kind, layer):
    mesh, context = make_placement(kind)
    x = batch()
    w = jax.random.normal(jax.random.key(7), x.shape)
    v = layer.init(jax.random.key(0), x, use_running_average=False)
    apply_fn, grad_fn = step_fns(layer)

    y_one, stats_one = apply_fn(on_one_device(v), on_one_device(x))
    g_one = grad_fn(on_one_device(v), on_one_device(x), on_one_device(w))

    vs = distributed.replicate(v, mesh)
    xs, ws = distributed.shard_batch((np.asarray(x), np.asarray(w)), mesh)
    with context():
        y, stats = apply_fn(vs, xs)
        g = grad_fn(vs, xs, ws)

    # The computation really ran sharded: the output keeps the batch split.
    assert y.sharding.is_equivalent_to(distributed.batch_sharding(mesh), y.ndim)
    assert len(y.addressable_shards) == N_DEV
    chex.assert_trees_all_close(y, y_one, **TOL)
    chex.assert_trees_all_close(stats, stats_one, **TOL)
    chex.assert_trees_all_close(g, g_one, **GRAD_TOL)


def test_uneven_shards_are_count_weighted():
    """18 samples over 4 devices (XLA pads the last shard): still the 18-sample statistics.

    Auto axes only: on Explicit axes, a batch of 18 cannot be split over 4 devices in the
    first place (the slice below does not type-check), so there is no uneven shard."""
    mesh = distributed.data_mesh(jax.devices()[:N_DEV])
    x = batch((20, 2, 2, 8))
    layer = snj.SeqNorm(channel_groups=2)
    v = layer.init(jax.random.key(0), x, use_running_average=False)
    f = jax.jit(lambda v, x: train_apply(layer, v, x[:18]))
    want = f(on_one_device(v), on_one_device(x))
    got = f(distributed.replicate(v, mesh), distributed.shard_batch(np.asarray(x), mesh))
    chex.assert_trees_all_close(got, want, **TOL)


class SmallNet(nn.Module):
    """conv -> norm -> relu -> mean pool -> dense: the norm's statistics reach the loss."""

    norm: str

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(8, (3, 3))(x)
        x = snj.norm_factory(self.norm)(use_running_average=not train, name="norm")(x)
        return nn.Dense(3)(jnp.mean(nn.relu(x), axis=(1, 2)))


def make_train_step(model, tx):
    """One SGD step of softmax cross-entropy; returns (params, batch_stats, opt_state, loss)."""

    def step(params, batch_stats, opt_state, images, labels):
        def loss_fn(p):
            logits, upd = model.apply({"params": p, "batch_stats": batch_stats}, images,
                                      train=True, mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, upd["batch_stats"]

        (loss, new_stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    return jax.jit(step)


@pytest.mark.parametrize("norm", ["seqnorm:channel_groups=2,batch_groups=4", "bn"])
def test_train_step_sharded_equals_one_device(placement, norm):
    """Two optimizer steps of a small CNN: replicated state, batch from shard_batch."""
    mesh, context = placement
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 16, 6, 6, 3)).astype(np.float32)
    labels = rng.integers(0, 3, size=(2, 16)).astype(np.int32)
    model = SmallNet(norm)
    variables = model.init(jax.random.key(1), images[0], train=False)
    tx = optax.sgd(0.5, momentum=0.9)
    step = make_train_step(model, tx)

    def run(place_state, place_batch):
        state = place_state((variables["params"], variables["batch_stats"],
                             tx.init(variables["params"])))
        losses = []
        for i in range(2):
            *state, loss = step(*state, *place_batch((images[i], labels[i])))
            losses.append(loss)
        return state, losses

    want = run(on_one_device, on_one_device)
    with context():
        got = run(lambda t: distributed.replicate(t, mesh),
                  lambda b: distributed.shard_batch(b, mesh))
    chex.assert_trees_all_close(got, want, atol=5e-5, rtol=1e-4)
    params = got[0][0]
    assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree_util.tree_leaves(params))


# Groups spanning the devices at |mean| >> std: the blocks of each group are shifted by
# their own first values and merged around the first block's (stats.merge_blocks), so the
# one all-reduce keeps the exactness of one device (docs/numerics.md).
LARGE_MEAN_CASES = [
    ("batch_norm", snj.functional.batch_norm, {}),
    ("ghost_norm_g2", snj.functional.ghost_norm, {"batch_groups": 2}),
    ("seq_norm_g1", snj.functional.seq_norm, {"channel_groups": 4, "batch_groups": 1}),
    ("batch_group_norm", snj.functional.batch_group_norm, {"batch_groups": 2,
                                                             "channel_groups": 4}),
    ("bgn_2ch", snj.functional.bgn, {"num_groups": 4}),
    ("heterologous_norm", snj.functional.heterologous_norm, {"std_groups": 2}),
    ("gn_plus", snj.functional.gn_plus, {"num_groups": 4}),
]


@pytest.mark.parametrize("shape", [(16, 8), (16, 3, 3, 8)], ids=["dense", "image"])
@pytest.mark.parametrize("fn,kw", [c[1:] for c in LARGE_MEAN_CASES],
                         ids=[c[0] for c in LARGE_MEAN_CASES])
@pytest.mark.parametrize("kind", ["auto", "explicit"])
def test_sharded_large_mean_within_contract(kind, fn, kw, shape):
    """float32 at mean 1e4, std 1, batch sharded over 4 devices under jit: within 1e-3 of
    the same function in float64 on one device, outputs and running-statistics targets."""
    mesh, _ = make_placement(kind)
    x32 = (np.random.default_rng(0).normal(size=shape) + 1e4).astype(np.float32)
    y, st = jax.jit(lambda x: fn(x, return_stats=True, **kw))(
        distributed.shard_batch(x32, mesh))
    with jax.enable_x64(True):
        y64, st64 = fn(jnp.asarray(x32.astype(np.float64)), use_fast_variance=False,
                       return_stats=True, **kw)
        y64, st64 = np.asarray(y64), jax.tree.map(np.asarray, st64)
    assert np.max(np.abs(np.asarray(y, np.float64) - y64)) <= 1e-3
    # The running mean is a float32 near 1e4 (one rounding: 1e4 * 2^-24 ~ 6e-4); the
    # variance near 1 is exact to float32 rounding.
    np.testing.assert_allclose(np.asarray(st.mean, np.float64), st64.mean, rtol=0, atol=2e-3)
    np.testing.assert_allclose(np.asarray(st.var, np.float64), st64.var, rtol=0, atol=1e-3)
