"""LLM-Streamline (seed 002): replace the most redundant window of n layers by one trained block.

Window: the start j maximising the mean token-wise cos(h_j, h_{j+n}) from the calibration statistics
(``Stats.window_scores(n)``, so calibrate with window >= n); layers j..j+n-1 are removed.

Replacement (``--replacement``): ``mlp`` (default; a SwiGLU FFN of the model's own shape with its own
pre-norm and residual, initialised from layer j's MLP and post-attention norm) or ``decoder`` (a decoder
layer initialised from layer j). It is trained to map h_j to h_{j+n}:

  - pairs (h_j, h_{j+n}) are computed per micro-batch by running the dense model's first j+n layers on
    the calibration ids; nothing holds the hidden states of the whole set. With ``--pair-cache disk``
    (default) the first epoch also spills each micro-batch's pair to a temporary memory-mapped file that
    later epochs read one micro-batch at a time (removed afterwards); ``none`` recomputes every epoch.
  - loss (``--loss``): ``relative`` (default) = mean over tokens of ||pred - h_{j+n}||^2 / ||h_{j+n}||^2;
    ``mse`` = plain mean squared error in raw units. SmolLM2 carries a massive activation at sequence
    position 0 (norm ~23,000 against ~200 elsewhere) from about layer 12: raw MSE is dominated by that
    one position (and was seen to spike); the relative loss weighs every token alike.
    ``--skip-first`` drops position 0 from the loss (then the block is free to get it wrong).
  - AdamW, cosine from lr to 5e-5, weight decay 1e-3, gradient clipping at 1.0. The paper's peak lr is
    2e-4 (for 7B models and many steps). With the few hundred steps of the default budget it under-trains:
    measured on SmolLM2-135M, 8 layers, 320 steps of 256 tokens, relative loss: lr 2e-4 -> held-out relative
    error 0.168, val ppl 43.7; lr 1e-3 -> 0.124, ppl 32.1 (ShortGPT: 54.0); the depth ablations in
    docs/RESULTS.md (tools/compare_depth.py --ablations) agree. layerfold defaults to 1e-3;
    ``--lr 2e-4`` reproduces the paper's setting.
"""

from __future__ import annotations

import argparse
import atexit
import math
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from layerfold.core.model import Model
from layerfold.core.slot import ModelSlot, held
from layerfold.core.streaming import LayerStream
from layerfold.methods.base import Method, PruneContext, PruneResult, register
from layerfold.surgery.depth import apply_depth_plan
from layerfold.surgery.plan import DepthPlan, Replace

LR, LR_END, WD, CLIP = 1e-3, 5e-5, 1e-3, 1.0  # see the module docstring for the lr
EPOCHS = 5  # passes over the calibration set (64 x 256 tokens: 320 steps of 256 tokens)
MICRO_BATCH = 4  # sequences per dense forward (pair computation)
TOKEN_BATCH = 256  # tokens per optimizer step, MLP block
TRAIN_BATCH = 1  # sequences per optimizer step, decoder block


def choose_window(stats: Any, n: int, n_layers: int) -> tuple[int, list[float]]:
    """(j, scores): the start whose cos(h_j, h_{j+n}) is highest."""
    if stats is None:
        raise ValueError("streamline needs calibration statistics (window cosines). Fix: let prune calibrate, or "
                         f"pass --stats DIR calibrated with --window {n} or more")
    if getattr(stats, "window", n) < n:
        raise ValueError(f"streamline removes {n} layers but the statistics hold cosines only up to "
                         f"{stats.window} layers apart. Fix: recalibrate with --window {n} (or more)")
    cw = torch.as_tensor(stats.cos_window, dtype=torch.float64)
    if cw.shape[0] != n_layers:
        raise ValueError(f"the statistics describe {cw.shape[0]} layers, the model has {n_layers}. Fix: calibrate "
                         "this model")
    scores = cw[:, n - 1]
    valid = torch.nan_to_num(scores, nan=-math.inf)
    valid[n_layers - n + 1:] = -math.inf
    j = int(valid.argmax())
    return j, [float(x) for x in scores]


