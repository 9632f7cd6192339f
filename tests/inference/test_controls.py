"""Sampling controls (top-k, min-p, repetition / presence / frequency penalties, logit bias, min_tokens): each
against a reference written from its definition (and HF's own repetition-penalty processor), through
``generate`` on a model, and their refusals."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from layerfold.core.model import Model
from layerfold.inference.controls import LogitShaper, SamplingParamError, SamplingParams
from layerfold.inference.generate import generate
from layerfold.inference.sampling import sample_each, sample_row
from tests.support.models import embedded_tokenizer, smollm2_vocab_spec, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok() -> Any:
    return embedded_tokenizer()


@pytest.fixture(scope="module")
def model() -> Model:
    return tiny_model(smollm2_vocab_spec(max_position=256))


def test_penalties_and_bias_match_their_definitions() -> None:
    torch.manual_seed(0)
    V = 50
    row = torch.randn(V) * 3
    prompt, out = [3, 7, 7, 11], [7, 20, 20, 20, 41]
    p = SamplingParams.make(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.25,
                            logit_bias={5: 2.5, 20: -1.0, 41: 7.0})
    sh = LogitShaper(p, prompt)
    for t in out:
        sh.observe(t)
    got = sh(row)
    ref = row.clone().double()
    for t, b in {5: 2.5, 20: -1.0, 41: 7.0}.items():
        ref[t] += b
    for t in set(prompt) | set(out):  # HF / vLLM: prompt and completion
        ref[t] = ref[t] / 1.3 if ref[t] > 0 else ref[t] * 1.3
    for t in set(out):  # OpenAI: completion only
        ref[t] -= out.count(t) * 0.25 + 0.4
    assert torch.allclose(got.double(), ref, atol=1e-5) and got.dtype == torch.float32
    assert torch.equal(row, row.clone()) and not got.data_ptr() == row.data_ptr()  # the batch's logits untouched


def test_repetition_penalty_equals_transformers_processor() -> None:
    from transformers import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(1)
    ids = torch.tensor([[4, 9, 9, 17, 2, 30]])
    scores = torch.randn(1, 40) * 4
    ref = RepetitionPenaltyLogitsProcessor(1.7)(ids, scores.clone())
    sh = LogitShaper(SamplingParams(repetition_penalty=1.7), [4, 9, 9])
    for t in (17, 2, 30):
        sh.observe(t)
    assert torch.allclose(sh(scores[0]), ref[0], atol=1e-6)


def test_min_tokens_bans_the_end_tokens_until_reached() -> None:
    row = torch.zeros(10)
    row[2] = 9.0  # the EOS is the most likely token
    sh = LogitShaper(SamplingParams(min_tokens=2), end_ids=[2, 8])
    P = SamplingParams()
    assert sample_row(sh(row), P, None) != 2 and sh(row)[8] == -float("inf")
    sh.observe(0)
    sh.observe(1)
    assert sample_row(sh(row), P, None) == 2


def test_top_k_min_p_and_top_p_cut_as_defined() -> None:
    logits = torch.log(torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04]))
    g = torch.Generator().manual_seed(0)

    def draws(**kw: Any) -> set[int]:
        p = SamplingParams(temperature=1.0, **kw)
        return {sample_row(logits, p, g) for _ in range(400)}

    assert draws(top_k=1) == {0} and draws(top_k=3) == {0, 1, 2} and draws(top_k=0) == set(range(6))
    assert draws(top_k=-1) == set(range(6)) and draws(top_k=100) == set(range(6))
    assert draws(min_p=0.3) == {0, 1, 2}  # p >= 0.3 * 0.40 = 0.12
    assert draws(top_p=0.7) == {0, 1, 2}  # preceding mass below 0.7: 0, 0.40, 0.65
    # top-p over what top-k kept, renormalised (vLLM): of 0.40 / 0.25 (0.615 / 0.385), p=0.6 keeps the first only
    assert draws(top_k=2, top_p=0.6) == {0}
    assert draws(min_p=0.3, top_p=0.6) == {0, 1}  # 0.40 / 0.8 = 0.5 < 0.6


def test_a_shaped_row_does_not_change_the_others() -> None:
    torch.manual_seed(2)
    logits = torch.randn(3, 30)
    plain = SamplingParams()
    ban = SamplingParams.make(logit_bias={int(logits[1].argmax()): -100})
    sh = LogitShaper(ban)
    got = sample_each(logits, [plain, ban, plain], [None] * 3, [None, sh, None])
    assert got[0] == int(logits[0].argmax()) and got[2] == int(logits[2].argmax())
    assert got[1] == int(logits[1].topk(2).indices[1])


@pytest.mark.parametrize("kw,param", [
    ({"top_k": -2}, "top_k"), ({"top_k": 1.5}, "top_k"), ({"top_k": True}, "top_k"), ({"min_p": 1.1}, "min_p"),
    ({"min_p": float("nan")}, "min_p"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"), ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -2.01}, "frequency_penalty"), ({"min_tokens": -1}, "min_tokens"),
    ({"logit_bias": {3: 101}}, "logit_bias"), ({"logit_bias": {50: 1}}, "logit_bias"),
    ({"logit_bias": {-1: 1}}, "logit_bias"), ({"logit_bias": {i: 1 for i in range(301)}}, "logit_bias"),
])
def test_out_of_range_settings_name_the_setting(kw: dict[str, Any], param: str) -> None:
    with pytest.raises(SamplingParamError, match="Fix:") as e:
        SamplingParams.make(**kw).check(vocab_size=50)
    assert e.value.param == param


def test_generate_takes_the_controls(model: Model, tok: Any) -> None:
    base = generate(model, tok, "Hi", max_new_tokens=12)[0]
    assert base.token_ids
    # a +100 bias on one token makes greedy decoding repeat it
    t = 1234
    forced = generate(model, tok, "Hi", max_new_tokens=6, logit_bias={t: 100.0})[0]
    assert forced.token_ids == [t] * 6
    # banning the greedy first token changes the first token
    banned = generate(model, tok, "Hi", max_new_tokens=4, logit_bias={base.token_ids[0]: -100.0})[0]
    assert banned.token_ids[0] != base.token_ids[0]
    # a frequency penalty at its largest breaks a repeated token: greedy with it differs from plain greedy
    rep = generate(model, tok, "Hi", max_new_tokens=12, frequency_penalty=2.0, repetition_penalty=5.0)[0]
    counts = [rep.token_ids.count(x) for x in set(rep.token_ids)]
    assert max(counts) <= max(base.token_ids.count(x) for x in set(base.token_ids))
    with pytest.raises(TypeError, match="top_k"):
        generate(model, tok, "Hi", max_new_tokens=2, topk=3)
    with pytest.raises(ValueError, match="min_tokens"):
        generate(model, tok, "Hi", max_new_tokens=2, min_tokens=3)
    with pytest.raises(ValueError, match="logit_bias"):
        generate(model, tok, "Hi", max_new_tokens=2, logit_bias={model.spec.vocab_size: 1.0})


def test_generate_min_tokens_outlasts_the_end_token(model: Model, tok: Any) -> None:
    free = generate(model, tok, "Hi", max_new_tokens=10)[0]
    eos = free.token_ids[1]  # greedy's second token, as the model's end token
    first = free.token_ids.index(eos)
    from layerfold import build_model

    m2 = build_model(smollm2_vocab_spec(max_position=256, eos_token_ids=(eos,)), state=model.state_dict()).eval()
    short = generate(m2, tok, "Hi", max_new_tokens=10)[0]
    assert short.finish_reason == "stop" and len(short.token_ids) == first < 6
    longer = generate(m2, tok, "Hi", max_new_tokens=10, min_tokens=6)[0]
    assert len(longer.token_ids) >= 6 and eos not in longer.token_ids[:6]


def test_cli_generate_takes_the_controls(model: Model, tok: Any, tmp_path: Any, capsys: Any, monkeypatch: Any) -> None:
    import json

    from layerfold import save_checkpoint
    from layerfold.cli.main import main

    out = tmp_path / "tiny"
    save_checkpoint(out, model.spec, model.state_dict(), tokenizer=tok)
    want = generate(model, tok, "Hi", max_new_tokens=5, repetition_penalty=1.5, frequency_penalty=0.5)[0].text
    args = ["generate", str(out), "Hi", "--max-new-tokens", "5", "--json"]
    assert main([*args, "--repetition-penalty", "1.5", "--frequency-penalty", "0.5"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["text"] == want
    assert main(args) == 0
    greedy = json.loads(capsys.readouterr().out)["results"][0]["text"]
    assert main([*args, "--temperature", "1.5", "--top-k", "1", "--seed", "3"]) == 0  # k = 1: the argmax
    assert json.loads(capsys.readouterr().out)["results"][0]["text"] == greedy
    import layerfold.core.loading as loading

    monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail("loaded the model before refusing"))
    for flag, value in (("--repetition-penalty", "0"), ("--min-p", "2"), ("--top-k", "-5"),
                        ("--presence-penalty", "3")):
        assert main([*args, flag, value]) == 2
        err = capsys.readouterr().err
        assert flag.lstrip("-").replace("-", "_") in err and "Fix:" in err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_shaping_on_cuda_equals_the_cpu() -> None:
    torch.manual_seed(3)
    row = torch.randn(1000) * 4
    p = SamplingParams.make(repetition_penalty=1.4, presence_penalty=0.7, frequency_penalty=0.3,
                            logit_bias={1: 9.0, 999: -50.0}, min_tokens=5)
    cpu, gpu = LogitShaper(p, [4, 5, 5, 900], end_ids=[2]), LogitShaper(p, [4, 5, 5, 900], end_ids=[2])
    for t in (5, 17, 17, 3):
        cpu.observe(t)
        gpu.observe(t)
    a, b = cpu(row), gpu(row.cuda())
    assert b.device.type == "cuda" and gpu.counts is not None and gpu.counts.device.type == "cuda"
    torch.testing.assert_close(b.cpu(), a)
