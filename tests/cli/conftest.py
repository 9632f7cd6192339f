"""Fixtures of the CLI tests: the embedded model's tokenizer and a tiny checkpoint that uses it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from layerfold.core.checkpoint import save_checkpoint
from layerfold.core.loading import load_tokenizer, resolve
from tests.support.models import smollm2_vocab_spec, tiny_model


@pytest.fixture(scope="module")
def tok() -> Any:
    return load_tokenizer(resolve("smollm2-135m", quiet=True))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, tok: Any) -> Path:
    """A 3-layer checkpoint with the SmolLM2 tokenizer."""
    m = tiny_model(smollm2_vocab_spec(n_layers=3), seed=0)
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "model", m.spec, m.state_dict(), tokenizer=tok)
