"""Kernel tests run the Triton kernels in the CPU interpreter when there is no GPU.

Triton fixes interpreter mode when it is first imported (kernels/_dispatch.py), so
``TRITON_INTERPRET=1`` has to be in the environment before anything imports triton: it is set here
at import (a no-op when the repository's tests/conftest.py, loaded first, already set it). On a
machine with CUDA it is left alone, so that the ``gpu`` tests exercise the compiled kernels.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from layerfold.kernels import _dispatch, gram  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    # Harmless duplicates of the markers pyproject registers; lets this directory run on its own.
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: slow test, deselect with -m 'not slow'")


@pytest.fixture(autouse=True)
def _triton_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    kernels_interpreted = _dispatch.interpreted(gram._gram_kernel)
    if request.node.get_closest_marker("gpu") is not None:
        if kernels_interpreted:
            pytest.fail(
                "gpu tests need the compiled kernels, but triton was imported with TRITON_INTERPRET=1; "
                "run them in a process where it is unset (e.g. `env -u TRITON_INTERPRET pytest -m gpu`, "
                "and have tests/conftest.py set it only when torch.cuda.is_available() is False)"
            )
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    elif not kernels_interpreted:
        pytest.skip(
            "the Triton interpreter is not active (TRITON_INTERPRET=1 must be set before triton is "
            "imported); on a GPU machine the gpu-marked tests cover the kernels"
        )
