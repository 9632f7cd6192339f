"""`layerfold export DIR --format hf --out HFDIR`: a layerfold checkpoint as a vanilla HF model directory.

Only models whose layers are all the same plain decoder layer (depth pruning by dropping or merging)
fit an HF config, which holds one shape for every layer. Anything else gets the reason and what to do.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from layerfold.cli.util import add_common, add_dtype, emit
from layerfold.core.paths import atomic_dir, check_output

FORMATS = ("hf",)


def export_hf(src: str | Path, out: str | Path, *, dtype: str | None = None, overwrite: bool = False
              ) -> dict[str, Any]:
    """Write ``src`` (a layerfold checkpoint, or anything ``layerfold.load`` reads) as an HF model directory.

    config.json from ``hf_config_from_spec``, model.safetensors from ``state_to_hf`` (HF names),
    tokenizer files when the source has them. Atomic: written to a temporary sibling, then renamed."""
    from safetensors.torch import save_file

    from layerfold.core.arch import hf_config_from_spec, state_to_hf
    from layerfold.core.dtypes import parse_dtype
    from layerfold.core.loading import load_spec_state, load_tokenizer, resolve

    src_path = resolve(src, quiet=True)
    spec, state, cfg = load_spec_state(src_path, quiet=True)
    out = check_output(out, sources=[str(src), src_path], overwrite=overwrite)
    try:
        hf_cfg = hf_config_from_spec(spec)
    except ValueError as e:
        raise ValueError(_explain(spec, str(e))) from None
    tensors = state_to_hf(dict(state), spec)
    if dtype is not None:
        dt = parse_dtype(dtype)
        tensors = {k: v.to(dt) for k, v in tensors.items()}
        hf_cfg["torch_dtype"] = str(dt).removeprefix("torch.")
    else:
        first = next(iter(tensors.values()))
        hf_cfg["torch_dtype"] = str(first.dtype).removeprefix("torch.")
    prov = cfg.get("provenance", {}) if isinstance(cfg, dict) else {}
    tokenizer = False
    with atomic_dir(out) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        gen = {k: v for k, v in (("bos_token_id", spec.bos_token_id), ("eos_token_id", hf_cfg["eos_token_id"]))
               if v is not None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if _has_tokenizer(src_path):
            load_tokenizer(src_path).save_pretrained(str(tmp))
            tokenizer = True
        (tmp / "layerfold_provenance.json").write_text(json.dumps(prov, indent=2, default=str))
    return {"out": str(out), "format": "hf", "architecture": hf_cfg["architectures"][0],
            "layers": spec.n_layers, "params": sum(int(v.numel()) for v in tensors.values()),
            "dtype": hf_cfg["torch_dtype"], "tokenizer": tokenizer}


def _has_tokenizer(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model",
                                                                "tokenizer_config.json"))


def _explain(spec: Any, msg: str) -> str:
    mlp = [i for i, l in enumerate(spec.layers) if l.kind == "mlp"]
    if mlp:
        return (f"layer {mlp[0]} is an LLM-Streamline MLP replacement block (no attention): an HF Llama config "
                "cannot express it, so no vanilla HF checkpoint exists for this model. Fix: prune with "
                "`--method streamline --replacement decoder` (the replacement is then an ordinary decoder layer and "
                "the model exports), or keep this checkpoint and serve it with `layerfold serve`")
    return msg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a checkpoint in another format (hf: vanilla transformers directory)",
                       description="Export a layerfold checkpoint as a vanilla HF transformers model directory "
                                   "(AutoModelForCausalLM loads it with no custom code). Works for models whose "
                                   "layers are all the same plain decoder layer, e.g. depth-pruned by shortgpt, "
                                   "laco, slm, or streamline --replacement decoder.")
    p.add_argument("model", metavar="DIR", help="layerfold checkpoint directory (or any model layerfold loads)")
    p.add_argument("--format", choices=FORMATS, default="hf", help="output format (default hf)")
    p.add_argument("--out", required=True, help="output directory")
    add_dtype(p, default=None, help="cast the weights")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (never the source)")
    add_common(p, model=False, dtype=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    info = export_hf(args.model, args.out, dtype=args.dtype, overwrite=args.overwrite)
    emit(args, info, f"exported {info['layers']}-layer {info['architecture']} ({info['params'] / 1e6:.1f}M params, "
                     f"{info['dtype']}) to {info['out']}" + ("" if info["tokenizer"] else " (no tokenizer in the "
                                                                                          "source)"))
    return 0
