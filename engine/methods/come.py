"""CoMe (seed 001): progressive concatenation merging of adjacent layers, guided by channel sensitivity.

Scores (functions of calibration statistics, layerfold.calibration.stats):
  - FFN channel c of a layer: s_c = mean_t |silu(g_c) u_c| * ||W_down[:, c]||_1;
  - attention, per KV group g: s_g = sum over the channels c of the group's query heads of
    mean_t |o_c| * ||W_o[:, c]||_1 (o = the o_proj input). Query head h belongs to KV head
    h // (n_heads / n_kv) -- the public code's h mod n_kv pairs heads with foreign keys and values;
  - pair (i, i+1): angular distance arccos(cos(h_i, h_{i+2})) / pi (``Stats.cos_window[:, 1]``).

Plan, one step at a time: merge the pair of lowest distance; split ratio r_a = BI_a / (BI_a + BI_b);
floor(n_kv * r_a) KV groups (with all their query heads) and floor(d_ffn * r_a) FFN channels are the
top of layer a by sensitivity, the rest the top of layer b; the rows of q/k/v/gate/up and the columns
of o/down are concatenated into one layer of the original shape; the norm gains are averaged
(``norms="mean"``, as the paper) or folded into the weights that read them (``norms="fold"``: exact for
the attention and MLP input norms, ones left in their place; q/k norms are averaged either way).

Progressive: after each merge the statistics are recomputed on the current, merged model -- with a
cheaper pass than the first (``come_samples`` sequences of the calibration set, default 16; window 2,
no CKA, no Grams): a merge changes the statistics of every layer above it, and the next choice needs
only the cosine window and the channel magnitudes. The first step uses the pipeline's statistics when
they hold both.

Surgery (``apply_come(model, plan)``) is pure: the plan lists every step's chosen groups and channels,
and each step builds a new model from contiguous copies.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from layerfold.core.model import Model, build_model
from layerfold.methods.base import Method, PruneContext, PruneResult, register

NORMS = ("mean", "fold")


# ---- scores ---------------------------------------------------------------------------------------
def ffn_sensitivity(abs_sum: Tensor, n_tokens: float, w_down: Tensor) -> Tensor:
    """(d_ffn,) fp64: mean |silu(g_c) u_c| over tokens times the L1 norm of W_down's column c."""
    return (abs_sum.double() / max(float(n_tokens), 1.0)) * w_down.detach().double().abs().sum(0)


def attn_group_sensitivity(o_abs_sum: Tensor, n_tokens: float, w_o: Tensor, n_kv_heads: int) -> Tensor:
    """(n_kv,) fp64: per KV group, the sum over its query heads' channels of mean |o_c| x ||W_o[:, c]||_1.

    o_proj input channels are laid out head by head (channel c belongs to query head c // head_dim) and
    the query heads of KV group g are g * G .. (g + 1) * G - 1, so a group's channels are contiguous.
    """
    per = (o_abs_sum.double() / max(float(n_tokens), 1.0)) * w_o.detach().double().abs().sum(0)
    return per.view(n_kv_heads, -1).sum(1)


def pair_distances(cos_window: Tensor) -> Tensor:
    """(L-1,) angular distance arccos(cos(h_i, h_{i+2})) / pi of each adjacent pair (i, i+1); inf if unknown."""
    if cos_window.dim() != 2 or cos_window.shape[1] < 2:
        raise ValueError("come needs cos(h_i, h_{i+2}) (a calibration window of at least 2). "
                         "Fix: calibrate with --window 2 or more")
    d = torch.arccos(cos_window[:-1, 1].double().clamp(-1, 1)) / math.pi
    return torch.nan_to_num(d, nan=math.inf)


