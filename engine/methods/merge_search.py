"""What LaCo and SLM search with: the similarity of a candidate merged model's output to the dense model's.

A candidate is a partition of the source layers into consecutive groups (``[[0], [1], [2, 3, 4], [5]]``);
each group of more than one layer becomes one merged layer (layerfold.surgery.depth.merge_layer_states). The
representation compared is ``norm(h_L)``: the last layer's output after the final RMSNorm, i.e. what the
LM head reads and what HF's ``hidden_states[-1]`` (used by the public LaCo/SLM code) holds. The final
norm matters on SmolLM2: raw h_L carries a massive activation at sequence position 0 that would
otherwise dominate both measures.

Measures (``sim``), over the calibration samples given:
  - ``final-cosine``: per sample, the cosine between the flattened (T*d) representations of candidate and
    dense, averaged over samples (the public LaCo/SLM code's measure);
  - ``cka``: linear CKA between candidate and dense representations, tokens as examples, minibatch
    unbiased HSIC (Nguyen et al. 2021, kernels/cka.py) with each sample as one minibatch of T tokens.

Cost: the dense hidden states h_0..h_L of the (few) samples are kept, so a candidate is run only from its
lowest merged layer up; results are memoised per candidate, merged blocks kept in a small LRU cache.
"""

from __future__ import annotations

import math
import time
import weakref
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

from layerfold.core.model import Block, Model
from layerfold.core.slot import ModelSlot, held
from layerfold.kernels.cka import (
    cka_from_hsic,
    hsic_accumulate,
    ucentered_gram,
)
from layerfold.surgery.depth import merged_block

SIMILARITIES = ("cka", "final-cosine")
Groups = tuple[tuple[int, ...], ...]


def linear_cka(a: Tensor, b: Tensor) -> float:
    """Minibatch linear CKA between representations a, b (n, T, d): each sample one minibatch of T tokens."""
    acc = None
    for x, y in zip(a, b, strict=True):
        acc = hsic_accumulate(torch.stack([ucentered_gram(x), ucentered_gram(y)]), acc)
    return float(cka_from_hsic(acc)[0, 1])


def final_cosine(a: Tensor, b: Tensor) -> float:
    """Mean over samples of cos(flatten(a_s), flatten(b_s)) for a, b (n, T, d)."""
    return float(torch.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1).mean())


class MergeSimilarity:
    """Both measures of any candidate partition against the dense model, memoised (see the module docstring)."""

    def __init__(self, model: Model, ids: Tensor, how: str = "consolidate", cache_blocks: int = 24):
        # held weakly: the one shared_similarity keeps for the next search must not keep a finished job's
        # dense model (and the hidden states and merged blocks below) alive on the device
        self._model = weakref.ref(model)
        self.how, self.cache_blocks = how, cache_blocks
        self.ids = ids.to(model.device)
        with torch.no_grad():
            h, self._ropes, self._mask = model.prepare(self.ids)
            self.hidden = [h]  # dense h_0..h_L (n, T, d)
            for i in range(model.spec.n_layers):
                h = model.run_layer(i, h, self._ropes, self._mask)
                self.hidden.append(h)
            self._ref = model.norm(h).float()
        self._memo: dict[Groups, dict[str, float]] = {}
        self._blocks: OrderedDict[tuple[int, ...], Block] = OrderedDict()
        self.seconds = 0.0

    @property
    def model(self) -> Model:
        return held(self._model, "MergeSimilarity")

    def close(self) -> None:
        """Drop the dense hidden states, merged blocks and scores (what this holds on the model's device)."""
        self.hidden, self._ref, self._ropes, self._mask = [], None, {}, None
        self._blocks.clear()
        self._memo.clear()

    def _block(self, group: tuple[int, ...]) -> Block:
        if len(group) == 1:
            return self.model.layers[group[0]]
        blk = self._blocks.pop(group, None)
        if blk is None:
            blk = merged_block(self.model, list(group), self.how)
        self._blocks[group] = blk
        while len(self._blocks) > self.cache_blocks:
            self._blocks.popitem(last=False)
        return blk

    def representation(self, groups: Groups) -> Tensor:
        """norm(h_L) of the candidate (n, T, d), computed from its lowest merged layer up."""
        model = self.model  # a clear error once the model (and so this similarity's state) is gone
        lowest = next((p for p, g in enumerate(groups) if len(g) > 1), None)
        if lowest is None:
            return self._ref
        h = self.hidden[groups[lowest][0]]
        with torch.no_grad():
            for g in groups[lowest:]:
                ls = model.spec.layers[g[0]]
                cos, sin = self._ropes.get(ls.head_dim, (None, None)) if ls.has_attn else (None, None)
                h = self._block(g)(h, cos, sin, self._mask)
            return model.norm(h).float()

    def scores(self, groups: list[list[int]] | Groups) -> dict[str, float]:
        key: Groups = tuple(tuple(g) for g in groups)
        if key not in self._memo:
            t0 = time.time()
            rep = self.representation(key)
            self._memo[key] = {"cka": linear_cka(rep, self._ref), "final-cosine": final_cosine(rep, self._ref)}
            self.seconds += time.time() - t0
        return self._memo[key]

    def view(self, measure: str) -> SimView:
        if measure not in SIMILARITIES:
            raise ValueError(f"similarity {measure!r} is unknown. Fix: use one of {SIMILARITIES}")
        return SimView(self, measure)

    @property
    def evaluations(self) -> int:
        return len(self._memo)


