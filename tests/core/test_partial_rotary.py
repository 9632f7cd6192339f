"""Partial rotary (Phi-4-mini: partial_rotary_factor 0.75) computed in whole-head rotary's layout.

transformers' Phi3 rotates the first rot = int(head_dim * factor) dims of each q/k head in halves and passes the
rest through; layerfold permutes each head's q/k rows at load time so that its whole-head rotate-half code computes
the same, with frequency 0 for the pass-through pairs (core.partial_rotary). References: transformers' Phi3 forward
and greedy tokens, under both transformers versions. Tiny models: 4 heads of 16, rot 8 (0.5) or 12 (0.75)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import layerfold
from layerfold.core.arch import spec_from_hf_config
from layerfold.core.checkpoint import save_checkpoint
from layerfold.core.model import build_model, rope_inv_freq
from layerfold.core.partial_rotary import head_permutation, permute_heads
from layerfold.core.spec import ModelSpec
from layerfold.inference.runtime import Runtime
from layerfold.interop.export import export
from layerfold.surgery.depth import drop_layers
from tests.core.test_longrope import greedy, ids, logits, whole_sequence_greedy
from tests.support.models import tiny_hf, to_layerfold
from tests.support.tolerances import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")

ORIG, MAX_POS, HD = 16, 64, 16


def factors(rot: int, seed: int = 0) -> dict[str, list[float]]:
    g = torch.Generator().manual_seed(seed)
    return {"short_factor": (torch.rand(rot // 2, generator=g) * 2 + 0.5).tolist(),
            "long_factor": (torch.rand(rot // 2, generator=g) * 6 + 1).tolist()}


def phi3(factor: float = 0.75, longrope: bool = False, seed: int = 0) -> Any:
    over: dict[str, Any] = {"partial_rotary_factor": factor}
    if longrope:
        over.update(max_position_embeddings=MAX_POS, original_max_position_embeddings=ORIG,
                    rope_scaling={"type": "longrope", **factors(int(HD * factor), seed)})
    return tiny_hf("phi3", seed=seed, **over)


# ---- the layout -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hd,rot", [(16, 12), (16, 8), (128, 96), (10, 2), (6, 6)])
def test_the_permutation_puts_rotary_pairs_on_whole_head_pairs(hd: int, rot: int) -> None:
    perm = head_permutation(hd, rot)
    assert sorted(perm.tolist()) == list(range(hd))
    for j in range(rot // 2):  # HF pair (j, j + rot/2) -> layerfold pair (j, j + hd/2)
        assert (perm[j].item(), perm[j + hd // 2].item()) == (j, j + rot // 2)
    t = torch.randn(3 * hd, 5)
    assert torch.equal(permute_heads(permute_heads(t, hd, rot), hd, rot, inverse=True), t)


def test_frequencies_are_those_of_the_rotary_dims_then_zero() -> None:
    spec = to_layerfold(phi3(0.75)).spec
    inv = rope_inv_freq(spec, HD)
    assert spec.rotary_dim == 12 and inv.shape == (HD // 2,)
    want = 1.0 / 10000.0 ** (torch.arange(0, 12, 2, dtype=torch.float64) / 12)
    assert torch.allclose(inv[:6].double(), want, rtol=1e-6) and torch.equal(inv[6:], torch.zeros(2))


# ---- the forward ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factor", [0.5, 0.75])
def test_logits_equal_transformers(factor: float) -> None:
    hf = phi3(factor)
    m = to_layerfold(hf)
    assert m.spec.rotary_dim == int(HD * factor)
    assert_close(logits(m, ids(20)), logits(hf, ids(20)), torch.float32, f"phi3 partial rotary {factor}")


@pytest.mark.parametrize("n", [5, ORIG, ORIG + 1, 40])  # short, the last short length, the first long one, long
def test_longrope_logits_equal_transformers(n: int) -> None:
    hf = phi3(0.75, longrope=True)
    m = to_layerfold(hf)
    assert m.spec.rope_type == "longrope" and len(m.spec.rope_short_factor) == 6
    assert_close(logits(m, ids(n)), logits(hf, ids(n)), torch.float32, f"phi3 partial longrope, {n} tokens")


@pytest.mark.parametrize("longrope", [False, True])
@pytest.mark.parametrize("kernels", ["torch", "triton"])  # (triton: interpreted)
def test_runtime_generation_equals_transformers(kernels: str, longrope: bool) -> None:
    hf = phi3(0.75, longrope=longrope)
    m = to_layerfold(hf)
    prompts = [ids(10, 3)[0].tolist(), ids(ORIG, 4)[0].tolist()]
    steps = 10 if kernels == "torch" else 6
    got = greedy(Runtime(m, max_batch=2, max_len=40, kernels=kernels), prompts, steps)
    for p, g in zip(prompts, got, strict=True):
        assert g == whole_sequence_greedy(hf, p, steps), f"prompt of {len(p)} tokens"


def test_streamed_runtime_generation_equals_transformers() -> None:
    """The streamed runtime (layers from host memory, its own rotary tables: core.streaming) too."""
    from layerfold.inference.streamed_decode import StreamedRuntime

    hf = phi3(0.75, longrope=True)
    prompts = [ids(10, 5)[0].tolist(), ids(14, 6)[0].tolist()]
    got = greedy(StreamedRuntime(to_layerfold(hf), "cpu", max_batch=2, max_len=40), prompts, 8)
    for p, g in zip(prompts, got, strict=True):
        assert g == whole_sequence_greedy(hf, p, 8), f"prompt of {len(p)} tokens"


# ---- checkpoints and pruning --------------------------------------------------------------------------------------
def test_checkpoint_round_trip(tmp_path: Path) -> None:
    m = to_layerfold(phi3(0.75, longrope=True))
    d = save_checkpoint(tmp_path / "ck", m.spec, m.state_dict())
    assert json.loads((Path(d) / "config.json").read_text())["spec"]["rotary_dim"] == 12
    back, _ = layerfold.load(d, tokenizer=False)
    assert back.spec == m.spec
    assert_close(logits(back, ids(30)), logits(m, ids(30)), torch.float32, "reloaded")


def test_a_whole_head_spec_is_written_as_before() -> None:
    spec = to_layerfold(tiny_hf("phi3")).spec
    assert spec.rotary_dim == 0 and "rotary_dim" not in spec.to_dict()
    assert ModelSpec.from_dict(spec.to_dict()) == spec


def test_hf_directory_load_equals_transformers(tmp_path: Path) -> None:
    hf = phi3(0.75)
    hf.save_pretrained(tmp_path / "hf")
    m, _ = layerfold.load(tmp_path / "hf", tokenizer=False)
    assert m.spec.rotary_dim == 12
    assert_close(logits(m, ids(20)), logits(hf, ids(20)), torch.float32, "from an HF directory")


def test_depth_pruned_equals_transformers_without_the_layer() -> None:
    hf = phi3(0.75)
    m = drop_layers(to_layerfold(hf), [1])
    assert m.spec.rotary_dim == 12 and m.spec.n_layers == 2
    hf.model.layers = torch.nn.ModuleList([hf.model.layers[0], hf.model.layers[2]])
    hf.config.num_hidden_layers = 2
    for i, layer in enumerate(hf.model.layers):
        layer.self_attn.layer_idx = i
    with torch.no_grad():
        want = hf(ids(20), use_cache=False).logits[0]
    assert_close(logits(m, ids(20)), want, torch.float32, "depth-pruned")


def test_head_pruned_equals_transformers_with_the_heads_silenced() -> None:
    """KV group 1 (query heads 2, 3 of 4) removed as whole heads from the permuted model: transformers with
    those heads' o_proj columns zeroed computes the same."""
    hf = phi3(0.75)
    m = to_layerfold(hf)
    st, layers = dict(m.state_dict()), []
    q_rows, kv_rows = torch.arange(2 * HD), torch.arange(HD)  # heads 0, 1; KV head 0
    for i, l in enumerate(m.spec.layers):
        p = f"layers.{i}.attn."
        st[p + "q.weight"] = st[p + "q.weight"].index_select(0, q_rows).contiguous()
        for k in ("k", "v"):
            st[p + k + ".weight"] = st[p + k + ".weight"].index_select(0, kv_rows).contiguous()
        st[p + "o.weight"] = st[p + "o.weight"].index_select(1, q_rows).contiguous()
        layers.append(l.__class__(**{**l.__dict__, "n_heads": 2, "n_kv_heads": 1}))
        with torch.no_grad():
            hf.model.layers[i].self_attn.o_proj.weight[:, 2 * HD:] = 0
    pruned = build_model(m.spec.with_layers(layers), st).eval()
    assert_close(logits(pruned, ids(20)), logits(hf, ids(20)), torch.float32, "head-pruned")


