"""ShortGPT baseline: remove the k layers of lowest Block Influence BI_i = 1 - cos(h_i, h_{i+1}).

The layers need not be contiguous. BI comes from the calibration statistics (``Stats.bi``), averaged
over every non-padding calibration token.
"""

from __future__ import annotations

import time

import torch

from layerfold.methods.base import Method, PruneContext, PruneResult, register
from layerfold.surgery.depth import apply_depth_plan
from layerfold.surgery.plan import DepthPlan


def lowest_bi(bi: torch.Tensor, k: int) -> list[int]:
    """Indices of the k smallest BI values (ties: the later layer first, stable), sorted."""
    if bi.dim() != 1 or k > bi.numel():
        raise ValueError(f"shortgpt: BI has shape {tuple(bi.shape)} and {k} layers are to go. Fix: recalibrate "
                         "this model (the statistics belong to another model)")
    b = torch.nan_to_num(bi.double(), nan=float("inf"))
    order = sorted(range(b.numel()), key=lambda i: (float(b[i]), -i))
    return sorted(order[:k])


def run(ctx: PruneContext) -> PruneResult:
    t0 = time.time()
    if ctx.stats is None:
        raise ValueError("shortgpt needs calibration statistics (Block Influence). Fix: let prune calibrate, or "
                         "pass --stats DIR from `layerfold calibrate`")
    L = ctx.model.spec.n_layers
    bi = torch.as_tensor(ctx.stats.bi).flatten()
    if bi.numel() != L:
        raise ValueError(f"shortgpt: the statistics have BI for {bi.numel()} layers, the model has {L}. Fix: "
                         "calibrate this model (--stats belongs to another one)")
    k = ctx.target.layers_to_remove(ctx.model)
    drop = lowest_bi(bi, k)
    plan = DepthPlan(n_layers=L, drop=tuple(drop), method="shortgpt",
                     notes={"bi": [round(float(x), 6) for x in bi], "criterion": "lowest Block Influence"})
    plan.validate(L)
    new = apply_depth_plan(ctx.model, plan)
    info = {"dropped": drop, "bi_dropped": [float(bi[i]) for i in drop], "seconds": time.time() - t0}
    return PruneResult(new, plan.to_dict(), plan.layer_map(), plan.changed_layers(), info)


register(Method(name="shortgpt", fn=run, kind="depth", needs_stats=True,
                help="ShortGPT baseline: drop the layers of lowest Block Influence (need not be contiguous)"))
