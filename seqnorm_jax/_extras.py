"""The optional halves of the package and the one rule for a missing one.

``pip install seqnorm-jax`` installs the layers: :mod:`seqnorm_jax.stats`,
:mod:`~seqnorm_jax.functional`, the linen and NNX layers, the norm registry and
:mod:`~seqnorm_jax.models`, on jax, flax and numpy alone. The training side --
:mod:`seqnorm_jax.data`, :mod:`~seqnorm_jax.train`, :mod:`~seqnorm_jax.studies`,
:mod:`~seqnorm_jax.analysis` and the ``seqnorm-jax`` command -- needs the ``train``
extra (``pip install "seqnorm-jax[train]"``). Each of those packages calls
:func:`require_train` before it imports anything, so a missing extra ends in one
:class:`MissingExtraError` naming the extra, never in a ``ModuleNotFoundError`` from
deep inside a pipeline.
"""

from __future__ import annotations

import importlib.util

__all__ = ["TRAIN_MODULES", "MissingExtraError", "missing_train_modules", "require_train"]

# The top-level modules the ``train`` extra installs (pyproject.toml, [train]), by the
# name they are imported as. optax and orbax come with flax today, but the training side
# imports them itself, so the extra names them with the versions it needs.
TRAIN_MODULES = ("optax", "orbax", "etils", "tensorflow_datasets", "grain", "PIL", "tqdm",
                 "matplotlib", "tensorboardX")


class MissingExtraError(ImportError):
    """A part of seqnorm-jax was used without the optional dependencies it needs."""


def missing_train_modules() -> list[str]:
    """The modules of the ``train`` extra that cannot be imported here (found, not imported)."""
    return [name for name in TRAIN_MODULES if importlib.util.find_spec(name) is None]


def require_train(part: str) -> None:
    """Raise :class:`MissingExtraError` if ``part`` (e.g. ``"seqnorm_jax.train"``) cannot run
    because the ``train`` extra is not installed."""
    missing = missing_train_modules()
    if missing:
        raise MissingExtraError(
            f"{part} needs the training extra, which is not installed (missing: "
            f"{', '.join(missing)}): pip install \"seqnorm-jax[train]\"")
