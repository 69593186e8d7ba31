"""One call of a pure function: its input's layout and its shared arguments, checked once.

The arguments every pure function with running statistics shares (``epsilon``, ``axis``,
the running statistics, ``example_weight``, the device axis, ``use_fast_variance``,
``dtype``, ``return_stats``, ``mask``) are written once, in :func:`_shared`. The
:func:`normalization` decorator gives a function its public signature (its own arguments,
then that tail), checks them once per call (:func:`setup`: ``x``, ``mask``, the running
statistics, ``epsilon``, ``example_weight``) into one frozen :class:`Call`, and returns
``y`` or ``(y, update)``. The function's own arguments (groups, order, sets) are resolved
through the call's methods, each of which raises a ``ValueError`` naming the argument and
its fix; then the function does its math.

A layer calls the same function through ``function.named(who)`` (messages name the layer)
and passes its fields by name (:func:`keyword_names`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec

from seqnorm_jax import checks, stats
from seqnorm_jax.stats import Moments

Array = jax.Array

GHOST_FIX = "Use fewer batch_groups (a larger ghost_size) or a larger batch."
GROUP_FIX = ("Use fewer batch_groups (a larger ghost_size) or fewer channel_groups (a larger "
             "channel_group_size), or a larger batch.")
GN_FIX = "Use fewer num_groups (a larger group_size)."
# Without batch_groups or ghost_size: one sample group, the whole batch (BatchNorm's).
BATCH_GROUPS = 1


class BatchSizeError(ValueError):
    """The batch cannot be split as the layer asks (training only; inference takes any batch)."""


def is_zero(alpha: Any) -> bool:
    """``alpha`` is a static 0 (an example weight that needs no per-example moments)."""
    return isinstance(alpha, (int, float)) and alpha == 0


@dataclasses.dataclass(frozen=True)
class Call:
    """A pure function's input layout and shared arguments, resolved and checked.

    Attributes:
      who: the function's name, for messages.
      shape: the shape of ``x``.
      axis: the feature axis, non-negative (``given_axis``: as passed, for messages).
      epsilon, use_fast_variance, axis_name, axis_index_groups: as passed.
      dtype: the output dtype (the input's when not given).
      mask: the boolean mask (broadcastable to ``x``), or ``None``.
      running: the running statistics as ``(1, C)`` moments in the statistics dtype;
        ``None`` in training.
      example_weight: the inference example weight (alpha of "Four Things"); a traced
        one is clipped to ``[0, 1]`` (:func:`seqnorm_jax.checks.example_weight`).
    """

    who: str
    shape: tuple[int, ...]
    axis: int
    given_axis: int
    epsilon: float
    dtype: Any
    use_fast_variance: bool
    axis_name: str | None
    axis_index_groups: Any
    mask: Array | None
    running: Moments | None
    example_weight: float | Array

    @property
    def n(self) -> int:
        """The (local) batch size."""
        return self.shape[0]

    @property
    def c(self) -> int:
        """The number of channels."""
        return self.shape[self.axis]

    @property
    def spatial(self) -> int:
        """The product of the spatial sizes (1 for dense inputs)."""
        return math.prod(self.shape[i] for i in stats.spatial_axes(len(self.shape), self.axis))

    @property
    def dense(self) -> bool:
        """``x`` is ``(N, C)``: its per-sample moments would be as large as ``x``."""
        return len(self.shape) == 2

    @property
    def training(self) -> bool:
        return self.running is None

    @property
    def plain_inference(self) -> bool:
        """Inference from the running statistics alone: one multiply-add per element."""
        return self.running is not None and is_zero(self.example_weight)

    @property
    def whole_local_batch(self) -> bool:
        """No mask and no device axis: statistics may come straight from ``x``."""
        return self.mask is None and self.axis_name is None

    @functools.cached_property
    def weight(self) -> Array | None:
        """The ``(N, C)`` count of kept entries per sample and channel under ``mask``."""
        return stats.sample_counts(self.mask, self.shape, self.axis)

    # -- the function's own arguments ------------------------------------------------

    def channel_groups(self, groups: int | None, size: int | None, *,
                       groups_name: str = "channel_groups",
                       size_name: str = "channel_group_size", default: int | None = None) -> int:
        """The number of channel groups from a count or a size (``default``: ``C``)."""
        return checks.resolve_groups(
            self.c, groups, size, who=self.who, groups_name=groups_name, size_name=size_name,
            what=f"number of channels of x (shape {self.shape}, axis={self.given_axis})",
            default=self.c if default is None else default,
        )

    def batch_groups(self, groups: int | None, size: int | None,
                     default: int = BATCH_GROUPS) -> int:
        """The number of sample groups of the (global) batch, from a count or a size.

        Across devices (``axis_name``) the count applies to the global batch and its
        divisibility is checked where the groups are pooled (:func:`stats.pool`).
        """
        if self.axis_name is not None:
            if size is not None:
                raise ValueError(
                    f"{self.who}: use batch_groups (groups of the global batch), not "
                    f"ghost_size, with axis_name={self.axis_name!r}."
                )
            return checks.positive_int(default if groups is None else groups, "batch_groups",
                                       self.who)
        return checks.resolve_groups(
            self.n, groups, size, who=self.who, groups_name="batch_groups",
            size_name="ghost_size", what=f"batch size of x (shape {self.shape})",
            default=default, error=BatchSizeError,
            fix=" or a batch size that is a multiple of the number of groups "
            "(drop the last incomplete batch, e.g. drop_remainder=True)",
        )

    def check_set_size(self, samples: int, channels: int, what: str,
                       error: type[ValueError] = ValueError, fix: str = "", *,
                       per_sample: bool = False) -> None:
        """Refuse normalization sets of one element (variance 0, output undefined), and
        an empty batch in training unless the sets are ``per_sample`` (an empty batch
        then has an empty output)."""
        if self.n == 0 and self.training and not per_sample:
            raise error(
                f"{self.who}: x has an empty batch (shape {self.shape}): training normalizes "
                "with the batch's statistics and an empty batch has none. Skip empty "
                "batches, or normalize with the running statistics (use_running_average=True)."
            )
        if samples * self.spatial * channels < 2:
            raise error(
                f"{self.who}: each {what} normalization set has a single element "
                f"(x.shape={self.shape}: {samples} sample(s) x {self.spatial} spatial x "
                f"{channels} channel(s)), so its variance is 0 and the output is undefined. "
                f"{fix or 'Use fewer groups (larger groups) or a larger batch.'}"
            )

    def choice(self, value: Any, choices: tuple, name: str) -> Any:
        return checks.choice(value, choices, name, self.who)


def setup(
    who: str,
    x: Array,
    *,
    axis: int,
    epsilon: float,
    dtype: Any,
    use_fast_variance: bool,
    axis_name: str | None = None,
    axis_index_groups: Any = None,
    mask: Array | None = None,
    running_mean: Array | None = None,
    running_var: Array | None = None,
    example_weight: float | Array = 0.0,
    caller: str | None = None,
) -> Call:
    """Check a pure function's shared arguments and resolve ``x``'s layout: the one place
    each of them is checked (the rules are :mod:`seqnorm_jax.checks`'). Messages name the
    function ``who``; those about ``epsilon`` and ``example_weight``, a layer's field and
    call argument, name the ``caller`` (a layer) when given."""
    check_input(who, x, mask)
    shape = tuple(x.shape)
    feature = stats.feature_axis(len(shape), axis)
    running = _running(who, x, feature, running_mean, running_var)
    return Call(
        who=who, shape=shape, axis=feature, given_axis=axis,
        epsilon=checks.epsilon(epsilon, caller or who),
        dtype=jnp.dtype(x.dtype if dtype is None else dtype),
        use_fast_variance=use_fast_variance, axis_name=axis_name,
        axis_index_groups=axis_index_groups, mask=mask, running=running,
        example_weight=_example_weight(caller or who, example_weight,
                                       training=running is None),
    )


def _example_weight(who: str, alpha: Any, training: bool) -> float | Array:
    """``example_weight`` in ``[0, 1]`` (:func:`checks.example_weight`), and only at
    inference: in training the statistics are the batch's and there is nothing to blend."""
    alpha = checks.example_weight(alpha, who)
    if training and not (checks.static_number(alpha) and alpha == 0):
        raise ValueError(
            f"{who}: example_weight={alpha!r} applies at inference only; call with "
            "use_running_average=True (the pure functions: give running_mean and "
            "running_var), or leave example_weight at 0."
        )
    return alpha


def check_input(who: str, x: Array, mask: Array | None) -> None:
    """``x`` is floating point; flax's ``mask`` is a boolean array that broadcasts to it."""
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(
            f"{who}: x must be a floating-point array, got dtype {jnp.result_type(x)} "
            f"(shape {jnp.shape(x)}); cast it first, e.g. x.astype(jnp.float32)."
        )
    if mask is None:
        return
    shape = tuple(jnp.shape(x))
    try:
        ok = jnp.broadcast_shapes(jnp.shape(mask), shape) == shape
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{who}: mask of shape {jnp.shape(mask)} does not broadcast to x of "
                         f"shape {shape}; give a boolean mask of x's shape (or one that "
                         "broadcasts to it, e.g. (N, 1, 1, 1) to drop whole samples).")
    if jnp.result_type(mask) != jnp.bool_:
        raise ValueError(f"{who}: mask must be boolean (True where the statistics are taken), "
                         f"got dtype {jnp.result_type(mask)}; pass mask.astype(bool).")


def _running(who: str, x: Array, axis: int, running_mean, running_var) -> Moments | None:
    """Running statistics as ``(1, C)`` moments in the statistics dtype of ``x``."""
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{who}: give both running_mean and running_var, or neither.")
    if running_mean is None:
        return None
    c = x.shape[axis]
    for name, r in (("running_mean", running_mean), ("running_var", running_var)):
        if jnp.shape(r) != (c,):
            raise ValueError(f"{who}: {name} must have shape ({c},) (the channels of x, shape "
                             f"{tuple(x.shape)}), got {jnp.shape(r)}.")
    dt = stats.stat_dtype(jnp.result_type(x))
    return Moments(jnp.asarray(running_mean, dt)[None], jnp.asarray(running_var, dt)[None])


def output(y: Array, update: Moments | None, return_stats: bool):
    """``y``, or ``(y, update)`` with ``return_stats``."""
    return (y, update) if return_stats else y


# ----------------------------------------------------------------------------
# the public signature: a function's own arguments, then the shared tail
# ----------------------------------------------------------------------------


def _shared(
    *,
    epsilon: float = 1e-5,
    axis: int = -1,
    running_mean: Array | None = None,
    running_var: Array | None = None,
    example_weight: float | Array = 0.0,
    axis_name: str | None = None,
    axis_index_groups: Any = None,
    use_fast_variance: bool = True,
    dtype: Any = None,
    return_stats: bool = False,
    mask: Array | None = None,
):
    """The keywords every pure function with running statistics takes, after its own
    (their one definition; :func:`normalization` appends them):

    Args:
      epsilon: added to the variance before ``1/sqrt`` (> 0).
      axis: the feature axis (the batch axis is 0).
      running_mean, running_var: ``(C,)`` running statistics: given, the function runs
        in inference mode (any batch size); otherwise it uses the batch's.
      example_weight: inference only: alpha in ``[0, 1]`` of "Four Things" (0: the
        running statistics, 1: each example's own).
      axis_name, axis_index_groups: the device axis (inside ``shard_map``) the batch
        statistics are pooled over, and its sub-groups (as in ``lax.psum``).
      use_fast_variance: one-pass (shifted) variance; False: two passes.
      dtype: the output dtype (default: the input's).
      return_stats: also return the values the running statistics move towards
        (``None`` in inference).
      mask: boolean, broadcastable to ``x``: the entries the statistics are taken over.
    """


SHARED: dict[str, inspect.Parameter] = dict(inspect.signature(_shared).parameters)


def keyword_names(function: Callable[..., Any]) -> tuple[str, ...]:
    """The keyword arguments of a pure function, in its signature's order (not ``x``,
    ``scale``, ``bias``): the names a layer binds its fields and call arguments to."""
    return tuple(name for name in inspect.signature(function).parameters
                 if name not in ("x", "scale", "bias"))


def normalization(fn: Callable[..., Any] | None = None, *, shared: bool = True,
                  rank1: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None):
    """The public pure function of ``fn(call, x, scale, bias, *, own...) -> (y, update)``.

    Its signature is ``fn``'s without ``call``, then the shared keywords of
    :func:`_shared`; a call binds the arguments, checks the shared ones once into a
    :class:`Call` (:func:`setup`), runs ``fn`` and returns ``y``, or ``(y, update)`` with
    ``return_stats``. With ``shared=False``, ``fn(caller, x, ...)`` declares every
    argument itself. ``rank1`` wraps the bound function (a rank-1 input read as one
    sample). The result runs on ``Explicit`` mesh axes too (:func:`any_mesh`), and
    ``result.named(caller)`` is the same function for a layer: the messages about its
    fields ``epsilon`` and ``example_weight`` name ``caller``.
    """
    if fn is None:
        return functools.partial(normalization, shared=shared, rank1=rank1)
    who = fn.__name__
    own = list(inspect.signature(fn).parameters.values())[1:]
    signature = inspect.Signature(own + (list(SHARED.values()) if shared else []))

    def run(caller: str | None, args: tuple, kwargs: dict):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        if not shared:
            return fn(caller, **arguments)
        common = {name: arguments.pop(name) for name in SHARED}
        return_stats = common.pop("return_stats")
        call = setup(who, arguments["x"], caller=caller, **common)
        y, update = fn(call, **arguments)
        return output(y, update, return_stats)

    @functools.cache
    def named(caller: str | None) -> Callable[..., Any]:
        def function(*args, **kwargs):
            return run(caller, args, kwargs)

        functools.update_wrapper(function, fn)
        function.__signature__ = signature
        return any_mesh(function if rank1 is None else rank1(function))

    public = named(None)
    public.named = named
    return public


# ----------------------------------------------------------------------------
# meshes with Explicit axes
# ----------------------------------------------------------------------------


def _explicit_spec(x) -> PartitionSpec | None:
    """The ``PartitionSpec`` of ``x`` when it is sharded over ``Explicit`` mesh axes, else None.

    ``jax.make_mesh`` makes ``Explicit`` axes by default: there the sharding is part of
    the array's type, and a reshape that splits a sharded batch axis into groups does
    not type-check without an explicit output sharding.
    """
    try:
        sharding = jax.typeof(x).sharding
    except (AttributeError, TypeError):
        return None
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or getattr(mesh, "empty", True):
        return None
    explicit = {name for name, kind in zip(mesh.axis_names, mesh.axis_types)
                if kind == AxisType.Explicit}
    used = set()
    for entry in sharding.spec:
        used.update(entry if isinstance(entry, tuple) else (entry,))
    return sharding.spec if explicit & used else None


def any_mesh(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` on ``Auto`` axes when its input is sharded over ``Explicit`` ones.

    Inside, XLA partitions the group reshapes and reductions exactly as on an ``Auto``
    mesh (the same collectives: ``tests/test_hlo_collectives.py``); the output keeps
    the input's sharding and the running-statistics targets come back sharded as the
    input's channels (replicated unless the channels are split, e.g. over a "model" axis).
    """

    @functools.wraps(fn)
    def wrapper(x, *args, **kwargs):
        spec = _explicit_spec(x)
        if spec is None:
            return fn(x, *args, **kwargs)
        arrays = {k: v for k, v in kwargs.items() if isinstance(v, jax.Array)}
        rest = {k: v for k, v in kwargs.items() if k not in arrays}
        out = spec
        if kwargs.get("return_stats"):  # the (C,) targets split as x's channels are
            ndim = jnp.ndim(x)
            feature = 0 if ndim == 1 else stats.feature_axis(ndim, kwargs.get("axis", -1))
            out = (spec, PartitionSpec(spec[feature] if feature < len(spec) else None))
        run = lambda x, args, arrays: fn(x, *args, **rest, **arrays)
        # auto_axes needs the mesh in context: the input's, whether or not the caller set
        # one with jax.set_mesh.
        with jax.sharding.use_abstract_mesh(jax.typeof(x).sharding.mesh.abstract_mesh):
            return jax.sharding.auto_axes(run, out_sharding=out)(x, args, arrays)

    return wrapper
