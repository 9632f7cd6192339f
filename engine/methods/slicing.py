"""SliceGPT (constant slicing) and Dynamic Slicing (per-layer widths from Layer Redundancy scores).

Score: LR_i = cos(h_i, h_{i+1}) (``stats.cos_window[:, 0]``; high = the layer changes little = redundant).
Plan: LR'_i = (LR_i - min LR) / (max LR - min LR); FS_i = SB + (SP - SB) * LR'_i / mean(LR'), so that
mean(FS) = SP (the target) and the slicing base SB trades uniform (SB = SP) against adaptive (SB = 0).
Should some FS_i exceed ``MAX_FRACTION`` (0.95) we clip it there and raise the slope k in
FS_i = SB + k LR'_i (bisection) until the mean is SP again (an error when no slope can reach it).
Layer i's fraction sets its mid and output widths (its input is the previous layer's output); widths
are rounded to a multiple (default 8) by largest remainder, so the mean kept width is the target's up
to one multiple over all layers. Apply: layerfold.surgery.slicing, layer by layer on the sliced prefix.

Defaults, measured on SmolLM2-135M at 25% constant slicing (32 x 256 calibration tokens; val ppl of
the dense model 16.74 on that test): PCA over all tokens 29.7, position 0 excluded ("skip-first") 30.7,
per-token normalised Grams 31.6 -- the massive position-0 activation lives in a few channels, which
the all-token PCA keeps, and keeping them helps; embeddings/head kept (``--slice-ends`` off) 30.7 with
119.6M parameters vs 31.1 with 133.3M when they are rotated (the tied head must then be untied); the
sqrt(d/w) norm correction off: 47.0.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from layerfold.core.spec import ModelSpec
from layerfold.methods.base import Method, PruneContext, PruneResult, Target, register
from layerfold.surgery.slicing import (
    BASES,
    MAX_FRACTION,
    PCA_TOKENS,
    SlicePlan,
    count_params,
    dynamic_fractions,
    plan_widths,
    slice_model,
    sliced_spec,
)

DEFAULT_BASE = 0.1
DEFAULT_PCA_TOKENS = "all"


def layer_redundancy(ctx: PruneContext) -> list[float]:
    """cos(h_i, h_{i+1}) per layer from the pipeline's statistics, or a small calibration pass."""
    stats = ctx.stats
    if stats is None:
        from layerfold.calibration.calibrate import calibrate

        stats = calibrate(ctx.model, ctx.calib, window=1, cka=False, channels=False, device=ctx.device,
                          progress=ctx.progress)
    return [float(v) for v in stats.cos_window[:, 0]]


def resolve_fraction(spec: ModelSpec, target: Target, widths_for: Callable[[float], SlicePlan]) -> float:
    """The mean sliced fraction: given directly, or found by bisection for a parameter-fraction target
    (parameters counted on the sliced spec: shortcuts and an untied head included)."""
    if target.kind == "fraction":
        return target.value
    if target.kind != "params":
        raise ValueError(f"target {target.kind}={target.value} is a layer count; slicing needs a width fraction. "
                         "Fix: use --target 0.25 (mean sliced width) or params:0.2 (parameters removed)")
    dense = count_params(spec)["total"]
    removed = lambda f: 1 - count_params(sliced_spec(spec, widths_for(f)))["total"] / dense
    if removed(MAX_FRACTION - 1e-3) < target.value:
        raise ValueError(f"slicing cannot remove {target.value:.0%} of the parameters (shortcuts and the head "
                         "stay). Fix: ask for fewer, or use a depth method")
    lo, hi = 0.0, MAX_FRACTION - 1e-3
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if removed(mid) < target.value else (lo, mid)
    return hi


def _options(ctx: PruneContext) -> dict[str, Any]:
    o = ctx.options
    pca_tokens = o.get("pca_tokens") or DEFAULT_PCA_TOKENS
    if pca_tokens not in PCA_TOKENS:
        raise ValueError(f"--pca-tokens {pca_tokens!r}. Fix: use one of {', '.join(PCA_TOKENS)}")
    basis = o.get("basis") or "point"
    if basis not in BASES:
        raise ValueError(f"--basis {basis!r}. Fix: use one of {', '.join(BASES)}")
    return {"round_to": int(o.get("round_to") or default_round_to(ctx.model.spec.d_model)), "pca_tokens": pca_tokens,
            "basis": basis,
            "keep_ends": not o.get("slice_ends", False), "base": o.get("slicing_base")}


def default_round_to(d_model: int) -> int:
    """The multiple kept widths round to. On an H200, cuBLAS decode GEMVs over a weight whose width is a
    multiple of 64 or 128 ran ~7% faster per byte than at a multiple of 8 (54-55% against 50-51% of the
    bandwidth, batch 1 and 16; bench/gpu_suite.py kernels part, docs/PERFORMANCE.md); on this project's
    CPU no multiple mattered. Small models keep 8: 64 is a large step of a 576-wide residual."""
    return 64 if d_model >= 2048 else 8


