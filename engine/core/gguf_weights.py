"""GGUF tensor names and layouts, and a GGUF file's weights dequantised tensor by tensor into safetensors.

Both directions share one map: ``--format gguf`` (layerfold.interop.gguf_file) writes through it, and a GGUF
given as a model is converted through it. The conversion streams: each tensor is dequantised (numpy, by the
``gguf`` package), put back in layerfold's layout and written to the weights file before the next one is
read, so converting a quantised 70B model needs the memory of its largest tensor, not of the whole model in
float32 (transformers' GGUF reader, used before, dequantised every tensor into memory first: about 32 GB
for an 8B model). The result is float32, which holds every dequantised value exactly.

llama.cpp rotates adjacent pairs of each head for archs llama and deci, transformers (and layerfold) the two
halves, so llama.cpp's converter permutes q and k rows per head for those archs (``permute_rope``); qwen2 and
qwen3 rotate halves as transformers does and are stored as they are; so does phi3, whose fused tensors
(``FUSED``) are read a block of rows at a time: a quantised tensor's rows are whole blocks, so each layerfold
tensor is dequantised from its own rows, never the fused tensor at once.
"""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from layerfold.core.spec import ModelSpec

# layerfold name -> gguf.MODEL_TENSOR member name (the gguf package formats it as blk.{bid}.attn_q etc.)
TENSORS = {
    "embed.weight": "TOKEN_EMBD", "norm.weight": "OUTPUT_NORM", "lm_head.weight": "OUTPUT",
    "layers.{i}.attn_norm.weight": "ATTN_NORM", "layers.{i}.attn.q.weight": "ATTN_Q",
    "layers.{i}.attn.k.weight": "ATTN_K", "layers.{i}.attn.v.weight": "ATTN_V",
    "layers.{i}.attn.o.weight": "ATTN_OUT", "layers.{i}.mlp_norm.weight": "FFN_NORM",
    "layers.{i}.mlp.gate.weight": "FFN_GATE", "layers.{i}.mlp.up.weight": "FFN_UP",
    "layers.{i}.mlp.down.weight": "FFN_DOWN",
    "layers.{i}.attn.q.bias": "ATTN_Q", "layers.{i}.attn.k.bias": "ATTN_K", "layers.{i}.attn.v.bias": "ATTN_V",
    "layers.{i}.attn.q_norm.weight": "ATTN_Q_NORM", "layers.{i}.attn.k_norm.weight": "ATTN_K_NORM",
}
# GGUF tensors holding several layerfold tensors, per arch: gguf.MODEL_TENSOR member -> the layerfold names in row
# order, each with the LayerSpec size giving its rows. llama.cpp's phi3 keeps HF's qkv_proj as attn_qkv and its
# gate_up_proj as ffn_up (gate rows first: its graph applies SiLU to the first half; so does transformers' Phi3MLP)
FUSED: dict[str, dict[str, tuple[tuple[str, str], ...]]] = {"phi3": {
    "ATTN_QKV": (("attn.q.weight", "q_dim"), ("attn.k.weight", "kv_dim"), ("attn.v.weight", "kv_dim")),
    "FFN_UP": (("mlp.gate.weight", "d_ffn"), ("mlp.up.weight", "d_ffn")),
}}
PAIRED = ("llama", "deci")  # the archs that rotate adjacent pairs: their q and k rows are permuted
# read as the spec's rope scaling (core.gguf_rope), not weights: Llama-3's divisors, phi3's longrope factors
# rows of each head that partial rotary permutes (core.partial_rotary; the file holds them as transformers does)
ROTATED = ("attn.q.weight", "attn.k.weight", "attn.q.bias", "attn.k.bias", "attn.q_norm.weight", "attn.k_norm.weight")
SKIPPED = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def gguf_name(name: str) -> str:
    """The GGUF tensor name of layerfold tensor ``name``."""
    import gguf

    parts = name.split(".")
    key, bid = name, None
    if parts[0] == "layers":
        key, bid = ".".join(["layers", "{i}", *parts[2:]]), int(parts[1])
    member = TENSORS.get(key)
    if member is None:
        raise ValueError(f"tensor {name!r} has no GGUF name. Fix: export a model without it (see docs/INTEROP.md)")
    base = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[member]]
    return (base.format(bid=bid) if bid is not None else base) + (".bias" if name.endswith(".bias") else ".weight")


def layerfold_names(n_layers: int) -> dict[str, str]:
    """GGUF tensor name -> layerfold name, for a model of ``n_layers`` layers."""
    back = {}
    for lf in TENSORS:
        for i in range(n_layers) if "{i}" in lf else (None,):
            name = lf if i is None else lf.replace("{i}", str(i))
            back[gguf_name(name)] = name
    return back


def gguf_parts(arch: str, spec: ModelSpec) -> dict[str, list[tuple[str, tuple[int, int] | None]]]:
    """GGUF tensor name -> the layerfold tensors it holds, each with its rows (first, end), or None: all of it."""
    import gguf

    out: dict[str, list[tuple[str, tuple[int, int] | None]]] = \
        {g: [(lf, None)] for g, lf in layerfold_names(spec.n_layers).items()}
    for member, parts in FUSED.get(arch, {}).items():
        for i, layer in enumerate(spec.layers):
            start, blocks = 0, []
            for lf, size in parts:
                blocks.append((f"layers.{i}.{lf}", (start, start + getattr(layer, size))))
                start += getattr(layer, size)
            out[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[member]].format(bid=i) + ".weight"] = blocks
    return out


