"""GGUF files for tests, made offline: a copy of a GGUF file with its 2-D weights quantised (Q8_0, Q4_0, ...)."""

from __future__ import annotations

from pathlib import Path

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