# ---- refusals -----------------------------------------------------------------------------------------------------
def base_cfg(family: str = "phi3") -> dict[str, Any]:
    return {k: v for k, v in tiny_hf(family).config.to_dict().items() if k not in ("rope_parameters", "rope_scaling")}


CONFIG_BAD = {
    "llama": ("llama", dict(partial_rotary_factor=0.5),
              r"partial_rotary_factor=0.5 rotates only part of each head .*llama class does not apply.*Fix"),
    "odd rot": ("phi3", dict(partial_rotary_factor=0.5625),
                r"partial_rotary_factor=0.5625 of head_dim 16 gives 9 rotary dims, not an even.*Fix"),
    "above 1": ("phi3", dict(partial_rotary_factor=1.5), r"gives 24 rotary dims, not an even number in 2..head_dim"),
    "zero": ("phi3", dict(partial_rotary_factor=0.0625, head_dim=8), r"gives 0 rotary dims.*Fix"),
    "only in the rope entry": ("phi3", dict(partial_rotary_factor=None, rope_scaling={
        "type": "default", "partial_rotary_factor": 0.5}), r"partial_rotary_factor is given as .*4.x reads only the "
        r"top-level value.*Fix"),
    "disagreeing": ("phi3", dict(partial_rotary_factor=0.75, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}), r"given as .*0.75.*0.5"),
    "longrope factors of the whole head": ("phi3", dict(
        partial_rotary_factor=0.75, max_position_embeddings=MAX_POS, original_max_position_embeddings=ORIG,
        rope_scaling={"type": "longrope", **factors(HD)}), r"longrope short_factor is 8 numbers, not a list of 6 .*of "
        r"12 rotary dims.*Fix"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_BAD))