def token_loss(pred: Tensor, target: Tensor, kind: str, skip_first: bool) -> Tensor:
    """Mean over tokens of the per-token error (see the module docstring)."""
    if skip_first:
        pred, target = pred[:, 1:], target[:, 1:]
    err = (pred.float() - target.float()).pow(2).sum(-1)  # (B, T)
    if kind == "relative":
        return (err / target.float().pow(2).sum(-1).clamp_min(1e-6)).mean()
    if kind == "mse":
        return err.mean() / pred.shape[-1]
    raise ValueError(f"loss {kind!r} is unknown. Fix: use relative or mse")


class PairStream:
    """(h_j, h_{j+n}) per micro-batch of calibration ids, from the dense model; optionally spilled to disk.

    ``device``: compute there with the dense weights streamed from where they are, one layer at a time
    (core.streaming.LayerStream; a dense model kept in host memory); None runs the model where it is.

    The stream holds the dense model weakly: the one ``shared_pairs`` keeps for the next call must not keep
    a model alive after its caller drops it (it kept a prune job's 13.8 GB dense 7B on the GPU through the
    next job of the process: dynamic slicing run after Streamline peaked 13 GB over its own need)."""

    def __init__(self, dense: Model, ids: Tensor, j: int, n: int, micro_batch: int, cache: str = "disk",
                 device: str | torch.device | None = None):
        self._dense = weakref.ref(dense)
        self.ids, self.j, self.n, self.mb, self.cache = ids, j, n, micro_batch, cache
        self.device = None if device is None else torch.device(device)
        self._src: LayerStream | None = None  # built on first use (it holds the weights' tensors)
        self._dir: Path | None = None
        self._files: tuple[np.memmap, np.memmap] | None = None
        self._filled = 0

    @property
    def dense(self) -> Model:
        return held(self._dense, "PairStream")

    def _compute(self, b0: int, b1: int) -> tuple[Tensor, Tensor]:
        if self.device is not None:
            return self._streamed(b0, b1)
        m = self.dense
        with torch.no_grad():
            h, ropes, mask = m.prepare(self.ids[b0:b1].to(m.device))
            x = None
            for i in range(self.j + self.n):
                if i == self.j:
                    x = h
                h = m.run_layer(i, h, ropes, mask)
            return (h if x is None else x), h

    @torch.no_grad()
    def _streamed(self, b0: int, b1: int) -> tuple[Tensor, Tensor]:
        if self._src is None:
            self._src = LayerStream(self.dense, self.device)
        src = self._src
        h, ropes, mask = src.prepare(self.ids[b0:b1])
        x = h
        for i, block in src.blocks(self.j + self.n):
            if i == self.j:
                x = h
            h = block(h, *src.cos_sin(ropes, i), mask)
        return x, h

    def epoch(self, shuffle: bool = False) -> Any:
        """Yield (h_j, h_{j+n}) per micro-batch; cached micro-batches come in random order when ``shuffle``."""
        N, T = self.ids.shape
        d = self.dense.spec.layers[self.j].d_in
        starts = list(range(0, N, self.mb))
        if shuffle and self._files is not None and self._filled >= N:
            starts = [starts[i] for i in torch.randperm(len(starts)).tolist()]
        for b0 in starts:
            b1 = min(b0 + self.mb, N)
            if self._files is not None and b1 <= self._filled:
                xs, ys = self._files
                yield torch.from_numpy(np.array(xs[b0:b1])), torch.from_numpy(np.array(ys[b0:b1]))
                continue
            x, y = self._compute(b0, b1)
            if self.cache == "disk":
                if self._files is None:
                    self._dir = Path(tempfile.mkdtemp(prefix="layerfold-streamline-"))
                    self._files = tuple(np.lib.format.open_memmap(self._dir / f"{nm}.npy", mode="w+",
                                                                  dtype=np.float32, shape=(N, T, d))
                                        for nm in ("x", "y"))  # type: ignore[assignment]
                self._files[0][b0:b1] = x.float().cpu().numpy()
                self._files[1][b0:b1] = y.float().cpu().numpy()
                self._filled = b1
            yield x, y

    def close(self) -> None:
        """Remove the disk cache and drop the streamed weights' references (a later epoch computes again)."""
        self._files, self._filled, self._src = None, 0, None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def _minibatches(x: Tensor, y: Tensor, per_token: bool, size: int, skip_first: bool) -> Any:
    """Shuffled training batches of one micro-batch pair: token chunks for an MLP block (tokens are
    independent there), whole sequences for a decoder block (attention needs them)."""
    if per_token:
        if skip_first:
            x, y = x[:, 1:], y[:, 1:]
        xf, yf = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        perm = torch.randperm(xf.shape[0])
        for s0 in range(0, xf.shape[0], size):
            sel = perm[s0:s0 + size]
            yield xf[sel][None], yf[sel][None], False  # (1, n, d); position 0 already handled
    else:
        perm = torch.randperm(x.shape[0])
        for s0 in range(0, x.shape[0], size):
            sel = perm[s0:s0 + size]
            yield x[sel], y[sel], skip_first


