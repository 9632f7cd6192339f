"""Native CPU decode step for 1-4 rows (kernels/cpu_decode.cpp): a whole decode step in one OpenMP region.

On CPU, a compiled torch decode step of a small model spends a fifth of its time outside its matrix
products: one parallel region (fork, join) per kernel, hundreds a step, with the second thread idle while
the first runs the wrapper code in between, and fixed halves of every matrix per thread, so the
faster thread waits at each join for the slower one. The native step runs all layers inside one
parallel region: each GEMV hands out blocks of 48 rows dynamically, the small ops (RMSNorm, rotary,
attention, SwiGLU) run between barriers of the same team, and weights are packed so that every block
is one sequential stream. It covers every ModelSpec the runtime does (per-layer widths, replacement
blocks, shortcut matrices, GQA, sliding windows, q/k norms, qkv bias) in bf16 on x86 CPUs with
AVX-512 BF16; elsewhere the runtime keeps its torch path.

The C++ source is compiled once per machine with the system's g++ (once, cached) into
``$LAYERFOLD_CACHE/native/`` (default ``~/.cache/layerfold/native/``), keyed by a hash of the source,
flags and compiler, and loaded with ctypes.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from layerfold import kernels
from layerfold.core.loading import cache_dir

__all__ = ["NativeDecode", "native_unavailable"]

SOURCE = Path(kernels.__file__).resolve().parent / "cpu_decode.cpp"  # ships inside the package (package-data)
FLAGS = ["-O3", "-std=c++17", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma",
         "-fopenmp", "-fPIC", "-shared", "-w"]
_R = 48  # rows per block (see the C++ file)


# ---- the C structures (field for field as in kernels/cpu_decode.cpp) -----------------------------------
class _Mat(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("n", ctypes.c_int32), ("k", ctypes.c_int32)]


class _Layer(ctypes.Structure):
    _fields_ = [("has_attn", ctypes.c_int32), ("has_mlp", ctypes.c_int32), ("d_in", ctypes.c_int32),
                ("d_mid", ctypes.c_int32), ("d_out", ctypes.c_int32),
                ("attn_norm", ctypes.c_void_p), ("wqkv", _Mat), ("bqkv", ctypes.c_void_p),
                ("q_norm", ctypes.c_void_p), ("k_norm", ctypes.c_void_p),
                ("n_heads", ctypes.c_int32), ("n_kv", ctypes.c_int32), ("hd", ctypes.c_int32),
                ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p),
                ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p),
                ("wo", _Mat), ("fused_attn_sc", ctypes.c_int32), ("attn_sc", _Mat),
                ("mlp_norm", ctypes.c_void_p), ("wgu", _Mat), ("wd", _Mat), ("fused_mlp_sc", ctypes.c_int32),
                ("mlp_sc", _Mat)]


class _Model(ctypes.Structure):
    _fields_ = [("n_layers", ctypes.c_int32), ("vocab", ctypes.c_int32), ("d_embed", ctypes.c_int32),
                ("d_final", ctypes.c_int32), ("max_len", ctypes.c_int32), ("window", ctypes.c_int32),
                ("eps", ctypes.c_float), ("layers", ctypes.POINTER(_Layer)), ("embed", ctypes.c_void_p),
                ("final_norm", ctypes.c_void_p), ("head", _Mat), ("max_rows", ctypes.c_int32),
                ("h0", ctypes.c_void_p), ("h1", ctypes.c_void_p), ("hs", ctypes.c_int32),
                ("xn", ctypes.c_void_p), ("xs", ctypes.c_int32), ("qkv", ctypes.c_void_p), ("qs", ctypes.c_int32),
                ("y", ctypes.c_void_p), ("ys", ctypes.c_int32), ("act", ctypes.c_void_p), ("as_", ctypes.c_int32),
                ("scores", ctypes.c_void_p)]


# ---- availability and build ------------------------------------------------------------------------
def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded library, "") or (None, why not)."""
    if os.environ.get("LAYERFOLD_NATIVE", "1") == "0":
        return None, "LAYERFOLD_NATIVE=0 turns it off"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None, f"it is built for x86-64 Linux (this is {platform.system()} {platform.machine()})"
    missing = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "fma"} - _cpu_flags()
    if missing:
        return None, f"this CPU lacks {', '.join(sorted(missing))}"
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return None, "no C++ compiler (g++) on PATH. Fix: install g++ (build-essential)"
    src = SOURCE.read_bytes()
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"{cxx} --version failed ({e})"
    key = hashlib.sha256(src + " ".join(FLAGS).encode() + version.encode()).hexdigest()[:16]
    out = cache_dir() / "native" / f"cpu_decode-{key}.so"
    if not out.is_file():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
                part = Path(tmp) / out.name
                r = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", str(part)], capture_output=True, text=True,
                                   timeout=300)
                if r.returncode != 0:
                    return None, f"compiling {SOURCE.name} failed: {r.stderr.strip()[-400:]}"
                os.replace(part, out)  # atomic: a concurrent build or a crash never leaves half a library
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"building {out} failed ({e}). Fix: point LAYERFOLD_CACHE at a writable directory"
    try:
        lib = ctypes.CDLL(str(out))
    except OSError as e:
        return None, f"loading {out} failed ({e}). Fix: delete it to rebuild"
    lib.lf_cpu_decode.restype = ctypes.c_int
    lib.lf_cpu_decode.argtypes = [ctypes.POINTER(_Model), ctypes.POINTER(ctypes.c_int64),
                                  ctypes.POINTER(ctypes.c_int32), ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32]
    return lib, ""


