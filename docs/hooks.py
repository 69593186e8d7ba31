"""MkDocs hooks: the result plots, and a check that the API reference is complete.

* The plots live next to the studies that made them, under ``experiments/results/``; the
  pages show them as ``results/<study>/<plot>.png``. Only the PNG files are published
  (the studies' READMEs and tables are linked on the repository).
* The docstrings cross-reference in Sphinx's roles (``:func:`name```); the API pages
  show such a reference as its code name, without the role.
* After the build, every name in the ``__all__`` of each module rendered with a
  ``::: module`` directive in ``docs/api/`` must have an entry (an HTML id
  ``module.name``, or ``module.sub.name`` where a submodule of the same name hides it) in
  the API pages; a missing one is a warning, which ``mkdocs build --strict`` turns into a
  failed build. ``tests/test_docs.py`` checks that each of those names has a docstring.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import griffe
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "experiments"
log = logging.getLogger("mkdocs.plugins.api_check")
SPHINX_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):(?=<code>)")


def on_files(files, config):
    for png in sorted((EXPERIMENTS / "results").rglob("*.png")):
        files.append(File(png.relative_to(EXPERIMENTS).as_posix(), str(EXPERIMENTS),
                          config["site_dir"], config["use_directory_urls"]))
    return files


def on_page_content(html, page, config, files):
    if page.file.src_uri.startswith("api/"):
        html = SPHINX_ROLE.sub("", html)
    return html


def on_post_build(config):
    api = Path(config["docs_dir"]) / "api"
    modules = sorted({m for page in api.glob("*.md")
                      for m in re.findall(r"^:::\s*(\S+)", page.read_text(), flags=re.M)})
    site = Path(config["site_dir"]) / "api"
    ids = {i for html in site.rglob("*.html")
           for i in re.findall(r'id="([\w.]+)"', html.read_text())}
    for module in modules:
        loaded = griffe.load(module, search_paths=[str(ROOT)])
        for name in loaded.exports or ():
            target = f"{module}.{name}"
            defined = _defined_at(loaded.members.get(name), target)
            if target in ids or defined in ids or any(
                    i.startswith(f"{module}.") and i.endswith(f".{name}") for i in ids):
                continue
            if any(m == target for m in modules):  # a submodule with a page of its own
                continue
            log.warning("API reference: %s is public (in %s.__all__) but not documented "
                        "in docs/api/", target, module)


def _defined_at(member, default: str) -> str:
    """Where a re-exported name is defined (following chains of imports)."""
    try:
        return member.final_target.path
    except Exception:  # not an alias, or one griffe cannot resolve (an external package)
        return default
