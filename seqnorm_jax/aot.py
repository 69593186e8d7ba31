"""Compile for TPU and GPU pods on a machine without them, and read what the compiler planned.

The TPU compiler (libtpu) and XLA:GPU (the CUDA plugin) compile for accelerators that
are not attached: give them a topology by name and they lower and compile a function
for its chips ahead of time, deviceless, so a step's collectives, kernels, flops,
bytes and per-chip memory are known before a slice is booked. This module needs the
optional extras (``pip install "seqnorm-jax[tpu]"`` for TPU topologies,
``pip install "seqnorm-jax[cuda]"`` for GPU ones); it imports them only when a
topology asks for them, and their absence ends in :class:`CompilerNotInstalledError`
naming the extra.

>>> topo = topology("v5e:4x4")                          # 16 TPU v5e chips
>>> mesh = make_mesh(topo)                               # ("data",) over all 16, Auto axes
>>> x = sharded((1024, 512), "bfloat16", mesh, P("data"))
>>> w = sharded((512, 512), "float32", mesh, P())
>>> exe = compile_for(jax.grad(loss), x, w, mesh=mesh)   # jax.jit(...).lower(...).compile()
>>> report = analyze(exe, topo.chip)
>>> report.collective_counts["all-reduce"], report.flops, report.memory.total
>>> report.roofline_seconds                              # max(flops / peak, bytes / bandwidth)

API (stable):

* :data:`CHIPS`, :class:`Chip`: per-chip HBM, peak bfloat16 FLOP/s and HBM bandwidth,
  each row with its published source.
* :func:`topology` ``(name) -> Topology``: ``"v5e:16x16"``, ``"v4:2x2x2"``,
  ``"v5p:2x2x2"``, ``"v6e:4x4"`` (TPU, libtpu's names), ``"h100:8"``, ``"a100:16"``,
  ``"h100:2x8"`` (GPU: chips, or hosts x GPUs per host).
  :func:`gpu_target_config` is the XLA ``GpuTargetConfigProto`` text a GPU topology
  compiles for.
* :func:`make_mesh` ``(topo, shape=None, axis_names=("data",), axis_types="auto")``: a
  ``jax.sharding.Mesh`` over the topology's chips (``"auto"`` or ``"explicit"`` axes).
* :func:`sharded` ``(shape, dtype, mesh, spec)``: a ``jax.ShapeDtypeStruct`` with a
  ``NamedSharding``; :func:`abstract` turns a pytree of arrays (or of
  ``ShapeDtypeStruct`` s) into such structs with one sharding.
* :func:`compile_for` ``(fn, *args, mesh=None, **jit_kwargs)``: ``jax.jit(fn, **jit_kwargs)
  .lower(*args).compile()`` under ``jax.set_mesh(mesh)`` (which ``Explicit`` axes need).
* :func:`analyze` ``(compiled, chip=None) -> Analysis``: :class:`Collective` s (kind,
  bytes, the op that made it) from the compiled HLO text, the kernels of the entry
  computation (fusions and custom calls), ``cost_analysis()``'s flops and bytes
  accessed per chip, ``memory_analysis()``'s per-chip bytes (:class:`Memory`), and with
  a chip the roofline step time. :func:`hlo_instructions`, :func:`hlo_collectives` and
  :func:`shape_bytes` are the HLO-text readers it uses.

The figures are the compiler's own, per device (the program each device runs after SPMD
partitioning): a device is a chip, except on TPU v4, whose deviceless topologies have
one device per TensorCore (two per chip); :attr:`Topology.device_chip` shares the
chip's figures out accordingly. XLA:GPU has no deviceless cost analysis; for GPU
executables the flops and bytes come from XLA's HLO cost analysis run on the compiled
GPU module by the host (CPU) client (the same counts, without GPU-specific cost
modelling), plus the flops of the cuDNN convolutions, custom calls that analysis counts
as none.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from seqnorm_jax.distributed import COLLECTIVES, mesh_context

__all__ = [
    "CHIPS",
    "Analysis",
    "Chip",
    "Collective",
    "CompilerNotInstalledError",
    "Memory",
    "Topology",
    "abstract",
    "analyze",
    "compile_for",
    "gpu_target_config",
    "hlo_collectives",
    "hlo_instructions",
    "make_mesh",
    "P",
    "parse_topology",
    "shape_bytes",
    "sharded",
    "topology",
]


class CompilerNotInstalledError(ImportError):
    """The accelerator compiler a topology needs is not installed; the message names the
    extra to install."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip's published figures.

    Attributes:
      name: the key in :data:`CHIPS` and the prefix of topology names.
      platform: ``"tpu"`` or ``"cuda"``.
      hbm_bytes: high-bandwidth memory per chip.
      peak_bf16_flops: dense bfloat16 FLOP/s per chip (no sparsity).
      hbm_bandwidth: HBM bytes per second per chip.
      source: where the three figures are published.
    """

    name: str
    platform: str
    hbm_bytes: int
    peak_bf16_flops: float
    hbm_bandwidth: float
    source: str


_GIB = 2 ** 30

CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", "tpu", 32 * _GIB, 275e12, 1200e9,
               "Google Cloud TPU docs, 'TPU v4' system architecture page: 32 GiB HBM2, "
               "1200 GBps, 275 peak bf16 TFLOPs per chip"),
    "v5e": Chip("v5e", "tpu", 16 * _GIB, 197e12, 819e9,
                "Google Cloud TPU docs, 'TPU v5e' page: 16 GiB HBM2, 819 GBps, "
                "197 bf16 TFLOPs per chip"),
    "v5p": Chip("v5p", "tpu", 95 * _GIB, 459e12, 2765e9,
                "Google Cloud TPU docs, 'TPU v5p' page: 95 GiB HBM2e, 2765 GBps, "
                "459 bf16 TFLOPs per chip"),
    "v6e": Chip("v6e", "tpu", 32 * _GIB, 918e12, 1640e9,
                "Google Cloud TPU docs, 'TPU v6e' (Trillium) page: 32 GiB HBM, 1640 GBps, "
                "918 bf16 TFLOPs per chip"),
    "h100": Chip("h100", "cuda", 80 * _GIB, 989.4e12, 3.35e12,
                 "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM: 80 GB HBM3, 3.35 TB/s, "
                 "1979 bf16 TFLOPS with sparsity (989.4 dense)"),
    "a100": Chip("a100", "cuda", 80 * _GIB, 312e12, 2.039e12,
                 "NVIDIA A100 Tensor Core GPU datasheet, A100 80GB SXM: 80 GB HBM2e, "
                 "2039 GB/s, 312 bf16 TFLOPS dense"),
}
"""The accelerators ``topology`` knows, by name, with their published HBM, peak bfloat16
FLOP/s and HBM bandwidth."""

# What XLA:GPU compiles for (GpuTargetConfigProto's gpu_device_info), from NVIDIA's
# published specifications: the CUDA C++ Programming Guide's table of compute
# capabilities (threads, shared memory, registers per SM and block) and the H100 /
# A100 whitepapers (SM count, FP32 units per SM, L2, boost clock, memory).
_GPU_DEVICE = {
    "h100": dict(name="NVIDIA H100 80GB HBM3", cc=(9, 0), core_count=132, fpus_per_core=128,
                 shared_memory_per_core=228 * 1024, shared_memory_per_block_optin=227 * 1024,
                 l2_cache_size=50 * 2 ** 20, clock_rate_ghz=1.98),
    "a100": dict(name="NVIDIA A100-SXM4-80GB", cc=(8, 0), core_count=108, fpus_per_core=64,
                 shared_memory_per_core=164 * 1024, shared_memory_per_block_optin=163 * 1024,
                 l2_cache_size=40 * 2 ** 20, clock_rate_ghz=1.41),
}
# The cuDNN and CUDA runtime that `pip install "jax[cuda12]==0.10.2"` installs
# (nvidia-cudnn-cu12 9.28, nvidia-cuda-runtime-cu12 12.9).
_DNN_VERSION = (9, 28, 0)
_RUNTIME_VERSION = (12, 9, 0)


def gpu_target_config(chip: str) -> str:
    """The XLA ``GpuTargetConfigProto`` text (``gpu_device_info``, cuDNN and CUDA runtime
    versions) that XLA:GPU compiles for when the ``chip`` (``"h100"``, ``"a100"``) is
    not attached."""
    if chip not in _GPU_DEVICE:
        raise ValueError(f"gpu_target_config: chip must be one of {sorted(_GPU_DEVICE)}, got "
                         f"{chip!r}.")
    d, c = _GPU_DEVICE[chip], CHIPS[chip]
    return "\n".join([
        "gpu_device_info {",
        f"  cuda_compute_capability {{ major: {d['cc'][0]} minor: {d['cc'][1]} }}",
        "  threads_per_block_limit: 1024",
        "  threads_per_warp: 32",
        "  shared_memory_per_block: 49152",
        f"  shared_memory_per_block_optin: {d['shared_memory_per_block_optin']}",
        f"  shared_memory_per_core: {d['shared_memory_per_core']}",
        "  threads_per_core_limit: 2048",
        f"  core_count: {d['core_count']}",
        f"  fpus_per_core: {d['fpus_per_core']}",
        "  block_dim_limit_x: 2147483647",
        "  block_dim_limit_y: 65535",
        "  block_dim_limit_z: 65535",
        f"  memory_bandwidth: {int(c.hbm_bandwidth)}",
        f"  l2_cache_size: {d['l2_cache_size']}",
        f"  clock_rate_ghz: {d['clock_rate_ghz']}",
        f"  device_memory_size: {c.hbm_bytes}",
        "  registers_per_core_limit: 65536",
        "  registers_per_block_limit: 65536",
        "}",
        'platform_name: "CUDA"',
        "dnn_version_info {{ major: {} minor: {} patch: {} }}".format(*_DNN_VERSION),
        "runtime_version {{ major: {} minor: {} patch: {} }}".format(*_RUNTIME_VERSION),
        f'device_description_str: "{d["name"]}"',
        "",
    ])


@dataclasses.dataclass(frozen=True)
class Topology:
    """A named slice of chips: its :class:`Chip`, and JAX's deviceless description.

    Attributes:
      name: as given, e.g. ``"v5e:16x16"``.
      chip: the chip's :class:`Chip` row.
      description: ``jax.experimental.topologies.TopologyDescription``.
    """

    name: str
    chip: Chip
    description: Any

    @property
    def devices(self) -> list[Any]:
        """The chips, as JAX devices that compile but do not run."""
        return list(self.description.devices)

    @property
    def num_devices(self) -> int:
        """JAX devices: one per chip, except TPU v4 (one per TensorCore, two per chip)."""
        return len(self.description.devices)

    @property
    def num_chips(self) -> int:
        coords = {(getattr(d, "process_index", 0), tuple(getattr(d, "coords", None) or (d.id,)))
                  for d in self.description.devices}
        return len(coords)

    @property
    def device_chip(self) -> Chip:
        """:attr:`chip` as one JAX device sees it: the chip's figures divided among its
        devices (TPU v4: half a chip each); :func:`analyze`'s figures are per device."""
        share = self.num_devices // self.num_chips
        if share == 1:
            return self.chip
        c = self.chip
        return dataclasses.replace(
            c, name=f"{c.name} (1/{share} chip)", hbm_bytes=c.hbm_bytes // share,
            peak_bf16_flops=c.peak_bf16_flops / share, hbm_bandwidth=c.hbm_bandwidth / share)


