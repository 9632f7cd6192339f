"""GGUF files as input (``layerfold.load("x.gguf")``), checked against llama.cpp's reading of the same file.

Files are written here with the gguf package (tiny random models; quantised tensors through gguf.quants, K-quants
as random valid blocks): quantised weights dequantise to gguf's own reference values, llama / qwen2 / qwen3 files
give the logits of the model they were written from, and a file layerfold would not convert exactly is refused
before anything is dequantised, naming the cause and the fix (unsupported or deci architecture, no tokenizer,
missing / extra / misshaped tensors, truncated or foreign files), with nothing cached and the file untouched. The
tokenizer encodes as llama.cpp does (BOS / EOS flags, SentencePiece spaces, a "$" BOS). The cache: same-named files,
copies, files changed after or during conversion, concurrent conversions. Slow tests (llama-cpp-python) compare
logits and token ids with llama.cpp itself.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import layerfold
import layerfold.core.loading as L
from layerfold.core.checkpoint import CheckpointError, save_checkpoint
from layerfold.core.spec import ModelSpec
from layerfold.interop.export import export
from layerfold.interop.gguf_file import gguf_name, permute_rope, read_gguf_export
from tests.support.models import tiny_model, tiny_spec
from tests.support.tolerances import Tol, assert_close

gguf = pytest.importorskip("gguf", reason="the gguf extra reads GGUF files")
Q = gguf.GGMLQuantizationType
V = gguf.GGUFValueType
pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 300
IDS = list(range(5, 25))


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LAYERFOLD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def byte_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train_from_iterator(["The capital of France is Paris. def fibonacci(n): return n"] * 9, trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")


def spec_of(arch: str = "llama", **kw: Any) -> ModelSpec:
    extra = {"qwen2": dict(qkv_bias=True), "qwen3": dict(qk_norm=True)}.get(arch, {})
    return tiny_spec(**{"d_model": 64, "n_layers": 2, "heads": 4, "kv_heads": 2, "ffn": 256, "vocab": VOCAB,
                        "max_position": 64, "arch": arch, **extra, **kw})


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A llama GGUF with a byte-level BPE tokenizer, as `layerfold export --format gguf` writes it: its tokenizer
    keys are copied into the files written here."""
    d = tmp_path_factory.mktemp("base")
    m = tiny_model(spec_of(), std=0.1, norm_gains=True)
    return Path(export(save_checkpoint(d / "ck", m.spec, m.state_dict(), tokenizer=byte_bpe()), d / "g",
                       format="gguf")["file"])


def _name(lf: str) -> str:
    if lf.endswith(("attn.q.bias", "attn.k.bias", "attn.v.bias")):
        return gguf_name(lf.replace(".bias", ".weight")).replace(".weight", ".bias")
    if lf.endswith(("q_norm.weight", "k_norm.weight")):
        i, which = lf.split(".")[1], lf.split(".")[3][0]
        return f"blk.{i}.attn_{which}_norm.weight"
    return gguf_name(lf)


