"""Finding 6 of issue 13: a corrupt op row is found *and* repaired.

A flipped byte in an op's stored bytes: the replica verifies ops when it reads them (the id
is the hash of the bytes), quarantines the row and so no longer holds the op; the next sync
fetches it again from a peer, as it would a piece. A replica that joins from the damaged
one, over HTTP, never receives the corrupt bytes.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from crdt_merge import maintenance
from crdt_merge.cli.main import main
from crdt_merge.errors import GenesisCorrupt, WrongProject
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


# -- the genesis row (issue 13, left open: a corrupt genesis made a replica unopenable) -------


def corrupt_genesis_row(path: Path, genesis: str) -> None:
    with sqlite3.connect(path / "replica.sqlite") as db:
        (data,) = db.execute("SELECT data FROM ops WHERE id = ?", (genesis,)).fetchone()
        at = len(data) - 9  # inside the signature: the bytes still decode
        db.execute("UPDATE ops SET data = ? WHERE id = ?",
                   (data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:], genesis))


def test_a_corrupt_genesis_row_is_restored_from_its_copy_on_open(tmp_path: Path) -> None:
    a = new_project(tmp_path / "a")
    contribute(a, 1)
    root, genesis = a.state_root(), a.genesis_id
    a.close()
    assert (tmp_path / "a" / "genesis.op").read_bytes() != b""
    corrupt_genesis_row(tmp_path / "a", genesis)
    with Replica.open(tmp_path / "a") as r:
        assert r.genesis_restored  # said, not silent
        assert r.state_root() == root
        report = maintenance.fsck(r)
        assert report["ok"] and report["genesis_restored"] and report["bad_ops"] == []
    # the same flip while the replica is open: fsck quarantines the row and restores it
    with Replica.open(tmp_path / "a") as r:
        assert not r.genesis_restored
        corrupt_genesis_row(tmp_path / "a", genesis)
        report = maintenance.fsck(r)
        assert report["ok"] and report["genesis_restored"], report
        assert r.state_root() == root


def test_a_genesis_lost_with_its_copy_is_refused_by_name_then_repaired_from_a_peer(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Row and copy both bad: opening raises GenesisCorrupt (naming the fsck --genesis
    path) and changes nothing; `crdt-merge fsck DIR --genesis` refuses another project's
    genesis, then takes the right one from a file, or from a peer replica or server."""
    a = new_project(tmp_path / "a")
    contribute(a, 1)
    b = join(tmp_path / "b", a.genesis_bytes(), "beta")
    sync(b, LocalPeer(a))
    root, genesis = a.state_root(), a.genesis_id
    other = new_project(tmp_path / "other")  # another name: another genesis
    b.close()

    def run(*args: str) -> tuple[int, dict]:
        code = main(["--json", *args])
        out = capsys.readouterr()
        return code, json.loads(out.out.strip() or out.err.strip().splitlines()[-1])

    for source in ("file", "replica", "server"):
        corrupt_genesis_row(tmp_path / "b", genesis)
        (tmp_path / "b" / "genesis.op").write_bytes(b"\x00junk")
        with pytest.raises(GenesisCorrupt) as refused:
            Replica.open(tmp_path / "b")
        assert f"crdt-merge fsck {tmp_path / 'b'} --genesis" in refused.value.detail
        code, err = run("fsck", str(tmp_path / "b"))
        assert code != 0 and "genesis_corrupt" in json.dumps(err), err
        with pytest.raises(WrongProject):
            Replica.repair_genesis(tmp_path / "b", other.genesis_bytes())
        if source == "file":
            (tmp_path / "g.op").write_bytes(a.genesis_bytes())
            code, report = run("fsck", str(tmp_path / "b"), "--genesis", str(tmp_path / "g.op"))
        elif source == "replica":
            code, report = run("fsck", str(tmp_path / "b"), "--genesis", str(tmp_path / "a"))
        else:
            a.close()
            server = ServerProcess(tmp_path / "a").wait_ready()
            try:
                code, report = run("fsck", str(tmp_path / "b"), "--genesis", server.url)
            finally:
                server.stop()
            a = Replica.open(tmp_path / "a")
        assert code == 0 and report["ok"] and report["genesis_restored"], (source, report)
        with Replica.open(tmp_path / "b") as b:
            assert b.state_root() == root
            assert (tmp_path / "b" / "genesis.op").read_bytes() == a.genesis_bytes()
    a.close()
    other.close()
