"""Streaming calibration against a naive reference: full forward keeping every h_i, statistics in fp64."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from layerfold import save_checkpoint
from layerfold.calibration.calibrate import calibrate
from layerfold.calibration.stats import Stats
from tests.support.models import hetero_calib_spec, tiny_model
from tests.support.tolerances import assert_close

# uniform calibration model: 24 wide, GQA 4/2 heads of 6, FFN 40, vocab 50; norm gains U(0.5, 1.5)
DENSE = dict(d_model=24, heads=4, kv_heads=2, head_dim=6, ffn=40, vocab=50, rope_theta=100.0, norm_gains=True)


def token_batch(n: int = 6, T: int = 11, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 50, (n, T), generator=torch.Generator().manual_seed(seed))


def left_pad_mask(n: int, T: int) -> torch.Tensor:
    lens = [T - (s % 4) for s in range(n)]  # 0..3 padding tokens on the left
    return torch.tensor([[t >= T - lens[s] for t in range(T)] for s in range(n)])


# ---- the naive reference: everything kept, statistics computed directly in fp64 -----------------------
def _ucenter(k: torch.Tensor) -> torch.Tensor:
    m = k.shape[0]
    k = k.clone()
    k.fill_diagonal_(0)
    out = k - k.sum(0, keepdim=True) / (m - 2) - k.sum(1, keepdim=True) / (m - 2) + k.sum() / ((m - 1) * (m - 2))
    return out.fill_diagonal_(0)


@torch.no_grad()
def reference(model, ids, mask, window: int, cka_tokens: int, skip: int = 1, cka_skip: int = 0) -> dict:
    n, T = ids.shape
    valid = torch.ones(n, T, dtype=torch.bool) if mask is None else mask
    h, ropes, amask = model.prepare(ids, key_valid=mask)
    hs, taps_all = [h], []
    for i in range(model.spec.n_layers):
        taps: dict = {}
        h = model.run_layer(i, h, ropes, amask, taps=taps)
        hs.append(h)
        taps_all.append(taps)
    hs64 = [x.double() for x in hs]
    L = len(hs) - 1
    cos = torch.full((L, window), math.nan, dtype=torch.float64)
    for j in range(L):
        for k in range(1, window + 1):
            if j + k <= L and hs64[j].shape[-1] == hs64[j + k].shape[-1]:
                cos[j, k - 1] = F.cosine_similarity(hs64[j][valid], hs64[j + k][valid], dim=-1).mean()
    pos = valid.long().cumsum(1) - 1
    stat = valid & (pos >= skip)
    hsic = torch.zeros(L + 1, L + 1, dtype=torch.float64)
    for s in range(n):
        tok = (valid[s] & (pos[s] >= cka_skip)).nonzero().flatten()
        if tok.numel() > cka_tokens:
            tok = tok[torch.linspace(0, tok.numel() - 1, cka_tokens, dtype=torch.float64).floor().long()]
        m = tok.numel()
        ks = torch.stack([_ucenter(x[s, tok] @ x[s, tok].T) for x in hs64]).reshape(L + 1, -1)
        hsic += ks @ ks.T / (m * (m - 3))
    d = hsic.diagonal().sqrt()
    out = {"cos": cos, "cka": hsic / (d[:, None] * d[None, :]), "grams": {}, "chan": {}}
    for i, t in enumerate(taps_all):
        for key, x in ((f"attn_in.{i}", t["attn_in"]), (f"mlp_in.{i}", t["mlp_in"])):
            out["grams"][key] = x[stat].double().T @ x[stat].double()
        if "gate" in t:
            a = (F.silu(t["gate"].double()) * t["up"].double())[stat]
            out["chan"][f"ffn_abs.{i}"], out["chan"][f"ffn_sq.{i}"] = a.abs().sum(0), (a * a).sum(0)
        if "o_in" in t:
            o = t["o_in"][stat].double()
            out["chan"][f"o_abs.{i}"], out["chan"][f"o_sq.{i}"] = o.abs().sum(0), (o * o).sum(0)
    x = hs64[-1][stat]
    out["grams"]["final"] = x.T @ x
    out["n_stat"] = int(stat.sum())
    return out


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """NaN exactly where the reference has NaN (pairs of unequal width), the rest within TOL[dtype]."""
    assert_close(got, want, dtype, what, equal_nan=True)


def check_against_reference(st: Stats, ref: dict, ring: torch.dtype) -> None:
    """Statistics accumulated in fp32 against the fp64 reference; cos(h_i, h_i+k), k >= 2, is read from unit
    directions stored in the ring's dtype."""
    close(st.cos_window, ref["cos"], ring, "cos_window")
    close(st.bi, 1 - ref["cos"][:, 0], torch.float32, "bi")  # k = 1 never reads the ring
    close(st.cka, ref["cka"], torch.float32, "cka")
    assert st.counts["gram_tokens"] == ref["n_stat"] == st.counts["chan_tokens"]
    assert set(st.grams) == set(ref["grams"]) and set(st.chan) == set(ref["chan"])
    for k, v in ref["grams"].items():
        close(st.grams[k], v, torch.float32, f"gram {k}")
    for k, v in ref["chan"].items():
        close(st.chan[k], v, torch.float32, f"chan {k}")


