"""The installed package: one import name, a version, and a working CPU path where Triton is missing."""

from __future__ import annotations

import json
import subprocess
import sys

import layerfold
from tests.support.tolerances import approx

HIDE_TRITON = "import sys; sys.modules['triton'] = None\n"  # `import triton` now raises ImportError


def _run(code: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "TRITON_INTERPRET": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_version_and_public_api() -> None:
    assert layerfold.__version__.count(".") == 2
    for name in ("load", "Model", "ModelSpec", "calibrate", "prune", "Runtime", "generate", "evaluate"):
        assert getattr(layerfold, name) is not None, name
    assert set(layerfold.__all__) >= {"load", "calibrate", "prune", "__version__"}


def test_cli_version_flag(capsys) -> None:
    from layerfold.cli.main import main

    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert capsys.readouterr().out.strip() == f"layerfold {layerfold.__version__}"


def test_works_without_triton(tmp_path) -> None:
    """With triton unimportable (even with TRITON_INTERPRET=1 set), the CLI starts and the statistics and
    decode kernels run their torch references with the same results."""
    code = HIDE_TRITON + """
import json, torch
import layerfold.kernels as K
from layerfold.kernels import rmsnorm
assert not K._triton.AVAILABLE
x = torch.randn(3, 10, 16, generator=torch.Generator().manual_seed(0))
g = K.gram_accumulate(x, None)
c = K.channel_stats(x, None)
w = torch.rand(16, generator=torch.Generator().manual_seed(1)) + 0.5
y = rmsnorm.rmsnorm(x, w, 1e-6)
print(json.dumps({"gram": g[0].sum().item(), "chan": c[0].sum().item(), "rms": y.sum().item(), "use": K.use_triton(x)}))
"""
    r = _run(code)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    import torch

    from layerfold import kernels as K
    from layerfold.kernels import rmsnorm

    x = torch.randn(3, 10, 16, generator=torch.Generator().manual_seed(0))
    w = torch.rand(16, generator=torch.Generator().manual_seed(1)) + 0.5
    assert got["use"] is False
    assert got["gram"] == approx(K.gram_accumulate_ref(x, None)[0].sum().item(), torch.float32)
    assert got["chan"] == approx(K.channel_stats_ref(x, None)[0].sum().item(), torch.float32)
    assert got["rms"] == approx(rmsnorm.rmsnorm_ref(x, w, 1e-6).sum().item(), torch.float32)
    r = _run(HIDE_TRITON + "from layerfold.cli.main import main; main(['inspect', '--help'])")
    assert r.returncode == 0 and "usage: layerfold inspect" in r.stdout, r.stderr[-2000:]
