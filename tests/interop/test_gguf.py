"""`export --format gguf`: arch llama read back by transformers' GGUF reader, arch deci read back by gguf.GGUFReader,
and (slow, when llama-cpp-python is installed) both run in llama.cpp itself."""

from __future__ import annotations

import math

import pytest
import torch

from layerfold.core.checkpoint import save_checkpoint
from layerfold.core.spec import LayerSpec, ModelSpec
from layerfold.interop.export import export
from layerfold.interop.gguf_file import gguf_field, permute_rope, unpermute_rope
from layerfold.surgery.depth import apply_depth_plan
from layerfold.surgery.plan import DepthPlan
from tests.support.models import SMOLLM2_VOCAB, tiny_model, tiny_spec
from tests.support.tolerances import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")

L = LayerSpec
LLAMA = dict(d_model=48, n_layers=4, heads=4, kv_heads=2, head_dim=12, ffn=72, vocab=61, rope_theta=10000.0,
             max_position=128, bos_token_id=1, eos_token_ids=(2,))


def deci_spec() -> ModelSpec:
    """Per-layer KV heads and FFN widths with an MLP replacement block (and one as the first layer: llama.cpp's
    deci graph handles that, vLLM's DeciLM does not)."""
    layers = (L(48, 48, 48, d_ffn=40, has_attn=False, kind="mlp"), L(48, 48, 48, 4, 2, 12, 72),
              L(48, 48, 48, 4, 1, 12, 32), L(48, 48, 48, d_ffn=56, has_attn=False, kind="mlp"),
              L(48, 48, 48, 4, 4, 12, 24))
    return ModelSpec(vocab_size=61, d_model=48, layers=layers, rope_theta=500.0, tie_embeddings=True).validate()


def ids(n: int = 15, vocab: int = 61) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(2))


def test_rope_permutation_round_trips() -> None:
    w = torch.randn(4 * 12, 48)
    assert torch.equal(unpermute_rope(permute_rope(w, 4), 4), w)
    assert not torch.equal(permute_rope(w, 4), w)


