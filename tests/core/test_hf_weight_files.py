"""Which safetensors files of an HF directory hold the model, chosen as transformers chooses: model.safetensors,
else the shards of model.safetensors.index.json, else every file; a stale or foreign file beside them is not read,
and two copies of a tensor with nothing to choose between them are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import layerfold
from layerfold.core.checkpoint import CheckpointError
from tests.support.models import tiny_hf
from tests.support.tolerances import assert_close

IDS = torch.tensor([[1, 5, 9, 3, 7, 2]])


def sharded(tmp_path: Path, seed: int = 0) -> tuple[Path, dict[str, torch.Tensor]]:
    """tiny_hf('llama') saved by transformers in shards with an index; returns the folder and its state."""
    hf = tiny_hf("llama", seed=seed)
    d = tmp_path / "m"
    hf.save_pretrained(str(d), max_shard_size="40KB")
    assert (d / "model.safetensors.index.json").is_file() and not (d / "model.safetensors").exists()
    return d, {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}


def logits_of(d: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(d), attn_implementation="eager").float().eval()
    lf = layerfold.load(d, tokenizer=False)[0]
    with torch.no_grad():
        return lf(IDS), hf(IDS).logits


def test_stale_and_foreign_files_beside_an_index_are_not_read(tmp_path: Path) -> None:
    d, _ = sharded(tmp_path)
    _, other = sharded(tmp_path / "o", seed=7)
    save_file(other, str(d / "model-old-00001-of-00001.safetensors"))  # a stale copy with the same names
    save_file({"layers.0.attention.wq.weight": torch.zeros(64, 64)}, str(d / "consolidated.safetensors"))
    ours, theirs = logits_of(d)
    assert_close(ours, theirs, torch.float32, "index-named shards only, as transformers reads them")


def test_model_safetensors_wins_over_shards_as_in_transformers(tmp_path: Path) -> None:
    d, _ = sharded(tmp_path)
    _, other = sharded(tmp_path / "o", seed=7)
    save_file(other, str(d / "model.safetensors"))
    ours, theirs = logits_of(d)
    assert_close(ours, theirs, torch.float32, "model.safetensors first, as transformers")


def test_a_missing_shard_is_named_before_any_weight_is_read(tmp_path: Path) -> None:
    d, _ = sharded(tmp_path)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[-1]
    (d / gone).unlink()
    with pytest.raises(CheckpointError, match=rf"are not there \({gone}\)\. Fix: download the missing shards"):
        layerfold.load(d, tokenizer=False)


@pytest.mark.parametrize("text", ["{", "[]", '{"weight_map": {"a": "../x.safetensors"}}', '{"weight_map": {}}',
                                  '{"weight_map": {"a": 3}}'])
def test_a_bad_index_is_named(tmp_path: Path, text: str) -> None:
    d, _ = sharded(tmp_path)
    (d / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: .*Fix: re-download"):
        layerfold.load(d, tokenizer=False)


def test_two_copies_without_an_index_are_refused(tmp_path: Path) -> None:
    d, state = sharded(tmp_path)
    (d / "model.safetensors.index.json").unlink()
    save_file(state, str(d / "copy.safetensors"))
    with pytest.raises(CheckpointError, match=r"is in both .*\.safetensors and .*\.safetensors.*Fix: remove the files"):
        layerfold.load(d, tokenizer=False)
