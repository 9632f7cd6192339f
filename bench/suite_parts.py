"""The parts of bench/gpu_suite.py. Each runs in its own process, writes ``OUT/<part>.json`` as it goes
(so a part stopped at its time limit keeps what it measured), and returns nothing.

A part receives ``tiny``: the same code on CPU with a tiny model (kernels in the Triton interpreter),
so the suite is exercised by the test suite between GPU runs.
"""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import checkout  # noqa: F401  (layerfold from this checkout when it is not installed)
import torch

ROOT = Path(__file__).resolve().parents[1]


class Recorder:
    """The part's results, rewritten to OUT/<part>.json at every ``save``."""

    def __init__(self, out: Path, part: str, tiny: bool):
        self.path = out / f"{part}.json"
        self.data: dict[str, Any] = {"part": part, "tiny": tiny, "status": "running", "started": time.time()}
        self.save()

    def save(self, **kw: Any) -> None:
        self.data.update(kw)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=_jsonable))
        tmp.replace(self.path)


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (torch.dtype, torch.device, Path)):
        return str(x)
    return repr(x)


def device(tiny: bool) -> torch.device:
    return torch.device("cpu" if tiny else "cuda")


def tiny_dense():
    from layerfold.core.spec import LayerSpec, ModelSpec

    layer = LayerSpec(64, 64, 64, n_heads=4, n_kv_heads=2, head_dim=16, d_ffn=128)
    return ModelSpec(vocab_size=256, d_model=64, layers=(layer,) * 4, max_position=512, bos_token_id=1,
                     eos_token_ids=(2,))


def dense_spec(tiny: bool):
    from layerfold.evaluation.shapes import llama7b_spec

    return tiny_dense() if tiny else llama7b_spec()


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- env: the card, and the ceilings every part divides by -------------------------------------------------
def part_env(rec: Recorder, tiny: bool) -> None:
    from layerfold.evaluation.measure import measure_bandwidth

    dev = device(tiny)
    info: dict[str, Any] = {"torch": torch.__version__, "python": sys.version.split()[0]}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info.update(name=p.name, sms=p.multi_processor_count, memory_gb=round(p.total_memory / 1e9, 1))
    rec.save(info=info)
    bw = measure_bandwidth(dev, torch.bfloat16, min_s=0.3 if not tiny else 0.05)
    rec.save(bandwidth_gbs=bw["bandwidth_gbs"], bandwidth=bw)
    n = 8192 if not tiny else 256
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    t = _time(lambda: a @ b, dev, reps=10 if not tiny else 2)
    rec.save(matmul_tflops=2 * n ** 3 / t / 1e12)
    if dev.type == "cuda":  # host -> device from pinned and from pageable memory (calibration's bound)
        host = torch.empty(1 << 30, dtype=torch.uint8).pin_memory()
        dst = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
        t = _time(lambda: dst.copy_(host, non_blocking=True), dev, reps=5)
        rec.save(h2d_pinned_gbs=(1 << 30) / t / 1e9)
        page = torch.empty(1 << 28, dtype=torch.uint8)
        t = _time(lambda: dst[: 1 << 28].copy_(page), dev, reps=3)
        rec.save(h2d_pageable_gbs=(1 << 28) / t / 1e9)
    rec.save(status="done")


def _time(fn, dev: torch.device, reps: int) -> float:
    """Median seconds of ``fn`` (synchronised), after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ---- tests: the gpu-marked tests --------------------------------------------------------------------
def part_tests(rec: Recorder, tiny: bool) -> None:
    """The `gpu`-marked tests (tiny: a few interpreter kernel tests, to exercise the plumbing)."""
    sel = ["-m", "gpu", "tests"] if not tiny else ["tests/kernels", "-k", "dispatch and not fast_cpu"]
    cmd = [sys.executable, str(ROOT / "bench" / "checkout.py"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "-x" if tiny else "-rf", *sel]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" or tiny}
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, check=False)
    tail = (r.stdout + r.stderr).strip().splitlines()
    summary = next((l for l in reversed(tail) if " passed" in l or " failed" in l or " error" in l), "")
    fails = [l for l in tail if l.startswith(("FAILED", "ERROR"))]
    rec.save(returncode=r.returncode, summary=summary, failures=fails[:40], seconds=time.perf_counter() - t,
             tail=tail[-30:], status="done" if r.returncode == 0 else "failed")
