"""Several processes on one replica directory at once (the CLI and a server): both writers
succeed, and a process's cached state is refreshed when another one commits."""

from __future__ import annotations

from crdt_merge import maintenance
from crdt_merge.replica import Replica
from crdt_merge.sync import LocalPeer, sync

from .helpers import check_invariants, expected_root, join, new_project


def labels(r: Replica) -> list[str]:
    return sorted(op.body["label"] for op in r.ops().values() if op.kind == "contribute")


def test_two_processes_contribute_at_once(forks, tmp_path):
    d = tmp_path / "r"
    new_project(d).close()
    results = forks.run({"action": "contribute", "dir": d, "seed": 100, "count": 6},
                        {"action": "contribute", "dir": d, "seed": 200, "count": 6})
    assert [r["exit"] for r in results] == [0, 0], forks.errors()
    check_invariants(d)
    with Replica.open(d) as r:
        assert labels(r) == sorted([f"seed {s}" for s in range(100, 106)]
                                   + [f"seed {s}" for s in range(200, 206)])
        assert r.state_root() == expected_root(r.op_ids())


def test_a_pull_and_a_writer_at_once(forks, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    with new_project(src) as a:
        with join(dst, a.genesis_bytes(), "bob") as b:
            a.admit("bob", b.public_key)
            sync(b, LocalPeer(a))
    assert forks.run({"action": "contribute", "dir": src, "seed": 1, "count": 3})[0]["exit"] == 0
    # bob contributes to dst while dst pulls alice's new ops: two processes write one directory
    results = forks.run({"action": "pull", "dir": dst, "source": src},
                        {"action": "contribute", "dir": dst, "seed": 50, "count": 3})
    assert [r["exit"] for r in results] == [0, 0], forks.errors()
    check_invariants(dst)
    with Replica.open(src) as a, Replica.open(dst) as b:
        assert set(a.op_ids()) < set(b.op_ids())
        assert labels(b) == ["seed 1", "seed 2", "seed 3", "seed 50", "seed 51", "seed 52"]


def test_cached_state_is_refreshed_after_another_process_commits(forks, tmp_path):
    d = tmp_path / "r"
    with new_project(d) as r:
        root, ops = r.state_root(), r.op_ids()
        assert not r.store.index.changed()  # nothing new since the cache was filled
        assert forks.run({"action": "write", "dir": d, "seed": 7})[0]["exit"] == 0, forks.errors()
        assert r.state_root() != root  # no reopen: data_version moved, the cache was dropped
        assert len(r.op_ids()) == len(ops) + 1
        assert r.state_root() == expected_root(r.op_ids())
        assert labels(r) == ["seed 7"]
        assert maintenance.status(r)["state_root"] == r.state_root()