# ---- tests ---------------------------------------------------------------------------------------------
# The kernels' own tests cover Triton vs reference in depth; here the Triton interpreter (slow) runs the
# engine end to end once per code path and the engine-logic tests use the torch references.
@pytest.fixture
def torch_ref(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture
def triton_interp():
    if os.environ.get("TRITON_INTERPRET") != "1":  # it must be set before triton is imported (conftest does)
        pytest.skip("needs TRITON_INTERPRET=1 from the start of the session")


@pytest.mark.parametrize("padded,backend", [(False, "triton_interp"), (True, "torch_ref")])
def test_matches_naive_reference(padded, backend, request):
    request.getfixturevalue(backend)
    model, ids = tiny_model(n_layers=5, **DENSE), token_batch()
    mask = left_pad_mask(*ids.shape) if padded else None
    ring = torch.float16 if padded else torch.float32  # the fp16 ring through the CPU dot-product path
    st = calibrate(model, ids, mask=mask, window=3, cka_tokens=8, grams=True, micro_batch=4, ring_dtype=ring)
    check_against_reference(st, reference(model, ids, mask, 3, 8), ring)
    assert st.n_tokens == (ids.numel() if mask is None else int(mask.sum()))
    assert st.cos_window[3:, 2].isnan().all() and st.cos_window[4, 1].isnan()  # i + k > L


def test_heterogeneous_widths_and_fp16_ring(triton_interp):
    model, ids = tiny_model(hetero_calib_spec(), norm_gains=True), token_batch(5, 9)
    st = calibrate(model, ids, window=4, cka_tokens=16, grams=True, micro_batch=2)  # fp16 ring (default)
    ref = reference(model, ids, None, 4, 16)
    check_against_reference(st, ref, torch.float16)
    assert st.cos_window[0, 0] == st.cos_window[0, 0] and st.cos_window[0, 1].isnan()  # 24 vs 20 wide
    assert "ffn_abs.3" not in st.chan and "o_abs.2" not in st.chan


# Tensor reads that make the host wait for a CUDA device (a sync inside the micro-batch loop stalls the
# launch queue); the layer loop must do none, whatever the statistics and masks.
_READS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
          torch.Tensor.__index__, torch.Tensor.tolist, torch.Tensor.nonzero, torch.nonzero, torch.Tensor.cpu,
          torch.Tensor.numpy, torch.Tensor.masked_select, torch.masked_select, torch.unique}


class _ReadBacks(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        hit = func in _READS
        if func is torch.Tensor.__getitem__:  # boolean-mask indexing has a data-dependent shape
            idx = args[1] if isinstance(args[1], tuple) else (args[1],)
            hit = any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in idx)
        if hit and not _from_triton():
            self.seen.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def _from_triton() -> bool:
    """The call comes from Triton's interpreter (older versions copy every argument with .cpu() at a launch: the
    stand-in for the GPU, not the loop's own code)."""
    f = sys._getframe(2)
    while f is not None and f"{os.sep}torch{os.sep}" in f.f_code.co_filename:
        f = f.f_back
    return f is not None and f"{os.sep}triton{os.sep}" in f.f_code.co_filename


def test_layer_loop_reads_nothing_back(triton_interp, monkeypatch):
    """The per-layer loop (every statistic, padding masks, per-layer widths) launches work only: no value
    goes back to the host until the end, so on a GPU it never waits inside the loop."""
    from layerfold.calibration import calibrate as cal

    seen: list[str] = []
    layer = cal._Run.layer

    def watched(self, i):
        with _ReadBacks() as mode:
            layer(self, i)
        seen.extend(mode.seen)

    monkeypatch.setattr(cal._Run, "layer", watched)
    model, ids = tiny_model(hetero_calib_spec(), norm_gains=True), token_batch(5, 9)
    mask = left_pad_mask(5, 9)
    st = calibrate(model, ids, mask=mask, window=4, cka_tokens=6, grams=True, micro_batch=2)
    assert st.counts["tokens"] == int(mask.sum()) and seen == []
    with _ReadBacks() as probe:  # the probe sees a read where there is one
        bool(torch.ones(1))
    assert probe.seen == ["__bool__"]


