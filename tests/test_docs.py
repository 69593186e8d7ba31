"""The documentation cannot rot: its examples run, its commands exist, its API is complete.

* Every ```python block of README.md and docs/**/*.md runs alone (its own imports, no
  block depends on another), on the CPU platform: exec'd in a fresh namespace, or, for a
  block that needs several devices and says so in an HTML comment on the line before it
  (``<!-- docs-test: devices=8 -->``), in a fresh process with
  ``XLA_FLAGS=--xla_force_host_platform_device_count=8``. A block that compiles for TPU
  says ``<!-- docs-test: needs=tpu -->``: where libtpu (the ``[tpu]`` extra) is not
  installed, the block must end in the one error that names that extra (the compiler
  tests, tests/compilers/test_docs_tpu.py, run it in full with libtpu).
* Every fenced block names its language; shell blocks (```bash, ```console) are not run,
  but every ``seqnorm-jax COMMAND`` in them must be a command of the CLI's parser
  (``seqnorm-jax COMMAND --help`` exits 0).
* Every name in the ``__all__`` of the documented modules appears in the API reference
  (``docs/api/*.md`` renders each module with a ``::: module`` directive, which lists
  the module's ``__all__``) and has a docstring of its own.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import inspect
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
MARKER = re.compile(r"<!--\s*docs-test:\s*(.*?)\s*-->")
SHELL_LANGUAGES = {"bash", "console", "sh"}
LANGUAGES = {"python", "text", "json", *SHELL_LANGUAGES}
BLOCK_TIMEOUT_S = 120

# The modules whose `__all__` is the public API, each rendered in docs/api/.
API_MODULES = [
    "seqnorm_jax", "seqnorm_jax.functional", "seqnorm_jax.stats", "seqnorm_jax.linen",
    "seqnorm_jax.nnx", "seqnorm_jax.factory", "seqnorm_jax.registry", "seqnorm_jax.renaming",
    "seqnorm_jax.train", "seqnorm_jax.data", "seqnorm_jax.models", "seqnorm_jax.studies",
    "seqnorm_jax.analysis", "seqnorm_jax.aot",
]


def fenced_blocks(path: Path):
    """(language, first line number, code, marker options) of every fenced block."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = m.group(1), m.group(2), i + 1
        j = start
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        code = "\n".join(line[len(indent):] for line in lines[start:j])
        prev = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        marker = MARKER.search(prev)
        options = dict(item.split("=", 1) for item in marker.group(1).split()) if marker else {}
        blocks.append((lang, start, code, options))
        i = j + 1
    return blocks


ALL_BLOCKS = [(path, *block) for path in DOC_FILES for block in fenced_blocks(path)]
PYTHON_BLOCKS = [b for b in ALL_BLOCKS if b[1] == "python"]
SHELL_BLOCKS = [b for b in ALL_BLOCKS if b[1] in SHELL_LANGUAGES]


def block_id(block) -> str:
    return f"{block[0].relative_to(ROOT)}:{block[2]}"


def test_doc_files_found():
    assert (ROOT / "README.md") in DOC_FILES
    assert len(DOC_FILES) >= 20, DOC_FILES
    assert len(PYTHON_BLOCKS) >= 20, len(PYTHON_BLOCKS)


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=block_id)
def test_every_block_names_its_language(block):
    path, lang, line, _, options = block
    assert lang in LANGUAGES, (
        f"{path.relative_to(ROOT)}:{line}: fenced block without a known language "
        f"({lang!r}); mark it as one of {sorted(LANGUAGES)}")
    assert not options or lang == "python", f"{path.name}:{line}: a marker on a {lang} block"


def _run_in_subprocess(code: str, cwd: Path, devices: int) -> tuple[int, str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("JAX_NUM_CPU_DEVICES", None)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    return proc.returncode, proc.stderr


def _run_in_process(code: str, cwd: Path, monkeypatch) -> tuple[int, str]:
    """exec in a fresh namespace: no name of another block (or of this module) is visible,
    so a block that forgets an import fails; modules already imported are reused."""
    monkeypatch.chdir(cwd)
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(code, "<docs block>", "exec"), namespace)
    except BaseException as error:  # noqa: BLE001 -- reported with the block's place
        import traceback
        return 1, "".join(traceback.format_exception(error))
    return 0, ""


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=block_id)
def test_python_block_runs(block, tmp_path, monkeypatch):
    """Blocks without a marker run in this process (the suite's CPU devices and compile
    flags, tests/conftest.py); marked blocks in a fresh process with their devices. Either
    way each block writes its files (plots, runs) into a fresh folder, never the clone."""
    path, _, line, code, options = block
    assert set(options) <= {"devices", "needs"}, f"unknown docs-test option in {options}"
    if "devices" in options:
        returncode, stderr = _run_in_subprocess(code, tmp_path, int(options["devices"]))
    else:
        returncode, stderr = _run_in_process(code, tmp_path, monkeypatch)
    if options.get("needs") == "tpu" and importlib.util.find_spec("libtpu") is None:
        assert returncode == 1 and stderr.strip().splitlines()[-1].endswith(
            'the TPU compiler (libtpu) is not installed: pip install "seqnorm-jax[tpu]"'), (
            f"{path.relative_to(ROOT)}:{line}: without libtpu the block must name the "
            f"[tpu] extra:\n{stderr[-3000:]}")
        return
    assert returncode == 0, (
        f"{path.relative_to(ROOT)}:{line} failed (exit {returncode}):\n{stderr[-3000:]}")


