"""Streaming calibration: the whole set goes through the model one layer at a time, all statistics in one pass.

Order (GPTQ / SliceGPT): embeddings of every sample go into a hidden-state buffer (host memory, or a
disk ``np.memmap`` with ``offload="disk"``); then for each layer only that layer's weights are put on
the compute device (read lazily from the mmap'd checkpoint, or from an in-memory model's state), every
micro-batch of the buffer runs through it, the kernels in ``kernels/`` fold its activations into
running sums, and the layer output is written back over its input in the same buffer slice. The device
holds one layer's weights, one micro-batch and the current layer's accumulators.

Host (or disk) memory besides the weights, for n samples of T tokens, width d, window W, L layers:

- hidden states: n T d x (compute dtype bytes), one buffer overwritten in place (micro-batches of a
  layer are independent, so each output goes over its own input once that is no longer needed);
- window ring: the last W hidden states as unit-normalised directions, W n T d x 2 bytes (fp16).
  cos(h_i, h_{i+1}) uses the layer's exact input; k >= 2 reads the ring (per-token error ~1e-4,
  ~1e-6 on a mean over thousands of tokens);
- CKA store: per CKA minibatch (one sequence, up to ``cka_tokens`` tokens evenly spread over it) the
  U-centred Grams of h_0..h_L, n_cka (L+1) m^2 x 4 bytes; each new layer's Gram is multiplied with
  the stored ones (one HSIC row) as it arrives.
(SmolLM2-135M, 64 x 256 tokens, W = 8, m = 128: 38 MB + 151 MB + 130 MB; ``stats.meta["buffer_bytes"]``.)

Massive activations: Llama-family models (SmolLM2 from about layer 12) carry a residual at sequence
position 0 orders of magnitude larger than elsewhere, which dominates raw-unit sums. The first
``skip_positions`` positions of every sequence (counted over valid tokens) are left out of the
statistics named in ``skip_in``: by default the Grams and channel magnitudes; window cosines and CKA
use every valid token unless "cos" / "cka" is added.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from layerfold import kernels as K
from layerfold.calibration.buffers import allocate, place
from layerfold.calibration.stats import Stats
from layerfold.core.args import whole
from layerfold.core.console import progress as progress_bar
from layerfold.core.devices import check_device
from layerfold.core.dtypes import check_dtype
from layerfold.core.model import Model, attention_mask
from layerfold.core.streaming import LayerStream

SKIP_TARGETS = ("cos", "cka", "grams", "channels")


def _even(idx: Tensor, m: int) -> Tensor:
    """m entries of idx spread evenly (floor of a linspace with step >= 1: distinct, first and last kept)."""
    if idx.numel() <= m:
        return idx
    return idx[torch.linspace(0, idx.numel() - 1, m, dtype=torch.float64).floor().long()]


def _check_args(batches: Tensor, mask: Tensor | None, window: int, cka_tokens: int, micro_batch: int,
                offload: str, skip_positions: int, skip_in: Sequence[str], vocab: int, n_layers: int,
                offload_dir: str | Path | None, context: int | None = None) -> None:
    if not isinstance(batches, Tensor) or batches.dim() != 2 or batches.dtype not in (torch.int64, torch.int32):
        raise ValueError("batches must be an integer tensor (n_samples, seq_len). Fix: pass token ids such as "
                         "layerfold.core.data.calib_batches(...) returns")
    if batches.numel() and (int(batches.min()) < 0 or int(batches.max()) >= vocab):
        raise ValueError(f"token ids must lie in [0, {vocab}) for this model; got {int(batches.min())}.."
                         f"{int(batches.max())}. Fix: tokenize with the model's own tokenizer")
    if mask is not None and tuple(mask.shape) != tuple(batches.shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, batches {tuple(batches.shape)}. Fix: give one "
                         "bool per token (True = valid)")
    check_options(n_layers, window, cka_tokens, micro_batch, offload, skip_positions, skip_in, offload_dir,
                  seq_len=batches.shape[1], context=context)


def check_options(n_layers: int, window: int, cka_tokens: int, micro_batch: int, offload: str, skip_positions: int,
                  skip_in: Sequence[str], offload_dir: str | Path | None = None, seq_len: int | None = None,
                  context: int | None = None) -> None:
    """The options of :func:`calibrate` that need no data, checked before any work (the CLI calls it first).
    ``context``: the model's positions (spec.max_position), which a sequence may not exceed."""
    _check_numbers(window, cka_tokens, micro_batch, skip_positions, skip_in)
    check_context(seq_len, context)
    most = max(n_layers, 8)  # cos(h_i, h_i+k) exists for k <= L; 8 is every method's default
    if window > most:
        raise ValueError(f"window={window}: more than the model's {n_layers} layers (and than 8, every method's "
                         f"default). Fix: pass --window {most} or less")
    if offload not in ("host", "disk"):
        raise ValueError(f"offload={offload!r} is unknown. Fix: use 'host' or 'disk'")
    if offload_dir is not None and not Path(offload_dir).is_dir():
        raise ValueError(f"--offload-dir {offload_dir}: not an existing directory. Fix: create it, or give the path "
                         "of a directory with room for the hidden states")
    bad = set(skip_in) - set(SKIP_TARGETS)
    if bad:
        raise ValueError(f"skip_in names unknown statistics {sorted(bad)}. Fix: choose from {SKIP_TARGETS}")
    if skip_in and seq_len is not None and skip_positions >= seq_len:
        raise ValueError(f"skip_positions={skip_positions} leaves none of a sequence's {seq_len} positions to the "
                         f"statistics it skips them in ({', '.join(sorted(skip_in))}): they would be empty. Fix: "
                         "pass a smaller --skip-positions or a longer --seq-len")


