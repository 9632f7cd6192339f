"""TextStream decodes a short window per token: its text must equal decoding every id, for the tokenizer
kinds Llama-family models ship (byte-level BPE; SentencePiece-style with byte fallback, whose decoder drops
the first piece's leading space), with special tokens, partial UTF-8 characters and stop strings."""

from __future__ import annotations

import random
from typing import Any

import pytest

from layerfold.core.loading import load_tokenizer, resolve
from layerfold.inference.sampling import TextStream

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3, "héllo → wörld, naïve café; 東京で寿司を食べた 🍣🎉!",
         "def f(x):\n    return x ** 2  # ünïcödé\n\n\tend", "  leading spaces and  double  spaces  "]


@pytest.fixture(scope="module")
def byte_bpe() -> Any:
    return load_tokenizer(resolve("smollm2-135m", quiet=True))


@pytest.fixture(scope="module")
def sentencepiece_like() -> Any:
    """A Llama-2-style tokenizer built here: BPE over "▁"-joined words with byte-fallback tokens <0xNN>,
    decoded by Replace("▁", " ") -> ByteFallback -> Fuse -> Strip(one leading space)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    seed = Tokenizer(models.BPE(unk_token="<unk>"))
    seed.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    seed.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    seed.train_from_iterator([t for t in TEXTS[0::2]] * 5,
                             trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
    vocab = seed.get_vocab()
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    import json
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(seed.to_str())["model"]["merges"]]
    tk = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tk.normalizer = seed.normalizer
    tk.pre_tokenizer = seed.pre_tokenizer
    tk.add_special_tokens(["<unk>", "<s>", "</s>"])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _replay(tok: Any, ids: list[int], stop: list[str], released: bool = True) -> tuple[TextStream, str]:
    """Push ids one by one, checking the stream's text against decoding every id at each step, and (with
    ``released``) that the text released so far begins the stream's text. Arbitrary byte-fallback ids need
    not keep the latter: HF decodes a run of byte tokens together, so an invalid byte can turn an earlier,
    valid one of its run into U+FFFD (decoding whole ids each token did the same)."""
    ts, out = TextStream(tok, stop=stop), ""
    for n, t in enumerate(ids, 1):
        delta = ts.push(t)
        out += delta
        whole = tok.decode(ids[:n], skip_special_tokens=True)
        if not ts.stopped:
            assert ts.text == whole, (n, ts.text, whole)
        assert not delta.endswith("\ufffd") or not whole.endswith("\ufffd")
        if released and not whole.endswith("\ufffd"):  # (a run with a partial character decodes as U+FFFDs)
            assert ts.text.startswith(out)
        if ts.stopped:
            break
    return ts, out + ts.flush()


@pytest.mark.parametrize("which", ["byte_bpe", "sentencepiece_like"])
def test_window_decoding_equals_whole_decoding(which: str, request: pytest.FixtureRequest) -> None:
    tok = request.getfixturevalue(which)
    specials = sorted(tok.all_special_ids)
    rng = random.Random(0)
    two, one = (tok(t, add_special_tokens=False)["input_ids"] for t in ("the dog", "the"))
    # the case the window's context is for: SentencePiece decodes a sequence's first piece without its space
    assert two[:len(one)] == one and tok.decode(two).endswith(" dog")
    assert tok.decode(two[len(one):]) == ("dog" if which == "sentencepiece_like" else " dog")
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        ts, out = _replay(tok, ids, [])
        assert out == ts.text == tok.decode(ids, skip_special_tokens=True)
    for _ in range(30):  # arbitrary ids, with runs of special tokens longer than the window's context
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 60))]
        for _ in range(rng.randrange(3)):
            at = rng.randrange(len(ids) + 1)
            ids[at:at] = [rng.choice(specials)] * rng.randrange(1, 10)
        ts, out = _replay(tok, ids, [], released=False)
        assert ts.text == tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("which", ["byte_bpe", "sentencepiece_like"])
def test_stop_string_across_tokens_and_partial_characters(which: str, request: pytest.FixtureRequest) -> None:
    tok = request.getfixturevalue(which)
    ids = tok("naïve 東京 café ENDING then more text", add_special_tokens=False)["input_ids"]
    ts, out = _replay(tok, ids, ["END"])
    assert ts.stopped and out == ts.text and out.rstrip() == "naïve 東京 café"


def test_a_long_completion_decodes_a_constant_window(byte_bpe: Any) -> None:
    calls: list[int] = []

    class Counting:
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            calls.append(len(ids))
            return byte_bpe.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = byte_bpe(TEXTS[0] * 30, add_special_tokens=False)["input_ids"]
    ts = TextStream(Counting())
    for t in ids:
        ts.push(t)
    assert len(ids) > 300 and ts.text == byte_bpe.decode(ids)
    assert max(calls[len(calls) // 2:]) <= 6  # no call decodes the whole sequence
