"""``export``: one entry point for every format (``layerfold export MODEL --format F --out DIR``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from layerfold.interop.common import check_export_out, export_dtype, read_source
from layerfold.interop.formats import FORMATS
from layerfold.interop.gguf_file import quant_dtype

# --verify of a Q8_0 file: the largest logit difference it may have from the float16 model, relative to the
# largest logit (Q8_0 rounds each weight to 1/254 of its block's largest; tests/interop/test_gguf_quant.py)
QUANT_TOL = 5e-2


def export(src: str | Path, out: str | Path, *, format: str = "hf", dtype: str | None = None, verify: bool = False,
           overwrite: bool = False, allow_nonfinite: bool = False) -> dict[str, Any]:
    """Write ``src`` (a layerfold checkpoint or anything ``layerfold.load`` reads) to ``out`` in ``format``
    (hf | decilm | gguf); with ``verify``, load the export back and compare logits (``layerfold.interop.verify``).
    Weights holding NaN or Inf are refused unless ``allow_nonfinite``.

    Returns what the format's exporter reports, plus "verify" when asked."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}. Fix: use one of {', '.join(FORMATS)}")
    quant = quant_dtype(dtype)
    if quant and format != "gguf":
        raise ValueError(f"dtype {dtype!r} is a GGUF quantisation; the {format} format holds float weights. Fix: use "
                         "--format gguf, or --dtype float16 / bfloat16 / float32")
    check_export_out(out, [src], overwrite)  # before a GGUF source's slow conversion, not after
    s = read_source(src)
    if format == "hf":
        from layerfold.interop.hf import export_hf as fn
    elif format == "decilm":
        from layerfold.interop.decilm import export_decilm as fn
    else:
        from layerfold.interop.gguf_file import export_gguf as fn
    info = fn(s, out, dtype=dtype, overwrite=overwrite, allow_nonfinite=allow_nonfinite)
    if verify:
        from layerfold.interop.verify import verify_export

        # a quantised file against the float16 model it was made from, within what Q8_0's rounding moves the logits
        info["verify"] = verify_export(format, Path(info["out"]), s, torch.float16, tol=QUANT_TOL) if quant else \
            verify_export(format, Path(info["out"]), s, export_dtype(s.state, dtype))
    return info


__all__ = ["export"]