def test_configs_layerfold_would_not_compute_as_transformers_are_refused(case: str) -> None:
    family, change, match = CONFIG_BAD[case]
    cfg = {**base_cfg(family), **change}
    with pytest.raises(ValueError, match=match):
        spec_from_hf_config({k: v for k, v in cfg.items() if v is not None}, "cfg")


SPEC_BAD = {
    "odd": (dict(rotary_dim=7), r"rotary_dim=7 is not an even number of dims within every attention head \(head_dim "
            r"16\).*Fix"),
    "wider than the head": (dict(rotary_dim=18), r"rotary_dim=18 is not an even"),
    "negative": (dict(rotary_dim=-2), r"rotary_dim=-2 is not a whole number >= 0"),
    "longrope count": (dict(rope_type="longrope", rope_short_factor=[1.0] * 8, rope_long_factor=[1.0] * 8,
                            rope_original_max_pos=16),
                       r"holds 8 factors, but the attention heads of 16 have 6 rotary frequency pairs \(rotary_dim 12"),
}


@pytest.mark.parametrize("case", sorted(SPEC_BAD))
def test_a_malformed_spec_is_refused_naming_the_field(case: str) -> None:
    spec = to_layerfold(phi3(0.75)).spec
    change, match = SPEC_BAD[case]
    with pytest.raises(ValueError, match=match) as e:
        ModelSpec.from_dict({**spec.to_dict(), **change})
    assert "Fix:" in str(e.value)


@pytest.mark.parametrize("fmt", ["decilm", "gguf"])
def test_decilm_and_gguf_refuse_partial_rotary(tmp_path: Path, fmt: str) -> None:
    """(hf writes it as transformers' Phi3ForCausalLM: tests/interop/test_phi3_export.py)"""
    m = to_layerfold(phi3(0.75))
    ck = save_checkpoint(tmp_path / "ck", m.spec, m.state_dict())
    with pytest.raises(ValueError, match=rf"cannot be exported as {fmt}: its partial rotary \(rotary_dim 12 of "
                                         r"16-dim heads.*Fix: export it with --format hf"):
        export(ck, tmp_path / fmt, format=fmt)
    assert not (tmp_path / fmt).exists()