def split_counts(bi_a: float, bi_b: float, n: int) -> tuple[int, float]:
    """(how many of n units come from layer a, r_a) with r_a = BI_a / (BI_a + BI_b) (0.5 if both are 0)."""
    s = bi_a + bi_b
    r = 0.5 if not s > 0 else min(max(bi_a / s, 0.0), 1.0)
    return int(math.floor(n * r + 1e-9)), r  # 1e-9: 0.3 / 0.4 * 1536 is 1151.999...


def query_heads(groups: list[int], group_size: int) -> list[int]:
    """Query heads of KV groups: head h reads KV head h // group_size."""
    return [g * group_size + j for g in groups for j in range(group_size)]


def top(scores: Tensor, k: int) -> list[int]:
    """Indices of the k largest scores, in ascending index order (ties: lower index)."""
    if k <= 0:
        return []
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


# ---- plan -----------------------------------------------------------------------------------------
@dataclass
class MergeStep:
    a: int  # index in the model *before* this step; the pair is (a, a + 1), merged at a
    stands_for: list[int]  # original layers of the merged layer (union of both)
    distance: float  # angular distance of the pair
    r_a: float
    kv_a: list[int]  # KV groups taken from layer a (with all their query heads)
    kv_b: list[int]
    ffn_a: list[int]  # FFN channels taken from layer a
    ffn_b: list[int]


def plan_step(model: Model, stats: Any, layer_map: list[list[int]]) -> MergeStep:
    """Choose the next pair and, from each layer, the KV groups and FFN channels the merged layer keeps."""
    L = model.spec.n_layers
    if L < 2:
        raise ValueError("come: one layer left, nothing to merge. Fix: ask for fewer layers removed")
    dist = pair_distances(stats.cos_window)
    if dist.numel() != L - 1:
        raise ValueError(f"come: statistics for {dist.numel() + 1} layers, model has {L}. Fix: recalibrate")
    a = int(torch.argmin(dist))
    if not math.isfinite(float(dist[a])):
        raise ValueError("come: no pair has a finite distance. Fix: check the calibration data (no valid tokens?)")
    la, lb = model.spec.layers[a], model.spec.layers[a + 1]
    if la != lb or la.kind != "decoder" or not (la.has_attn and la.has_mlp) or la.attn_shortcut or la.mlp_shortcut:
        raise ValueError(f"come: layers {a} and {a + 1} are not two plain decoder layers of one shape. "
                         "Fix: run come on a dense or depth-pruned model, before width surgery")
    bi = stats.bi
    kv_na, r = split_counts(float(bi[a]), float(bi[a + 1]), la.n_kv_heads)
    ffn_na, _ = split_counts(float(bi[a]), float(bi[a + 1]), la.d_ffn)
    n = stats.counts.get("chan_tokens") or stats.n_tokens  # the channel sums skip position 0 (calibrate)
    pair = ((a, model.layers[a]), (a + 1, model.layers[a + 1]))
    sg = [attn_group_sensitivity(stats.chan[f"o_abs.{i}"], n, blk.attn.o.weight, la.n_kv_heads) for i, blk in pair]
    sf = [ffn_sensitivity(stats.chan[f"ffn_abs.{i}"], n, blk.mlp.down.weight) for i, blk in pair]
    return MergeStep(a=a, stands_for=sorted(layer_map[a] + layer_map[a + 1]), distance=float(dist[a]), r_a=r,
                     kv_a=top(sg[0], kv_na), kv_b=top(sg[1], la.n_kv_heads - kv_na),
                     ffn_a=top(sf[0], ffn_na), ffn_b=top(sf[1], la.d_ffn - ffn_na))


# ---- surgery --------------------------------------------------------------------------------------
def _head_rows(w: Tensor, heads: list[int], hd: int, dim: int = 0) -> Tensor:
    idx = torch.tensor([h * hd + j for h in heads for j in range(hd)], dtype=torch.long, device=w.device)
    return w.index_select(dim, idx)


def _sel(w: Tensor, idx: list[int], dim: int = 0) -> Tensor:
    return w.index_select(dim, torch.tensor(idx, dtype=torch.long, device=w.device))