_TPU_SHAPE = re.compile(r"^\d+(x\d+){1,2}$")
_GPU_SHAPE = re.compile(r"^(\d+)(?:x(\d+))?$")


def _topology_error(name: Any, why: str) -> ValueError:
    tpus = ", ".join(n for n, c in CHIPS.items() if c.platform == "tpu")
    gpus = ", ".join(n for n, c in CHIPS.items() if c.platform == "cuda")
    return ValueError(
        f"topology {name!r}: {why} Name one as CHIP:SHAPE: TPU {tpus} with libtpu's chip grid "
        f"(v5e:4x4, v5e:16x16, v4:2x2x2, v5p:2x2x2), or GPU {gpus} with a GPU count or "
        "HOSTSxGPUS (h100:8, a100:2x8).")


def parse_topology(name: str) -> tuple[Chip, str]:
    """``(chip, shape)`` of a topology name, checked (no compiler needed)."""
    if not isinstance(name, str) or ":" not in name:
        raise _topology_error(name, "expected CHIP:SHAPE.")
    chip_name, _, shape = name.strip().lower().partition(":")
    if chip_name not in CHIPS:
        from seqnorm_jax.checks import suggest

        raise _topology_error(name, f"unknown chip {chip_name!r}.{suggest(chip_name, CHIPS)}")
    chip = CHIPS[chip_name]
    if chip.platform == "tpu" and not _TPU_SHAPE.match(shape):
        raise _topology_error(name, f"a TPU shape is 2 or 3 sizes joined by 'x', got {shape!r}.")
    m = _GPU_SHAPE.match(shape) if chip.platform == "cuda" else True
    if not m:
        raise _topology_error(name, f"a GPU shape is N or HOSTSxN, got {shape!r}.")
    if chip.platform == "cuda":
        hosts, per = (int(m[1]), int(m[2])) if m[2] else (None, int(m[1]))
        if hosts is None:
            hosts, per = (per // 8, 8) if per > 8 and per % 8 == 0 else (1, per)
        if hosts < 1 or not 1 <= per <= 8:
            raise _topology_error(name, f"give 1..8 GPUs per host, got {shape!r}.")
        shape = f"1x{hosts}x{per}"
    elif math.prod(int(s) for s in shape.split("x")) < 1:
        raise _topology_error(name, f"every size must be >= 1, got {shape!r}.")
    return chip, shape


def _need(platform: str) -> None:
    if platform == "tpu":
        if importlib.util.find_spec("libtpu") is None:
            raise CompilerNotInstalledError(
                'the TPU compiler (libtpu) is not installed: pip install "seqnorm-jax[tpu]"')
    elif (importlib.util.find_spec("jax_cuda12_plugin") is None
          and importlib.util.find_spec("jax_cuda13_plugin") is None):
        raise CompilerNotInstalledError(
            'the GPU compiler (the jax CUDA plugin) is not installed: '
            'pip install "seqnorm-jax[cuda]"')


_LIBTPU_ENV = {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_SKIP_MDS_QUERY": "1",
               "TPU_ACCELERATOR_TYPE": "v5litepod-4", "TPU_WORKER_ID": "0",
               "TPU_WORKER_HOSTNAMES": "localhost"}


def topology(name: str) -> Topology:
    """The chips of a named topology, for deviceless compiles.

    Args:
      name: ``"v5e:16x16"``, ``"v4:2x2x2"``, ``"v5p:2x2x2"``, ``"v6e:4x4"`` (a TPU
        chip grid as libtpu names it), or ``"h100:8"``, ``"a100:16"``, ``"h100:2x8"``
        (GPUs: a count, 8 per host beyond 8, or HOSTSxGPUS).

    Raises:
      ValueError: an unknown chip or a malformed shape (before any compiler loads).
      CompilerNotInstalledError: the TPU or GPU compiler is missing (names the extra).
    """
    from jax.experimental import topologies

    chip, shape = parse_topology(name)
    _need(chip.platform)
    if chip.platform == "tpu":
        # Deviceless compiles touch no chip: let several processes load libtpu at once
        # (otherwise the first holds a lock file in the temp folder and the rest fail),
        # and tell libtpu this host is no TPU VM, so that it neither queries the cloud
        # metadata server nor warns about the accelerator type and worker hostnames.
        for key, value in _LIBTPU_ENV.items():
            os.environ.setdefault(key, value)
        dims = [int(s) for s in shape.split("x")]
        try:
            desc = topologies.get_topology_desc(topology_name=f"{chip.name}:{shape}",
                                                platform="tpu")
        except Exception as err:  # libtpu's own message: an unsupported grid
            if math.prod(dims) >= 4:
                raise _topology_error(name, f"libtpu cannot build it ({_first_line(err)}).") \
                    from None
            # a grid smaller than libtpu's default host of 2x2 chips (v5e:1x1, v5e:1x2)
            desc = topologies.get_topology_desc(topology_name=f"{chip.name}:{shape}",
                                                platform="tpu",
                                                chips_per_host_bounds=(dims + [1, 1])[:3])
    else:
        # XLA:GPU checks the CUDA driver and libraries it would run on; there are none.
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
        desc = topologies.get_topology_desc(topology_name=chip.name, platform="cuda",
                                            topology=shape,
                                            target_config=gpu_target_config(chip.name))
    return Topology(name=name, chip=chip, description=desc)


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


_AXIS_TYPES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}


