"""Longrope rotary scaling (Phi-3-*-128k, Phi-3.5; transformers reads it for Llama-family classes too).

transformers computes longrope per forward: the long factors when max(position_ids) + 1 exceeds the original
context, else the short ones, cos and sin times an attention factor. Phi3ForCausalLM.generate drops its cache at the
step that takes a sequence past the original context and recomputes it (transformers 5; 4.56's recomputation gets
the positions wrong), so every step's logits are those of a forward over the whole sequence: what layerfold's
Runtime gives. The references here: transformers' forward (both versions), and its generate under 5.

Tiny models: original context 16, 64 positions, factors of head_dim / 2 random positive values."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers

import layerfold
from layerfold.core.arch import spec_from_hf_config
from layerfold.core.checkpoint import save_checkpoint
from layerfold.core.model import build_model
from layerfold.core.spec import ModelSpec
from layerfold.inference.runtime import Runtime
from layerfold.inference.streamed_decode import StreamedRuntime
from layerfold.interop.export import export
from tests.support.models import tiny_hf, to_layerfold
from tests.support.tolerances import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")

V5 = int(transformers.__version__.split(".")[0]) >= 5
ORIG, MAX_POS, HD = 16, 64, 16  # tiny_hf: 64 wide, 4 heads of 16 -> 8 factors


def factors(seed: int = 0) -> dict[str, list[float]]:
    g = torch.Generator().manual_seed(seed)
    return {"short_factor": (torch.rand(HD // 2, generator=g) * 2 + 0.5).tolist(),
            "long_factor": (torch.rand(HD // 2, generator=g) * 6 + 1).tolist()}


def phi3(kind: str = "longrope", seed: int = 0, **over: Any) -> Any:
    return tiny_hf("phi3", seed=seed, max_position_embeddings=MAX_POS, original_max_position_embeddings=ORIG,
                   rope_scaling={"type": kind, **factors(seed)}, **over)


def llama(**over: Any) -> Any:
    """A Llama (128 positions) with longrope as transformers 4.x and 5 both read it (original context at the top
    level, the factor its ratio to the positions)."""
    return tiny_hf("llama", original_max_position_embeddings=ORIG,
                   rope_scaling={"rope_type": "longrope", "factor": 128 / ORIG, **factors(1)}, **over)


def ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 97, (1, n), generator=torch.Generator().manual_seed(seed))


def logits(m: Any, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = m(x)
    return getattr(out, "logits", out)[0].float()


def whole_sequence_greedy(hf: Any, prompt: list[int], steps: int) -> list[int]:
    """Greedy tokens, each from transformers' forward over the whole sequence so far."""
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(logits(hf, torch.tensor([seq]))[-1].argmax()))
    return seq[len(prompt):]


# ---- the forward ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [5, ORIG, ORIG + 1, 40])  # short, the last short length, the first long one, long
# (Phi3Config renames the legacy "yarn" and "su"; transformers 5 fails on "su": test_both_config_forms_read_alike)
@pytest.mark.parametrize("kind", ["longrope", "yarn"] + ([] if V5 else ["su"]))
def test_phi3_logits_equal_transformers(kind: str, n: int) -> None:
    hf = phi3(kind)
    m = to_layerfold(hf)
    assert m.spec.rope_type == "longrope" and m.spec.rope_original_max_pos == ORIG and m.spec.max_position == MAX_POS
    assert m.spec.rope_attention_factor == pytest.approx(hf.model.rotary_emb.attention_scaling, rel=1e-12)
    assert_close(logits(m, ids(n)), logits(hf, ids(n)), torch.float32, f"phi3 {kind}, {n} tokens")


@pytest.mark.parametrize("n", [ORIG, ORIG + 1, 40])
def test_llama_logits_equal_transformers(n: int) -> None:
    """transformers' rope utilities read longrope for every Llama-family class: so does layerfold."""
    hf = llama()
    m = to_layerfold(hf)
    assert m.spec.arch == "llama" and m.spec.rope_type == "longrope"
    assert_close(logits(m, ids(n)), logits(hf, ids(n)), torch.float32, f"llama longrope, {n} tokens")


