"""Rejection without change: everything a replica refuses raises a clear typed error and
leaves the replica as it was (state root, ops, object index, object/temp/quarantine files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crdt_merge import codec
from crdt_merge.crdt import ops as opmod
from crdt_merge.errors import (
    BadId,
    BadSignature,
    HashMismatch,
    IncompleteOp,
    NonCanonicalEncoding,
    NotAuthorized,
    SchemaError,
    UnknownSite,
    WrongProject,
)
from crdt_merge.hashing import digest
from crdt_merge.replica import Replica
from crdt_merge.sync import LocalPeer, pull, push, sync

from .helpers import join, new_project, put_model, snapshot
from .pool import site_key

VECTORS = Path(__file__).resolve().parents[2] / "specs" / "vectors"


@pytest.fixture
def alice(fast_tmp):
    a = new_project(fast_tmp / "a")
    m = put_model(a, 1)
    a.contribute(m, params={"weight": "0.5"}, label="a1")
    a.set_recipe("linear", anchor=m)
    yield a
    a.close()


@pytest.fixture
def bob(fast_tmp, alice):
    b = join(fast_tmp / "b", alice.genesis_bytes(), "bob")
    alice.admit("bob", b.public_key)
    sync(b, LocalPeer(alice))
    yield b
    b.close()


def body_by(replica: Replica, kind: str, **fields: object) -> dict:
    return replica.new_body(kind, **fields)


def contribution(replica: Replica, manifest: str) -> dict:
    return body_by(replica, "contribute", manifest=manifest, form="full", params={},
                   label="x", family="test")


def refused(replica: Replica, data: bytes, error: type[Exception]) -> Exception:
    """Apply ``data``; it must raise ``error`` and change nothing."""
    before = snapshot(replica)
    with pytest.raises(error) as info:
        replica.apply(data)
    assert snapshot(replica) == before
    assert replica.store.staged_rows() == []
    return info.value


# -- encodings -----------------------------------------------------------------------------


REJECTED_MSGPACK = [bytes.fromhex(c["hex"])
                    for c in json.loads((VECTORS / "msgpack.json").read_text())["rejected"]]


@pytest.mark.parametrize("data", REJECTED_MSGPACK + [b"\x00" * 40, b"not msgpack at all"],
                         ids=lambda d: d[:8].hex() or "empty")
def test_malformed_or_non_canonical_msgpack(alice, data):
    err = refused(alice, data, NonCanonicalEncoding)
    assert err.code == "non_canonical"


def test_non_canonical_encodings_of_a_valid_op(alice, bob):
    op = opmod.sign(contribution(bob, alice.op_ids()[0]), bob.key)
    body = codec.decode(op.data)
    pairs = [codec.encode(k) + codec.encode(body[k]) for k in sorted(body)]
    assert op.data == bytes([0x80 | len(pairs)]) + b"".join(pairs)
    variants = {
        "keys in reverse order": bytes([0x80 | len(pairs)]) + b"".join(reversed(pairs)),
        "map16 header": b"\xde" + len(pairs).to_bytes(2, "big") + b"".join(pairs),
        "a duplicate key": bytes([0x80 | len(pairs) + 1]) + pairs[0] + b"".join(pairs),
        "uint16 clock": op.data.replace(b"\xa5clock" + bytes([op.clock]),
                                        b"\xa5clock\xcd\x00" + bytes([op.clock]), 1),
        "trailing byte": op.data + b"\xc0",
    }
    for why, data in variants.items():
        assert data != op.data, why
        refused(alice, data, NonCanonicalEncoding)


def test_schema_errors(alice):
    op = opmod.sign(contribution(alice, alice.op_ids()[0]), alice.key)
    body = dict(op.body)
    for change in ({"form": "half"}, {"params": {"w": "0.50"}}, {"clock": -1},
                   {"manifest": "ab"}, {"extra": 1}):
        refused(alice, codec.encode({**body, **change}), SchemaError)
    refused(alice, codec.encode({k: v for k, v in body.items() if k != "label"}), SchemaError)


def test_an_object_that_is_not_a_manifest(alice):
    fake = alice.store.put(codec.encode({"not": "a manifest"}))
    before_ops = alice.op_ids()
    with pytest.raises(SchemaError):
        alice.contribute(fake)
    assert alice.op_ids() == before_ops and alice.store.staged_rows() == []


# -- signatures and membership ------------------------------------------------------------


def test_bad_signature(alice, bob):
    manifest = put_model(bob, 2)
    alice.store.put(bob.store.get(manifest))  # so only the signature can be wrong
    for piece in bob.closure([manifest]):
        alice.store.put(bob.store.get(piece))
    good = opmod.sign(contribution(bob, manifest), bob.key)
    data = bytearray(good.data)
    at = data.index(b"\xa3sig\xc4\x40") + 6
    data[at + 5] ^= 0x10
    err = refused(alice, bytes(data), BadSignature)
    assert err.code == "bad_signature"
    forged = opmod.sign(contribution(bob, manifest), alice.key)  # bob's name, alice's key
    refused(alice, forged.data, BadSignature)
    assert alice.apply(good.data) == good.id  # the real one is accepted


def test_op_from_an_unknown_site(alice, fast_tmp):
    mallory_key = site_key("mallory")
    body = {"v": opmod.VERSION, "kind": "contribute", "site": "mallory", "clock": 1,
            "deps": [alice.genesis_id],
            "project": alice.genesis_id, "member": alice.genesis_id,
            "manifest": alice.op_ids()[0], "form": "full", "params": {}, "label": "",
            "family": ""}
    err = refused(alice, opmod.sign(body, mallory_key).data, UnknownSite)
    assert err.code == "unknown_site"
    unheld_admit = dict(body, site="alice", member=digest(b"an admit nobody has"))
    refused(alice, opmod.sign(unheld_admit, alice.key).data, UnknownSite)
    # a site that joined but was never admitted cannot author, and its ops are refused
    eve = join(fast_tmp / "eve", alice.genesis_bytes(), "eve")
    with pytest.raises(UnknownSite):
        eve.contribute(alice.op_ids()[0])
    eve_body = dict(body, site="eve")
    refused(alice, opmod.sign(eve_body, eve.key).data, UnknownSite)
    eve.close()


def test_a_member_cannot_admit(alice, bob):
    before = snapshot(bob)
    with pytest.raises(NotAuthorized) as info:
        bob.admit("carol", opmod.public_bytes(site_key("carol")))
    assert info.value.code == "not_authorized"
    assert snapshot(bob) == before
    admit = body_by(bob, "admit", admit={"site": "carol", "role": "admin",
                                         "key": opmod.public_bytes(site_key("carol"))})
    refused(alice, opmod.sign(admit, bob.key).data, NotAuthorized)


# -- objects --------------------------------------------------------------------------------


def test_piece_whose_bytes_do_not_match_its_id(alice):
    data = b"some piece bytes"
    wrong = digest(b"other bytes")
    before = snapshot(alice)
    with pytest.raises(HashMismatch) as info:
        alice.store.put(data, expected=wrong)
    assert (info.value.expected, info.value.actual) == (wrong, digest(data))
    with pytest.raises(HashMismatch):
        alice.store.put_stream(wrong, [data[:5], data[5:]])
    with pytest.raises(HashMismatch):
        LocalPeer(alice).put_object(wrong, data)
    assert snapshot(alice) == before
    assert not alice.store.has(wrong) and not alice.store.has(digest(data))


class LyingPeer(LocalPeer):
    """Serves every object with one byte changed."""

    def get_object(self, object_id: str) -> bytes:
        data = bytearray(super().get_object(object_id))
        data[len(data) // 2] ^= 0xFF
        return bytes(data)


def test_sync_with_a_peer_that_serves_corrupt_pieces(alice, fast_tmp):
    b = join(fast_tmp / "b2", alice.genesis_bytes(), "b2")
    root, ops = b.state_root(), b.op_ids()
    with pytest.raises(HashMismatch):
        pull(b, LyingPeer(alice))
    assert (b.state_root(), b.op_ids(), b.store.object_ids()) == (root, ops, [])
    assert list((b.path / "tmp").iterdir()) == []
    sync(b, LocalPeer(alice))  # an honest peer: everything arrives
    assert b.state_root() == alice.state_root()
    b.close()


def test_op_whose_objects_are_absent(alice, bob):
    manifest = put_model(bob, 3)
    op = opmod.sign(contribution(bob, manifest), bob.key)
    err = refused(alice, op.data, IncompleteOp)
    assert err.code == "incomplete_op" and err.missing == [manifest]
    alice.store.put(bob.store.get(manifest))  # the manifest but none of its pieces
    pieces = sorted(set(bob.closure([manifest])) - {manifest} - set(alice.store.object_ids()))
    err = refused(alice, op.data, IncompleteOp)
    assert sorted(err.missing) == pieces
    for piece in pieces:
        alice.store.put(bob.store.get(piece))
    assert alice.apply(op.data) == op.id
    with pytest.raises(IncompleteOp):  # authoring checks the same
        bob.contribute(digest(b"a manifest nobody has"))


# -- projects -------------------------------------------------------------------------------


def test_another_projects_ops_and_replicas(alice, fast_tmp):
    other = new_project(fast_tmp / "other", seed="another project")
    put_model(other, 1)  # the same pieces: only the project differs
    other.contribute(put_model(other, 1))
    for data in (other.genesis_bytes(), *(op.data for op in other.ops().values())):
        err = refused(alice, data, WrongProject)
        assert err.code == "wrong_project" and (err.expected, err.actual) == (
            alice.genesis_id, other.genesis_id)
    before_a, before_o = snapshot(alice), snapshot(other)
    for direction in (sync, pull, push):
        with pytest.raises(WrongProject):
            direction(alice, LocalPeer(other))
        with pytest.raises(WrongProject):
            direction(other, LocalPeer(alice))
    assert (snapshot(alice), snapshot(other)) == (before_a, before_o)
    other.close()


# -- ids ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "abc", "A" * 64, "g" * 64, "0" * 63, "0" * 65,
                                 "../" + "0" * 61, "0" * 63 + "\n", 12])
def test_bad_ids(alice, bad):
    before = snapshot(alice)
    calls = [
        lambda: alice.store.get(bad),
        lambda: alice.store.put_stream(bad, [b"x"]),
        lambda: alice.store.put(b"x", expected=bad),
        lambda: alice.store.files.path(bad),
        lambda: LocalPeer(alice).get_object(bad),
        lambda: alice.contribute(bad),
        lambda: alice.contribute(alice.op_ids()[0], base=bad),
        lambda: alice.retract([bad]),
        lambda: alice.set_recipe("linear", anchor=bad),
    ]
    for call in calls:
        with pytest.raises(BadId) as info:
            call()
        assert info.value.code == "bad_id"
    assert snapshot(alice) == before
