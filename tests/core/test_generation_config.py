"""End-of-sequence ids of an HF directory: config.json's and generation_config.json's (what HF ``generate`` stops
at), united in the spec; kept by a checkpoint converted from it; ``layerfold generate`` stops at any of them; a
generation config that cannot be read, or whose ids are not the model's tokens, refused by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import layerfold
from layerfold.cli.main import main
from layerfold.core.checkpoint import CheckpointError, read_config, save_checkpoint
from layerfold.core.hf_dir import read_hf_dir
from layerfold.inference.generate import generate
from layerfold.interop.hf import export_hf
from tests.support.models import embedded_tokenizer, smollm2_vocab_spec, tiny_hf, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def hf_dir(tmp_path: Path, family: str = "llama", eos: Any = 2, gen: Any = "absent") -> Path:
    """A tiny HF directory (vocab 97) whose config.json says ``eos`` and generation_config.json ``gen``: an object
    with that eos_token_id, raw text when ``gen`` is a str, no file when "absent"."""
    d = tmp_path / family
    tiny_hf(family, eos_token_id=eos).save_pretrained(d)
    f = d / "generation_config.json"
    f.unlink(missing_ok=True)
    if gen != "absent":
        f.write_text(gen if isinstance(gen, str) else json.dumps({"bos_token_id": 1, "eos_token_id": gen}))
    return d


@pytest.mark.parametrize("family,eos,gen,want", [
    ("llama", 2, [2, 5, 7], (2, 5, 7)),  # Phi-3's shape: [32000, 32001, 32007] beside config.json's 32000
    ("phi3", 2, [5, 2, 7], (2, 5, 7)),
    ("llama", [2, 9], 5, (2, 9, 5)),  # one id; a list in config.json
    ("qwen2", 2, "absent", (2,)),  # no generation config: config.json's alone
    ("llama", 2, None, (2,)),  # eos_token_id null
    ("llama", None, [3, 4], (3, 4)),  # only the generation config has them
])
def test_eos_ids_are_the_union_of_both_files(tmp_path: Path, family: str, eos: Any, gen: Any,
                                             want: tuple[int, ...]) -> None:
    spec, _ = read_hf_dir(hf_dir(tmp_path, family, eos, gen))
    assert spec.eos_token_ids == want
    assert layerfold.load(tmp_path / family, tokenizer=False)[0].spec.eos_token_ids == want


@pytest.mark.parametrize("gen,match", [
    ("{not json", r"generation_config.json: corrupt JSON"),
    ("[1, 2]", r"generation_config.json: holds a JSON list, not an object"),
])
def test_an_unreadable_generation_config_is_refused(tmp_path: Path, gen: str, match: str) -> None:
    with pytest.raises(CheckpointError, match=match + r".*Fix: restore the model's own generation_config.json, or "
                                                      r"remove it"):
        read_hf_dir(hf_dir(tmp_path, gen=gen))


@pytest.mark.parametrize("bad", [True, "5", -1, 1.5, [2, [3]], [2, None], {"id": 3}])
def test_eos_values_that_are_not_token_ids_are_refused(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(CheckpointError, match=r"generation_config.json: eos_token_id=.* is not a token id.*Fix:"):
        read_hf_dir(hf_dir(tmp_path, gen=json.dumps({"eos_token_id": bad})))


@pytest.mark.parametrize("bad", [97, [2, 32007]])
def test_eos_ids_outside_the_vocabulary_are_refused(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(CheckpointError, match=r"generation_config.json: eos_token_id=.* names token \d+, outside the "
                                              r"vocabulary of 97 tokens.*Fix:"):
        layerfold.load(hf_dir(tmp_path, gen=bad), tokenizer=False)


@pytest.fixture(scope="module")
def tok() -> Any:
    return embedded_tokenizer()


def test_generate_stops_at_any_of_them(tmp_path: Path, tok: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """A tiny model with the SmolLM2 vocabulary, exported as an HF directory: generation stops at the first token
    that is an end of sequence by config.json or by generation_config.json, whichever comes first."""
    m = tiny_model(smollm2_vocab_spec(n_layers=1, max_position=512), seed=1, std=0.5)  # (layers alike: hf export)
    free = generate(m, tok, "Hi", max_new_tokens=10)[0].token_ids
    early, late = free[2], next(t for t in free[5:] if t not in free[:5])
    assert free.index(early) == 2 and tok.eos_token_id not in free
    ck = save_checkpoint(tmp_path / "ck", m.spec, m.state_dict(), tokenizer=tok)
    for name, in_config, in_gen in (("gen-early", late, [7, early]), ("config-early", early, [late])):
        d = tmp_path / name
        export_hf(ck, d)
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "eos_token_id": in_config}))
        (d / "generation_config.json").write_text(json.dumps({"eos_token_id": in_gen}))
        assert main(["generate", str(d), "Hi", "--max-new-tokens", "10", "--json"]) == 0
        res = json.loads(capsys.readouterr().out)["results"][0]
        assert (res["finish_reason"], res["completion_tokens"]) == ("stop", 3), name  # (+ the EOS)
    d = tmp_path / "gen-early"
    assert main(["convert", str(d), "--out", str(tmp_path / "converted"), "--json"]) == 0  # a checkpoint keeps them
    capsys.readouterr()
    assert read_config(tmp_path / "converted")["spec"].eos_token_ids == (late, 7, early)
    assert main(["generate", str(tmp_path / "converted"), "Hi", "--max-new-tokens", "10", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["results"][0]
    assert (res["finish_reason"], res["completion_tokens"]) == ("stop", 3)
    (d / "generation_config.json").unlink()  # config.json's late id alone: it stops there, later
    assert main(["generate", str(d), "Hi", "--max-new-tokens", "10", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["results"][0]
    assert (res["finish_reason"], res["completion_tokens"]) == ("stop", free.index(late) + 1)
