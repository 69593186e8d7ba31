"""Smoke test of an installed wheel (not an editable install), run by .ci/run from a
folder outside the clone: the package imports from site-packages with its version, type
marker and paper configs; a GhostNorm of one group matches flax's BatchNorm; the NNX
layer trains and infers; the command answers ``--help`` and lists the packaged configs.
Prints one line per check."""

import importlib.metadata
import json
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import seqnorm_jax as snj

root = pathlib.Path(snj.__file__).parent
assert "site-packages" in root.parts, f"seqnorm_jax imported from {root}, not the wheel"
assert snj.__version__ == importlib.metadata.version("seqnorm-jax"), snj.__version__
assert (root / "py.typed").is_file()
configs = sorted(p.stem for p in (root / "studies" / "configs").glob("*.json"))
assert len(configs) == 24, configs
print(f"seqnorm-jax {snj.__version__} from {root}: py.typed, {len(configs)} paper configs")

x = jax.random.normal(jax.random.key(0), (16, 4, 4, 8)) * 3.0 + 1.0
ours = snj.GhostNorm(batch_groups=1)
theirs = nn.BatchNorm()
v_ours = ours.init(jax.random.key(1), x, use_running_average=False)
v_theirs = theirs.init(jax.random.key(1), x, use_running_average=False)
y_ours, s_ours = ours.apply(v_ours, x, use_running_average=False, mutable=["batch_stats"])
y_theirs, s_theirs = theirs.apply(v_theirs, x, use_running_average=False,
                                  mutable=["batch_stats"])
np.testing.assert_allclose(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
for name in ("mean", "var"):
    np.testing.assert_allclose(s_ours["batch_stats"][name], s_theirs["batch_stats"][name],
                               rtol=1e-5, atol=1e-6)
print("linen: GhostNorm(batch_groups=1) == flax BatchNorm (output, running mean and var)")

layer = snj.nnx.SeqNorm(8, channel_groups=2, batch_groups=4, rngs=nnx.Rngs(0))
y_train = layer(x)
layer.set_view(use_running_average=True)
y_eval = layer(x[:1])
assert y_train.shape == x.shape and y_eval.shape == (1, 4, 4, 8)
assert bool(jnp.isfinite(y_train).all() & jnp.isfinite(y_eval).all())
print("nnx: SeqNorm trains and infers, shapes", y_train.shape, y_eval.shape)

command = pathlib.Path(sys.executable).parent / "seqnorm-jax"
helped = subprocess.run([command, "--help"], capture_output=True, text=True, check=True)
assert "experiment" in helped.stdout and "plan" in helped.stdout
listed = subprocess.run([command, "experiment", "--list"], capture_output=True, text=True,
                        check=True)
missing = [name for name in configs if name not in listed.stdout]
assert not missing, missing
print(f"seqnorm-jax --help: {len(helped.stdout.splitlines())} lines; "
      f"experiment --list: all {len(configs)} configs")
print(json.dumps({"wheel_smoke": "ok"}))
