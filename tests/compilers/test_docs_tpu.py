"""The documentation's blocks that need the TPU compiler run here in full (the main suite,
without libtpu, checks only that they end in the error naming the [tpu] extra).

The blocks are found the way tests/test_docs.py finds every block (its `fenced_blocks`),
by their ``<!-- docs-test: needs=tpu -->`` marker; each runs alone in a fresh process and
must print what the comment under its ``print`` says.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _docs_test_module():
    spec = importlib.util.spec_from_file_location("docs_blocks", ROOT / "tests" / "test_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_DOCS = _docs_test_module()
TPU_BLOCKS = [b for b in _DOCS.PYTHON_BLOCKS if b[4].get("needs") == "tpu"]


def _expected_output(code: str) -> list[str]:
    """The fields of the comment line right after the block's last ``print(...)``, up to
    its colon: ``# 1 4855296 2.59e-05: one all-reduce ...`` -> ["1", "4855296", "2.59e-05"]."""
    lines = code.splitlines()
    last_print = max(i for i, line in enumerate(lines) if line.startswith("print("))
    comment = lines[last_print + 1]
    assert comment.startswith("# "), f"no expected-output comment after the print: {comment!r}"
    return comment[2:].split(":", 1)[0].split()


def test_tpu_blocks_found():
    assert TPU_BLOCKS, "no <!-- docs-test: needs=tpu --> block in the documentation"


@pytest.mark.parametrize("block", TPU_BLOCKS, ids=_DOCS.block_id)
def test_tpu_block_runs_and_prints_what_it_says(block, tmp_path):
    path, _, line, code, _ = block
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    where = f"{path.relative_to(ROOT)}:{line}"
    assert proc.returncode == 0, f"{where} failed:\n{proc.stderr[-3000:]}"
    printed = proc.stdout.strip().splitlines()[-1].split()
    expected = _expected_output(code)
    assert len(printed) == len(expected), (where, printed, expected)
    for got, want in zip(printed, expected):
        if want.isdigit():
            assert got == want, (where, printed, expected)
        else:  # a float printed to 3 significant digits in the comment
            assert float(got) == pytest.approx(float(want), rel=5e-3), (where, printed, expected)
