"""Test set-up shared by every test file.

TRITON_INTERPRET must be set before triton is first imported, so every Triton kernel runs in the
interpreter on this CPU-only machine (kernels read it again at call time to pick the Triton path).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch  # importing torch does not import triton

if importlib.util.find_spec("layerfold") is None:  # a bare checkout (a GPU machine): the package from its folders
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import checkout  # noqa: F401

if not torch.cuda.is_available():  # on a GPU the compiled kernels run; on CPU the interpreter runs them
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls run on one thread: on a shared 2-core machine two OpenMP threads waiting on each
    other cost 20-100x more than the work. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (gpu marker); no GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
