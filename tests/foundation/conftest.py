"""Fixtures of the foundation tests."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import scratch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fast_tmp() -> Iterator[Path]:
    """A temporary directory on tmpfs when there is one (see helpers.scratch): for tests of
    logic that create many replicas. Crash and concurrency tests use ``tmp_path``."""
    with scratch() as name:
        yield Path(name)


class ForkServer:
    """Client of tests/foundation/forkserver.py: runs jobs in real, forked processes."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self._stderr = open(log, "wb")  # closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.foundation.forkserver"], cwd=ROOT,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True)

    def run(self, *jobs: dict) -> list[dict]:
        """Run ``jobs`` at once, each in its own process; their pids and how they ended."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps([{k: str(v) if isinstance(v, Path) else v
                                           for k, v in job.items()} for job in jobs]) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server died:\n{self.errors()}")
        return json.loads(line)

    def errors(self) -> str:
        self._stderr.flush()
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


@pytest.fixture(scope="session")
def forks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    server = ForkServer(tmp_path_factory.mktemp("forkserver") / "stderr.log")
    yield server
    server.close()
