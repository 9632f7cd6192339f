"""Phi-3 / Phi-4 GGUF files (llama.cpp arch ``phi3``) as input: fused ``attn_qkv`` and ``ffn_up`` split into q/k/v
and gate/up while dequantising, no rotary permutation, the file's sliding window, and refusals before conversion.

Files are written offline from a tiny random transformers Phi3ForCausalLM as llama.cpp's converter writes them
(tests/support/gguf_files.phi3_file); transformers' own GGUF reader computes the source model's logits from them,
which shows the layout is llama.cpp's (the slow test asks llama.cpp itself)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import layerfold
from tests.support.gguf_files import phi3_file, quantized_copy
from tests.support.models import tiny_hf
from tests.support.tolerances import Tol, assert_close

gguf = pytest.importorskip("gguf", reason="the gguf extra reads GGUF files")
pytestmark = pytest.mark.usefixtures("one_thread")

IDS = [(7 * i + 5) % 300 for i in range(20)]
Q8_0 = Tol(5e-2, 5e-2)  # logits of 8-bit weights (blocks of 32, one fp16 scale) against the float model's


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LAYERFOLD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def phi3(**over: Any) -> Any:
    return tiny_hf("phi3", vocab_size=300, **over)


def logits(m: Any, ids: list[int] = IDS) -> torch.Tensor:
    with torch.no_grad():
        out = m(torch.tensor([ids]))
    return (out.logits if hasattr(out, "logits") else out)[0].float()


def transformers_reads(f: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(f.parent), gguf_file=f.name, dtype=torch.float32).eval()


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_a_phi3_file_gives_its_models_logits(tmp_path: Path, kind: str, tie: bool) -> None:
    """layerfold's logits are transformers' GGUF reader's on the same file (float32 rounding) and the source
    model's (exactly for float32 weights, to 8-bit rounding for Q8_0)."""
    hf = phi3(tie=tie)
    f = phi3_file(tmp_path / "f32.gguf", hf)
    if kind == "q8_0":
        f = quantized_copy(f, tmp_path / "q8_0.gguf")
        assert {t.tensor_type.name for t in gguf.GGUFReader(str(f)).tensors if t.name.endswith("attn_qkv.weight")} \
            == {"Q8_0"}
    m, tok = layerfold.load(f, quiet=True)
    assert m.spec.arch == "phi3" and m.spec.sliding_window is None and m.spec.tie_embeddings == tie
    got = logits(m)
    assert_close(got, logits(transformers_reads(f)), torch.float32, f"layerfold vs transformers' reader ({kind})")
    assert_close(got, logits(hf), torch.float32 if kind == "f32" else Q8_0, f"layerfold vs the source model ({kind})")
    assert tok("The capital of France is Paris.")["input_ids"][:4] == [259, 87, 269, 273]  # (no BOS: the file says)


def test_fused_tensors_are_split_by_rows_not_dequantised_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) \
        -> None:
    """Each layerfold tensor is dequantised from its own rows of the fused tensor: nothing larger than one of them."""
    import layerfold.core.gguf_weights as W

    hf = phi3()
    f = quantized_copy(phi3_file(tmp_path / "f32.gguf", hf), tmp_path / "q.gguf")
    seen: list[tuple[int, ...]] = []
    real = gguf.dequantize
    monkeypatch.setattr(gguf, "dequantize", lambda data, qtype: seen.append(data.shape) or real(data, qtype))
    spec = layerfold.load(f, quiet=True)[0].spec
    l0 = spec.layers[0]
    assert max(s[0] for s in seen) <= max(spec.vocab_size, l0.q_dim, l0.d_ffn)
    assert W.gguf_parts("phi3", spec)["blk.2.ffn_up.weight"] == [("layers.2.mlp.gate.weight", (0, 96)),
                                                                 ("layers.2.mlp.up.weight", (96, 192))]


