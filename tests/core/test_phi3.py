"""Phi-3 / Phi-4 (HF model_type "phi3"): fused qkv_proj and gate_up_proj split at load time into an ordinary model,
logits equal to transformers' own Phi3ForCausalLM, its config read as Phi3Config reads it (what layerfold does not
compute refused by name), and a depth-pruned result exported to plain transformers and to GGUF."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import layerfold
from layerfold.core.arch import spec_from_hf_config, state_from_hf
from layerfold.core.checkpoint import CheckpointError, save_checkpoint
from layerfold.interop.export import export
from layerfold.interop.gguf_file import read_gguf_export
from layerfold.surgery.depth import apply_depth_plan
from layerfold.surgery.plan import DepthPlan, Merge
from tests.support.models import tiny_hf, to_layerfold
from tests.support.tolerances import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")

# tiny_hf("phi3") is GQA (4 heads, 2 KV heads of 16, FFN 96, 3 layers, vocab 97); the window is shorter than IDS
CONFIGS: dict[str, dict[str, Any]] = {"plain": dict(num_key_value_heads=4), "gqa": {},
                                      "sliding-window": dict(sliding_window=5), "tied": dict(tie=True)}
IDS = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(0))


def logits(model: Any, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


def saved(tmp_path: Path, name: str = "phi3", **over: Any) -> tuple[Any, Path]:
    hf = tiny_hf("phi3", **over)
    hf.save_pretrained(tmp_path / name)
    return hf, tmp_path / name


def edit_config(d: Path, **changes: Any) -> None:
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("case", CONFIGS)
def test_logits_equal_transformers_phi3(case: str) -> None:
    hf = tiny_hf("phi3", **CONFIGS[case])
    assert type(hf).__name__ == "Phi3ForCausalLM" and "model.layers.0.self_attn.qkv_proj.weight" in hf.state_dict()
    lf = to_layerfold(hf)
    assert lf.spec.arch == "phi3" and lf.spec.tie_embeddings == (case == "tied")
    assert_close(logits(lf), logits(hf), torch.float32, f"layerfold vs transformers Phi3 ({case})")


def test_sliding_window_is_applied_as_transformers_applies_it() -> None:
    """The window matters on IDS (so the parity above checks it), and it is the Mistral window: key j is seen from
    query i when i - window < j <= i."""
    hf = tiny_hf("phi3", sliding_window=5)
    lf = to_layerfold(hf)
    assert lf.spec.sliding_window == 5
    full = to_layerfold(tiny_hf("phi3"))  # the same weights (same seed), no window
    assert (logits(full)[:, 5:] - logits(lf)[:, 5:]).abs().max() > 1e-3
    assert_close(logits(full)[:, :5], logits(lf)[:, :5], torch.float32, "positions inside the window")


def test_fused_tensors_split_into_views_of_the_right_rows() -> None:
    hf = tiny_hf("phi3")
    spec = spec_from_hf_config(hf.config)
    hs = hf.state_dict()
    st = state_from_hf(hs, spec)
    qkv, gate_up = hs["model.layers.1.self_attn.qkv_proj.weight"], hs["model.layers.1.mlp.gate_up_proj.weight"]
    assert torch.equal(st["layers.1.attn.q.weight"], qkv[:64]) and torch.equal(st["layers.1.attn.k.weight"], qkv[64:96])
    assert torch.equal(st["layers.1.attn.v.weight"], qkv[96:])
    assert torch.equal(st["layers.1.mlp.gate.weight"], gate_up[:96]) and torch.equal(st["layers.1.mlp.up.weight"],
                                                                                     gate_up[96:])
    assert st["layers.1.mlp.up.weight"].data_ptr() == gate_up[96:].data_ptr()  # a view: no copy of the weights


def test_load_of_a_saved_phi3_directory(tmp_path: Path) -> None:
    hf, d = saved(tmp_path)
    m, tok = layerfold.load(d, tokenizer=False)
    assert tok is None and m.spec.arch == "phi3" and m.spec.n_layers == 3
    assert_close(logits(m), logits(hf), torch.float32, "layerfold.load of a Phi3 directory vs transformers")


@pytest.mark.parametrize("key,value,shape,want", [
    ("num_key_value_heads", 4, "(128, 64)", "(192, 64)"),  # the file has 2 KV heads
    ("head_dim", 8, "(128, 64)", "(64, 64)"),
    ("intermediate_size", 80, "(192, 64)", "(160, 64)"),
])
def test_fused_tensor_of_the_wrong_size_is_refused_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str,
                                                         value: int, shape: str, want: str) -> None:
    _, d = saved(tmp_path)
    edit_config(d, **{key: value})
    import layerfold.core.loading as loading

    def no_long_work(*a: Any, **k: Any) -> None:
        raise AssertionError("the weights were read before the fused tensor was checked")

    monkeypatch.setattr(loading, "check_finite", no_long_work)
    with pytest.raises(CheckpointError) as e:
        layerfold.load(d, tokenizer=False)
    msg = str(e.value)
    fused = "gate_up_proj" if key == "intermediate_size" else "qkv_proj"
    assert f"model.layers.0.{'mlp' if fused == 'gate_up_proj' else 'self_attn'}.{fused}.weight" in msg, msg
    assert shape in msg and want in msg and "Fix:" in msg and "config.json" in msg


LONGROPE = {"long_factor": [1.0] * 8, "short_factor": [1.0] * 8}


@pytest.mark.parametrize("change,match", [
    # longrope is read (tests/core/test_longrope.py); malformed, it is refused by name
    (dict(rope_scaling={"type": "longrope", "long_factor": [1.0] * 8}), r"longrope short_factor is None.*Fix:"),
    (dict(rope_scaling={"type": "su", **LONGROPE, "short_factor": [1.0] * 9}), r"short_factor is 9 numbers, not a"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), r"longrope short_factor is None"),  # yarn = longrope
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), r"'linear' is not one Phi3ForCausalLM computes"),
    # partial rotary is read (tests/core/test_partial_rotary.py); one only transformers 5 reads is refused
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
     r"partial_rotary_factor is given as .*'rope_parameters.partial_rotary_factor': 0.5.*Fix:"),
    (dict(attention_bias=True), r"attention_bias/mlp_bias set, but Phi3ForCausalLM has no biases.*Fix:"),
    (dict(layer_types=["full_attention"] * 3, sliding_window=5), r"layer_types=.*reads no layer_types.*Fix:"),
])
def test_config_settings_layerfold_does_not_compute_are_refused(change: dict[str, Any], match: str) -> None:
    cfg = {**tiny_hf("phi3").config.to_dict(), **change}
    if "rope_scaling" in change or "rope_parameters" in change:
        cfg.pop("rope_parameters" if "rope_scaling" in change else "rope_scaling", None)
    with pytest.raises(ValueError, match=match):
        spec_from_hf_config(cfg, "phi3-config")


def test_config_defaults_are_phi3s(tmp_path: Path) -> None:
    """A config.json without rms_norm_eps or max_position_embeddings reads Phi3Config's defaults (1e-5, 4096),
    not Llama's; the rest of what Phi3 configs carry is read or has no effect on the output."""
    hf, d = saved(tmp_path)
    edit_config(d, rms_norm_eps=None, max_position_embeddings=None, original_max_position_embeddings=4096,
                resid_pdrop=0.1, embd_pdrop=0.1, attention_dropout=0.1, pad_token_id=3, sliding_window=None)
    spec = layerfold.load(d, tokenizer=False)[0].spec
    assert (spec.norm_eps, spec.max_position, spec.sliding_window) == (1e-5, 4096, None)
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    assert (again.config.rms_norm_eps, again.config.max_position_embeddings) == (1e-5, 4096)
    assert_close(logits(layerfold.load(d, tokenizer=False)[0]), logits(again), torch.float32, "Phi3 defaults")


