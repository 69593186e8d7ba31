"""No needless communication: the collectives in the compiled HLO of each layer.

Counted with :func:`seqnorm_jax.distributed.collective_counts` on
``jit(f).lower(...).compile()`` for a batch of 16 split over the 4 fake CPU devices, in
the two data-parallel forms:

* ``jax.jit`` with the batch sharded ``P("data")`` (no ``axis_name``): XLA partitions
  the statistics and inserts the collectives;
* ``jax.shard_map`` with ``axis_name="data"``: the library writes them
  (``seqnorm_jax.stats``).

For each, the training output alone and the output plus the updated ``batch_stats``.
Ghost groups that line up with the shards (``batch_groups`` a multiple of the device
count) need no collective for the output and exactly one all-reduce of the stacked
``(2, C)`` running-statistics target. The other counts are the ones measured on this
version; a change that adds a collective must update the table on purpose.
"""

import math
import re

import flax.linen as nn
import jax
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import seqnorm_jax as snj
from seqnorm_jax import distributed

N_DEV = 4
C = 8
SHAPE = (16, 3, 3, C)


@pytest.fixture(scope="module", params=["auto", "explicit"])
def mesh(request):
    """Both axis types give the same collectives: ``distributed.data_mesh`` (``Auto``) and
    ``jax.make_mesh``'s default ``Explicit`` axes, where the layers run their group
    reshapes on ``Auto`` axes (``jax.sharding.auto_axes``) rather than resharding."""
    assert jax.device_count() >= N_DEV, "tests/conftest.py sets 4 CPU devices"
    devices = jax.devices()[:N_DEV]
    if request.param == "auto":
        return distributed.data_mesh(devices)
    return jax.make_mesh((N_DEV,), ("data",), axis_types=(AxisType.Explicit,), devices=devices)


def _apply(layer, with_stats):
    def f(v, x):
        y, upd = layer.apply(v, x, use_running_average=False, mutable=["batch_stats"])
        return (y, upd.get("batch_stats", {})) if with_stats else y

    return f


def _placed(mesh, layer, shape=SHAPE):
    x = jax.random.normal(jax.random.key(0), shape)
    v = layer.init(jax.random.key(1), x, use_running_average=False)
    return distributed.replicate(v, mesh), distributed.shard_batch(x, mesh)


def jit_hlo(mesh, layer, with_stats):
    """Compiled jit of the training apply, batch sharded, no axis_name."""
    return jax.jit(_apply(layer, with_stats)).lower(*_placed(mesh, layer)).compile()


def shard_map_hlo(mesh, layer, with_stats):
    """Compiled shard_map of the training apply with the layer's axis_name."""
    out_specs = (P("data"), P()) if with_stats else P("data")
    f = jax.shard_map(_apply(layer, with_stats), mesh=mesh, in_specs=(P(), P("data")),
                      out_specs=out_specs)
    return jax.jit(f).lower(*_placed(mesh, layer)).compile()


