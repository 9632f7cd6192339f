"""What the server tests share: the embedded model's tokenizer (its vocabulary is the test models')."""

from __future__ import annotations

from typing import Any

import pytest

from layerfold.core.loading import load_tokenizer, resolve


@pytest.fixture(scope="session")
def tok() -> Any:
    return load_tokenizer(resolve("smollm2-135m", quiet=True))