def check_context(seq_len: int | None, context: int | None) -> None:
    """Statistics of positions past the model's context describe a model that was never trained there (and
    rope scalings that depend on the length would differ from the source's): refused."""
    if seq_len is not None and context is not None and seq_len > context:
        raise ValueError(f"sequences of {seq_len} tokens (--seq-len) are longer than the model's context of {context} "
                         f"positions (max_position_embeddings). Fix: use at most {context} tokens a sequence "
                         f"(--seq-len {context})")


def _check_numbers(window: Any, cka_tokens: Any, micro_batch: Any, skip_positions: Any, skip_in: Any) -> None:
    for name, v, lo in (("window", window, 0), ("cka_tokens", cka_tokens, K.cka.MIN_TOKENS),
                        ("micro_batch", micro_batch, 1), ("skip_positions", skip_positions, 0)):
        whole(name, v, lo)
    if isinstance(skip_in, str):
        raise TypeError(f"skip_in={skip_in!r} is one string. Fix: pass a list of statistics, e.g. ['grams']")


def _shard(batches: Tensor, mask: Tensor | None, dist: bool) -> tuple[Tensor, Tensor, Tensor, int, int]:
    """(local ids, local valid mask, their global indices, world size, rank): rank r takes samples r, r + world..."""
    n = batches.shape[0]
    valid = torch.ones_like(batches, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    if not dist:
        return batches, valid, torch.arange(n), 1, 0
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()):
        raise ValueError("dist=True but torch.distributed is not initialised. Fix: launch with torchrun "
                         "(python -m layerfold calibrate under torchrun does it) or call init_process_group first")
    rank, world = tdist.get_rank(), tdist.get_world_size()
    idx = torch.arange(rank, n, world)
    return batches[idx], valid[idx], idx, world, rank


def _unit(x: Tensor) -> Tensor:
    xf = x.float()
    return xf / torch.linalg.vector_norm(xf, dim=-1, keepdim=True).clamp_min(K.COS_EPS)


