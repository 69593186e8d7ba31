"""Plan a run for a TPU or GPU pod on a machine without one: ``seqnorm-jax plan``.

:func:`plan_step` builds the run's :class:`~seqnorm_jax.train.Trainer` on a deviceless
mesh over a named topology (:mod:`seqnorm_jax.aot`) and compiles its real training
step -- ``Trainer.loop_step``, the function the training loop runs, with the config's
model, norm layer, dtype, optimizer, schedule and global batch, the state's buffers
donated as on an accelerator -- ahead of time for the topology's chips. The compiled
step gives, per device:

* memory (arguments, outputs, temporaries) against the chip's HBM;
* the collectives per step, count and bytes, the norm layers' statistics collectives
  (those JAX traced inside a norm layer's forward or backward statistics) apart from
  the rest, which is the gradient all-reduce and the loss (XLA combines independent
  all-reduces into one with a tuple result, whose elements keep their op names; XLA:GPU
  concatenates them into one flat buffer that keeps none, counted with the gradients);
* flops and bytes accessed, and the roofline step time
  ``max(flops / peak FLOP/s, bytes / HBM bandwidth)`` from the chip table
  (:data:`seqnorm_jax.aot.CHIPS`, published figures), without communication time;
* the whole run's training time at that step time: ``steps_per_epoch * epochs`` steps
  (evaluation, input pipeline and collectives not counted).

No dataset is read: the training set's size comes from :data:`TRAIN_EXAMPLES` (or the
config's ``train_size`` / ``validation_size``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from seqnorm_jax import aot
from seqnorm_jax.train.config import TrainConfig

__all__ = ["DoesNotFitError", "LoweredStep", "StepPlan", "TRAIN_EXAMPLES", "format_bytes",
           "format_plan", "format_seconds", "installed_versions", "lower_step", "parse_mesh",
           "plan_step", "train_examples"]

# Training-split sizes (the TensorFlow Datasets catalog's train splits; digits: this
# package's fixed 1,442-image train split of scikit-learn's 1,797).
TRAIN_EXAMPLES = {"mnist": 60_000, "fashion_mnist": 60_000, "cifar10": 50_000,
                  "cifar100": 50_000, "imagenet2012": 1_281_167, "digits": 1_442}


def train_examples(config: TrainConfig) -> int:
    """How many examples one training epoch of ``config`` reads."""
    from seqnorm_jax.data import dataset_info

    name = dataset_info(config.dataset).name
    n = TRAIN_EXAMPLES[name] - (config.validation_size or 0)
    if config.train_size:
        n = min(n, config.train_size)
    return n


class _SizedSource:
    """A training set's size and :class:`~seqnorm_jax.data.DatasetInfo`, no data: all the
    Trainer reads of a source before it trains."""

    def __init__(self, info, size: int):
        self.info, self.size = info, size

    def __len__(self) -> int:
        return self.size


def parse_mesh(text: str | None, devices: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """``--mesh``: ``"256"`` / ``"data=256"`` (1-D) or ``"data=128,model=2"``; ``None``:
    all devices on ``"data"``."""
    if text is None or not str(text).strip():
        return (devices,), ("data",)
    shape, names = [], []
    for i, item in enumerate(p.strip() for p in str(text).split(",") if p.strip()):
        name, eq, size = item.partition("=")
        if not eq:
            name, size = ("data" if i == 0 else f"axis{i}"), item
        try:
            shape.append(int(size))
        except ValueError:
            shape.append(0)
        names.append(name.strip())
    if not shape or min(shape) < 1 or math.prod(shape) != devices or "data" not in names:
        raise ValueError(f"--mesh {text!r}: give AXIS=SIZE,... with a 'data' axis whose sizes "
                         f"multiply to the topology's {devices} devices, e.g. "
                         f"--mesh data={devices} or --mesh data={max(devices // 2, 1)},model=2.")
    return tuple(shape), tuple(names)


class DoesNotFitError(ValueError):
    """The step needs more memory per chip than the chip's HBM (the compiler refused it)."""


