"""Partial rotary (Phi-4-mini: ``partial_rotary_factor`` 0.75, rotary on 96 of 128 dims) in whole-head rotary's layout.

transformers' Phi3 rotates the first ``rot`` dims of each q/k head in halves (pairs (j, j + rot/2), j < rot/2) and
passes the other ``hd - rot`` through. layerfold rotates whole heads in halves (pairs (i, i + hd/2)) everywhere (the
model, the streamed layers, the decode tables, the Triton and native CPU kernels). Both are the same once each
head's q and k rows are permuted so that rotary pair j lands on (j, j + hd/2) and the pass-through dims fill the
pairs rot/2 .. hd/2 - 1, which turn at frequency 0 (cos 1, sin 0: core.model.rope_inv_freq). One permutation of
both q's and k's head dims leaves every score q.k unchanged; v and o are untouched.

``permute_state`` applies it to an HF state dict read into layerfold names (q/k weight rows, q/k biases, q/k norm
weights), so the model and the checkpoints it saves hold the permuted layout (``ModelSpec.rotary_dim`` says so);
an export that writes HF names refuses such a model (interop.formats).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from layerfold.core.rope_config import number, setting

# families whose transformers class applies partial_rotary_factor (rotary on the first dims, in halves); in the
# others transformers' rope tables would not fit the heads, and the factor is refused
PARTIAL_FAMILIES = ("phi3",)
_PARTS = ("attn.q.weight", "attn.k.weight", "attn.q.bias", "attn.k.bias", "attn.q_norm.weight", "attn.k_norm.weight")


def rotary_dim(cfg: Any, mt: str, head_dim: int, where: str) -> int:
    """The spec's rotary_dim of an HF config: 0 for rotary over the whole head, else int(head_dim * factor) as
    transformers computes it; refused where the family's class would not apply it as layerfold does."""
    top = setting(cfg, "partial_rotary_factor")
    found = {"partial_rotary_factor": top}
    for k in ("rope_parameters", "rope_scaling"):
        if isinstance(setting(cfg, k), dict):
            found[f"{k}.partial_rotary_factor"] = setting(cfg, k).get("partial_rotary_factor")
    found = {k: number(v, k, where) for k, v in found.items() if v is not None}
    partial = {k: v for k, v in found.items() if v != 1.0}
    if not partial:
        return 0
    name, factor = next(iter(partial.items()))
    if mt not in PARTIAL_FAMILIES:
        raise ValueError(f"{where}: {name}={factor:g} rotates only part of each head (Phi-4-mini: 0.75), which "
                         f"transformers' {mt} class does not apply (only {', '.join(PARTIAL_FAMILIES)} does). Fix: "
                         "use a model whose rotary embedding covers the whole head (partial_rotary_factor 1.0 or "
                         "absent), or restore the model's own config.json")
    if top is None or len(set(found.values())) > 1:
        raise ValueError(f"{where}: partial_rotary_factor is given as {found}: transformers 4.x reads only the "
                         "top-level value, 5 the rope entry's, so they would compute different models. Fix: set "
                         "the top-level partial_rotary_factor, and the same value (or none) in the rope entry")
    rot = int(head_dim * factor)
    if rot <= 0 or rot % 2 or factor > 1:
        raise ValueError(f"{where}: partial_rotary_factor={factor:g} of head_dim {head_dim} gives {rot} rotary dims, "
                         "not an even number in 2..head_dim (rotary turns dims in pairs). Fix: restore the model's "
                         "own partial_rotary_factor")
    return 0 if rot == head_dim else rot


def head_permutation(head_dim: int, rot: int) -> Tensor:
    """perm with new dim p = HF dim perm[p] within one head: rotary pair (j, j + rot/2) -> (j, j + hd/2), the
    pass-through dims (rot..hd-1, in order) at rot/2 .. hd/2 - 1 and hd/2 + rot/2 .. hd - 1."""
    rh, rest = rot // 2, head_dim // 2 - rot // 2
    return torch.cat([torch.arange(rh), torch.arange(rot, rot + rest), torch.arange(rh, rot),
                      torch.arange(rot + rest, head_dim)])


def permute_heads(t: Tensor, head_dim: int, rot: int, inverse: bool = False) -> Tensor:
    """``t``'s leading dim (n_heads * head_dim rows, or head_dim for a norm weight) permuted head by head."""
    perm = head_permutation(head_dim, rot)
    if inverse:
        perm = torch.argsort(perm)
    idx = (torch.arange(t.shape[0] // head_dim)[:, None] * head_dim + perm).reshape(-1)
    return t.index_select(0, idx.to(t.device))


def permute_state(state: dict[str, Tensor], spec: Any, inverse: bool = False) -> dict[str, Tensor]:
    """``state`` (layerfold names) with each attention layer's q/k rows, biases and norm weights permuted into the
    layout whole-head rotary computes partial rotary in (``inverse``: back to the HF layout); unchanged without
    spec.rotary_dim."""
    if not spec.rotary_dim:
        return state
    out = dict(state)
    for i, l in enumerate(spec.layers):
        for part in _PARTS if l.has_attn else ():
            name = f"layers.{i}.{part}"
            if name in out:
                out[name] = permute_heads(out[name], l.head_dim, spec.rotary_dim, inverse)
    return out


__all__ = ["PARTIAL_FAMILIES", "head_permutation", "permute_heads", "permute_state", "rotary_dim"]
