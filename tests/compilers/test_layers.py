"""Every layer's training step on the TPU compiler (libtpu; run in a venv with the [tpu]
extra, see docs/tests.md).

One layer's step (forward, backward to the input and the parameters, updated running
statistics; :func:`benchmarks.compilers.layer_step`), bfloat16, batch sharded over every
chip of a 256-chip v5e pod slice and of a 3-D v4 slice:

* every layer compiles on both;
* ghost groups aligned with the chips (one per chip and two per chip) need no statistics
  collective, on Auto and Explicit axes and under ``shard_map``: the training output
  alone compiles with no collective at all;
* synchronized layers run no more all-reduces than flax ``BatchNorm`` compiled the same way;
* a data x model mesh with the channels sharded over "model" works.
"""

import functools
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # benchmarks/

from benchmarks.compilers import ALIGNED, LAYERS, SYNCHRONIZED, analyze_layer  # noqa: E402
from seqnorm_jax import aot  # noqa: E402
from seqnorm_jax.aot import P  # noqa: E402

POD = "v5e:16x16"
PER_CHIP, HWC = 8, (4, 4, 32)  # small: the figures are counts, not sizes


@functools.lru_cache(maxsize=None)
def topo(name):
    return aot.topology(name)


@functools.lru_cache(maxsize=None)
def analysis(name, layer, axes="auto", mode="step"):
    """The compiled analysis of ``LAYERS[layer]`` on topology ``name``: ``mode`` "step"
    (the training step), "output" (the training output alone), or "shard_map" /
    "shard_map_output" (the same inside ``jax.shard_map`` with ``axis_name="data"``)."""
    t = topo(name)
    d = t.num_devices
    module = LAYERS[layer](d)
    shard_map = mode.startswith("shard_map")
    if shard_map:
        module = module.clone(axis_name="data")
    mesh = aot.make_mesh(t, axis_types=axes)
    return analyze_layer(module, t, (PER_CHIP * d,) + HWC, mesh=mesh, shard_map=shard_map,
                         forward_only=mode.endswith("output"))


def all_reduces(a):
    return a.collective_counts["all-reduce"]


def others(a):
    return {k: v for k, v in a.collective_counts.items() if v and k != "all-reduce"}


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("name", [POD, "v4:2x2x2"])
def test_every_layer_compiles(name, layer):
    a = analysis(name, layer)
    assert a.flops > 0 and a.bytes_accessed > 0
    # A memory-bound layer: per chip, at least its input, cotangent and input gradient.
    x_bytes = PER_CHIP * 4 * 4 * 32 * 2
    assert a.bytes_accessed >= 3 * x_bytes
    assert a.fits
    assert others(a) == {}, a.collectives


@pytest.mark.parametrize("axes", ["auto", "explicit"])
@pytest.mark.parametrize("layer", ALIGNED)
def test_aligned_ghost_groups_need_no_statistics_collective_jit(layer, axes):
    assert analysis(POD, layer, axes, "output").collectives == ()
    step = analysis(POD, layer, axes)
    # What is left: the parameter gradients, with the stacked (2, C) running target
    # (XLA fuses them into one all-reduce).
    assert all_reduces(step) == 1 and others(step) == {}, step.collectives
    c = HWC[-1]
    assert step.collective_bytes["all-reduce"] <= (2 * c + 2 * c) * 4


@pytest.mark.parametrize("layer", ALIGNED)
def test_aligned_ghost_groups_need_no_statistics_collective_shard_map(layer):
    assert analysis(POD, layer, "auto", "shard_map_output").collectives == ()
    step = analysis(POD, layer, "auto", "shard_map")
    assert others(step) == {}
    c = HWC[-1]
    assert step.collective_bytes["all-reduce"] <= (2 * c + 2 * c) * 4, step.collectives


@pytest.mark.parametrize("axes", ["auto", "explicit"])
@pytest.mark.parametrize("layer", SYNCHRONIZED)
def test_synchronized_layers_no_more_all_reduces_than_flax_jit(layer, axes):
    ours, flax = analysis(POD, layer, axes), analysis(POD, "flax_bn", axes)
    assert all_reduces(flax) == 2
    assert all_reduces(ours) <= all_reduces(flax), (ours.collectives, flax.collectives)
    assert others(ours) == {}


@pytest.mark.parametrize("layer", SYNCHRONIZED)
def test_synchronized_layers_no_more_all_reduces_than_flax_shard_map(layer):
    ours = analysis(POD, layer, "auto", "shard_map")
    flax = analysis(POD, "flax_bn", "auto", "shard_map")
    assert all_reduces(ours) <= all_reduces(flax), (ours.collectives, flax.collectives)
    assert others(ours) == {}


PER_CHANNEL_SETS = ("bn", "ghost", "seqnorm", "groupnorm")


@pytest.mark.parametrize("axes", ["auto", "explicit"])
@pytest.mark.parametrize("layer", PER_CHANNEL_SETS + ("gnplus", "hn"))
def test_data_by_model_mesh_with_channels_sharded(layer, axes):
    """v5e:4x4 as 4 (data) x 4 (model), channels split over "model": the step compiles,
    every collective is an all-reduce of statistics or parameter gradients (at most the
    per-block statistics of every channel: 16 blocks x 4 x C floats), and on both axis
    types the layers whose sets lie within a model shard communicate no more often than
    flax's BatchNorm (their running-statistics targets stay split over "model", as the
    channels are). HN pools its variance over all channels, across "model" by definition;
    GN+ has a scalar mixing parameter whose gradient sums over every chip."""
    t = topo("v5e:4x4")
    mesh = aot.make_mesh(t, (4, 4), ("data", "model"), axis_types=axes)
    spec = P("data", None, None, "model")
    shape = (PER_CHIP * 4,) + HWC
    a = analyze_layer(LAYERS[layer](4), t, shape, mesh=mesh, spec=spec)
    ref = analyze_layer(LAYERS["flax_bn"](4), t, shape, mesh=mesh, spec=spec)
    assert a.flops > 0 and a.fits
    assert others(a) == {}, a.collectives
    assert max(c.bytes for c in a.collectives) <= 16 * 4 * HWC[-1] * 4, a.collectives
    if layer in PER_CHANNEL_SETS:
        assert all_reduces(a) <= all_reduces(ref), (a.collectives, ref.collectives)


def test_flax_batchnorm_step_collectives():
    """What the comparisons count: flax BatchNorm's step all-reduces the (E[x], E[x^2])
    float32 sums forward (2 C floats) and, backward, the output-gradient sums together
    with the two parameter gradients (3 C floats), per chip."""
    a = analysis(POD, "flax_bn")
    c = HWC[-1]
    assert [x.kind for x in a.collectives] == ["all-reduce"] * 2
    assert [x.bytes for x in a.collectives] == [2 * c * 4, 3 * c * 4]


def test_synchronized_batchnorm_moves_its_blocks_statistics():
    """Ours all-reduces, forward, one stack of every chip's (first value, shifted mean,
    variance) per channel (3 x 256 x C floats) and, backward, the two parameter gradients
    (2 C floats; the input gradient needs no more sums than they are): the price of
    exactness at |mean| >> std is bytes, not a collective."""
    a = analysis(POD, "bn")
    c, chips = HWC[-1], topo(POD).num_devices
    assert [x.kind for x in a.collectives] == ["all-reduce"] * 2
    assert sorted(x.bytes for x in a.collectives) == [2 * c * 4, 3 * chips * c * 4]
