"""Run paths as ``etils.epath`` paths (what Orbax uses), so a URL stays a URL.

A local path is made absolute; ``gs://bucket/run`` stays ``gs://bucket/run``
(``os.path.abspath`` would turn it into a local folder named ``gs:``).
"""

from __future__ import annotations

import os

from etils import epath

__all__ = ["is_local", "run_path"]


def is_local(path: str | os.PathLike) -> bool:
    """True for a path on this machine's file system (not a URL like ``gs://...``)."""
    return "://" not in os.fspath(path)


def run_path(path: str | os.PathLike) -> epath.Path:
    """``path`` as an ``epath.Path``: absolute if local, unchanged if a URL."""
    text = os.fspath(path)
    return epath.Path(os.path.abspath(text) if is_local(text) else text)
