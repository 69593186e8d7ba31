"""The training state and its optimizer: flax's ``TrainState`` plus running statistics and an
rng; optax optimizers, learning-rate schedules and weight decay for the papers' recipes.

Everything here is plain optax: schedules are ``step -> learning rate`` callables and
:func:`weight_decay_towards` is an ``optax.GradientTransformation``, so they compose
with any optax chain.

Schedules (``step`` counts optimizer updates):

* :func:`warmup_cosine`: linear warm-up from ``init_lr`` to ``peak_lr``, then cosine
  decay to ``end_lr`` (paper 000's CIFAR recipe warms up from ``lr`` to ``4 * lr`` in
  5 epochs, then cosine).
* :func:`linear_one_cycle`: paper 000's super-convergence schedule for ResNet-56: linear
  ``init_lr -> peak_lr``, linear ``peak_lr -> init_lr``, then linear ``init_lr -> final_lr``
  (0.1 -> 3.0 in 15 epochs, -> 0.1 in 15, -> 0.003 in the last 10).
* :func:`cosine_one_cycle`: ``optax.cosine_onecycle_schedule`` (Smith & Topin's cosine form).
* :func:`step_decay`: piecewise constant, multiplied by ``factor`` at each boundary.

Weight decay of the normalization layers' ``scale`` (gamma) and ``bias`` (beta), paper
002, section 3.3: ``norm_decay="zero"`` decays them towards 0 like every other weight
(the usual setting), ``"one"`` decays gamma towards 1 (beta still towards 0) and ``"off"``
leaves them undecayed. The norm layers are the registry's
(:func:`seqnorm_jax.registry.is_norm_layer`), named by their module paths
(:func:`model_norm_paths`), never guessed from parameter names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax.training import train_state

from seqnorm_jax import checks
from seqnorm_jax.train.config import NORM_DECAY_MODES, OPTIMIZERS, SCHEDULES
from seqnorm_jax.train.norm_calls import norm_calls

__all__ = [
    "NORM_DECAY_MODES",
    "OPTIMIZERS",
    "SCHEDULES",
    "TrainState",
    "constant",
    "cosine_one_cycle",
    "create_train_state",
    "linear_one_cycle",
    "make_optimizer",
    "make_schedule",
    "model_norm_paths",
    "norm_param_labels",
    "step_decay",
    "step_rngs",
    "warmup_cosine",
    "weight_decay_towards",
]


class TrainState(train_state.TrainState):
    """``flax.training.train_state.TrainState`` with ``batch_stats`` and ``rng``.

    Attributes:
      step, apply_fn, params, tx, opt_state: as in flax (``step`` counts optimizer updates).
      batch_stats: the model's ``batch_stats`` collection (running statistics), ``{}``
        for models without any.
      rng: the run's base key as raw ``uint32`` key data (so checkpoints hold a plain
        array); each step derives its keys from it and ``step``, see :func:`step_rngs`.
    """

    batch_stats: Any = None
    rng: jax.Array | None = None


def _key_data(rng: jax.Array) -> jax.Array:
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    if rng.dtype != jnp.uint32:
        raise ValueError(f"rng must be a jax.random.key(...) or raw uint32 key data, got dtype "
                         f"{rng.dtype}; create it with jax.random.key(seed).")
    return rng


def step_rngs(state: TrainState,
              names: tuple[str, ...] = ("dropout", "noise", "output_noise")) -> dict:
    """The per-step rngs for ``apply``: ``{name: key}``, a function of ``(state.rng, state.step)``.

    Deterministic in the step, so a resumed run draws the same noise as an
    uninterrupted one. ``"noise"`` feeds ``NoisyBatchNorm``, ``"dropout"`` dropout layers,
    ``"output_noise"`` :func:`~seqnorm_jax.train.output_noise_scope`. The key of a name
    depends on its position only, so appending names leaves the earlier keys unchanged.
    """
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    return {name: jax.random.fold_in(key, i) for i, name in enumerate(names)}


def create_train_state(model: nn.Module, rng: jax.Array, sample_input: Any,
                       tx: optax.GradientTransformation) -> TrainState:
    """Initialise ``model`` on ``sample_input`` and wrap it with ``tx`` in a :class:`TrainState`.

    Args:
      model: a flax module with ``__call__(x, train: bool)``.
      rng: a key (``jax.random.key(seed)``); split into the init key and the run's
        base key for per-step rngs.
      sample_input: an input batch (only its shape and dtype matter); init runs in
        inference mode (``train=False``), so any batch size works.
      tx: the optax optimizer.

    Returns:
      The state at step 0. ``params`` and ``batch_stats`` are in the model's
      ``param_dtype`` (float32 by default, also for ``dtype=bfloat16`` models).
    """
    rng = _key_data(rng)
    init_key, run_key = jax.random.split(jax.random.wrap_key_data(rng))
    variables = jax.jit(lambda k, x: model.init({"params": k}, x, train=False))(
        init_key, sample_input)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                             batch_stats=batch_stats, rng=jax.random.key_data(run_key))


# ------------------------------------------------------------- optimizers, schedules
Schedule = Callable[[Any], Any]


def constant(lr: float) -> Schedule:
    """A constant learning rate ``lr``."""
    return optax.constant_schedule(lr)


def warmup_cosine(peak_lr: float, total_steps: int, warmup_steps: int = 0, *,
                  init_lr: float = 0.0, end_lr: float = 0.0) -> Schedule:
    """Linear warm-up ``init_lr -> peak_lr`` over ``warmup_steps``, then cosine to ``end_lr``.

    ``lr(t) = init_lr + (peak_lr - init_lr) * t / warmup_steps`` for ``t < warmup_steps``,
    then ``end_lr + (peak_lr - end_lr) * (1 + cos(pi * s)) / 2`` with
    ``s = (t - warmup_steps) / (total_steps - warmup_steps)``; constant ``end_lr`` after
    ``total_steps``. With ``warmup_steps=0`` it is plain cosine decay from ``peak_lr``.
    """
    total_steps = checks.positive_int(total_steps, "total_steps", "warmup_cosine")
    warmup_steps = checks.positive_int(warmup_steps, "warmup_steps", allow_zero=True)
    if warmup_steps >= total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} must be smaller than "
                         f"total_steps={total_steps}; shorten the warm-up or train longer.")
    return optax.warmup_cosine_decay_schedule(
        init_value=init_lr if warmup_steps else peak_lr, peak_value=peak_lr,
        warmup_steps=warmup_steps, decay_steps=total_steps, end_value=end_lr)


def linear_one_cycle(total_steps: int, peak_lr: float, *, init_lr: float | None = None,
                     final_lr: float | None = None, pct_up: float = 0.375,
                     pct_down: float = 0.375) -> Schedule:
    """Paper 000's linear one-cycle schedule (Smith & Topin's super-convergence).

    Three linear pieces over ``total_steps``: ``init_lr -> peak_lr`` over the first
    ``pct_up`` of the steps, ``peak_lr -> init_lr`` over the next ``pct_down``, then
    ``init_lr -> final_lr`` over the rest. Paper 000 (ResNet-56, CIFAR-10, 40 epochs):
    ``init_lr=0.1, peak_lr=3.0, final_lr=0.003, pct_up=pct_down=15/40``.

    Args:
      total_steps: number of optimizer steps of the whole run.
      peak_lr: the largest learning rate.
      init_lr: first (and mid-cycle) learning rate; default ``peak_lr / 30``.
      final_lr: last learning rate; default ``init_lr / 33.3`` (0.1 -> 0.003).
      pct_up: fraction of the steps spent increasing.
      pct_down: fraction spent decreasing back to ``init_lr``; the remaining
        ``1 - pct_up - pct_down`` anneals to ``final_lr``.
    """
    total_steps = checks.positive_int(total_steps, "total_steps", "linear_one_cycle")
    if not (0 < pct_up and 0 <= pct_down and pct_up + pct_down <= 1):
        raise ValueError(f"linear_one_cycle: need 0 < pct_up, 0 <= pct_down and "
                         f"pct_up + pct_down <= 1, got pct_up={pct_up}, pct_down={pct_down}.")
    init_lr = peak_lr / 30.0 if init_lr is None else init_lr
    final_lr = init_lr * 0.003 / 0.1 if final_lr is None else final_lr
    up = max(1, round(pct_up * total_steps))
    down = min(round(pct_down * total_steps), total_steps - up)
    rest = total_steps - up - down
    pieces = [optax.linear_schedule(init_lr, peak_lr, up)]
    boundaries = []
    if down:
        pieces.append(optax.linear_schedule(peak_lr, init_lr, down))
        boundaries.append(up)
    if rest:
        pieces.append(optax.linear_schedule(init_lr if down else peak_lr, final_lr, rest))
        boundaries.append(up + down)
    return optax.join_schedules(pieces, boundaries) if boundaries else pieces[0]


def cosine_one_cycle(total_steps: int, peak_lr: float, *, pct_up: float = 0.3,
                     div_factor: float = 25.0, final_div_factor: float = 1e4) -> Schedule:
    """``optax.cosine_onecycle_schedule``: cosine ``peak/div -> peak -> peak/(div*final_div)``."""
    total_steps = checks.positive_int(total_steps, "total_steps", "cosine_one_cycle")
    return optax.cosine_onecycle_schedule(total_steps, peak_lr, pct_start=pct_up,
                                          div_factor=div_factor,
                                          final_div_factor=final_div_factor)


def step_decay(lr: float, boundaries: Sequence[int], factor: float = 0.1, *,
               warmup_steps: int = 0, init_lr: float = 0.0) -> Schedule:
    """Piecewise constant: ``lr``, multiplied by ``factor`` at every step in ``boundaries``.

    E.g. ``step_decay(0.1, [30 * spe, 60 * spe, 80 * spe])`` for ImageNet's epochs 30/60/80
    (``spe`` = steps per epoch). An optional linear warm-up from ``init_lr`` comes first
    (the boundaries count from step 0, warm-up included).
    """
    bounds = [checks.positive_int(b, "boundaries[i]", "step_decay") for b in boundaries]
    if bounds != sorted(bounds):
        raise ValueError(f"step_decay: boundaries must be increasing, got {list(boundaries)}.")
    warmup_steps = checks.positive_int(warmup_steps, "warmup_steps", allow_zero=True)
    decay = optax.piecewise_constant_schedule(lr, {b: factor for b in bounds})
    if not warmup_steps:
        return decay
    return optax.join_schedules(
        [optax.linear_schedule(init_lr, lr, warmup_steps),
         lambda t: decay(t + warmup_steps)], [warmup_steps])


def make_schedule(name: str, *, lr: float, total_steps: int, steps_per_epoch: int,
                  warmup_epochs: float = 0.0, warmup_init_lr: float = 0.0,
                  end_lr: float = 0.0, one_cycle_init_lr: float | None = None,
                  one_cycle_final_lr: float | None = None, one_cycle_pct_up: float = 0.375,
                  one_cycle_pct_down: float = 0.375,
                  decay_epochs: Sequence[float] = (), decay_factor: float = 0.1) -> Schedule:
    """Build a schedule by name (one of :data:`SCHEDULES`), with epochs converted to steps.

    ``lr`` is the peak (``cosine``, ``one_cycle``, ``cosine_one_cycle``) or initial
    (``step``, ``constant``) learning rate. ``warmup_epochs`` applies to ``cosine`` and
    ``step``; the ``one_cycle_*`` arguments to ``one_cycle`` (``one_cycle_pct_up`` also to
    ``cosine_one_cycle``); ``decay_epochs`` / ``decay_factor`` to ``step``.
    """
    checks.choice(name, SCHEDULES, "schedule", "make_schedule")
    spe = checks.positive_int(steps_per_epoch, "steps_per_epoch", "make_schedule")
    warmup = int(round(warmup_epochs * spe))
    if name == "constant":
        return constant(lr)
    if name == "cosine":
        return warmup_cosine(lr, total_steps, warmup, init_lr=warmup_init_lr, end_lr=end_lr)
    if name == "one_cycle":
        return linear_one_cycle(total_steps, lr, init_lr=one_cycle_init_lr,
                                final_lr=one_cycle_final_lr, pct_up=one_cycle_pct_up,
                                pct_down=one_cycle_pct_down)
    if name == "cosine_one_cycle":
        return cosine_one_cycle(total_steps, lr, pct_up=one_cycle_pct_up)
    if name == "step":
        return step_decay(lr, [int(round(e * spe)) for e in decay_epochs], decay_factor,
                          warmup_steps=warmup, init_lr=warmup_init_lr)
    raise AssertionError(name)  # unreachable: checked above


# --------------------------------------------------------------------------------------
# Weight decay with a switch for the norm layers' gamma / beta (paper 002, section 3.3).


def norm_param_labels(params: Any, norm_paths: Iterable[str]) -> Any:
    """Label every parameter ``"weight"``, ``"norm_scale"``, ``"norm_bias"`` or ``"norm_other"``.

    The norm layers are named by their module paths (``"stage1_block1/norm1"``, as
    :func:`model_norm_paths` returns them): below such a path ``scale`` is gamma,
    ``bias`` beta, and any other parameter (GN+'s ``lambda``) ``"norm_other"``.
    Everything else, biases of ``Dense``/``Conv`` and modules that happen to own only a
    ``scale`` or ``bias`` included, is ``"weight"``.
    """
    norm = {tuple(p.split("/")) if isinstance(p, str) else tuple(p) for p in norm_paths}

    def label(path, leaf):
        keys = tuple(_key_name(k) for k in path)
        if any(keys[:i] in norm for i in range(len(keys))):
            return {"scale": "norm_scale", "bias": "norm_bias"}.get(keys[-1], "norm_other")
        return "weight"

    return jax.tree_util.tree_map_with_path(label, params)


def _key_name(key: Any) -> str:
    return str(getattr(key, "key", getattr(key, "name", key)))


def model_norm_paths(model: nn.Module, sample_input: Any, **kwargs: Any) -> tuple[str, ...]:
    """The module paths of ``model``'s norm layers (those that own parameters or not).

    ``model.init`` is traced abstractly on ``sample_input`` (only its shape and dtype
    matter; nothing is computed) with ``train=False`` and ``kwargs``; the registry
    decides what a norm layer is (:func:`seqnorm_jax.registry.is_norm_layer`).
    """
    kwargs = {"train": False, **kwargs}
    calls = norm_calls(lambda x: model.init(jax.random.key(0), x, **kwargs), sample_input)
    return tuple(c.path for c in calls)


class WeightDecayTowardsState(NamedTuple):
    """``weight_decay_towards`` keeps no state."""


def weight_decay_towards(weight_decay: float | Schedule, *, norm_decay: str = "zero",
                         labels: Callable[[Any], Any] | Any = None
                         ) -> optax.GradientTransformation:
    """Add ``weight_decay * (param - target)`` to each update; the targets depend on the switch.

    Ordinary weights decay towards 0 (``update + wd * w``, i.e. optax's
    ``add_decayed_weights``). The norm layers' parameters follow ``norm_decay``:

    * ``"zero"`` (the standard setting): gamma and beta decay towards 0 like any weight;
    * ``"one"``: gamma decays towards 1 (``wd * (gamma - 1)``), beta towards 0;
    * ``"off"``: no decay on gamma, beta (and GN+'s ``lambda``).

    GN+'s ``lambda`` (``"norm_other"``) decays towards 0 unless ``"off"``.

    Place it before the optimizer for coupled L2 decay (SGD, as in PyTorch's
    ``weight_decay``), or after ``scale_by_adam`` for AdamW's decoupled decay.

    Args:
      weight_decay: the coefficient (a float or a schedule of the step count).
      norm_decay: ``"zero"``, ``"one"`` or ``"off"``.
      labels: a tree of labels like :func:`norm_param_labels` returns, or a callable
        ``params -> labels``; needed unless ``norm_decay="zero"`` (where every parameter
        decays towards 0 alike).

    Raises:
      ValueError: ``norm_decay`` is not a mode, or it is ``"one"``/``"off"`` without
        ``labels``.
    """
    checks.choice(norm_decay, NORM_DECAY_MODES, "norm_decay", "weight_decay_towards")
    if labels is None and norm_decay != "zero":
        raise ValueError(
            f"weight_decay_towards: norm_decay={norm_decay!r} needs the norm layers' "
            "parameters; pass labels=norm_param_labels(params, model_norm_paths(model, x)).")
    targets = {"weight": 0.0, "norm_scale": 1.0 if norm_decay == "one" else 0.0,
               "norm_bias": 0.0, "norm_other": 0.0}
    on = {"weight": True, "norm_scale": norm_decay != "off", "norm_bias": norm_decay != "off",
          "norm_other": norm_decay != "off"}
    scheduled = callable(weight_decay)

    def init_fn(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32)) if scheduled else \
            WeightDecayTowardsState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("weight_decay_towards needs the parameters: call "
                             "tx.update(grads, opt_state, params).")
        if labels is None:
            tree_labels = jax.tree_util.tree_map(lambda _: "weight", params)
        else:
            tree_labels = labels(params) if callable(labels) else labels
        if scheduled:
            wd = weight_decay(state.count)
            state = optax.ScaleByScheduleState(count=optax.safe_increment(state.count))
        else:
            wd = weight_decay

        def one(u, p, lab):
            if lab not in targets:
                raise ValueError(f"weight_decay_towards: unknown label {lab!r}; labels must be "
                                 f"one of {sorted(targets)}.")
            if not on[lab]:
                return u
            return u + (wd * (p - targets[lab])).astype(u.dtype)

        return jax.tree_util.tree_map(one, updates, params, tree_labels), state

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(name: str, learning_rate: float | Schedule, *, momentum: float = 0.9,
                   weight_decay: float = 0.0, norm_decay: str = "zero",
                   grad_clip_norm: float | None = None, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, norm_paths: Iterable[str] | None = None
                   ) -> optax.GradientTransformation:
    """An optax chain: ``[clip by global norm] -> [weight decay] -> optimizer``.

    Args:
      name: ``"sgd"`` (heavy-ball momentum; ``momentum=0`` for plain SGD, as paper 000's
        one-cycle runs), ``"nesterov"``, ``"adam"`` (L2 coupled as PyTorch's
        ``Adam(weight_decay=...)``: the decay is added to the gradient before Adam's
        moments) or ``"adamw"`` (decoupled).
      learning_rate: a float or a schedule.
      momentum: SGD momentum.
      weight_decay: coupled L2 for SGD and Adam (added to the gradient before momentum /
        Adam's moments, as PyTorch's ``weight_decay``); decoupled for AdamW (added to
        Adam's direction, scaled by the learning rate).
      norm_decay: the switch for gamma/beta, see :func:`weight_decay_towards`.
      grad_clip_norm: clip the gradients to this global norm first (``None``: no clipping).
      b1, b2, eps: Adam's parameters.
      norm_paths: the module paths of the model's norm layers
        (:func:`model_norm_paths`), whose ``scale``/``bias`` follow ``norm_decay``;
        needed with ``weight_decay`` unless ``norm_decay="zero"``.
    """
    checks.choice(name, OPTIMIZERS, "optimizer", "make_optimizer")
    checks.choice(norm_decay, NORM_DECAY_MODES, "norm_decay", "make_optimizer")
    if name == "nesterov" and not momentum:
        raise ValueError("optimizer 'nesterov' needs momentum > 0; set momentum (e.g. 0.9) or "
                         "use optimizer 'sgd'.")
    if grad_clip_norm is not None and not grad_clip_norm > 0:
        raise ValueError(f"grad_clip_norm must be positive or None, got {grad_clip_norm!r}.")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}.")
    parts = []
    if grad_clip_norm is not None:
        parts.append(optax.clip_by_global_norm(grad_clip_norm))
    decay = []
    if weight_decay:
        if norm_paths is None and norm_decay != "zero":
            raise ValueError(
                f"make_optimizer: norm_decay={norm_decay!r} needs the norm layers; pass "
                "norm_paths=model_norm_paths(model, x).")
        paths = None if norm_paths is None else tuple(norm_paths)
        labels = None if paths is None else (lambda params: norm_param_labels(params, paths))
        decay = [weight_decay_towards(weight_decay, norm_decay=norm_decay, labels=labels)]
    if name == "adam":
        parts += [*decay, optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                  optax.scale_by_learning_rate(learning_rate)]
    elif name == "adamw":
        parts += [optax.scale_by_adam(b1=b1, b2=b2, eps=eps), *decay,
                  optax.scale_by_learning_rate(learning_rate)]
    else:
        parts += [*decay, optax.sgd(learning_rate, momentum=momentum or None,
                                    nesterov=name == "nesterov")]
    return optax.chain(*parts)