def make_mesh(topo: Topology, shape: Sequence[int] | None = None,
              axis_names: Sequence[str] = ("data",),
              axis_types: str | AxisType | Sequence[str | AxisType] = "auto") -> Mesh:
    """A mesh over ``topo``'s chips (``jax.experimental.topologies.make_mesh``).

    Args:
      topo: a :func:`topology`.
      shape: the mesh shape, its product the chip count; default ``(chips,)``.
      axis_names: one name per axis (``("data",)``, ``("data", "model")``).
      axis_types: ``"auto"`` (XLA propagates shardings) or ``"explicit"`` (sharding in
        types, ``jax.make_mesh``'s default), one for all axes or one per axis.
    """
    from jax.experimental import topologies

    shape = (topo.num_devices,) if shape is None else tuple(int(s) for s in shape)
    axis_names = tuple(axis_names)
    if len(shape) != len(axis_names):
        raise ValueError(f"make_mesh: shape {shape} has {len(shape)} axes but axis_names "
                         f"{axis_names} {len(axis_names)}; give one name per axis.")
    if math.prod(shape) != topo.num_devices or min(shape, default=0) < 1:
        raise ValueError(f"make_mesh: shape {shape} covers {math.prod(shape)} devices, "
                         f"topology {topo.name!r} has {topo.num_devices}; give sizes whose "
                         f"product is {topo.num_devices}.")
    types = [axis_types] * len(shape) if isinstance(axis_types, (str, AxisType)) \
        else list(axis_types)
    if len(types) != len(shape):
        raise ValueError(f"make_mesh: {len(types)} axis_types for {len(shape)} axes.")
    resolved = []
    for t in types:
        if isinstance(t, AxisType):
            resolved.append(t)
        elif isinstance(t, str) and t.lower() in _AXIS_TYPES:
            resolved.append(_AXIS_TYPES[t.lower()])
        else:
            raise ValueError(f"make_mesh: axis_types {t!r}: use 'auto' or 'explicit' "
                             "(or jax.sharding.AxisType).")
    if topo.num_devices == topo.num_chips:
        devices = topologies.make_mesh(topo.description, shape, axis_names).devices
    else:  # one device per TensorCore (TPU v4): jax's physical layout wants one per chip
        devices = np.asarray(sorted(topo.devices, key=lambda d: d.id)).reshape(shape)
    return Mesh(devices, axis_names, axis_types=tuple(resolved))