def train_replacement(dense: Model, pruned: Model, index: int, j: int, n: int, ids: Tensor, *,
                      epochs: int = EPOCHS, micro_batch: int = MICRO_BATCH, token_batch: int = TOKEN_BATCH,
                      train_batch: int = TRAIN_BATCH, loss: str = "relative", skip_first: bool = False, lr: float = LR,
                      lr_end: float = LR_END, weight_decay: float = WD, clip: float = CLIP, pair_cache: str = "disk",
                      seed: int = 0, progress: bool = False, log_every: int = 10,
                      pairs: PairStream | None = None, device: str | torch.device | None = None) -> dict[str, Any]:
    """Train ``pruned.layers[index]`` (in place) to map the dense h_j to h_{j+n}; returns the training log.

    ``pairs``: a PairStream for the same (ids, j, n) to reuse (its disk cache survives; the caller closes it).
    ``device``: train there, with the dense model streamed from where it is (models kept in host memory: the
    block goes to the device for its training and back afterwards); None trains where the models are.

    An MLP block trains on shuffled chunks of ``token_batch`` tokens, a decoder block on ``train_batch``
    whole sequences; the learning rate follows a cosine from ``lr`` to ``lr_end`` over all steps."""
    from layerfold.core.console import progress as bar

    torch.manual_seed(seed)
    block = pruned.layers[index]
    ls = pruned.spec.layers[index]
    per_token = not ls.has_attn
    pruned.requires_grad_(False)
    home = pruned.device
    dev = home if device is None else torch.device(device)
    block.to(dev)
    params = list(block.parameters())
    for p in params:
        p.requires_grad_(True)
    dtype = params[0].dtype
    N, T = ids.shape
    spans = [(b, min(b + micro_batch, N)) for b in range(0, N, micro_batch)]
    tok_mb = lambda m: m * (T - (1 if skip_first else 0))
    per_epoch = sum(math.ceil(tok_mb(b1 - b0) / token_batch) if per_token else math.ceil((b1 - b0) / train_batch)
                    for b0, b1 in spans)
    total = max(1, epochs * per_epoch)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (lr_end + 0.5 * (lr - lr_end) * (1 + math.cos(math.pi * min(s, total) / total))) / lr)
    stream = pairs or PairStream(dense, ids, j, n, micro_batch, pair_cache, device=device)
    if (stream.j, stream.n, stream.mb) != (j, n, micro_batch) or not torch.equal(stream.ids, ids):
        raise ValueError("train_replacement: the pair stream was built for another window or data. Fix: pass the "
                         "PairStream made for these ids, j and n (or none)")
    ropes = pruned.rope(torch.arange(T, device=dev)[None], dtype)
    cos, sin = ropes.get(ls.head_dim, (None, None)) if ls.has_attn else (None, None)
    history: list[dict[str, float]] = []
    step, t0, t_pairs = 0, time.time(), 0.0
    block.train()
    ticks = iter(bar(range(total), desc=f"train {ls.kind} block", total=total, enabled=progress))
    try:
        for ep in range(epochs):
            tp = time.time()
            for x, y in stream.epoch(shuffle=ep > 0):
                t_pairs += time.time() - tp
                x, y = x.to(dev, dtype), y.to(dev, dtype)
                for xb, yb, skip in _minibatches(x, y, per_token, token_batch if per_token else train_batch,
                                                 skip_first):
                    pred = block(xb, cos, sin, None)  # rotary tables (1, 1, T, hd) broadcast
                    lv = token_loss(pred, yb, loss, skip)
                    opt.zero_grad(set_to_none=True)
                    lv.backward()
                    gn = torch.nn.utils.clip_grad_norm_(params, clip)
                    opt.step()
                    sched.step()
                    step += 1
                    next(ticks, None)
                    if step % log_every == 0 or step == total:
                        history.append({"step": step, "epoch": ep, "loss": float(lv.detach()), "grad_norm": float(gn),
                                        "lr": opt.param_groups[0]["lr"]})
                tp = time.time()
    finally:
        if pairs is None:
            stream.close()
        block.eval()
        for p in params:
            p.requires_grad_(False)
        block.to(home)
    return {"steps": step, "epochs": epochs, "loss_kind": loss, "skip_first": skip_first,
            "tokens_per_epoch": N * T, "train_seconds": time.time() - t0, "pair_seconds": t_pairs,
            "final_loss": history[-1]["loss"] if history else None, "history": history,
            "optimizer": {"name": "AdamW", "lr": lr, "lr_end": lr_end, "schedule": "cosine",
                          "weight_decay": weight_decay, "clip": clip, "micro_batch": micro_batch,
                          "batch": f"{token_batch} tokens" if per_token else f"{train_batch} sequences",
                          "pair_cache": pair_cache}}


