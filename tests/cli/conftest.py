"""Fixtures of the CLI tests: the embedded model's tokenizer and a tiny checkpoint that uses it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import layerfold
from layerfold.core.checkpoint import save_checkpoint
from tests.support.models import embedded_tokenizer, smollm2_vocab_spec, tiny_model


@pytest.fixture(scope="module")
def tok() -> Any:
    return embedded_tokenizer()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, tok: Any) -> Path:
    """A 3-layer checkpoint with the SmolLM2 tokenizer."""
    m = tiny_model(smollm2_vocab_spec(n_layers=3), seed=0)
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "model", m.spec, m.state_dict(), tokenizer=tok)


@pytest.fixture
def no_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every way a command loads a model (or reads all its weights) fails the test: errors must come first."""
    import layerfold.core.checkpoint as C
    import layerfold.core.loading as L
    import layerfold.pipeline as P
    from layerfold.cli.main import build_parser

    build_parser()  # the CLI modules bind their imports now, not to the patched functions below
    assert layerfold.load is L.load  # resolved (and cached) by the lazy package before L.load is patched

    def boom(*a: Any, **k: Any) -> Any:
        pytest.fail("loaded the model before checking the input")

    for mod, name in ((P, "load"), (L, "load"), (layerfold, "load"), (C, "check_finite"), (L, "check_finite"),
                      (L, "build_model")):
        monkeypatch.setattr(mod, name, boom)