def sharded(shape: Sequence[int], dtype: Any, mesh: Mesh, spec: P = P()) -> jax.ShapeDtypeStruct:
    """``jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))``."""
    return jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype) if isinstance(dtype, str)
                                else dtype, sharding=NamedSharding(mesh, spec))


def abstract(tree: Any, mesh: Mesh, spec: P = P()) -> Any:
    """Every array leaf of ``tree`` (arrays or ``ShapeDtypeStruct`` s, e.g. from
    ``jax.eval_shape``) as a :func:`sharded` struct with ``spec``; other leaves kept."""
    def leaf(x):
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))
        return x
    return jax.tree_util.tree_map(leaf, tree)


def compile_for(fn: Callable[..., Any], *args: Any, mesh: Mesh | None = None,
                **jit_kwargs: Any) -> Any:
    """``jax.jit(fn, **jit_kwargs).lower(*args).compile()``, traced under
    ``jax.set_mesh(mesh)`` (needed by ``Explicit`` axes; harmless on ``Auto``).

    ``args`` are ``ShapeDtypeStruct`` s whose shardings name the topology's chips
    (:func:`sharded`, :func:`abstract`); ``fn`` may also be an already jitted function.
    Returns the ``jax.stages.Compiled``.
    """
    jitted = fn if hasattr(fn, "lower") and not jit_kwargs else jax.jit(fn, **jit_kwargs)
    with mesh_context(mesh):
        return jitted.lower(*args).compile()


