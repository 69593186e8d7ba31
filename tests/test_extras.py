"""The light core: the layers import and run without the training side, and the training
side without its extra ends in one error naming ``seqnorm-jax[train]``.

Each check runs in a fresh interpreter, since this process has the training side loaded.
A missing module is simulated the way Python records one (``sys.modules[name] = None``:
``import`` raises ``ModuleNotFoundError`` and ``importlib.util.find_spec`` answers None);
optax and orbax are not simulated missing because flax itself imports them.
"""

import json
import os
import subprocess
import sys
import textwrap

from seqnorm_jax._extras import TRAIN_MODULES

TRAINING_SIDE = ("seqnorm_jax.train", "seqnorm_jax.data", "seqnorm_jax.studies",
                 "seqnorm_jax.analysis", "seqnorm_jax.cli.commands", "seqnorm_jax.cli.parser")
# The extra's modules that flax does not bring (flax imports optax, orbax and etils).
NOT_FROM_FLAX = ("tensorflow_datasets", "grain", "PIL", "tqdm", "matplotlib", "tensorboardX")

CORE_USE = """
import jax, jax.numpy as jnp
from flax import nnx
import seqnorm_jax as snj, seqnorm_jax.aot, seqnorm_jax.cli, seqnorm_jax.distributed
from seqnorm_jax.models import get_model
x = jnp.arange(24.0).reshape(8, 3)
layer = snj.norm_factory("ghost:batch_groups=2")()
variables = layer.init(jax.random.key(0), x, use_running_average=False)
y, _ = layer.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
y_nnx = snj.nnx.SeqNorm(3, channel_groups=1, batch_groups=2, rngs=nnx.Rngs(0))(x)
model = get_model("simplenet", num_classes=10, norm="bn")
"""


def _python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, timeout=300, check=False)


def _blocking(modules) -> str:
    return f"import sys\nfor _m in {tuple(modules)!r}:\n    sys.modules[_m] = None\n"


def test_train_modules_match_the_extra():
    # the modules checked are the ones the training side imports at its top level
    assert set(NOT_FROM_FLAX) < set(TRAIN_MODULES)
    assert {"optax", "orbax", "etils"} < set(TRAIN_MODULES)


def test_core_imports_nothing_of_the_training_side():
    proc = _python(CORE_USE + """
import sys, json
loaded = sorted(m for m in sys.modules
                if m.split(".")[0] in %r or m.startswith(%r))
print(json.dumps({"loaded": loaded, "shape": list(y.shape), "shape_nnx": list(y_nnx.shape)}))
""" % (NOT_FROM_FLAX, TRAINING_SIDE))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"loaded": [], "shape": [8, 3], "shape_nnx": [8, 3]}


def test_core_runs_with_the_extra_missing():
    proc = _python(_blocking(NOT_FROM_FLAX) + CORE_USE + "print(float(abs(y).sum()))")
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout.strip().splitlines()[-1]) > 0.0


def test_training_side_without_the_extra_names_it():
    for part in ("seqnorm_jax.train", "seqnorm_jax.data", "seqnorm_jax.studies",
                 "seqnorm_jax.analysis", "seqnorm_jax.train.config"):
        proc = _python(_blocking(("grain", "matplotlib")) + f"""
from seqnorm_jax._extras import MissingExtraError
try:
    import {part}
except MissingExtraError as err:
    print("MissingExtraError:", err)
""")
        assert proc.returncode == 0, proc.stderr
        top = part.rsplit(".", 1)[0] if part.count(".") > 1 else part
        assert proc.stdout.strip() == (
            f"MissingExtraError: {top} needs the training extra, which is not installed "
            "(missing: grain, matplotlib): pip install \"seqnorm-jax[train]\"")


def test_command_without_the_extra_is_one_line():
    proc = _python(_blocking(("tqdm",)) + """
import sys
from seqnorm_jax.cli import main
sys.exit(main(["train", "--model", "simplenet", "--dataset", "digits"]))
""")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == (
        "seqnorm-jax: error: the seqnorm-jax command needs the training extra, which is not "
        "installed (missing: tqdm): pip install \"seqnorm-jax[train]\"\n")


def test_the_package_exports_lazily():
    # PEP 562: importing the package imports no jax; each public name resolves when first
    # used, and dir() lists every name of __all__
    proc = _python("""
import json, sys
import seqnorm_jax as snj, seqnorm_jax.train as train
before = sorted(m for m in ("jax", "flax", "optax", "orbax") if m in sys.modules)
submodule = sorted(snj.linen.LAYERS)[:2]  # a submodule not named in __all__, first use
layer = snj.GhostNorm(batch_groups=2)
print(json.dumps({
    "before": before, "after": "jax" in sys.modules, "layer": type(layer).__module__,
    "missing": sorted(n for n in snj.__all__ if n not in dir(snj))
               + sorted(n for n in train.__all__ if n not in dir(train)),
    "resolved": all(getattr(snj, n) is not None for n in snj.__all__)
                and all(getattr(train, n) is not None for n in train.__all__),
    "functional": snj.functional.__name__, "trainer": train.Trainer.__module__,
    "submodule": submodule}))
try:
    snj.NoSuchLayer
except AttributeError as err:
    print(err)
""")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert json.loads(lines[0]) == {
        "before": [], "after": True, "layer": "seqnorm_jax.linen", "missing": [],
        "resolved": True, "functional": "seqnorm_jax.functional",
        "trainer": "seqnorm_jax.train.loop", "submodule": ["BGN", "BatchGroupNorm"]}
    assert lines[1] == "module 'seqnorm_jax' has no attribute 'NoSuchLayer'"
