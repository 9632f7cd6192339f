"""``export --format hf`` of a Phi-3 / Phi-4 model as transformers' own ``Phi3ForCausalLM`` (interop.phi3_hf).

Tiny random transformers Phi3 models (plain, a sliding window, partial rotary 0.75, longrope, partial + longrope),
read into layerfold, optionally depth-pruned, exported: transformers loads the export with layerfold's logits
(sequences shorter and longer than longrope's original context), its generate crossing the original context gives
layerfold's tokens (transformers 5), and layerfold reads the export back with the same logits."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

import layerfold
from layerfold.core.checkpoint import save_checkpoint
from layerfold.core.model import build_model
from layerfold.inference.runtime import Runtime
from layerfold.interop.export import export
from layerfold.interop.formats import carriers, hf_arch, hf_problem
from layerfold.surgery.depth import drop_layers
from tests.core import test_longrope as lr
from tests.core import test_partial_rotary as pr
from tests.core.test_longrope import V5, greedy, ids, logits, whole_sequence_greedy
from tests.support.models import tiny_hf, to_layerfold
from tests.support.tolerances import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")

ORIG = lr.ORIG  # 16 (both helpers' original context; 64 positions)
assert pr.ORIG == ORIG and pr.MAX_POS == lr.MAX_POS

SOURCES = {
    "plain": lambda: tiny_hf("phi3"),
    "window": lambda: tiny_hf("phi3", sliding_window=5),
    "partial": lambda: pr.phi3(0.75),
    "longrope": lambda: lr.phi3(),
    "partial+longrope": lambda: pr.phi3(0.75, longrope=True),
}
LONGROPE = ("longrope", "partial+longrope")


def lengths(case: str) -> list[int]:
    return [5, ORIG, ORIG + 1, 40] if case in LONGROPE else [5, 20]


def exported(tmp_path: Path, case: str, drop: bool = False) -> tuple[Any, Path, dict[str, Any]]:
    m = to_layerfold(SOURCES[case]())
    if drop:
        m = drop_layers(m, [1])
    ck = save_checkpoint(tmp_path / "ck", m.spec, m.state_dict())
    info = export(ck, tmp_path / "hf", format="hf")
    return m, tmp_path / "hf", info


def load_hf(d: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("case", sorted(SOURCES))
def test_the_export_is_a_phi3_with_layerfolds_logits(tmp_path: Path, case: str, drop: bool) -> None:
    m, d, info = exported(tmp_path, case, drop)
    assert info["architecture"] == "Phi3ForCausalLM" and info["layers"] == (2 if drop else 3)
    hf = load_hf(d)
    assert type(hf).__name__ == "Phi3ForCausalLM"
    assert "model.layers.0.self_attn.qkv_proj.weight" in hf.state_dict()
    back, _ = layerfold.load(d, tokenizer=False)
    assert (back.spec.rotary_dim, back.spec.rope_type, back.spec.n_layers) == \
        (m.spec.rotary_dim, m.spec.rope_type, m.spec.n_layers)
    assert back.spec.sliding_window == m.spec.sliding_window
    for n in lengths(case):
        want = logits(m, ids(n))
        assert_close(logits(hf, ids(n)), want, torch.float32, f"{case}: transformers on the export, {n} tokens")
        assert_close(logits(back, ids(n)), want, torch.float32, f"{case}: layerfold on the export, {n} tokens")


@pytest.mark.parametrize("case", sorted(SOURCES))
def test_config_is_what_phi3config_reads(tmp_path: Path, case: str) -> None:
    from transformers import AutoConfig, Phi3Config

    m, d, _ = exported(tmp_path, case)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["Phi3ForCausalLM"] and cfg["model_type"] == "phi3"
    known = set(Phi3Config().to_dict()) | {"architectures", "torch_dtype", "head_dim", "rope_scaling", "rope_theta",
                                          "partial_rotary_factor"}
    assert set(cfg) <= known, set(cfg) - known
    hd = m.spec.layers[0].head_dim
    assert cfg["partial_rotary_factor"] == (m.spec.rotary_dim / hd if m.spec.rotary_dim else 1.0)
    assert cfg["sliding_window"] == m.spec.sliding_window and cfg["tie_word_embeddings"] == m.spec.tie_embeddings
    assert cfg["rms_norm_eps"] == m.spec.norm_eps and cfg["pad_token_id"] is None
    if case in LONGROPE:
        assert cfg["rope_scaling"] == {"type": "longrope", "short_factor": list(m.spec.rope_short_factor),
                                       "long_factor": list(m.spec.rope_long_factor)}  # (4.56 takes only these)
        assert cfg["original_max_position_embeddings"] == ORIG and cfg["max_position_embeddings"] == lr.MAX_POS
    else:
        assert "rope_scaling" not in cfg
    read = AutoConfig.from_pretrained(d)
    assert read.partial_rotary_factor == cfg["partial_rotary_factor"]
    assert read.original_max_position_embeddings == cfg["original_max_position_embeddings"]


@pytest.mark.parametrize("case", LONGROPE)
def test_generate_crossing_the_original_context_equals_layerfold(tmp_path: Path, case: str) -> None:
    """Prompts of 10 (crossing at the 7th new token) and ORIG tokens (at the 1st): layerfold's greedy tokens are
    those of transformers' forward over the whole sequence on the export, and of its generate (transformers 5)."""
    m, d, _ = exported(tmp_path, case)
    hf = load_hf(d)
    prompts = [ids(10, 3)[0].tolist(), ids(ORIG, 4)[0].tolist()]
    got = greedy(Runtime(m, max_batch=2, max_len=40, kernels="torch"), prompts, 10)
    for p, g in zip(prompts, got, strict=True):
        assert g == whole_sequence_greedy(hf, p, 10), f"prompt of {len(p)} tokens"
    if not V5:
        pytest.skip("transformers 4.56's Phi3 generate recomputes its cache at the crossing with wrong positions "
                    "(tests/core/test_longrope.py); the whole-sequence forward above is compared instead")
    for p, g in zip(prompts, got, strict=True):
        gen = hf.generate(torch.tensor([p]), max_new_tokens=10, min_new_tokens=10, do_sample=False)
        assert g == gen[0, len(p):].tolist(), f"prompt of {len(p)} tokens vs transformers' generate on the export"


