"""The next token of every row of a step at once: :func:`sample_batch`, what ``sampling.sample_each`` runs.

The rules are ``sampling.sample_row``'s, row by row (shaping, then the argmax below TEMPERATURE_FLOOR, else
temperature, min-p, top-k, the top-p nucleus of what is left, and a draw), done for all rows in a fixed number
of tensor operations on the logits' device with one host read-back at the end (tokens and error flags);
sorting the sampled rows in one call replaces a sort, softmax and multinomial per row, and the per-row host
syncs (a NaN check, ``multinomial``'s own checks, ``int(...)``) go. At 64 rows on a GPU the Python loop cost
~60 ms a step, ~8x the model's decode step.

The draw is multinomial's own (its one-sample path): the token maximising p / q for q ~ Exp(1) drawn per
entry (of the sorted probabilities where a cut sorted them). A seeded row draws its q with its own
``torch.Generator``, so its token depends only on its seed and logits, never on the other rows. On a CPU this
gives bit-identical tokens to ``sample_row`` (the same draws, in row order, on the same probabilities). On
another device a CPU generator cannot draw into device memory: the row's generator gives a 62-bit seed, which
seeds a device generator for that row's draw (deterministic, one launch a seeded row, no host sync); unseeded
rows share one draw from the device's default generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from layerfold.inference.controls import LogitShaper, SamplingParams, _to, shape_rows

__all__ = ["NONFINITE", "SamplingError", "sample_batch"]


class SamplingError(ValueError):
    """One row could not be sampled (its logits hold NaN or Inf); the other rows are unaffected."""


NONFINITE = ("the model produced NaN or Inf logits for this sequence (its weights or inputs overflowed). Fix: check "
             "the model with `layerfold eval`; re-create it if it is damaged")
ALL_BANNED = ("every token of the vocabulary is banned for this sequence (min_tokens banned the last ones left). "
              "Fix: lower min_tokens or drop the bans")

_device_gens: dict[torch.device, torch.Generator] = {}
HOST_DRAWS = ("cpu",)  # device types whose rows draw with the request's own (CPU) generator, as sample_row does


def _shaped(logits: Tensor, shapers: Sequence[LogitShaper | None], errors: dict[int, SamplingError]) -> Tensor:
    """The float32 logits with each row's shaper applied (rows whose shaper raises land in ``errors``)."""
    x = logits.to(torch.float32, copy=True)
    rows: list[tuple[int, LogitShaper]] = []
    for i, sh in enumerate(shapers):
        if sh is None or i in errors:
            continue
        try:
            if not sh._made:
                sh._make(x[i])
            if all(0 <= t < x.shape[1] for t in sh._bias_host[0]):
                rows.append((i, sh))
            else:  # (a flat index would land in another row): its own call, which raises as before
                x[i] = sh(logits[i])
        except (RuntimeError, IndexError, ValueError) as e:
            errors[i] = SamplingError(f"shaping the logits failed: {type(e).__name__}: {e}")
    if not rows:
        return x
    try:
        shape_rows(x, rows)
    except (RuntimeError, IndexError, ValueError):  # a row's own settings: shape row by row to fail only it
        x = logits.to(torch.float32, copy=True)
        for i, sh in rows:
            try:
                x[i] = sh(logits[i])
            except (RuntimeError, IndexError, ValueError) as e:
                errors[i] = SamplingError(f"shaping the logits failed: {type(e).__name__}: {e}")
    return x


def _exponentials(s: int, V: int, dev: torch.device, gens: Sequence[torch.Generator | None],
                  order: Sequence[int]) -> Tensor:
    """(s, V) Exp(1) draws, row j with ``gens[j]`` (None: the default generator); on a CPU drawn in the
    order of the rows' places ``order`` in the batch, as sample_each's loop drew them."""
    q = torch.empty(s, V, dtype=torch.float32, device=dev)
    if dev.type in HOST_DRAWS:
        for j in sorted(range(s), key=order.__getitem__):
            q[j].exponential_(1, generator=gens[j])
        return q
    if any(g is None for g in gens):
        q.exponential_(1)
    if any(g is not None for g in gens):
        dg = _device_gens.get(dev)
        if dg is None:
            dg = _device_gens[dev] = torch.Generator(device=dev)
        for j, g in enumerate(gens):
            if g is not None and g.device.type == dev.type != "cpu":  # a device generator: its own draw
                q[j].exponential_(1, generator=g)
            elif g is not None:
                dg.manual_seed(int(torch.randint(0, 2 ** 62, (), generator=g)))  # a CPU draw: no device sync
                q[j].exponential_(1, generator=dg)
    return q


