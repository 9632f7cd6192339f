"""Perplexity and multiple-choice accuracy of a causal LM, with lm-evaluation-harness definitions.

Perplexity: the token stream is cut into non-overlapping windows of ``seq_len`` tokens (the tail that
does not fill a window is dropped); in each window every token after the first is predicted from the
ones before it::

    nll = - (1 / n) * sum_windows sum_{t=1}^{T-1} log p(x_t | x_<t)      ppl = exp(nll)

with n = windows * (seq_len - 1), log-softmax taken in fp32 whatever the model dtype.

Multiple choice (lm-eval ``multiple_choice``): for every choice, ll = sum of log p(continuation tokens |
context); acc takes argmax ll, acc_norm argmax ll / len(choice) (its length in characters, as lm-eval's
``completion_len = len(choice)``; for ASCII text that is its UTF-8 byte count). Tokenization follows
lm-eval's ``_encode_pair``: trailing whitespace of the context moves to the continuation, then
continuation tokens = encode(context + continuation)[len(encode(context)):], and the model reads
encode(context) + those tokens, so a token that straddles the boundary counts as continuation.

``model`` is an ``layerfold.Model`` or any callable ``model(ids (B, T)) -> logits (B, T, V)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from layerfold.core.args import whole
from layerfold.core.console import progress as _progress
from layerfold.core.data import PYDOC, MCItem, NotEnoughData, is_mc_file, mc_task, token_stream
from layerfold.core.model import KVCache, Model

LogitsFn = Callable[[Tensor], Tensor]
TASKS = ("ppl", "mc")
ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)  # what token ids may be stored as
# Defaults that keep an eval of a small model short on a CPU (``evaluate`` returns its seconds): ~8K tokens of
# perplexity, 100 MC items (~88 tokens each: 24 of context read once + 4 x 16 of continuation; acc's standard
# error about 0.045). Raise them for tighter error bars.
DEFAULT_MAX_TOKENS = 8192
DEFAULT_MC_ITEMS = 100


def check_model(model: Any) -> None:
    if not callable(model):
        raise TypeError(f"model must be a model, not {type(model).__name__}. Fix: pass a layerfold Model (model, tok = "
                        "layerfold.load(path)) or a callable ids (B, T) -> logits (B, T, V)")


def check_context(model: Any, n: int, name: str) -> None:
    """A ValueError when ``n`` positions are more than the model's context (when it has a spec to say so)."""
    ctx = getattr(getattr(model, "spec", None), "max_position", None)
    if isinstance(ctx, int) and n > ctx:
        raise ValueError(f"{name}={n} is longer than the model's context of {ctx} positions. Fix: use {name} <= {ctx}")


def check_ids(model: Any, ids: Tensor) -> None:
    """A ValueError when a token id is negative or past the model's vocabulary (an IndexError deep in torch else)."""
    vocab = getattr(getattr(model, "spec", None), "vocab_size", None)
    if ids.numel() and (int(ids.min()) < 0 or isinstance(vocab, int) and int(ids.max()) >= vocab):
        raise ValueError(f"token ids span {int(ids.min())}..{int(ids.max())}, outside the model's vocabulary "
                         f"0..{vocab - 1 if isinstance(vocab, int) else '?'}. Fix: use the tokenizer that came with "
                         "the model (layerfold.load returns both)")


def _device(model: Any) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