def merged_layer_state(sa: dict[str, Tensor], sb: dict[str, Tensor], step: MergeStep, group_size: int,
                       head_dim: int, norms: str = "mean") -> dict[str, Tensor]:
    """One layer from two (local names ``attn.q.weight``...): layer a's chosen KV groups with their query
    heads, then layer b's; a's chosen FFN channels, then b's. Fresh contiguous tensors."""
    if norms not in NORMS:
        raise ValueError(f"come: norms={norms!r} is unknown. Fix: use one of {NORMS}")
    qa, qb = query_heads(step.kv_a, group_size), query_heads(step.kv_b, group_size)
    fold = norms == "fold"
    ga, gb = (sa["attn_norm.weight"], sb["attn_norm.weight"]) if fold else (None, None)
    ma, mb = (sa["mlp_norm.weight"], sb["mlp_norm.weight"]) if fold else (None, None)
    scale = lambda w, g: w if g is None else w * g.to(w.dtype)[None, :]
    out: dict[str, Tensor] = {}
    for name in ("attn.q.weight", "attn.q.bias"):
        if name in sa:
            out[name] = torch.cat([scale(_head_rows(sa[name], qa, head_dim), ga if name.endswith("weight") else None),
                                   scale(_head_rows(sb[name], qb, head_dim), gb if name.endswith("weight") else None)])
    for name in ("attn.k.weight", "attn.v.weight", "attn.k.bias", "attn.v.bias"):
        if name in sa:
            w = name.endswith("weight")
            out[name] = torch.cat([scale(_head_rows(sa[name], step.kv_a, head_dim), ga if w else None),
                                   scale(_head_rows(sb[name], step.kv_b, head_dim), gb if w else None)])
    out["attn.o.weight"] = torch.cat([_head_rows(sa["attn.o.weight"], qa, head_dim, 1),
                                      _head_rows(sb["attn.o.weight"], qb, head_dim, 1)], 1)
    for name in ("mlp.gate.weight", "mlp.up.weight"):
        out[name] = torch.cat([scale(_sel(sa[name], step.ffn_a), ma), scale(_sel(sb[name], step.ffn_b), mb)])
    out["mlp.down.weight"] = torch.cat([_sel(sa["mlp.down.weight"], step.ffn_a, 1),
                                       _sel(sb["mlp.down.weight"], step.ffn_b, 1)], 1)
    for name in ("attn_norm.weight", "mlp_norm.weight", "attn.q_norm.weight", "attn.k_norm.weight"):
        if name in sa:
            if fold and name in ("attn_norm.weight", "mlp_norm.weight"):
                out[name] = torch.ones_like(sa[name])
            else:
                out[name] = (sa[name].float() + sb[name].float()).div(2).to(sa[name].dtype)
    missing = set(sa) - set(out)
    assert not missing, f"come: unhandled tensors {sorted(missing)}"
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def merge_step(model: Model, step: MergeStep, norms: str = "mean") -> Model:
    """A new model with layers (a, a+1) replaced by their concatenation merge; every tensor a fresh copy."""
    a, spec = step.a, model.spec
    ls = spec.layers[a]
    local = lambda i: {k: v.detach() for k, v in model.layers[i].state_dict().items()}
    merged = merged_layer_state(local(a), local(a + 1), step, ls.group_size, ls.head_dim, norms)
    state: dict[str, Tensor] = {}
    for k, v in model.state_dict().items():
        if not k.startswith("layers."):
            state[k] = v.detach().clone()
            continue
        _, i, rest = k.split(".", 2)
        i = int(i)
        if i < a:
            state[k] = v.detach().clone()
        elif i > a + 1:
            state[f"layers.{i - 1}.{rest}"] = v.detach().clone()
    state.update({f"layers.{a}.{k}": v for k, v in merged.items()})
    layers = list(spec.layers[:a + 1]) + list(spec.layers[a + 2:])
    new = build_model(spec.with_layers(layers), state, device=model.device, dtype=model.dtype)
    return new.eval()