def write(dst: Path, base: Path, model: Any = None, *, arch: str | None = None, types: dict | None = None,
          keys: dict | None = None, drop: tuple = (), edit: Callable | None = None) -> Path:
    """A GGUF file of ``model`` (default: the base file's own tensors): the base file's metadata under ``arch``,
    tensors as llama.cpp's converter lays them out (q/k rows permuted for llama only), quantised per ``types``
    ({name or "*": type}); ``keys`` {key: (value, type) or None to drop}; ``edit`` changes the tensors."""
    r = gguf.GGUFReader(str(base))
    old = r.fields["general.architecture"].contents()
    arch = arch or old
    keys = keys or {}
    w = gguf.GGUFWriter(str(dst), arch)
    for k, f in r.fields.items():
        k2 = arch + k[len(old):] if k.startswith(old + ".") else k
        if k.startswith("GGUF.") or k == "general.architecture" or k2 in keys:
            continue
        w.add_key_value(k2, f.contents(), f.types[0], sub_type=f.types[-1] if f.types[0] == V.ARRAY else None)
    for k, v in keys.items():
        if v is not None:
            w.add_key_value(k, v[0], v[1], sub_type=v[2] if len(v) > 2 else None)
    if model is None:
        t = {x.name: np.array(gguf.dequantize(x.data, x.tensor_type), np.float32) for x in r.tensors}
    else:
        spec, t = model.spec, {}
        for lf, x in model.state_dict().items():
            x = x.detach().float()
            if arch == "llama" and lf.endswith(("attn.q.weight", "attn.k.weight")):
                x = permute_rope(x, spec.layers[0].n_heads if ".q." in lf else spec.layers[0].n_kv_heads)
            t[_name(lf)] = x.numpy()
    if edit:
        edit(t)
    types = types or {}
    for name, a in t.items():
        q = types.get(name, types.get("*")) if a.ndim == 2 else None
        if q in (Q.Q4_K, Q.Q6_K):
            w.add_tensor(name, k_blocks(a.shape, q), raw_dtype=q)
        elif q is not None:
            w.add_tensor(name, gguf.quants.quantize(a, q), raw_dtype=q)
        else:
            w.add_tensor(name, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def k_blocks(shape: tuple, q: Any, seed: int = 0) -> np.ndarray:
    """Random valid K-quant blocks (gguf.quants cannot quantise to them): scales and quants random, the fp16
    super-block scales small and finite."""
    block, size = gguf.GGML_QUANT_SIZES[q]
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)
    if q == Q.Q4_K:  # d, dmin: the first two halves
        b[..., 0:4] = np.array([0.0005, 0.0002], np.float16).view(np.uint8)
    else:  # Q6_K: d is the last half
        b[..., -2:] = np.array([0.0003], np.float16).view(np.uint8)
    return b.reshape(shape[0], -1)


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def logits(m: Any, ids: list[int] = IDS) -> torch.Tensor:
    with torch.no_grad():
        return m(torch.tensor([ids]))[0]


# ---- quantised files ----------------------------------------------------------------------------------------
QUANTS = {"q8_0": {"*": Q.Q8_0}, "q4_0": {"*": Q.Q4_0},
          "mixed-k": {"*": Q.Q8_0, "blk.0.attn_q.weight": Q.Q4_0, "blk.1.ffn_up.weight": Q.Q5_1,
                      "token_embd.weight": Q.F16, "blk.0.ffn_down.weight": Q.Q4_K, "blk.1.ffn_down.weight": Q.Q6_K}}


@pytest.mark.parametrize("kind", sorted(QUANTS))
def test_quantised_tensors_dequantise_to_the_reference(tmp_path: Path, base: Path, kind: str) -> None:
    f = write(tmp_path / f"{kind}.gguf", base, types=QUANTS[kind])
    _, want, _ = read_gguf_export(f)  # gguf.dequantize, q/k rows put back: llama.cpp's values
    _, got, _ = L.load_spec_state(f, quiet=True)
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k].float(), want[k]), k


# ---- architectures ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_each_architecture_gives_its_models_logits(tmp_path: Path, base: Path, arch: str) -> None:
    """qwen3's head size (16 here) is read from attention.key_length: transformers' reader assumed 128 and failed."""
    m = tiny_model(spec_of(arch), std=0.1, norm_gains=True, seed=1)
    if arch != "llama":
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.endswith("bias"):
                    p.normal_(0, 0.3)
    f = write(tmp_path / f"{arch}.gguf", base, m, arch=arch)
    back, _ = layerfold.load(f, quiet=True)
    assert (back.spec.arch, back.spec.qkv_bias, back.spec.qk_norm) == (arch, arch == "qwen2", arch == "qwen3")
    assert_close(logits(back), logits(m), torch.float32, f"{arch} GGUF")


