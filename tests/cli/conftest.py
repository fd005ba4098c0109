"""Fixtures of the CLI tests: the small models of tests/resolve."""

from tests.resolve.conftest import models  # noqa: F401  (a fixture)
