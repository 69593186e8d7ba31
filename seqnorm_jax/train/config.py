"""``TrainConfig``: every hyperparameter of a run, as a dataclass that round-trips through JSON."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from seqnorm_jax import checks
from seqnorm_jax.train.optim import NORM_DECAY_MODES, OPTIMIZERS, SCHEDULES
from seqnorm_jax.train.paths import run_path

__all__ = ["ON_DIVERGENCE", "RESUME_SAFE_FIELDS", "TrainConfig", "config_changes"]

_DTYPES = ("float32", "bfloat16")
ON_DIVERGENCE = ("stop", "continue")
# Fields that a resumed run may change freely: they do not change what the steps done so
# far computed, nor the state's structure (``epochs`` extends or shortens the run; with the
# ``cosine``/``one_cycle`` schedules this also stretches the learning rate's curve from the
# resumed step on, like any change of the run's length).
RESUME_SAFE_FIELDS = ("epochs", "progress", "log_every", "checkpoint_every",
                      "keep_checkpoints", "data_workers", "eval_batch_size", "on_divergence",
                      "data_dir")

_TYPE_NAMES = {"int": "an integer", "float": "a number", "str": "a string",
               "bool": "true or false", "list[float]": "a list of numbers",
               "dict[str,Any]": "a JSON object (dict)"}


def _type_ok(value: Any, kind: str) -> bool:
    if kind.endswith("|None"):
        return value is None or _type_ok(value, kind[:-len("|None")])
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value))
    if kind == "str":
        return isinstance(value, str)
    if kind == "list[float]":
        return isinstance(value, (list, tuple)) and all(_type_ok(v, "float") for v in value)
    if kind == "dict[str,Any]":
        return isinstance(value, dict)
    raise TypeError(f"TrainConfig: no type check for {kind!r}")  # pragma: no cover


def _check_type(config: Any, name: str, kind: str) -> None:
    value = getattr(config, name)
    if _type_ok(value, kind):
        return
    base = kind[:-len("|None")] if kind.endswith("|None") else kind
    want = _TYPE_NAMES[base] + (" or null (None)" if kind.endswith("|None") else "")
    if base == "float" and isinstance(value, float):
        want = "a finite number"
    hint = ""
    if isinstance(value, str) and base == "bool":
        hint = "; write true or false, without quotes"
    elif isinstance(value, str) and base in ("int", "float", "list[float]"):
        hint = "; write it without quotes"
    raise ValueError(f"TrainConfig.{name}={value!r}: must be {want}, got "
                     f"{type(value).__name__}{hint}.")


def config_changes(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{field: (saved value, new value)}`` for every field that differs (JSON values)."""
    keys = sorted(set(saved) | set(new))
    return {k: (saved.get(k), new.get(k)) for k in keys
            if json.dumps(saved.get(k), sort_keys=True) != json.dumps(new.get(k), sort_keys=True)}