@torch.inference_mode()
def perplexity(model: LogitsFn, tokens: Tensor, seq_len: int = 512, batch_size: int = 8, max_tokens: int | None = None,
               progress: bool = False) -> dict[str, Any]:
    """Perplexity over non-overlapping ``seq_len`` windows of the first ``max_tokens`` tokens (all if None).

    Returns {"ppl", "nll" (nats per predicted token), "tokens" (predicted), "windows", "seq_len"}.
    """
    check_model(model)
    whole("seq_len", seq_len, 2)
    whole("batch_size", batch_size, 1)
    if max_tokens is not None:
        whole("max_tokens", max_tokens, 1)
    if not isinstance(tokens, Tensor) or tokens.dtype not in ID_DTYPES:
        what = f"a {tokens.dtype} tensor" if isinstance(tokens, Tensor) else type(tokens).__name__
        raise TypeError(f"tokens must be token ids, not {what}. Fix: pass an integer tensor, e.g. torch.tensor(ids) or "
                        "layerfold.core.data.token_stream(tokenizer)")
    check_context(model, seq_len, "seq_len")
    tokens = tokens.reshape(-1)
    n = tokens.numel() if max_tokens is None else min(tokens.numel(), max_tokens)
    check_ids(model, tokens[:n])
    n_win = n // seq_len
    if n_win == 0:
        raise ValueError(f"{n} tokens are fewer than one window of seq_len={seq_len}. Fix: lower the sequence length"
                         " or allow more tokens (max_tokens / more text)")
    windows = tokens[:n_win * seq_len].view(n_win, seq_len)
    nll_sum = 0.0
    starts = range(0, n_win, batch_size)
    batches = [windows[s:s + batch_size] for s in starts]
    for x, logits in zip(_progress(batches, desc="ppl", total=len(batches), enabled=progress),
                         _logits(model, [(x, None) for x in batches]), strict=True):  # (B, T, V)
        x = x.to(logits.device)
        for b in range(x.shape[0]):  # one row at a time keeps the fp32 copy at (T, V)
            nll_sum += F.cross_entropy(logits[b, :-1].float(), x[b, 1:], reduction="sum").item()
        del logits
    count = n_win * (seq_len - 1)
    nll = nll_sum / count
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count, "windows": n_win, "seq_len": seq_len}


def _logits(model: LogitsFn, batches: list[tuple[Tensor, Tensor | None]]) -> Iterator[Tensor]:
    """Logits of each (ids, None) batch in order: from ``model.many`` when it has one (a model streamed
    from host memory runs them all in one pass over its layers: evaluation.streamed), else a call each."""
    many = getattr(model, "many", None)
    if callable(many):
        yield from many(batches)
        return
    dev = _device(model)
    for ids, _ in batches:
        yield model(ids.to(dev))


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) exactly as lm-eval's ``_encode_pair`` makes them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if not context:  # lm-eval conditions an empty context on the end-of-text token
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("an MC item has an empty context and the tokenizer has no EOS token to stand for it. "
                             "Fix: give every item a non-empty context")
        return [eos], _encode(tokenizer, continuation)
    ctx = _encode(tokenizer, context)
    return ctx, _encode(tokenizer, context + continuation)[len(ctx):]


def _stderr(hits: list[float]) -> float:
    n = len(hits)
    if n < 2:
        return float("nan")
    p = sum(hits) / n
    return math.sqrt(p * (1 - p) / (n - 1))


def loglikelihoods(model: LogitsFn, requests: Sequence[tuple[list[int], list[int]]], batch_size: int = 16,
                   pad_id: int = 0, progress: bool = False) -> list[float]:
    """Sum of log p(cont | ctx) for each (ctx tokens, cont tokens); batched longest-first, right-padded.

    Right padding cannot change the logits of earlier positions of a causal model, so no mask is needed.
    """
    return [ll for ll, _ in scored_loglikelihoods(model, requests, batch_size, pad_id, progress)]


@torch.inference_mode()
def scored_loglikelihoods(model: LogitsFn, requests: Sequence[tuple[list[int], list[int]]], batch_size: int = 16,
                          pad_id: int = 0, progress: bool = False) -> list[tuple[float, bool]]:
    """``loglikelihoods`` with lm-eval's second answer: whether every continuation token is the argmax."""
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    out: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
    groups = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    batches = []
    for idx in groups:
        rows = [(requests[i][0] + requests[i][1])[:-1] for i in idx]
        batches.append((_right_pad(rows, max(len(r) for r in rows), pad_id)[0], None))
    for idx, logits in zip(_progress(groups, desc="mc", total=len(groups), enabled=progress),
                           _logits(model, batches), strict=True):  # (B, T, V)
        for b, i in enumerate(idx):
            ctx, cont = requests[i]
            if not cont:
                continue
            first = len(ctx) - 1  # the logits at this position predict cont[0]
            lp = logits[b, first:first + len(cont)].float().log_softmax(-1)  # (n_cont, V)
            tgt = torch.tensor(cont, dtype=torch.long, device=lp.device)
            out[i] = (lp.gather(-1, tgt[:, None]).sum().item(), bool((lp.argmax(-1) == tgt).all()))
        del logits
    return out