def elements(shape: str) -> int:
    """Number of elements of an HLO result shape, summed over a tuple's members."""
    return sum(math.prod(int(d) for d in dims.split(",") if d)
               for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", shape))


def nonzero(counts):
    return {op: n for op, n in counts.items() if n}


# (id, layer kwargs-free constructor, expected collectives:
#  (jit output, jit output + batch_stats, shard_map output, shard_map output + batch_stats))
AR, AG = "all-reduce", "all-gather"
ALIGNED = [
    ("ghost_g4", lambda **k: snj.GhostNorm(batch_groups=4, **k)),
    ("ghost_g8", lambda **k: snj.GhostNorm(batch_groups=8, **k)),
    ("seqnorm_g4", lambda **k: snj.SeqNorm(channel_groups=2, batch_groups=4, **k)),
    ("seqnorm_g8", lambda **k: snj.SeqNorm(channel_groups=2, batch_groups=8, **k)),
    ("batchgroup_g4", lambda **k: snj.BatchGroupNorm(batch_groups=4, channel_groups=4, **k)),
]
# Groups spanning several shards (SyncBN is batch_groups=1). Under jit, each group is cut
# into blocks that lie within one device's shard; each block is shifted by its own first
# value and merged locally, and the blocks' (reference, deviation, var) travel in one
# all-reduce (each device fills the slots of its blocks), from which every device merges
# the groups and takes the running target: flax BatchNorm's one all-reduce. Under
# shard_map the library gathers the per-shard (reference mean, deviation, var, count) the
# same way.
SYNC = ({AR: 1}, {AR: 1}, {AR: 1}, {AR: 1})
SPANNING = [
    ("batchnorm", lambda **k: snj.BatchNorm(**k), SYNC),
    ("ghost_g1", lambda **k: snj.GhostNorm(batch_groups=1, **k), SYNC),
    # Two groups over four devices: under jit, XLA keeps each group's merged statistics
    # on the devices of that group, and one more all-reduce of the stacked (2, C) target
    # averages the two groups (as for ghost groups within shards).
    ("ghost_g2", lambda **k: snj.GhostNorm(batch_groups=2, **k),
     ({AR: 1}, {AR: 2}, {AR: 1}, {AR: 1})),
    ("seqnorm_g1", lambda **k: snj.SeqNorm(channel_groups=2, batch_groups=1, **k), SYNC),
    ("bgn", lambda **k: snj.BGN(num_groups=2, **k), SYNC),
    ("gnplus", lambda **k: snj.GNPlus(num_groups=2, **k), SYNC),
    ("hn", lambda **k: snj.HeterologousNorm(std_groups=2, **k), SYNC),
    ("hn_pooled", lambda **k: snj.HeterologousNorm(std_center="pooled", **k), SYNC),
]


@pytest.mark.parametrize("make", [c[1] for c in ALIGNED], ids=[c[0] for c in ALIGNED])
def test_aligned_ghost_groups_jit(mesh, make):
    layer = make()
    assert nonzero(distributed.collective_counts(jit_hlo(mesh, layer, False))) == {}
    found = distributed.collectives(jit_hlo(mesh, layer, True))
    assert [op for op, _ in found] == [AR], found
    assert elements(found[0][1]) <= 2 * C, found  # at most the stacked (2, C) target


@pytest.mark.parametrize("make", [c[1] for c in ALIGNED], ids=[c[0] for c in ALIGNED])
def test_aligned_ghost_groups_shard_map(mesh, make):
    layer = make(axis_name="data")
    assert nonzero(distributed.collective_counts(shard_map_hlo(mesh, layer, False))) == {}
    found = distributed.collectives(shard_map_hlo(mesh, layer, True))
    assert found == [(AR, f"f32[2,{C}]{{1,0}}")], found


@pytest.mark.parametrize("make,expected", [c[1:] for c in SPANNING], ids=[c[0] for c in SPANNING])
def test_spanning_groups(mesh, make, expected):
    compiled = [jit_hlo(mesh, make(), False), jit_hlo(mesh, make(), True),
                shard_map_hlo(mesh, make(axis_name="data"), False),
                shard_map_hlo(mesh, make(axis_name="data"), True)]
    got = tuple(nonzero(distributed.collective_counts(hlo)) for hlo in compiled)
    assert got == expected
    # Every collective moves (N, C)-independent statistics: never more than the
    # per-device (reference mean, deviation, var, count) of each channel from each device.
    for hlo in compiled:
        assert all(elements(shape) <= N_DEV * 4 * C for _, shape in distributed.collectives(hlo))


def test_axis_index_groups_shard_map(mesh):
    """SyncBN over pairs of devices: the same collectives as over the whole axis."""
    layer = snj.BatchNorm(axis_name="data", axis_index_groups=[[0, 1], [2, 3]])
    counts = lambda with_stats: nonzero(distributed.collective_counts(
        jit_shard_map_varying(mesh, layer, with_stats)))
    assert counts(False) == {AR: 1}
    assert counts(True) == {AR: 1}


def jit_shard_map_varying(mesh, layer, with_stats):
    """shard_map whose batch_stats differ between device sub-groups (out_specs P("data"))."""

    def f(v, x):
        y, upd = layer.apply(v, x, use_running_average=False, mutable=["batch_stats"])
        stats = jax.tree_util.tree_map(lambda a: a[None], upd["batch_stats"])
        return (y, stats) if with_stats else y

    out_specs = (P("data"), P("data")) if with_stats else P("data")
    g = jax.shard_map(f, mesh=mesh, in_specs=(P(), P("data")), out_specs=out_specs)
    return jax.jit(g).lower(*_placed(mesh, layer)).compile()


def test_group_norm_needs_no_collective(mesh):
    layer = snj.GroupNorm(num_groups=2)
    assert nonzero(distributed.collective_counts(jit_hlo(mesh, layer, True))) == {}


def test_syncbn_under_jit_against_flax_batchnorm(mesh):
    """flax's BatchNorm costs one all-reduce under jit: it reduces E[x] and E[x^2] together
    and subtracts them, which cancels when |mean| >> std. Ours costs the same one, of the
    per-device blocks' shifted statistics, and stays exact."""
    ours = nonzero(distributed.collective_counts(jit_hlo(mesh, snj.BatchNorm(), False)))
    theirs = nonzero(distributed.collective_counts(jit_hlo(mesh, nn.BatchNorm(), False)))
    assert (ours, theirs) == ({AR: 1}, {AR: 1})


def train_step_hlo(mesh, layer, shape=SHAPE):
    """Compiled jit of a training step of one layer, batch sharded: forward, backward to
    the input and the parameters, and the updated ``batch_stats``."""
    v, x = _placed(mesh, layer, shape)
    w = jax.random.normal(jax.random.key(2), shape)

    def step(v, x):
        def loss(params, x):
            y, upd = layer.apply({**v, "params": params}, x, use_running_average=False,
                                 mutable=["batch_stats"])
            return (y * w).sum(), upd

        (_, upd), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            v["params"], x)
        return grads, upd

    return jax.jit(step).lower(v, x).compile()