def _draw(x: Tensor, params: list[SamplingParams], gens: list[torch.Generator | None], n_cut: int,
          order: list[int]) -> Tensor:
    """Tokens (s,) of the sampled rows ``x`` (s, V) (shaped, float32), the first ``n_cut`` of which have a
    top-k or top-p cut (sorted), the others none (drawn over the vocabulary's order, as sample_row)."""
    s, V = x.shape
    dev = x.device
    k = [float(p.top_k if 0 < p.top_k < V else V) for p in params]
    host = torch.tensor([[p.temperature, p.min_p, p.top_p, kk] for p, kk in zip(params, k, strict=True)],
                        dtype=torch.float32)
    cfg = _to(host, dev)
    probs = torch.softmax((x - x.max(-1, keepdim=True).values) / cfg[:, 0:1], dim=-1)
    if any(p.min_p > 0 for p in params):  # (a row's min_p 0 keeps every probability: all are >= 0)
        probs = torch.where(probs >= cfg[:, 1:2] * probs.max(-1, keepdim=True).values, probs, 0.0)
    q = _exponentials(s, V, dev, gens, order)
    out = []
    if n_cut:
        sp, idx = probs[:n_cut].sort(dim=-1, descending=True)
        c = cfg[:n_cut]
        if any(0 < p.top_k < V for p in params[:n_cut]):
            sp = torch.where(torch.arange(V, device=dev) < c[:, 3:4], sp, 0.0)
        if any(p.top_p < 1.0 for p in params[:n_cut]):
            keep = sp.cumsum(-1) - sp < c[:, 2:3] * sp.sum(-1, keepdim=True)
            keep |= (c[:, 2:3] >= 1.0)  # a row without top-p keeps all (its cumsum may round past its sum)
            keep[:, 0] = True
            sp = sp * keep
        pos = (sp / sp.sum(-1, keepdim=True) / q[:n_cut]).argmax(-1, keepdim=True)
        out.append(idx.gather(-1, pos)[:, 0])
    if n_cut < s:
        out.append((probs[n_cut:] / q[n_cut:]).argmax(-1))
    return out[0] if len(out) == 1 else torch.cat(out)


def sample_batch(logits: Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
                 shapers: Sequence[LogitShaper | None] | None = None) -> list[int | SamplingError]:
    """Next token per row of ``logits`` (n, V), or the SamplingError of a row that failed (NaN or +Inf
    logits, before or after shaping; a shaper that raised; a sampled row with every token banned)."""
    n = logits.shape[0]
    if not len(params) == len(generators) == n or (shapers is not None and len(shapers) != n):
        raise ValueError(f"{n} rows of logits for {len(params)} params, {len(generators)} generators"
                         + (f", {len(shapers)} shapers" if shapers is not None else ""))
    if n == 0:
        return []
    dev = logits.device
    errors: dict[int, SamplingError] = {}
    shaped = shapers is not None and any(sh is not None for sh in shapers)
    x = _shaped(logits, shapers, errors) if shaped else logits.float()  # type: ignore[arg-type]
    bad = ~torch.isfinite(logits).all(-1)
    if shaped:  # (-Inf after shaping is a ban)
        bad |= (torch.isnan(x) | torch.isposinf(x)).any(-1)
    tok, flags = x.argmax(-1), bad.long()  # flags: 1 not finite, 2 every token banned
    cut = [i for i, p in enumerate(params) if not p.greedy and i not in errors
           and (p.top_p < 1.0 or 0 < p.top_k < x.shape[-1])]
    in_cut = set(cut)
    rows = cut + [i for i, p in enumerate(params) if not p.greedy and i not in errors and i not in in_cut]
    if rows:
        at = None if rows == list(range(n)) else _to(torch.tensor(rows), dev)
        xs = x if at is None else x.index_select(0, at)
        drawn = _draw(xs, [params[i] for i in rows], [generators[i] for i in rows], len(cut), rows)
        banned = (xs.max(-1).values == -torch.inf).long() << 1  # (its softmax: NaN)
        if at is None:
            tok, flags = drawn, flags | banned
        else:
            tok, flags = tok.index_copy(0, at, drawn), flags.index_copy(0, at, flags.index_select(0, at) | banned)
    got = torch.stack([tok, flags]).tolist()  # the one read-back
    out: list[int | SamplingError] = []
    for i, (t, f) in enumerate(zip(*got, strict=True)):
        if f & 1:  # (before a shaper's error, as the rows' checks came first)
            out.append(SamplingError(NONFINITE))
        elif i in errors:
            out.append(errors[i])
        elif f:
            out.append(SamplingError(ALL_BANNED))
        else:
            out.append(int(t))
    return out
