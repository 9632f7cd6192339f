"""A model whose weights stay in host memory, run on a device one layer at a time.

``StreamedLM(model, device)`` is a callable ``ids (B, T) -> logits (B, T, V)`` (what
``layerfold.evaluation.evaluate`` scores) for a model too large for the device: every call builds each
block on the device from the host weights (``core.streaming.LayerStream``: pinned staging and the next
block prefetched on a side stream on CUDA), runs the batch through it and frees it. Each call moves the
whole model across the bus once, so ``many(batches)`` runs a whole evaluation's batches layer by layer
instead: one pass over the weights for as many batches as ``HIDDEN_BUDGET`` of hidden states holds (what
``evaluate``'s perplexity and multiple-choice scoring and the lm-eval adapter use when the model has
``many``). On the device: one or two blocks, the embedding table, the head, the pass's hidden states (a
default evaluation's 8,192 tokens x 4,096 wide in bf16: 67 MB) and one batch's logits.

``weights_place`` decides where a job keeps the weights: on the device when they fit a share of its free
memory, else in host memory, streamed like this (``--weights`` of ``prune``, ``eval`` and ``lm-eval``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from layerfold.core.model import Model
from layerfold.core.streaming import LayerStream

WEIGHTS = ("auto", "device", "host")
# Share of the device's free memory the weights may take for ``auto`` to keep them there: the rest holds
# what the job adds on top (calibration buffers, a trained block and its AdamW state, evaluation logits).
DEVICE_SHARE = 0.6
# Bytes of hidden states one pass over the layers carries on the device (``StreamedLM.many``): 2 GiB is 250K
# tokens at 4,096 wide in bf16 (a default evaluation is 8K-36K); an lm-eval task of millions of tokens takes
# several passes instead of more memory than the device has.
HIDDEN_BUDGET = 2 * 1024 ** 3


def weight_bytes(source: str | Path | Model, dtype: torch.dtype | None = None) -> int:
    """Bytes of the weights as they will be held (in ``dtype`` when given); reads no tensor data."""
    if isinstance(source, Model):
        state = source.state_dict()
    else:
        from layerfold.core.loading import load_spec_state

        state = load_spec_state(source, quiet=True)[1]
    if dtype is None:
        return sum(t.numel() * t.element_size() for t in state.values())
    size = torch.empty((), dtype=dtype).element_size()
    return sum(t.numel() * (size if t.is_floating_point() else t.element_size()) for t in state.values())


def weights_place(weights: str, device: str | torch.device, nbytes: int | Callable[[], int]) -> tuple[str, str]:
    """('device' | 'host', why) for ``weights`` ("auto" | "device" | "host") and weights of ``nbytes`` (or a
    function giving it: called only when "auto" has a GPU to decide for)."""
    if weights not in WEIGHTS:
        raise ValueError(f"--weights {weights!r} is unknown. Fix: use one of {', '.join(WEIGHTS)}")
    dev = torch.device(device)
    if weights != "auto":
        return weights, "asked for"
    if dev.type != "cuda":
        return "device", f"{dev.type}: host and device memory are one"
    free, _ = torch.cuda.mem_get_info(dev)
    nbytes = nbytes() if callable(nbytes) else nbytes
    gb = 1024 ** 3
    if nbytes <= DEVICE_SHARE * free:
        return "device", f"{nbytes / gb:.1f} GiB of weights fit {DEVICE_SHARE:.0%} of the {free / gb:.1f} GiB free"
    return "host", (f"{nbytes / gb:.1f} GiB of weights exceed {DEVICE_SHARE:.0%} of the {free / gb:.1f} GiB free "
                    f"on {dev}: kept in host memory, streamed one layer at a time")


class StreamedLM:
    """``model`` (in host memory, left as it is) computed on ``device`` one layer at a time; see the module
    docstring. Logits equal ``model(ids)``'s up to the device's arithmetic."""

    def __init__(self, model: Model, device: str | torch.device, dtype: torch.dtype | None = None):
        self.spec = model.spec
        self.src = LayerStream(model, device, dtype or model.dtype)
        self.device = self.src.device
        self.dtype = self.src.dtype
        self.hidden_budget = HIDDEN_BUDGET
        self.passes = 0  # passes over the layers so far

    @torch.inference_mode()
    def __call__(self, ids: Tensor, key_valid: Tensor | None = None) -> Tensor:
        return next(self.many([(ids, key_valid)]))

    @torch.inference_mode()
    def many(self, batches: Sequence[tuple[Tensor, Tensor | None]]) -> Iterator[Tensor]:
        """Logits of each (ids (B, T), key_valid (B, T) or None) batch, in order, from as few passes over the
        layers as ``hidden_budget`` allows: every batch of a pass has its hidden state (B x T x d) on the
        device and goes through layer i before layer i + 1 is built, so the weights cross the bus once per
        pass. The logits are made one batch at a time as the caller takes them."""
        batches = list(batches)
        width = max([self.spec.d_model] + [ls.d_out for ls in self.spec.layers])
        start = 0
        while start < len(batches):
            end, used = start, 0
            while end < len(batches):
                cost = batches[end][0].numel() * width * self.dtype.itemsize
                if end > start and used + cost > self.hidden_budget:
                    break
                used += cost
                end += 1
            yield from self._pass(batches[start:end])
            start = end

    def _pass(self, batches: Sequence[tuple[Tensor, Tensor | None]]) -> Iterator[Tensor]:
        runs = [list(self.src.prepare(ids, key_valid)) for ids, key_valid in batches]
        for i, block in self.src.blocks():
            for run in runs:
                run[0] = block(run[0], *self.src.cos_sin(run[1], i), run[2])
        self.passes += 1
        for run in runs:
            h, run[0] = run[0], None
            yield self.src.logits(h)

    def num_params(self) -> int:
        return sum(t.numel() for t in self.src.state.values())


def evaluation_model(model: Model, device: str | torch.device, place: str) -> Any:
    """What evaluations score: the model itself when its weights are on the device, else a StreamedLM."""
    return StreamedLM(model, device) if place == "host" else model


__all__ = ["DEVICE_SHARE", "HIDDEN_BUDGET", "WEIGHTS", "StreamedLM", "evaluation_model", "weight_bytes",
           "weights_place"]
