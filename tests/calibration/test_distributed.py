"""Calibration split over two processes (torch.distributed, gloo on loopback) equals one process."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from layerfold import save_checkpoint
from layerfold.calibration.calibrate import calibrate
from layerfold.calibration.stats import Stats
from tests.support.models import tiny_model
from tests.support.tolerances import assert_close

OPTS = dict(window=3, cka_tokens=6, cka_samples=5, grams=True, micro_batch=2, ring_dtype=torch.float32)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, ckpt: str, ids: torch.Tensor, mask: torch.Tensor, out: str) -> None:
    os.environ["TRITON_INTERPRET"] = "0"  # the torch references: the kernels have their own tests
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        st = calibrate(ckpt, ids, mask=mask, dist=True, **OPTS)
        st.save(Path(out) / f"rank{rank}")
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_single_process(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    m = tiny_model(d_model=16, n_layers=4, heads=2, kv_heads=1, ffn=24, vocab=40)  # after torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "ckpt", m.spec, m.state_dict())
    ids = torch.randint(0, 40, (7, 9))  # 7 samples: ranks get 4 and 3 (seeded by the builder)
    mask = torch.ones(7, 9, dtype=torch.bool)
    mask[1, :2] = mask[4, :3] = False  # left padding
    mp.spawn(_worker, args=(2, _free_port(), str(ckpt), ids, mask, str(tmp_path)), nprocs=2, join=True)
    single = calibrate(ckpt, ids, mask=mask, **OPTS)
    want = single.tensors()
    for rank in (0, 1):
        got = Stats.load(tmp_path / f"rank{rank}")
        assert got.counts == single.counts
        assert got.meta["world_size"] == 2 and got.meta["samples"] == 7
        assert got.tensors().keys() == want.keys()
        for k, v in want.items():
            assert_close(got.tensors()[k], v, torch.float32, k, check_dtype=True)
        assert_close(got.cka, single.cka, torch.float32, "cka", check_dtype=True)
        assert_close(got.cos_window, single.cos_window, torch.float32, "cos_window", equal_nan=True, check_dtype=True)
