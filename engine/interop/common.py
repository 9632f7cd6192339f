"""What every exporter shares: reading the source once, casting, the tokenizer, provenance.

An exporter reads a layerfold checkpoint (or anything ``layerfold.load`` reads) as (spec, state dict,
config), checks the output directory with the one guard (``layerfold.core.paths.check_output``) and
writes through ``atomic_dir``, so a failed export leaves nothing behind and never touches its source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from layerfold.core.dtypes import parse_dtype
from layerfold.core.paths import json_text
from layerfold.core.spec import ModelSpec

# every export directory holds this file: it records where the model came from and marks the directory as
# layerfold's own output (so --overwrite may replace it)
PROVENANCE_FILE = "layerfold_provenance.json"
EXPORT_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class Source:
    """A model read for export: its spec, its (mmap'd) weights in layerfold names, and where it came from."""

    name: str  # as the user gave it
    path: Path  # what layerfold reads (aliases and GGUF files map to their cached conversion)
    spec: ModelSpec
    state: dict[str, Tensor]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def provenance(self) -> dict[str, Any]:
        prov = self.config.get("provenance", {}) if isinstance(self.config, dict) else {}
        return prov if isinstance(prov, dict) else {}

    @property
    def has_tokenizer(self) -> bool:
        return self.path.is_dir() and any((self.path / f).is_file() for f in (
            "tokenizer.json", "tokenizer.model", "tokenizer_config.json"))

    def tokenizer(self) -> Any:
        from layerfold.core.loading import load_tokenizer

        return load_tokenizer(self.path) if self.has_tokenizer else None


def read_source(src: str | Path) -> Source:
    from layerfold.core.loading import load_spec_state, resolve

    path = resolve(src, quiet=True)
    spec, state, cfg = load_spec_state(path, quiet=True)
    return Source(str(src), Path(path), spec, dict(state), cfg if isinstance(cfg, dict) else {})


def export_dtype(state: dict[str, Tensor], dtype: str | None) -> torch.dtype:
    """The dtype the export writes: ``dtype`` (float32 | float16 | bfloat16) or the source's own."""
    if dtype is None:
        first = next((t for t in state.values() if t.is_floating_point()), None)
        dt = first.dtype if first is not None else torch.float32
    else:
        dt = parse_dtype(dtype)
    name = str(dt).removeprefix("torch.")
    if name not in EXPORT_DTYPES:
        raise ValueError(f"cannot export {name} weights. Fix: pass --dtype with one of {', '.join(EXPORT_DTYPES)} "
                         "(quantise the export with the target's own tools, e.g. llama.cpp's llama-quantize)")
    return dt


def cast(state: dict[str, Tensor], dt: torch.dtype) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", dt).contiguous() for k, v in state.items()}


def write_provenance(out: Path, src: Source, fmt: str, extra: dict[str, Any] | None = None) -> None:
    prov = {"export_format": fmt, "exported_from": src.name, **src.provenance, **(extra or {})}
    (out / PROVENANCE_FILE).write_text(json_text(prov))


def eos_value(spec: ModelSpec) -> int | list[int] | None:
    ids = list(spec.eos_token_ids)
    return ids if len(ids) > 1 else (ids[0] if ids else None)


__all__ = ["EXPORT_DTYPES", "PROVENANCE_FILE", "Source", "cast", "eos_value", "export_dtype", "read_source",
           "write_provenance"]