class _LayerAcc:
    """Device accumulators of one layer; ``finish`` adds them into the host Stats."""

    def __init__(self, spec: Any, i: int, window: int, grams: bool, channels: bool, dev: torch.device):
        ls = spec.layers[i]
        z = lambda *shape: torch.zeros(shape, dtype=torch.float32, device=dev)
        self.cos = torch.zeros(max(window, 1), dtype=torch.float64, device=dev)  # [k-1]: (h_{i+1-k}, h_{i+1})
        self.ks: list[int] = []
        self.rows: dict[int, Tensor] = {}  # CKA point p -> HSIC row p, columns 0..p
        self.grams: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        self.chan: dict[str, tuple[Tensor, Tensor]] = {}
        if grams:
            self.grams[f"attn_in.{i}"] = (z(ls.d_in, ls.d_in), z(ls.d_in), z(ls.d_in))
            self.grams[f"mlp_in.{i}"] = (z(ls.d_mid, ls.d_mid), z(ls.d_mid), z(ls.d_mid))
            if i == spec.n_layers - 1:
                self.grams["final"] = (z(ls.d_out, ls.d_out), z(ls.d_out), z(ls.d_out))
        if channels and ls.has_mlp:
            self.chan["ffn"] = (z(ls.d_ffn), z(ls.d_ffn))
        if channels and ls.has_attn:
            self.chan["o"] = (z(ls.q_dim), z(ls.q_dim))
        self.i, self.dev = i, dev

    def update(self, out: Tensor, taps: dict[str, Tensor], gm: Tensor | None, cm: Tensor | None) -> None:
        """Grams at the norm inputs (mask gm) and channel magnitudes (mask cm) of one micro-batch."""
        for key, x in ((f"attn_in.{self.i}", taps["attn_in"]), (f"mlp_in.{self.i}", taps["mlp_in"]),
                       ("final", out)):
            if key in self.grams:
                K.gram_accumulate(x, gm, self.grams[key])
        if "ffn" in self.chan:
            K.swiglu_channel_stats(taps["gate"], taps["up"], cm, self.chan["ffn"])
        if "o" in self.chan:
            K.channel_stats(taps["o_in"], cm, self.chan["o"])

    def cka_points(self, store: Tensor, slots: list[int], p: int, x: Tensor) -> None:
        """Point p (h_p) of S CKA minibatches of m tokens each, x (S, m, d): their U-centred Grams go into
        the store and their HSIC rows against h_0..h_p are accumulated."""
        m = x.shape[1]
        k = K.ucentered_grams(x)  # (S, m, m) fp32
        sl = slice(slots[0], slots[-1] + 1) if slots == list(range(slots[0], slots[-1] + 1)) else slots
        store[sl, p, :m, :m] = k.to(store.device)
        row = K.hsic_rows(k, store[sl, :p + 1, :m, :m].to(k.device))
        self.rows[p] = row if p not in self.rows else self.rows[p].add_(row)

    def collect(self) -> dict[str, Any]:
        """This layer's sums on their way to the host: copies into (pinned) host memory issued without
        waiting, so the loop never stalls on a layer's end; :meth:`apply` reads them once the device
        has been synchronised after the last layer."""
        pin = self.dev.type == "cuda"

        def host(t: Tensor) -> Tensor:
            out = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
            return out.copy_(t, non_blocking=True)

        return {"i": self.i, "ks": list(self.ks), "cos": host(self.cos),
                "rows": {p: host(r) for p, r in self.rows.items()},
                "grams": {k: tuple(host(t) for t in v) for k, v in self.grams.items()},
                "chan": {k: tuple(host(t) for t in v) for k, v in self.chan.items()}}

    @staticmethod
    def apply(done: dict[str, Any], stats: Stats, n_cos: int) -> None:
        i = done["i"]
        for k in done["ks"]:
            stats.cos_sum[i + 1 - k, k - 1] += float(done["cos"][k - 1])
            stats.cos_count[i + 1 - k, k - 1] += n_cos
        for p, r in done["rows"].items():
            stats.hsic[p, :p + 1] += r
        for key, (g, s, ss) in done["grams"].items():
            stats.grams[key], stats.gram_sum[key], stats.gram_sq[key] = g, s, ss
        for name, (a, q) in done["chan"].items():
            stats.chan[f"{name}_abs.{i}"], stats.chan[f"{name}_sq.{i}"] = a, q


