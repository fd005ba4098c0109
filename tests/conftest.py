"""Fixtures shared by the whole test suite."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.fixtures.tiny_models import TinyModels


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    """Tiny models of every family, each built once per session (tests/fixtures/tiny_models.py)."""
    from tests.fixtures.tiny_models import TinyModels  # imports transformers: only when used

    return TinyModels(tmp_path_factory.mktemp("tiny-models"))
