"""bench/bench_gguf_convert.py runs (a tiny shape, layerfold's conversion only) and reports what it measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_bench_gguf_convert_tiny(tmp_path: Path) -> None:
    pytest.importorskip("gguf", reason="the gguf extra reads GGUF files")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gguf_convert.py"), "--layers", "1", "--d-model",
                          "64", "--heads", "4", "--kv-heads", "2", "--ffn", "128", "--engines", "layerfold",
                          "--work", str(tmp_path)], check=True, capture_output=True, text=True, timeout=300).stdout
    res = json.loads(out)
    assert res["layerfold"]["seconds"] > 0 and 0.1 < res["layerfold"]["peak_rss_gib"] < 8
    assert "transformers" not in res and res["shape"]["d_model"] == 64 and not list(tmp_path.iterdir())
