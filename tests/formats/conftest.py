"""Replicas for the format tests (the same fixture as tests/resolve)."""

from tests.resolve.conftest import replicas  # noqa: F401