def grouped_loglikelihoods(model: Model, groups: Sequence[tuple[list[int], list[list[int]]]], batch_size: int = 16,
                           pad_id: int = 0, progress: bool = False) -> list[list[float]]:
    """``loglikelihoods`` for (context tokens, [continuation tokens, ...]) groups, reading each context once
    (``grouped_scores`` without the greedy flags)."""
    return [[ll for ll, _ in g] for g in grouped_scores(model, groups, batch_size, pad_id, progress)]


@torch.inference_mode()
def grouped_scores(model: Model, groups: Sequence[tuple[list[int], list[list[int]]]], batch_size: int = 16,
                   pad_id: int = 0, progress: bool = False) -> list[list[tuple[float, bool]]]:
    """(sum log p(cont | ctx), cont is the greedy continuation) for (context tokens, [continuation tokens, ...])
    groups, reading each context once.

    The context runs once into a KV cache that is then copied for every continuation, so an item costs
    len(ctx) + sum(len(cont)) tokens instead of n_choices * len(ctx + cont). Right padding of contexts is
    masked with ``key_valid``; positions count valid tokens only, so each row sees exactly its own tokens.
    (A sliding-window model counts the padding slots inside its window: exact while contexts are shorter
    than the window, as the built-in items are by far.)

    longrope (Phi-3-*-128k, Phi-3.5): a forward over context + continuation reads the long factors when it is
    longer than the original context (core.model.rope_tables); a context within it, cached with the short ones,
    would not give those logits, so an item whose continuation crosses the original context is scored by one
    forward over each whole sequence instead (``_whole_scores``).
    """
    out: list[list[tuple[float, bool]]] = [[(0.0, True)] * len(conts) for _, conts in groups]
    per = max(1, batch_size // max(len(c) for _, c in groups))  # items per pass: ~batch_size continuation rows
    whole = _crossing(model.spec, groups)
    for i in whole:
        out[i] = [_whole_scores(model, groups[i][0], c) if c else (0.0, True) for c in groups[i][1]]
    order = sorted((i for i in range(len(groups)) if i not in whole), key=lambda i: -len(groups[i][0]))
    dev, dtype = model.device, model.dtype
    starts = range(0, len(order), per)
    for s in _progress(starts, desc="mc", total=len(starts), enabled=progress):
        idx = order[s:s + per]
        ctxs = [groups[i][0] for i in idx]
        conts = [c[:-1] for i in idx for c in groups[i][1]]  # the last token is predicted, never read
        lc, lt = max(len(c) for c in ctxs), max(len(c) for c in conts)
        ctx_ids, ctx_ok = _right_pad(ctxs, lc, pad_id)
        cache = KVCache.allocate(model.spec, len(idx), lc + lt, dev, dtype)
        ctx_ok = ctx_ok.to(dev)
        first = model(ctx_ids.to(dev), key_valid=ctx_ok, cache=cache)  # (B, lc, V)
        first = torch.stack([first[b, len(c) - 1] for b, c in enumerate(ctxs)]).float().log_softmax(-1)  # (B, V)
        reps = torch.tensor([len(groups[i][1]) for i in idx], device=dev)
        rest = None
        if lt:
            big = KVCache([_repeat(k, reps) for k in cache.k], [_repeat(v, reps) for v in cache.v], lc)
            cont_ids, cont_ok = _right_pad(conts, lt, pad_id)
            key_valid = torch.cat([ctx_ok.repeat_interleave(reps, 0), cont_ok.to(dev)], dim=1)
            rest = model(cont_ids.to(dev), key_valid=key_valid, cache=big)  # (R, lt, V)
        r = 0
        for b, i in enumerate(idx):
            for j, cont in enumerate(groups[i][1]):
                if cont:
                    ll = first[b, cont[0]].item()
                    greedy = int(first[b].argmax()) == cont[0]
                    if len(cont) > 1:
                        lp = rest[r, :len(cont) - 1].float().log_softmax(-1)
                        tgt = torch.tensor(cont[1:], device=dev)
                        ll += lp.gather(-1, tgt[:, None]).sum().item()
                        greedy = greedy and bool((lp.argmax(-1) == tgt).all())
                    out[i][j] = (ll, greedy)
                r += 1
        del first, rest, cache
    return out


def _crossing(spec: Any, groups: Sequence[tuple[list[int], list[list[int]]]]) -> set[int]:
    """The groups of a longrope model whose context is within the original context and a continuation is not."""
    if getattr(spec, "rope_type", None) != "longrope":
        return set()
    n = spec.rope_original_max_pos
    return {i for i, (ctx, conts) in enumerate(groups) if len(ctx) <= n and any(len(ctx) + len(c) - 1 > n
                                                                                 for c in conts)}


def _whole_scores(model: Model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """(sum log p(cont | ctx), cont is greedy) from one forward over ctx + cont (its last token is never read)."""
    ids = torch.tensor([ctx + cont[:-1]], dtype=torch.long, device=model.device)
    lp = model(ids)[0, len(ctx) - 1:].float().log_softmax(-1)  # (len(cont), V)
    tgt = torch.tensor(cont, device=lp.device)
    return lp.gather(-1, tgt[:, None]).sum().item(), bool((lp.argmax(-1) == tgt).all())


def _repeat(t: Tensor | None, reps: Tensor) -> Tensor | None:
    return None if t is None else t.repeat_interleave(reps, 0)  # (B, ...) -> (R, ...): a copy per continuation


def _right_pad(rows: Sequence[list[int]], width: int, pad_id: int) -> tuple[Tensor, Tensor]:
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    ok = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r, dtype=torch.long)
        ok[b, :len(r)] = True
    return ids, ok


def mc_accuracy(model: LogitsFn, tokenizer: Any, items: Sequence[MCItem], batch_size: int = 16,
                progress: bool = False) -> dict[str, Any]:
    """acc and acc_norm (lm-eval definitions) over ``items``; also their standard errors and chance level.

    An ``layerfold.Model`` reads each context once (``grouped_loglikelihoods``); any other callable gets every
    context + choice as its own right-padded row (``loglikelihoods``). Both give the same numbers.
    """
    check_model(model)
    whole("batch_size", batch_size, 1)
    if not items:
        raise ValueError("no multiple-choice items to score. Fix: ask for at least one item")
    groups = []
    for it in items:
        pairs = [encode_pair(tokenizer, it.context, it.delimiter + c) for c in it.choices]
        groups.append((pairs[0][0], [cont for _, cont in pairs]))  # the context tokens do not depend on the choice
    check_ids(model, torch.tensor([t for ctx, conts in groups for t in ctx + [x for c in conts for x in c]]))
    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    if isinstance(model, Model):
        lls_per = grouped_loglikelihoods(model, groups, batch_size=batch_size, pad_id=pad, progress=progress)
    else:
        flat = loglikelihoods(model, [(ctx, c) for ctx, conts in groups for c in conts], batch_size=batch_size,
                              pad_id=pad, progress=progress)
        lls_per, pos = [], 0
        for _, conts in groups:
            lls_per.append(flat[pos:pos + len(conts)])
            pos += len(conts)
    hits, hits_norm = [], []
    for it, ll in zip(items, lls_per, strict=True):
        norm = [v / max(len(c), 1) for v, c in zip(ll, it.choices, strict=True)]
        hits.append(float(max(range(len(ll)), key=ll.__getitem__) == it.label))
        hits_norm.append(float(max(range(len(norm)), key=norm.__getitem__) == it.label))
    n = len(items)
    return {"acc": sum(hits) / n, "acc_norm": sum(hits_norm) / n, "acc_stderr": _stderr(hits),
            "acc_norm_stderr": _stderr(hits_norm), "n": n,
            "chance": sum(1 / len(it.choices) for it in items) / n}


def check_eval_data(tokenizer: Any, data: str | Path = PYDOC, tasks: Sequence[str] = TASKS, seq_len: int = 512,
                    mc_items: int = DEFAULT_MC_ITEMS, split: str = "val", max_tokens: int | None = None) -> None:
    """Raise the ValueError ``evaluate`` would raise for too little or unusable data, without a model (it
    tokenizes only): commands check their evaluation data before long work, not after it."""
    if "ppl" in tasks and max_tokens is not None and max_tokens < seq_len:
        raise ValueError(f"max_tokens={max_tokens} is fewer than one perplexity window of seq_len={seq_len}. Fix: "
                         "allow more tokens (--max-tokens, 0 = all) or shorten the window (--seq-len)")
    if "ppl" in tasks:
        n = token_stream(tokenizer, data, split).numel()
        if n < seq_len:
            raise NotEnoughData(f"{data} ({split!r} split) has {n} tokens, fewer than one perplexity window of "
                             f"{seq_len}. Fix: give more text, or shorten the window (--seq-len)")
    if "mc" in tasks:
        mc_task(tokenizer, data, split, n=mc_items)


def check_eval_args(model: Any, tokenizer: Any, data: Any = PYDOC, tasks: Any = TASKS, seq_len: Any = 512,
                    max_tokens: Any = DEFAULT_MAX_TOKENS, mc_items: Any = DEFAULT_MC_ITEMS, batch_size: Any = 8,
                    split: str = "val", progress: bool = False) -> tuple[str, ...]:
    """``evaluate``'s arguments (the same, with its defaults) checked before any work: a TypeError or ValueError
    naming the argument and the fix. Returns the tasks as a tuple (a string "ppl,mc" is split at its commas)."""
    check_model(model)
    if tokenizer is None or not callable(tokenizer):
        raise TypeError(f"tokenizer must be a tokenizer, not {type(tokenizer).__name__}. Fix: pass the tokenizer "
                        "that layerfold.load returns with the model")
    if not isinstance(data, (str, Path)):
        raise TypeError(f"data must be a str or Path, not {type(data).__name__}. Fix: pass 'pydoc' or the path of a "
                        ".txt or .jsonl file")
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    if not isinstance(tasks, (list, tuple)):
        raise TypeError(f"tasks must be a list of task names, not {type(tasks).__name__}. Fix: e.g. tasks=('ppl', "
                        "'mc')")
    tasks = tuple(t.strip() if isinstance(t, str) else t for t in tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown task(s) {unknown or list(tasks)}. Fix: choose from {', '.join(TASKS)}")
    whole("batch_size", batch_size, 1)
    if "ppl" in tasks:
        whole("seq_len", seq_len, 2)
        check_context(model, seq_len, "seq_len")
        if max_tokens is not None:
            whole("max_tokens", max_tokens, 1)
    if "mc" in tasks:
        whole("mc_items", mc_items, 1)
    return tasks


def evaluate(model: LogitsFn, tokenizer: Any, data: str | Path = PYDOC, tasks: Sequence[str] = TASKS,
             seq_len: int = 512, max_tokens: int | None = DEFAULT_MAX_TOKENS, mc_items: int = DEFAULT_MC_ITEMS,
             batch_size: int = 8,
             split: str = "val", progress: bool = False) -> dict[str, Any]:
    """Perplexity and/or MC accuracy on the ``split`` part of ``data`` (pydoc or a .txt/.jsonl file).

    Returns {"ppl": perplexity(...) + seconds, "mc": mc_accuracy(...) + seconds, "data", "split", "seconds"}
    (only the tasks asked for). ``max_tokens=None`` reads the whole split. A multiple-choice .jsonl file
    serves the mc task only.
    """
    tasks = check_eval_args(model, tokenizer, data, tasks, seq_len, max_tokens, mc_items, batch_size)
    if "ppl" in tasks and str(data) != PYDOC and Path(data).is_file() and is_mc_file(Path(data)):
        raise ValueError(f"{data} holds multiple-choice items, not text, so it has no perplexity. Fix: evaluate it "
                         "with the mc task only (--task mc)")
    t_all = time.perf_counter()
    out: dict[str, Any] = {"data": str(data), "split": split}
    if "ppl" in tasks:
        t0 = time.perf_counter()
        stream = token_stream(tokenizer, data, split)
        out["ppl"] = perplexity(model, stream, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens,
                                progress=progress)
        out["ppl"]["seconds"] = time.perf_counter() - t0
    if "mc" in tasks:
        t0 = time.perf_counter()
        items = mc_task(tokenizer, data, split, n=mc_items)
        out["mc"] = mc_accuracy(model, tokenizer, items, batch_size=2 * batch_size, progress=progress)
        out["mc"]["seconds"] = time.perf_counter() - t0
    out["seconds"] = time.perf_counter() - t_all
    return out


__all__ = ["DEFAULT_MAX_TOKENS", "DEFAULT_MC_ITEMS", "TASKS", "check_context", "check_eval_args", "check_eval_data",
           "check_ids", "check_model", "encode_pair", "evaluate", "grouped_loglikelihoods", "grouped_scores",
           "loglikelihoods", "mc_accuracy", "perplexity", "scored_loglikelihoods", "whole"]