def permute_rope(w: Tensor, n_heads: int) -> Tensor:
    """HF rotate-half rows -> llama.cpp adjacent-pair rows, per head (n_heads: KV heads for k)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope(w: Tensor, n_heads: int) -> Tensor:
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantized(t: Any, name: str, spec: ModelSpec, arch: str) -> Tensor:
    """One GGUF tensor (a gguf.ReaderTensor) as a float32 tensor of its own (writable) in layerfold's layout."""
    return _layout(_float32(t, [int(x) for x in reversed(t.shape)]), name, spec, arch).clone()


def write_gguf_weights(path: str | Path, spec: ModelSpec, arch: str, out_file: str | Path) -> dict[str, list[int]]:
    """Dequantise every weight of the GGUF at ``path`` (a model of ``spec``; its general.architecture ``arch``)
    into the safetensors file ``out_file``, float32, one tensor in memory at a time. Every tensor must be one
    ``spec`` has, of its shape, and every tensor ``spec`` needs must be there; else a ValueError names it
    before anything is written. Returns {name: shape}."""
    from gguf import GGUFReader

    from layerfold.core.model import expected_shapes

    r = GGUFReader(str(path))
    parts, want = gguf_parts(arch, spec), expected_shapes(spec)
    plan: list[tuple[str, Any, list[int], tuple[int, int] | None]] = []
    for t in r.tensors:
        if t.name in SKIPPED:
            continue
        shape = [int(x) for x in reversed(t.shape)]
        blocks = [(n, rows) for n, rows in parts.get(t.name, []) if n in want]
        if not blocks or len(blocks) != len(parts[t.name]):
            raise ValueError(f"{path}: tensor {t.name!r} is not one a {arch} model of this shape has. Fix: convert "
                             "the model from its HF directory, or open an issue with the file's name")
        whole = blocks[0][1] is None  # (else a fused tensor: its parts' rows follow one another, from 0)
        expect = list(want[blocks[0][0]]) if whole else [blocks[-1][1][1], *want[blocks[0][0]][1:]]
        if shape != expect:
            raise ValueError(f"{path}: tensor {t.name!r} has shape {shape}, the metadata says {expect}. Fix: "
                             "download the file again (it does not match its own header)")
        plan += [(name, t, list(want[name]), rows) for name, rows in blocks]
    names = [n for n, _, _, _ in plan]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"{path}: more than one tensor holds {twice[:4]} (a fused tensor and its parts?). Fix: "
                         "convert the model from its HF directory, or open an issue with the file's name")
    missing = sorted(set(want) - set(names))
    if missing:
        raise ValueError(f"{path}: the file lacks tensor(s) {missing[:4]} that its metadata implies. Fix: download "
                         "the file again, or convert the model from its HF directory")
    plan.sort(key=lambda p: p[0])
    offsets, start = {}, 0
    for name, _, shape, _ in plan:
        n = 4 * int(np.prod(shape, dtype=np.int64))
        offsets[name] = {"dtype": "F32", "shape": shape, "data_offsets": [start, start + n]}
        start += n
    header = json.dumps({"__metadata__": {"format": "pt"}, **offsets}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
    with open(out_file, "wb") as f, open(path, "rb") as src:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for name, t, shape, rows in plan:
            x = _float32(t, shape, src, rows)
            f.write(_layout(x, name, spec, arch).numpy().data)  # (no copy of the bytes)
    return {name: shape for name, _, shape, _ in plan}


def _float32(t: Any, shape: list[int], src: Any = None, rows: tuple[int, int] | None = None) -> Tensor:
    """The tensor's values (its ``rows`` only, when given: ``shape`` is theirs) as float32. From ``src`` (the file,
    open) its bytes are read into memory of their own, so that the pages of the file the reader maps never count in
    this process's memory; else from the map."""
    import gguf

    data = t.data
    if rows is not None:  # a row of a 2-D tensor is whole quantisation blocks: its bytes stand alone
        row_bytes = int(t.n_bytes) // data.shape[0]
        src.seek(int(t.data_offset) + rows[0] * row_bytes)
        n = rows[1] - rows[0]
        data = np.frombuffer(src.read(n * row_bytes), dtype=np.uint8).view(data.dtype).reshape(n, *data.shape[1:])
    elif src is not None:
        src.seek(int(t.data_offset))
        data = np.frombuffer(src.read(int(t.n_bytes)), dtype=np.uint8).view(data.dtype).reshape(data.shape)
    arr = np.ascontiguousarray(gguf.dequantize(data, t.tensor_type), dtype=np.float32).reshape(shape)
    with warnings.catch_warnings():  # (a read-only buffer: only read, never written)
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def _layout(x: Tensor, name: str, spec: ModelSpec, arch: str) -> Tensor:
    """``x`` in layerfold's layout: q and k rows back from llama.cpp's adjacent pairs for the paired archs; with
    partial rotary (phi3's rope.dimension_count below the head size: halves of the first dims, as transformers)
    each head's q/k rows in whole-head rotary's layout (core.partial_rotary)."""
    if arch in PAIRED and (name.endswith("attn.q.weight") or name.endswith("attn.k.weight")):
        layer = spec.layers[int(name.split(".")[1])]
        x = unpermute_rope(x, layer.n_heads if ".q." in name else layer.n_kv_heads).contiguous()
    if spec.rotary_dim and name.endswith(ROTATED):
        from layerfold.core.partial_rotary import permute_heads

        x = permute_heads(x, spec.layers[int(name.split(".")[1])].head_dim, spec.rotary_dim).contiguous()
    return x


__all__ = ["FUSED", "PAIRED", "SKIPPED", "TENSORS", "dequantized", "gguf_name", "gguf_parts", "layerfold_names",
           "permute_rope", "unpermute_rope", "write_gguf_weights"]
