"""What the server tests share: the embedded model's tokenizer (its vocabulary is the test models')."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.models import embedded_tokenizer


@pytest.fixture(scope="session")
def tok() -> Any:
    return embedded_tokenizer()
