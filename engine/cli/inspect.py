"""`layerfold inspect MODEL`: per-layer shapes, parameters and bytes, and the checkpoint's provenance."""

from __future__ import annotations

import argparse
from typing import Any

from layerfold.cli.util import emit
from layerfold.core.console import human_bytes, table
from layerfold.core.loading import load_spec_state
from layerfold.core.spec import ModelSpec


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show per-layer shapes, parameters and bytes of a model",
                       description="Print the ModelSpec of a model layer by layer: residual widths, heads, KV "
                       "heads, head dim, FFN width, block kind, shortcut matrices, parameters and bytes.")
    p.add_argument("model", metavar="MODEL",
                   help="layerfold checkpoint dir, HF model dir, .gguf file, or alias (smollm2-135m)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run)


def describe(spec: ModelSpec, state: dict) -> dict[str, Any]:
    layers = []
    for i, l in enumerate(spec.layers):
        prefix = f"layers.{i}."
        ts = [v for k, v in state.items() if k.startswith(prefix)]
        layers.append({"index": i, "kind": l.kind, "d_in": l.d_in, "d_mid": l.d_mid, "d_out": l.d_out,
                       "n_heads": l.n_heads if l.has_attn else 0, "n_kv_heads": l.n_kv_heads if l.has_attn else 0,
                       "head_dim": l.head_dim if l.has_attn else 0, "d_ffn": l.d_ffn if l.has_mlp else 0,
                       "shortcuts": int(l.attn_shortcut) + int(l.mlp_shortcut),
                       "params": sum(t.numel() for t in ts), "bytes": sum(t.numel() * t.element_size() for t in ts)})
    total = sum(t.numel() for t in state.values())
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    return {"arch": spec.arch, "vocab_size": spec.vocab_size, "d_model": spec.d_model, "n_layers": spec.n_layers,
            "tie_embeddings": spec.tie_embeddings, "params": total, "bytes": nbytes,
            "layer_params": sum(l["params"] for l in layers), "layers": layers}


def run(args: argparse.Namespace) -> int:
    spec, state, cfg = load_spec_state(args.model)
    d = describe(spec, state)
    d["provenance"] = cfg.get("provenance", {})
    rows = [[l["index"], l["kind"], f"{l['d_in']}/{l['d_mid']}/{l['d_out']}", l["n_heads"], l["n_kv_heads"],
             l["head_dim"], l["d_ffn"], l["shortcuts"] or "", f"{l['params'] / 1e6:.2f}M", human_bytes(l["bytes"])]
            for l in d["layers"]]
    head = (f"{args.model}: {spec.arch}, {spec.n_layers} layers, d_model {spec.d_model}, vocab {spec.vocab_size}, "
            f"{'tied' if spec.tie_embeddings else 'untied'} head, {d['params'] / 1e6:.1f}M parameters, "
            f"{human_bytes(d['bytes'])}")
    prov = d["provenance"]
    extra = f"\nprovenance: {prov.get('source_format', '?')} from {prov.get('source', '?')}" + (
        f", method {prov['method']}" if prov.get("method") else "")
    emit(args, d, head + "\n" + table(rows, ["layer", "kind", "d in/mid/out", "heads", "kv", "hd", "ffn",
                                             "shortcuts", "params", "bytes"]) + extra)
    return 0
