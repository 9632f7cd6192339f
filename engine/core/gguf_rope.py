"""The rotary scaling a GGUF file holds, read into the spec (transformers' GGUF reader drops it).

llama.cpp keeps rope scaling in two places: ``{arch}.rope.scaling.type`` / ``.factor`` /
``.original_context_length`` (linear and YaRN), and a ``rope_freqs`` tensor of per-frequency divisors (the
Llama-3 scaling of Llama 3.1, 3.2 and 3.3, which its converter bakes into that tensor and names nowhere).
transformers builds the model from the file's other keys, so without this a Llama-3.2 GGUF would run with
plain rotary embeddings: different logits at every position, silently. The Llama-3 settings are found by
recomputing the tensor from candidate settings (the four numbers are not stored), and a tensor no candidate
reproduces is refused rather than approximated.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from layerfold.core.spec import ModelSpec

# Llama-3 candidates, the released models' settings first (factor 8 or 32, low 1, high 4, 8192 positions); the
# divisors fix the ramp's two ends only (orig / low and orig / high), so any candidate that reproduces them all
# is the same rotary embedding
LOW_FREQ = (1.0, 2.0, 0.5)
HIGH_FREQ = (4.0, 2.0, 8.0)
ORIGINAL_CONTEXT = (8192,) + tuple(2 ** k for k in range(4, 21) if k != 13)
# yarn settings llama.cpp files may carry that layerfold does not map to HF's parameters
YARN_UNMAPPED = ("attn_factor", "yarn_attn_factor")  # (and a non-zero yarn_log_multiplier: DeepSeek's)


def _field(fields: Any, key: str) -> Any:
    f = fields.get(key)
    return None if f is None else f.contents()


def gguf_rope(path: str | Path, spec: ModelSpec) -> ModelSpec:
    """``spec`` (from transformers' reading of the GGUF at ``path``) with the file's rope scaling; a scaling
    layerfold cannot express exactly is a ValueError naming it."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    arch = _field(r.fields, "general.architecture")
    key = lambda k: _field(r.fields, f"{arch}.rope.scaling.{k}")  # noqa: E731
    # llama.cpp reads the factor from the older rope.scale_linear key too, and scales linearly where no type is named
    factor = key("factor") if key("factor") is not None else _field(r.fields, f"{arch}.rope.scale_linear")
    kind = str(key("type") or ("linear" if factor is not None else "none")).lower()
    if isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor == 0:
        kind = "none"  # llama.cpp reads a factor of 0 as no scaling
    freqs = next((t for t in r.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        if kind not in ("none", "llama3"):
            raise ValueError(f"{path}: the file holds both a rope_freqs tensor and rope scaling {kind!r}. Fix: "
                             "convert the model from its HF directory instead")
        return _llama3(path, spec, torch.from_numpy(np.array(freqs.data, dtype=np.float64)).reshape(-1))
    if kind == "none":
        return spec
    if kind in ("linear", "yarn"):
        factor = _positive(path, f"{arch}.rope.scaling.factor", factor)
    if kind == "linear":
        return replace(spec, rope_type="linear", rope_factor=factor).validate()
    if kind == "yarn":
        extra = [k for k in YARN_UNMAPPED if key(k) not in (None, 1.0)]
        if key("yarn_log_multiplier") not in (None, 0.0):
            extra.append("yarn_log_multiplier")
        if extra:
            raise ValueError(f"{path}: its YaRN scaling sets {', '.join(extra)}, which layerfold does not map to "
                             "HF's YaRN. Fix: convert the model from its HF directory (its config.json says the "
                             "same scaling in HF's terms)")
        old = key("original_context_length") or spec.max_position  # (0: unset, as llama.cpp reads it)
        old = int(_positive(path, f"{arch}.rope.scaling.original_context_length", old, whole=True))
        fast, slow = (_positive(path, f"{arch}.rope.scaling.yarn_beta_{k}", key(f"yarn_beta_{k}") or default)
                      for k, default in (("fast", 32.0), ("slow", 1.0)))
        return replace(spec, rope_type="yarn", rope_factor=factor, rope_original_max_pos=old,
                       rope_beta_fast=fast, rope_beta_slow=slow,
                       rope_attention_factor=0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0).validate()
    raise ValueError(f"{path}: rope scaling {kind!r} (factor {factor}) is not supported; supported: linear, "
                     "yarn and Llama-3's rope_freqs. Fix: use a model with one of those, or open an issue")


def gguf_longrope(path: str | Path, spec: ModelSpec) -> ModelSpec:
    """``spec`` with the longrope of a phi3 file as llama.cpp reads it: the rope_factors_short / rope_factors_long
    tensors, rope.scaling.original_context_length (else the context length) and rope.scaling.attn_factor (else 1),
    which multiplies cos and sin. (The switch between the two differs from llama.cpp's: core.gguf_arch.)"""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    arch = _field(r.fields, "general.architecture")
    factors = {t.name: [float(x) for x in np.array(t.data, dtype=np.float64).reshape(-1)] for t in r.tensors
               if t.name in ("rope_factors_short.weight", "rope_factors_long.weight")}
    ctx = int(_positive(path, f"{arch}.context_length", _field(r.fields, f"{arch}.context_length") or
                        spec.max_position, whole=True))
    old = _field(r.fields, f"{arch}.rope.scaling.original_context_length") or ctx  # (0: unset, as llama.cpp reads it)
    old = int(_positive(path, f"{arch}.rope.scaling.original_context_length", old, whole=True))
    attn = _field(r.fields, f"{arch}.rope.scaling.attn_factor")
    attn = 1.0 if attn is None else _positive(path, f"{arch}.rope.scaling.attn_factor", attn)
    for name, v in factors.items():
        if not all(math.isfinite(x) and x > 0 for x in v):
            raise ValueError(f"{path}: tensor {name} holds factors that are not finite numbers > 0. Fix: download the "
                             "file again, or convert the model from its HF directory")
    return replace(spec, rope_type="longrope", rope_original_max_pos=old, rope_attention_factor=attn,
                   max_position=ctx, rope_short_factor=tuple(factors["rope_factors_short.weight"]),
                   rope_long_factor=tuple(factors["rope_factors_long.weight"])).validate()


def _positive(path: str | Path, name: str, v: Any, whole: bool = False) -> float:
    """A rope setting of the file as a finite number > 0 (a whole one where ``whole``), or a ValueError naming it."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    if not ok or (whole and v != int(v)):
        raise ValueError(f"{path}: {name}={v!r} is not a {'whole ' if whole else ''}number > 0. Fix: download the file "
                         "again, or convert the model from its HF directory (its config.json names the scaling)")
    return float(v)


def _llama3(path: str | Path, spec: ModelSpec, divisors: torch.Tensor) -> ModelSpec:
    from layerfold.core.model import rope_inv_freq

    hds = {l.head_dim for l in spec.layers if l.has_attn}
    hd = next(iter(hds), 0)
    if len(hds) != 1 or divisors.numel() != hd // 2 or not bool(torch.isfinite(divisors).all()) or \
            float(divisors.min()) <= 0:
        raise ValueError(f"{path}: its rope_freqs tensor has {divisors.numel()} entries, not one positive divisor "
                         f"per rotary frequency ({hd // 2}). Fix: download the file again, or convert the model "
                         "from its HF directory")
    if bool((divisors == 1).all()):
        return spec
    plain = rope_inv_freq(replace(spec, rope_type="default"), hd).double()
    want = plain / divisors
    factor = float(divisors.max())
    cands = [(low, high, old) for low, high, old in itertools.product(LOW_FREQ, HIGH_FREQ, ORIGINAL_CONTEXT)
             if high > low]
    fitted = _fit_ramp(plain, divisors, factor)
    for low, high, old in ([fitted] if fitted else []) + cands:
        cand = replace(spec, rope_type="llama3", rope_factor=factor, rope_low_freq_factor=low,
                       rope_high_freq_factor=high, rope_original_max_pos=old)
        if torch.allclose(rope_inv_freq(cand, hd).double(), want, rtol=1e-4, atol=0):
            return cand.validate()
    raise ValueError(f"{path}: its rope_freqs tensor (divisors {divisors.min():.4g}..{factor:.4g}) matches no "
                     "Llama-3 rope scaling layerfold can express. Fix: convert the model from its HF directory "
                     "(its config.json names the scaling)")


def _fit_ramp(plain: torch.Tensor, divisors: torch.Tensor, factor: float) -> tuple[float, float, int] | None:
    """(low, high, original context) with low = 1 from the ramp's entries: there the blend s = (orig / wl - low) /
    (high - low) is linear in 1 / wl, and s = (1 / d - 1 / factor) / (1 - 1 / factor) for divisor d."""
    mid = (divisors > 1 + 1e-6) & (divisors < factor * (1 - 1e-6))
    if int(mid.sum()) < 2 or factor <= 1:
        return None
    x = plain[mid] / (2 * math.pi)  # 1 / wavelength
    y = (1 / divisors[mid] - 1 / factor) / (1 - 1 / factor)
    a, b = np.polyfit(x.numpy(), y.numpy(), 1)  # y = a x - b': a = orig / (high - low), -b' = low / (high - low)
    low_ratio = -b
    if a <= 0 or low_ratio <= 0:
        return None
    return 1.0, 1.0 + 1.0 / low_ratio, round(a / low_ratio)


__all__ = ["gguf_longrope", "gguf_rope"]