@pytest.mark.parametrize("tie", [True, False])
def test_llama_gguf_loads_in_transformers_gguf_reader(tmp_path, tie: bool) -> None:
    from transformers import AutoModelForCausalLM

    m = tiny_model(**LLAMA, tie=tie, std=0.1, norm_gains=True)
    pruned = apply_depth_plan(m, DepthPlan(n_layers=4, drop=(2,)))
    ckpt = save_checkpoint(tmp_path / "ck", pruned.spec, pruned.state_dict())
    info = export(ckpt, tmp_path / "gguf", format="gguf")
    assert info["architecture"] == "llama" and info["file"].endswith("model.gguf")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "gguf"), gguf_file="model.gguf",
                                              dtype=torch.float32).eval()
    x = ids()
    with torch.no_grad():
        assert_close(hf(x).logits, pruned(x), torch.float32, "GGUF through transformers vs layerfold")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_gguf_dtypes_verify(tmp_path, dtype: str) -> None:
    import gguf

    m = tiny_model(**LLAMA, tie=True, std=0.1)
    ckpt = save_checkpoint(tmp_path / "ck", m.spec, m.state_dict())
    info = export(ckpt, tmp_path / "g", format="gguf", dtype=dtype, verify=True)
    assert info["dtype"] == dtype and info["verify"]["max_rel_diff"] < 1e-4
    assert "transformers" in info["verify"]["reader"]
    r = gguf.GGUFReader(info["file"])
    kinds = {t.name: t.tensor_type.name for t in r.tensors}
    assert kinds["blk.0.attn_q.weight"] == {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[dtype]
    assert kinds["blk.0.attn_norm.weight"] == "F32"


def test_deci_gguf_has_per_layer_arrays_and_reads_back(tmp_path) -> None:
    import gguf

    m = tiny_model(deci_spec(), std=0.1, norm_gains=True)
    ckpt = save_checkpoint(tmp_path / "ck", m.spec, m.state_dict())
    info = export(ckpt, tmp_path / "g", format="gguf", verify=True)
    assert info["architecture"] == "deci" and info["verify"]["max_rel_diff"] < 1e-4
    r = gguf.GGUFReader(info["file"])
    assert gguf_field(r, "general.architecture") == "deci"
    assert gguf_field(r, "deci.attention.head_count") == [0, 4, 4, 0, 4]
    assert gguf_field(r, "deci.attention.head_count_kv") == [0, 2, 1, 0, 4]
    assert gguf_field(r, "deci.feed_forward_length") == [40, 72, 32, 56, 24]
    shapes = {t.name: [int(s) for s in t.shape] for t in r.tensors}  # GGUF lists the fastest dimension first
    assert shapes["blk.2.attn_k.weight"] == [48, 12] and shapes["blk.1.ffn_gate.weight"] == [48, 72]
    assert "blk.0.attn_q.weight" not in shapes and "blk.0.attn_norm.weight" not in shapes
    assert "output.weight" not in shapes  # tied head


def test_attention_only_layer_is_refused_for_gguf(tmp_path) -> None:
    spec = ModelSpec(vocab_size=61, d_model=48, layers=(L(48, 48, 48, 4, 2, 12, 72),
                                                        L(48, 48, 48, 4, 2, 12, 0, has_mlp=False))).validate()
    m = tiny_model(spec)
    ckpt = save_checkpoint(tmp_path / "ck", m.spec, m.state_dict())
    with pytest.raises(ValueError, match="attention-only.*Fix: export it with --format decilm"):
        export(ckpt, tmp_path / "g", format="gguf")
    assert not (tmp_path / "g").exists()


def smollm2_checkpoint(tmp_path, spec: ModelSpec) -> tuple[object, object]:
    """A tiny model with the embedded model's tokenizer, whose provenance leads to the embedded GGUF file."""
    from layerfold.core.loading import load_tokenizer, resolve

    m = tiny_model(spec, std=0.05, norm_gains=True)
    tok = load_tokenizer(resolve("smollm2-135m", quiet=True))
    ckpt = save_checkpoint(tmp_path / "ck", m.spec, m.state_dict(), tokenizer=tok,
                           provenance={"source": "smollm2-135m", "method": "test"})
    return m, ckpt


def test_tokenizer_comes_from_the_origin_gguf_or_tokenizer_json(tmp_path) -> None:
    import gguf

    spec = tiny_spec(d_model=64, n_layers=2, heads=4, kv_heads=2, ffn=96, vocab=SMOLLM2_VOCAB, tie=True)
    m, ckpt = smollm2_checkpoint(tmp_path, spec)
    info = export(ckpt, tmp_path / "a", format="gguf")
    assert info["tokenizer_source"].startswith("gguf:")
    r = gguf.GGUFReader(info["file"])
    assert gguf_field(r, "tokenizer.ggml.pre") == "smollm"
    tokens = r.fields["tokenizer.ggml.tokens"]
    first = [tokens.contents(i) for i in range(3)]
    assert len(tokens.data) == 49152
    # without a GGUF origin the vocabulary comes from tokenizer.json
    from layerfold.core.loading import load_tokenizer

    plain = save_checkpoint(tmp_path / "plain", m.spec, m.state_dict(), tokenizer=load_tokenizer(ckpt))
    info = export(plain, tmp_path / "b", format="gguf")
    r = gguf.GGUFReader(info["file"])
    assert info["tokenizer_source"] == "tokenizer.json" and gguf_field(r, "tokenizer.ggml.model") == "gpt2"
    assert [r.fields["tokenizer.ggml.tokens"].contents(i) for i in range(3)] == first


YARN = dict(rope_type="yarn", rope_factor=4.0, rope_original_max_pos=8, rope_attention_factor=0.1 * math.log(4) + 1)
LLAMA_CPP_CASES = {  # case -> (spec fields, the GGUF arch)
    "llama": ({}, "llama"), "deci": ({"mlp_blocks": (2,)}, "deci"), "no-tokenizer": ({}, "llama"),
    "llama3-rope": (dict(rope_type="llama3", rope_factor=8.0, rope_original_max_pos=16), "llama"),
    "yarn-rope": (YARN, "llama"),
    "qwen2": (dict(arch="qwen2", qkv_bias=True), "qwen2"),
    "qwen3": (dict(arch="qwen3", qk_norm=True, head_dim=32), "qwen3"),
    "qwen3-yarn": (dict(arch="qwen3", qk_norm=True, **YARN), "qwen3"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(LLAMA_CPP_CASES))
def test_gguf_runs_in_llama_cpp(tmp_path, case: str) -> None:
    """llama.cpp (through llama-cpp-python) computes the same logits as layerfold from the exported file: the
    llama, deci, qwen2 (q/k/v biases) and qwen3 (q/k norms) archs, Llama-3 rope scaling (its rope_freqs tensor),
    YaRN, and a file without a tokenizer (token ids only)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    fields, arch = LLAMA_CPP_CASES[case]
    spec = tiny_spec(**{"d_model": 64, "n_layers": 4, "heads": 4, "kv_heads": 2, "ffn": 128, "vocab": SMOLLM2_VOCAB,
                        "tie": True, **fields})
    m, ckpt = smollm2_checkpoint(tmp_path, spec)
    if case == "no-tokenizer":
        ckpt = save_checkpoint(tmp_path / "bare", m.spec, m.state_dict())
    info = export(ckpt, tmp_path / "g", format="gguf")
    assert info["architecture"] == arch and info["tokenizer"] == (case != "no-tokenizer")
    llm = llama_cpp.Llama(model_path=info["file"], n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    toks = ids(12, SMOLLM2_VOCAB)[0].tolist()
    llm.eval(toks)
    got = torch.tensor(llm.scores[:len(toks)], dtype=torch.float32)
    with torch.no_grad():
        want = m(torch.tensor([toks]))[0]
    assert_close(got, want, torch.float16, f"llama.cpp ({case}) vs layerfold logits")


def test_sliding_window_models_are_refused_for_gguf(tmp_path) -> None:
    m = tiny_model(**{**LLAMA, "sliding_window": 8, "arch": "mistral"})
    ckpt = save_checkpoint(tmp_path / "ck", m.spec, m.state_dict())
    with pytest.raises(ValueError, match="sliding-window.*Fix: export it with --format hf"):
        export(ckpt, tmp_path / "g", format="gguf")


def _split(regex: str) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


def _pre_tokenizers() -> dict[str, dict]:
    from layerfold.interop.gguf_file import LLAMA3_SPLIT, QWEN2_SPLIT

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {"gpt-2": byte_level, "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, byte_level]},
        "llama-bpe": _split(LLAMA3_SPLIT), "qwen2": _split(QWEN2_SPLIT)}


TEXTS = ["Hello world.", "x = 12345 + 678;", "Wait... what?! (yes)", "  two  spaces\n\nnew\r\nline", "naïve café 東京",
         "it's we'll I'M", "a.b.c", "$100,000.50", "tabs\tand  \t mixed", "def f(x):\n    return x**2  # sq"]


def _tokenizer_with_pre(tmp_path, pre: dict | None) -> object:
    """The embedded model's tokenizer, saved as tokenizer.json, with another pre-tokenizer (or its own)."""
    import json

    from layerfold.core.loading import load_tokenizer, resolve

    d = tmp_path / "tok"
    load_tokenizer(resolve("smollm2-135m", quiet=True)).save_pretrained(d)
    if pre is not None:
        tj = json.loads((d / "tokenizer.json").read_text())
        tj["pre_tokenizer"] = pre
        (d / "tokenizer.json").write_text(json.dumps(tj))
    return load_tokenizer(d)


def test_pre_tokenizers_map_to_llama_cpp_names(tmp_path) -> None:
    """tokenizer.json's pre-tokenizer picks tokenizer.ggml.pre; one llama.cpp has no name for gets no tokenizer (the
    file used to say "default", which splits punctuation, digits and contractions otherwise: 3 of 8 texts differed)."""
    from layerfold.interop.gguf_file import pre_tokenizer

    for name, pre in _pre_tokenizers().items():
        assert pre_tokenizer({"pre_tokenizer": pre}) == name
    assert pre_tokenizer({"pre_tokenizer": _split(r"\p{L}+|\s+")}) is None
    assert pre_tokenizer({"pre_tokenizer": {"type": "Metaspace"}}) is None
    tok = _tokenizer_with_pre(tmp_path, _split(r"\p{L}+|\s+"))
    m = tiny_model(**{**LLAMA, "vocab": SMOLLM2_VOCAB})
    ckpt = save_checkpoint(tmp_path / "ck", m.spec, m.state_dict(), tokenizer=tok)
    info = export(ckpt, tmp_path / "g", format="gguf")
    assert not info["tokenizer"] and "pre-tokenizer" in info["note"] and "convert_hf_to_gguf.py" in info["note"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_llama_cpp_tokenizes_as_the_model_does(tmp_path, name: str) -> None:
    """The GGUF's tokenizer, built from tokenizer.json, splits every text into the ids the model's tokenizer gives."""
    llama_cpp = pytest.importorskip("llama_cpp")
    tok = _tokenizer_with_pre(tmp_path, _pre_tokenizers()[name])
    m = tiny_model(**{**LLAMA, "vocab": SMOLLM2_VOCAB + 64})  # a padded vocabulary, as Qwen's: [PAD] ids
    ckpt = save_checkpoint(tmp_path / "ck", m.spec, m.state_dict(), tokenizer=tok)
    info = export(ckpt, tmp_path / "g", format="gguf")
    assert info["tokenizer_source"] == "tokenizer.json"
    llm = llama_cpp.Llama(model_path=info["file"], vocab_only=True, verbose=False)
    for t in TEXTS:
        assert llm.tokenize(t.encode(), add_bos=False, special=False) == tok.encode(t, add_special_tokens=False), t
