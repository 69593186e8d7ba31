"""The training side's layout: one direction of calls, no reaching into another module's
privates, no module over 500 lines.

The order is the one ``seqnorm_jax/train/__init__.py``'s docstring lists (its
``:mod:`~seqnorm_jax.train.NAME``` lines): a module may import only modules listed before
it, at the top or inside a function. Read from the source with ``ast``; nothing is
imported.
"""

import ast
import pathlib
import re

import pytest

TRAIN = pathlib.Path(__file__).resolve().parents[1] / "seqnorm_jax" / "train"
ORDER = re.findall(r"^\* :mod:`~seqnorm_jax\.train\.(\w+)`",
                   (TRAIN / "__init__.py").read_text(), flags=re.M)
MAX_LINES = 500
# underscore names that are public API (NamedTuple's methods)
PUBLIC_UNDERSCORED = {"_replace", "_asdict", "_fields", "_make"}


def _tree(name: str) -> ast.Module:
    return ast.parse((TRAIN / f"{name}.py").read_text(), filename=f"{name}.py")


def _train_imports(tree: ast.Module) -> list[tuple[str, list[str], int]]:
    """``(module, imported names, line)`` of every import of a ``seqnorm_jax.train``
    module (``from seqnorm_jax.train import x`` counts as importing ``x`` if ``x`` is a
    module)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [a.name for a in node.names]
            if node.module.startswith("seqnorm_jax.train."):
                found.append((node.module.split(".")[2], names, node.lineno))
            elif node.module == "seqnorm_jax.train":
                found += [(n, [], node.lineno) for n in names if n in ORDER]
        elif isinstance(node, ast.Import):
            found += [(a.name.split(".")[2], [], node.lineno) for a in node.names
                      if a.name.startswith("seqnorm_jax.train.")]
    return found


def _defined(tree: ast.Module) -> set[str]:
    """Every name a module defines or assigns, at any depth (its own privates)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


def _outside_modules(tree: ast.Module) -> set[str]:
    """Names bound by importing something outside the project (``os``, ``jax``, ...)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names
                      if not a.name.startswith("seqnorm_jax")}
    return names


def test_the_docstring_lists_every_module_once():
    modules = sorted(p.stem for p in TRAIN.glob("*.py") if p.stem != "__init__")
    assert sorted(ORDER) == modules
    assert len(set(ORDER)) == len(ORDER)


@pytest.mark.parametrize("name", ORDER)
def test_imports_go_one_way(name):
    tree = _tree(name)
    earlier = ORDER[:ORDER.index(name)]
    for module, names, line in _train_imports(tree):
        assert module in earlier, (f"train/{name}.py:{line} imports train.{module}, which is "
                                   f"not listed before it ({', '.join(earlier)})")
        private = [n for n in names if n.startswith("_")]
        assert not private, f"train/{name}.py:{line} imports private {private} of {module}"


@pytest.mark.parametrize("name", ORDER)
def test_no_private_of_another_module(name):
    """``x._name`` is only for names the module defines itself (its own objects'
    privates) or modules from outside the project (``os._exit``)."""
    tree = _tree(name)
    own, outside = _defined(tree), _outside_modules(tree)
    bad = [f"{ast.unparse(node)} (line {node.lineno})" for node in ast.walk(tree)
           if isinstance(node, ast.Attribute) and node.attr.startswith("_")
           and not node.attr.startswith("__") and node.attr not in own | PUBLIC_UNDERSCORED
           and not (isinstance(node.value, ast.Name) and node.value.id in outside)]
    assert not bad, f"train/{name}.py reaches into other modules' privates: {bad}"


@pytest.mark.parametrize("name", ORDER)
def test_no_module_over_500_lines(name):
    lines = len((TRAIN / f"{name}.py").read_text().splitlines())
    assert lines <= MAX_LINES, f"train/{name}.py has {lines} lines"


def test_the_checker_sees_a_backward_import_and_a_private():
    # the rules above catch what they are for (an independent, planted case)
    tree = ast.parse("from seqnorm_jax.train.loop import Trainer\n"
                     "from seqnorm_jax.train import checkpoint\n"
                     "def f(c):\n    return c._step_folders(), checkpoint._quiet\n")
    assert [m for m, _, _ in _train_imports(tree)] == ["loop", "checkpoint"]
    private = sorted(n.attr for n in ast.walk(tree)
                     if isinstance(n, ast.Attribute) and n.attr.startswith("_")
                     and n.attr not in _defined(tree))
    assert private == ["_quiet", "_step_folders"]
