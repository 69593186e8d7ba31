"""``TrainConfig``: every hyperparameter of a run, as a dataclass that round-trips through JSON.

Also the names a field may take (:data:`OPTIMIZERS`, :data:`SCHEDULES`, ...), each
field's documentation (:func:`field_docs`, read from the class docstring: the command
line's ``--help`` shows it), and what a resumed run may change (:func:`check_resume_config`).
Nothing here imports jax, so ``seqnorm-jax --help`` answers at once; the range rules of
:mod:`seqnorm_jax.checks` are imported when a config is validated.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import re
from collections.abc import Iterable
from typing import Any

from seqnorm_jax.train.files import CONFIG_NAME, RunFileError, run_path

__all__ = ["CONFIG_NAME", "DTYPES", "NORM_DECAY_MODES", "ON_DIVERGENCE", "OPTIMIZERS",
           "RESUME_SAFE_FIELDS", "SCHEDULES", "TrainConfig", "check_resume_config",
           "config_changes", "field_docs", "write_config"]

NORM_DECAY_MODES = ("zero", "one", "off")
"""The values of ``TrainConfig.norm_weight_decay``: decay the norm layers' gamma towards 0,
towards 1, or not at all (paper 002)."""
OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw")
"""The values of ``TrainConfig.optimizer``."""
SCHEDULES = ("constant", "cosine", "one_cycle", "cosine_one_cycle", "step")
"""The values of ``TrainConfig.schedule``: the learning-rate schedules."""
DTYPES = ("float32", "bfloat16")
ON_DIVERGENCE = ("stop", "continue")
"""The values of ``TrainConfig.on_divergence``: stop with the last finite state, or apply
the updates and go on."""
# Fields that a resumed run may change freely: they do not change what the steps done so
# far computed, nor the state's structure (``epochs`` extends or shortens the run; with the
# ``cosine``/``one_cycle`` schedules this also stretches the learning rate's curve from the
# resumed step on, like any change of the run's length).
RESUME_SAFE_FIELDS = ("epochs", "progress", "log_every", "checkpoint_every",
                      "keep_checkpoints", "data_workers", "eval_batch_size", "on_divergence",
                      "data_dir", "wandb_project")
"""The ``TrainConfig`` fields a resumed run may change without ``--allow-change``."""

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

    Each entry below is also the ``--help`` text of the field's command-line flag
    (:func:`field_docs`): a new field documented here has its flag documented.

    Attributes:
      model: model to train: simplenet, mlp, mlp4, cnn, resnet20, resnet56, wrn28_10,
        resnet18, resnet50 or vgg11 (:func:`seqnorm_jax.models.get_model`).
      norm: norm layer spec NAME[:KEY=VALUE,...] (:func:`seqnorm_jax.norm_factory`), e.g.
        seqnorm:channel_groups=4,batch_groups=8, or none.
      model_kwargs: extra model fields as KEY=VALUE; a comma makes a list
        (features=16,32,32, or features=16, for one element).
      dtype: compute dtype, float32 or bfloat16; bfloat16 is mixed precision (float32
        parameters and running statistics).
      dataset: dataset: fashion_mnist, mnist, cifar10, cifar100, imagenet2012 or digits
        (scikit-learn's 8x8 digits; :func:`seqnorm_jax.data.load`).
      data_dir: folder of the dataset (TFDS data_dir, IDX or CIFAR files).
      data_source: reader: auto, tfds, idx, cifar or digits.
      train_size: train on a stratified random subset of this many examples (none: all).
      validation_size: hold out this many training examples and evaluate on them
        instead of eval_split.
      eval_split: split evaluated after each epoch, unless validation_size is set.
      augment: training augmentation: none, flip_crop, flip_crop_cutout, imagenet or
        default.
      non_iid_classes: non-i.i.d. batches drawn from this many classes (paper 002; none:
        i.i.d.).
      data_workers: Grain worker processes preparing training batches (0: in the
        training thread).
      epochs: passes over the training set.
      batch_size: global batch size, over all devices.
      eval_batch_size: batch size of the evaluation.
      grad_accum_steps: run each batch as this many accumulated micro-batches, one
        optimizer step per batch (through BatchNorm this is GhostNorm with
        batch_groups=grad_accum_steps, papers 000/001).
      optimizer: optimizer; adam has coupled L2 (as PyTorch's Adam), adamw decoupled
        weight decay.
      lr: peak (cosine, one-cycle) or initial (step, constant) learning rate.
      momentum: SGD momentum (nesterov's too), in [0, 1).
      b1: Adam's first-moment decay.
      b2: Adam's second-moment decay.
      schedule: learning-rate schedule: constant, cosine (after warmup_epochs of linear
        warm-up), one_cycle (paper 000's linear cycle), cosine_one_cycle or step.
      warmup_epochs: epochs of linear warm-up before the cosine decay.
      warmup_init_lr: learning rate at the start of the warm-up.
      end_lr: learning rate at the end of the cosine decay.
      one_cycle_init_lr: one-cycle: first learning rate (none: lr / 25).
      one_cycle_final_lr: one-cycle: last learning rate (none: the initial one / 1e4).
      one_cycle_pct_up: one-cycle: share of the steps rising to lr.
      one_cycle_pct_down: one-cycle: share of the steps falling back.
      decay_epochs: step schedule: epochs at which lr is multiplied by decay_factor.
      decay_factor: step schedule: the factor applied at each of decay_epochs.
      weight_decay: L2 (SGD, Adam) or decoupled (AdamW) weight decay.
      norm_weight_decay: decay of the norm layers' gamma/beta: towards zero (standard),
        towards one (gamma), or off (paper 002, 3.3).
      grad_clip_norm: clip gradients to this global norm (none: off).
      output_noise_mean: mean of the Gaussian noise added to every norm layer's output
        in training (paper 004's robustness study uses 1e-3).
      output_noise_std: std of that noise (paper 004: 1.001); off while it and
        output_noise_mean are 0.
      example_weight: "Four Things" inference example weight alpha of the per-epoch
        evaluation, in [0, 1].
      seed: seeds the initialisation, the per-step random numbers and the data order.
      log_every: write a training metrics row every this many steps (and at each epoch
        end).
      checkpoint_every: also checkpoint every this many steps (none or 0: at epoch ends
        only).
      keep_checkpoints: how many checkpoints to keep.
      progress: show progress bars.
      on_divergence: at a non-finite training loss (detected in the compiled step):
        stop ends the run there and checkpoints the last finite state; continue applies
        the updates as computed and trains on. Either way FitResult.diverged says where.
      wandb_project: also log the metric rows to this Weights & Biases project (needs
        the wandb extra; entity, mode and key from WANDB_* variables; none: off).
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
    wandb_project: str | None = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field, its value and the fix.

        Every field is checked for its type first (``"lr": "0.1"``, ``"lr": null``,
        ``"progress": "no"`` are refused, not coerced; integers are accepted where a float
        is expected) and then for its range. Float fields must be finite.
        """
        from seqnorm_jax import checks

        for f in dataclasses.fields(self):
            _check_type(self, f.name, str(f.type).replace(" ", ""))

        def need(cond, field, msg):
            if not cond:
                raise ValueError(f"TrainConfig.{field}={getattr(self, field)!r}: {msg}")

        for field, choices in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES),
                               ("norm_weight_decay", NORM_DECAY_MODES), ("dtype", DTYPES),
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
        checks.example_weight(self.example_weight, "TrainConfig")
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
            from seqnorm_jax import checks

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