@torch.no_grad()
def replacement_error(dense: Model, pruned: Model, index: int, j: int, n: int, ids: Tensor,
                      micro_batch: int = MICRO_BATCH) -> dict[str, float]:
    """Mean relative per-token error of the block on ``ids`` (e.g. held-out calibration), pos 0 apart."""
    stream = PairStream(dense, ids, j, n, micro_batch, "none")
    block, ls = pruned.layers[index], pruned.spec.layers[index]
    ropes = pruned.rope(torch.arange(ids.shape[1], device=pruned.device)[None], pruned.dtype)
    cos, sin = ropes.get(ls.head_dim, (None, None)) if ls.has_attn else (None, None)
    rel0, rel, cnt = 0.0, 0.0, 0
    for x, y in stream.epoch():
        B = x.shape[0]
        pred = block(x, cos, sin, None)
        e = (pred - y).float().pow(2).sum(-1) / y.float().pow(2).sum(-1).clamp_min(1e-6)
        rel0 += float(e[:, 0].sum())
        rel += float(e[:, 1:].sum())
        cnt += B
    return {"rel_err_pos0": rel0 / cnt, "rel_err_rest": rel / (cnt * (ids.shape[1] - 1))}


def plan_for(model: Model, stats: Any, k: int, replacement: str) -> DepthPlan:
    L = model.spec.n_layers
    j, scores = choose_window(stats, k, L)
    return DepthPlan(n_layers=L, replace=(Replace(j, j + k - 1, replacement),), method="streamline",
                     notes={"window_start": j, "window_cos": scores[j],
                            "cos_h_j_h_j+n": [round(x, 6) if x == x else None for x in scores],
                            "criterion": f"max cos(h_j, h_j+{k})"}).validate(L)


