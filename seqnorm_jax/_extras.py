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

The package, :mod:`seqnorm_jax.train`, :mod:`~seqnorm_jax.studies` and
:mod:`~seqnorm_jax.cli` export their names lazily (:func:`lazy_exports`): importing them
imports nothing heavy until a name is used.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

__all__ = ["TRAIN_MODULES", "MissingExtraError", "lazy_exports", "missing_train_modules",
           "require_train", "require_wandb"]

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


def require_wandb(field: str) -> None:
    """Raise :class:`MissingExtraError` if ``field`` asks for Weights & Biases logging and
    the ``wandb`` extra is not installed (checked before a run does any work)."""
    if importlib.util.find_spec("wandb") is None:
        raise MissingExtraError(
            f"{field} logs to Weights & Biases, which is not installed: "
            "pip install \"seqnorm-jax[wandb]\" (or leave it unset)")


def lazy_exports(package: str, init_file: str) -> tuple[Any, Any]:
    """``(__getattr__, __dir__)`` for ``package`` (PEP 562): its public names are the
    imports under ``if TYPE_CHECKING:`` in its ``__init__`` (``init_file``), which static
    type checkers read, and each is imported when first used. So ``import seqnorm_jax``
    costs nothing until a layer is touched, and ``seqnorm-jax --help`` never loads jax.
    ``from package import submodule`` names under the ``TYPE_CHECKING`` block import the
    submodule; any other submodule (``seqnorm_jax.linen``) is imported when first named."""
    tree = ast.parse(Path(init_file).read_text(encoding="utf-8"))
    where: dict[str, tuple[str, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for imp in node.body:
                if isinstance(imp, ast.ImportFrom) and imp.module:
                    for alias in imp.names:
                        where[alias.asname or alias.name] = (imp.module, alias.name)

    def __getattr__(name: str) -> Any:
        if name not in where:
            # a submodule (``package.linen``) is found as an eager package's would be
            if not name.startswith("__") and importlib.util.find_spec(f"{package}.{name}"):
                return importlib.import_module(f"{package}.{name}")
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        source, attr = where[name]
        if source == package:  # a submodule
            value = importlib.import_module(f"{package}.{attr}")
        else:
            value = getattr(importlib.import_module(source), attr)
        setattr(sys.modules[package], name, value)  # found directly from now on
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(where))

    return __getattr__, __dir__
