"""SLM: sliding layer merging (seed 000), as the paper states it; where its public code differs, said below.

Sliding, top to bottom, over the source layers: high = L-2 (the last layer is never merged),
low = high-1. While low >= 0: the candidate merges [low..high]; if its similarity to the dense model is
above T, extend down (low -= 1); else commit the merge of [low+1..high] if it holds more than one layer,
and restart below it (high = low, low = high-1), which slides down by one when nothing was merged. A
group still open when low passes 0 is committed too. Merges use ``consolidate`` (theta_a + sum (theta_k -
theta_a)) unless ``--merge-how`` says otherwise.

Similarity (``--similarity``, see merge_search.py for exactly what is compared): ``cka`` (default: linear
CKA of norm(h_L), the seed paper's RKHS measure) or ``final-cosine`` (the public code's measure).

The paper has no mapping from T to a pruning ratio. layerfold bisects T until the slide leaves exactly the
target number of layers. Merge commits remove several layers at once, so a count may be unreachable by T
alone; then (``--slm-exact cap``, default) the slide is re-run at the largest threshold that removes too
many, with a budget: a group stops growing when it would remove more layers than are left to remove,
which lands exactly on the target (the report says which way it got there); ``--slm-exact nearest``
keeps the nearest count reached by a threshold and says so.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

from layerfold.methods.base import Method, PruneContext, PruneResult, register
from layerfold.methods.merge_search import (
    SIM_SAMPLES,
    SIM_SEQ_LEN,
    SIMILARITIES,
    SimView,
    groups_of,
    merge_setup,
    next_threshold,
)
from layerfold.surgery.depth import apply_depth_plan
from layerfold.surgery.plan import plan_from_groups


def slide(n_layers: int, sim: SimView, threshold: float, budget: int | None = None
          ) -> list[tuple[int, int]]:
    """One top-to-bottom slide at threshold T; returns the committed (first, last) merges."""
    merges: list[tuple[int, int]] = []
    removed = 0

    def commit(a: int, b: int) -> None:
        nonlocal removed
        if b > a:
            merges.append((a, b))
            removed += b - a

    high = n_layers - 2
    low = high - 1
    while low >= 0:
        if budget is not None and removed >= budget:
            break
        if budget is not None and high - low > budget - removed:  # growing would remove too many
            commit(low + 1, high)
            high = low
            low = high - 1
            continue
        s = sim(groups_of(n_layers, merges + [(low, high)]))
        if s > threshold:
            low -= 1
        else:
            commit(low + 1, high)
            high = low
            low = high - 1
    if low < 0 and (budget is None or removed < budget):
        commit(0, high)  # the open group reached the bottom
    return merges


def search(n_layers: int, sim: SimView, k: int, exact: str = "cap", iters: int = 60) -> dict[str, Any]:
    """Find T so the slide removes exactly k layers; see the module docstring for ``exact``.

    Removed layers fall as T rises. Thresholds are bisected over the similarities observed so far (a
    decision flips only when T crosses one), starting from T above every similarity (nothing merged)."""
    removed = lambda ms: sum(b - a for a, b in ms)
    lo, hi = -math.inf, 1.0 + 1e-9
    ms_lo: list[tuple[int, int]] | None = None
    ms_hi = slide(n_layers, sim, hi)
    curve = [{"threshold": hi, "removed": removed(ms_hi)}]
    for _ in range(iters):
        t = next_threshold(sim.seen(), lo, hi)
        if t is None:
            break
        ms = slide(n_layers, sim, t)
        curve.append({"threshold": t, "removed": removed(ms)})
        if removed(ms) == k:
            return {"merges": ms, "threshold": t, "how": "threshold", "curve": curve}
        if removed(ms) > k:
            lo, ms_lo = t, ms
        else:
            hi, ms_hi = t, ms
    if ms_lo is None:
        return {"merges": ms_hi, "threshold": hi, "how": "nearest", "curve": curve,
                "note": f"even accepting every merge removes only {removed(ms_hi)} of the {k} layers asked"}
    if exact == "cap":
        ms = slide(n_layers, sim, lo, budget=k)
        if removed(ms) == k:
            return {"merges": ms, "threshold": lo, "how": "budget-cap", "curve": curve,
                    "note": f"no threshold removes exactly {k}: T={lo:.6g} removes {removed(ms_lo)}, "
                            f"T={hi:.6g} removes {removed(ms_hi)}; the slide at T={lo:.6g} was capped at {k}"}
    near_lo = abs(removed(ms_lo) - k) < abs(removed(ms_hi) - k)
    ms, t = (ms_lo, lo) if near_lo else (ms_hi, hi)
    return {"merges": ms, "threshold": t, "how": "nearest", "curve": curve,
            "note": f"no threshold removes exactly {k} layers; nearest reachable: {removed(ms)}"}


def run(ctx: PruneContext) -> PruneResult:
    t0 = time.time()
    opts = ctx.options
    L, k, sim, o = merge_setup(ctx, "cka")
    measure, how = o["similarity"], o["how"]
    fixed = opts.get("threshold")
    if fixed is not None:
        ms = slide(L, sim, float(fixed))
        found = {"merges": ms, "threshold": float(fixed), "how": "fixed-threshold", "curve": []}
    else:
        found = search(L, sim, k, exact=opts.get("slm_exact") or "cap")
    groups = groups_of(L, found["merges"])
    plan = plan_from_groups(L, groups, how=how, method="slm", notes={
        "similarity": measure, "threshold": found["threshold"], "target_removed": k,
        "count_reached_by": found["how"], **({"note": found["note"]} if "note" in found else {}),
        "sim_samples": o["sim_samples"]})
    new = apply_depth_plan(ctx.model, plan)
    info = {"similarity": measure, "threshold": found["threshold"], "count_reached_by": found["how"],
            "threshold_curve": found["curve"], "evaluations": len(sim.log), "candidates": sim.log,
            "final_sim": sim(groups), "seconds": time.time() - t0}
    if "note" in found:
        info["note"] = found["note"]
    return PruneResult(new, plan.to_dict(), plan.layer_map(), plan.changed_layers(), info)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--similarity", choices=SIMILARITIES, default=None,
                   help="slm/laco: similarity to the dense model's output (default cka for slm, final-cosine "
                        "for laco)")
    p.add_argument("--threshold", type=float, default=None,
                   help="slm/laco: fixed similarity threshold T (default: searched to hit --target)")
    p.add_argument("--merge-how", choices=("consolidate", "mean", "keep-top"), default=None,
                   help="slm/laco: how a group's weights merge (default consolidate, as the papers write it)")
    p.add_argument("--sim-samples", type=int, default=None,
                   help=f"slm/laco: calibration samples the similarity uses (default {SIM_SAMPLES})")
    p.add_argument("--sim-seq-len", type=int, default=None,
                   help=f"slm/laco: tokens per similarity sample (default {SIM_SEQ_LEN})")
    p.add_argument("--slm-exact", choices=("cap", "nearest"), default=None,
                   help="slm: when no threshold hits the target exactly, cap the slide at the target (default) "
                        "or keep the nearest count")


register(Method(name="slm", fn=run, kind="depth", needs_stats=False, add_args=add_args, streams=False,
                help="sliding layer merging (top-to-bottom, similarity threshold bisected to the target)"))
