"""Slicing plans: kept widths at every residual point, per-layer fractions, and the spec they give.

The residual stream has 2L+1 points (see layerfold.surgery.slicing); a plan keeps w_p of d_p dimensions
at point p. Dynamic slicing sets per-layer fractions from Layer Redundancy scores; widths are rounded
to a hardware-friendly multiple.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from layerfold.core.model import Model
from layerfold.core.spec import ModelSpec


@dataclass(frozen=True)
class SlicePlan:
    """Kept width at every residual point (2L+1 of them, see the module docstring) and the PCA options."""

    widths: tuple[int, ...]
    pca_tokens: str = "all"  # "all" | "skip-first" (drop position 0: massive activations) | "token-norm"
    keep_ends: bool = True  # embeddings / head / final norm untouched (tied head stays tied)
    norm_scale: bool = True  # fold sqrt(d/w) into the linears reading a sliced RMSNorm
    damp: float = 0.01  # Gram damping, relative to its mean diagonal
    basis: str = "point"  # see BASES and the module docstring
    layer_fractions: tuple[float, ...] = ()  # the per-layer sliced fractions asked for (before rounding)
    round_to: int = 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["widths"] = list(self.widths)
        d["layer_fractions"] = [round(f, 6) for f in self.layer_fractions]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SlicePlan:
        return cls(**{**d, "widths": tuple(d["widths"]), "layer_fractions": tuple(d.get("layer_fractions", ()))})


def point_dims(spec: ModelSpec) -> list[int]:
    """Residual width at each of the 2L+1 points of ``spec``."""
    return [spec.layers[0].d_in] + [d for l in spec.layers for d in (l.d_mid, l.d_out)]


def round_width(kept: float, multiple: int, d: int) -> int:
    """Nearest multiple of ``multiple`` to ``kept``, at least one multiple, at most d."""
    return int(min(d, max(multiple, multiple * math.floor(kept / multiple + 0.5))))


def plan_widths(spec: ModelSpec, fractions: list[float], *, multiple: int = 8, keep_ends: bool = True,
                exact_mean: bool = False, basis: str = "point") -> tuple[int, ...]:
    """Per-point widths from per-layer sliced fractions: layer i's fraction sets its mid and output
    points (and point 0 follows layer 0). ``exact_mean`` rounds by largest remainder so the total
    kept width is the nearest multiple of the requested total (dynamic slicing: mean fraction = target
    up to one multiple over all layers), else each layer rounds on its own (constant slicing stays uniform).
    """
    dims = point_dims(spec)
    L = spec.n_layers
    if len(fractions) != L:
        raise ValueError(f"{len(fractions)} fractions for {L} layers. Fix: give one sliced fraction per layer")
    if multiple < 1:
        raise ValueError(f"round_to={multiple}. Fix: use a positive multiple (1 = no rounding, 8 default)")
    kept = [(1.0 - f) * dims[2 * i + 2] for i, f in enumerate(fractions)]
    if exact_mean:
        units = [k / multiple for k in kept]
        base = [max(1, math.floor(u)) for u in units]
        extra = round(sum(units)) - sum(base)
        order = sorted(range(L), key=lambda i: (-(units[i] - math.floor(units[i])), i))
        for i in order[:max(0, extra)]:
            base[i] += 1
        layer_w = [min(dims[2 * i + 2], b * multiple) for i, b in enumerate(base)]
    else:
        layer_w = [round_width(k, multiple, dims[2 * i + 2]) for i, k in enumerate(kept)]
    widths = [layer_w[0]] + [w for w in layer_w for _ in range(2)]
    if keep_ends:
        widths[0], widths[-1] = dims[0], dims[-1]
    for i, l in enumerate(spec.layers):  # the mid point keeps the input's basis: give it the input's width
        if (basis != "point" or not l.has_attn) and not l.attn_shortcut:
            widths[2 * i + 1] = widths[2 * i]
    return tuple(widths)


MAX_FRACTION = 0.95  # no layer is sliced further than this


def dynamic_fractions(lr: Sequence[float], target: float, base: float,
                      max_fraction: float = MAX_FRACTION) -> list[float]:
    """FS_i = SB + k LR'_i with k = (SP - SB) / mean(LR') (clipped at max_fraction, k re-solved)."""
    if not 0 <= target < max_fraction:
        raise ValueError(f"target fraction {target} is outside [0, {max_fraction}). Fix: slice less")
    if not 0 <= base <= target:
        raise ValueError(f"slicing base {base} must lie in [0, target={target}]. Fix: pass --slicing-base "
                         f"between 0 (fully adaptive) and the target (constant slicing)")
    x = torch.tensor([float(v) for v in lr], dtype=torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError("layer redundancy scores contain NaN/inf. Fix: recalibrate (no layer may be empty)")
    span = float(x.max() - x.min())
    if span <= 1e-12:  # all layers alike: nothing to adapt to
        return [target] * len(x)
    lr_n = (x - x.min()) / span
    fs = lambda k: (base + k * lr_n).clamp(0.0, max_fraction)
    k = (target - base) / float(lr_n.mean())
    if float(fs(k).mean()) < target - 1e-12:  # clipping lost some: raise the slope until the mean is back
        if float(torch.where(lr_n > 0, max_fraction, base).mean()) < target:
            raise ValueError(f"mean sliced fraction {target} is out of reach with at most {max_fraction} per layer "
                             f"and base {base} on the least redundant layers. Fix: raise --slicing-base or "
                             "lower the target")
        lo, hi = k, k * 2 + 1
        while float(fs(hi).mean()) < target:
            hi *= 2
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if float(fs(mid).mean()) < target else (lo, mid)
        k = hi
    return [float(v) for v in fs(k)]


def sliced_spec(spec: ModelSpec, plan: SlicePlan) -> ModelSpec:
    """The spec a plan produces (every shortcut present; slice_model may drop identity ones)."""
    w = plan.widths
    layers = [replace(l, d_in=w[2 * i], d_mid=w[2 * i + 1], d_out=w[2 * i + 2], attn_shortcut=True,
                      mlp_shortcut=True) for i, l in enumerate(spec.layers)]
    tie = spec.tie_embeddings and plan.keep_ends
    return spec.with_layers(layers, d_model=w[0], tie_embeddings=tie)


def count_params(spec: ModelSpec) -> dict[str, int]:
    """Parameters of a spec by part (shortcut matrices and an untied head included)."""
    with torch.device("meta"):
        m = Model(spec)
    parts = {"total": 0, "embed": 0, "head": 0, "shortcuts": 0, "norms": 0, "layers_other": 0}
    for name, p in m.named_parameters():
        n = p.numel()
        parts["total"] += n
        key = ("embed" if name.startswith("embed.") else "head" if name.startswith("lm_head.") else
               "shortcuts" if "shortcut" in name else "norms" if "norm" in name else "layers_other")
        parts[key] += n
    return parts


__all__ = ["MAX_FRACTION", "SlicePlan", "count_params", "dynamic_fractions", "plan_widths", "point_dims",
           "round_width", "sliced_spec"]
