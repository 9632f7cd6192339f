"""`export --format gguf --dtype q8_0`: 2-D weights whose rows fill whole Q8_0 blocks are quantised, the rest
written float16 (norm gains float32); the file reads back and runs close to the float16 model."""

from __future__ import annotations

import json

import pytest
import torch

from layerfold.cli.main import main
from layerfold.core.checkpoint import save_checkpoint
from layerfold.core.spec import LayerSpec, ModelSpec
from layerfold.interop.export import QUANT_TOL, export
from tests.support.models import SMOLLM2_VOCAB, tiny_model, tiny_spec

gguf = pytest.importorskip("gguf", reason="the gguf extra writes GGUF files")
pytestmark = pytest.mark.usefixtures("one_thread")
L = LayerSpec


def kinds(path: str) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def test_q8_0_quantises_whole_block_rows_and_verifies(tmp_path) -> None:
    m = tiny_model(tiny_spec(d_model=64, n_layers=2, heads=4, kv_heads=2, ffn=96, vocab=61, tie=False), std=0.1,
                   norm_gains=True)
    ck = save_checkpoint(tmp_path / "ck", m.spec, m.state_dict())
    info = export(ck, tmp_path / "g", format="gguf", dtype="q8_0", verify=True)
    k = kinds(info["file"])
    assert info["dtype"] == "q8_0"
    assert {k[n] for n in ("token_embd.weight", "output.weight", "blk.0.attn_q.weight", "blk.1.ffn_down.weight")} \
        == {"Q8_0"}
    assert k["blk.0.attn_norm.weight"] == "F32"
    r = gguf.GGUFReader(info["file"])
    assert int(r.fields["general.file_type"].contents()) == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    v = info["verify"]
    assert 0 < v["max_rel_diff"] < QUANT_TOL, v  # quantised (not equal), and close to the float16 model
    assert v["tol"] == QUANT_TOL


def test_rows_that_do_not_fill_blocks_stay_float16(tmp_path) -> None:
    """A pruned FFN width of 40 (not a multiple of 32): that layer's down projection is written float16 beside
    Q8_0 weights, in a deci file (per-layer widths) that reads back."""
    layers = (L(64, 64, 64, 4, 2, 16, 40), L(64, 64, 64, 4, 1, 16, 96), L(64, 64, 64, d_ffn=64, has_attn=False,
                                                                             kind="mlp"))
    spec = ModelSpec(vocab_size=61, d_model=64, layers=layers, rope_theta=500.0, tie_embeddings=True).validate()
    m = tiny_model(spec, std=0.1, norm_gains=True)
    ck = save_checkpoint(tmp_path / "ck", m.spec, m.state_dict())
    info = export(ck, tmp_path / "g", format="gguf", dtype="Q8_0", verify=True)
    k = kinds(info["file"])
    assert info["architecture"] == "deci" and k["blk.0.ffn_down.weight"] == "F16"
    assert k["blk.0.ffn_gate.weight"] == k["blk.1.ffn_down.weight"] == k["blk.2.ffn_up.weight"] == "Q8_0"
    assert 0 < info["verify"]["max_rel_diff"] < QUANT_TOL


@pytest.mark.parametrize("fmt", ["hf", "decilm"])
def test_q8_0_is_gguf_only(tmp_path, fmt: str) -> None:
    m = tiny_model(tiny_spec(d_model=64, n_layers=2, heads=4, kv_heads=2, ffn=96, vocab=61))
    ck = save_checkpoint(tmp_path / "ck", m.spec, m.state_dict())
    with pytest.raises(ValueError, match=r"GGUF quantisation.*Fix: use --format gguf"):
        export(ck, tmp_path / "x", format=fmt, dtype="q8_0")
    assert not (tmp_path / "x").exists()


def test_cli_exports_q8_0(tmp_path, capsys) -> None:
    m = tiny_model(tiny_spec(d_model=64, n_layers=2, heads=4, kv_heads=2, ffn=96, vocab=61))
    ck = save_checkpoint(tmp_path / "ck", m.spec, m.state_dict())
    assert main(["export", str(ck), "--format", "gguf", "--dtype", "q8_0", "--out", str(tmp_path / "g"),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dtype"] == "q8_0" and kinds(out["file"])["blk.0.attn_k.weight"] == "Q8_0"


@pytest.mark.slow
def test_llama_cpp_runs_the_q8_0_file(tmp_path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    m = tiny_model(tiny_spec(d_model=64, n_layers=4, heads=4, kv_heads=2, ffn=128, vocab=SMOLLM2_VOCAB, tie=True),
                   std=0.1, norm_gains=True)
    ck = save_checkpoint(tmp_path / "ck", m.spec, m.state_dict())
    info = export(ck, tmp_path / "g", format="gguf", dtype="q8_0")
    llm = llama_cpp.Llama(model_path=info["file"], n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    toks = torch.randint(0, SMOLLM2_VOCAB, (12,), generator=torch.Generator().manual_seed(2)).tolist()
    llm.eval(toks)
    got = torch.tensor(llm.scores[:len(toks)], dtype=torch.float32)
    with torch.no_grad():
        want = m(torch.tensor([toks]))[0]
    rel = float((got - want).abs().max() / want.abs().max())
    # llama.cpp also rounds the activations to 8 bits in its Q8_0 products: twice the file's own tolerance
    assert rel < 2 * QUANT_TOL, f"llama.cpp's Q8_0 logits differ from layerfold's by {rel:.3g} of the largest"
