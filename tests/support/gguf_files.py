"""GGUF files for tests, made offline: a copy of a GGUF file with its 2-D weights quantised (Q8_0, Q4_0, ...), and a
small file of arch llama with given metadata keys (rope settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def quantized_copy(src: Path, dst: Path, qtype: str = "Q8_0") -> Path:
    """``src`` with every 2-D float tensor whose rows fit the quantisation's blocks stored as ``qtype``, the rest
    (norm gains, odd widths) as they are; metadata copied key by key."""
    import gguf

    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, f.contents(), vtype, sub_type=sub)
    q = gguf.GGMLQuantizationType[qtype]
    block = gguf.GGML_QUANT_SIZES[q][0]
    for t in r.tensors:
        shape = [int(x) for x in reversed(t.shape)]
        arr = np.array(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if arr.ndim == 2 and shape[-1] % block == 0 and t.name != "rope_freqs.weight":
            w.add_tensor(t.name, gguf.quants.quantize(arr, q), raw_dtype=q)
        else:
            w.add_tensor(t.name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def keys_file(path: Path, keys: dict[str, Any], tensors: dict[str, np.ndarray] | None = None) -> Path:
    """A GGUF file of arch llama holding ``keys`` (full names; str, int as uint32, float as float32) and
    ``tensors`` (default: one small token_embd.weight)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    for k, v in keys.items():
        (w.add_string if isinstance(v, str) else w.add_uint32 if isinstance(v, int) else w.add_float32)(k, v)
    for name, arr in (tensors or {"token_embd.weight": np.zeros((2, 2), dtype=np.float32)}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