@dataclasses.dataclass
class StepPlan:
    """One compiled training step on a topology, and what it implies for the run.

    Attributes:
      config: the run's :class:`TrainConfig`.
      topology: the :class:`seqnorm_jax.aot.Topology`.
      mesh: ``{axis: size}``; axis_types: ``"auto"`` or ``"explicit"``.
      analysis: the step's per-device :class:`seqnorm_jax.aot.Analysis`.
      steps_per_epoch, total_steps: the run's optimizer steps.
      compile_seconds: how long the compile took here.
      norm_paths: the module paths of the model's norm layers.
    """

    config: TrainConfig
    topology: aot.Topology
    mesh: dict[str, int]
    axis_types: str
    analysis: aot.Analysis
    steps_per_epoch: int
    total_steps: int
    compile_seconds: float
    norm_paths: tuple[str, ...] = ()

    def is_statistics(self, op_name: str) -> bool:
        """Whether a collective's part named ``op_name`` is a norm layer's statistics: JAX
        traced it inside a norm layer (:attr:`norm_paths`), and it is not the reduction
        of the layer's own scale/bias gradient (a primitive right under the layer in the
        backward pass, ``transpose(jvp(Net))/<layer>/reduce_sum``)."""
        parts = op_name.split("/")
        for path in self.norm_paths:
            want = path.split("/")
            for i in range(len(parts) - len(want) + 1):
                if parts[i:i + len(want)] != want:
                    continue
                rest = parts[i + len(want):]
                gradient = i > 0 and parts[i - 1].startswith("transpose(") and len(rest) == 1
                if not gradient:
                    return True
        return False

    def collective_groups(self) -> dict[str, dict[str, int]]:
        """``{"statistics": ..., "gradients": ...}``, each ``{"count", "bytes"}``: the
        collectives carrying norm statistics, and those carrying the rest (the gradient
        all-reduce, the loss); ``"combined"``: how many carry both (XLA combined them)."""
        out = {"statistics": {"count": 0, "bytes": 0}, "gradients": {"count": 0, "bytes": 0},
               "combined": {"count": 0}}
        for c in self.analysis.collectives:
            kinds = set()
            for nbytes, name in c.parts:
                kind = "statistics" if self.is_statistics(name) else "gradients"
                out[kind]["bytes"] += nbytes
                kinds.add(kind)
            for kind in kinds:
                out[kind]["count"] += 1
            out["combined"]["count"] += len(kinds) == 2
        return out

    @property
    def step_seconds(self) -> float:
        return self.analysis.roofline_seconds

    @property
    def run_seconds(self) -> float:
        return self.step_seconds * self.total_steps

    def to_dict(self) -> dict[str, Any]:
        a, chip = self.analysis, self.analysis.chip

        return {
            "model": self.config.model, "norm": self.config.norm, "dtype": self.config.dtype,
            "batch_size": self.config.batch_size, "optimizer": self.config.optimizer,
            "topology": self.topology.name, "chips": self.topology.num_chips,
            "devices": self.topology.num_devices, "mesh": dict(self.mesh),
            "axis_types": self.axis_types, "chip": dataclasses.asdict(chip),
            "memory": {**dataclasses.asdict(a.memory), "total": a.memory.total,
                       "hbm": chip.hbm_bytes, "fits": a.fits},
            "collectives": {**self.collective_groups(),
                            "all": {"count": len(a.collectives),
                                    "bytes": sum(c.bytes for c in a.collectives),
                                    "by_kind": a.collective_counts}},
            "kernels": dict(a.kernels), "flops": a.flops, "bytes_accessed": a.bytes_accessed,
            "compute_seconds": a.compute_seconds, "memory_seconds": a.memory_seconds,
            "step_seconds": self.step_seconds, "steps_per_epoch": self.steps_per_epoch,
            "epochs": self.config.epochs, "total_steps": self.total_steps,
            "run_seconds": self.run_seconds, "compile_seconds": self.compile_seconds,
        }