def test_cli_export_verify(tmp_path: Path) -> None:
    from layerfold.cli.main import main

    m = drop_layers(to_layerfold(pr.phi3(0.75, longrope=True)), [1])
    ck = save_checkpoint(tmp_path / "ck", m.spec, m.state_dict())
    assert main(["export", str(ck), "--format", "hf", "--out", str(tmp_path / "hf"), "--verify", "--json"]) == 0
    prov = json.loads((tmp_path / "hf" / "layerfold_provenance.json").read_text())
    assert prov["verify"]["passed"] and prov["verify"]["max_rel_diff"] < 1e-4
    assert prov["verify"]["prompts"] == 4 and prov["verify"]["tokens"] == 9 + 13 + 17 + ORIG + 1  # (one long)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["Phi3ForCausalLM"]


# ---- what goes where --------------------------------------------------------------------------------------------
def test_partial_rotary_goes_to_hf_only(tmp_path: Path) -> None:
    m = to_layerfold(pr.phi3(0.75))
    assert hf_problem(m.spec) is None and hf_arch(m.spec) == "phi3" and carriers(m.spec) == ["hf"]
    ck = save_checkpoint(tmp_path / "ck", m.spec, m.state_dict())
    for fmt in ("decilm", "gguf"):
        with pytest.raises(ValueError, match=rf"cannot be exported as {fmt}: its partial rotary \(rotary_dim 12 of "
                                             r"16-dim heads.*Fix: export it with --format hf"):
            export(ck, tmp_path / fmt, format=fmt)


def odd_attention_factor(case: str) -> Any:
    m = to_layerfold(SOURCES[case]())
    spec = replace(m.spec, rope_attention_factor=m.spec.rope_attention_factor * 1.1)
    return build_model(spec, dict(m.state_dict())).eval()


