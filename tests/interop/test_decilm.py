"""`export --format decilm`: block_configs exports checked against a reference written from vLLM's semantics
(tests/support/decilm_ref.py)."""

from __future__ import annotations

import json

import pytest
import torch

from layerfold.core.checkpoint import save_checkpoint
from layerfold.core.spec import LayerSpec, ModelSpec
from layerfold.interop.decilm import exact_ffn_mult, export_decilm, ffn_mult_width
from layerfold.interop.export import export
from tests.support.decilm_ref import DeciLMReference
from tests.support.models import hetero_reference_spec, tiny_model, tiny_spec

pytestmark = pytest.mark.usefixtures("one_thread")

L = LayerSpec


def streamline_spec(tie: bool = True) -> ModelSpec:
    """Five layers with an LLM-Streamline MLP replacement block in the middle, as the demo leaves them."""
    return tiny_spec(d_model=48, n_layers=5, heads=4, kv_heads=2, ffn=72, vocab=61, tie=tie, mlp_blocks=(2,),
                     bos_token_id=1, eos_token_ids=(2,))


def width_spec(**fields) -> ModelSpec:
    """Per-layer FFN widths (one of them ffn_mult-exact: 256 at width 48) and KV heads, an MLP block, an
    attention-only layer; 4 query heads of 12 everywhere."""
    layers = (L(48, 48, 48, 4, 2, 12, 72), L(48, 48, 48, 4, 1, 12, 256), L(48, 48, 48, d_ffn=40, has_attn=False,
                                                                            kind="mlp"),
              L(48, 48, 48, 4, 4, 12, 0, has_mlp=False), L(48, 48, 48, 4, 2, 12, 24))
    return ModelSpec(vocab_size=61, d_model=48, layers=layers, rope_theta=500.0, **fields).validate()