def field_docs(cls: type = TrainConfig) -> dict[str, str]:
    """``{field: text}`` from the "Attributes:" section of ``cls``'s docstring: one entry
    per field, continuation lines joined, Sphinx roles and literals as plain text (the
    ``--help`` of each config flag).

    Raises:
      TypeError: a field has no entry, or an entry names no field (a docstring out of
        step with the dataclass).
    """
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    start = lines.index("Attributes:") + 1 if "Attributes:" in lines else len(lines)
    docs: dict[str, str] = {}
    name = None
    for line in lines[start:]:
        if line and not line.startswith(" "):
            break  # the next section
        entry = re.match(r"^  (\w+): (.*)$", line)
        if entry:
            name = entry.group(1)
            docs[name] = entry.group(2).strip()
        elif name is not None and line.strip():
            docs[name] += " " + line.strip()
    docs = {k: re.sub(r"``([^`]+)``", r"\1", re.sub(r":\w+:`~?([^`]+)`", r"\1", v))
            for k, v in docs.items()}
    fields = [f.name for f in dataclasses.fields(cls)]
    if sorted(docs) != sorted(fields):
        raise TypeError(f"{cls.__name__}: the docstring's Attributes do not match the fields "
                        f"(undocumented: {sorted(set(fields) - set(docs))}, unknown: "
                        f"{sorted(set(docs) - set(fields))}).")
    return {k: docs[k] for k in fields}


def write_config(out_dir: str | os.PathLike, config: TrainConfig) -> None:
    """Write ``out_dir/config.json``.

    Raises:
      RunFileError: it cannot be written (names the file and the cause).
    """
    path = run_path(out_dir) / CONFIG_NAME
    try:
        path.write_text(config.to_json())
    except OSError as e:
        raise RunFileError(os.fspath(path), e.strerror or str(e)) from e


def check_resume_config(out_dir: str | os.PathLike, config: TrainConfig,
                        allow_changes: Iterable[str]) -> None:
    """Refuse to resume ``out_dir`` with a config that differs from its saved one.

    Fields of :data:`RESUME_SAFE_FIELDS` and those named in
    ``allow_changes`` may differ; a run without a saved config passes.

    Raises:
      ValueError: an unknown field in ``allow_changes``, an unreadable saved config, or
        a refused change (the message lists the changes and the ways on).
    """
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    allow_changes = tuple(allow_changes)
    unknown = sorted(set(allow_changes) - names)
    if unknown:
        raise ValueError(f"allow_changes: unknown TrainConfig field(s) {unknown}; valid "
                         f"fields are {sorted(names)}.")
    path = run_path(out_dir) / CONFIG_NAME
    if not path.exists():
        return
    try:
        saved: Any = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the saved config ({e}); repair it or "
                         "start a new --out.") from None
    changes = config_changes(saved, config.to_dict())
    refused = {k: v for k, v in changes.items()
               if k not in RESUME_SAFE_FIELDS and k not in allow_changes}
    if refused:
        listed = ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in refused.items())
        raise ValueError(
            f"resume: the config differs from the run's saved {path} in {listed}; resume "
            f"with the saved config, start a new --out, or accept the change with "
            f"--allow-change {','.join(refused)} (freely changeable: "
            f"{', '.join(RESUME_SAFE_FIELDS)}).")
