"""Evaluation: perplexity against a plain loop, uniform-logit model, MC scoring definitions, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import Tensor, nn

from layerfold.core.data import MCItem
from layerfold.evaluation import evaluate as E
from tests.support.models import embedded_tokenizer, tiny_model
from tests.support.tolerances import approx


@pytest.fixture(scope="session")
def tok():
    return embedded_tokenizer()


# 32 wide, GQA 4/2 heads of 8, FFN 48, two layers; N(0, 0.3) weights, larger than torch's init: logits far
# from uniform
SMALL = dict(d_model=32, n_layers=2, heads=4, kv_heads=2, head_dim=8, ffn=48, std=0.3)


class Uniform(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, ids: Tensor) -> Tensor:
        return torch.zeros(*ids.shape, self.vocab)


class Prefers(nn.Module):
    """Logit +bias[t] for every token id t, whatever the input: a unigram model."""

    def __init__(self, bias: dict[int, float], vocab: int):
        super().__init__()
        self.register_buffer("b", torch.zeros(vocab))
        for t, v in bias.items():
            self.b[t] = v

    def forward(self, ids: Tensor) -> Tensor:
        return self.b.expand(*ids.shape, -1).clone()


@pytest.mark.parametrize("seq_len,batch_size,max_tokens", [(16, 3, None), (7, 2, 40), (33, 8, None)])
def test_perplexity_matches_plain_loop(seq_len: int, batch_size: int, max_tokens: int | None):
    m = tiny_model(**SMALL, vocab=97)
    tokens = torch.randint(0, 97, (120,), generator=torch.Generator().manual_seed(1))
    r = E.perplexity(m, tokens, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens)
    n = len(tokens) if max_tokens is None else max_tokens
    nlls = []
    with torch.no_grad():
        for s in range(0, n - seq_len + 1, seq_len):
            w = tokens[s:s + seq_len]
            lp = m(w[None])[0].double().log_softmax(-1)
            nlls += [-lp[t, w[t + 1]].item() for t in range(seq_len - 1)]
    ref = sum(nlls) / len(nlls)
    assert r["windows"] == n // seq_len and r["tokens"] == len(nlls) and r["seq_len"] == seq_len
    assert r["nll"] == approx(ref, torch.float32) and r["ppl"] == approx(math.exp(ref), torch.float32)
    assert r["ppl"] > 97 * 1.05  # a random model is worse than uniform: the test would catch a no-op


def test_uniform_logits_give_ppl_vocab_and_short_input_errors():
    r = E.perplexity(Uniform(50), torch.arange(100) % 50, seq_len=10, batch_size=4)
    assert r["ppl"] == approx(50.0, torch.float32) and r["windows"] == 10 and r["tokens"] == 90
    with pytest.raises(ValueError, match="fewer than one window.*Fix"):
        E.perplexity(Uniform(50), torch.arange(5), seq_len=10)


def test_encode_pair_follows_lm_eval(tok):
    ctx, cont = E.encode_pair(tok, "The answer is ", "forty-two")  # trailing space moves to the continuation
    assert ctx == tok("The answer is", add_special_tokens=False)["input_ids"]
    assert ctx + cont == tok("The answer is forty-two", add_special_tokens=False)["input_ids"]
    ctx, cont = E.encode_pair(tok, "", "hello")
    assert ctx == [tok.eos_token_id] and cont == tok("hello", add_special_tokens=False)["input_ids"]


def test_loglikelihoods_batched_equal_one_by_one(tok):
    m = tiny_model(**SMALL, vocab=len(tok), seed=2)
    reqs = [E.encode_pair(tok, c, x) for c, x in [("a b c", " d e"), ("hello there", " world"), ("x", " y z w v")]]
    together = E.loglikelihoods(m, reqs, batch_size=3)
    alone = [E.loglikelihoods(m, [r], batch_size=1)[0] for r in reqs]
    assert together == approx(alone, torch.float32)
    ctx, cont = reqs[1]
    with torch.no_grad():
        lp = m(torch.tensor([ctx + cont]))[0].double().log_softmax(-1)
    ref = sum(lp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))
    assert together[1] == approx(ref, torch.float32)


def test_shared_context_path_equals_plain_rows(tok):
    m = tiny_model(**SMALL, vocab=len(tok), seed=5)
    items = [MCItem("The quick brown", [" fox jumps", " dog", " cat sat on the mat", "!"], 2),
             MCItem("Hello", [" world", " there friend"], 0, delimiter=""),
             MCItem("Q: 2+2? A:", ["4", "5", "four"], 0, delimiter=" "),
             MCItem("", [" a b", " c"], 1)]
    groups = []
    for it in items:
        pairs = [E.encode_pair(tok, it.context, it.delimiter + c) for c in it.choices]
        groups.append((pairs[0][0], [c for _, c in pairs]))
    flat = [(ctx, c) for ctx, conts in groups for c in conts]
    for bs in (1, 16):
        shared = [v for g in E.grouped_loglikelihoods(m, groups, batch_size=bs) for v in g]
        assert shared == approx(E.loglikelihoods(m, flat, batch_size=3), torch.float32)
    assert E.mc_accuracy(m, tok, items) == E.mc_accuracy(lambda ids: m(ids), tok, items)


def test_acc_and_acc_norm_differ_as_defined(tok):
    a, b = (tok(w, add_special_tokens=False)["input_ids"] for w in (" a", " b"))
    assert len(a) == len(b) == 1
    # a unigram model: log p(" a") ~ -0.5 > log p(" b") ~ -1.5
    vocab = len(tok)
    model = Prefers({a[0]: 12.0, b[0]: 11.0}, vocab)
    lp = model(torch.zeros(1, 1, dtype=torch.long))[0, 0].log_softmax(-1)
    la, lb = lp[a[0]].item(), lp[b[0]].item()
    # " a a a a" (4 tokens, 8 chars) vs " b" (1 token, 2 chars): acc prefers " b" as 4*la < lb;
    # acc_norm compares 4*la/8 with lb/2, i.e. la with lb, and prefers " a a a a"
    assert tok(" a a a a", add_special_tokens=False)["input_ids"] == a * 4
    assert 4 * la < lb and la > lb
    item = MCItem("x", [" a a a a", " b"], label=0)
    r = E.mc_accuracy(model, tok, [item])
    assert r["acc"] == 0.0 and r["acc_norm"] == 1.0 and r["n"] == 1 and r["chance"] == 0.5
    r = E.mc_accuracy(model, tok, [MCItem("x", [" a a a a", " b"], label=1)] * 3 + [item], batch_size=3)
    assert r["acc"] == 0.75 and r["acc_norm"] == 0.25
    with pytest.raises(ValueError, match="Fix"):
        E.mc_accuracy(model, tok, [])


def test_evaluate_runs_both_tasks_on_a_tiny_model(tok):
    m = tiny_model(**SMALL, vocab=len(tok), seed=3)
    r = E.evaluate(m, tok, seq_len=64, max_tokens=256, mc_items=8, batch_size=4)
    assert r["ppl"]["windows"] == 4 and r["mc"]["n"] == 8 and 0 <= r["mc"]["acc"] <= 1
    assert r["seconds"] > 0 and r["data"] == "pydoc"
    with pytest.raises(ValueError, match="unknown task.*Fix"):
        E.evaluate(m, tok, tasks=("bleu",))


def test_evaluate_reads_a_user_mc_file(tmp_path, tok):
    p = tmp_path / "mc.jsonl"
    p.write_text("".join(json.dumps({"context": f"Item {i}:", "choices": ["yes", "no"], "label": i % 2}) + "\n"
                         for i in range(6)))
    m = tiny_model(**SMALL, vocab=len(tok), seed=6)
    r = E.evaluate(m, tok, data=p, tasks=("mc",), mc_items=4)
    assert r["mc"]["n"] == 4 and r["mc"]["chance"] == 0.5 and "ppl" not in r
    with pytest.raises(ValueError, match="no perplexity. Fix: .*--task mc"):
        E.evaluate(m, tok, data=p)


def test_cli_eval_json(monkeypatch, capsys, tok):
    from layerfold.cli import eval as cmd
    from layerfold.cli.main import main

    monkeypatch.setattr(cmd, "load", lambda src, **kw: (tiny_model(**SMALL, vocab=len(tok), seed=4), tok))
    assert main(["eval", "any", "--json", "--seq-len", "32", "--max-tokens", "64", "--mc-items", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "any" and out["ppl"]["windows"] == 2 and out["mc"]["n"] == 4 and out["params"] > 0
    assert main(["eval", "any", "--task", "ppl", "--seq-len", "32", "--max-tokens", "64"]) == 0
    text = capsys.readouterr().out
    assert "ppl" in text and "acc" in text
    with pytest.raises(SystemExit):  # argparse rejects it with a usage line
        main(["eval", "any", "--task", "nope"])
    assert "unknown task" in capsys.readouterr().err