def test_longrope_phi3_cannot_say_goes_out_as_llama(tmp_path: Path) -> None:
    """An attention factor other than the derived one: transformers 4.56's Phi3Config cannot hold it, Llama's can."""
    m = odd_attention_factor("longrope")
    ck = save_checkpoint(tmp_path / "ck", m.spec, m.state_dict())
    info = export(ck, tmp_path / "hf", format="hf", verify=True)
    assert info["architecture"] == "LlamaForCausalLM"
    hf = load_hf(tmp_path / "hf")
    for n in (5, 40):
        assert_close(logits(hf, ids(n)), logits(m, ids(n)), torch.float32, f"Llama export, {n} tokens")


def test_partial_rotary_phi3_cannot_say_is_refused(tmp_path: Path) -> None:
    m = odd_attention_factor("partial+longrope")
    assert hf_arch(m.spec) != "phi3"
    with pytest.raises(ValueError, match=r"its partial rotary .*nor can transformers' Phi3 carry it: its longrope "
                                         r"attention factor .*Fix: no export format carries it"):
        export(save_checkpoint(tmp_path / "ck", m.spec, m.state_dict()), tmp_path / "hf", format="hf")


def test_a_nonuniform_phi3_is_refused_as_before() -> None:
    m = to_layerfold(pr.phi3(0.75))
    layers = list(m.spec.layers)
    layers[0] = replace(layers[0], d_ffn=48)
    spec = m.spec.with_layers(layers)
    assert hf_arch(replace(spec, rotary_dim=0)) == "llama"  # (what the exporter checks next refuses it)
    why = hf_problem(spec)
    assert why is not None and why.startswith("its partial rotary") and "Phi3" not in why


def head_pruned(case: str) -> Any:
    """KV group 1 (query heads 2, 3 of 4) removed from every layer: 2 heads of 16 in a 64-wide model."""
    m = to_layerfold(SOURCES[case]())
    st, layers, hd = dict(m.state_dict()), [], m.spec.layers[0].head_dim
    for i, l in enumerate(m.spec.layers):
        p = f"layers.{i}.attn."
        st[p + "q.weight"] = st[p + "q.weight"][:2 * hd].contiguous()
        for k in ("k", "v"):
            st[p + k + ".weight"] = st[p + k + ".weight"][:hd].contiguous()
        st[p + "o.weight"] = st[p + "o.weight"][:, :2 * hd].contiguous()
        layers.append(replace(l, n_heads=2, n_kv_heads=1))
    return build_model(m.spec.with_layers(layers), st).eval()


@pytest.mark.parametrize("case,want", [("partial", "Phi3ForCausalLM"), ("longrope", "LlamaForCausalLM"),
                                       ("partial+longrope", None)])
def test_head_pruned_phi3(tmp_path: Path, case: str, want: str | None) -> None:
    """head_dim * heads below hidden_size: Phi3 reads head_dim, but its config checks longrope's factor count against
    hidden_size // heads, so a longrope model goes out as Llama, or (partial rotary too) not at all."""
    m = head_pruned(case)
    ck = save_checkpoint(tmp_path / "ck", m.spec, m.state_dict())
    if want is None:
        with pytest.raises(ValueError, match=r"nor can transformers' Phi3 carry it: its longrope factors \(6 per "
                                             r"head\) would be refused by transformers' Phi3Config, which expects 12"):
            export(ck, tmp_path / "hf", format="hf")
        return
    info = export(ck, tmp_path / "hf", format="hf", verify=True)
    assert info["architecture"] == want
    back, _ = layerfold.load(tmp_path / "hf", tokenizer=False)
    for n in lengths(case):
        want_logits = logits(m, ids(n))
        assert_close(logits(load_hf(tmp_path / "hf"), ids(n)), want_logits, torch.float32, f"{case}, {n} tokens")
        assert_close(logits(back, ids(n)), want_logits, torch.float32, f"{case} read back, {n} tokens")