def test_the_tokenizer_is_the_files_own_vocabulary_with_byte_fallback(tmp_path: Path) -> None:
    """Every transformers version: a character no piece covers is spelt in byte tokens (4.x's phi3 converter
    dropped it), and Phi-3 chat tokens the file lacks (4.x added them past the embedding) are plain text."""
    f = phi3_file(tmp_path / "t.gguf", phi3())
    m, tok = layerfold.load(f, quiet=True)
    assert len(tok) == 300 and "<|placeholder1|>" not in tok.get_vocab()
    ids = tok("Zebra <|placeholder1|> <|user|>x")["input_ids"]
    assert max(ids) < m.spec.vocab_size and tok.convert_ids_to_tokens(ids)[:2] == ["\u2581", "<0x5A>"]
    assert tok.convert_tokens_to_ids("<|user|>") in ids and tok.decode(ids[:4]) == "Zeb"
    logits(m, ids)  # (every id has an embedding row)


@pytest.mark.parametrize("window,n", [(8, 20), (0, 20)])
def test_the_files_sliding_window_applies(tmp_path: Path, window: int, n: int) -> None:
    """phi3.attention.sliding_window as transformers' Phi3 applies it (0: none, as llama.cpp's converter writes for
    Phi-4). transformers' GGUF reader drops it, so past the window it computes other logits."""
    hf = phi3(sliding_window=window or None)
    f = phi3_file(tmp_path / "w.gguf", hf)
    assert gguf.GGUFReader(str(f)).fields["phi3.attention.sliding_window"].contents() == window
    m, _ = layerfold.load(f, quiet=True)
    assert m.spec.sliding_window == (window or None)
    assert_close(logits(m), logits(hf), torch.float32, f"window {window}")
    if window:
        assert not torch.allclose(logits(transformers_reads(f)), logits(hf), atol=1e-3)


@pytest.mark.parametrize("longrope", [False, True])
def test_a_partial_rotary_file_gives_its_models_logits(tmp_path: Path, longrope: bool) -> None:
    """Phi-4-mini's layout: phi3.rope.dimension_count 12 of 16 (transformers' GGUF reader drops the key and rotates
    whole heads); with longrope, factors for the 6 rotary pairs, on both sides of the original context (16)."""
    over: dict[str, Any] = {"partial_rotary_factor": 0.75}
    extra: dict[str, Any] = {}
    if longrope:
        g = torch.Generator().manual_seed(0)
        short, long = (torch.rand(6, generator=g) * 2 + 0.5).tolist(), (torch.rand(6, generator=g) * 6 + 1).tolist()
        over.update(max_position_embeddings=64, original_max_position_embeddings=16,
                    rope_scaling={"type": "longrope", "short_factor": short, "long_factor": long})
    hf = phi3(**over)
    if longrope:
        extra = dict(keys={"phi3.rope.scaling.attn_factor": float(hf.model.rotary_emb.attention_scaling)},
                     tensors={"rope_factors_long.weight": np.array(long, np.float32),
                              "rope_factors_short.weight": np.array(short, np.float32)})
    f = phi3_file(tmp_path / "p.gguf", hf, **extra)
    assert gguf.GGUFReader(str(f)).fields["phi3.rope.dimension_count"].contents() == 12
    m, _ = layerfold.load(f, quiet=True)
    assert m.spec.rotary_dim == 12 and m.spec.rope_type == ("longrope" if longrope else "default")
    for n in (12, 30):
        x = [(5 * i + 3) % 300 for i in range(n)]
        assert_close(logits(m, x), logits(hf, x), torch.float32, f"partial rotary gguf, {n} tokens")
    if not longrope:  # (what transformers' reader makes of the file: whole-head rotary, another model)
        assert not torch.allclose(logits(transformers_reads(f)), logits(hf), atol=1e-3)


def _zeros(*shape: int) -> np.ndarray:
    return np.zeros(shape, dtype=np.float32)


