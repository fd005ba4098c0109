"""The simulation runner turns any exception of a seed into a failed seed with its replay
command (before, an error that did not pickle broke the process pool and the whole run)."""

from __future__ import annotations

import pytest

from crdt_merge.errors import IncompleteOp
from tests.sim import run


def test_an_unexpected_error_is_a_failed_seed_with_its_replay_command(monkeypatch, capsys) -> None:
    def boom(seed, workdir, steps=None, echo=None):
        raise IncompleteOp("a" * 64, ["b" * 64])
    monkeypatch.setattr(run, "run_seed", boom)
    seed, failure, how = run.one(50100, 60)
    assert (seed, how) == (50100, "ERROR")
    assert "unexpected IncompleteOp" in failure
    assert "replay: python -m tests.sim.run --seed 50100 --steps 60 -v" in failure
    assert run.main(["--seed", "50100", "--steps", "60"]) == 1
    out = capsys.readouterr().out
    assert "failed: [50100]" in out and "replay:" in out


@pytest.mark.parametrize("jobs", ["2"])
def test_the_pool_reports_every_seed(jobs, capsys) -> None:
    assert run.main(["--seeds", "2", "--start", "50100", "--steps", "8", "--jobs", jobs]) == 0
    assert "passed: 2; failed: none" in capsys.readouterr().out
