"""ONE conformance suite for every sync transport: the filesystem (LocalPeer), the in-process
ASGI app (httpx.ASGITransport, no sockets) and a real uvicorn process on 127.0.0.1.

Each test builds a replica, serves it through ``serve`` (the transport under test) and
checks what the Peer protocol promises, with the 4 KiB "test" profile so that every tensor
spans several pieces.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from http_helpers import contribute, join, new_project, objects_of, put_model

from crdt_merge import codec, maintenance
from crdt_merge.errors import HashMismatch, OpMissing, PieceMissing, WrongProject
from crdt_merge.hashing import digest
from crdt_merge.sync import pull, push, sync


@pytest.fixture
def origin(tmp_path: Path):
    """The served replica: project of site alpha, one contribution."""
    r = new_project(tmp_path / "origin")
    contribute(r, 1)
    yield r
    r.close()


def test_state_and_op_ids_follow_another_writer(origin, serve):
    """State and op ids are the replica's; when another process (the CLI) writes the
    directory while it is served, the peer answers from the new state at once."""
    peer = serve(origin)
    state = peer.state()
    assert (state.genesis, state.state_root, state.ops) == (
        origin.genesis_id, origin.state_root(), len(origin.ops()))
    assert peer.op_ids() == origin.op_ids()
    before = state.state_root
    contribute(origin, 2)
    after = peer.state()
    assert after.state_root == origin.state_root() != before
    assert after.ops == len(origin.ops())
    assert peer.op_ids() == origin.op_ids()


def test_get_ops_returns_the_exact_bytes(origin, serve):
    peer = serve(origin)
    ids = origin.op_ids()
    assert peer.get_ops(ids) == [origin.ops()[i].data for i in ids]
    with pytest.raises(OpMissing):
        peer.get_ops([digest(b"no such op")])


def test_objects_missing_get_and_put(origin, serve, tmp_path):
    peer = serve(origin)
    manifest = next(op.body["manifest"] for op in origin.ops().values() if op.kind == "contribute")
    held = sorted(objects_of(origin, manifest))
    absent = digest(b"absent")
    assert peer.missing(held + [absent]) == {absent}
    for object_id in held[:3]:
        data = peer.get_object(object_id)
        assert digest(data) == object_id
    with pytest.raises(PieceMissing):
        peer.get_object(absent)
    # put: verified, idempotent; bytes that do not match their id are refused
    data = b"a new piece" * 100
    new_id = digest(data)
    peer.put_object(new_id, data)
    peer.put_object(new_id, data)
    assert origin.store.has(new_id)
    wrong = digest(b"something else")
    with pytest.raises(HashMismatch):
        peer.put_object(wrong, data)
    assert not origin.store.has(wrong)
    assert not list((origin.path / "tmp").iterdir())


def test_join_pull_moves_each_object_once(origin, serve, tmp_path):
    peer = serve(origin)
    genesis = peer.get_ops([peer.state().genesis])[0]
    beta = join(tmp_path / "beta", genesis, "beta")
    stats = pull(beta, peer)
    assert beta.state_root() == origin.state_root()
    needed = {o for op in origin.ops().values() for m in op.objects()
              for o in objects_of(origin, m)}
    assert stats.objects_received == len(needed) == len(beta.store.object_ids())
    assert peer.objects_served == len(needed)
    again = sync(beta, peer)
    assert (again.objects_received, again.ops_received, again.ops_sent) == (0, 0, 0)
    assert maintenance.fsck(beta)["ok"]


def test_push_sends_only_what_the_peer_lacks(origin, serve, tmp_path):
    peer = serve(origin)
    beta = join(tmp_path / "beta", origin.genesis_bytes(), "beta")
    origin.admit("beta", beta.public_key)
    pull(beta, peer)
    op_id = contribute(beta, 2)  # shares its "embed" pieces with the origin's model
    manifest = beta.get_op(op_id).body["manifest"]
    lacking = objects_of(beta, manifest) - set(origin.store.object_ids())
    stats = push(beta, peer)
    assert stats.objects_sent == len(lacking) > 0
    assert stats.ops_sent == 1
    assert op_id in origin.ops()
    assert origin.state_root() == beta.state_root()


def test_put_ops_waits_for_objects_then_commits(origin, serve, tmp_path):
    peer = serve(origin)
    beta = join(tmp_path / "beta", origin.genesis_bytes(), "beta")
    origin.admit("beta", beta.public_key)
    pull(beta, peer)
    op_id = contribute(beta, 3)
    op = beta.get_op(op_id)
    assert op_id not in peer.put_ops([op.data])  # staged: its objects are not there yet
    assert op_id not in origin.ops()
    for object_id in objects_of(beta, op.body["manifest"]):
        peer.put_object(object_id, beta.store.get(object_id))
    peer.put_ops([op.data])  # idempotent: pushing again commits what is now complete
    assert op_id in origin.ops()
    assert peer.put_ops([op.data]) == []
    assert origin.state_root() == beta.state_root()


def test_op_with_bad_signature_is_refused(origin, serve):
    peer = serve(origin)
    ops = list(origin.ops().values())
    genuine = next(op for op in ops if op.kind == "contribute")
    forged = dict(genuine.body, label="forged", sig=bytes(64))
    data = codec.encode(forged)
    before = origin.state_root()
    assert peer.put_ops([data]) == []
    assert origin.state_root() == before
    assert origin.store.staged_rows() == []


def test_retracted_contribution_travels_without_its_objects(origin, serve, tmp_path):
    peer = serve(origin)
    doomed = contribute(origin, 4)
    origin.retract([doomed])
    beta = join(tmp_path / "beta", origin.genesis_bytes(), "beta")
    pull(beta, peer)
    assert beta.state_root() == origin.state_root()
    assert doomed in beta.ops()
    manifest = origin.get_op(doomed).body["manifest"]
    assert not beta.store.has(manifest)


def test_other_project_is_refused(origin, serve, tmp_path):
    peer = serve(origin)
    stranger = new_project(tmp_path / "stranger", site="zeta")
    put_model(stranger, 5)
    with pytest.raises(WrongProject):
        sync(stranger, peer)
    assert len(origin.ops()) == 2


def test_many_ops_converge_both_ways(origin, serve, tmp_path):
    """Enough ops that the HTTP transports reconcile by fingerprints, not id lists."""
    peer = serve(origin)
    beta = join(tmp_path / "beta", origin.genesis_bytes(), "beta")
    origin.admit("beta", beta.public_key)
    pull(beta, peer)
    for i in range(34):  # shared history: more ops than are ever sent as a plain list
        origin.set_recipe("linear", {"round": str(i)})
    sync(beta, peer)
    for i in range(3):  # then each side adds a few of its own
        origin.set_recipe("linear", {"origin": str(i)})
        beta.set_recipe("linear", {"beta": str(i)})
    stats = sync(beta, peer)
    assert (stats.ops_received, stats.ops_sent) == (3, 3)
    assert beta.state_root() == origin.state_root()
    if hasattr(peer, "log"):  # HTTP: the whole id list never crossed the wire
        paths = [e.path for e in peer.log]
        assert "/v1/ops" not in [p for p, e in zip(paths, peer.log, strict=True)
                                 if e.method == "GET"]
        assert paths.count("/v1/ops/reconcile") >= 2
