"""``seqnorm_jax.train.plan`` on XLA:GPU without a GPU (the [cuda] extra): a training
step for 8 H100s, its one all-reduce against the model's parameter bytes.

XLA:GPU concatenates the all-reduces it combines into one flat buffer that keeps no op
names, so the ghost layers' running averages travel, unattributed, in the gradients'
all-reduce: its bytes are the parameters' plus the running means and variances
(2 x the norm widths 32 + 64 + 64, float32) plus the loss and accuracy sums."""

import math

import jax
import numpy as np

from seqnorm_jax.train import TrainConfig
from seqnorm_jax.train.build import build_model
from seqnorm_jax.train.plan import plan_step


def test_ghost_step_on_eight_h100s():
    config = TrainConfig(model="cnn", norm="ghost:batch_groups=8", dataset="cifar10",
                         batch_size=128, epochs=1, dtype="float32")
    plan = plan_step(config, "h100:8")
    model = build_model(config, 10)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                            jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32))
    params = sum(math.prod(a.shape) * a.dtype.itemsize
                 for a in jax.tree_util.tree_leaves(shapes["params"]))
    running = 2 * (32 + 64 + 64) * 4
    assert plan.analysis.collective_counts["all-reduce"] == 1
    assert sum(plan.analysis.collective_counts.values()) == 1
    assert params + running <= plan.analysis.collective_bytes["all-reduce"] \
        <= params + running + 64
    a = plan.analysis
    assert a.num_kernels > 0 and a.flops > 0 and a.fits
    assert plan.topology.chip.name == "h100"
