"""``export --verify``: load the written export back and compare its logits with layerfold's forward.

- hf: ``transformers.AutoModelForCausalLM.from_pretrained(out)``, no custom code;
- gguf, arch llama with plain rotary embeddings: transformers' GGUF reader
  (``from_pretrained(out, gguf_file="model.gguf")``), which also undoes the q/k permutation independently;
- decilm and the other GGUF files: the files read back into a layerfold model (``read_decilm``,
  ``read_gguf_export``). That checks what was written against what layerfold means by it; the tests check
  the formats' meaning against independent readers (a vLLM-semantics DeciLM reference, transformers, gguf).

A longrope model with a short original context (below ``LONGROPE_CHECK_MAX``) also gets a prompt one token past
it (its long factors). Both sides run in float32 on the export's own (rounded) weights, so the difference is
arithmetic only; above ``tol`` (relative to the largest reference logit) verification fails loudly.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from layerfold.core.gguf_rope import gguf_rope
from layerfold.core.model import build_model, rope_inv_freq
from layerfold.core.paths import json_text
from layerfold.interop.common import PROVENANCE_FILE, Source

PROMPTS = ("The capital of France is", "def fibonacci(n):\n    ", "Pruned models are")
TOL = 1e-4


# longrope: a random prompt one token past the original context too (the long factors), where that is this short
LONGROPE_CHECK_MAX = 1024


def prompt_ids(s: Source, n_random: int = 3) -> list[Tensor]:
    tok = s.tokenizer()
    g = torch.Generator().manual_seed(0)
    if tok is not None:
        out = [torch.tensor([tok(p, add_special_tokens=False)["input_ids"]]) for p in PROMPTS]
    else:
        out = [torch.randint(0, s.spec.vocab_size, (1, 9 + 4 * i), generator=g) for i in range(n_random)]
    orig = s.spec.rope_original_max_pos
    if s.spec.rope_type == "longrope" and orig < min(LONGROPE_CHECK_MAX, s.spec.max_position):
        out.append(torch.randint(0, s.spec.vocab_size, (1, orig + 1), generator=g))
    return out


@torch.inference_mode()
def _reference(s: Source, dt: torch.dtype, ids: list[Tensor]) -> list[Tensor]:
    state = {k: v.to(dt).to(torch.float32) for k, v in s.state.items()}
    m = build_model(s.spec, state, dtype=torch.float32).eval()
    return [m(x)[0] for x in ids]


@torch.inference_mode()
def _exported(fmt: str, out: Path, s: Source, ids: list[Tensor]) -> tuple[list[Tensor], str]:
    if fmt == "hf" or (fmt == "gguf" and _gguf_via_transformers(out, s)):
        from transformers import AutoModelForCausalLM

        logging.getLogger("transformers").setLevel(logging.ERROR)
        kw: dict[str, Any] = {"gguf_file": "model.gguf"} if fmt == "gguf" else {}
        hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, **kw).eval()
        how = "transformers AutoModelForCausalLM" + (" (GGUF reader)" if fmt == "gguf" else "")
        return [hf(x).logits[0] for x in ids], how
    if fmt == "decilm":
        from layerfold.interop.decilm import read_decilm

        spec, state = read_decilm(out)
        how = "config.json block_configs + safetensors read back"
    else:
        from layerfold.interop.gguf_file import FILE_NAME, gguf_rope_inv_freq, read_gguf_export

        spec, state, arch = read_gguf_export(out / FILE_NAME)
        # rope scaling travels as GGUF keys / a rope_freqs tensor: read as layerfold's GGUF import reads it, and
        # (but for YaRN, whose ramp llama.cpp computes itself) the frequencies llama.cpp's formula gives from them
        spec = gguf_rope(out / FILE_NAME, spec)
        hd = next(l.head_dim for l in s.spec.layers if l.has_attn)
        got, want = gguf_rope_inv_freq(out / FILE_NAME), rope_inv_freq(s.spec, hd).double()
        if spec.rope_type != "yarn" and (got.shape != want.shape or not torch.allclose(got, want, rtol=1e-5, atol=0)):
            raise ValueError(f"llama.cpp's rotary frequencies from the file ({got.tolist()}) are not the model's "
                             f"({want.tolist()})")
        how = f"GGUF ({arch}) read back with gguf.GGUFReader"
    m = build_model(spec, state, dtype=torch.float32).eval()
    return [m(x)[0] for x in ids], how


def _gguf_via_transformers(out: Path, s: Source) -> bool:
    """Whether transformers' GGUF reader reads the export right: plain rotary embeddings (it drops rope scaling),
    and not arch qwen3, whose head size it takes from its Qwen3 default (128), not the file's key_length."""
    from layerfold.interop.formats import gguf_arch

    return s.spec.uniform and s.spec.rope_type == "default" and gguf_arch(s.spec) != "qwen3"


def verify_export(fmt: str, out: str | Path, s: Source, dt: torch.dtype, tol: float = TOL) -> dict[str, Any]:
    """Compare the export at ``out`` with layerfold's forward of ``s`` (weights rounded to ``dt``).

    Returns {"max_abs_diff", "max_rel_diff", "tol", "prompts", "tokens", "reader"}; raises ValueError above tol."""
    out = Path(out)
    ids = prompt_ids(s)
    want = _reference(s, dt, ids)
    keep = (f"The export is left at {out} for inspection, marked as failed in its {PROVENANCE_FILE}. Fix: report this "
            "with the model's config.json (a format mismatch), and do not ship this export")
    try:
        got, how = _exported(fmt, out, s, ids)
    except Exception as e:  # transformers or the format's reader cannot read what was written: that fails too
        raise _record(out, f"export verification failed: the export could not be read back ({type(e).__name__}: "
                           f"{str(e)[:300]}). {keep}") from None
    diff = max(float((a - b).abs().max()) for a, b in zip(got, want, strict=True))
    scale = max(float(b.abs().max()) for b in want)
    rel = diff / max(scale, 1e-30)
    res = {"max_abs_diff": diff, "max_rel_diff": rel, "tol": tol, "prompts": len(ids),
           "tokens": sum(int(x.numel()) for x in ids), "reader": how}
    if not rel <= tol:
        raise _record(out, f"export verification failed: {how} gives logits up to {diff:.3g} away from layerfold's "
                           f"({rel:.3g} of the largest logit {scale:.3g}; tolerance {tol:g}). {keep}")
    _record(out, "", res)
    return res


def _record(out: Path, error: str, res: dict[str, Any] | None = None) -> ValueError:
    """Write the outcome into the export's provenance file (a failed export must not pass for a verified one);
    returns the error to raise when there is one."""
    f = out / PROVENANCE_FILE
    try:
        prov = json.loads(f.read_text())
        prov["verify"] = {"passed": True, **res} if res is not None else {"passed": False, "error": error}
        f.write_text(json_text(prov))
    except (OSError, ValueError, TypeError):
        pass  # the error itself still says it all
    return ValueError(error)


__all__ = ["PROMPTS", "TOL", "verify_export"]
