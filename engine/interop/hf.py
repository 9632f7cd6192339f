"""``--format hf``: a vanilla Hugging Face transformers model directory (no custom code).

Only a model whose layers are all the same plain decoder layer fits an HF config, which holds one shape
for every layer: depth pruning by dropping or merging, Streamline with ``--replacement decoder``, and
constant-width global-basis SliceGPT (``--basis global --slice-ends``). config.json comes from
``layerfold.core.arch.hf_config_from_spec`` and the weights are renamed by the one key map there; the
tokenizer is written so that every supported transformers version (>= 4.56) loads it
(``layerfold.core.checkpoint.save_tokenizer``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from layerfold.core.arch import hf_config_from_spec, state_to_hf
from layerfold.core.checkpoint import save_tokenizer
from layerfold.core.dtypes import dtype_name
from layerfold.core.paths import atomic_dir, check_output
from layerfold.interop.common import Source, cast, eos_value, export_dtype, read_source, write_provenance
from layerfold.interop.formats import check_format


def export_hf(src: str | Path | Source, out: str | Path, *, dtype: str | None = None, overwrite: bool = False
              ) -> dict[str, Any]:
    """Write ``src`` as an HF model directory that ``AutoModelForCausalLM.from_pretrained(out)`` loads.

    Returns {"out", "format", "architecture", "layers", "params", "dtype", "tokenizer"}."""
    s = src if isinstance(src, Source) else read_source(src)
    out = check_output(out, sources=[s.name, s.path], overwrite=overwrite)
    check_format(s.spec, "hf", f"{s.name}")
    hf_cfg = hf_config_from_spec(s.spec)
    dt = export_dtype(s.state, dtype)
    tensors = cast(state_to_hf(s.state, s.spec), dt)
    hf_cfg["torch_dtype"] = dtype_name(dt)
    tokenizer = s.tokenizer()
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        write_generation_config(tmp, s)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        write_provenance(tmp, s, "hf")
    return {"out": str(out), "format": "hf", "architecture": hf_cfg["architectures"][0], "layers": s.spec.n_layers,
            "params": sum(int(v.numel()) for v in tensors.values()), "dtype": hf_cfg["torch_dtype"],
            "tokenizer": tokenizer is not None}


def write_generation_config(out: Path, s: Source) -> None:
    gen = {k: v for k, v in (("bos_token_id", s.spec.bos_token_id), ("eos_token_id", eos_value(s.spec)))
           if v is not None}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))


__all__ = ["export_hf", "write_generation_config"]
