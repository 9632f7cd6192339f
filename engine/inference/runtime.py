"""Lean inference runtime for any ModelSpec: prefill and one-token decode steps for a batch of
independent sequences ("rows") over a static per-layer KV cache.

``Runtime(model)`` builds, once, the fused copies the decode loop wants (q|k|v and gate|up in one
matrix each; on CPU pre-packed for oneDNN), rotary tables for every cache slot, and a KV cache of
(max_batch, n_kv, max_len, hd) per attention layer, sized by that layer's own KV heads (see
``layerfold.inference.decode_net``). Every row has its own length: prefill writes a row's prompt from slot 0
(prompts of different lengths are right-padded; the padding lies beyond the row's length and is never
attended), and each decode step writes one token per row at that row's length. Rows start, advance
and finish independently, which is what the server's continuous batching needs.

Hot path: nothing grows with the sequence (no torch.cat onto a cache, no repeat_interleave for
grouped-query attention), rotary tables are looked up. On CUDA the Triton kernels (kernels/) do
RMSNorm, rotary, SwiGLU and attention, the step has static shapes (lengths live in a tensor) and is
replayed as a CUDA graph: no allocation at all. On CPU the kernels' torch references run over
oneDNN-packed weights, or the whole step is compiled (``compile=True``: torch.compile with inductor
freezing, which fuses the small ops and packs the weights itself). Steps of up to 4 rows in bf16 on
x86 CPUs with AVX-512 BF16 run on the native step of ``layerfold.inference.native`` instead (one OpenMP region a
step).

longrope (Phi-3-*-128k, Phi-3.5): every step's logits are those of transformers' forward over the row's whole
sequence, as Phi3ForCausalLM.generate gives them: a prompt reads the short or long factors by its length, a decode
step at slot p those of p + 1, and the step that takes a row past the original context (its token at slot
original_max) re-prefills the row's tokens, so that its cached keys, rotated with the short factors, are rotated
again with the long ones (transformers drops its cache there and recomputes). For that the Runtime keeps each
row's tokens (``_tokens``; only for longrope).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import Tensor

from layerfold.core.devices import check_kv_fits
from layerfold.core.model import Model, require_model
from layerfold.inference.decode_net import BACKENDS, DecodeNet, can_pack, decode_weight_bytes
from layerfold.inference.native import NativeDecode, native_unavailable

__all__ = ["Runtime", "decode_weight_bytes"]


class Runtime:
    """Prefill/decode engine over the weights of ``model`` (see the module docstring).

    max_batch: rows (concurrent sequences) the cache holds. max_len: cache slots per row (prompt +
    new tokens); default min(spec.max_position, 2048). dtype/device: default the model's.
    kernels: "torch" | "triton"; default Triton on CUDA (the fused step, inference/fused_step.py), torch
    elsewhere. cuda_graphs: replay the decode step as a CUDA graph per batch bucket (Triton path; default
    on CUDA). compile: torch.compile the decode step with inductor freezing (compiles at construction, time
    in ``compile_s``; on CPU much faster decoding than eager, bench/bench_decode.py --compile). autotune: with compile
    on CPU, let inductor pick per matrix between its C++ GEMM template and oneDNN for the batch-1 step
    (default on; off compiles faster). static_batches: with compile, batch sizes (2..max_batch) that
    get a graph of their own, autotuned like batch 1 (more compiling each; on CPU its own graph beat the
    shared one at batch 4, bench/bench_decode.py --batch 4 --static, docs/PERFORMANCE.md);
    a call with n rows runs the smallest such graph with room for n when that adds at most n // 2 + 1
    idle rows, else the shared graph. pack_weights: oneDNN-packed weights for the
    eager CPU path (default when available). native: run decode steps of up to 4 rows (at most
    max_batch) on the native CPU step of ``layerfold.inference.native`` (bf16 on x86 CPUs with AVX-512 BF16;
    faster than the compiled torch step at batch 1 and 4 with no compiling, bench/bench_decode.py; it keeps
    its own packed copy of the weights); default: wherever it can run (``native_why`` says why not), True:
    required, False: off. With it, compile builds graphs only for the sizes above its rows.
    """

    def __init__(self, model: Model, *, max_batch: int = 1, max_len: int | None = None,
                 dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                 kernels: str | None = None, cuda_graphs: bool | None = None, compile: bool = False,
                 pack_weights: bool | None = None, autotune: bool = True, static_batches: Sequence[int] = (),
                 native: bool | None = None):
        require_model(model)
        spec = model.spec
        self.spec = spec
        self.device = torch.device(device) if device is not None else model.device
        self.dtype = dtype or model.dtype
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (max_batch, max_len or 2)):
            raise TypeError(f"max_batch={max_batch!r}, max_len={max_len!r}: whole numbers of rows and slots. Fix: pass "
                            "ints")
        self.max_batch = max_batch
        self.max_len = max_len or min(spec.max_position, 2048)
        if self.max_batch < 1 or self.max_len < 2:
            raise ValueError(f"max_batch={max_batch}, max_len={max_len}: the cache needs at least one row of two "
                             "slots. Fix: pass max_batch >= 1 and max_len >= 2")
        check_kv_fits(spec, self.max_batch, self.max_len, self.dtype, self.device,
                      "generate for fewer prompts at a time, or ask for fewer tokens (a shorter prompt + new tokens)")
        self.backend = kernels or ("triton" if self.device.type == "cuda" else "torch")
        if self.backend not in BACKENDS:
            raise ValueError(f"kernels={kernels!r} is unknown. Fix: use one of {sorted(BACKENDS)}")
        if compile and self.backend != "torch":
            raise ValueError("compile=True compiles the torch path. Fix: use kernels='torch' with compile, or rely "
                             "on CUDA graphs on the Triton path")
        # oneDNN-packed weights serve the eager torch path on CPU; the Triton kernels read plain ones
        self.packed = (not compile) and self.backend == "torch" and (
            can_pack(self.device, self.dtype) if pack_weights is None else pack_weights)
        self.net = DecodeNet(model, max_batch=self.max_batch, max_len=self.max_len, device=self.device,
                             dtype=self.dtype, backend=self.backend, packed=self.packed, compiled=compile)
        self.lengths: list[int] = [0] * self.max_batch
        # longrope: each row's tokens, for the re-prefill at the original context (module docstring)
        self._tokens: list[list[int]] | None = [[] for _ in range(max_batch)] if self.net.longrope is not None \
            else None
        off = "native=False"
        self.native_why = off if native is False else native_unavailable(self.net, self.device, self.dtype)
        if native and self.native_why:
            raise ValueError(f"native=True, but the native CPU decode step cannot run here: {self.native_why}. Fix: "
                             "drop native=True (the torch path runs instead)")
        self.native = NativeDecode(model, self.net, max_rows=self.max_batch) if not self.native_why else None
        graphable = self.device.type == "cuda" and self.backend == "triton"
        use_graphs = graphable if cuda_graphs is None else cuda_graphs
        if use_graphs and not graphable:
            raise ValueError("CUDA graphs need the Triton path on a CUDA device (its attention reads lengths from "
                             "a tensor, so every step has the same shapes). Fix: drop cuda_graphs or use "
                             "kernels='triton'")
        self._graphs = _GraphCache(self) if use_graphs else None
        self.static_batches = sorted({int(b) for b in static_batches})
        if self.static_batches and (not compile or not 2 <= self.static_batches[0] <= self.static_batches[-1]
                                    <= self.max_batch):
            raise ValueError(f"static_batches={list(static_batches)} need compile=True and sizes in 2..max_batch="
                             f"{self.max_batch}. Fix: compile, and drop the sizes outside that range")
        self.compile_s = 0.0
        self._warm = False
        self._step = self.net
        if compile:  # freezing: weights become constants that inductor pre-packs; caches stay inputs
            compiled = torch.compile(self.net, dynamic=True)

            plain: dict[str, object] = {"freezing": True}
            if self.device.type == "cpu":
                # the graph's kernel calls from generated C++ instead of Python: faster at batch 1 in paired
                # A/Bs (docs/PERFORMANCE.md, C++ wrapper)
                plain["cpp_wrapper"] = True
            tuned = dict(plain)
            if self.device.type == "cpu" and autotune:
                # batch 1 (its own graph: torch specialises sizes 0/1) lets inductor pick per matrix between
                # its C++ GEMM template (AVX-512 micro-kernels over frozen weights) and oneDNN: the bf16
                # batch-1 step got much faster for more compile time (bench/bench_decode.py --compile,
                # docs/PERFORMANCE.md). The batch >= 2 graph has a symbolic batch size, for
                # which the template was slower than oneDNN at batch 16: it keeps oneDNN
                tuned.update(max_autotune=True, max_autotune_gemm_backends="CPP,ATEN")

            def step(tok: Tensor, pos: Tensor, L: int | None) -> Tensor:
                # inductor reads the flags whenever a graph is (re)compiled; passing them through
                # torch.compile(options=...) did not freeze anything with torch 2.13
                n = tok.shape[0]
                if n in self.static_batches:  # a graph for this size alone (not the shared symbolic one)
                    torch._dynamo.mark_static(tok, 0)
                    torch._dynamo.mark_static(pos, 0)
                with torch._inductor.config.patch(**(tuned if n == 1 or n in self.static_batches else plain)):
                    if not self._warm:
                        return compiled(tok, pos, L)
                    # once both graphs exist, dynamo checks only the guards that tell its cached graphs
                    # apart (batch of one or more, which runtime): the full check of every buffer cost a
                    # measurable share of a small model's step (docs/PERFORMANCE.md). The inputs are ours (same
                    # dtypes, devices and ranks every step), so the skipped guards cannot fail
                    try:
                        with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                            return compiled(tok, pos, L)
                    except RuntimeError as e:  # a case the warm-up did not cover: compile it the normal way
                        if "Recompilation" not in str(e):
                            raise
                        return compiled(tok, pos, L)

            self._step = step  # type: ignore[assignment]
            self._warm_up()

    def _warm_up(self) -> None:
        """Compile now (batch 1, the static batches and the shared graph for the other sizes, where decode
        uses it and the native step does not cover them) so that no request pays for it; time it."""
        t = time.perf_counter()
        lo = 1 if self.native is None else self.native.max_rows + 1  # the native step covers 1..max_rows rows
        sizes = {n for n in (1, *self.static_batches) if n >= lo}
        shared = [n for n in range(max(2, lo), self.max_batch + 1) if self._graph_batch(n) not in sizes]
        sizes.update(shared[:1])
        lengths = [1, 2]
        w = self.spec.sliding_window
        if w is not None and w + 1 < self.max_len:  # the masked (beyond the window) graph too
            lengths += [w, w + 1]
        for n in sorted(sizes):
            for length in lengths:
                self.lengths[:n] = [length] * n
                self.decode([0] * n)
        self.reset()
        self._warm = True
        self.compile_s = time.perf_counter() - t

    def _graph_batch(self, n: int) -> int:
        """Rows a decode of n rows runs: the smallest static batch with room for n, if that adds at most
        n // 2 + 1 idle rows (a few idle rows cost little at small batches, where a step mostly reads
        weights; many would cost a shared graph's saving), else n."""
        b = next((b for b in self.static_batches if b >= n), None)
        return b if b is not None and b - n <= n // 2 + 1 else n

    @property
    def graph_picks(self) -> dict[int, dict[str, int]]:
        """Per CUDA-graph batch bucket built so far: implementation name -> how many weights (GEMV:
        "cublas" or "triton") and attention layers ("attn:<form>") it serves; empty without graphs."""
        return {b: dict(p) for b, p in self._graphs.picks.items()} if self._graphs is not None else {}

    @property
    def graph_timings(self) -> dict[int, dict[str, dict[str, float | None]]]:
        """Per bucket built so far: what the picks timed ("gemv OxK", "down", "norm", "attn ...") -> candidate
        -> milliseconds on the card (None: it did not run or failed its check); empty without graphs."""
        fused = self.net.fused
        return {b: fused.timings.get(b, {}) for b in self._graphs.picks} if self._graphs is not None else {}

    def warm_up_graphs(self) -> None:
        """Build every batch bucket's CUDA graph now (GEMV pick, Triton compiles, capture) and compile the
        prefill kernels, so that no request pays for them; a no-op without CUDA graphs."""
        if self._graphs is None:
            return
        self.prefill([[0]])
        for b in GRAPH_BUCKETS:
            if b <= self.max_batch and b not in self._graphs.graphs:
                self._graphs.graphs[b] = self._graphs._capture(b)
        self.reset()

    # ---- bookkeeping ---------------------------------------------------------------------------
    def reset(self, rows: Sequence[int] | None = None, *, scrub: bool = False) -> None:
        """Mark rows (default all) empty; their cache slots are overwritten by the next prefill.

        scrub: also zero the rows' cache slots. For a row whose sequence failed: its slots may hold NaN or
        Inf, and the torch decode paths attend over the batch's longest row with a mask, where a masked
        weight of 0 times a stale NaN is NaN, so a later, shorter sequence in that row would fail too (the
        Triton and native steps read only a row's valid slots). Costs one write of the rows' caches.
        """
        rows = range(self.max_batch) if rows is None else [int(r) for r in rows]
        if any(not 0 <= r < self.max_batch for r in rows):
            raise ValueError(f"reset(rows={list(rows)}): rows are 0..{self.max_batch - 1}. Fix: pass rows of this "
                             "Runtime (or none, for all)")
        for r in rows:
            self.lengths[r] = 0
            if self._tokens is not None:
                self._tokens[r] = []
        if scrub:
            with torch.inference_mode():
                idx = torch.tensor(list(rows), dtype=torch.long, device=self.device)
                for l in self.net.layers:
                    if l.k is not None:
                        l.k.index_fill_(0, idx, 0)
                        l.v.index_fill_(0, idx, 0)

    @torch.inference_mode()
    def copy_rows(self, src: int, dsts: Sequence[int]) -> None:
        """Give rows ``dsts`` the cache and length of row ``src`` (a prompt prefilled once for several
        sequences: the server's n choices, or the same prompt sent twice), copying its used slots only."""
        n = self.lengths[src]
        if not 0 < n <= self.max_len or any(not 0 <= d < self.max_batch or d == src for d in dsts):
            raise ValueError(f"copy_rows({src}, {list(dsts)}): the source must hold a prompt and the targets be other "
                             f"rows below max_batch={self.max_batch}. Fix: prefill the source row first")
        idx = torch.tensor(list(dsts), device=self.device)
        for l in self.net.layers:
            if l.k is not None:
                l.k[idx, :, :n] = l.k[src, :, :n]
                l.v[idx, :, :n] = l.v[src, :, :n]
        for d in dsts:
            self.lengths[d] = n
            if self._tokens is not None:
                self._tokens[d] = list(self._tokens[src])

    def weight_bytes(self) -> int:
        return decode_weight_bytes(self.spec, self.dtype)

    def cache_bytes(self) -> int:
        return sum(2 * l.k.numel() * l.k.element_size() for l in self.net.layers if l.k is not None)

    # ---- steps ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], rows: Sequence[int] | None = None) -> Tensor:
        """Write each prompt into its row's cache from slot 0; return fp32 logits (n, V) of each
        prompt's last token. rows: cache rows to use (default 0..n-1), each < max_batch."""
        n = len(prompts)
        rows = list(range(n)) if rows is None else [int(r) for r in rows]
        if len(rows) != n or len(set(rows)) != n or any(not 0 <= r < self.max_batch for r in rows):
            raise ValueError(f"rows={rows} must be {n} distinct rows below max_batch={self.max_batch}. "
                             "Fix: pass one free row per prompt")
        if n == 0:
            return torch.empty(0, self.spec.vocab_size)
        lens = [len(p) for p in prompts]
        if min(lens) < 1 or max(lens) > self.max_len - 1:
            raise ValueError(f"prompt lengths {min(lens)}..{max(lens)} tokens do not fit a cache of {self.max_len} "
                             "slots (at least one prompt token and one slot to generate into). Fix: shorten the "
                             "prompt or build the Runtime with a larger max_len")
        ids = torch.zeros((n, max(lens)), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :lens[i]] = torch.as_tensor(list(p), dtype=torch.long)
        contiguous = rows == list(range(rows[0], rows[0] + n))
        row_idx = slice(rows[0], rows[0] + n) if contiguous else torch.tensor(rows, device=self.device)
        last = torch.tensor([x - 1 for x in lens], device=self.device)
        logits = self.net.prefill(ids.to(self.device), row_idx, last)
        for r, x, p in zip(rows, lens, prompts, strict=True):
            self.lengths[r] = x
            if self._tokens is not None:
                self._tokens[r] = [int(t) for t in p]
        return logits

    @torch.inference_mode()
    def decode(self, tokens: Sequence[int] | Tensor, active: Sequence[bool] | None = None) -> Tensor:
        """One step for rows 0..n-1 (n = len(tokens)): row b reads tokens[b], writes it at slot
        lengths[b] and returns fp32 logits (n, V). Inactive rows (active[b] False) compute on a spare
        slot and do not advance: that keeps a batch's rows in place while some of them are free."""
        n = len(tokens)
        act = [True] * n if active is None else list(active)
        if not 0 < n <= self.max_batch or len(act) != n:
            raise ValueError(f"decode got {n} tokens for a cache of {self.max_batch} rows (and {len(act)} flags). "
                             "Fix: pass 1..max_batch tokens and one active flag per token")
        pos = []
        for b in range(n):
            p = self.lengths[b]
            if act[b] and p >= self.max_len:
                raise ValueError(f"row {b} is full ({self.max_len} slots). Fix: stop generating at the cache "
                                 "length or build the Runtime with a larger max_len")
            pos.append(min(p, self.max_len - 1))
        if self.native is not None and n <= self.native.max_rows:
            logits = self.native([int(t) for t in tokens], pos)
            for b in range(n):
                self.lengths[b] += int(act[b])
            return self._longrope_crossing(tokens, act, pos, logits)
        tok = torch.as_tensor(tokens, dtype=torch.long).to(self.device, non_blocking=True)
        nb = self._graphs.bucket(n) if self._graphs is not None else self._graph_batch(n)
        if nb > n:  # idle rows n..nb-1 fill a static graph: each writes its next free slot, which its own
            # next decode overwrites before anything reads it (a prefill rewrites the row from slot 0)
            tok = torch.cat([tok, tok.new_zeros(nb - n)])
            pos += [min(self.lengths[b], self.max_len - 1) for b in range(n, nb)]
        pos_t = torch.tensor(pos, dtype=torch.long).to(self.device, non_blocking=True)
        if self._graphs is not None:
            logits = self._graphs.run(tok, pos_t)[:n].clone()  # the graph's buffer is rewritten next step
        else:
            logits = self._step(tok, pos_t, None if self.backend == "triton" else max(pos) + 1)[:n]
        for b in range(n):
            self.lengths[b] += int(act[b])
        return self._longrope_crossing(tokens, act, pos, logits)

    def _longrope_crossing(self, tokens: Sequence[int] | Tensor, act: list[bool], pos: list[int],
                           logits: Tensor) -> Tensor:
        """longrope: record each active row's token; a row whose token went to slot original_max (its sequence now
        longer than the original context, its cache rotated with the short factors) is prefilled again with all
        its tokens, which rewrites its cache with the long factors and gives this step's logits (module
        docstring). Other models: ``logits`` as they are."""
        if self._tokens is None:
            return logits
        for b, t in enumerate(tokens):
            if act[b]:
                self._tokens[b].append(int(t))
                if pos[b] == self.net.longrope:
                    ids = torch.tensor([self._tokens[b]], dtype=torch.long, device=self.device)
                    last = torch.tensor([ids.shape[1] - 1], device=self.device)
                    logits[b] = self.net.prefill(ids, slice(b, b + 1), last)[0]
        return logits


GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)  # batch sizes that get a CUDA graph


class _GraphCache:
    """CUDA graphs of the decode step, one per batch bucket (a batch runs in the smallest bucket with
    room for it, padded with idle rows), over static token/position buffers and one shared memory pool.
    Building a bucket's graph first picks the faster GEMV per weight shape, and the attention's form per layer
    shape (LAYERFOLD_DECODE_ATTN=auto), for that many rows."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor, Tensor, Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.picks: dict[int, dict[str, int]] = {}  # bucket -> GEMV implementation -> weights

    def bucket(self, n: int) -> int:
        return next((b for b in GRAPH_BUCKETS if n <= b <= self.rt.max_batch), n)

    def run(self, tok: Tensor, pos: Tensor) -> Tensor:
        n = tok.shape[0]
        g = self.graphs.get(n)
        if g is None:
            g = self.graphs[n] = self._capture(n)
        graph, tok_buf, pos_buf, out = g
        tok_buf.copy_(tok, non_blocking=True)
        pos_buf.copy_(pos, non_blocking=True)
        graph.replay()
        return out

    def _capture(self, n: int) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor, Tensor]:
        rt = self.rt
        if rt.net.fused is not None:
            self.picks[n] = rt.net.fused.tune(n)
        tok_buf = torch.zeros(n, dtype=torch.long, device=rt.device)
        pos_buf = torch.full((n,), rt.max_len - 1, dtype=torch.long, device=rt.device)  # a spare slot
        stream = torch.cuda.Stream(rt.device)
        stream.wait_stream(torch.cuda.current_stream(rt.device))
        with torch.cuda.stream(stream):  # warm-up compiles the Triton kernels outside the capture
            for _ in range(2):
                rt.net(tok_buf, pos_buf)
        torch.cuda.current_stream(rt.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = rt.net(tok_buf, pos_buf)
        return graph, tok_buf, pos_buf, out