REFUSED = {
    # longrope converts (tests/core/test_longrope.py); what llama.cpp's converter never writes is refused
    "longrope-one-tensor": (dict(tensors={"rope_factors_long.weight": np.ones(8, np.float32)}),
                            r"rope scaling layerfold does not read \(rope_factors_long.weight without "
                            r"rope_factors_short.weight;.*Fix:"),
    "longrope-key": (dict(keys={"phi3.rope.scaling.attn_factor": 1.19}),
                     r"\(phi3.rope.scaling.attn_factor without the rope_factors_long.*Fix:"),
    "longrope-short-tensors": (dict(tensors={"rope_factors_long.weight": np.ones(8, np.float32),
                                             "rope_factors_short.weight": np.ones(7, np.float32)}),
                               r"tensor rope_factors_short.weight has shape \[7\].*makes it \[8\]"),
    "rope-scaling-type": (dict(keys={"phi3.rope.scaling.type": "yarn"}), r"phi3.rope.scaling.type='yarn'.*Fix:"),
    "odd-rotary-dims": (dict(keys={"phi3.rope.dimension_count": 7}),
                        r"phi3.rope.dimension_count is 7, not an even number in 2..16 \(the head size\).*Fix:"),
    "rotary-dims-past-the-head": (dict(keys={"phi3.rope.dimension_count": 20}),
                                  r"phi3.rope.dimension_count is 20, not an even number in 2..16.*Fix:"),
    "qkv-rows": (dict(tensors={"blk.1.attn_qkv.weight": _zeros(120, 64)}),
                 r"tensor blk.1.attn_qkv.weight has shape \[120, 64\].*makes it \[128, 64\]"),
    "ffn-up-unfused": (dict(tensors={"blk.0.ffn_up.weight": _zeros(96, 64)}),
                       r"tensor blk.0.ffn_up.weight has shape \[96, 64\].*makes it \[192, 64\]"),
    "no-qkv": (dict(drop=("blk.2.attn_qkv.weight",)), r"not in the file \(first: blk.2.attn_qkv.weight\)"),
    "qkv-and-q": (dict(tensors={"blk.0.attn_q.weight": _zeros(64, 64)}), r"no place for \(blk.0.attn_q.weight\)"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_layerfold_cannot_compute_is_refused_before_converting(tmp_path: Path, cache: Path,
                                                                   monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    import transformers

    kw, match = REFUSED[case]
    f = phi3_file(tmp_path / "x.gguf", phi3(), **kw)

    def no(*a: Any, **k: Any) -> Any:
        pytest.fail("transformers read the file before the checks refused it")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no)
    with pytest.raises(ValueError, match=match) as e:
        layerfold.load(f, quiet=True)
    assert "Fix:" in str(e.value) and str(f) in str(e.value) and "\n" not in str(e.value)
    assert not [p for p in cache.iterdir() if p.name != "keys.json"]


@pytest.mark.slow
def test_llama_cpp_runs_the_file_with_the_same_logits_and_ids(tmp_path: Path) -> None:
    """llama.cpp's own phi3 graph on the file: layerfold's logits (fp32 weights; llama.cpp's fp16 KV cache) and
    token ids. The file's name says Phi-3, which makes llama.cpp strip the spaces after its special tokens."""
    llama_cpp = pytest.importorskip("llama_cpp")
    f = phi3_file(tmp_path / "p.gguf", phi3())
    m, tok = layerfold.load(f, quiet=True)
    llm = llama_cpp.Llama(model_path=str(f), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval(IDS)
    got = torch.tensor(np.array(llm.scores[:len(IDS)]), dtype=torch.float32)
    assert_close(logits(m), got, torch.float16, "layerfold vs llama.cpp (phi3)")
    for text in ["The capital of France is Paris.", " hello  world\n\nx", "<|user|>\nthe capital<|end|>\n<|assistant|>",
                 "<s> hello</s> x", "<|endoftext|> the"]:
        assert tok(text)["input_ids"] == llm.tokenize(text.encode(), add_bos=False, special=True), text


@pytest.mark.slow
def test_llama_cpp_runs_a_partial_rotary_file_with_the_same_logits(tmp_path: Path) -> None:
    """llama.cpp's phi3 graph rotates the first rope.dimension_count dims of each head in halves, as transformers:
    its logits are layerfold's for the file (fp16 KV cache)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    f = phi3_file(tmp_path / "p.gguf", phi3(partial_rotary_factor=0.75))
    m, _ = layerfold.load(f, quiet=True)
    llm = llama_cpp.Llama(model_path=str(f), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval(IDS)
    got = torch.tensor(np.array(llm.scores[:len(IDS)]), dtype=torch.float32)
    assert_close(logits(m), got, torch.float16, "layerfold vs llama.cpp (phi3, partial rotary)")
