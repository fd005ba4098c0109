"""Finding 6 of issue 13: a corrupt op row is found *and* repaired.

A flipped byte in an op's stored bytes: the replica verifies ops when it reads them (the id
is the hash of the bytes), quarantines the row and so no longer holds the op; the next sync
fetches it again from a peer, as it would a piece. A replica that joins from the damaged
one, over HTTP, never receives the corrupt bytes.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from crdt_merge import maintenance
from crdt_merge.replica import Replica
from crdt_merge.sync import LocalPeer, pull, sync
from crdt_merge.sync.http import HttpPeer
from tests.server.http_helpers import ServerProcess, contribute, join, new_project


def flip_sig_byte(replica: Replica, op_id: str) -> None:
    """Flip one byte of the signature inside the op's stored row (it still decodes)."""
    op = replica.get_op(op_id)
    assert op is not None
    sig = op.body["sig"]
    at = op.data.index(sig) + 7
    bad = op.data[:at] + bytes([op.data[at] ^ 0x01]) + op.data[at + 1:]
    with sqlite3.connect(replica.path / "replica.sqlite") as db:
        db.execute("UPDATE ops SET data = ? WHERE id = ?", (bad, op_id))


def test_corrupt_op_row_is_quarantined_and_fetched_again(tmp_path: Path) -> None:
    a = new_project(tmp_path / "a")
    target = contribute(a, 1)
    b = join(tmp_path / "b", a.genesis_bytes(), "beta")
    sync(b, LocalPeer(a))
    good_root = a.state_root()
    assert b.state_root() == good_root
    a.close()
    flip_sig_byte(Replica.open(tmp_path / "a"), target)

    a = Replica.open(tmp_path / "a")  # a fresh process's view: reads the damaged row
    report = maintenance.fsck(a)
    assert report["bad_ops"] == [target] and not report["ok"]
    assert target not in a.ops() and a.state_root() != good_root
    # the sets now differ by that op, so reconciliation finds it and the sync repairs it
    sync(a, LocalPeer(b))
    assert a.state_root() == good_root and target in a.ops()
    assert maintenance.fsck(a)["ok"] and maintenance.fsck(a)["bad_ops"] == []
    a.close()
    b.close()


def test_a_replica_joining_from_a_damaged_one_over_http_never_takes_the_bad_bytes(
        tmp_path: Path) -> None:
    a = new_project(tmp_path / "a")
    target = contribute(a, 2)
    b = join(tmp_path / "b", a.genesis_bytes(), "beta")
    sync(b, LocalPeer(a))
    good_root = a.state_root()
    a.close()
    flip_sig_byte(Replica.open(tmp_path / "a"), target)
    server = ServerProcess(tmp_path / "a").wait_ready()
    d = join(tmp_path / "d", b.genesis_bytes(), "delta")
    try:
        with HttpPeer(server.url) as peer:
            pull(d, peer)  # today: the peer sends bytes that are not the op asked for
            assert target not in d.ops()  # the damaged server no longer holds it
            with Replica.open(tmp_path / "a") as a_again:  # the damaged side repairs
                sync(a_again, LocalPeer(b))
                assert a_again.state_root() == good_root
            pull(d, peer)
        assert d.state_root() == good_root
    finally:
        server.stop()
        b.close()
        d.close()
