"""`layerfold export --format hf`: a depth-pruned tiny model loads in plain transformers with the same logits."""

from __future__ import annotations

import json

import pytest
import torch

from layerfold.core.checkpoint import save_checkpoint
from layerfold.interop.hf import export_hf
from layerfold.surgery.depth import apply_depth_plan
from layerfold.surgery.plan import DepthPlan, Merge, Replace
from tests.support.models import tiny_model
from tests.support.tolerances import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")


# a Llama with every field export writes: 48 wide, GQA 4/2 heads of 12, FFN 72, five layers; N(0, 0.1)
# weights, norm gains U(0.5, 1.5)
LLAMA = dict(d_model=48, n_layers=5, heads=4, kv_heads=2, head_dim=12, ffn=72, vocab=89, norm_eps=1e-6,
             rope_theta=10000.0, max_position=128, arch="llama", bos_token_id=1, eos_token_ids=(2,), std=0.1,
             norm_gains=True)


@pytest.mark.parametrize("tie", [True, False])
def test_export_depth_pruned_llama_loads_in_transformers(tmp_path, tie: bool) -> None:
    from transformers import AutoModelForCausalLM

    m = tiny_model(**LLAMA, tie=tie)
    pruned = apply_depth_plan(m, DepthPlan(n_layers=5, drop=(3,), merge=(Merge(0, 1),)))
    ckpt = save_checkpoint(tmp_path / "pruned", pruned.spec, pruned.state_dict(),
                           provenance={"method": "test", "layer_map": [[0, 1], [2], [4]]})
    info = export_hf(ckpt, tmp_path / "hf")
    assert info["layers"] == 3 and not info["tokenizer"]
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and cfg["model_type"] == "llama"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, 89, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = pruned(ids)
        got = hf(ids).logits
    assert_close(got, want, torch.float32, "exported model in transformers vs layerfold")


def test_streamline_mlp_block_cannot_export_and_says_what_to_do(tmp_path) -> None:
    m = tiny_model(**LLAMA, tie=True)
    pruned = apply_depth_plan(m, DepthPlan(n_layers=5, replace=(Replace(1, 3, "mlp"),)))
    ckpt = save_checkpoint(tmp_path / "pruned", pruned.spec, pruned.state_dict())
    with pytest.raises(ValueError) as e:
        export_hf(ckpt, tmp_path / "hf")
    msg = str(e.value)
    assert "MLP replacement block" in msg and "--replacement decoder" in msg and "Fix:" in msg
    assert not (tmp_path / "hf").exists()
    dec = apply_depth_plan(m, DepthPlan(n_layers=5, replace=(Replace(1, 3, "decoder"),)))
    ckpt2 = save_checkpoint(tmp_path / "dec", dec.spec, dec.state_dict())
    assert export_hf(ckpt2, tmp_path / "hf2")["layers"] == 3


def test_export_refuses_source_and_existing_out(tmp_path) -> None:
    m = tiny_model(**LLAMA, tie=True)
    ckpt = save_checkpoint(tmp_path / "ck", m.spec, m.state_dict())
    with pytest.raises(ValueError, match="refusing to write over"):
        export_hf(ckpt, ckpt)
    export_hf(ckpt, tmp_path / "hf")
    with pytest.raises(ValueError, match="already exists"):
        export_hf(ckpt, tmp_path / "hf")
    from layerfold.cli.main import main

    assert main(["export", str(ckpt), "--out", str(tmp_path / "hf"), "--overwrite", "--json"]) == 0
    assert main(["export", str(ckpt), "--out", str(tmp_path / "hf")]) == 2


# tokenizer classes transformers 4.56/4.57 know (AutoTokenizer resolves tokenizer_config's tokenizer_class by name)
TRANSFORMERS_4_CLASSES = {"PreTrainedTokenizerFast", "GPT2TokenizerFast", "LlamaTokenizerFast", "Qwen2TokenizerFast"}


def test_exported_tokenizer_names_a_class_transformers_4_has(tmp_path) -> None:
    from transformers import AutoTokenizer

    from layerfold.core.loading import load_tokenizer, resolve

    tok = load_tokenizer(resolve("smollm2-135m", quiet=True))
    m = tiny_model(**{**LLAMA, "vocab": 49152}, tie=True)
    ckpt = save_checkpoint(tmp_path / "ck", m.spec, m.state_dict(), tokenizer=tok)
    for d in (ckpt, tmp_path / "hf"):  # layerfold checkpoints and HF exports alike
        if d != ckpt:
            export_hf(ckpt, d)
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        assert cfg["tokenizer_class"] in TRANSFORMERS_4_CLASSES and "local_files_only" not in cfg
        again = AutoTokenizer.from_pretrained(d)
        text = "def f(x):\n    return x  # <|im_end|>"
        assert again(text)["input_ids"] == tok(text)["input_ids"]
        assert again.eos_token == tok.eos_token and again.chat_template == tok.chat_template


def test_global_basis_slicegpt_exports_and_verifies(tmp_path) -> None:
    """Constant-width global-basis SliceGPT with sliced ends has every layer alike: a plain HF model."""
    from layerfold.interop.export import export
    from layerfold.methods.slicing import make_plan
    from layerfold.surgery.slicing import slice_model

    m = tiny_model(**LLAMA, tie=True)
    ids = torch.randint(0, 89, (8, 16), generator=torch.Generator().manual_seed(0))
    sliced, _ = slice_model(m, ids, make_plan(m.spec, 0.25, basis="global", keep_ends=False))
    assert sliced.spec.uniform and sliced.spec.d_model == 40  # 48 * 0.75 = 36, rounded to a multiple of 8
    ckpt = save_checkpoint(tmp_path / "sl", sliced.spec, sliced.state_dict())
    info = export(ckpt, tmp_path / "hf", format="hf", verify=True)
    assert info["verify"]["max_rel_diff"] < 1e-4 and "AutoModelForCausalLM" in info["verify"]["reader"]
    point, _ = slice_model(m, ids, make_plan(m.spec, 0.25))  # the default point basis: shortcut matrices
    ck2 = save_checkpoint(tmp_path / "pt", point.spec, point.state_dict())
    with pytest.raises(ValueError, match="shortcut matrices.*no export format carries it.*--basis global"):
        export(ck2, tmp_path / "x", format="hf")


def test_verify_fails_loudly_on_a_wrong_export(tmp_path, monkeypatch) -> None:
    from layerfold.interop import verify
    from layerfold.interop.export import export

    m = tiny_model(**LLAMA, tie=True)
    ckpt = save_checkpoint(tmp_path / "ck", m.spec, m.state_dict())
    monkeypatch.setattr(verify, "_reference", lambda s, dt, ids: [torch.zeros(x.shape[1], 89) + 1 for x in ids])
    with pytest.raises(ValueError, match="export verification failed.*left at"):
        export(ckpt, tmp_path / "hf", format="hf", verify=True)
