"""The seeded simulation in CI: a few hundred small seeds, exact replay, and a check that
the simulation does catch a replica that loses ops. ``python -m tests.sim.run --seeds 1000``
runs more (docs/reliability.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

from crdt_merge.crdt import ops as opmod
from crdt_merge.replica import CommitReport, Replica

from .run import scratch
from .simulation import Outcome, SimulationFailed, run_seed

CHUNK = 30
CHUNKS = 5          # 150 seeds: ~45 s on 2 shared cores
STEPS = 15          # small seeds; the 1,000-seed run draws 20-40 steps
FAULTS = ["request dropped", "response dropped", "duplicated", "delayed", "unreachable",
          "relay junk at"]  # the last: the keyless relay staged a forged op
REPO = Path(__file__).resolve().parents[2]


def run(seed: int, steps: int | None = STEPS) -> Outcome:
    with scratch() as tmp:
        return run_seed(seed, Path(tmp), steps=steps)


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_seeds_converge(chunk: int) -> None:
    """Every seed ends with equal state roots and equal resolve outcomes everywhere
    (:class:`SimulationFailed` otherwise, with the seed and the log); and the network did
    inject every kind of fault somewhere in the chunk, so passing means something."""
    seen: set[str] = set()
    outcomes: set[str] = set()
    for seed in range(chunk * CHUNK, (chunk + 1) * CHUNK):
        outcome = run(seed)
        text = "\n".join(outcome.log)
        seen.update(f for f in FAULTS if f in text)
        outcomes.add(outcome.resolved.split(" ")[0])
    assert seen == set(FAULTS)
    assert "checkpoint" in outcomes  # resolve ran and agreed, not only failed alike


@pytest.mark.parametrize("seed", [0, 7])  # 0: recipe conflicts; 7: every kind of fault
def test_a_seed_replays_exactly(seed: int) -> None:
    """The same seed gives the same event log, state root and checkpoint id: twice in this
    process, and once more in a process with another string hash seed (set order)."""
    first, second = run(seed), run(seed)
    assert first.log == second.log
    assert (first.state_root, first.resolved) == (second.state_root, second.resolved)
    assert first.resolved.startswith("checkpoint ")
    env = {**os.environ, "PYTHONHASHSEED": "4242"}
    out = subprocess.run(
        [sys.executable, "-m", "tests.sim.run", "--seed", str(seed), "--steps", str(STEPS),
         "-v"], cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[:len(first.log)] == first.log


def test_a_replica_that_loses_ops_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sabotage: every replica silently discards incoming retract ops. The simulation must
    fail, naming the seed, with the log to replay it."""
    real_receive = Replica.receive

    def receive(self: Replica, ops: Iterable[bytes], source: str = "") -> CommitReport:
        kept = [d for d in ops if not ((op := opmod.decode(d)).kind == "retract"
                                       and op.site != self.site)]
        return real_receive(self, kept, source)

    monkeypatch.setattr(Replica, "receive", receive)
    with pytest.raises(SimulationFailed) as failed:
        run(1)  # a site retracts its own contribution
    assert failed.value.seed == 1
    assert "seed 1:" in str(failed.value) and "tests.sim.run --seed 1" in str(failed.value)
    assert "retract own" in str(failed.value)
