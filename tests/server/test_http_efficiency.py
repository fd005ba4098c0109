"""Efficiency, measured on the wire against real uvicorn processes: an in-sync check is one
request answered 304; a new donor moves each missing object exactly once; a transfer cut
by killing the server resumes without resending anything that had arrived."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from http_helpers import (
    PIECE_SIZE,
    ServerProcess,
    contribute,
    cut,
    join,
    new_project,
    objects_of,
    tensor_bytes,
)

from crdt_merge import maintenance
from crdt_merge.store.manifests import Manifest, TensorRecord
from crdt_merge.sync import pull, push, sync, wire
from crdt_merge.sync.http import HttpPeer


@pytest.fixture
def pair(tmp_path: Path):
    """An origin replica served by uvicorn (alpha, one donor) and beta, joined and synced."""
    origin = new_project(tmp_path / "origin")
    contribute(origin, 1)
    beta = join(tmp_path / "beta", origin.genesis_bytes(), "beta")
    origin.admit("beta", beta.public_key)
    server = ServerProcess(origin.path).wait_ready()
    with HttpPeer(server.url) as peer:
        sync(beta, peer)
    yield origin, beta, server
    server.stop()
    origin.close()
    beta.close()


def piece_gets(peer: HttpPeer) -> list[str]:
    return [e.path.rsplit("/", 1)[1] for e in peer.log
            if e.method == "GET" and e.path.startswith("/v1/pieces/")]


def test_in_sync_check_is_one_request_answered_304(pair):
    origin, beta, server = pair
    with HttpPeer(server.url) as peer:
        stats = sync(beta, peer)
        assert stats.ops_received == stats.ops_sent == stats.objects_received == 0
        assert [(e.method, e.path, e.status) for e in peer.log] == [("GET", "/v1/state", 304)]
        assert peer.log[0].sent + peer.log[0].received < 600  # a few hundred bytes


def test_new_donor_moves_each_missing_object_exactly_once(pair):
    origin, beta, server = pair
    op_id = contribute(origin, 2)  # shares its "embed" pieces with donor 1
    manifest = origin.get_op(op_id).body["manifest"]
    missing = objects_of(origin, manifest) - set(beta.store.object_ids())
    assert len(missing) >= 8
    with HttpPeer(server.url) as peer:
        stats = pull(beta, peer)
        gets = piece_gets(peer)
        assert sorted(gets) == sorted(missing)  # each missing object once, nothing else
        sizes = {o: len(beta.store.get(o)) for o in missing}
        assert peer.downloaded == sizes
        assert stats.bytes_received == sum(sizes.values())
    assert beta.state_root() == origin.state_root()
    # and the other way: a donor made at beta is uploaded once per object the origin lacks
    beta_op = contribute(beta, 3)
    lacking = (objects_of(beta, beta.get_op(beta_op).body["manifest"])
               - set(origin.store.object_ids()))
    with HttpPeer(server.url) as peer:
        push(beta, peer)
        puts = [e.path.rsplit("/", 1)[1] for e in peer.log if e.method == "PUT"]
        assert sorted(puts) == sorted(lacking)
    assert origin.state_root() == beta.state_root()


def big_donor(replica, seed: int, n_pieces: int) -> str:
    """A donor of ``n_pieces`` distinct 4 KiB pieces; returns the contribute op id."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n_pieces * PIECE_SIZE // 4, generator=g)
    ids = tuple(replica.store.put(p) for p in cut(tensor_bytes(t)))
    manifest = Manifest(PIECE_SIZE, {"big": TensorRecord("F32", tuple(t.shape), ids)}, {}, {})
    return replica.contribute(replica.put_manifest(manifest), params={"weight": "1"}).id


def test_killed_server_then_resume_resends_nothing_that_arrived(pair, tmp_path):
    origin, beta, server = pair
    op_id = big_donor(origin, 7, 200)
    wanted = objects_of(origin, origin.get_op(op_id).body["manifest"])

    def kill_midway(stage: str, done: int, total: int) -> None:
        if stage == "pieces" and done == total // 3:
            server.kill()

    with HttpPeer(server.url) as peer, pytest.raises(wire.PeerUnreachable):
        pull(beta, peer, kill_midway)
    arrived = set(beta.store.object_ids()) & wanted
    assert len(wanted) // 3 <= len(arrived) < len(wanted)
    partial = {p.name.split(".")[0]: p.stat().st_size for p in (beta.path / "tmp").glob("*.part")}
    assert op_id not in beta.ops() and op_id in {i for i, _ in beta.store.staged_rows()}

    again = ServerProcess(origin.path).wait_ready()
    try:
        with HttpPeer(again.url) as peer:
            pull(beta, peer)
            fetched = set(peer.downloaded)
            assert not fetched & arrived, "an object that had arrived was sent again"
            assert fetched == wanted - arrived
            for object_id, n in peer.downloaded.items():
                assert n == len(origin.store.get(object_id)) - partial.get(object_id, 0)
            assert "/v1/ops/fetch" not in [e.path for e in peer.log]  # the op was staged
    finally:
        again.stop()
    assert op_id in beta.ops()
    assert beta.state_root() == origin.state_root()
    assert maintenance.fsck(beta)["ok"]
    assert not list((beta.path / "tmp").iterdir())


def test_partial_download_continues_with_a_range_request(pair):
    origin, beta, server = pair
    op_id = big_donor(origin, 8, 6)
    pieces = sorted(objects_of(origin, origin.get_op(op_id).body["manifest"])
                    - {origin.get_op(op_id).body["manifest"]})
    resumed, stale = pieces[0], pieces[1]
    # what an interrupted transfer leaves: a prefix of the bytes under tmp/<id>.part
    (beta.path / "tmp" / f"{resumed}.part").write_bytes(origin.store.get(resumed)[:1000])
    (beta.path / "tmp" / f"{stale}.part").write_bytes(b"\x00" * 1500)  # not a prefix
    with HttpPeer(server.url) as peer:
        pull(beta, peer)
        assert peer.downloaded[resumed] == PIECE_SIZE - 1000
        # resumed from 1500, refused by its hash, fetched whole
        assert peer.downloaded[stale] == (PIECE_SIZE - 1500) + PIECE_SIZE
        statuses = [e.status for e in peer.log if e.path.endswith(resumed)]
        assert statuses == [206]
    assert beta.store.get(resumed) == origin.store.get(resumed)
    assert beta.state_root() == origin.state_root()
    assert not list((beta.path / "tmp").iterdir())
