"""A fixture that runs a test with XLA:CPU's plain-sums-first moments forced on and off.

The test process has 4 CPU devices (conftest.py), where the statistics always take the
shifted sums (``seqnorm_jax.stats.moments.plain_sums_first``); a process with one CPU
device tries the plain sums first. Tests that take this fixture run both ways.
"""

import pytest

from seqnorm_jax.stats import moments


@pytest.fixture(params=[False, True], ids=["shifted", "plain-first"])
def plain_first(request, monkeypatch):
    monkeypatch.setattr(moments, "plain_sums_first", lambda: request.param)
    return request.param