class _Run:
    """One calibration: buffers, masks and the per-layer loop (see the module docstring for the order)."""

    def __init__(self, src: LayerStream, ids: Tensor, valid: Tensor, masks: dict[str, Tensor],
                 cka_idx: dict[int, Tensor], opts: dict[str, Any], tmp: Path | None, stats: Stats,
                 device_budget: int | None):
        spec = self.spec = src.spec
        self.src, self.ids, self.valid, self.stats, self.o = src, ids, valid, stats, opts
        self.dev = src.device
        n, T = ids.shape
        pos = (valid.long().cumsum(1) - 1).clamp_min(0)  # position id = index among the valid tokens
        self.spans = [(b, min(b + opts["micro_batch"], n)) for b in range(0, n, opts["micro_batch"])]
        self.pos = [pos[b0:b1].to(self.dev) for b0, b1 in self.spans]  # moved once: no copies in the loop
        # per micro-batch device masks; None where every token counts (the kernels' fast path)
        self.mbm = [{k: None if bool(v[b0:b1].all()) else v[b0:b1].to(self.dev) for k, v in masks.items()}
                    for b0, b1 in self.spans]
        self.padded = [None if bool(valid[b0:b1].all()) else valid[b0:b1].to(self.dev) for b0, b1 in self.spans]
        self.n_cos = int(masks["cos"].sum())
        slot = {s: j for j, s in enumerate(sorted(cka_idx))}  # row of the CKA store
        self.cka_groups = []  # per micro-batch: (rows in it, token indices (S, m), store rows) per token count m
        for b0, b1 in self.spans:
            by_m: dict[int, list[int]] = {}
            for s in range(b0, b1):
                if s in cka_idx:
                    by_m.setdefault(cka_idx[s].numel(), []).append(s)
            self.cka_groups.append([(torch.tensor([s - b0 for s in g], device=self.dev),
                                     torch.stack([cka_idx[s] for s in g]).to(self.dev), [slot[s] for s in g])
                                    for g in by_m.values()])
        m_max = max((t.numel() for t in cka_idx.values()), default=0)
        self.widths = [spec.d_model] + [l.d_out for l in spec.layers]  # widths[j] = width of h_j
        d_max = max(self.widths + [l.d_mid for l in spec.layers])
        L, W = spec.n_layers, opts["window"]
        self.n_ring = min(W, L) if W >= 2 else 0  # ring slot j % n_ring holds unit(h_j)
        shapes = {"hidden": ((n, T, d_max), src.dtype)}
        if self.n_ring:
            shapes["ring"] = ((self.n_ring, n, T, d_max), opts["ring_dtype"])
        if cka_idx:
            shapes["cka"] = ((len(cka_idx), L + 1, m_max, m_max), torch.float32)
        esize = lambda dt: torch.empty((), dtype=dt).element_size()
        where = place({k: math.prod(s) * esize(dt) for k, (s, dt) in shapes.items()}, self.dev, opts["offload"],
                      device_budget)
        buf = {k: allocate(s, dt, where[k], self.dev, tmp, k, zero=k == "ring") for k, (s, dt) in shapes.items()}
        self.hidden, self.ring, self.store = buf["hidden"], buf.get("ring"), buf.get("cka")
        stats.meta["buffers"] = where
        self.ring_layer = [-1] * self.n_ring
        self.stage_ring, self.ring_stage = self.ring is not None and self.ring.device != self.dev, None  # _ring_mb
        self.collected: list[dict[str, Any]] = []  # each layer's sums, copied to the host as the loop goes
        self.split = {"forward": 0.0, "statistics": 0.0}  # host seconds (CPU: compute; CUDA: launches)
        stats.meta["buffer_bytes"] = {k: 0 if t is None else t.numel() * t.element_size() for k, t in
                                      (("hidden", self.hidden), ("ring", self.ring), ("cka", self.store))}

    def _ring_mb(self, b0: int, b1: int, d: int, use: dict[int, int]) -> Tensor:
        """The ring's slots for samples b0:b1 on the device. Off it, only the slots in use cross, each whole
        and contiguous (asynchronous from pinned memory), into a stage kept for the run: torch gathers the
        strided ``ring[:, b0:b1]`` in pageable memory first, synchronously (GPU run 3: 65.7 s for 64 x 2048)."""
        if not self.stage_ring:
            return self.ring[:, b0:b1, :, :d].to(self.dev, non_blocking=True)
        if self.ring_stage is None:  # zeros: the unused slots are read, their sums ignored
            shape = (self.n_ring, self.o["micro_batch"], *self.ring.shape[2:])
            self.ring_stage = torch.zeros(shape, dtype=self.ring.dtype, device=self.dev)
        st = self.ring_stage[:, :b1 - b0]
        for s in use:  # stream order: the last micro-batch's kernels read the stage before this
            st[s].copy_(self.ring[s, b0:b1], non_blocking=True)
        return st[..., :d]

    def embed(self) -> None:
        d = self.spec.d_model
        for b0, b1 in self.spans:
            h = self.src.embed(self.ids[b0:b1])  # on the compute device
            self.hidden[b0:b1, :, :d].copy_(h, non_blocking=True)
            if self.n_ring:
                self.ring[0, b0:b1, :, :d].copy_(_unit(h).to(self.o["ring_dtype"]), non_blocking=True)
        if self.n_ring:
            self.ring_layer[0] = 0

    def layer(self, i: int) -> None:
        ls, L, W = self.spec.layers[i], self.spec.n_layers, self.o["window"]
        block = self.src.block(i)
        self.src.prefetch(i + 1)  # the next layer's weights cross the bus while this one computes
        acc = _LayerAcc(self.spec, i, W, self.o["grams"], self.o["channels"], self.dev)
        exact = W >= 1 and ls.d_in == ls.d_out  # k = 1 from the layer's own input
        use = {s: i + 1 - j for s, j in enumerate(self.ring_layer)
               if 0 <= j < i and self.widths[j] == ls.d_out}  # slot -> k >= 2
        acc.ks = ([1] if exact else []) + sorted(use.values())
        for (b0, b1), pos, mm, kv, groups in zip(self.spans, self.pos, self.mbm, self.padded, self.cka_groups,
                                                 strict=True):
            h = self.hidden[b0:b1, :, :ls.d_in].to(self.dev, non_blocking=True)  # h_i (a view where it lives there)
            cos, sin = self.src.rope(i, pos)
            amask = None if kv is None else attention_mask(h.shape[1], 0, kv, self.spec.sliding_window, self.dev)
            taps: dict[str, Tensor] = {}
            t0 = time.perf_counter()
            out = block(h, cos, sin, amask, None, i, taps)  # h_{i+1}
            t1 = time.perf_counter()
            acc.update(out, taps, mm["grams"], mm["channels"])
            insert = bool(self.n_ring) and i < L - 1
            fused = K.use_triton(out)  # the kernels normalise as they stream: no unit vectors needed but the ring's
            u_out = _unit(out) if not fused and (insert or W >= 1) else None  # the CPU path's hints
            u_ring = u_out.to(self.o["ring_dtype"]) if u_out is not None and (insert or use) else None
            ring_mb = self._ring_mb(b0, b1, ls.d_out, use) if use else None
            if exact:  # k = 1 from the exact input; k >= 2 from the ring's unit directions
                acc.cos[0] += K.cosine_window_sum(out, h[None], mm["cos"], base_unit=u_out)[0].double()
            if use:
                rs = K.cosine_window_sum(out, ring_mb, mm["cos"], base_unit=u_ring, others_unit=True)
                for s, k in use.items():
                    acc.cos[k - 1] += rs[s].double()
            for rows, tok, slots in groups:
                if i == 0:
                    acc.cka_points(self.store, slots, 0, h[rows[:, None], tok])
                acc.cka_points(self.store, slots, i + 1, out[rows[:, None], tok])
            if insert:  # over h_{i+1-W}, whose last use was just above (stream order)
                slot = self.ring[(i + 1) % self.n_ring, b0:b1, :, :ls.d_out]
                if not fused:
                    slot.copy_(u_ring)
                elif slot.device == out.device:  # one read of h_{i+1}, one write of its directions
                    K.unit_rows(out, out=slot)
                else:
                    slot.copy_(K.unit_rows(out, self.o["ring_dtype"]), non_blocking=True)
            self.split["forward"] += t1 - t0
            self.split["statistics"] += time.perf_counter() - t1
            self.hidden[b0:b1, :, :ls.d_out].copy_(out, non_blocking=True)  # last: h may be a view of this slice
            del h, out, taps, u_out, u_ring, ring_mb  # one micro-batch alive at a time, also during the next forward
        if self.n_ring and i < L - 1:
            self.ring_layer[(i + 1) % self.n_ring] = i + 1
        self.collected.append(acc.collect())