@dataclasses.dataclass
class LoweredStep:
    """A run's training step lowered for a topology (:func:`lower_step`), ready to compile.

    Attributes:
      config, topology, mesh, axis_types: as in :class:`StepPlan`.
      trainer: the run's :class:`~seqnorm_jax.train.Trainer` on the deviceless mesh.
      device_mesh: that mesh (``jax.sharding.Mesh``).
      lowered: ``trainer.loop_step`` lowered (``jax.stages.Lowered``).
      image_shape: the input images' shape.
    """

    config: TrainConfig
    topology: aot.Topology
    mesh: dict[str, int]
    axis_types: str
    trainer: Any
    device_mesh: Any
    lowered: Any
    image_shape: tuple[int, ...]

    def program_fingerprint(self) -> str:
        """A hash of what the compiler is given: the lowered program (StableHLO, without
        source locations), the topology, the mesh, ``XLA_FLAGS`` and the jax, jaxlib and
        compiler versions. Two steps with the same fingerprint compile to the same thing,
        whatever Python code produced them."""
        import hashlib

        compiler = "libtpu" if self.topology.chip.platform == "tpu" else "jax-cuda12-plugin"
        h = hashlib.sha1(self.lowered.as_text().encode())
        h.update(installed_versions("jax", "jaxlib", compiler).encode())
        h.update(f"{self.topology.name} {sorted(self.mesh.items())} {self.axis_types} "
                 f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}".encode())
        return h.hexdigest()[:16]

    def compile(self, progress: Callable[[str], None] | None = None) -> StepPlan:
        """Compile the step and analyse it (:func:`plan_step`)."""
        import numpy as np

        from seqnorm_jax.train.state import model_norm_paths

        config, topo = self.config, self.topology
        if progress is not None:
            progress(f"compiling {config.model} / {config.norm} / {config.dtype}, batch "
                     f"{config.batch_size}, for {topo.name} "
                     f"({_count(topo.num_devices, 'device')}) ...")
        from seqnorm_jax.distributed import mesh_context

        start = time.perf_counter()
        try:
            with mesh_context(self.device_mesh):
                compiled = self.lowered.compile()
        except Exception as err:  # noqa: BLE001 - jax's runtime error type is not public
            text = " ".join(str(err).split())
            if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
                raise
            raise DoesNotFitError(
                f"{config.model} / {config.norm}, batch {config.batch_size}, does not fit "
                f"{topo.name}: the compiler says: {text.split(': ', 1)[-1]} Use more chips "
                "(a larger --topology), a smaller --batch-size or more --grad-accum-steps."
            ) from None
        seconds = time.perf_counter() - start
        paths = model_norm_paths(self.trainer.model,
                                 np.zeros((1, *self.image_shape), np.float32))
        return StepPlan(config=config, topology=topo, mesh=dict(self.mesh),
                        axis_types=self.axis_types, analysis=aot.analyze(compiled, topo),
                        steps_per_epoch=self.trainer.steps_per_epoch,
                        total_steps=self.trainer.total_steps, compile_seconds=seconds,
                        norm_paths=paths)


def lower_step(config: TrainConfig, topology: str | aot.Topology, *, mesh: str | None = None,
               axis_types: str = "auto",
               image_shape: Sequence[int] | None = None) -> LoweredStep:
    """Build ``config``'s Trainer on a deviceless mesh over ``topology`` and lower its
    training step (seconds; the compile is :meth:`LoweredStep.compile`). Arguments and
    errors as :func:`plan_step`'s, except that nothing compiles here."""
    from seqnorm_jax.data import dataset_info
    from seqnorm_jax.distributed import mesh_context
    from seqnorm_jax.train.loop import Trainer
    from seqnorm_jax.train.build import loop_step_arguments

    config.validate()
    topo = aot.topology(topology) if isinstance(topology, str) else topology
    shape, names = parse_mesh(mesh, topo.num_devices)
    device_mesh = aot.make_mesh(topo, shape, names, axis_types)
    info = dataset_info(config.dataset)
    if image_shape is not None:
        info = dataclasses.replace(info, image_shape=tuple(int(d) for d in image_shape))
    source = _SizedSource(info, train_examples(config))
    trainer = Trainer(config, train_source=source, eval_source=source, mesh=device_mesh,
                      save_checkpoints=False, donate=True)
    with mesh_context(device_mesh):
        lowered = trainer.loop_step.lower(*loop_step_arguments(
            trainer.model, trainer.tx, config, info.image_shape, device_mesh, trainer.batch_axis))
    return LoweredStep(config=config, topology=topo, mesh=dict(zip(names, shape)),
                       axis_types=axis_types, trainer=trainer, device_mesh=device_mesh,
                       lowered=lowered,
                       image_shape=tuple(info.image_shape))


