"""A GGUF file's weights, dequantised tensor by tensor into safetensors (core.gguf_weights), are exactly what
transformers' GGUF reader gives (before: the whole model in float32 in memory), for every arch layerfold writes,
quantised or not; a file whose tensors disagree with its metadata is refused before anything is written."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from layerfold.core.arch import state_from_hf
from layerfold.core.checkpoint import open_weights, save_checkpoint
from layerfold.core.gguf_weights import write_gguf_weights
from layerfold.interop.export import export
from layerfold.interop.gguf_file import read_gguf_export
from tests.support.gguf_files import quantized_copy
from tests.support.models import tiny_model, tiny_spec

gguf = pytest.importorskip("gguf", reason="the gguf extra reads GGUF files")

CASES = {"llama-tied": dict(tie=True), "llama": {}, "qwen2": dict(arch="qwen2", qkv_bias=True),
         "qwen3": dict(arch="qwen3", qk_norm=True, head_dim=128)}  # (transformers' GGUF reader assumes Qwen3's 128)


def exported(tmp_path: Path, case: str) -> Path:
    m = tiny_model(tiny_spec(d_model=64, n_layers=2, heads=4, kv_heads=2, ffn=128, vocab=96, max_position=64,
                             **CASES[case]), seed=2, std=0.1, norm_gains=True)
    ck = save_checkpoint(tmp_path / "ck", m.spec, m.state_dict())
    return Path(export(ck, tmp_path / "g", format="gguf")["file"])


@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_0"])
@pytest.mark.parametrize("case", list(CASES))
def test_streamed_weights_equal_transformers_reader(tmp_path: Path, case: str, qtype: str) -> None:
    from transformers import AutoModelForCausalLM

    f = exported(tmp_path, case)
    if qtype != "F32":
        f = quantized_copy(f, tmp_path / f"q-{qtype}.gguf", qtype)
    spec, _, arch = read_gguf_export(f)
    shapes = write_gguf_weights(f, spec, arch, tmp_path / "w.safetensors")
    got = open_weights(tmp_path / "w.safetensors")
    assert {k: list(v.shape) for k, v in got.items()} == shapes and all(v.dtype == torch.float32 for v in got.values())
    hf = AutoModelForCausalLM.from_pretrained(f.parent, gguf_file=f.name, dtype=torch.float32)
    want = state_from_hf(dict(hf.state_dict()), spec)
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    if qtype != "F32":  # quantised: the values did change, so the comparison above saw real dequantisation
        plain = open_weights(write_gguf_weights(exported(tmp_path / "p", case), spec, arch, tmp_path / "p.st") and
                             tmp_path / "p.st")
        assert not torch.equal(plain["layers.0.mlp.up.weight"], got["layers.0.mlp.up.weight"])


def test_a_file_that_disagrees_with_its_metadata_is_refused(tmp_path: Path) -> None:
    f = exported(tmp_path, "llama")
    spec, _, arch = read_gguf_export(f)
    small = replace(spec, vocab_size=95)
    with pytest.raises(ValueError, match="token_embd.weight.*has shape.*Fix: download the file again"):
        write_gguf_weights(f, small, arch, tmp_path / "w.safetensors")
    deeper = replace(spec, layers=spec.layers + spec.layers[:1])
    with pytest.raises(ValueError, match="lacks tensor.*layers.2"):
        write_gguf_weights(f, deeper, arch, tmp_path / "w.safetensors")
    assert not (tmp_path / "w.safetensors").exists()
