"""Low-rank adapters (LoRA) on a model's linear layers, merged back into plain weights before saving.

Healing's global stage trains, besides the layers surgery changed, adapters on the unchanged ones when
training every parameter does not fit (a 7B model's AdamW state is 4x its weights): each chosen
``nn.Linear`` W becomes W + (alpha / r) B A with A (r, in) small random and B (out, r) zero, so training
starts from the model as it is; only A and B train. ``merge_lora`` folds B A into W and puts the plain
``nn.Linear`` back, so a healed checkpoint is an ordinary layerfold checkpoint with the same tensor names.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

TARGETS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")


class LoRALinear(nn.Module):
    """``base(x) + scale * (x A^T) B^T`` with ``base`` frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank {rank}. Fix: use a rank >= 1 (8 is the usual choice)")
        self.base = base.requires_grad_(False)
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, w.shape[1], device=w.device, dtype=w.dtype))
        self.lora_b = nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises a weight
        self.scale = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (x @ self.lora_a.T) @ self.lora_b.T * self.scale

    def merged(self) -> nn.Linear:
        """The plain linear layer with the adapter folded in (computed in fp32, stored in W's dtype)."""
        w = self.base.weight
        delta = (self.lora_b.float() @ self.lora_a.float()) * self.scale
        with torch.no_grad():
            w.copy_((w.float() + delta).to(w.dtype))
        return self.base


def add_lora(model: nn.Module, layers: Iterable[int], *, rank: int = 8, alpha: float = 16.0,
             targets: Iterable[str] = TARGETS) -> list[nn.Parameter]:
    """Wrap the ``targets`` linears of ``model.layers[i]`` for i in ``layers``; returns the new parameters
    (the rest of those layers is frozen by the wrapping; other layers are untouched)."""
    params: list[nn.Parameter] = []
    for i in layers:
        block = model.layers[i]
        for path in targets:
            parent: nn.Module | None = block
            *parents, name = path.split(".")
            for part in parents:  # a layer without attention (or MLP) holds None there
                parent = getattr(parent, part, None) if parent is not None else None
            lin = getattr(parent, name, None) if parent is not None else None
            if isinstance(lin, nn.Linear):
                wrapped = LoRALinear(lin, rank, alpha)
                setattr(parent, name, wrapped)
                params += [wrapped.lora_a, wrapped.lora_b]
    return params


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its weight and restore the plain linears; returns how many were merged."""
    n = 0
    for mod in list(model.modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, LoRALinear):
                setattr(mod, child_name, child.merged())
                n += 1
    return n


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


__all__ = ["TARGETS", "LoRALinear", "add_lora", "has_lora", "merge_lora"]
