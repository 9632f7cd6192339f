"""`layerfold export MODEL --format hf|decilm|gguf --out DIR [--verify]`: a checkpoint in another format.

The work is in layerfold.interop.export; docs/INTEROP.md says which pruned models each format carries.
"""

from __future__ import annotations

import argparse

from layerfold.cli.util import add_common, emit
from layerfold.core.dtypes import CANONICAL, DTYPES
from layerfold.interop.formats import FORMATS
from layerfold.interop.gguf_file import QUANT_DTYPES

DESCRIPTION = """\
Export a checkpoint for other runtimes:
  hf      plain transformers directory (AutoModelForCausalLM, no custom code): models whose layers are all
          alike (shortgpt, laco, slm, streamline --replacement decoder, slicegpt --basis global --slice-ends)
  decilm  DeciLM / Nemotron-NAS block_configs directory for vLLM (`vllm serve DIR --trust-remote-code`):
          also per-layer FFN widths and KV heads, MLP replacement blocks, attention-only layers
  gguf    DIR/model.gguf for llama.cpp: arch llama (uniform) or deci (per-layer shapes); f32/f16/bf16 or
          q8_0; other quantisations: llama.cpp's llama-quantize on an f16 export
A model a format cannot carry gets the reason and the formats that can."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a checkpoint as hf, decilm (vLLM) or gguf (llama.cpp)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="layerfold checkpoint directory (or any model layerfold loads)")
    p.add_argument("--format", choices=FORMATS, default="hf", help="output format (default hf)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--verify", action="store_true",
                   help="load the export back and compare its logits with layerfold's on a few prompts (fails "
                        "above 1e-4 of the largest logit)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES) + list(QUANT_DTYPES),
                   metavar="{" + ",".join((*CANONICAL, *QUANT_DTYPES)) + "}",
                   help="weight dtype of the export (float32, float16, bfloat16; q8_0 for gguf: 2-D weights in "
                        "Q8_0 blocks, the rest float16); default as stored")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (never the source)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="export weights that hold NaN or Inf (a warning instead of an error)")
    add_common(p, model=False, dtype=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from layerfold.interop.export import export

    info = export(args.model, args.out, format=args.format, dtype=args.dtype, verify=args.verify,
                  overwrite=args.overwrite, allow_nonfinite=args.allow_nonfinite)
    arch = info["architecture"]
    text = (f"exported {info['layers']}-layer {arch} ({info['params'] / 1e6:.1f}M params, {info['dtype']}) as "
            f"{info['format']} to {info['out']}" + ("" if info["tokenizer"] else " (no tokenizer)"))
    if "note" in info:
        text += f"\nnote: {info['note']}"
    if "serve" in info:
        text += f"\nserve it: {info['serve']}"
    if "run" in info:
        text += f"\nrun it: {info['run']}"
    v = info.get("verify")
    if v:
        text += (f"\nverified with {v['reader']}: max |logit difference| {v['max_abs_diff']:.2e} "
                 f"({v['max_rel_diff']:.2e} of the largest logit) on {v['prompts']} prompts")
    emit(args, info, text)
    return 0
