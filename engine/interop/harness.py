"""An lm-evaluation-harness model for any layerfold checkpoint (``--model layerfold``; needs ``lm-eval``).

Width-pruned models, SliceGPT shortcut matrices and LLM-Streamline replacement blocks have no HF class, so
``lm_eval --model hf`` cannot run them; this adapter runs them on layerfold's own forward and runtime:

- ``loglikelihood``: lm-eval's own tokenisation (``TemplateLM._encode_pair``: trailing context spaces move to
  the continuation), then ``layerfold.evaluation.evaluate.grouped_scores``: requests sharing a context read
  it once into a KV cache, continuations batched; contexts longer than the model are cut from the left;
- ``loglikelihood_rolling``: lm-eval's disjoint rolling windows of ``max_length`` tokens, scored the same way;
- ``generate_until``: ``layerfold.inference.generate.generate`` on the Runtime (one batched prefill, batched
  decode), plain text (no chat template), requests grouped by their generation settings, stop strings
  ``until`` plus the EOS text, contexts cut from the left to leave room for ``max_gen_toks``.

``weights=host`` (``auto`` on a GPU the model does not fit): the model stays in host memory and the
log-likelihood requests stream it to the device a layer at a time (``evaluation.streamed.StreamedLM``:
each request its own right-padded row, one pass over the weights per 2 GiB of hidden states); generation
requests decode on ``inference.streamed_decode.StreamedRuntime`` (one pass over the weights per step for
a whole chunk of ``batch_size`` requests, so a larger batch_size is faster there).

Tokenisation follows the ``hf`` model's defaults (``add_bos_token`` None: the tokenizer's own), so on an HF
export the two models give the same numbers (tests/interop/test_harness.py).
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from layerfold.core.dtypes import parse_dtype
from layerfold.core.loading import DEFAULT_MODEL, load
from layerfold.evaluation.evaluate import grouped_scores, scored_loglikelihoods
from layerfold.evaluation.streamed import StreamedLM
from layerfold.inference.generate import generate

MODEL_NAME = "layerfold"


def _whole(v: Any, name: str, low: int) -> int:
    """A whole-number model argument (an int, or its text from ``--model_args``), at least ``low``."""
    try:
        n = int(v) if isinstance(v, str) else v
        ok = isinstance(n, int) and not isinstance(n, bool) and n >= low
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{name}={v!r} is not a whole number >= {low}. Fix: pass {name} as a whole number >= {low} "
                         "(or leave it out for the default)")
    return n


def _flag(v: Any) -> bool | None:
    if v is None or isinstance(v, bool):
        return v
    return str(v).strip().lower() in ("1", "true", "yes", "on")


@register_model(MODEL_NAME)
class LayerfoldLM(TemplateLM):
    """``lm_eval --model layerfold --model_args pretrained=DIR[,dtype=bfloat16,device=cpu,max_length=N]``
    (after ``import layerfold.interop.harness``), or ``layerfold lm-eval DIR --tasks ...``."""

    def __init__(self, pretrained: str = DEFAULT_MODEL, device: str = "cpu", dtype: str | None = None,
                 batch_size: int | str = 8, max_length: int | None = None, add_bos_token: bool | str | None = None,
                 max_gen_toks: int = 256, seed: int | None = None, model: Any = None, tokenizer: Any = None,
                 weights: str = "auto", **_: Any):
        super().__init__()
        device = device or "cpu"
        batch = 8 if str(batch_size).startswith("auto") else _whole(batch_size, "batch_size", 1)  # before loading
        length = None if max_length is None else _whole(max_length, "max_length", 2)
        max_gen_toks = _whole(max_gen_toks, "max_gen_toks", 1)
        place = "device"
        if model is None:
            from layerfold.evaluation.streamed import weight_bytes, weights_place

            dt = parse_dtype(dtype) if dtype else None
            place = weights_place(weights, device, lambda: weight_bytes(pretrained, dt))[0]
            model, tokenizer = load(pretrained, device="cpu" if place == "host" else device, dtype=dt, quiet=True)
        if tokenizer is None:
            raise ValueError(f"{pretrained}: no tokenizer, and lm-eval tasks are text. Fix: evaluate a checkpoint "
                             "saved with its tokenizer (every `layerfold prune` output has one)")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.weights = place  # "host": scored streamed to the device a layer at a time (evaluation.streamed)
        self.streamed = StreamedLM(model, device) if place == "host" else None
        self.batch_size_per_gpu = batch
        if length is not None and length > model.spec.max_position:  # positions it was never trained at
            raise ValueError(f"max_length={length} is more than the model's context of {model.spec.max_position} "
                             f"positions. Fix: pass max_length {model.spec.max_position} or less (--max-length), or "
                             "leave it out for the model's own")
        self._max_length = length or model.spec.max_position
        self.add_bos_token = _flag(add_bos_token)
        self.max_gen_toks = max_gen_toks
        self.seed = seed

    # ---- tokens ------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return int(eos if eos is not None else self.model.spec.eos_token_ids[0])

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw: Any) -> list[int]:
        if add_special_tokens is None and self.add_bos_token is not None:
            add_special_tokens = self.add_bos_token
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            add_special_tokens = False  # the string carries its own BOS
        extra = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return list(self.tokenizer(string, **extra)["input_ids"])

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ---- scoring -----------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **_: Any) -> list[tuple[float, bool]]:
        """(sum log p(cont | ctx), greedy) per request; the context is cut from the left so that context +
        continuation fits ``max_length`` + 1 tokens (the last one is only predicted)."""
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        pairs = []
        for i, (_, ctx, cont) in enumerate(requests):
            if len(cont) > self.max_length:
                raise ValueError(f"a continuation of {len(cont)} tokens is longer than the model's {self.max_length}"
                                 ". Fix: shorten the task's targets or pass a larger max_length")
            keep = max(1, self.max_length + 1 - len(cont))
            pairs.append((tuple(ctx[-keep:]), list(cont)))
            groups[pairs[-1][0]].append(i)
        keys = list(groups)
        pad = self.eot_token_id
        if self.streamed is not None:  # no KV cache to share contexts: each request its own row, few weight passes
            flat = scored_loglikelihoods(self.streamed, [(list(c), t) for c, t in pairs],
                                         batch_size=self.batch_size_per_gpu, pad_id=pad, progress=not disable_tqdm)
            scores = [[flat[i] for i in groups[k]] for k in keys]
        else:
            scores = grouped_scores(self.model, [(list(k), [pairs[i][1] for i in groups[k]]) for k in keys],
                                    batch_size=self.batch_size_per_gpu, pad_id=pad, progress=not disable_tqdm)
        out: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        for k, sc in zip(keys, scores, strict=True):
            for i, s in zip(groups[k], sc, strict=True):
                out[i] = s
                self.cache_hook.add_partial("loglikelihood", requests[i][0], s)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for r, req in enumerate(requests):
            (string,) = req.args
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(r)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        total = [0.0] * len(requests)
        for r, (ll, _) in zip(owner, scores, strict=True):
            total[r] += ll
        for req, ll in zip(requests, total, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, ll)
        return total

    # ---- generation --------------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        by_settings: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            by_settings[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        out = [""] * len(requests)
        for key, idx in by_settings.items():
            kw = normalize_gen_kwargs(json.loads(key), self.max_gen_toks)
            until = [u for u in handle_stop_sequences(kw.pop("until", None), eos=eos) if u]  # "" stops nothing
            n_new = int(kw.pop("max_gen_toks"))
            if n_new >= self.max_length:
                raise ValueError(f"max_gen_toks={n_new} leaves no room for a context in {self.max_length} tokens. "
                                 "Fix: lower max_gen_toks or pass a larger max_length")
            temp = float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0
            controls = gen_controls(kw)
            prompts = {i: self.tok_encode(requests[i].args[0])[-(self.max_length - n_new):] or [self.prefix_token_id]
                       for i in idx}
            order = sorted(idx, key=lambda i: -len(prompts[i]))
            for s in range(0, len(order), self.batch_size_per_gpu):
                chunk = order[s:s + self.batch_size_per_gpu]
                res = generate(self.model, self.tokenizer, [prompts[i] for i in chunk], max_new_tokens=n_new,
                               temperature=temp, top_p=float(kw.get("top_p", 1.0)), seed=self.seed, stop=until,
                               chat=False, stream_to=self.streamed.device if self.streamed is not None else None,
                               **controls)
                for i, r in zip(chunk, res, strict=True):
                    out[i] = r.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, r.text)
        return out


# HF generate() settings that change a task's answers and layerfold's generation does not have, with their no-op
# values: any other value is refused rather than ignored
UNSUPPORTED_GEN = {"num_beams": (1,), "num_return_sequences": (1,), "typical_p": (1, 1.0), "penalty_alpha": (None, 0),
                   "no_repeat_ngram_size": (0,), "epsilon_cutoff": (0, 0.0), "eta_cutoff": (0, 0.0),
                   "encoder_repetition_penalty": (1, 1.0), "diversity_penalty": (0, 0.0), "num_beam_groups": (1,)}


def gen_controls(kw: dict[str, Any]) -> dict[str, Any]:
    """The sampling controls of a task's generation kwargs (after lm-eval's normalize_gen_kwargs): top_k and
    min_p when it samples, repetition_penalty always (HF applies it to greedy decoding too); a setting in
    UNSUPPORTED_GEN at another value than its no-op is a ValueError naming it."""
    for k, noop in UNSUPPORTED_GEN.items():
        if k in kw and kw[k] not in noop:
            raise ValueError(f"the task's generation_kwargs set {k}={kw[k]!r}, which layerfold's generation does not "
                             f"implement (ignoring it would change the answers). Fix: remove {k} from the task's "
                             "generation_kwargs (--gen-kwargs), or evaluate with lm-eval's hf model")
    out: dict[str, Any] = {}
    if kw.get("do_sample"):
        out.update({k: kw[k] for k in ("top_k", "min_p") if kw.get(k) is not None})
        out["top_k"] = int(out["top_k"]) if "top_k" in out else 0
    if kw.get("repetition_penalty") is not None:
        out["repetition_penalty"] = float(kw["repetition_penalty"])
    return out


__all__ = ["MODEL_NAME", "UNSUPPORTED_GEN", "LayerfoldLM", "gen_controls"]