def plan_step(config: TrainConfig, topology: str | aot.Topology, *, mesh: str | None = None,
              axis_types: str = "auto", image_shape: Sequence[int] | None = None,
              progress: Callable[[str], None] | None = None) -> StepPlan:
    """Compile ``config``'s training step for ``topology`` and analyse it (module docstring).

    Args:
      config: the run.
      topology: a name (``"v5e:16x16"``, ``"h100:8"``) or a :func:`seqnorm_jax.aot.topology`.
      mesh: ``--mesh`` text (:func:`parse_mesh`); default all devices on ``"data"``.
      axis_types: ``"auto"`` or ``"explicit"``.
      image_shape: the input images' shape (default: the dataset's).
      progress: called with a line before the compile starts.

    Raises:
      ValueError: a bad topology, mesh or config (the norm layers are checked against the
        batch and the mesh as ``Trainer`` checks them), before anything compiles.
      DoesNotFitError: the compiler found that the step does not fit the chip's HBM.
      seqnorm_jax.aot.CompilerNotInstalledError: the compiler's extra is missing.
    """
    return lower_step(config, topology, mesh=mesh, axis_types=axis_types,
                      image_shape=image_shape).compile(progress)


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_seconds(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    if s >= 1:
        return f"{s:.2f} s"
    return f"{s * 1e3:.3f} ms"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def format_plan(plan: StepPlan, label: str | None = None) -> str:
    """The plan as text, one figure a line."""
    d, a = plan.to_dict(), plan.analysis
    m, chip = a.memory, a.chip
    c = d["collectives"]
    head = label or f"{d['model']} / {d['norm']} / {d['dtype']}"
    per = "device" if plan.topology.num_devices == plan.topology.num_chips else \
        f"device ({chip.name})"
    lines = [
        f"{head}",
        f"  topology     {plan.topology.name}: {_count(plan.topology.num_chips, 'chip')}, "
        f"{_count(plan.topology.num_devices, 'device')}; mesh "
        + " x ".join(f"{k}={v}" for k, v in plan.mesh.items()) + f" ({plan.axis_types})",
        f"  step         batch {d['batch_size']} ({d['batch_size'] // plan.mesh['data']} per "
        f"data shard), optimizer {d['optimizer']}",
        f"  memory/{per}  {format_bytes(m.total)} of {format_bytes(chip.hbm_bytes)} HBM "
        f"({'fits' if a.fits else 'DOES NOT FIT'}): arguments {format_bytes(m.arguments)}, "
        f"outputs {format_bytes(m.outputs)}, aliased {format_bytes(m.aliased)}, temporaries "
        f"{format_bytes(m.temporaries)}, code {format_bytes(m.code)}",
        f"  collectives  {c['all']['count']} per step: norm statistics in "
        f"{c['statistics']['count']} ({format_bytes(c['statistics']['bytes'])}), gradients and "
        f"loss in {c['gradients']['count']} ({format_bytes(c['gradients']['bytes'])})"
        + (f", {c['combined']['count']} carrying both" if c['combined']['count'] else ""),
        f"  compute      {a.flops / 1e9:.1f} GFLOP, {format_bytes(a.bytes_accessed)} accessed per "
        f"device; {a.num_kernels} kernels in the entry computation",
        f"  roofline     {format_seconds(plan.step_seconds)} per step (compute "
        f"{format_seconds(a.compute_seconds)}, memory {format_seconds(a.memory_seconds)}; "
        f"{chip.name}: {chip.peak_bf16_flops / 1e12:g} TFLOP/s, "
        f"{chip.hbm_bandwidth / 1e9:g} GB/s)",
        f"  run          {plan.total_steps} steps ({plan.steps_per_epoch} x "
        f"{d['epochs']} epochs): {format_seconds(plan.run_seconds)} of training at that rate",
        f"  compiled in  {plan.compile_seconds:.0f} s here",
    ]
    return "\n".join(lines)


def installed_versions(*packages: str) -> str:
    """``"jax=0.10.2jaxlib=0.10.2libtpu=-..."``: each installed version, ``-`` if absent."""
    from importlib import metadata

    out = []
    for package in packages:
        try:
            out.append(f"{package}={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            out.append(f"{package}=-")
    return "".join(out)