CASES = {"streamline-tied": lambda: streamline_spec(True), "streamline-untied": lambda: streamline_spec(False),
         "per-layer-widths": width_spec, "qwen2-bias": lambda: width_spec(qkv_bias=True, arch="qwen2")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_decilm_export_matches_the_block_configs_reference(tmp_path, case: str) -> None:
    m = tiny_model(CASES[case](), std=0.1, norm_gains=True)
    ckpt = save_checkpoint(tmp_path / "ck", m.spec, m.state_dict())
    info = export_decilm(ckpt, tmp_path / "vllm")
    cfg = json.loads((tmp_path / "vllm" / "config.json").read_text())
    assert cfg["model_type"] == "nemotron-nas" and cfg["architectures"] == ["DeciLMForCausalLM"]
    assert len(cfg["block_configs"]) == m.spec.n_layers and info["serve"].endswith("--trust-remote-code")
    for l, b in zip(m.spec.layers, cfg["block_configs"], strict=True):
        assert b["attention"]["no_op"] == (not l.has_attn) and b["ffn"]["no_op"] == (not l.has_mlp)
        if l.has_attn:
            assert cfg["num_attention_heads"] // b["attention"]["n_heads_in_group"] == l.n_kv_heads
    ref = DeciLMReference(tmp_path / "vllm")
    ids = torch.randint(0, 61, (17,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = m(ids[None])[0].double()
    got = ref(ids)
    assert (got - want).abs().max().item() < 1e-4, f"{case}: max |logit diff| {(got - want).abs().max().item():.3g}"


def test_ffn_mult_only_where_it_is_exact(tmp_path) -> None:
    assert exact_ffn_mult(256, 48) == 8.0 and ffn_mult_width(8.0, 48) == 256
    assert exact_ffn_mult(72, 48) is None and exact_ffn_mult(1536, 576) == 4.0
    m = tiny_model(width_spec(), std=0.1)
    export_decilm(save_checkpoint(tmp_path / "ck", m.spec, m.state_dict()), tmp_path / "out")
    ffn = [b["ffn"] for b in json.loads((tmp_path / "out" / "config.json").read_text())["block_configs"]]
    assert [f.get("ffn_mult") for f in ffn] == [None, 8.0, None, None, None]
    assert [f["intermediate_size"] for f in ffn] == [72, 256, 40, None, 24]
    ref = DeciLMReference(tmp_path / "out")  # the config class leaves absent keys absent: vLLM's hasattr test
    assert [hasattr(b.ffn, "ffn_mult") for b in ref.cfg.block_configs] == [False, True, False, False, False]


def test_verify_and_cli(tmp_path) -> None:
    from layerfold.cli.main import main

    m = tiny_model(streamline_spec(), std=0.1, norm_gains=True)
    ckpt = save_checkpoint(tmp_path / "ck", m.spec, m.state_dict())
    info = export(ckpt, tmp_path / "a", format="decilm", dtype="bfloat16", verify=True)
    assert info["dtype"] == "bfloat16" and info["verify"]["max_rel_diff"] < 1e-4
    assert main(["export", str(ckpt), "--format", "decilm", "--out", str(tmp_path / "b"), "--verify", "--json"]) == 0


@pytest.mark.parametrize("what", ["shortcuts", "qk_norm", "first-layer-mlp"])
def test_what_block_configs_cannot_say_is_refused_with_the_formats_that_can(tmp_path, what: str) -> None:
    spec = {"shortcuts": hetero_reference_spec(), "qk_norm": width_spec(qk_norm=True, arch="qwen3"),
            "first-layer-mlp": tiny_spec(d_model=48, n_layers=3, mlp_blocks=(0,))}[what]
    m = tiny_model(spec)
    ckpt = save_checkpoint(tmp_path / "ck", m.spec, m.state_dict())
    with pytest.raises(ValueError) as e:
        export_decilm(ckpt, tmp_path / "out")
    msg = str(e.value)
    assert "cannot be exported as decilm" in msg and "Fix:" in msg
    assert ("layerfold serve" in msg) if what != "first-layer-mlp" else ("--format gguf" in msg)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_decilm_export_loads_back_in_layerfold(tmp_path, case: str) -> None:
    """`layerfold.load` (and so inspect, eval, generate, bench, prune, export) reads a DeciLM directory: the same
    layers and the same logits as the checkpoint it was exported from."""
    import layerfold

    m = tiny_model(CASES[case](), std=0.1, norm_gains=True)
    ckpt = save_checkpoint(tmp_path / "ck", m.spec, m.state_dict())
    export_decilm(ckpt, tmp_path / "vllm")
    back, _ = layerfold.load(tmp_path / "vllm", tokenizer=False)
    assert [(l.has_attn, l.has_mlp, l.n_kv_heads, l.d_ffn) for l in back.spec.layers] == \
        [(l.has_attn, l.has_mlp, l.n_kv_heads if l.has_attn else 0, l.d_ffn if l.has_mlp else 0)
         for l in m.spec.layers]
    ids = torch.randint(0, 61, (2, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(back(ids), m(ids), atol=1e-5, rtol=1e-5)


def test_decilm_blocks_layerfold_cannot_read_are_refused(tmp_path) -> None:
    import layerfold
    from layerfold.core.state import CheckpointError

    m = tiny_model(streamline_spec(), std=0.1)
    export_decilm(save_checkpoint(tmp_path / "ck", m.spec, m.state_dict()), tmp_path / "vllm")
    cfg_file = tmp_path / "vllm" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["block_configs"][0]["attention"]["replace_with_linear"] = True  # Nemotron-51B's linear attention blocks
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="block 0 .*replace_with_linear is not supported.*Fix"):
        layerfold.load(tmp_path / "vllm", tokenizer=False)
    cfg["block_configs"] = cfg["block_configs"][:2]
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="block_configs must list one block per layer"):
        layerfold.load(tmp_path / "vllm", tokenizer=False)


def test_a_decilm_export_loads_with_its_tokenizer_without_running_its_code(tmp_path, capfd) -> None:
    """The export's config.json points transformers at the configuration_decilm.py it carries (auto_map); loading the
    tokenizer asked on stdin whether to run that code. layerfold never runs a folder's code: it reads tokenizer.json."""
    from dataclasses import replace

    import layerfold
    from layerfold.core.loading import load_tokenizer, resolve
    from tests.support.models import smollm2_vocab_spec

    tok = load_tokenizer(resolve("smollm2-135m", quiet=True))
    spec = smollm2_vocab_spec(n_layers=1)
    m = tiny_model(replace(spec, layers=spec.layers + (spec.layers[0],)), std=0.1)
    export_decilm(save_checkpoint(tmp_path / "ck", m.spec, m.state_dict(), tokenizer=tok), tmp_path / "vllm")
    assert "auto_map" in json.loads((tmp_path / "vllm" / "config.json").read_text())
    capfd.readouterr()
    back, tok2 = layerfold.load(tmp_path / "vllm")
    out, err = capfd.readouterr()
    assert "custom code" not in out + err  # transformers asked "Do you wish to run the custom code? [y/N]"
    assert tok2("Hello world")["input_ids"] == tok("Hello world")["input_ids"] and back.spec.n_layers == 2