def run(ctx: PruneContext) -> PruneResult:
    t0 = time.time()
    model, opts = ctx.model, ctx.options
    replacement = opts.get("replacement") or "mlp"
    # the replacement adds one block's parameters back: count them when the target is a parameter fraction
    L = model.spec.n_layers
    per_layer = [sum(p.numel() for p in b.parameters()) for b in model.layers]
    mlp_size = sum(p.numel() for p in model.layers[0].mlp.parameters()) + model.spec.d_model \
        if model.layers[0].mlp is not None else 0
    extra = mlp_size if replacement == "mlp" else per_layer[0]
    k = ctx.target.layers_to_remove(model, lambda k: k * sum(per_layer) / L - extra)
    plan = plan_for(model, ctx.stats, k, replacement)
    new = apply_depth_plan(model, plan)
    r = plan.replace[0]
    info: dict[str, Any] = {"window": [r.first, r.last], "replacement": replacement}
    if not opts.get("no_train"):
        topts = train_options(opts)
        dev = ctx.device if ctx.weights == "host" else None  # stream the dense weights to the device
        pairs = shared_pairs(model, ctx.calib, r.first, k, MICRO_BATCH, dev) \
            if topts.get("pair_cache", "disk") == "disk" else None
        info["training"] = train_replacement(model, new, r.first, r.first, k, ctx.calib, **topts, seed=ctx.seed,
                                             progress=ctx.progress, pairs=pairs, device=dev)
    info["seconds"] = time.time() - t0
    return PruneResult(new, plan.to_dict(), plan.layer_map(), plan.changed_layers(), info)


_PAIRS = ModelSlot()  # the last disk-cached PairStream, closed when its model goes


def shared_pairs(dense: Model, ids: Tensor, j: int, n: int, micro_batch: int,
                 device: str | torch.device | None = None) -> PairStream:
    """The last disk-cached PairStream if it is for this model, ids and window, else a new one (the old one's
    files are removed). Several replacements of one window (mlp, decoder, ablations) then compute the dense
    pairs once; the files go with the model (when nothing else holds it) or at exit."""
    for p in _PAIRS:
        if p._dense() is dense and (p.j, p.n, p.mb) == (j, n, micro_batch) and p.ids.shape == ids.shape \
                and torch.equal(p.ids, ids) and p.device == (None if device is None else torch.device(device)):
            return p
    return _PAIRS.keep(dense, PairStream(dense, ids, j, n, micro_batch, "disk", device=device))


@atexit.register
def _close_pairs() -> None:
    for p in _PAIRS:
        p.close()


def train_options(opts: dict[str, Any]) -> dict[str, Any]:
    """The training keywords of ``train_replacement`` found in method options (CLI dests)."""
    keys = {"epochs": "epochs", "loss": "loss", "skip_first": "skip_first", "lr": "lr", "pair_cache": "pair_cache",
            "token_batch": "token_batch", "train_batch": "train_batch"}
    return {k: opts[o] for k, o in keys.items() if opts.get(o) is not None}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replacement", choices=("mlp", "decoder"), default=None,
                   help="streamline: the replacement block (default mlp)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"streamline: passes over the calibration set (default {EPOCHS})")
    p.add_argument("--loss", choices=("relative", "mse"), default=None,
                   help="streamline: per-token relative error (default) or raw MSE")
    p.add_argument("--skip-first", action="store_true", default=None,
                   help="streamline: leave sequence position 0 out of the loss")
    p.add_argument("--lr", type=float, default=None, help=f"streamline: peak learning rate (default {LR})")
    p.add_argument("--pair-cache", choices=("disk", "none"), default=None,
                   help="streamline: spill hidden-state pairs to a temporary file after the first epoch (default) "
                        "or recompute them every epoch")
    p.add_argument("--token-batch", type=int, default=None,
                   help=f"streamline: tokens per optimizer step for an mlp block (default {TOKEN_BATCH})")
    p.add_argument("--train-batch", type=int, default=None,
                   help=f"streamline: sequences per optimizer step for a decoder block (default {TRAIN_BATCH})")
    p.add_argument("--no-train", action="store_true", default=None,
                   help="streamline: keep the replacement at its initialisation (for ablations)")


register(Method(name="streamline", fn=run, kind="depth", needs_stats=True, add_args=add_args,
                help="LLM-Streamline: replace the most redundant window of layers by one trained block"))