@torch.inference_mode()
def calibrate(source: str | Path | Model, batches: Tensor, *, mask: Tensor | None = None, window: int = 8,
              cka: bool = True, cka_tokens: int = 128, cka_samples: int | None = None, grams: bool = False,
              channels: bool = True, micro_batch: int = 8, offload: str = "host",
              offload_dir: str | Path | None = None, device: str | torch.device = "cpu",
              dtype: torch.dtype | None = None, skip_positions: int = 1,
              skip_in: Sequence[str] = ("grams", "channels"), ring_dtype: torch.dtype = torch.float16,
              progress: bool = False, dist: bool = False, meta: dict[str, Any] | None = None,
              device_budget: int | None = None) -> Stats:
    """Stream ``batches`` (n, T) through the model layer by layer and return the statistics' sums.

    source: checkpoint dir, HF dir, GGUF, alias (weights mmap'd, one layer on the device at a time) or
    an in-memory Model (left unchanged). mask: (n, T) bool, True = valid token (left or right padding).
    window: W for cos(h_i, h_{i+k}), k = 1..W (0: no cosines). cka_tokens / cka_samples: tokens per CKA
    minibatch (one per sequence, evenly spread over it) and how many sequences (evenly spread; None =
    all). skip_positions / skip_in: see the module docstring. ring_dtype: the window ring's storage.
    dist: torch.distributed is initialised; each rank takes every world-th sample and the sums are
    all-reduced, so every rank returns the statistics of the whole set. meta: extra provenance (data).
    offload / device_budget: where the buffers live (layerfold.calibration.buffers; the choice is in
    ``stats.meta["buffers"]``): on a GPU, device memory up to ``device_budget`` bytes, then pinned host
    memory, then disk; ``offload="disk"`` sends whatever is not on the device to disk.
    """
    t_start = time.perf_counter()
    _check_numbers(window, cka_tokens, micro_batch, skip_positions, skip_in)  # before reading anything
    dev = check_device(device)
    dtype = None if dtype is None else check_dtype(dtype)
    src = LayerStream(source, dev, dtype)
    spec, L = src.spec, src.spec.n_layers
    _check_args(batches, mask, window, cka_tokens, micro_batch, offload, skip_positions, skip_in, spec.vocab_size, L,
                offload_dir, spec.max_position)
    n_global = batches.shape[0]
    ids, valid, gidx, world, rank = _shard(batches.cpu(), None if mask is None else mask.cpu(), dist)
    skip = set(skip_in)
    pos = (valid.long().cumsum(1) - 1).clamp_min(0)
    stat_ok = valid & (pos >= skip_positions)
    masks = {k: (stat_ok if k in skip else valid) for k in SKIP_TARGETS}
    chosen = set(range(n_global)) if cka_samples is None else set(_even(torch.arange(n_global), cka_samples).tolist())
    cka_idx: dict[int, Tensor] = {}  # local sequence -> its CKA tokens
    for s in range(ids.shape[0] if cka else 0):
        tok = masks["cka"][s].nonzero().flatten()
        if int(gidx[s]) in chosen and tok.numel() >= K.cka.MIN_TOKENS:
            cka_idx[s] = _even(tok, cka_tokens)

    opts = {"window": window, "cka": cka, "cka_tokens": cka_tokens, "cka_samples": cka_samples, "grams": grams,
            "channels": channels, "skip_positions": skip_positions, "skip_in": sorted(skip),
            "ring_dtype": str(ring_dtype).removeprefix("torch.")}
    stats = Stats.empty(L, window, cka=cka, meta={
        "source": src.where, "samples": n_global, "seq_len": ids.shape[1], "tokens": None, "options": opts,
        "world_size": world, "device": str(dev), "dtype": str(src.dtype).removeprefix("torch."),
        "offload": offload, "micro_batch": micro_batch, **(meta or {})})
    stats.counts.update(samples=ids.shape[0], tokens=int(valid.sum()), cka_batches=len(cka_idx),
                        cka_tokens=sum(t.numel() for t in cka_idx.values()),
                        gram_tokens=int(masks["grams"].sum()) if grams else 0,
                        chan_tokens=int(masks["channels"].sum()) if channels else 0)
    tmp = Path(tempfile.mkdtemp(prefix="layerfold-calib-", dir=offload_dir)) if offload == "disk" else None
    try:
        run = _Run(src, ids, valid, masks, cka_idx, {**opts, "ring_dtype": ring_dtype, "micro_batch": micro_batch,
                                                     "offload": offload}, tmp, stats, device_budget)
        run.embed()
        for i in progress_bar(range(L), desc="calibrate", total=L, enabled=progress and rank == 0):
            run.layer(i)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)  # the one wait: every layer's sums have reached the host
        for done in run.collected:
            _LayerAcc.apply(done, stats, run.n_cos)
        if dev.type == "cpu":
            stats.meta["time_split_s"] = {k: round(v, 3) for k, v in run.split.items()}
    finally:
        run = None
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if stats.hsic is not None:  # rows were filled on and below the diagonal
        stats.hsic.copy_(stats.hsic.tril() + stats.hsic.tril(-1).T)
    if dist:
        import torch.distributed as tdist

        stats.all_reduce(device=dev if tdist.get_backend() == "nccl" else None)
    stats.meta["tokens"] = int(stats.counts["tokens"])
    stats.meta["time_s"] = round(time.perf_counter() - t_start, 3)
    if dev.type == "cuda":
        stats.meta["device_peak_bytes"] = int(torch.cuda.max_memory_allocated(dev))
    return stats