@pytest.mark.parametrize("make", [c[1] for c in SPANNING if c[0] != "ghost_g2"] + [
    lambda: snj.GhostNorm(batch_groups=4), lambda: snj.GroupNorm(num_groups=2)],
    ids=[c[0] for c in SPANNING if c[0] != "ghost_g2"] + ["ghost_g4", "groupnorm"])
def test_train_step_no_more_collectives_than_flax(mesh, make):
    """A whole training step (forward, backward, running statistics) of every synchronized
    layer communicates no more than flax's BatchNorm's: its one all-reduce of the stacked
    statistics forward and one of the output-gradient sums backward, which XLA fuses with
    the parameter gradients."""
    theirs = nonzero(distributed.collective_counts(train_step_hlo(mesh, nn.BatchNorm())))
    ours = nonzero(distributed.collective_counts(train_step_hlo(mesh, make())))
    assert theirs == {AR: 2}
    assert set(ours) <= {AR} and ours.get(AR, 0) <= theirs[AR], (ours, theirs)


def test_collectives_parser():
    text = """
      %all-reduce.4 = (f32[1,8]{1,0}, f32[8]{0}) all-reduce(%a, %b), channel_id=2
      %ag = f32[4,3,8]{2,1,0} all-gather-start(%c), dimensions={0}
      %agd = f32[4,3,8]{2,1,0} all-gather-done(%ag)
      %cp = f32[8]{0} collective-permute(%d), source_target_pairs={{0,1}}
      %fusion = f32[8]{0} fusion(%all-reduce.4), kind=kLoop
    """
    assert distributed.collectives(text) == [
        (AR, "(f32[1,8]{1,0}, f32[8]{0})"), (AG, "f32[4,3,8]{2,1,0}"),
        ("collective-permute", "f32[8]{0}")]
    assert distributed.collective_counts(text) == {
        AR: 1, AG: 1, "reduce-scatter": 0, "collective-permute": 1, "all-to-all": 0}
    assert elements("(f32[1,8]{1,0}, f32[8]{0})") == 16
    with pytest.raises(ValueError, match="pass a compiled computation"):
        distributed.collectives(42)


@pytest.mark.parametrize("make", [
    snj.BatchNorm, lambda: snj.SeqNorm(channel_groups=2, batch_groups=1),
    lambda: snj.SeqNorm(channel_groups=2, batch_groups=1, order="ghost_first"),
    lambda: snj.GNPlus(num_groups=2), lambda: snj.GNPlus(num_groups=2, variant="bn_first"),
    lambda: snj.BGN(num_groups=2), lambda: snj.HeterologousNorm(std_groups=2)],
    ids=["batchnorm", "seqnorm", "seqnorm_ghost_first", "gnplus", "gnplus_bn_first", "bgn",
         "hn"])
def test_dense_train_step_no_more_collectives_than_flax(mesh, make):
    """Dense (N, C) inputs take other paths (SeqNorm's and GN+'s two reductions of x):
    the same bound."""
    dense = (16, C)
    theirs = nonzero(distributed.collective_counts(train_step_hlo(mesh, nn.BatchNorm(), dense)))
    ours = nonzero(distributed.collective_counts(train_step_hlo(mesh, make(), dense)))
    assert theirs == {AR: 2}
    assert set(ours) <= {AR} and ours.get(AR, 0) <= theirs[AR], (ours, theirs)
