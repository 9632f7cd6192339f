"""Depth surgery: pure functions (model, plan) -> a new, compact model.

Every tensor of the result is a fresh contiguous copy (the source model is never touched and no view
keeps its storage alive); the new ModelSpec is derived from the new weights' shapes and checked against
what the plan says each layer should be.

Merging a group of consecutive layers a..b into one layer at position a (``how``):
  - ``consolidate``: theta = theta_a + sum_{k=a+1..b} (theta_k - theta_a), for every attention and MLP
    weight (and qkv bias), as the LaCo and SLM papers write it;
  - ``mean``: theta = mean_k theta_k;
  - ``keep-top``: theta = theta_b (what the public LaCo/SLM code ends with, updating layer a in place).
  Norm gains (attention, MLP, q/k norms) keep layer a's in every case.
"""

from __future__ import annotations

import torch
from torch import Tensor

from layerfold.core.model import Block, Model, build_model, require_model
from layerfold.core.spec import LayerSpec, ModelSpec
from layerfold.surgery.plan import MERGE_HOW, DepthPlan, Merge, Replace

NORM_KEYS = ("attn_norm.weight", "mlp_norm.weight", "attn.q_norm.weight", "attn.k_norm.weight")
MLP_KEYS = ("mlp_norm.weight", "mlp.gate.weight", "mlp.up.weight", "mlp.down.weight")


def _copy(t: Tensor) -> Tensor:
    return t.detach().clone().contiguous()


def layer_state(model: Model, i: int) -> dict[str, Tensor]:
    """Layer i's tensors under local names (``attn.q.weight``, ``mlp_norm.weight``...), not copied."""
    return {k: v.detach() for k, v in model.layers[i].state_dict().items()}


# ---- merging --------------------------------------------------------------------------------------
def merge_tensors(ts: list[Tensor], how: str) -> Tensor:
    """One merged tensor from a group's tensors (first = layer a), computed in at least fp32, fresh and contiguous."""
    if how not in MERGE_HOW:
        raise ValueError(f"merge how={how!r} is unknown. Fix: use one of {MERGE_HOW}")
    acc = torch.promote_types(ts[0].dtype, torch.float32)
    base = ts[0].to(acc)
    if how == "consolidate":
        out = base.clone()
        for t in ts[1:]:
            out += t.to(acc) - base  # theta_a + sum_k (theta_k - theta_a), as written
    elif how == "mean":
        out = torch.stack([t.to(acc) for t in ts]).mean(0)
    else:
        out = ts[-1].to(acc).clone()
    return out.to(ts[0].dtype).contiguous()


def merge_layer_states(states: list[dict[str, Tensor]], how: str = "consolidate") -> dict[str, Tensor]:
    """Merge layer state dicts (local names; all the same shapes) of a group a..b into one (norms from a)."""
    if not states:
        raise ValueError("merge of an empty group. Fix: a merge group holds at least one layer")
    keys = set(states[0])
    for s in states[1:]:
        if set(s) != keys or any(s[k].shape != states[0][k].shape for k in keys):
            raise ValueError("merge group: the layers have different shapes (a width-pruned model?). Fix: merge "
                             "only layers of identical shape, or drop layers instead")
    out: dict[str, Tensor] = {}
    for k, t0 in states[0].items():
        if k in NORM_KEYS or len(states) == 1:
            out[k] = _copy(t0)
        else:
            out[k] = merge_tensors([s[k] for s in states], how)
    return out


def merged_block(model: Model, layers: list[int], how: str = "consolidate") -> Block:
    """A stand-alone Block holding the merge of ``layers`` (used by similarity searches before a plan exists)."""
    ls = model.spec.layers[layers[0]]
    blk = Block(ls, model.spec).to(device=model.device, dtype=model.dtype)
    blk.load_state_dict(merge_layer_states([layer_state(model, i) for i in layers], how))
    return blk.eval()


# ---- replacement blocks ---------------------------------------------------------------------------
def mlp_block_spec(src: LayerSpec) -> LayerSpec:
    """A Streamline replacement: pre-norm + SwiGLU FFN of the source layer's shape + residual, no attention."""
    if not (src.has_mlp and src.d_in == src.d_mid == src.d_out) or src.attn_shortcut or src.mlp_shortcut:
        raise ValueError("replace: the init layer has no MLP or changes the residual width. Fix: initialise the "
                         "replacement from a plain decoder layer (set \"init\" in the plan)")
    return LayerSpec(d_in=src.d_in, d_mid=src.d_in, d_out=src.d_in, d_ffn=src.d_ffn, has_attn=False, has_mlp=True,
                     kind="mlp")


def replacement_state(model: Model, r: Replace) -> dict[str, Tensor]:
    """Initial weights of a replacement block: the init layer's MLP with its post-attention norm (``mlp``), or a
    copy of the whole init layer (``decoder``)."""
    src = layer_state(model, r.init_layer)
    if r.block == "mlp":
        return {k: _copy(src[k]) for k in MLP_KEYS}
    return {k: _copy(v) for k, v in src.items()}


