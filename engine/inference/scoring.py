"""Prompt scoring: the log-probability of every prompt token given the ones before it (one prefill).

What OpenAI's legacy ``echo`` + ``logprobs`` return for the prompt, and what lm-evaluation-harness's
loglikelihood requests read. The model's own forward (``layerfold.core.model``) computes it, the same
computation ``layerfold eval`` scores multiple-choice items with; the head runs on chunks of positions so
a long prompt never holds (T, vocabulary) logits at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from layerfold.core.model import Model
from layerfold.inference.sampling import SamplingError, TokenLogprob

__all__ = ["HEAD_CHUNK", "prompt_logprobs"]

HEAD_CHUNK = 256  # positions per head call: 256 x 49152 fp32 logits = 48 MiB for SmolLM2's vocabulary


@torch.inference_mode()
def prompt_logprobs(model: Model, ids: Sequence[int], top: int = 0) -> list[TokenLogprob]:
    """One entry per prompt token: the first has logprob None (nothing predicts it), token t has
    log p(ids[t] | ids[:t]) and the ``top`` most likely tokens at its position."""
    out = [TokenLogprob(int(ids[0]), None, [])]
    if len(ids) < 2:
        return out
    x = torch.as_tensor(list(ids), dtype=torch.long, device=model.device)[None]  # (1, T)
    h, ropes, mask = model.prepare(x)
    for i in range(model.spec.n_layers):
        h = model.run_layer(i, h, ropes, mask)
    for a in range(0, x.shape[1] - 1, HEAD_CHUNK):
        b = min(a + HEAD_CHUNK, x.shape[1] - 1)
        lp = torch.log_softmax(model.logits(h[:, a:b]).float()[0], dim=-1)  # (b - a, V): predicts a+1..b
        if not bool(torch.isfinite(lp).all()):
            raise SamplingError("the model produced NaN or Inf logits for this prompt. Fix: check the model with "
                                "`layerfold eval`; re-create it if it is damaged")
        nxt = x[0, a + 1:b + 1]
        chosen = lp.gather(1, nxt[:, None])[:, 0].tolist()
        tops = lp.topk(top, dim=-1) if top > 0 else None
        for j, (t, v) in enumerate(zip(nxt.tolist(), chosen, strict=True)):
            best = list(zip(tops.indices[j].tolist(), tops.values[j].tolist(), strict=True)) if tops else []
            out.append(TokenLogprob(t, v, best))
    return out