def test_a_llama_file_named_mistral_is_a_llama_without_sliding_window(tmp_path: Path, base: Path) -> None:
    """transformers takes a llama file whose general.name is "mistral" for a Mistral, then cannot map it; llama.cpp
    runs it as a llama (its llama graph has no sliding window)."""
    f = write(tmp_path / "m.gguf", base, keys={"general.name": ("mistral", V.STRING),
                                               "llama.attention.sliding_window": (8, V.UINT32)})
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:  # 4.x's tokenizer converter has no "mistral" entry
        with pytest.raises(ValueError, match="could not convert the file.*mistral.*Fix: update transformers"):
            layerfold.load(f, quiet=True)
        return
    back, _ = layerfold.load(f, quiet=True)
    assert back.spec.arch == "llama" and back.spec.sliding_window is None


def test_vocab_size_key_is_the_embeddings(tmp_path: Path, base: Path) -> None:
    f = write(tmp_path / "v.gguf", base, keys={"llama.vocab_size": (200, V.UINT32)})
    assert layerfold.load(f, quiet=True)[0].spec.vocab_size == VOCAB


# ---- refusals: named, with the fix, before any dequantisation, nothing cached, the file untouched ---------------
def _cut(n: int) -> Callable:
    return lambda f: f.write_bytes(f.read_bytes()[:n])


def _drop_layer1(t: dict) -> None:
    for k in [k for k in t if k.startswith("blk.1.")]:
        del t[k]


