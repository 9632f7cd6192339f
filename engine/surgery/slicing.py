"""SliceGPT mechanics: RMSNorm gain folding, PCA of the residual stream, rotation, slicing.

The residual stream has 2L+1 *points*: point 0 enters layer 0 (the embeddings), point 2i+1 is layer
i's MLP-norm input, point 2i+2 leaves layer i (point 2L feeds the final norm and the head). At every
point p, Q_p holds the eigenvectors of the damped fp64 Gram G_p + 0.01 * mean(diag G_p) I, sorted by
descending eigenvalue, and the sliced model carries h_p Q_p[:, :w_p] (w_p = kept width). In row-vector
form, for one layer with input point a, mid point b, output point c (Qa = Q_a[:, :w_a] etc.)::

    q/k/v      W <- c_a * W diag(g_attn) Qa           (reads the sliced, rotated input)
    o          W <- Qb^T W                             (writes the mid point)
    shortcut   S_attn = Qb^T Qa        (w_b, w_a)      (carries the residual a -> b)
    gate/up    W <- c_b * W diag(g_mlp) Qb
    down       W <- Qc^T W
    shortcut   S_mlp = Qc^T Qb         (w_c, w_b)
    embeddings E <- E Q0[:, :w_0];  head W <- c_L * W diag(g_final) Q_L[:, :w_L] (untied)

c_p = sqrt(d_p / w_p): RMSNorm of a vector sliced to w_p dims averages over w_p, not d_p; after an
orthogonal rotation the vector's norm is unchanged, so dividing by w_p instead of d_p shrinks the
normalised input by sqrt(w_p/d_p) (SliceGPT's RMSN divides by the original d). Folding c_p into the
linears that read the norm restores the dense scale (``norm_scale``; without it SmolLM2-135M sliced by 25%
has val perplexity 47.0 instead of 30.7, and tests show slicing an exactly low-rank stream is exact only with it).

Order (as SliceGPT): each Q is computed from signals of the *already sliced* prefix, layer by layer,
one layer's weights on the device at a time, calibration hidden states on the host. Per layer, pass
1 runs the rotated attention (o not yet rotated) and collects the mid point in the dense basis; pass 2
runs the rotated MLP (down not yet rotated) on the sliced mid point. Both signals are exactly what
the final sliced model computes (the rotations of o and down are linear and applied afterwards).

``basis``: "point" is SliceGPT (a PCA per point, two shortcut matrices per layer). "layer" keeps the
input point's basis (and width) at the mid point, so the attention shortcut is the identity and is
dropped: one shortcut per layer. "global" uses one basis everywhere (PCA of the dense model's Grams at
all points, each scaled to unit trace): with equal widths no shortcut is left inside the stack.

``keep_ends`` leaves points 0 and 2L in the dense basis at full width: the embeddings, final norm and
head stay as they are, so a tied head stays tied (on SmolLM2-135M the tied 49152 x 576 embedding is 21%
of the model: untying it to rotate the head would cost more parameters than 25% slicing saves).
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from layerfold.core.model import MLP, Attention, Model, RMSNorm, build_model, require_model
from layerfold.core.spec import ModelSpec
from layerfold.core.streaming import LayerStream
from layerfold.surgery.slice_plan import (
    MAX_FRACTION,
    SlicePlan,
    count_params,
    dynamic_fractions,
    plan_widths,
    point_dims,
    round_width,
    sliced_spec,
)

PCA_TOKENS = ("all", "skip-first", "token-norm")
BASES = ("point", "layer", "global")  # a PCA basis per residual point (SliceGPT), per layer, or one for all


# ---- statistics ----------------------------------------------------------------------------------
def _gram_acc(x: Tensor, mode: str, acc: tuple[Tensor, Tensor, Tensor] | None):
    """Add this batch (B, T, d) to the Gram accumulator, honouring the PCA token mode."""
    from layerfold.kernels import gram_accumulate

    mask = None
    if mode == "skip-first" and x.shape[1] > 1:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        mask[:, 0] = False
    elif mode == "token-norm":
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return gram_accumulate(x.float(), mask, acc)


def pca(gram: Tensor, damp: float = 0.01) -> tuple[Tensor, Tensor]:
    """(eigenvalues descending, eigenvectors as columns) of the damped fp64 Gram."""
    g = gram.double()
    g = (g + g.T) / 2
    g = g + damp * g.diagonal().mean() * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    vals, vecs = torch.linalg.eigh(g)
    order = torch.argsort(vals, descending=True)
    return vals[order], vecs[:, order]


def _energy(vals: Tensor, w: int) -> float:
    return float(vals[:w].sum() / vals.sum())


# ---- the layer-by-layer pass ---------------------------------------------------------------------
def _module(cls: type, state: dict[str, Tensor], *args: Any) -> torch.nn.Module:
    with torch.device("meta"):
        m = cls(*args)
    m.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    return m.eval()


def _sub(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@torch.no_grad()
def slice_model(model: Model, calib: Tensor, plan: SlicePlan, *, device: str | torch.device | None = None,
                batch_size: int = 8, progress: bool = False) -> tuple[Model, dict[str, Any]]:
    """Rotate and slice ``model`` (not modified) with PCA bases from ``calib`` ids (n, T); returns the
    sliced model (the input's dtype, on its device) and a report (energy kept per point, times, params)."""
    from layerfold.core.console import progress as bar

    require_model(model)
    if not isinstance(plan, SlicePlan):
        raise TypeError(f"plan must be a SlicePlan, not {type(plan).__name__}. Fix: build one with plan_widths()")
    if not isinstance(calib, Tensor) or calib.is_floating_point() or calib.dim() != 2:
        raise TypeError("calib must be token ids, an integer tensor (n, T). Fix: pass "
                        "layerfold.core.data.calib_batches(tokenizer) or the like")
    spec = model.spec
    L, dims, w = spec.n_layers, point_dims(spec), plan.widths
    if len(w) != 2 * L + 1 or any(not 0 < wi <= di for wi, di in zip(w, dims, strict=False)):
        raise ValueError(f"plan widths {list(w)[:5]}... do not fit the model's {2 * L + 1} residual widths "
                         f"{dims[:3]}... Fix: build the plan with plan_widths() for this model")
    if plan.pca_tokens not in PCA_TOKENS:
        raise ValueError(f"pca_tokens={plan.pca_tokens!r}. Fix: use one of {PCA_TOKENS}")
    if plan.basis not in BASES or (plan.basis == "global" and len(set(dims)) > 1):
        raise ValueError(f"basis={plan.basis!r} (residual widths {sorted(set(dims))}). Fix: use one of {BASES}; "
                         "'global' needs one residual width throughout")
    if plan.keep_ends and (w[0] != dims[0] or w[-1] != dims[-1]):
        raise ValueError("keep_ends needs full width at the embeddings and the final point. Fix: set "
                         "widths[0] and widths[-1] to the model's widths or keep_ends=False")
    if calib.dim() != 2 or calib.shape[0] == 0:
        raise ValueError(f"calibration ids have shape {tuple(calib.shape)}. Fix: pass (n_samples, seq_len) ids")
    dev = torch.device(device) if device is not None else model.device
    t0 = time.perf_counter()
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    run = LayerStream(model, dev, torch.float32)
    batches = list(calib.split(batch_size))
    out: dict[str, Tensor] = {}
    energy: list[float | None] = []
    # each sliced tensor goes to the output's dtype and device as soon as it is made (float64 copies of every
    # layer kept to the end peaked at 84.5 GB for a 13.8 GB 7B model on an H200)
    done = lambda t: t.to(device=model.device, dtype=model.dtype)

    def basis(acc, p: int, fixed: Tensor | None = None) -> Tensor:
        """Q at point p: ``fixed`` (the dense basis, a reused or the global basis) or the PCA of ``acc``."""
        if fixed is not None:
            energy.append(1.0 if w[p] == dims[p] else None)  # None: not measured for a reused basis
            return fixed
        vals, vecs = pca(acc[0], plan.damp)
        energy.append(_energy(vals, w[p]))
        return vecs

    Qg = _global_basis(model, batches, plan, dev) if plan.basis == "global" else None
    # point 0: the embeddings
    emb = sd["embed.weight"]
    acc = None
    if not plan.keep_ends and Qg is None:
        for ids in batches:
            acc = _gram_acc(emb[ids].to(dev), plan.pca_tokens, acc)
    Q = basis(acc, 0, torch.eye(dims[0], dtype=torch.float64, device=dev) if plan.keep_ends else Qg)
    Qs = Q[:, :w[0]]
    out["embed.weight"] = emb if plan.keep_ends else done(emb.to(dev).double() @ Qs)
    X = [(emb[ids].to(dev).double() @ Qs).float().cpu() for ids in batches]

    layers = []
    it = bar(range(L), desc="slice", total=L, enabled=progress)
    for i in it:
        X, Q, new, ls_new = _slice_layer(i, spec, _sub(sd, f"layers.{i}."), X, Q, plan, run, basis, Qg, done,
                                         last=i == L - 1)
        out.update({f"layers.{i}.{k}": v for k, v in new.items()})
        layers.append(ls_new)

    # point 2L: final norm and head
    if plan.keep_ends:
        out["norm.weight"] = sd["norm.weight"]
        if not spec.tie_embeddings:
            out["lm_head.weight"] = sd["lm_head.weight"]
    else:
        head = sd["embed.weight"] if spec.tie_embeddings else sd["lm_head.weight"]
        c = math.sqrt(dims[-1] / w[-1]) if plan.norm_scale else 1.0
        h = head.to(dev, torch.float64, copy=True).mul_(sd["norm.weight"].to(dev).double()).mul_(c)
        out["lm_head.weight"] = done(h @ Q[:, :w[-1]])
        del h
        out["norm.weight"] = torch.ones(w[-1], dtype=torch.float64)
    new_spec = spec.with_layers(layers, d_model=w[0], tie_embeddings=spec.tie_embeddings and plan.keep_ends)
    state = {k: done(v).contiguous() for k, v in out.items()}
    del out
    sliced = build_model(new_spec, state, device=model.device, dtype=model.dtype).eval()
    info = {"energy_kept": [None if e is None else round(e, 6) for e in energy], "basis": plan.basis,
            "slice_seconds": round(time.perf_counter() - t0, 2),
            "calibration": {"samples": int(calib.shape[0]), "seq_len": int(calib.shape[1]),
                            "tokens": int(calib.numel())},
            "dropped_identity_shortcuts": sum((not l.attn_shortcut) + (not l.mlp_shortcut) for l in layers),
            "params_dense": count_params(spec), "params": count_params(new_spec)}
    return sliced, info


def _slice_layer(i: int, spec: ModelSpec, lw: dict[str, Tensor], X: list[Tensor], Q_in: Tensor, plan: SlicePlan,
                 run: LayerStream, basis: Any, Qg: Tensor | None, done: Any,
                 last: bool) -> tuple[list[Tensor], Tensor, dict[str, Tensor], Any]:
    """Rotate and slice layer i given its rotated, sliced inputs X (host batches, consumed) and the input basis.
    ``lw`` holds the layer's weights as they are: each matrix is upcast to float64 only while it is rotated,
    and each sliced weight leaves through ``done`` (the output's dtype and device) as soon as it is made, so
    one matrix's float64 copies and one layer's float32 modules are the working set."""
    ls, dims, w = spec.layers[i], point_dims(spec), plan.widths
    a, b, c = 2 * i, 2 * i + 1, 2 * i + 2
    dev = Q_in.device
    scale = (lambda p: math.sqrt(dims[p] / w[p])) if plan.norm_scale else (lambda p: 1.0)
    f64 = lambda k: lw[k].to(dev).double()
    Qa = Q_in[:, :w[a]]
    new: dict[str, Tensor] = {}
    mod: dict[str, Tensor] = {}  # float32 weights of the module the passes run

    def put(name: str, t: Tensor) -> None:
        """A sliced float64 weight: to the output (and, in float32, to the module run on the device)."""
        new[name] = done(t)
        mod[name] = new[name] if new[name].dtype == torch.float32 and new[name].device == dev else t.float()

    def fold(name: str, g: Tensor, s: float, Q: Tensor) -> Tensor:  # s * (W * g) @ Q, one float64 copy of W
        return lw[name].to(dev, torch.float64, copy=True).mul_(g).mul_(s) @ Q

    R1 = f64("attn_shortcut.weight") @ Qa if ls.attn_shortcut else Qa  # (d_mid, w_a): residual a -> dense mid
    attn = None
    if ls.has_attn:
        g = f64("attn_norm.weight")
        for n in ("q", "k", "v"):
            put(f"attn.{n}.weight", fold(f"attn.{n}.weight", g, scale(a), Qa))
            if f"attn.{n}.bias" in lw:
                put(f"attn.{n}.bias", f64(f"attn.{n}.bias"))
        for n in ("q_norm", "k_norm"):
            if f"attn.{n}.weight" in lw:
                put(f"attn.{n}.weight", f64(f"attn.{n}.weight"))
        new["attn_norm.weight"] = done(torch.ones(w[a], dtype=torch.float64, device=dev))
        tmp = replace(ls, d_in=w[a])
        attn = _module(Attention, {**_sub(mod, "attn."), "o.weight": lw["attn.o.weight"]}, tmp, spec)
        norm_a = RMSNorm(w[a], spec.norm_eps).to(dev)
    R1f = R1.float()

    # pass 1: the mid point in the dense basis. Without attention it equals the input point, and bases
    # "layer"/"global" ask for it: keep the input's basis there, so that (at equal widths) the attention
    # shortcut is the identity and is dropped
    reuse = (attn is None or plan.basis != "point") and not ls.attn_shortcut and w[b] == w[a]
    mids, acc = [], None
    for x in X:
        xd = x.to(dev)
        B, T, _ = xd.shape
        m = xd @ R1f.T
        if attn is not None:
            cos, sin = run.rope_for(ls.head_dim, torch.arange(T, device=dev)[None].expand(B, T))
            m = m + attn(norm_a(xd), cos, sin, run.mask(T), None, 0)
        if not reuse:
            acc = _gram_acc(m, plan.pca_tokens, acc)
        mids.append(m.cpu())
        del xd, m
    X.clear()
    attn = None
    mod.clear()
    Qb = basis(acc, b, Q_in if reuse else None)[:, :w[b]]
    del acc
    S_attn = Qb.T @ R1
    del R1, R1f
    if ls.has_attn:
        new["attn.o.weight"] = done(Qb.T @ f64("attn.o.weight"))
    Qbf = Qb.float()
    for j, m in enumerate(mids):
        mids[j] = (m.to(dev) @ Qbf).cpu()

    R2 = f64("mlp_shortcut.weight") @ Qb if ls.mlp_shortcut else Qb  # (d_out, w_b)
    mlp = None
    if ls.has_mlp:
        g = f64("mlp_norm.weight")
        for n in ("gate", "up"):
            put(f"mlp.{n}.weight", fold(f"mlp.{n}.weight", g, scale(b), Qb))
        new["mlp_norm.weight"] = done(torch.ones(w[b], dtype=torch.float64, device=dev))
        mlp = _module(MLP, {**_sub(mod, "mlp."), "down.weight": lw["mlp.down.weight"]}, w[b], ls.d_ffn, ls.d_out)
        norm_b = RMSNorm(w[b], spec.norm_eps).to(dev)
    R2f = R2.float()

    # pass 2: the output point in the dense basis
    outs, acc = mids, None  # each mid is replaced by its output
    keep_dense = plan.keep_ends and last
    for j, m in enumerate(mids):
        md = m.to(dev)
        o = md @ R2f.T
        if mlp is not None:
            o = o + mlp(norm_b(md))
        if not keep_dense and Qg is None:
            acc = _gram_acc(o, plan.pca_tokens, acc)
        outs[j] = o.cpu()
        del md, o
    mlp = None
    mod.clear()
    Q_out = basis(acc, c, torch.eye(dims[c], dtype=torch.float64, device=dev) if keep_dense else Qg)
    del acc
    Qc = Q_out[:, :w[c]]
    S_mlp = Qc.T @ R2
    del R2, R2f
    if ls.has_mlp:
        new["mlp.down.weight"] = done(Qc.T @ f64("mlp.down.weight"))
    Qcf = Qc.float()
    for j, o in enumerate(outs):
        outs[j] = (o.to(dev) @ Qcf).cpu()

    keep_a, keep_m = not _is_identity(S_attn), not _is_identity(S_mlp)
    if keep_a:
        new["attn_shortcut.weight"] = done(S_attn)
    if keep_m:
        new["mlp_shortcut.weight"] = done(S_mlp)
    ls_new = replace(ls, d_in=w[a], d_mid=w[b], d_out=w[c], attn_shortcut=keep_a, mlp_shortcut=keep_m)
    return outs, Q_out, new, ls_new


def _global_basis(model: Model, batches: list[Tensor], plan: SlicePlan, dev: torch.device) -> Tensor:
    """One basis for every point: PCA of the sum of the dense model's Grams at all points, each scaled to
    unit trace so that no layer (nor the massive late-layer activations) dominates."""
    L = model.spec.n_layers
    accs: list[Any] = [None] * (2 * L + 1)
    for ids in batches:
        h, ropes, mask = model.prepare(ids.to(model.device))
        pts = [h]
        for i in range(L):
            taps: dict[str, Tensor] = {}
            h = model.run_layer(i, h, ropes, mask, taps=taps)
            pts += [taps["mlp_in"], h]
        for p, x in enumerate(pts):
            if not plan.keep_ends or 0 < p < 2 * L:
                accs[p] = _gram_acc(x.to(dev), plan.pca_tokens, accs[p])
    g = sum(a[0].double() / a[0].diagonal().sum() for a in accs if a is not None)
    return pca(g, plan.damp)[1]


def _is_identity(S: Tensor, tol: float = 1e-6) -> bool:
    """A square shortcut equal to the identity is dropped: the residual then passes through as is."""
    return S.shape[0] == S.shape[1] and bool((S - torch.eye(S.shape[0], dtype=S.dtype, device=S.device))
                                             .abs().max() <= tol)


__all__ = ["BASES", "MAX_FRACTION", "PCA_TOKENS", "SlicePlan", "count_params", "dynamic_fractions", "pca",
           "plan_widths", "point_dims", "round_width", "slice_model", "sliced_spec"]