# ---------------------------------------------------------------------------- HLO text

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
                "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([\d,]*)\]")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*"
    r"(?P<shape>\((?:[^()]|\((?:[^()]|\([^()]*\))*\))*\)|\S+)\s+"
    r"(?P<op>[a-z][\w\-]*)\((?P<rest>.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_GTE = re.compile(r"^%?([\w.\-]+)\),\s*index=(\d+)")
_TOP_ARRAYS = re.compile(r"[a-z]+[0-9a-z]*\[[\d,]*\](?:\{[^{}]*\})?")
_COMPUTATION = re.compile(r"^(?P<entry>ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string (``"bf16[8,128]{1,0}"``, tuples summed)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        if dtype.startswith("f8") or dtype.startswith("f4"):
            size = 1
        else:
            size = _DTYPE_BYTES.get(dtype, 0)
        total += size * math.prod(int(d) for d in dims.split(",") if d)
    return int(total)


def hlo_instructions(text: str) -> Iterator[dict[str, Any]]:
    """Each instruction of an HLO module's text: ``name``, ``shape``, ``op`` (the opcode),
    ``operands`` (the text after the opening parenthesis), ``op_name`` (JAX's metadata,
    ``""`` if none), ``computation`` and ``entry`` (whether the computation is the entry
    one)."""
    computation, entry = "", False
    for line in text.splitlines():
        m = _INSTRUCTION.match(line)
        if m is None:
            c = _COMPUTATION.match(line)
            if c is not None:
                computation, entry = c["name"], bool(c["entry"])
            continue
        name_m = _OP_NAME.search(m["rest"])
        yield dict(name=m["name"], shape=m["shape"], op=m["op"], operands=m["rest"],
                   op_name=name_m[1] if name_m else "", computation=computation, entry=entry)


@dataclasses.dataclass(frozen=True)
class Collective:
    """One cross-device collective of a compiled program.

    Attributes:
      kind: ``"all-reduce"``, ``"all-gather"``, ``"reduce-scatter"``,
        ``"collective-permute"`` or ``"all-to-all"`` (an asynchronous start/done pair
        counts once, as its start).
      shape: the HLO result shape (a tuple when XLA combined several).
      bytes: the bytes it returns on each device (for an asynchronous all-gather,
        collective-permute or all-to-all start, its output, the last tuple element).
      op_name: the JAX operation XLA named it after (``jit(f)/.../reduce_sum``).
      parts: ``(bytes, op_name)`` of each array it carries: XLA combines independent
        collectives into one with a tuple result, and each element keeps the name of
        the JAX operation it came from.
    """

    kind: str
    shape: str
    bytes: int
    op_name: str
    parts: tuple[tuple[int, str], ...] = ()


def hlo_collectives(text: str) -> list[Collective]:
    """Every :class:`Collective` of an HLO module's text, in program order."""
    return _collectives(list(hlo_instructions(text)))


def _collectives(instructions: list[dict[str, Any]]) -> list[Collective]:
    # the op name of each tuple element, from the get-tuple-element that reads it (of
    # the collective, or of its asynchronous -done)
    done_of = {}
    element_names: dict[tuple[str, int], str] = {}
    for ins in instructions:
        if ins["op"].endswith("-done"):
            src = _GTE.match(ins["operands"].replace(")", "), index=0", 1))
            if src:
                done_of[ins["name"]] = src[1]
        elif ins["op"] == "get-tuple-element":
            g = _GTE.match(ins["operands"])
            if g:
                element_names[(g[1], int(g[2]))] = ins["op_name"]
    for done, start in done_of.items():
        for (src, i), name in list(element_names.items()):
            if src == done:
                element_names.setdefault((start, i), name)
    out = []
    for ins in instructions:
        op = ins["op"]
        kind = op[:-len("-start")] if op.endswith("-start") else op
        if kind not in COLLECTIVES:
            continue
        shape = ins["shape"]
        arrays = _TOP_ARRAYS.findall(shape[1:-1]) if shape.startswith("(") else [shape]
        if op.endswith("-start") and kind != "all-reduce" and len(arrays) > 1:
            arrays = arrays[-1:]
        parts = tuple((shape_bytes(a), element_names.get((ins["name"], i), ins["op_name"])
                       if len(arrays) > 1 else ins["op_name"]) for i, a in enumerate(arrays))
        out.append(Collective(kind=kind, shape=shape, bytes=sum(b for b, _ in parts),
                              op_name=ins["op_name"], parts=parts))
    return out


@dataclasses.dataclass(frozen=True)
class Memory:
    """Per-chip memory of a compiled program (``memory_analysis()``), in bytes.

    ``total`` is arguments + outputs - aliased (donated buffers counted once) +
    temporaries + generated code: what the chip must hold while the program runs.
    """

    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    code: int

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code


@dataclasses.dataclass(frozen=True)
class Analysis:
    """What a compiled program does on each chip (see :func:`analyze`).

    Attributes:
      collectives: every :class:`Collective`, in program order.
      kernels: the entry computation's kernels: ``{"fusion": n, "custom-call": m}``.
      flops, bytes_accessed: the compiler's cost analysis per chip.
      memory: :class:`Memory` per chip.
      chip: the :class:`Chip` the roofline figures use, or ``None``.
    """

    collectives: tuple[Collective, ...]
    kernels: dict[str, int]
    flops: float
    bytes_accessed: float
    memory: Memory
    chip: Chip | None = None

    @property
    def collective_counts(self) -> dict[str, int]:
        """How many of each collective kind (every kind a key, 0 when absent)."""
        counts = dict.fromkeys(COLLECTIVES, 0)
        counts.update(Counter(c.kind for c in self.collectives))
        return counts

    @property
    def collective_bytes(self) -> dict[str, int]:
        """Bytes per chip of each collective kind (every kind a key)."""
        out = dict.fromkeys(COLLECTIVES, 0)
        for c in self.collectives:
            out[c.kind] += c.bytes
        return out

    @property
    def num_kernels(self) -> int:
        return sum(self.kernels.values())

    @property
    def compute_seconds(self) -> float | None:
        """flops / the chip's peak bfloat16 FLOP/s."""
        return None if self.chip is None else self.flops / self.chip.peak_bf16_flops

    @property
    def memory_seconds(self) -> float | None:
        """bytes accessed / the chip's HBM bandwidth."""
        return None if self.chip is None else self.bytes_accessed / self.chip.hbm_bandwidth

    @property
    def roofline_seconds(self) -> float | None:
        """The roofline time of one run of the program: the larger of
        :attr:`compute_seconds` and :attr:`memory_seconds` (collectives not included)."""
        if self.chip is None:
            return None
        return max(self.compute_seconds, self.memory_seconds)

    @property
    def fits(self) -> bool | None:
        """Whether :attr:`memory` ``.total`` fits the chip's HBM."""
        return None if self.chip is None else self.memory.total <= self.chip.hbm_bytes


_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_DIM_LABELS = re.compile(r"dim_labels=\w+_(\w+)->\w+")
_CONV_ROLES = {  # target -> (where the forward output is, where the kernel is)
    "__cudnn$convForward": ("out", 1), "__cudnn$convBiasActivationForward": ("out", 1),
    "__cudnn$convBackwardInput": (0, 1), "__cudnn$convBackwardFilter": (1, "out")}


def _dims(shape: str) -> list[int]:
    first = _ARRAY.search(shape)
    return [int(d) for d in first[2].split(",") if d] if first else []


def _cudnn_conv_flops(instructions: list[dict[str, Any]]) -> float:
    """The flops of the cuDNN convolutions of an XLA:GPU module, which XLA's HLO cost
    analysis counts as 0 (custom calls): ``2 x`` the forward output's elements ``x`` the
    kernel's elements per output feature, for the forward and both backward passes."""
    shapes = {ins["name"]: ins["shape"] for ins in instructions}
    flops = 0.0
    for ins in instructions:
        target = _TARGET.search(ins["operands"]) if ins["op"] == "custom-call" else None
        labels = _DIM_LABELS.search(ins["operands"]) if target else None
        if labels is None or target[1] not in _CONV_ROLES:
            continue
        operands = re.findall(r"%([\w.\-]+)", ins["operands"].split(")", 1)[0])
        where = [ins["shape"] if r == "out" else shapes.get(operands[r], "") if r < len(operands)
                 else "" for r in _CONV_ROLES[target[1]]]
        y, w = (_dims(x) for x in where)
        if not y or len(w) != len(labels[1]) or "o" not in labels[1]:
            continue
        flops += 2.0 * math.prod(y) * math.prod(w) / w[labels[1].index("o")]
    return flops


def _cost(compiled: Any) -> dict[str, float]:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # XLA:GPU: "GetCostAnalysis is not supported" without a device
        cost = None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if cost:
        return dict(cost)
    # XLA's HLO cost analysis of the compiled (per-chip) module, run by the host client.
    # jax has no public entry point for it: a jax release that moves it ends here in one
    # line rather than with flops and bytes of 0.
    try:
        from jax._src.lib import xla_client

        modules = compiled.runtime_executable().hlo_modules()
        host = jax.devices("cpu")[0].client
        cost = dict(xla_client._xla.hlo_module_cost_analysis(host, modules[0]))
    except (ImportError, AttributeError) as e:
        raise RuntimeError(
            f"analyze: this jax ({jax.__version__}) offers no cost analysis for a deviceless "
            f"XLA:GPU compile ({type(e).__name__}: {e}); use a TPU topology for flops and "
            "bytes, or a jax version the documentation lists as tested (Getting started, "
            "Install).") from None
    instructions = list(hlo_instructions(compiled.as_text()))
    cost["flops"] = cost.get("flops", 0.0) + _cudnn_conv_flops(instructions)
    return cost


def analyze(compiled: Any, chip: Chip | Topology | None = None) -> Analysis:
    """The per-device :class:`Analysis` of a ``jax.stages.Compiled`` (see the module
    docstring); with a ``chip`` (or a :class:`Topology`, whose :attr:`~Topology.device_chip`
    it takes), its roofline time and whether it fits the chip's HBM."""
    if isinstance(chip, Topology):
        chip = chip.device_chip
    if not hasattr(compiled, "as_text") or not hasattr(compiled, "memory_analysis"):
        raise ValueError("analyze: pass a compiled computation (jax.jit(f).lower(...)"
                         f".compile(), e.g. compile_for(...)), got {type(compiled).__name__}.")
    instructions = list(hlo_instructions(compiled.as_text()))
    collectives = _collectives(instructions)
    kernels = {"fusion": 0, "custom-call": 0}
    for ins in instructions:
        if ins["entry"] and ins["op"] in kernels:
            kernels[ins["op"]] += 1
    cost = _cost(compiled)
    mem = compiled.memory_analysis()
    memory = Memory(arguments=int(mem.argument_size_in_bytes),
                    outputs=int(mem.output_size_in_bytes),
                    aliased=int(mem.alias_size_in_bytes),
                    temporaries=int(mem.temp_size_in_bytes),
                    code=int(mem.generated_code_size_in_bytes))
    return Analysis(collectives=tuple(collectives), kernels=kernels,
                    flops=float(cost.get("flops", 0.0)),
                    bytes_accessed=float(cost.get("bytes accessed", 0.0)),
                    memory=memory, chip=chip)