def test_the_factors_switch_at_the_original_context() -> None:
    """An earlier position's logits depend on the sequence's length: short factors up to ORIG tokens, long beyond."""
    m = to_layerfold(phi3())
    x = ids(ORIG + 1)
    a, b, c = logits(m, x[:, :ORIG - 1])[-1], logits(m, x[:, :ORIG])[-2], logits(m, x)[-3]
    assert torch.allclose(a, b, atol=1e-6) and not torch.allclose(b, c, atol=1e-3)


def test_rows_of_a_batch_use_their_own_length() -> None:
    """A batch of a short and a long sequence (left padding, key_valid) gives each row its own regime."""
    m = to_layerfold(phi3())
    short, long_ = ids(10, 1)[0], ids(30, 2)[0]
    x = torch.zeros(2, 30, dtype=torch.long)
    x[0, 20:], x[1] = short, long_
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[0, :20] = False
    with torch.no_grad():
        both = m(x, key_valid=valid)
    assert_close(both[0, 20:], logits(m, short[None]), torch.float32, "short row in a batch")
    assert_close(both[1], logits(m, long_[None]), torch.float32, "long row in a batch")


# ---- generation -------------------------------------------------------------------------------------------------
def greedy(rt: Any, prompts: list[list[int]], steps: int) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in prompts]
    lg = rt.prefill(prompts)
    for _ in range(steps):
        nxt = lg.argmax(-1).tolist()
        for o, t in zip(out, nxt, strict=True):
            o.append(t)
        lg = rt.decode(nxt)
    return out