@dataclasses.dataclass
class TrainConfig:
    """All hyperparameters of a training run; :meth:`to_json` saves it, :meth:`from_json` loads.

    Model and data:
      model: a name of :func:`seqnorm_jax.models.get_model` (``"cnn"``, ``"resnet20"``, ...).
      norm: a :func:`seqnorm_jax.norm_factory` spec, e.g.
        ``"seqnorm:channel_groups=4,batch_groups=8"``.
      model_kwargs: extra keyword arguments for ``get_model`` (e.g. a width).
      dtype: ``"float32"`` or ``"bfloat16"`` (mixed precision: bf16 compute, float32
        parameters and running statistics).
      dataset: a name of :func:`seqnorm_jax.data.load` (``"fashion_mnist"``, ``"cifar10"``, ...).
      data_dir, data_source: where and how to read it (see ``seqnorm_jax.data.load``).
      train_size: use a random subset of this many training examples (``None``: all).
      validation_size: hold out this many training examples and evaluate on them instead
        of ``eval_split``.
      eval_split: the split evaluated after every epoch (``"test"``), unless
        ``validation_size`` is set.
      augment: the training augmentation of ``seqnorm_jax.data.make_loader``.
      non_iid_classes: paper 002's non-i.i.d. minibatches (examples of this many classes
        per batch); ``None`` for i.i.d.
      data_workers: Grain worker processes preparing training batches (0: in the
        training thread).

    Optimisation:
      epochs, batch_size (global, over all devices), eval_batch_size.
      grad_accum_steps: run each batch as this many accumulated micro-batches (one
        optimizer step per batch; through BatchNorm this is GhostNorm with
        ``batch_groups=grad_accum_steps``, papers 000/001).
      optimizer: ``"sgd"``, ``"nesterov"``, ``"adam"`` (coupled L2, as PyTorch's Adam) or
        ``"adamw"``; momentum; b1, b2 (Adam/AdamW).
      lr: the peak (``cosine``, ``one_cycle``) or initial (``step``, ``constant``) rate.
      schedule: ``"constant"``, ``"cosine"`` (after ``warmup_epochs`` of linear warm-up
        from ``warmup_init_lr``), ``"one_cycle"`` (paper 000's linear cycle,
        ``one_cycle_*``), ``"cosine_one_cycle"`` or ``"step"`` (times ``decay_factor`` at
        each of ``decay_epochs``).
      weight_decay: coupled L2 for SGD and Adam, decoupled for AdamW.
      norm_weight_decay: gamma/beta decay, ``"zero"`` (standard), ``"one"`` or ``"off"``
        (paper 002, 3.3).
      grad_clip_norm: clip gradients to this global norm (``None``: off).
      output_noise_mean, output_noise_std: Gaussian noise ``N(mean, std**2)`` added to
        every norm layer's output in training (paper 004's robustness study uses 1e-3
        and 1.001); off while ``output_noise_std`` is 0 and ``output_noise_mean`` is 0.

    Evaluation, bookkeeping:
      example_weight: the "Four Things" alpha used in the per-epoch evaluation.
      seed: seeds the initialisation, the per-step rngs and the data order.
      log_every: write a train metrics row every this many steps (and at each epoch end).
      checkpoint_every: save an Orbax checkpoint every this many steps (and at the end
        of every epoch); ``None``/0: only at epoch ends. keep_checkpoints: how many to keep.
      progress: show a tqdm progress bar.
      on_divergence: what a non-finite training loss does (detected on the device, in
        the compiled step): ``"stop"`` (default) ends the run there, keeps the last
        finite state (the diverging step and any step after it leave the state unchanged)
        and checkpoints it; ``"continue"`` applies the updates as computed and trains on
        (the metrics then log the non-finite values). Either way the run reports where
        it diverged (``FitResult.diverged``).
    """

    model: str = "cnn"
    norm: str = "bn"
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    dtype: str = "float32"
    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    data_source: str = "auto"
    train_size: int | None = None
    validation_size: int | None = None
    eval_split: str = "test"
    augment: str = "none"
    non_iid_classes: int | None = None
    data_workers: int = 0

    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int = 1000
    grad_accum_steps: int = 1
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    b1: float = 0.9
    b2: float = 0.999
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    warmup_init_lr: float = 0.0
    end_lr: float = 0.0
    one_cycle_init_lr: float | None = None
    one_cycle_final_lr: float | None = None
    one_cycle_pct_up: float = 0.375
    one_cycle_pct_down: float = 0.375
    decay_epochs: list[float] = dataclasses.field(default_factory=list)
    decay_factor: float = 0.1
    weight_decay: float = 5e-4
    norm_weight_decay: str = "zero"
    grad_clip_norm: float | None = None
    output_noise_mean: float = 0.0
    output_noise_std: float = 0.0

    example_weight: float = 0.0
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    progress: bool = True
    on_divergence: str = "stop"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field, its value and the fix.

        Every field is checked for its type first (``"lr": "0.1"``, ``"lr": null``,
        ``"progress": "no"`` are refused, not coerced; integers are accepted where a float
        is expected) and then for its range. Float fields must be finite.
        """
        for f in dataclasses.fields(self):
            _check_type(self, f.name, str(f.type).replace(" ", ""))

        def need(cond, field, msg):
            if not cond:
                raise ValueError(f"TrainConfig.{field}={getattr(self, field)!r}: {msg}")

        for field, choices in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES),
                               ("norm_weight_decay", NORM_DECAY_MODES), ("dtype", _DTYPES),
                               ("on_divergence", ON_DIVERGENCE)):
            need(getattr(self, field) in choices, field, f"choose one of {list(choices)}."
                 f"{checks.suggest(getattr(self, field), choices)}")
        for f in ("epochs", "batch_size", "eval_batch_size", "grad_accum_steps", "log_every",
                  "keep_checkpoints"):
            need(getattr(self, f) >= 1, f, "must be an integer >= 1.")
        for f in ("train_size", "validation_size", "non_iid_classes"):
            v = getattr(self, f)
            need(v is None or v >= 1, f, "must be an integer >= 1 or None.")
        need(self.checkpoint_every is None or self.checkpoint_every >= 0, "checkpoint_every",
             "must be an integer >= 0 or None.")
        need(self.batch_size % self.grad_accum_steps == 0, "grad_accum_steps",
             f"must divide batch_size={self.batch_size}.")
        need(self.data_workers >= 0, "data_workers", "must be an integer >= 0.")
        need(0 <= self.seed < 2**32, "seed", "must be an integer in [0, 2**32).")
        need(self.lr > 0, "lr", "must be positive.")
        need(0 <= self.momentum < 1, "momentum", "must lie in [0, 1) (0: plain SGD).")
        need(0 <= self.b1 < 1, "b1", "must lie in [0, 1).")
        need(0 <= self.b2 < 1, "b2", "must lie in [0, 1).")
        for f in ("warmup_init_lr", "end_lr", "weight_decay", "output_noise_std"):
            need(getattr(self, f) >= 0, f, "must be >= 0.")
        for f in ("one_cycle_init_lr", "one_cycle_final_lr", "grad_clip_norm"):
            v = getattr(self, f)
            need(v is None or v > 0, f, "must be positive or None.")
        for f in ("one_cycle_pct_up", "one_cycle_pct_down"):
            need(0 <= getattr(self, f) <= 1, f, "must lie in [0, 1].")
        need(self.one_cycle_pct_up + self.one_cycle_pct_down <= 1, "one_cycle_pct_down",
             f"one_cycle_pct_up + one_cycle_pct_down must be <= 1 "
             f"(one_cycle_pct_up={self.one_cycle_pct_up}).")
        need(self.decay_factor > 0, "decay_factor", "must be positive.")
        need(all(e >= 0 for e in self.decay_epochs), "decay_epochs", "must be epochs >= 0.")
        need(0.0 <= self.example_weight <= 1.0, "example_weight", "must lie in [0, 1].")
        need(0.0 <= self.warmup_epochs < self.epochs or self.schedule not in ("cosine", "step"),
             "warmup_epochs", "must be >= 0 and smaller than epochs.")
        need(self.warmup_epochs >= 0, "warmup_epochs", "must be >= 0.")
        need(all(isinstance(k, str) for k in self.model_kwargs), "model_kwargs",
             "must be a dict with string keys.")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-compatible dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a dict; unknown keys raise ``ValueError`` listing the valid ones."""
        if not isinstance(data, dict):
            raise ValueError(f"a TrainConfig must be a JSON object, got {type(data).__name__}.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            hints = "".join(checks.suggest(u, names) for u in unknown)
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; valid fields are "
                             f"{sorted(names)}.{hints}")
        return cls(**data)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The config as JSON text; also written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        if path is not None:
            run_path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, path_or_text: str | os.PathLike) -> TrainConfig:
        """Load from a JSON file path or from JSON text.

        Raises:
          ValueError: the path is a folder or not valid JSON (named), or a field is
            invalid (:meth:`validate`).
        """
        text = str(path_or_text)
        where = "config"
        if not text.lstrip().startswith(("{", "[")):
            where = os.fspath(path_or_text)
            if run_path(where).is_dir():
                raise ValueError(f"{where} is a folder; give a JSON config file (e.g. "
                                 f"{os.path.join(where, 'config.json')}).")
            text = run_path(where).read_text()
        try:
            data = json.loads(text, parse_constant=_no_constant)
        except (json.JSONDecodeError, ValueError) as e:
            raise ValueError(f"{where}: not valid JSON ({e}).") from None
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{where}: {e}" if where != "config" else str(e)) from None

    @property
    def output_noise(self) -> tuple[float, float] | None:
        """``(output_noise_mean, output_noise_std)``, or ``None`` when both are 0."""
        if self.output_noise_mean == 0 and self.output_noise_std == 0:
            return None
        return (float(self.output_noise_mean), float(self.output_noise_std))

    def replace(self, **changes) -> TrainConfig:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number; write a finite number")