def apply_come(model: Model, plan: dict[str, Any]) -> Model:
    """Apply a come plan (its ``steps`` in order) to the model it was written for: a new model."""
    if plan.get("n_layers") not in (None, model.spec.n_layers):
        raise ValueError(f"come plan written for {plan['n_layers']} layers, model has {model.spec.n_layers}. "
                         "Fix: apply it to the model it was made from")
    cur = model
    for s in plan["steps"]:
        cur = merge_step(cur, MergeStep(**s), plan.get("norms", "mean"))
    return cur


# ---- the method -----------------------------------------------------------------------------------
def _usable(stats: Any, L: int) -> bool:
    return stats is not None and stats.n_layers == L and stats.window >= 2 and f"ffn_abs.{L - 1}" in stats.chan \
        and f"o_abs.{L - 1}" in stats.chan


def run(ctx: PruneContext) -> PruneResult:
    from layerfold.calibration.calibrate import calibrate

    t0 = time.time()
    opts = ctx.options
    norms = opts.get("come_norms") or "mean"
    n_cal = int(opts.get("come_samples") or 16)
    k = ctx.target.layers_to_remove(ctx.model)
    batches = ctx.calib[torch.linspace(0, ctx.calib.shape[0] - 1, min(n_cal, ctx.calib.shape[0])).long()]
    L0 = ctx.model.spec.n_layers
    layer_map = [[i] for i in range(L0)]
    cur, stats, steps, recal_s = ctx.model, ctx.stats, [], 0.0
    for s in range(k):
        if s > 0 or not _usable(stats, cur.spec.n_layers):
            t1 = time.time()
            stats = calibrate(cur, batches, window=2, cka=False, grams=False, channels=True, device=ctx.device,
                              progress=False)
            recal_s += time.time() - t1
        step = plan_step(cur, stats, layer_map)
        steps.append(step)
        cur = merge_step(cur, step, norms)
        layer_map = layer_map[:step.a] + [step.stands_for] + layer_map[step.a + 2:]
        if ctx.progress:
            print(f"[come] merge {s + 1}/{k}: layers {step.a},{step.a + 1} (original {step.stands_for}) "
                  f"distance {step.distance:.4f} r_a {step.r_a:.3f} KV groups a{step.kv_a} b{step.kv_b}", flush=True)
    plan = {"kind": "come", "method": "come", "n_layers": L0, "norms": norms, "steps": [asdict(s) for s in steps],
            "recalibration": {"samples": int(batches.shape[0]), "seq_len": int(batches.shape[1]),
                              "window": 2, "first_step": "pipeline statistics" if _usable(ctx.stats, L0) else
                              "recomputed"},
            "result": {"n_layers": cur.spec.n_layers, "layer_map": layer_map}}
    changed = [j for j, g in enumerate(layer_map) if len(g) > 1]
    info = {"merges": [{"pair": [s.a, s.a + 1], "stands_for": s.stands_for, "distance": s.distance, "r_a": s.r_a,
                        "kv_from_a": len(s.kv_a), "ffn_from_a": len(s.ffn_a)} for s in steps],
            "recalibration_seconds": round(recal_s, 2), "seconds": round(time.time() - t0, 2)}
    return PruneResult(cur, plan, layer_map, changed, info)


def _add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("come")
    g.add_argument("--come-samples", type=int, default=16,
                   help="calibration sequences for the statistics recomputed after each merge (default 16)")
    g.add_argument("--come-norms", choices=NORMS, default="mean",
                   help="merged norm gains: mean of the pair (paper) or folded into the weights (exact)")


register(Method(name="come", fn=run, kind="depth", needs_stats=True,
                stats_options={"window": 2, "cka": False, "channels": True}, add_args=_add_args,
                help="CoMe: progressive concatenation merge of adjacent layers by channel sensitivity"))