# ---- spec from weights ----------------------------------------------------------------------------
def layer_spec_from_state(local: dict[str, Tensor], head_dim: int, kind: str) -> LayerSpec:
    """Read a layer's shapes from its weights (head_dim is not recoverable from shapes: passed in)."""
    has_attn, has_mlp = "attn.q.weight" in local, "mlp.gate.weight" in local
    if has_attn:
        q, k, o = local["attn.q.weight"], local["attn.k.weight"], local["attn.o.weight"]
        d_in, d_mid = q.shape[1], o.shape[0]
        n_heads, n_kv = q.shape[0] // head_dim, k.shape[0] // head_dim
    else:
        d_in = local["mlp.gate.weight"].shape[1]
        d_mid, n_heads, n_kv, head_dim = d_in, 0, 0, 0
    if "attn_shortcut.weight" in local:
        d_in, d_mid = local["attn_shortcut.weight"].shape[1], local["attn_shortcut.weight"].shape[0]
    d_ffn = local["mlp.gate.weight"].shape[0] if has_mlp else 0
    d_out = local["mlp.down.weight"].shape[0] if has_mlp else d_mid
    if "mlp_shortcut.weight" in local:
        d_out = local["mlp_shortcut.weight"].shape[0]
    return LayerSpec(d_in=d_in, d_mid=d_mid, d_out=d_out, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
                     d_ffn=d_ffn, has_attn=has_attn, has_mlp=has_mlp, attn_shortcut="attn_shortcut.weight" in local,
                     mlp_shortcut="mlp_shortcut.weight" in local, kind=kind)


# ---- apply ----------------------------------------------------------------------------------------
def apply_depth_plan(model: Model, plan: DepthPlan) -> Model:
    """Build the pruned model the plan describes: new compact weights, spec derived from them and checked."""
    require_model(model)
    if not isinstance(plan, DepthPlan):
        raise TypeError(f"plan must be a DepthPlan, not {type(plan).__name__}. Fix: DepthPlan.load(path) or a "
                        "method's plan (layerfold.get_method(name))")
    spec = model.spec
    plan.validate(spec.n_layers)
    layers: list[dict[str, Tensor]] = []
    expected: list[LayerSpec] = []
    for op, x in plan.ops():
        if op == "keep":
            layers.append({k: _copy(v) for k, v in layer_state(model, x).items()})
            expected.append(spec.layers[x])
        elif op == "merge":
            assert isinstance(x, Merge)
            if any(spec.layers[i] != spec.layers[x.first] for i in x.layers):
                raise ValueError(f"merge {x.first}-{x.last}: the layers differ in shape. Fix: merge only layers of "
                                 "identical shape (check `layerfold inspect`), or drop layers instead")
            layers.append(merge_layer_states([layer_state(model, i) for i in x.layers], x.how))
            expected.append(spec.layers[x.first])
        else:
            assert isinstance(x, Replace)
            first, last = spec.layers[x.first], spec.layers[x.last]
            if first.d_in != last.d_out:
                raise ValueError(f"replace {x.first}-{x.last}: the window changes the residual width "
                                 f"({first.d_in} -> {last.d_out}). Fix: replace a window of equal-width layers")
            init = spec.layers[x.init_layer]
            layers.append(replacement_state(model, x))
            expected.append(mlp_block_spec(init) if x.block == "mlp" else init)
    new_spec = spec_from_weights(spec, layers, [e.head_dim for e in expected], [e.kind for e in expected])
    for j, (got, want) in enumerate(zip(new_spec.layers, expected, strict=True)):
        assert got == want, f"surgery produced layer {j} = {got}, the plan implies {want}"
    assert new_spec.n_layers == plan.n_layers_after(), (new_spec.n_layers, plan.n_layers_after())
    state: dict[str, Tensor] = {k: _copy(v) for k, v in model.state_dict().items() if not k.startswith("layers.")}
    for j, local in enumerate(layers):
        state.update({f"layers.{j}.{k}": v for k, v in local.items()})
    new = build_model(new_spec, state, device=model.device)
    new.eval()
    return new


def spec_from_weights(base: ModelSpec, layers: list[dict[str, Tensor]], head_dims: list[int],
                      kinds: list[str]) -> ModelSpec:
    specs = [layer_spec_from_state(s, hd, kd) for s, hd, kd in zip(layers, head_dims, kinds, strict=True)]
    try:
        return base.with_layers(specs)
    except ValueError as e:
        raise ValueError(f"the pruned layers do not chain ({e}). Fix: on a width-pruned model drop or merge only "
                         "layers whose neighbours share their residual widths") from None


def drop_layers(model: Model, layers: list[int]) -> Model:
    """Convenience: the model without the given source layers."""
    return apply_depth_plan(model, DepthPlan(n_layers=model.spec.n_layers, drop=tuple(sorted(set(layers)))))


__all__ = ["apply_depth_plan", "drop_layers", "layer_spec_from_state", "layer_state", "merge_layer_states",
           "merge_tensors", "merged_block", "mlp_block_spec", "replacement_state", "spec_from_weights"]
