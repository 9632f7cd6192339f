"""A prune job leaves nothing of its dense model alive once it returns.

On an H200 the GPU suite runs ShortGPT, Streamline and dynamic slicing one after another in one process
(bench/suite_pipeline.py, resetting the peak between jobs). Streamline's ``shared_pairs`` cache (a module-level
list) kept its PairStream, and through it the Streamline job's dense model (13.8 GB of bf16 weights on the
device), until the next Streamline call: the slicing job that followed started with that model still
allocated and peaked at 39.9 GB, 13 GB over its own dense + sliced + one layer's work. A live-bytes count
inside one job cannot see it (the tensors were made before it starts); these tests hold a weak reference to
each model the job loads and check that it is gone, on the CPU, where the same reference keeps host memory.
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch

import layerfold
from layerfold.core.checkpoint import save_checkpoint
from layerfold.methods import streamline as S
from tests.support.models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

L, V = 6, 61


@pytest.fixture()
def job(tmp_path, monkeypatch):
    """(run(method, target, **kw) -> report, weak references to the models the jobs loaded)."""
    from layerfold import pipeline as P
    from layerfold.core import data

    m = tiny_model(d_model=48, n_layers=L, heads=4, kv_heads=2, ffn=72, vocab=V, tie=True, arch="llama",
                   std=0.08)
    src = save_checkpoint(tmp_path / "dense", m.spec, m.state_dict())
    del m
    calib = torch.randint(0, V, (6, 24), generator=torch.Generator().manual_seed(1))
    loaded: list[weakref.ref] = []

    def load(*a, **k):
        model = layerfold.load(src, tokenizer=False)[0]
        loaded.append(weakref.ref(model))
        return model, None

    monkeypatch.setattr(P, "load", load)
    monkeypatch.setattr(data, "calib_batches", lambda *a, **k: calib)

    def run(method: str, target: str, **kw):
        return P.prune(src, method, target, tmp_path / f"out-{method}-{len(loaded)}", eval=False, progress=False,
                       **kw)

    return run, loaded


def test_streamline_job_does_not_keep_its_dense_model(job) -> None:
    run, loaded = job
    rep = run("streamline", "2", options={"epochs": 1})
    assert rep["removed_layers"] == 1  # a window of 2 replaced by one trained block
    gc.collect()
    assert len(loaded) == 1
    assert loaded[0]() is None, "the dense model of a finished streamline job is still alive"
    assert not any(p._dir is not None and Path(p._dir).exists() for p in S._PAIRS)  # its pair files went too


def test_jobs_in_a_row_hold_one_dense_model_at_a_time(job, monkeypatch) -> None:
    """The suite's order: when the slicing job loads its model, the streamline job's is already gone."""
    from layerfold import pipeline as P

    run, loaded = job
    run("streamline", "2", options={"epochs": 1})
    alive_at_load: list[int] = []
    inner = P.load

    def counting_load(*a, **k):
        gc.collect()
        alive_at_load.append(sum(r() is not None for r in loaded))
        return inner(*a, **k)

    monkeypatch.setattr(P, "load", counting_load)
    rep = run("dynamic-slicing", "0.25")
    assert rep["method"] == "dynamic-slicing" and alive_at_load == [0]


def test_shared_pairs_reused_while_the_model_lives_released_after() -> None:
    """The cache still serves several replacements of one window of one model (one set of dense pairs)."""
    m = tiny_model(d_model=32, n_layers=4, heads=4, kv_heads=2, ffn=48, vocab=V, std=0.08).requires_grad_(False)
    ids = torch.randint(0, V, (4, 8), generator=torch.Generator().manual_seed(2))
    p = S.shared_pairs(m, ids, 1, 2, 2)
    assert S.shared_pairs(m, ids, 1, 2, 2) is p
    first = [(x.clone(), y.clone()) for x, y in p.epoch()]  # computed, and spilled to disk
    assert p._dir is not None and p._dir.exists() and p._filled == ids.shape[0]
    again = list(p.epoch())  # read back from the files, the same pairs
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    folder = p._dir
    ref = weakref.ref(m)
    del m
    gc.collect()
    assert ref() is None and p not in S._PAIRS and not folder.exists()
    with pytest.raises(RuntimeError, match="dense model is gone"):
        next(p.epoch())


@pytest.mark.parametrize("method", ["slm", "laco"])
def test_merge_search_job_does_not_keep_its_dense_model(job, method: str) -> None:
    """SLM's and LaCo's shared similarity (dense hidden states, merged blocks) kept the job's dense model alive
    the same way, until the next search of the process."""
    from layerfold.methods import merge_search as MS

    run, loaded = job
    rep = run(method, "2")
    assert rep["method"] == method and rep["removed_layers"] == 2
    gc.collect()
    assert len(loaded) == 1 and loaded[0]() is None, f"the dense model of a finished {method} job is still alive"
    assert MS._SHARED == []


def test_shared_similarity_reused_while_the_model_lives_released_after() -> None:
    from layerfold.methods import merge_search as MS

    m = tiny_model(d_model=32, n_layers=4, heads=4, kv_heads=2, ffn=48, vocab=V, std=0.08).requires_grad_(False)
    ids = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(3))
    sim = MS.shared_similarity(m, ids)
    assert MS.shared_similarity(m, ids) is sim
    merged = sim.scores([[0], [1, 2], [3]])
    assert sim.scores([[0], [1, 2], [3]]) is merged and sim.evaluations == 1 and sim.hidden
    ref = weakref.ref(m)
    del m
    gc.collect()
    assert ref() is None and sim not in MS._SHARED and sim.hidden == [] and sim.evaluations == 0
    with pytest.raises(RuntimeError, match="dense model is gone"):
        sim.scores([[0, 1], [2], [3]])
