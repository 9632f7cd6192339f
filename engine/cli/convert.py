"""`layerfold convert SRC --out DIR`: HF dir, GGUF file or alias -> layerfold checkpoint."""

from __future__ import annotations

import argparse
import time

import torch

from layerfold.cli.util import add_dtype, emit
from layerfold.core.checkpoint import save_checkpoint
from layerfold.core.dtypes import parse_dtype
from layerfold.core.loading import load_spec_state, load_tokenizer, resolve, source_kind
from layerfold.core.paths import check_output


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert an HF model dir, a GGUF file or an alias to a layerfold checkpoint",
                       description="Convert a model to the layerfold checkpoint format (config.json with the "
                       "ModelSpec and provenance, model.safetensors loaded by mmap, tokenizer files).")
    p.add_argument("src", metavar="SRC", help="HF model directory (safetensors), .gguf file, or alias (smollm2-135m)")
    p.add_argument("--out", required=True, help="output checkpoint directory (must not exist, unless --overwrite)")
    add_dtype(p, default=None, help="store weights in this dtype (GGUF dequantises to float32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory (atomically)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run)


def convert(src: str, out: str, *, dtype: torch.dtype | None = None, overwrite: bool = False) -> dict:
    t0 = time.perf_counter()
    kind = source_kind(src)
    check_output(out, sources=[src], overwrite=overwrite)  # before a GGUF's slow dequantisation, not after
    path = resolve(src, quiet=False)
    spec, state, cfg = load_spec_state(path, quiet=True)
    tokenizer = load_tokenizer(path)  # a missing tokenizer is refused before the weights are cast
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    prov = dict(cfg.get("provenance", {}))
    prov.update(source=str(src), source_format=kind)
    save_checkpoint(out, spec, state, tokenizer=tokenizer, provenance=prov, sources=[src, path], overwrite=overwrite)
    n = sum(v.numel() for v in state.values())
    return {"out": str(out), "source": str(src), "source_format": kind, "layers": spec.n_layers, "params": n,
            "seconds": round(time.perf_counter() - t0, 2)}


def run(args: argparse.Namespace) -> int:
    res = convert(args.src, args.out, dtype=parse_dtype(args.dtype) if args.dtype else None, overwrite=args.overwrite)
    emit(args, res, f"wrote {res['out']}: {res['layers']} layers, {res['params'] / 1e6:.1f}M parameters "
                    f"from {res['source_format']} in {res['seconds']} s")
    return 0
