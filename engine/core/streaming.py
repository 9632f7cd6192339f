"""A model one layer at a time: what calibration, healing and slicing stream through.

``LayerStream(source, device, dtype)`` reads a model's state dict (a checkpoint, HF dir, GGUF or alias,
memory-mapped; or an in-memory Model, shared) and builds one ``Block`` at a time on the compute device:
built on the meta device (nothing allocated), checked tensor by tensor against the spec, then the
weights are assigned and moved. Only the block being run is on the device; the embedding table stays
where the state holds it, except on CUDA, where a device copy is kept (every micro-batch reads it).
Rotary tables are cached per head size.

On CUDA, ``prefetch(i)`` builds block i on a background thread and a side stream while the caller
computes with the current one (the weights cross the bus during the compute, not between layers);
``block(i)`` then makes the compute stream wait for that copy, and marks the tensors as used there so
the caching allocator cannot hand their memory to the next prefetch too early.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from layerfold.core.checkpoint import check_state_dict
from layerfold.core.model import Block, Model, RMSNorm, attention_mask, build_model, rope_tables
from layerfold.core.spec import ModelSpec

Ropes = dict[int, tuple[Tensor, Tensor]]


class LayerStream:
    """Blocks of ``source`` built one at a time on ``device`` in ``dtype`` (default: the weights' dtype)."""

    def __init__(self, source: str | Path | Model, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None):
        if isinstance(source, Model):
            self.spec: ModelSpec = source.spec
            self.state = {k: v.detach() for k, v in source.state_dict().items()}
            self.where = "in-memory model"
        else:
            from layerfold.core.loading import load_spec_state

            self.spec, self.state, _ = load_spec_state(source, quiet=True)
            self.where = str(source)
        self.device = torch.device(device)
        self.dtype = dtype or self.state["embed.weight"].dtype
        self.keys = {i: [k for k in self.state if k.startswith(f"layers.{i}.")] for i in range(self.spec.n_layers)}
        self._inv_freq: dict[tuple[int, torch.device], Tensor] = {}
        self._embed: Tensor | None = None
        self._full: Model | None = None
        self._final: tuple[RMSNorm, Tensor | None] | None = None
        self._pending: dict[int, Future] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._stream = None

    # ---- pieces -----------------------------------------------------------------------------------
    def embed(self, ids: Tensor, device: str | torch.device | None = None) -> Tensor:
        """Embeddings of ids (B, T) -> (B, T, d) in ``dtype`` on ``device`` (default: the stream's)."""
        w = self.embed_weight()
        return F.embedding(ids.to(w.device), w).to(device or self.device, self.dtype)

    def embed_weight(self) -> Tensor:
        """The embedding table: a device copy in ``dtype`` on CUDA (made once), the state's tensor elsewhere."""
        if self._embed is None:
            w = self.state["embed.weight"]
            self._embed = w.to(self.device, self.dtype) if self.device.type == "cuda" else w
        return self._embed

    def block(self, i: int) -> Block:
        """Layer i on the device, its weights checked against the spec (a clear error names the tensor)."""
        fut = self._pending.pop(i, None)
        if fut is None:
            return self._build(i)
        block, ready = fut.result()
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(ready)
        for t in block.state_dict().values():
            t.record_stream(stream)
        return block

    def prefetch(self, i: int) -> None:
        """Start building block i on a side stream (CUDA only; a no-op elsewhere or past the last layer)."""
        if self.device.type != "cuda" or not 0 <= i < self.spec.n_layers or i in self._pending:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="layerfold-prefetch")
            self._stream = torch.cuda.Stream(self.device)

        def work() -> tuple[Block, torch.cuda.Event]:
            with torch.inference_mode(), torch.cuda.stream(self._stream):
                block = self._build(i, staged=True)
                ready = torch.cuda.Event()
                ready.record(self._stream)
            return block, ready

        self._pending[i] = self._pool.submit(work)

    def _build(self, i: int, staged: bool = False) -> Block:
        """Block i on the device. ``staged``: host tensors go through pinned memory first (the caching host
        allocator's, reused once the copy is done), so the copies to the device are asynchronous on the
        current stream; a pageable copy would hold the calling thread and serialise with other streams."""
        pre = f"layers.{i}."
        sub = {k[len(pre):]: self.state[k] for k in self.keys[i]}
        with torch.device("meta"):
            block = Block(self.spec.layers[i], self.spec)
        expected = {k: tuple(v.shape) for k, v in block.state_dict().items()}
        check_state_dict(expected, sub, where=f"{self.where} layer {i}")
        if staged:
            sub = {k: v.pin_memory() if v.device.type == "cpu" and not v.is_pinned() else v for k, v in sub.items()}
        block.load_state_dict(sub, assign=True)
        return block.to(device=self.device, dtype=self.dtype, non_blocking=staged).eval()

    def rope(self, i: int, positions: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Rotary cos/sin of layer i for positions (B, T); (None, None) for a layer without attention."""
        ls = self.spec.layers[i]
        if not ls.has_attn:
            return None, None
        return self.rope_for(ls.head_dim, positions)

    def rope_for(self, head_dim: int, positions: Tensor, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        # frequencies cached where the positions are: no host copy per call
        return rope_tables(self.spec, self._inv_freq, head_dim, positions, dtype or self.dtype)

    def ropes(self, positions: Tensor, dtype: torch.dtype | None = None) -> Ropes:
        """cos/sin per distinct head size (what Model.run_layer takes)."""
        return {l.head_dim: self.rope_for(l.head_dim, positions, dtype) for l in self.spec.layers if l.has_attn}

    def mask(self, q_len: int, key_valid: Tensor | None = None) -> Tensor | None:
        """The attention mask of a prefill of q_len tokens (None where plain causal attention suffices)."""
        return attention_mask(q_len, 0, key_valid, self.spec.sliding_window, self.device)

    def positions(self, valid: Tensor) -> Tensor:
        """Position ids that count valid tokens only (left or right padding), (B, T)."""
        return (valid.long().cumsum(-1) - 1).clamp_min(0)

    def prepare(self, ids: Tensor, key_valid: Tensor | None = None) -> tuple[Tensor, Ropes, Tensor | None]:
        """(embeddings, rotary tables, attention mask) of a prefill of ids (B, T) on the device, as
        ``Model.prepare`` makes them (positions count valid tokens only when ``key_valid`` is given)."""
        ids = ids.to(self.device)
        B, T = ids.shape
        if key_valid is not None:
            key_valid = key_valid.to(self.device)
            positions = self.positions(key_valid)
        else:
            positions = torch.arange(T, device=self.device)[None].expand(B, T)
        h = self.embed(ids)
        return h, self.ropes(positions, h.dtype), self.mask(T, key_valid)

    def blocks(self, last: int | None = None) -> Iterator[tuple[int, Block]]:
        """(i, block i) for layers 0..last-1 in order, each built on the device while the previous one runs
        (prefetch on CUDA): layer-major loops over many batches. ``cos_sin(ropes, i)`` gives a batch's
        rotary tables for layer i."""
        last = self.spec.n_layers if last is None else last
        self.prefetch(0)
        for i in range(last):
            block = self.block(i)
            if i + 1 < last:
                self.prefetch(i + 1)
            yield i, block
            del block

    def cos_sin(self, ropes: Ropes, i: int) -> tuple[Tensor | None, Tensor | None]:
        """Layer i's rotary tables from ``ropes`` ((None, None) for a layer without attention)."""
        ls = self.spec.layers[i]
        return ropes.get(ls.head_dim, (None, None)) if ls.has_attn else (None, None)

    def logits(self, h: Tensor) -> Tensor:
        """The final norm and LM head on the device (built once: a device copy of the head on CUDA; a tied
        head is the embedding table), as ``Model.logits``."""
        if self._final is None:
            norm = RMSNorm(self.spec.d_final, self.spec.norm_eps)
            norm.load_state_dict({"weight": self.state["norm.weight"]})
            head = self.state.get("lm_head.weight", self.embed_weight())  # tied: the (device) embedding table
            self._final = (norm.to(self.device, self.dtype).requires_grad_(False), head.to(self.device, self.dtype))
        norm, head = self._final
        return F.linear(norm(h), head)

    # ---- whole model ------------------------------------------------------------------------------
    def model(self) -> Model:
        """The whole model on the device, built once (healing's global stage needs every layer at once)."""
        if self._full is None:
            self._full = build_model(self.spec, self.state, device=self.device, dtype=self.dtype).eval()
            self._full.requires_grad_(False)
        return self._full

    @property
    def materialized(self) -> bool:
        return self._full is not None

    def layer_equal(self, model: Model, k: int) -> bool:
        """Whether ``model``'s layer k holds exactly this stream's layer k (same names and values)."""
        mine = model.layers[k].state_dict()
        pre = f"layers.{k}."
        return len(mine) == len(self.keys[k]) and all(
            torch.equal(v, self.state[pre + n].to(v.device, v.dtype)) for n, v in mine.items())


__all__ = ["LayerStream", "Ropes"]
