"""bench_models' warm-up in the sequential (GPU) schedule: a short untimed run (``warmup_tokens``, default
min(new_tokens, 16)) whose only jobs are the graphs, compiles and library set-up; the unit's peak memory is
the largest over the warm-up and the timed runs; and the implementations the runtime picked for the batch
bucket a unit ran in (``graph_picks``) reach its row."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import layerfold.evaluation.benchmark as B
from tests.support.models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model():
    return tiny_model(d_model=32, n_layers=2, heads=4, kv_heads=2, ffn=64, vocab=97, max_position=128)


@pytest.mark.parametrize("value,exc,match", [
    (1, ValueError, "warmup_tokens=1 must be >= 2"),
    (0, ValueError, "warmup_tokens=0 must be >= 2"),
    (2.5, TypeError, "warmup_tokens=2.5 must be a whole number"),
    (True, TypeError, "warmup_tokens=True must be a whole number"),
    ("16", TypeError, "warmup_tokens='16' must be a whole number"),
    (21, ValueError, "warmup_tokens=21 exceeds new_tokens=20"),
])
def test_warmup_tokens_checked_before_anything_runs(model, monkeypatch: pytest.MonkeyPatch, value: Any,
                                                    exc: type[Exception], match: str) -> None:
    monkeypatch.setattr(B, "_sources", lambda *a, **k: pytest.fail("a model was read before the arguments' check"))
    with pytest.raises(exc, match=match):
        B.bench_models([model], new_tokens=20, prompt_len=4, repeats=1, dtype=torch.float32, compile=False,
                       schedule="sequential", warmup_tokens=value)


class _Peak:
    """Peak stand-in: a block's peak is 1000 bytes per token of the run inside it (0 without a run)."""

    calls: list[int]

    def __init__(self, device: Any) -> None:
        self.peak = 0

    def __enter__(self) -> _Peak:
        self.n = len(_Peak.calls)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.peak = 1000 * _Peak.calls[-1] if len(_Peak.calls) > self.n else 0


class _WithPicks:
    """A runtime that reports what its graphs picked per batch bucket (the attribute the real Runtime may lack)."""

    def __init__(self, rt: Any, picks: dict[int, dict[str, int]]) -> None:
        self._rt, self.graph_picks = rt, picks

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rt, name)


def _recording(monkeypatch: pytest.MonkeyPatch, picks: dict[int, dict[str, int]] | None = None) -> list[int]:
    calls: list[int] = []
    real = B.run_layerfold

    def run(rt: Any, prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
        calls.append(new_tokens)
        return real(rt, prompts, new_tokens)

    monkeypatch.setattr(B, "run_layerfold", run)
    _Peak.calls = calls
    monkeypatch.setattr(B, "Peak", _Peak)
    if picks is not None:
        engine = B._engine
        monkeypatch.setattr(B, "_engine", lambda *a, **k: (lambda o: (_WithPicks(o[0], picks), o[1]))(engine(*a, **k)))
    return calls


@pytest.mark.parametrize("warmup,first", [(None, 16), (3, 3), (20, 20)])
def test_sequential_warmup_is_short(model, monkeypatch: pytest.MonkeyPatch, warmup: int | None, first: int) -> None:
    calls = _recording(monkeypatch)
    res = B.bench_models([model], batch_sizes=[1, 2], new_tokens=20, prompt_len=4, repeats=2, dtype=torch.float32,
                         compile=False, schedule="sequential", warmup_tokens=warmup)
    assert calls == [first, 20, 20] * 2  # per unit: the warm-up, then the timed runs with every token
    for r in res["rows"]:
        assert len(r["decode_runs"]) == 2 and r["decode_tok_s"] > 0
        # the peak is the largest of all runs: the timed ones (20 tokens), not just the shorter warm-up
        assert r["peak_mem_bytes"] == 1000 * max(first, 20)
        assert "picks" not in r  # this runtime reports none
        # where a part's time goes: the unit's warm-up, within its wall clock (warm-up, timed runs, between)
        assert 0 < r["warmup_s"] < r["wall_s"]
    assert res["setup_s"]["probe " + res["rows"][0]["model"]] > 0  # the model's bandwidth probe


def test_interleaved_warmup_generates_every_token(model, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _recording(monkeypatch)
    B.bench_models([model], batch_sizes=[1], new_tokens=20, prompt_len=4, repeats=1, dtype=torch.float32,
                   compile=False, schedule="interleaved", warmup_tokens=3)
    assert calls == [20, 20]


def test_rows_carry_the_picks_of_their_bucket(model, monkeypatch: pytest.MonkeyPatch) -> None:
    picks = {1: {"cublas": 8, "attn:kernel-1split": 2}, 2: {"triton_o16_k256_w4_s3": 8, "attn:dot": 2},
             3: {"cublas": 8, "attn:dot": 2}, 4: {"wrong bucket": 1}}
    _recording(monkeypatch, picks)
    res = B.bench_models([model], engines=["layerfold", "torch-eager"], batch_sizes=[1, 2, 3], new_tokens=4,
                         prompt_len=4, repeats=1, dtype=torch.float32, compile=False, schedule="sequential")
    got = {(r["engine"], r["batch"]): r.get("picks") for r in res["rows"]}
    # batch 3 runs in bucket 3, not 4: buckets stop at the runtime's max_batch (Runtime's _GraphCache.bucket)
    assert got == {("layerfold", 1): picks[1], ("layerfold", 2): picks[2], ("layerfold", 3): picks[3],
                   ("torch-eager", 1): None, ("torch-eager", 2): None, ("torch-eager", 3): None}