class SimView:
    """One measure of a MergeSimilarity as a function of a partition; remembers what this search asked."""

    def __init__(self, base: MergeSimilarity, measure: str):
        self.base, self.measure = base, measure
        self.log: list[dict[str, Any]] = []
        self._asked: set[Groups] = set()

    def __call__(self, groups: list[list[int]] | Groups) -> float:
        key: Groups = tuple(tuple(g) for g in groups)
        s = self.base.scores(key)[self.measure]
        if key not in self._asked:
            self._asked.add(key)
            self.log.append({"merged": [[g[0], g[-1]] for g in key if len(g) > 1], "sim": s})
        return s

    def seen(self) -> list[float]:
        return sorted({e["sim"] for e in self.log if e["sim"] == e["sim"]})


_SHARED = ModelSlot()  # the last MergeSimilarity, closed when its model goes


def shared_similarity(model: Model, ids: Tensor, how: str = "consolidate") -> MergeSimilarity:
    """The last MergeSimilarity built for this model, ids and merge rule, or a new one (several searches in
    one process, e.g. SLM and LaCo at several targets in tools/compare_depth.py, share its memo). It is
    closed, and forgotten, when its model is freed."""
    for s in _SHARED:
        if s._model() is model and s.how == how and s.ids.shape == ids.shape and torch.equal(s.ids.cpu(), ids.cpu()):
            return s
    return _SHARED.keep(model, MergeSimilarity(model, ids, how))


SIM_SAMPLES = 8  # the SLM paper calibrates its similarity with 10 samples x 128 tokens
SIM_SEQ_LEN = 128


def merge_setup(ctx: Any, default_measure: str) -> tuple[int, int, SimView, dict[str, Any]]:
    """What every merge search (SLM, LaCo) starts from: the layer count, the layers to remove, the
    similarity view over the first ``--sim-samples`` x ``--sim-seq-len`` calibration tokens, and the
    options it read (similarity, merge rule, sample shape)."""
    model, opts = ctx.model, ctx.options
    n = int(opts.get("sim_samples") or SIM_SAMPLES)
    T = int(opts.get("sim_seq_len") or SIM_SEQ_LEN)
    measure = opts.get("similarity") or default_measure
    how = opts.get("merge_how") or "consolidate"
    sim = shared_similarity(model, ctx.calib[:n, :T], how).view(measure)
    return model.spec.n_layers, ctx.target.layers_to_remove(model), sim, {"similarity": measure, "how": how,
                                                                           "sim_samples": [n, T]}


def next_threshold(seen: list[float], lo: float, hi: float) -> float | None:
    """The next threshold to try between two already tried, ``lo`` < T < ``hi``, or None.

    A merge is accepted when sim > T, so runs can differ only at observed similarities: the useful
    thresholds are ``just_below(v)`` (accepts v and everything above) for each observed v. This picks the
    median of those strictly between lo and hi; each is tried at most once, so the search ends."""
    cands = sorted({just_below(v) for v in seen if math.isfinite(v)})
    inside = [t for t in cands if lo < t < hi]
    return inside[len(inside) // 2] if inside else None


def just_below(v: float) -> float:
    return math.nextafter(v, -math.inf)


def groups_of(n_layers: int, merges: list[tuple[int, int]]) -> list[list[int]]:
    """Partition of 0..n_layers-1 with the given (first, last) ranges merged."""
    start = {a: b for a, b in merges}
    out, i = [], 0
    while i < n_layers:
        b = start.get(i, i)
        out.append(list(range(i, b + 1)))
        i = b + 1
    return out
