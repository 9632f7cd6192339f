"""Hub ids (org/name) as model sources, resolved through huggingface_hub's cache; offline mode honoured."""

from __future__ import annotations

import pytest
import torch

import layerfold
from layerfold.core.loading import is_hub_id, resolve, source_kind
from tests.support.models import tiny_hf, to_layerfold

pytestmark = pytest.mark.usefixtures("one_thread")


def fake_hub_cache(root, repo_id: str, hf) -> None:
    """A model in the hub cache layout: models--org--name/{refs/main, snapshots/<hash>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    hf.save_pretrained(repo / "snapshots" / commit)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = tiny_hf("llama")
    fake_hub_cache(tmp_path / "hub", "tiny-org/tiny-llama", hf)
    return hf


def test_hub_ids_are_recognised() -> None:
    assert is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct") and not is_hub_id("/abs/path")
    assert not is_hub_id("smollm2-135m") and not is_hub_id("../x/y") and not is_hub_id("a/b/c")


def test_a_cached_hub_model_loads_offline(hub, tmp_path) -> None:
    assert source_kind("tiny-org/tiny-llama") == "hub"
    path = resolve("tiny-org/tiny-llama")
    assert path.is_dir() and "snapshots" in str(path)
    m, _ = layerfold.load("tiny-org/tiny-llama", tokenizer=False)
    ids = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(m(ids), to_layerfold(hub)(ids))
    from layerfold.cli.main import main

    assert main(["inspect", "tiny-org/tiny-llama", "--json"]) == 0


def test_an_uncached_hub_id_offline_says_how_to_fix_it(hub, capsys) -> None:
    with pytest.raises(FileNotFoundError) as e:
        resolve("tiny-org/not-there")
    msg = str(e.value)
    assert "not in the Hugging Face cache" in msg and "HF_HUB_OFFLINE" in msg and "Fix: " in msg
    from layerfold.cli.main import main

    assert main(["inspect", "tiny-org/not-there"]) == 2
    assert "hf download tiny-org/not-there" in capsys.readouterr().err