@pytest.mark.parametrize("window", [None, 5])
def test_depth_pruned_phi3_exports_to_transformers(tmp_path: Path, window: int | None) -> None:
    from transformers import AutoModelForCausalLM

    _, d = saved(tmp_path, sliding_window=window)
    m, _ = layerfold.load(d, tokenizer=False)
    pruned = apply_depth_plan(m, DepthPlan(n_layers=3, merge=(Merge(1, 2),)))
    ckpt = save_checkpoint(tmp_path / "pruned", pruned.spec, pruned.state_dict())
    info = export(ckpt, tmp_path / "hf", format="hf", verify=True)
    want = "Phi3ForCausalLM"  # the source family's own class, fused (tests/interop/test_phi3_export.py)
    assert info["architecture"] == want and info["layers"] == 2
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "phi3" and cfg.get("sliding_window") == window
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == want
    assert_close(logits(hf), logits(pruned), torch.float32, f"exported {want} in transformers vs layerfold")


def test_depth_pruned_phi3_gguf_reads_back(tmp_path: Path) -> None:
    _, d = saved(tmp_path, tie=True)
    m, _ = layerfold.load(d, tokenizer=False)
    pruned = apply_depth_plan(m, DepthPlan(n_layers=3, drop=(1,)))
    ckpt = save_checkpoint(tmp_path / "pruned", pruned.spec, pruned.state_dict())
    info = export(ckpt, tmp_path / "gguf", format="gguf")
    assert info["architecture"] == "llama"
    spec, state, arch = read_gguf_export(tmp_path / "gguf" / "model.gguf")
    assert arch == "llama" and spec.n_layers == 2 and spec.norm_eps == pytest.approx(1e-5)
    back = layerfold.build_model(spec, state).eval()
    assert_close(logits(back), logits(pruned), torch.float32, "Phi3-sourced GGUF read back vs layerfold")


def test_sliding_window_phi3_gguf_is_refused_with_the_formats_that_carry_it(tmp_path: Path) -> None:
    _, d = saved(tmp_path, sliding_window=5)
    with pytest.raises(ValueError, match=r"sliding-window attention.*Fix: export it with --format hf"):
        export(d, tmp_path / "gguf", format="gguf")


@pytest.mark.parametrize("window", [None, 5])
def test_hf_config_of_a_phi3_spec_is_the_unfused_class(window: int | None) -> None:
    """What reads hf_config_from_spec directly (the benchmark's HF baseline) gets the class its unfused weights
    load into, and the same logits."""
    from layerfold.core.arch import hf_config_from_spec
    from layerfold.evaluation.measure import hf_baseline

    m = to_layerfold(tiny_hf("phi3", sliding_window=window))
    cfg = hf_config_from_spec(m.spec)
    want = "LlamaForCausalLM" if window is None else "MistralForCausalLM"
    assert cfg["architectures"] == [want] and cfg.get("sliding_window") == window
    hf, why = hf_baseline(m)
    assert type(hf).__name__ == want, why
