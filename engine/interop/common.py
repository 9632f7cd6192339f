"""What every exporter shares: reading the source once, casting, the tokenizer, provenance.

An exporter reads a layerfold checkpoint (or anything ``layerfold.load`` reads) as (spec, state dict,
config), checks the output directory with the one guard (``layerfold.core.paths.check_output``) and
writes through ``atomic_dir``, so a failed export leaves nothing behind and never touches its source.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from layerfold.core.dtypes import parse_dtype
from layerfold.core.paths import OutputError, check_output, json_text
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


# an --out named like a file: the export would be a directory of that name (OUT.gguf/model.gguf)
FILE_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt")


def check_export_out(out: str | Path, sources: list[Any], overwrite: bool) -> Path:
    """The one output guard (``check_output``: never the source, an existing folder only with ``overwrite`` and only
    layerfold's own, a parent that can be written; here only an earlier export, never a checkpoint), and an --out
    named like a file, refused before any work."""
    p = Path(out)
    if p.suffix.lower() in FILE_SUFFIXES and not p.is_dir():
        raise OutputError(f"{p}: --out names a {p.suffix} file, but an export is a directory. Fix: pass a directory, "
                          f"e.g. --out {p.with_suffix('')} (the gguf format writes {p.with_suffix('') / 'model.gguf'})")
    check_output(p, sources=[x for x in sources if x], overwrite=overwrite)
    if overwrite and p.is_dir() and any(p.iterdir()) and not is_export(p):
        raise OutputError(f"{p}: is not an earlier export (layerfold wrote it, but it holds no {PROVENANCE_FILE} with "
                          "an export_format: a checkpoint, say), so --overwrite will not replace it. Fix: choose a new "
                          "--out, or remove that directory yourself")
    return p


def is_export(path: Path) -> bool:
    try:
        return "export_format" in json.loads((path / PROVENANCE_FILE).read_text())
    except (OSError, ValueError, TypeError):
        return False


def check_weights(s: Source, dt: torch.dtype, allow_nonfinite: bool = False) -> None:
    """Refuse, before anything is written, weights that hold NaN or Inf (the export would compute NaN everywhere;
    ``allow_nonfinite``: a warning instead) and weights beyond float16's range when ``dt`` is float16 (the cast would
    make them Inf)."""
    top = torch.finfo(torch.float16).max if dt == torch.float16 else math.inf
    for k, t in s.state.items():
        if not t.is_floating_point() or not t.numel():
            continue
        if not bool(torch.isfinite(t).all()):
            if allow_nonfinite:
                warnings.warn(f"{s.name}: tensor {k!r} holds NaN or Inf; exported anyway (--allow-nonfinite)",
                              stacklevel=2)
                continue
            raise ValueError(f"{s.name}: tensor {k!r} holds NaN or Inf values, so the export would compute NaN. Fix: "
                             "re-create the model from its source (an overflow in pruning or healing, or a damaged "
                             "file), or pass --allow-nonfinite to export it anyway")
        big = float(t.detach().abs().max()) if top < math.inf else 0.0
        if big > top:
            raise ValueError(f"{s.name}: tensor {k!r} holds values up to {big:.4g}, beyond float16's largest number "
                             f"({top:g}): a float16 export would hold Inf there. Fix: export with --dtype bfloat16 "
                             "(float32's range) or float32")


def cast(state: dict[str, Tensor], dt: torch.dtype) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", dt).contiguous() for k, v in state.items()}


def write_provenance(out: Path, src: Source, fmt: str, extra: dict[str, Any] | None = None) -> None:
    prov = {"export_format": fmt, "exported_from": src.name, **src.provenance, **(extra or {})}
    (out / PROVENANCE_FILE).write_text(json_text(prov))


def eos_value(spec: ModelSpec) -> int | list[int] | None:
    ids = list(spec.eos_token_ids)
    return ids if len(ids) > 1 else (ids[0] if ids else None)


__all__ = ["EXPORT_DTYPES", "FILE_SUFFIXES", "PROVENANCE_FILE", "Source", "cast", "check_export_out", "check_weights",
           "eos_value", "export_dtype", "is_export", "read_source", "write_provenance"]
