"""Crash safety with real processes: a writer SIGKILLed at each crash point leaves no torn
or unverified object visible and no op without its objects; its temp files are cleaned when
the replica is next opened; and doing the same work again succeeds."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest

from crdt_merge.replica import Replica
from crdt_merge.store.manifests import Manifest

from .forkserver import model_bytes
from .helpers import check_invariants, join, new_project

PACKAGE = Path(__file__).resolve().parents[2] / "crdt_merge"

#: every crash point, and whether a temp file is left behind when the writer dies there
CRASH_POINTS = {
    "piece.mid_stream": True,
    "piece.before_fsync": True,
    "piece.after_fsync": True,
    "piece.after_rename": False,   # whole, verified file in objects/, not yet indexed
    "piece.before_index": False,   # same, after the directory fsync
    "op.before_commit": False,     # inside the SQLite transaction that inserts the op
    "ops.after_first_insert": False,  # same, one op row written, the rest of the batch not
}


def test_every_crash_point_in_the_code_is_tested():
    found = set()
    for path in PACKAGE.rglob("*.py"):
        found.update(re.findall(r"""crashpoint\(\s*["']([^"']+)["']\s*\)""", path.read_text()))
    assert found == set(CRASH_POINTS), (
        "crash points changed: list each in tests/foundation/test_crash.py CRASH_POINTS")


def manifest_bytes_match(r: Replica, manifest: Manifest, seed: int) -> None:
    """Every tensor reads back, from verified pieces, as the bytes the writer had."""
    want = model_bytes(seed)
    for name, record in manifest.tensors.items():
        assert b"".join(r.store.get(p) for p in record.pieces) == want[name]


def contributions(r: Replica) -> list[str]:
    return sorted(op.body["label"] for op in r.ops().values() if op.kind == "contribute")


@pytest.mark.parametrize("point", sorted(CRASH_POINTS))
def test_writer_killed_at_each_crash_point(forks, tmp_path, point):
    d = tmp_path / "r"
    new_project(d).close()
    assert forks.run({"action": "write", "dir": d, "seed": 1})[0]["exit"] == 0, forks.errors()
    with Replica.open(d) as r:
        ops_before = r.op_ids()

    [result] = forks.run({"action": "write", "dir": d, "seed": 2, "crash_at": point})
    assert result["signal"] == signal.SIGKILL, (result, forks.errors())
    leftovers = [p for p in (d / "tmp").iterdir() if p.name.startswith(f"{result['pid']}-")]
    assert bool(leftovers) == CRASH_POINTS[point]

    check_invariants(d)  # opening cleans the dead writer's temp files
    assert list((d / "tmp").iterdir()) == []
    with Replica.open(d) as r:
        assert r.op_ids() == ops_before  # nothing acknowledged, nothing committed
        assert contributions(r) == ["seed 1"]

    assert forks.run({"action": "write", "dir": d, "seed": 2})[0]["exit"] == 0, forks.errors()
    check_invariants(d)
    with Replica.open(d) as r:
        assert contributions(r) == ["seed 1", "seed 2"]
        for op in r.ops().values():
            if op.kind == "contribute":
                manifest_bytes_match(r, r.get_manifest(op.body["manifest"]),
                                     int(op.body["label"].split()[1]))


@pytest.mark.parametrize("point", sorted(CRASH_POINTS))
def test_sync_killed_at_each_crash_point(forks, tmp_path, point):
    src, dst = tmp_path / "src", tmp_path / "dst"
    with new_project(src) as a:
        join(dst, a.genesis_bytes(), "bob").close()
    for seed in (1, 2):
        assert forks.run({"action": "write", "dir": src, "seed": seed})[0]["exit"] == 0

    [result] = forks.run({"action": "pull", "dir": dst, "source": src, "crash_at": point})
    assert result["signal"] == signal.SIGKILL, (result, forks.errors())
    check_invariants(dst)
    with Replica.open(src) as a, Replica.open(dst) as b:
        assert set(b.op_ids()) <= set(a.op_ids())
        want = a.state_root()

    assert forks.run({"action": "pull", "dir": dst, "source": src})[0]["exit"] == 0, forks.errors()
    check_invariants(dst)
    with Replica.open(dst) as b:
        assert b.state_root() == want
        assert b.store.staged_rows() == []
        assert contributions(b) == ["seed 1", "seed 2"]


def test_a_new_replica_has_every_fan_out_folder_so_writes_make_none(tmp_path, monkeypatch):
    """The 256 folders ``objects/00`` .. ``objects/ff`` are made (and fsynced) with the
    replica; a first write then creates no folder (no fsync of ``objects`` per folder)."""
    from crdt_merge.store import objects

    r = Replica.create(tmp_path / "r", site="alpha", profile="test")
    folders = sorted(p.name for p in (tmp_path / "r" / "objects").iterdir())
    assert folders == [f"{i:02x}" for i in range(256)]
    made = []
    real_mkdir = Path.mkdir

    def spy(self, *args, **kwargs):
        made.append(self)
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", spy)
    ids = [r.store.put(bytes([i]) * 100) for i in range(40)]
    assert len({i[:2] for i in ids}) > 30 and made == []
    assert objects.ObjectFiles(tmp_path / "r").exists(ids[0])
    r.close()


@pytest.mark.parametrize("point", ["op.before_commit", "ops.after_first_insert", None])
def test_a_received_batch_joins_whole_or_not_at_all(forks, tmp_path, point):
    """A batch of ops that join together (an admit, recipes and a contribution whose
    objects are here, a retract, and one op that must wait) is received by a process
    SIGKILLed inside the join: afterwards the replica holds all of the batch's joinable ops
    or none of them, passes fsck, and receiving the batch again joins it all."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    with new_project(src) as a, join(dst, a.genesis_bytes(), "bob") as b:
        genesis = a.genesis_id
        b_key = b.public_key
    assert forks.run({"action": "write", "dir": src, "seed": 1})[0]["exit"] == 0
    with Replica.open(src) as a, Replica.open(dst) as b:
        a.admit("bob", b_key)
        for i in range(4):
            a.set_recipe("linear", {"n": i})
        c = next(op for op in a.ops().values() if op.kind == "contribute")
        a.retract([c.id])
        batch = [a.get_op(i).data for i in a.op_ids() if i != genesis]
        joinable = {i for i in a.op_ids() if i != genesis}
    # one more op that cannot join at dst (its contribution's objects are not there)
    assert forks.run({"action": "write", "dir": src, "seed": 2})[0]["exit"] == 0
    with Replica.open(src) as a:
        late = next(op for op in a.ops().values() if op.kind == "contribute"
                    and op.id not in joinable)
        batch.append(late.data)
    assert len(joinable) >= 7
    path = tmp_path / "batch.json"
    path.write_text(json.dumps([d.hex() for d in reversed(batch)]))

    [result] = forks.run({"action": "receive", "dir": dst, "batch": path, "crash_at": point})
    if point is None:
        assert result["exit"] == 0, forks.errors()
    else:
        assert result["signal"] == signal.SIGKILL, (result, forks.errors())
    check_invariants(dst)
    with Replica.open(dst) as b:
        held = set(b.op_ids()) - {genesis}
        assert held in (set(), joinable), (point, len(held), len(joinable))
        assert held == (joinable if point is None else set())
        staged = {i for i, _ in b.store.staged_rows()}
        assert staged == ({late.id} if point is None else set())
    assert forks.run({"action": "receive", "dir": dst, "batch": path})[0]["exit"] == 0
    check_invariants(dst)
    with Replica.open(dst) as b:
        assert set(b.op_ids()) - {genesis} == joinable
        assert [i for i, _ in b.store.staged_rows()] == [late.id]