def test_padding_equals_unpadded(torch_ref):
    """Left-padded sequences (random pad ids) give the statistics of the same sequences unpadded."""
    model = tiny_model(n_layers=4, **DENSE)
    short = token_batch(4, 9)
    pad = torch.randint(0, 50, (4, 3), generator=torch.Generator().manual_seed(7))
    padded = torch.cat([pad, short], 1)
    mask = torch.cat([torch.zeros(4, 3, dtype=torch.bool), torch.ones(4, 9, dtype=torch.bool)], 1)
    kw = dict(window=2, cka_tokens=6, grams=True, ring_dtype=torch.float32)
    a, b = calibrate(model, short, **kw), calibrate(model, padded, mask=mask, micro_batch=3, **kw)
    close(b.cos_window, a.cos_window, torch.float32, "cos")
    close(b.cka, a.cka, torch.float32, "cka")
    for k in a.grams:
        close(b.grams[k], a.grams[k], torch.float32, k)
    for k in a.chan:
        close(b.chan[k], a.chan[k], torch.float32, k)
    assert a.counts == b.counts


def test_disk_equals_host_and_checkpoint_equals_model(tmp_path, torch_ref):
    model, ids = tiny_model(n_layers=4, **DENSE), token_batch(5, 10)
    kw = dict(window=3, cka_tokens=6, grams=True, micro_batch=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    host = calibrate(model, ids, **kw)
    disk = calibrate(model, ids, offload="disk", offload_dir=tmp_path, **kw)
    assert list(tmp_path.iterdir()) == [], "disk offload left files behind"
    ckpt = save_checkpoint(tmp_path / "ckpt", model.spec, model.state_dict())
    lazy = calibrate(ckpt, ids, **kw)
    for other in (disk, lazy):
        a, b = host.tensors(), other.tensors()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "calibrate changed the model"


def test_save_load_merge(tmp_path, torch_ref):
    model, ids = tiny_model(n_layers=3, **DENSE), token_batch(6, 8)
    kw = dict(window=2, cka_tokens=5, grams=True, micro_batch=2, ring_dtype=torch.float32)
    whole = calibrate(model, ids, **kw)
    whole.save(tmp_path / "st")
    back = Stats.load(tmp_path / "st")
    assert back.tensors().keys() == whole.tensors().keys() and back.counts == whole.counts
    assert all(torch.equal(v, back.tensors()[k]) for k, v in whole.tensors().items())
    assert json.loads((tmp_path / "st" / "stats.json").read_text())["meta"]["options"]["skip_positions"] == 1
    with pytest.raises(ValueError, match="already exists"):
        whole.save(tmp_path / "st")
    whole.save(tmp_path / "st", overwrite=True)
    (tmp_path / "empty").mkdir()
    whole.save(tmp_path / "empty")  # an empty directory is filled without --overwrite
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="not written by layerfold"):
        whole.save(tmp_path / "other", overwrite=True)
    assert (tmp_path / "other" / "x.txt").read_text() == "x"  # the user's folder is left as it was
    merged = calibrate(model, ids[:4], **kw).merge(calibrate(model, ids[4:], **kw))
    assert merged.counts == whole.counts
    for k, v in whole.tensors().items():
        close(merged.tensors()[k], v, torch.float32, k)
    close(merged.cka, whole.cka, torch.float32, "cka")
    with pytest.raises(ValueError, match="Fix"):
        whole.merge(calibrate(model, ids, window=1, cka_tokens=5))


def test_position_skip_for_cka_and_plots(tmp_path, torch_ref):
    model, ids = tiny_model(n_layers=3, **DENSE), token_batch(4, 9)
    st = calibrate(model, ids, window=2, cka_tokens=6, skip_in=("grams", "channels", "cka"))
    ref = reference(model, ids, None, 2, 6, cka_skip=1)
    close(st.cka, ref["cka"], torch.float32, "cka without position 0")
    assert st.counts["cka_tokens"] == 4 * 6 and st.meta["options"]["skip_in"] == ["channels", "cka", "grams"]
    from layerfold.calibration.plots import plot_all

    paths = plot_all(st, tmp_path, title="tiny")
    assert sorted(p.name for p in paths) == ["bi.png", "cka.png", "cos_window.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Fix"):
        Stats.load(tmp_path)
    (tmp_path / "stats.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt JSON"):
        Stats.load(tmp_path)
    (tmp_path / "stats.json").write_text(json.dumps({"format": "layerfold-stats", "version": 1, "n_layers": 2,
                                                      "window": 1}))
    (tmp_path / "stats.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        Stats.load(tmp_path)


def test_argument_errors(torch_ref):
    model, ids = tiny_model(n_layers=2, **DENSE), token_batch(2, 6)
    with pytest.raises(ValueError, match="token ids"):
        calibrate(model, ids + 100)
    with pytest.raises(ValueError, match="offload"):
        calibrate(model, ids, offload="tape")
    with pytest.raises(ValueError, match="mask"):
        calibrate(model, ids, mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="--window"):
        calibrate(model, ids, window=1, cka=False).window_scores(2)