@pytest.mark.parametrize("kernels", ["torch", "triton"])  # (triton: interpreted)
def test_runtime_generation_crossing_the_original_context_equals_transformers(kernels: str) -> None:
    """Prompts of 10 (crossing at its 7th new token), ORIG (crossing at its 1st) and 20 tokens (long from the start),
    batched: each row's greedy tokens are transformers' over the whole sequence, and transformers 5's generate."""
    hf = phi3()
    m = to_layerfold(hf)
    prompts = [ids(10, 3)[0].tolist(), ids(ORIG, 4)[0].tolist(), ids(20, 5)[0].tolist()]
    steps = 12 if kernels == "torch" else 8
    got = greedy(Runtime(m, max_batch=3, max_len=48, kernels=kernels), prompts, steps)
    for p, g in zip(prompts, got, strict=True):
        assert g == whole_sequence_greedy(hf, p, steps), f"prompt of {len(p)} tokens"
        if V5:  # (4.56's Phi3 generate computes wrong positions where it recomputes its cache)
            gen = hf.generate(torch.tensor([p]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
            assert g == gen[0, len(p):].tolist(), f"prompt of {len(p)} tokens vs transformers' generate"


def test_runtime_logits_at_every_step_equal_the_whole_sequence_forward() -> None:
    hf = phi3()
    rt = Runtime(to_layerfold(hf), max_batch=1, max_len=40, kernels="torch")
    seq = ids(12, 6)[0].tolist()
    lg = rt.prefill([seq])
    for _ in range(10):
        assert_close(lg[0], logits(hf, torch.tensor([seq]))[-1], torch.float32, f"step at {len(seq)} tokens")
        seq.append(int(lg[0].argmax()))
        lg = rt.decode([seq[-1]])


def test_a_copied_row_keeps_its_tokens_for_the_crossing() -> None:
    """copy_rows (the server's n choices) carries the row's tokens, so the copy's crossing recomputes it too."""
    hf = phi3()
    rt = Runtime(to_layerfold(hf), max_batch=2, max_len=40, kernels="torch")
    p = ids(12, 7)[0].tolist()
    first = rt.prefill([p], rows=[0])
    rt.copy_rows(0, [1])
    seq, lg = list(p), first
    for _ in range(8):
        seq.append(int(lg[0].argmax()))
        lg = rt.decode([seq[-1]] * 2)
        assert torch.equal(lg[0], lg[1])
    assert seq[len(p):] == whole_sequence_greedy(hf, p, 8)


def test_streamed_runtime_generation_crossing_the_original_context() -> None:
    hf = phi3()
    prompts = [ids(10, 8)[0].tolist(), ids(14, 9)[0].tolist()]
    got = greedy(StreamedRuntime(to_layerfold(hf), "cpu", max_batch=2, max_len=40), prompts, 10)
    for p, g in zip(prompts, got, strict=True):
        assert g == whole_sequence_greedy(hf, p, 10), f"prompt of {len(p)} tokens"


# ---- configs ----------------------------------------------------------------------------------------------------
def test_both_config_forms_read_alike() -> None:
    """transformers 5's rope_parameters (theta inside) and 4.x's rope_scaling + rope_theta: the same spec."""
    base = {k: v for k, v in phi3().config.to_dict().items() if k not in ("rope_parameters", "rope_scaling",
                                                                          "rope_theta")}
    five = {**base, "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, **factors()}}
    four = {**base, "rope_theta": 10000.0, "rope_scaling": {"type": "longrope", **factors()}}
    legacy = {**base, "rope_theta": 10000.0, "rope_scaling": {"type": "su", **factors()}}
    specs = [spec_from_hf_config(c) for c in (five, four, legacy)]
    assert specs[0] == specs[1] == specs[2] == to_layerfold(phi3()).spec


def test_phi3_config_defaults() -> None:
    """Without original_max_position_embeddings Phi3Config's 4096 applies, and the attention factor follows."""
    cfg = {k: v for k, v in phi3().config.to_dict().items() if k not in ("rope_parameters", "original_max_position"
                                                                          "_embeddings")}
    cfg.update(rope_scaling={"type": "longrope", **factors()}, max_position_embeddings=131072)
    spec = spec_from_hf_config(cfg)
    assert spec.rope_original_max_pos == 4096
    assert spec.rope_attention_factor == pytest.approx((1 + np.log(32) / np.log(4096)) ** 0.5)


BAD = {
    "no long_factor": ({"type": "longrope", "short_factor": [1.0] * 8}, r"longrope long_factor is None, not a list "
                       r"of 8 finite numbers > 0 .*Fix: restore the model's own rope_scaling"),
    "short too short": ({"type": "su", "short_factor": [1.0] * 7, "long_factor": [1.0] * 8},
                        r"longrope short_factor is 7 numbers, not a list of 8"),
    "strings": ({"type": "longrope", "short_factor": ["1"] * 8, "long_factor": [1.0] * 8},
                r"short_factor is \['1', .*not a list of 8 finite numbers"),
    "zero": ({"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [0.0] * 8}, r"long_factor is .*> 0"),
    "legacy yarn, no factors": ({"rope_type": "yarn", "factor": 4.0}, r"longrope short_factor is None"),
    "factor against the ratio": ({"type": "longrope", "factor": 2.0, **factors()},
                                 r"longrope factor=2.0 differs from max_position_embeddings / original.* = 4.*Fix"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_longrope_is_refused_by_name(case: str) -> None:
    scaling, match = BAD[case]
    cfg = {k: v for k, v in phi3().config.to_dict().items() if k != "rope_parameters"}
    with pytest.raises(ValueError, match=match) as e:
        spec_from_hf_config({**cfg, "rope_scaling": scaling}, "cfg")
    assert "Fix:" in str(e.value)


def test_partial_rotary_takes_a_factor_per_rotary_pair() -> None:
    """(read, with factors for its rotary dims: tests/core/test_partial_rotary.py)"""
    cfg = {k: v for k, v in phi3().config.to_dict().items() if k != "rope_parameters"}
    cfg.update(rope_scaling={"type": "longrope", **factors()}, partial_rotary_factor=0.75)
    with pytest.raises(ValueError, match=r"short_factor is 8 numbers, not a list of 6 .* of 12 rotary dims.*Fix"):
        spec_from_hf_config(cfg, "cfg")


def test_an_original_context_only_transformers_5_reads_is_refused() -> None:
    """Inside the rope entry and without a top-level one, 4.x ignores it (max_position_embeddings instead)."""
    cfg = {k: v for k, v in llama().config.to_dict().items() if k not in ("rope_parameters",
                                                                           "original_max_position_embeddings")}
    cfg["rope_scaling"] = {"rope_type": "longrope", "original_max_position_embeddings": ORIG, "factor": 4.0,
                           **factors()}
    with pytest.raises(ValueError, match=r"original_max_position_embeddings=16 sits inside the rope entry.*Fix: move"):
        spec_from_hf_config(cfg, "cfg")


# ---- the spec and checkpoints -----------------------------------------------------------------------------------
def test_checkpoint_round_trip(tmp_path: Path) -> None:
    m = to_layerfold(phi3())
    d = save_checkpoint(tmp_path / "ck", m.spec, m.state_dict())
    saved = json.loads((Path(d) / "config.json").read_text())
    assert json.dumps(saved).count("rope_long_factor") == 1
    back, _ = layerfold.load(d, tokenizer=False)
    assert back.spec == m.spec
    assert_close(logits(back, ids(30)), logits(m, ids(30)), torch.float32, "reloaded")


def test_a_spec_without_the_factor_fields_loads_as_before() -> None:
    m = to_layerfold(tiny_hf("phi3"))
    d = m.spec.to_dict()
    assert "rope_short_factor" not in d and "rope_long_factor" not in d  # (an older checkpoint's config, unchanged)
    assert ModelSpec.from_dict(d) == m.spec


SPEC_BAD = {
    "length": (dict(rope_short_factor=(1.0,) * 7), r"rope_short_factor holds 7 factors, but the attention heads of 16 "
               r"have 8 rotary frequency pairs"),
    "non-finite": (dict(rope_long_factor=(float("inf"),) * 8), r"rope_long_factor=[(\[]inf, .* is not a list of fin"),
    "negative": (dict(rope_long_factor=(-1.0,) * 8), r"rope_long_factor=.* is not a list of finite numbers > 0"),
    "true": (dict(rope_long_factor=(True,) * 8), r"rope_long_factor=.* is not a list of finite numbers > 0"),
    "not a list": (dict(rope_long_factor="1,2"), r"rope_long_factor='1,2' is not a list"),
    "factors without longrope": (dict(rope_type="default"), r"rope_short_factor is set but rope_type='default'.*Fix"),
    "no original context": (dict(rope_original_max_pos=0), r"longrope with rope_original_max_pos=0.*Fix"),
}


@pytest.mark.parametrize("case", sorted(SPEC_BAD))
def test_a_malformed_spec_is_refused_naming_the_field(case: str, tmp_path: Path) -> None:
    """Also from a checkpoint's config.json, before any weights load."""
    m = to_layerfold(phi3())
    d = save_checkpoint(tmp_path / "ck", m.spec, m.state_dict())
    change, match = SPEC_BAD[case]
    with pytest.raises(ValueError, match=match) as e:
        ModelSpec.from_dict({**m.spec.to_dict(), **change})
    assert "Fix:" in str(e.value)
    cfg = json.loads((Path(d) / "config.json").read_text())
    cfg["spec"].update({k: list(v) if isinstance(v, tuple) else v for k, v in change.items()})
    (Path(d) / "config.json").write_text(json.dumps(cfg))
    (Path(d) / "model.safetensors").write_bytes(b"not read")  # refused before the weights
    with pytest.raises(ValueError, match=match):
        layerfold.load(d, tokenizer=False)


def test_head_sizes_that_differ_are_refused() -> None:
    spec = to_layerfold(phi3()).spec
    l0 = spec.layers[0]
    odd = spec.layers[1].__class__(**{**l0.__dict__, "head_dim": 8, "n_heads": 8, "n_kv_heads": 4})
    with pytest.raises(ValueError, match=r"attention heads of 8, 16 have 4 and 8 rotary frequency pairs.*Fix"):
        spec.with_layers([l0, odd, l0])


# ---- exports ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["phi3", "llama"])
def test_hf_export_loads_in_transformers_with_the_same_logits(tmp_path: Path, source: str) -> None:
    m = to_layerfold(phi3() if source == "phi3" else llama())
    ck = save_checkpoint(tmp_path / "ck", m.spec, m.state_dict())
    info = export(ck, tmp_path / "hf", format="hf", verify=True)
    assert info["verify"]
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    # a Phi-3 as its own class (tests/interop/test_phi3_export.py), a Llama as Llama
    assert type(hf).__name__ == ("Phi3ForCausalLM" if source == "phi3" else "LlamaForCausalLM")
    for n in (ORIG, ORIG + 1, 40):
        assert_close(logits(hf, ids(n)), logits(m, ids(n)), torch.float32, f"hf export, {n} tokens")
    back, _ = layerfold.load(tmp_path / "hf", tokenizer=False)
    assert back.spec.rope_short_factor == m.spec.rope_short_factor and back.spec.rope_original_max_pos == ORIG
    assert back.spec.rope_attention_factor == pytest.approx(m.spec.rope_attention_factor, rel=1e-12)


@pytest.mark.parametrize("fmt,match", [
    ("gguf", r"cannot be exported as gguf: its longrope rotary .*llama.cpp switches its factors by the context size"
             r".*Fix: export it with --format hf"),
    ("decilm", r"cannot be exported as decilm: its longrope rotary .*vLLM switches per batch.*Fix: export it with "
               r"--format hf"),
])
def test_exports_that_cannot_carry_longrope_are_refused(tmp_path: Path, fmt: str, match: str) -> None:
    m = to_layerfold(phi3())
    ck = save_checkpoint(tmp_path / "ck", m.spec, m.state_dict())
    with pytest.raises(ValueError, match=match):
        export(ck, tmp_path / fmt, format=fmt)
    assert not (tmp_path / fmt).exists()


# ---- GGUF input -------------------------------------------------------------------------------------------------
def longrope_file(tmp_path: Path, hf: Any, **keys: Any) -> Path:
    from tests.support.gguf_files import phi3_file

    f = factors()
    return phi3_file(tmp_path / "lr.gguf", hf, keys={"phi3.rope.scaling.attn_factor":
                                                     float(hf.model.rotary_emb.attention_scaling), **keys},
                     tensors={"rope_factors_long.weight": np.array(f["long_factor"], np.float32),
                              "rope_factors_short.weight": np.array(f["short_factor"], np.float32)})


@pytest.fixture
def gguf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    pytest.importorskip("gguf", reason="the gguf extra reads GGUF files")
    monkeypatch.setenv("LAYERFOLD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_phi3_gguf_with_longrope_converts(tmp_path: Path, gguf_cache: Path) -> None:
    hf = phi3(vocab_size=300)
    m, _ = layerfold.load(longrope_file(tmp_path, hf), quiet=True)
    want = to_layerfold(hf).spec
    assert m.spec.rope_type == "longrope" and m.spec.rope_original_max_pos == ORIG and m.spec.max_position == MAX_POS
    assert m.spec.rope_short_factor == pytest.approx(want.rope_short_factor, rel=1e-6)
    assert m.spec.rope_attention_factor == pytest.approx(want.rope_attention_factor, rel=1e-6)
    for n in (ORIG, 30):
        x = torch.randint(0, 300, (1, n), generator=torch.Generator().manual_seed(n))
        assert_close(logits(m, x), logits(hf, x), torch.float32, f"gguf longrope, {n} tokens")


@pytest.mark.slow
def test_llama_cpp_picks_the_factors_by_its_context_size(tmp_path: Path, gguf_cache: Path) -> None:
    """llama.cpp picks the long factors for every sequence when its n_ctx (here at least 256: it pads the context)
    exceeds the original 16: a sequence of 30 tokens gets layerfold's logits (long there too); one of 12 tokens
    those of layerfold with the long factors in place of the short ones (the documented difference)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from dataclasses import replace

    hf = phi3(vocab_size=300)
    f = longrope_file(tmp_path, hf)
    m, _ = layerfold.load(f, quiet=True)
    all_long = build_model(replace(m.spec, rope_short_factor=m.spec.rope_long_factor), m.state_dict()).eval()
    llm = llama_cpp.Llama(model_path=str(f), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    for n, ref in ((30, m), (12, all_long)):
        x = [(7 * i + 5) % 300 for i in range(n)]
        llm.reset()
        llm.eval(x)
        got = torch.tensor(np.array(llm.scores[:n]), dtype=torch.float32)
        assert_close(logits(ref, torch.tensor([x])), got, torch.float16, f"layerfold vs llama.cpp, {n} tokens")
    off = lambda model: float((logits(model, torch.tensor([x])) - got).abs().max())  # noqa: E731
    assert off(m) > 3 * off(all_long)  # (layerfold, short factors for 12 tokens, is not what llama.cpp computes)


def test_spec_of_a_model_built_from_it_runs(tmp_path: Path) -> None:
    """build_model from the spec alone (random weights): the Runtime and the forward agree across the crossing."""
    m = build_model(to_layerfold(phi3()).spec)
    seq = ids(14, 10)[0].tolist()
    got = greedy(Runtime(m, max_batch=1, max_len=32, kernels="torch"), [seq], 6)[0]
    assert got == whole_sequence_greedy(m, seq, 6)
