"""Kernel tests run the Triton kernels in the CPU interpreter.

``TRITON_INTERPRET=1`` is set per test (not for the whole session, which would push every other
test directory's kernel calls through the slow interpreter). The launchers read it at call time
and re-decorate their kernels for the interpreter when needed (kernels/_dispatch.py), so it does
not matter whether triton or ``kernels`` was imported first. Tests marked ``gpu`` run with it
unset so that the compiled kernels are what they test.
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # Harmless duplicates of the markers pyproject registers; lets this directory run on its own.
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: slow test, deselect with -m 'not slow'")


@pytest.fixture(autouse=True)
def _triton_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("gpu") is not None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