BROKEN: dict[str, tuple[dict, str]] = {
    "deci": (dict(arch="deci"), r"architecture 'deci'.*does not import.*Fix: load the layerfold checkpoint"),
    "gemma": (dict(arch="gemma"), r"architecture 'gemma'.*llama, qwen2, qwen3.*Fix: use a model of one"),
    "phi3-llama-layout": (dict(arch="phi3"), r"phi3 model .* not in the file \(first: blk.0.attn_qkv.weight.*Fix"),
    "no-tokenizer": (dict(keys={"tokenizer.ggml.model": ("none", V.STRING)}), r"has no tokenizer \(tokenizer.ggml.model"
                     r" is \"none\".*Fix: load the layerfold checkpoint or HF directory"),
    "no-tokenizer-key": (dict(keys={"tokenizer.ggml.model": None}), r"no tokenizer \(no tokenizer.ggml.model key.*Fix"),
    "bert-tokenizer": (dict(keys={"tokenizer.ggml.model": ("bert", V.STRING)}), r"tokenizer is of kind 'bert'.*Fix"),
    "missing-tensor": (dict(edit=lambda t: t.pop("blk.1.ffn_up.weight")),
                       r"not in the file \(first: blk.1.ffn_up.weight\); converted, they would be random.*Fix"),
    "more-layers": (dict(keys={"llama.block_count": (3, V.UINT32)}), r"\(3 layers.*first: blk.2.attn_norm"),
    "fewer-layers": (dict(edit=_drop_layer1, keys={"llama.block_count": (2, V.UINT32)}), r"first: blk.1"),
    "layers-past-count": (dict(keys={"llama.block_count": (1, V.UINT32)}),
                          r"tensors of layer 1 while llama.block_count says 1 layers.*dropped.*Fix"),
    "llama-biases": (dict(edit=lambda t: t.update({"blk.0.attn_q.bias": np.zeros(64, np.float32)})),
                     r"no place for \(blk.0.attn_q.bias\).*Fix"),
    "ffn-shape": (dict(keys={"llama.feed_forward_length": (128, V.UINT32)}),
                  r"blk.0.ffn_gate.weight has shape \[256, 64\].*makes it \[128, 64\].*Fix"),
    "kv-shape": (dict(keys={"llama.attention.head_count_kv": (4, V.UINT32)}), r"attn_k.weight has shape \[32, 64\]"),
    "partial-rope": (dict(keys={"llama.rope.dimension_count": (8, V.UINT32)}), r"rope.dimension_count is 8, not the "
                     "head size 16.*Fix"),
    "per-layer-heads": (dict(keys={"llama.attention.head_count": ([4, 2], V.ARRAY, V.UINT32)}),
                        r"head_count differs per layer.*Fix"),
    "vocab-rows": (dict(edit=lambda t: t.update({"token_embd.weight": t["token_embd.weight"][:299]})),
                   r"lists 300 tokens but token_embd.weight has 299 rows.*Fix"),
    "cut-1000": (dict(after=_cut(1000)), r"could not read the GGUF file: it is truncated or damaged.*Fix: download"),
    "cut-in-tensors": (dict(after=lambda f: _cut(f.stat().st_size - 3000)(f)), r"truncated.*tensor .* ends at byte"),
    "cut-20": (dict(after=_cut(20)), r"truncated or damaged.*Fix"),
    "empty": (dict(after=lambda f: f.write_bytes(b"")), r"it is not one \(it is empty.*Fix"),
    "html": (dict(after=lambda f: f.write_bytes(b"<html>404</html>")), r"not one \(it does not start with the GGUF"),
    "huge-counts": (dict(after=lambda f: f.write_bytes(f.read_bytes()[:8] + (2**60).to_bytes(8, "little") * 2
                                                       + f.read_bytes()[24:])), r"more than the file can hold"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_or_unsupported_files_are_refused_first(tmp_path: Path, base: Path, cache: Path,
                                                       monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    import transformers

    kw, match = dict(BROKEN[case][0]), BROKEN[case][1]
    after = kw.pop("after", None)
    f = write(tmp_path / "x.gguf", base, **kw)
    if after:
        after(f)
    before = sha(f)

    def no(*a: Any, **k: Any) -> Any:
        pytest.fail("transformers read the file before the checks refused it")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no)
    with pytest.raises(ValueError, match=match) as e:
        layerfold.load(f, quiet=True)
    assert "Fix:" in str(e.value) and str(f) in str(e.value)
    assert sha(f) == before
    assert not [p for p in cache.iterdir() if p.name != "keys.json"]  # nothing cached, no lock or temporary left


def test_nan_weights_name_the_tensor_and_the_gguf_fix(tmp_path: Path, base: Path) -> None:
    f = write(tmp_path / "nan.gguf", base, edit=lambda t: t["blk.0.ffn_up.weight"].__setitem__((3, 5), np.nan))
    with pytest.raises(CheckpointError, match=r"'layers.0.mlp.up.weight' holds NaN.*in the GGUF file itself.*Fix: "
                                              r"download the file again.*allow_nonfinite"):
        layerfold.load(f, quiet=True)
    with pytest.warns(UserWarning, match="NaN"):
        layerfold.load(f, quiet=True, allow_nonfinite=True)


def test_a_directory_or_an_unreadable_file(tmp_path: Path, base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "d.gguf").mkdir()
    with pytest.raises(FileNotFoundError, match=r"d.gguf: a directory, not a GGUF file.*Fix: point to the .gguf"):
        layerfold.load(tmp_path / "d.gguf", quiet=True)
    import layerfold.core.gguf_input as gi

    real = open

    def denied(p: Any, *a: Any, **k: Any) -> Any:
        if str(p).endswith("base.gguf"):
            raise PermissionError(13, "Permission denied", str(p))
        return real(p, *a, **k)

    monkeypatch.setattr(gi, "open", denied, raising=False)  # (root reads a chmod 0 file)
    f = write(tmp_path / "base.gguf", base)
    with pytest.raises(ValueError, match=r"base.gguf: could not read the GGUF file \(Permission denied\). Fix: make"):
        layerfold.load(f, quiet=True)


# ---- the tokenizer -----------------------------------------------------------------------------------------------
def spm_keys(**flags: bool) -> dict:
    """A SentencePiece ("llama") vocabulary of 300: <unk> <s> </s>, 256 byte tokens, pieces by score."""
    pieces = ["\u2581", "\u2581the", "\u2581capital", "\u2581of", "\u2581France", "\u2581is", "\u2581Paris", ".",
              "\u2581hello", "\u2581world", "he", "ll", "o", "\u2581t", "\u2581c", "ap", "it", "al", "\u2581F", "ra",
              "nce", "\u2581P", "ar", "is", "e", "a", "r", "l", "t", "h", "c", "p", "i", "s", "n", "F", "P", "w", "d",
              "\u2581w", "or"]
    toks = (["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces)[:VOCAB]
    keys = {"tokenizer.ggml.model": ("llama", V.STRING), "tokenizer.ggml.tokens": (toks, V.ARRAY, V.STRING),
            "tokenizer.ggml.scores": ([0.0] * 259 + [-float(i) for i in range(VOCAB - 259)], V.ARRAY, V.FLOAT32),
            "tokenizer.ggml.token_type": ([2, 3, 3] + [6] * 256 + [1] * (VOCAB - 259), V.ARRAY, V.INT32),
            "tokenizer.ggml.bos_token_id": (1, V.UINT32), "tokenizer.ggml.eos_token_id": (2, V.UINT32),
            "tokenizer.ggml.unknown_token_id": (0, V.UINT32), "tokenizer.ggml.pre": None, "tokenizer.ggml.merges": None}
    keys.update({f"tokenizer.ggml.{k}": (v, V.BOOL) for k, v in flags.items()})
    return keys


TEXTS = ["The capital of France is Paris.", "", " hello  world\n\nx", "<s>The</s> def", "  two", "Ünïcödé 🙂"]
# llama.cpp's ids for TEXTS under spm_keys() (add_bos default true), from llama-cpp-python 0.3.36
SPM_IDS = [[1, 259, 87, 269, 273, 274, 275, 276, 259, 271, 105, 277, 278, 293, 289, 283, 264, 280, 281, 282, 266], [1],
           [1, 259, 259, 269, 270, 271, 259, 298, 299, 286, 297, 13, 13, 123],
           [1, 1, 259, 87, 269, 2, 259, 259, 297, 283, 105],
           [1, 259, 259, 272, 296, 271],
           [1, 259, 198, 159, 293, 198, 178, 289, 198, 185, 297, 198, 172, 259, 243, 162, 156, 133]]


def test_sentencepiece_spaces_are_llama_cpps(tmp_path: Path, base: Path) -> None:
    """transformers' Metaspace added the "\u2581" prefix only where the text did not start with a space: " hello"
    lost its space (and "  two" one of its two)."""
    _, tok = layerfold.load(write(tmp_path / "spm.gguf", base, keys=spm_keys()), quiet=True)
    assert [tok(t)["input_ids"] for t in TEXTS] == SPM_IDS
    assert [tok.decode(tok(t)["input_ids"], skip_special_tokens=True) for t in TEXTS[1:3]] == TEXTS[1:3]
    _, tok = layerfold.load(write(tmp_path / "n.gguf", base, keys=spm_keys(add_bos_token=False)), quiet=True)
    assert [tok(t)["input_ids"] for t in TEXTS] == [ids[1:] for ids in SPM_IDS]


@pytest.mark.parametrize("flags", [{}, {"add_bos_token": True}, {"add_bos_token": False},
                                   {"add_bos_token": True, "add_eos_token": True}, {"bos": 5, "add_bos_token": True},
                                   {"pre": "llama-bpe"}, {"pre": "llama-bpe", "add_bos_token": False}])
def test_bos_and_eos_as_the_file_says(tmp_path: Path, base: Path, flags: dict) -> None:
    """A BOS whose text is "$" read as "$A" in transformers' template: every text was encoded twice, no BOS. A
    Llama-3 pre-tokenizer without add_bos_token: llama.cpp adds BOS (and so does layerfold now)."""
    keys: dict[str, Any] = {f"tokenizer.ggml.{k}": (v, V.BOOL) for k, v in flags.items() if k.startswith("add")}
    if "bos" in flags:
        keys["tokenizer.ggml.bos_token_id"] = (flags["bos"], V.UINT32)
    if "pre" in flags:
        keys["tokenizer.ggml.pre"] = (flags["pre"], V.STRING)
    _, tok = layerfold.load(write(tmp_path / "t.gguf", base, keys=keys), quiet=True)
    bos, eos = flags.get("bos", 0), 1
    add_bos = flags.get("add_bos_token", "pre" in flags)
    for t in TEXTS:
        plain = tok(t, add_special_tokens=False)["input_ids"]
        want = [bos] * add_bos + plain + [eos] * bool(flags.get("add_eos_token"))
        assert tok(t)["input_ids"] == want, t


# ---- the cache ----------------------------------------------------------------------------------------------
def _count(monkeypatch: pytest.MonkeyPatch) -> list:
    calls: list = []
    real = L.read_gguf
    monkeypatch.setattr(L, "read_gguf", lambda p, **kw: calls.append(p) or real(p, **kw))
    return calls


def test_same_names_copies_and_edited_files(tmp_path: Path, base: Path, cache: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count(monkeypatch)
    a, b = tiny_model(spec_of(), std=0.1, seed=2), tiny_model(spec_of(), std=0.1, seed=3)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    fa, fb = write(tmp_path / "a" / "model.gguf", base, a), write(tmp_path / "b" / "model.gguf", base, b)
    for _ in range(2):  # two files of one name: each its own conversion, kept side by side
        assert_close(logits(layerfold.load(fa, quiet=True)[0]), logits(a), torch.float32, "a")
        assert_close(logits(layerfold.load(fb, quiet=True)[0]), logits(b), torch.float32, "b")
    assert len(calls) == 2
    copy = tmp_path / "copy.gguf"  # a copy under another name: the same conversion, not one each in turn
    copy.write_bytes(fa.read_bytes())
    assert L.resolve(copy, quiet=True) == L.resolve(fa, quiet=True) == L.resolve(copy, quiet=True)
    assert len(calls) == 2
    c = tiny_model(spec_of(), std=0.1, seed=4)
    st = fa.stat()  # rewritten in place with the same size and mtime (cp -p, touch -r): converted again
    fa.write_bytes(write(tmp_path / "c.gguf", base, c).read_bytes())
    os.utime(fa, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fa.stat().st_size == st.st_size and fa.stat().st_mtime_ns == st.st_mtime_ns
    assert_close(logits(layerfold.load(fa, quiet=True)[0]), logits(c), torch.float32, "a rewritten")
    assert len(calls) == 3 and not [p for p in cache.iterdir() if p.name.startswith(".")]


def test_a_file_changed_while_converting_is_not_cached(tmp_path: Path, base: Path, cache: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    f = write(tmp_path / "m.gguf", base)
    real = L.read_gguf

    def grows(p: Path, **kw: Any) -> Any:
        out = real(p, **kw)
        with open(p, "ab") as fh:
            fh.write(b"\0" * 32)
        return out

    monkeypatch.setattr(L, "read_gguf", grows)
    with pytest.raises(ValueError, match="changed while it was being converted.*nothing was cached. Fix: wait"):
        L.resolve(f, quiet=True)
    assert [p.name for p in cache.iterdir()] == ["keys.json"]


def test_concurrent_conversions_of_one_file(tmp_path: Path, base: Path, cache: Path) -> None:
    """Two processes converting one file: the second used to fail ("refusing to write over ... cache"), or swap
    the folder under the first; now it waits and uses the first one's conversion."""
    code = ("import sys, time, layerfold.core.loading as L\nreal = L.read_gguf\n"
            "L.read_gguf = lambda p, **kw: (real(p, **kw), time.sleep(2))[0]\n"
            "m, _ = L.load(sys.argv[1])\nprint(L.resolve(sys.argv[1], quiet=True).name)")
    f = write(tmp_path / "m.gguf", base)
    env = {**os.environ, "LAYERFOLD_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    ps = [subprocess.Popen([sys.executable, "-c", code, str(f)], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in ps]
    assert [p.returncode for p in ps] == [0, 0], outs
    assert outs[0][0] == outs[1][0] and sum("converting m.gguf once" in e for _, e in outs) == 1, outs
    assert sorted(p.name for p in cache.iterdir()) == sorted(["keys.json", outs[0][0].strip()])


# ---- llama.cpp itself ------------------------------------------------------------------------------------------
def llama_cpp_logits(f: Path, ids: list[int] = IDS) -> torch.Tensor:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(f), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval(ids)
    return torch.tensor(np.array(llm.scores[:len(ids)]), dtype=torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("types,tol", [
    # only the embedding quantised: llama.cpp reads its rows without quantising activations, so exact weights
    # give its logits to a few fp32 ulps of its kernels (K-quants: a model 256 wide, their block)
    ({"token_embd.weight": Q.Q4_0}, 2e-3), ({"token_embd.weight": Q.Q8_0}, 2e-3),
    ({"token_embd.weight": Q.Q4_K}, 2e-3), ({"token_embd.weight": Q.Q6_K}, 2e-3),
    # every matrix quantised: llama.cpp's CPU matmuls quantise the activations to 8 bits as well (~1% a matmul)
    (QUANTS["q8_0"], 6e-2), (QUANTS["q4_0"], 6e-2), (QUANTS["mixed-k"], 6e-2)])
def test_quantised_logits_agree_with_llama_cpp(tmp_path: Path, base: Path, types: dict, tol: float) -> None:
    pytest.importorskip("llama_cpp")
    if types.get("token_embd.weight") in (Q.Q4_K, Q.Q6_K):
        m = tiny_model(spec_of(d_model=256), std=0.05, norm_gains=True)
        wide = {f"llama.{k}": (v, V.UINT32) for k, v in (("embedding_length", 256), ("attention.key_length", 64),
                                                          ("attention.value_length", 64), ("rope.dimension_count", 64))}
        f = write(tmp_path / "k.gguf", base, m, keys=wide, types=types)
    else:
        f = write(tmp_path / "q.gguf", base, types=types)
    back, _ = layerfold.load(f, quiet=True)
    assert_close(logits(back), llama_cpp_logits(f), Tol(tol, tol), "layerfold vs llama.cpp on a quantised GGUF")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral-named-llama-with-window"])
def test_architectures_agree_with_llama_cpp(tmp_path: Path, base: Path, arch: str) -> None:
    """(A llama file with a sliding window of 8 and 20 positions: llama.cpp's llama graph attends to all.)"""
    pytest.importorskip("llama_cpp")
    keys = {"general.name": ("mistral", V.STRING), "llama.attention.sliding_window": (8, V.UINT32)} \
        if arch.startswith("mistral") else None
    arch = "llama" if keys else arch
    m = tiny_model(spec_of(arch), std=0.1, norm_gains=True, seed=1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.3)
    f = write(tmp_path / f"{arch}.gguf", base, m, arch=arch, keys=keys)
    assert_close(logits(layerfold.load(f, quiet=True)[0]), llama_cpp_logits(f), torch.float16, f"{arch} vs llama.cpp")


@pytest.mark.slow
@pytest.mark.parametrize("keys", ["spm", "spm-no-bos", "bpe-bos", "bpe-no-bos", "bpe-eos", "bpe-dollar-bos",
                                  "bpe-llama3-default"])
def test_token_ids_agree_with_llama_cpp(tmp_path: Path, base: Path, keys: str) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    k: dict[str, Any] = {"spm": spm_keys(), "spm-no-bos": spm_keys(add_bos_token=False),
                         "bpe-bos": {"tokenizer.ggml.add_bos_token": (True, V.BOOL)},
                         "bpe-no-bos": {"tokenizer.ggml.add_bos_token": (False, V.BOOL)},
                         "bpe-eos": {"tokenizer.ggml.add_bos_token": (True, V.BOOL),
                                     "tokenizer.ggml.add_eos_token": (True, V.BOOL)},
                         "bpe-dollar-bos": {"tokenizer.ggml.add_bos_token": (True, V.BOOL),
                                            "tokenizer.ggml.bos_token_id": (5, V.UINT32)},
                         "bpe-llama3-default": {"tokenizer.ggml.pre": ("llama-bpe", V.STRING)}}[keys]
    f = write(tmp_path / "t.gguf", base, keys=k)
    llm = llama_cpp.Llama(model_path=str(f), n_ctx=64, verbose=False, vocab_only=True)
    _, tok = layerfold.load(f, quiet=True)
    for t in TEXTS:  # add_bos=True: llama.cpp adds BOS / EOS as the file says
        assert tok(t)["input_ids"] == llm.tokenize(t.encode(), add_bos=True, special=True), t
