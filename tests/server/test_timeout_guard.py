"""The server tests run under a per-test timeout (pytest-timeout, tests/server/conftest.py),
so a hung teardown fails its test instead of holding the run until CI's own limit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.server.conftest import SERVER_TEST_TIMEOUT


def test_server_tests_carry_a_timeout(request: pytest.FixtureRequest) -> None:
    marker = request.node.get_closest_marker("timeout")
    assert marker is not None and marker.args[0] == SERVER_TEST_TIMEOUT <= 300
    assert request.config.pluginmanager.hasplugin("timeout")


def test_a_hung_teardown_fails_within_the_timeout(tmp_path: Path) -> None:
    (tmp_path / "test_hang.py").write_text(textwrap.dedent("""
        import threading, pytest

        @pytest.fixture
        def stuck():
            yield
            threading.Event().wait()  # a teardown that never returns

        @pytest.mark.timeout(2)
        def test_x(stuck):
            pass
    """))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-c", os.devnull, "--rootdir", str(tmp_path), str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Timeout" in done.stdout and "1 passed, 1 error" in done.stdout, done.stdout
