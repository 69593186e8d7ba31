"""Every layer's training step on XLA:GPU for 8 H100s, without a GPU (run in a venv with
the [cuda] extra, see docs/tests.md): the checks of tests/compilers/test_layers.py on
one 8-GPU host. The entry-computation kernels per layer, next to flax's, are printed by
``benchmarks/compilers.py --topology h100:8`` (benchmarks/RESULTS.md).
"""

import pytest
from test_layers import all_reduces, analysis, others  # puts the repository on sys.path

from benchmarks.compilers import ALIGNED, LAYERS

GPUS = "h100:8"
# The per-sample-moments layers (SeqNorm with one ghost batch, GN+, BGN on feature maps):
# XLA:GPU fuses their parameter-gradient reduction into the kernel that writes the input
# gradient, after the all-reduce of the output-gradient sums, so its all-reduce cannot be
# combined with that one (on the TPU compiler it is).
PER_SAMPLE = ("seqnorm_sync", "gnplus", "bgn")
DIRECT = ("bn", "hn", "noisy_bn")


@pytest.mark.parametrize("layer", list(LAYERS))
def test_every_layer_compiles(layer):
    a = analysis(GPUS, layer)
    assert a.flops > 0 and a.bytes_accessed > 0 and a.fits
    assert a.num_kernels >= 2  # at least the forward's and the backward's pass over x
    assert others(a) == {}, a.collectives


@pytest.mark.parametrize("axes", ["auto", "explicit"])
@pytest.mark.parametrize("layer", ALIGNED)
def test_aligned_ghost_groups_need_no_statistics_collective(layer, axes):
    assert analysis(GPUS, layer, axes, "output").collectives == ()
    assert analysis(GPUS, layer, "auto", "shard_map_output").collectives == ()
    step = analysis(GPUS, layer, axes)
    assert all_reduces(step) == 1 and others(step) == {}, step.collectives


@pytest.mark.parametrize("mode", ["jit-auto", "jit-explicit", "shard_map"])
@pytest.mark.parametrize("layer", DIRECT + PER_SAMPLE)
def test_synchronized_statistics_one_all_reduce(layer, mode):
    """The training output of a synchronized layer takes its statistics from one
    all-reduce, as flax's BatchNorm does."""
    axes, out = ("auto", "shard_map_output") if mode == "shard_map" else (mode[4:], "output")
    ours, flax = analysis(GPUS, layer, axes, out), analysis(GPUS, "flax_bn", axes, out)
    assert all_reduces(flax) == 1
    assert all_reduces(ours) == 1 and others(ours) == {}, ours.collectives


@pytest.mark.parametrize("mode", ["jit-auto", "jit-explicit", "shard_map"])
@pytest.mark.parametrize("layer", DIRECT + PER_SAMPLE)
def test_synchronized_step_against_flax(layer, mode):
    """The whole step: under jit, the direct layers run flax's two all-reduces; the
    per-sample ones one more (see PER_SAMPLE). Under shard_map, where the backward's
    all-reduces are the transposes the library's psums imply, XLA:GPU keeps the
    output-gradient sums and the parameter gradients apart (one more than flax's, which
    it combines)."""
    axes, step = ("auto", "shard_map") if mode == "shard_map" else (mode[4:], "step")
    ours, flax = analysis(GPUS, layer, axes, step), analysis(GPUS, "flax_bn", axes, step)
    assert all_reduces(flax) == 2 and others(ours) == {}
    extra = 1 if layer in PER_SAMPLE or mode == "shard_map" else 0
    assert all_reduces(ours) <= all_reduces(flax) + extra, (ours.collectives, flax.collectives)