COMMAND = re.compile(r"(?:^|[\s/(`])seqnorm-jax\s+([a-z][a-z-]*)")


def shell_commands() -> list[tuple[str, str]]:
    found = {}
    for path, _, line, code, _ in SHELL_BLOCKS:
        for name in COMMAND.findall(code):
            found.setdefault(name, f"{path.relative_to(ROOT)}:{line}")
    return sorted(found.items())


def test_shell_blocks_name_commands():
    names = {name for name, _ in shell_commands()}
    assert {"compare", "train", "eval", "tune", "experiment", "plan"} <= names, names


@pytest.mark.parametrize("command,where", shell_commands())
def test_shell_block_command_exists(command, where):
    from seqnorm_jax.cli.parser import build_parser

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        build_parser().parse_args([command, "--help"])
    assert stop.value.code == 0, f"{where}: `seqnorm-jax {command}` is not a command"
    assert f"seqnorm-jax {command}" in out.getvalue()


def api_directives() -> set[str]:
    text = "\n".join(p.read_text() for p in sorted((ROOT / "docs" / "api").glob("*.md")))
    return set(re.findall(r"^:::\s*(\S+)", text, flags=re.M))


def test_api_pages_render_every_module():
    assert set(API_MODULES) <= api_directives(), set(API_MODULES) - api_directives()
    config = (ROOT / "mkdocs.yml").read_text()
    # The directives list each module's __all__; nothing may narrow that.
    assert "members:" not in config and "filters:" not in config


def _attribute_docstring(module, name: str, seen=()) -> str | None:
    """The string literal right after `name = ...` where `name` is assigned, following
    `from X import name` re-exports (where griffe and mkdocstrings read it)."""
    tree = ast.parse(inspect.getsource(module))
    body = []  # top-level statements, with those of `if TYPE_CHECKING:` blocks in place
    for node in tree.body:
        body += node.body if isinstance(node, ast.If) else [node]
    for i, node in enumerate(body):
        targets = []
        if isinstance(node, ast.Assign):
            targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            targets = [node.target.id]
        if name in targets:
            nxt = body[i + 1] if i + 1 < len(body) else None
            if (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                return nxt.value.value
            return None
        if isinstance(node, ast.ImportFrom) and any(
                (a.asname or a.name) == name for a in node.names):
            source = importlib.import_module(
                importlib.util.resolve_name("." * node.level + (node.module or ""),
                                            module.__package__) if node.level else node.module)
            if source.__name__ in seen or not source.__name__.startswith("seqnorm_jax"):
                return None
            original = next(a.name for a in node.names if (a.asname or a.name) == name)
            return _attribute_docstring(source, original, (*seen, module.__name__))
    return None


def public_names() -> list[tuple[str, str]]:
    return [(mod, name) for mod in API_MODULES
            for name in importlib.import_module(mod).__all__]


@pytest.mark.parametrize("module_name,name", public_names())
def test_public_name_has_docstring(module_name, name):
    module = importlib.import_module(module_name)
    obj = getattr(module, name)
    if inspect.ismodule(obj) or inspect.isroutine(obj):
        doc = obj.__doc__
    elif inspect.isclass(obj):
        doc = obj.__dict__.get("__doc__")
    else:  # a constant or an alias: the string literal after its assignment
        doc = _attribute_docstring(module, name)
    assert doc and doc.strip(), (
        f"{module_name}.{name} has no docstring; the API reference would show it bare "
        f"(for a constant, put a string literal on the line after its assignment)")


REPOSITORY_FILES = "https://github.com/seqnorm-jax/seqnorm-jax/blob/main/"


def test_readme_links_resolve():
    """The README is also the package's page on PyPI, where a relative link leads nowhere:
    its links into the repository (docs/, CHANGELOG.md, LICENSE) are absolute, and each
    names a file of this tree, and an anchor a heading of that page."""
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    relative = [link for link in links if not re.match(r"[a-z]+:", link)]
    assert not relative, f"README.md has relative links, broken on PyPI: {relative}"
    ours = [link[len(REPOSITORY_FILES):] for link in links if link.startswith(REPOSITORY_FILES)]
    assert len(ours) >= 15, ours
    for link in ours:
        target, _, anchor = link.partition("#")
        path = ROOT / target
        assert path.is_file(), f"README.md links to {link}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+\s+(.+?)\s*$", path.read_text(), flags=re.M)
            slugs = {re.sub(r"[^\w\- ]", "", h.lower()).strip().replace(" ", "-")
                     for h in headings}
            assert anchor in slugs, f"README.md links to {link}: no heading {anchor!r}"