def native_unavailable(net: Any, device: torch.device, dtype: torch.dtype) -> str:
    """"" when the native step can run ``net`` (a DecodeNet) on ``device`` in ``dtype``, else why not."""
    if device.type != "cpu":
        return f"it runs on CPU (the runtime is on {device.type})"
    if dtype != torch.bfloat16:
        return f"it computes in bf16 (the runtime is {str(dtype).replace('torch.', '')})"
    big = [l.hd for l in net.layers if l.wqkv is not None and l.hd > 512]
    if big:
        return f"head_dim {big[0]} is over 512"
    return _library()[1]


# ---- packing ---------------------------------------------------------------------------------------
def _pad(n: int, m: int) -> int:
    return -(-n // m) * m


def pack(w: Tensor) -> Tensor:
    """(N, K) -> bf16 blocks [N/48][K][48], the last one padded with zero rows (see the C++ file)."""
    n, k = w.shape
    p = torch.zeros(_pad(n, _R), k, dtype=torch.bfloat16)
    p[:n] = w
    return p.view(-1, _R, k).transpose(1, 2).contiguous()


class NativeDecode:
    """The native step of ``model`` over ``net``'s caches, rotary tables and norms (``net``: the
    runtime's DecodeNet), with every matrix packed anew from the model's weights (one more copy of
    them, in bf16). Call it with the tokens and cache slots of rows 0..n-1, n <= ``max_rows`` (at most
    4: each weight is loaded once for all rows)."""

    MAX_ROWS = 4

    def __init__(self, model: Any, net: Any, max_rows: int = 1):
        from layerfold.inference.decode_net import fused_weights

        lib, why = _library()
        if lib is None:
            raise RuntimeError(f"the native CPU decode step is unavailable: {why}")
        self.lib = lib
        self._keep: list[Tensor] = []  # everything the C side points to
        spec, max_len = model.spec, net.max_len
        layers = (_Layer * len(net.layers))()
        widest = net.embed.shape[1]
        with torch.no_grad():
            for c, l, blk in zip(layers, net.layers, model.layers, strict=True):
                self._layer(c, l, fused_weights(blk), net)
                widest = max(widest, *(m.k for m in (c.wqkv, c.wo, c.attn_sc, c.wgu, c.wd, c.mlp_sc)),
                             c.d_in, c.d_mid, c.d_out)
            head = self._mat(model.head_weight())
        q_dim = max((l.n_heads * l.hd for l in net.layers if l.wqkv is not None), default=0)
        ffn = max((c.wgu.n for c in layers), default=0)
        nthreads = max(os.cpu_count() or 1, torch.get_num_threads())
        rows = max(1, min(int(max_rows), self.MAX_ROWS))
        m = _Model(n_layers=len(layers), vocab=spec.vocab_size, d_embed=net.embed.shape[1], d_final=head.k,
                   max_len=max_len, window=spec.sliding_window or 0, eps=spec.norm_eps, layers=layers,
                   embed=self._ptr(net.embed), final_norm=self._ptr(net.final_norm), head=head)
        widest = max(widest, head.k)
        m.max_rows = rows
        m.hs = m.xs = widest
        m.qs = max((c.wqkv.n for c in layers), default=1)
        m.ys, m.as_ = widest + q_dim, widest + ffn
        m.h0, m.h1 = self._buf(rows * m.hs), self._buf(rows * m.hs)
        m.xn = self._buf(nthreads * rows * m.xs, torch.float32)
        m.qkv = self._buf(rows * m.qs)
        m.y = self._buf(rows * m.ys, torch.float32)
        m.act = self._buf(rows * m.as_, torch.float32)
        m.scores = self._buf(nthreads * max_len, torch.float32)
        self.max_threads, self.vocab, self.max_len, self.max_rows = nthreads, spec.vocab_size, max_len, rows
        self.layers, self.model = layers, m

    def _ptr(self, t: Tensor | None) -> int | None:
        if t is None:
            return None
        assert t.is_contiguous() and t.device.type == "cpu", "native step needs contiguous CPU tensors"
        self._keep.append(t)
        return t.data_ptr()

    def _buf(self, n: int, dtype: torch.dtype = torch.bfloat16) -> int | None:
        return self._ptr(torch.zeros(n, dtype=dtype))

    def _mat(self, w: Tensor | None, pair: Tensor | None = None) -> _Mat:
        if w is None:
            return _Mat()
        n, k = w.shape
        p = pack(w) if pair is None else torch.stack([pack(w), pack(pair)], 1).contiguous()
        return _Mat(w=self._ptr(p), n=n, k=k)

    def _layer(self, c: _Layer, l: Any, w: dict[str, Tensor | None], net: Any) -> None:
        c.has_attn, c.has_mlp = int(l.wqkv is not None), int(l.wgu is not None)
        c.attn_sc, c.mlp_sc = self._mat(w["attn_sc"]), self._mat(w["mlp_sc"])
        if c.has_attn:
            c.wqkv, c.wo = self._mat(w["wqkv"]), self._mat(w["wo"])
            c.d_in, c.d_mid = c.wqkv.k, c.wo.n
            c.attn_norm, c.bqkv = self._ptr(l.attn_norm), self._ptr(l.bqkv)
            c.q_norm, c.k_norm = self._ptr(l.q_norm), self._ptr(l.k_norm)
            c.n_heads, c.n_kv, c.hd = l.n_heads, l.n_kv, l.hd
            c.k_cache, c.v_cache = self._ptr(l.k[0]), self._ptr(l.v[0])
            c.cos, c.sin = self._ptr(getattr(net, f"cos{l.hd}")), self._ptr(getattr(net, f"sin{l.hd}"))
            c.fused_attn_sc = int(l.fused_attn_sc)
        elif c.attn_sc.w:
            c.d_in, c.d_mid = c.attn_sc.k, c.attn_sc.n
        if c.has_mlp:
            f = w["wgu"].shape[0] // 2  # type: ignore[union-attr]
            c.wgu = self._mat(w["wgu"][:f], w["wgu"][f:])  # type: ignore[index]
            c.wd = self._mat(w["wd"])
            c.mlp_norm, c.fused_mlp_sc = self._ptr(l.mlp_norm), int(l.fused_mlp_sc)
            c.d_mid, c.d_out = c.wgu.k, c.wd.n
        elif c.mlp_sc.w:
            c.d_mid, c.d_out = c.mlp_sc.k, c.mlp_sc.n
        else:
            c.d_out = c.d_mid
        if not c.has_attn and not c.attn_sc.w:
            c.d_in = c.d_mid

    def __call__(self, tokens: Sequence[int], pos: Sequence[int]) -> Tensor:
        """Logits (n, V) fp32: row b reads tokens[b] and writes it at slot pos[b] of cache row b."""
        n = len(tokens)
        out = torch.empty(n, self.vocab, dtype=torch.float32)
        nt = min(torch.get_num_threads(), self.max_threads)
        toks = (ctypes.c_int64 * n)(*tokens)
        slots = (ctypes.c_int32 * n)(*pos)
        if len(pos) != n or self.lib.lf_cpu_decode(ctypes.byref(self.model), toks, slots, n, out.data_ptr(), nt):
            raise ValueError(f"native step: {n} rows (at most {self.max_rows}), tokens {list(tokens)} (vocabulary "
                             f"{self.vocab}) or cache slots {list(pos)} ({self.max_len}) out of range. Fix: pass "
                             "token ids of the model, slots below max_len and at most max_rows rows")
        return out