def make_plan(spec: ModelSpec, fraction: float, *, lr: Sequence[float] | None = None, base: float | None = None,
              round_to: int = 8, keep_ends: bool = True, pca_tokens: str = DEFAULT_PCA_TOKENS,
              basis: str = "point") -> SlicePlan:
    """Constant slicing when ``lr`` is None, else dynamic slicing with slicing base ``base``."""
    if lr is None:
        fr = [fraction] * spec.n_layers
    else:
        b = DEFAULT_BASE if base is None else float(base)
        fr = dynamic_fractions(lr, fraction, min(b, fraction) if base is None else b)
    widths = plan_widths(spec, fr, multiple=round_to, keep_ends=keep_ends, exact_mean=lr is not None, basis=basis)
    return SlicePlan(widths=widths, pca_tokens=pca_tokens, keep_ends=keep_ends, layer_fractions=tuple(fr),
                     round_to=round_to, basis=basis)


def _run(ctx: PruneContext, dynamic: bool) -> PruneResult:
    o = _options(ctx)
    spec = ctx.model.spec
    lr = layer_redundancy(ctx) if dynamic else None
    build = lambda f: make_plan(spec, f, lr=lr, base=o["base"], round_to=o["round_to"], keep_ends=o["keep_ends"],
                                pca_tokens=o["pca_tokens"], basis=o["basis"])
    plan = build(resolve_fraction(spec, ctx.target, build))
    model, info = slice_model(ctx.model, ctx.calib, plan, device=ctx.device, progress=ctx.progress)
    L = spec.n_layers
    w = plan.widths
    dims = [spec.layers[0].d_in] + [d for l in spec.layers for d in (l.d_mid, l.d_out)]
    info.update({
        "layer_widths": [{"d_in": w[2 * i], "d_mid": w[2 * i + 1], "d_out": w[2 * i + 2],
                          "attn_shortcut": model.spec.layers[i].attn_shortcut,
                          "mlp_shortcut": model.spec.layers[i].mlp_shortcut} for i in range(L)],
        "mean_sliced_fraction": round(1 - sum(w[1::2]) / sum(dims[1::2]), 6),  # per layer (mid points)
        "params_removed_fraction": round(1 - info["params"]["total"] / info["params_dense"]["total"], 6),
        "layer_redundancy": None if lr is None else [round(v, 6) for v in lr],
    })
    p = plan.to_dict()
    p.update({"kind": "width", "method": "dynamic-slicing" if dynamic else "slicegpt",
              "target_fraction": sum(plan.layer_fractions) / L,
              "slicing_base": (o["base"] if o["base"] is not None else DEFAULT_BASE) if dynamic else None})
    return PruneResult(model=model, plan=p, layer_map=[[i] for i in range(L)], changed_layers=list(range(L)),
                       info=info)


def slicegpt(ctx: PruneContext) -> PruneResult:
    return _run(ctx, dynamic=False)


def dynamic_slicing(ctx: PruneContext) -> PruneResult:
    return _run(ctx, dynamic=True)


def _add(p: argparse.ArgumentParser, *names: str, **kw: Any) -> None:
    try:  # both methods add the same options; a shared parser keeps the first
        p.add_argument(*names, **kw)
    except argparse.ArgumentError:
        pass


def add_args(p: argparse.ArgumentParser) -> None:
    _add(p, "--slicing-base", type=float, default=None, metavar="SB",
         help=f"dynamic-slicing: minimum sliced fraction (0 = fully adaptive, = target: constant); "
              f"default {DEFAULT_BASE}")
    _add(p, "--round-to", type=int, default=None, metavar="M",
         help="round kept widths to a multiple of M (default: 64 for models 2048 wide or more, else 8)")
    _add(p, "--pca-tokens", choices=PCA_TOKENS, default=DEFAULT_PCA_TOKENS,
         help="tokens in the PCA Grams: all, skip-first (drop position 0: massive activations), token-norm")
    _add(p, "--basis", choices=BASES, default="point",
         help="PCA basis per residual point (SliceGPT, 2 shortcut matrices a layer), per layer (1), or one global "
              "basis (none inside the stack at constant width)")
    _add(p, "--slice-ends", action="store_true",
         help="also rotate/slice the embeddings and head (unties a tied head: more parameters on small models)")


register(Method("slicegpt", slicegpt, kind="width", needs_stats=False, add_args=add_args,
                help="SliceGPT: PCA rotation, constant residual width slicing with shortcut matrices"))
register(Method("dynamic-slicing", dynamic_slicing, kind="width", needs_stats=True, stats_options={"window": 1},
                add_args=add_args,
                help="Dynamic Slicing: per-layer widths from layer redundancy cos(h_i, h_{i+1})"))

__all__ = ["DEFAULT_BASE", "MAX_FRACTION", "dynamic_fractions", "dynamic_slicing", "layer_redundancy", "make_plan",
           "resolve_fraction", "slicegpt"]
