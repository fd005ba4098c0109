"""Filesystem sync: each missing object crosses once and a second sync moves nothing; a
retracted contribution's objects are not sent; gc deletes only what effectively retracted
contributions alone reference; fsck quarantines a flipped byte and the next sync repairs it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from crdt_merge import maintenance
from crdt_merge.errors import PeerError
from crdt_merge.replica import Replica
from crdt_merge.sync import LocalPeer, SyncStats, pull, push, sync

from .helpers import check_invariants, join, model_objects, new_project, put_model, same_view
from .pool import make_pool


class CountingPeer(LocalPeer):
    """Records every object id it serves or receives."""

    def __init__(self, replica: Replica) -> None:
        super().__init__(replica)
        self.served: Counter[str] = Counter()
        self.received: Counter[str] = Counter()

    def get_object(self, object_id: str) -> bytes:
        self.served[object_id] += 1
        return super().get_object(object_id)

    def put_object(self, object_id: str, data: bytes) -> None:
        self.received[object_id] += 1
        super().put_object(object_id, data)


def moved(stats: SyncStats) -> tuple[int, int, int, int]:
    return stats.ops_received, stats.ops_sent, stats.objects_received, stats.objects_sent


@pytest.fixture
def alice(fast_tmp):
    with new_project(fast_tmp / "a") as a:
        yield a


def replica(fast_tmp: Path, alice: Replica, site: str, admit: bool = True) -> Replica:
    r = join(fast_tmp / site, alice.genesis_bytes(), site)
    if admit:
        alice.admit(site, r.public_key)
    return r


# -- each object once --------------------------------------------------------------------------


def test_each_missing_object_moves_once_and_a_second_sync_moves_nothing(alice, fast_tmp):
    m1, m2 = put_model(alice, 1), put_model(alice, 2)  # share the "embed" and zero pieces
    alice.contribute(m1)
    alice.contribute(m2)
    alice.set_recipe("linear", anchor=m1)
    bob = replica(fast_tmp, alice, "bob")
    needed = model_objects(alice, m1) | model_objects(alice, m2)
    peer = CountingPeer(alice)
    stats = sync(bob, peer)
    assert set(peer.served) == needed and set(peer.served.values()) == {1}
    assert stats.objects_received == peer.objects_served == len(needed)
    assert stats.bytes_received == sum(len(alice.store.get(o)) for o in needed)
    assert bob.state_root() == alice.state_root()
    again = sync(bob, peer)
    assert moved(again) == (0, 0, 0, 0) and peer.objects_served == len(needed)
    assert moved(sync(bob, LocalPeer(alice))) == (0, 0, 0, 0)

    # bob's model shares pieces with alice's: only the new ones travel back, once each
    m3 = put_model(bob, 3)
    bob.contribute(m3)
    back = CountingPeer(alice)
    stats = sync(bob, back)
    new = model_objects(bob, m3) - needed
    assert set(back.received) == new and set(back.received.values()) == {1}
    assert stats.objects_sent == len(new) and stats.objects_received == 0
    assert alice.state_root() == bob.state_root()
    assert moved(sync(alice, LocalPeer(bob))) == (0, 0, 0, 0)
    check_invariants(bob.path)


def test_objects_the_receiver_already_has_do_not_move(alice, fast_tmp):
    m1 = put_model(alice, 1)
    alice.contribute(m1)
    carol = replica(fast_tmp, alice, "carol")
    put_model(carol, 1)  # the same model, stored but not contributed
    peer = CountingPeer(alice)
    sync(carol, peer)
    assert peer.served == Counter() and carol.state_root() == alice.state_root()


def test_each_object_moves_once_per_hop_along_a_chain(alice, fast_tmp):
    for seed in (1, 2):
        alice.contribute(put_model(alice, seed))
    b, c = replica(fast_tmp, alice, "b"), replica(fast_tmp, alice, "c")
    total = len(set(alice.store.object_ids()))
    for src, dst in ((alice, b), (b, c)):
        peer = CountingPeer(src)
        pull(dst, peer)
        assert sum(peer.served.values()) == len(peer.served) == total
    assert moved(sync(c, LocalPeer(alice))) == (0, 0, 0, 0)
    same_view([alice, b, c])


# -- retracted contributions -------------------------------------------------------------------


def test_a_retracted_contributions_objects_are_not_sent(alice, fast_tmp):
    keep, gone = put_model(alice, 1), put_model(alice, 9, shared=False)
    alice.contribute(keep)
    doomed = alice.contribute(gone)
    retract = alice.retract([doomed.id])
    only_gone = model_objects(alice, gone) - model_objects(alice, keep)

    # a replica that has the retract staged before the contribution ever arrives (it waits
    # for its deps: the contribution is in its causal past)
    bob = replica(fast_tmp, alice, "bob", admit=False)
    bob.stage(retract.data)
    peer = CountingPeer(alice)
    sync(bob, peer)
    assert not set(peer.served) & only_gone
    assert doomed.id in bob.ops() and bob.state_root() == alice.state_root()
    assert maintenance.fsck(bob)["ok"]

    # a replica that receives the retract in the same sync, by pull and by push
    for how in (pull, push):
        r = replica(fast_tmp, alice, f"r-{how.__name__}", admit=False)
        peer = CountingPeer(alice) if how is pull else CountingPeer(r)
        if how is pull:
            pull(r, peer)
            sent = set(peer.served)
        else:
            push(alice, peer)
            sent = set(peer.received)
        assert not sent & only_gone and sent
        assert r.state_root() == alice.state_root() and maintenance.fsck(r)["ok"]


def test_a_retract_by_another_site_does_not_stop_the_objects(alice, fast_tmp):
    bob = replica(fast_tmp, alice, "bob")
    sync(bob, LocalPeer(alice))
    m = put_model(alice, 9, shared=False)
    target = alice.contribute(m)
    sync(bob, LocalPeer(alice))
    bob.retract([target.id])  # has no effect: bob did not make it
    carol = replica(fast_tmp, alice, "carol")
    peer = CountingPeer(bob)
    sync(carol, peer)
    assert model_objects(alice, m) <= set(peer.served)
    assert [o.id for o in carol.ops().values() if o.kind == "contribute"] == [target.id]
    assert maintenance.status(carol)["contributions"][0]["live"]


# -- gc -----------------------------------------------------------------------------------------


def test_gc_deletes_only_what_effectively_retracted_contributions_alone_reference(alice, fast_tmp):
    bob = replica(fast_tmp, alice, "bob")
    sync(bob, LocalPeer(alice))
    m1, m2, m3, m4, m5 = (put_model(alice, s) for s in (1, 2, 3, 4, 5))
    c1 = alice.contribute(m1)
    c2 = alice.contribute(m2)
    c3 = alice.contribute(m3)
    alice.contribute(m4, form="delta", base=m5)
    alice.set_recipe("linear", anchor=m3)
    sync(bob, LocalPeer(alice))
    c6 = bob.contribute(put_model(bob, 6))
    bob.retract([c1.id])                     # no effect: alice made c1
    sync(alice, LocalPeer(bob))
    alice.retract([c2.id, c3.id])            # effective; m3 is still the recipe's anchor
    before = maintenance.status(alice)

    objects = {m: model_objects(alice, m) for m in (m1, m2, m3, m4, m5)}
    kept = set().union(objects[m1], objects[m3], objects[m4], objects[m5],
                       model_objects(alice, c6.body["manifest"]))
    assert maintenance.gc(alice)["deleted"] == len(objects[m2] - kept)
    held = set(alice.store.object_ids())
    assert held == kept and not (objects[m2] - kept) & held
    assert not any((alice.path / "objects" / o[:2] / o).exists() for o in objects[m2] - kept)
    assert maintenance.gc(alice)["deleted"] == 0
    after = maintenance.status(alice)
    assert after == before and maintenance.fsck(alice)["ok"]
    check_invariants(alice.path)

    # a new replica syncs from the collected one without needing what was deleted
    carol = replica(fast_tmp, alice, "carol")
    sync(carol, LocalPeer(alice))
    assert carol.state_root() == alice.state_root() and maintenance.fsck(carol)["ok"]
    assert not set(carol.store.object_ids()) & (objects[m2] - kept)
    sync(bob, LocalPeer(alice))  # bob still holds m2's objects; carol never needs them
    peer = CountingPeer(bob)
    assert moved(sync(carol, peer)) == (0, 0, 0, 0) and not peer.served


# -- fsck and repair ---------------------------------------------------------------------------


def flip_a_byte(r: Replica, object_id: str) -> None:
    path = r.store.files.path(object_id)
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("which", ["piece", "manifest"])
def test_fsck_finds_a_flipped_byte_and_the_next_sync_fetches_it_again(alice, fast_tmp, which):
    m = put_model(alice, 1)
    op = alice.contribute(m)
    bob = replica(fast_tmp, alice, "bob")
    sync(bob, LocalPeer(alice))
    victim = m if which == "manifest" else sorted(model_objects(bob, m) - {m})[0]
    flip_a_byte(bob, victim)

    report = maintenance.fsck(bob)
    assert report["corrupt"] == [victim] and not report["ok"]
    assert report["wanted"] == [victim] and report["incomplete_ops"] == [op.id]
    assert not bob.store.has(victim) and not bob.store.files.exists(victim)
    assert [p.name.split(".")[0] for p in (bob.path / "quarantine").iterdir()] == [victim]

    peer = CountingPeer(alice)
    stats = sync(bob, peer)
    assert peer.served == Counter({victim: 1}) and stats.objects_received == 1
    assert maintenance.fsck(bob)["ok"] and bob.store.index.wanted() == []
    assert bob.store.get(victim) == alice.store.get(victim)
    assert moved(sync(bob, LocalPeer(alice))) == (0, 0, 0, 0)


def test_fsck_reports_a_deleted_object_file(alice):
    m = put_model(alice, 1)
    alice.contribute(m)
    alice.store.files.path(m).unlink()
    report = maintenance.fsck(alice)
    assert m in report["corrupt"] and not report["ok"] and report["wanted"] == [m]


# -- syncs cut off, and ops that wait ---------------------------------------------------------


class DroppingPeer(LocalPeer):
    """A peer whose connection drops after ``budget`` objects."""

    def __init__(self, replica: Replica, budget: int) -> None:
        super().__init__(replica)
        self.budget = budget

    def get_object(self, object_id: str) -> bytes:
        if self.budget <= 0:
            raise PeerError("connection dropped")
        self.budget -= 1
        return super().get_object(object_id)


def test_after_a_cut_off_pull_other_peers_still_sync(alice, fast_tmp):
    alice.contribute(put_model(alice, 1))
    bob, carol = replica(fast_tmp, alice, "bob"), replica(fast_tmp, alice, "carol")
    sync(carol, LocalPeer(alice))
    alice.contribute(put_model(alice, 2))
    with pytest.raises(PeerError):
        pull(bob, DroppingPeer(alice, 2))
    assert bob.store.staged_rows()  # staged, waiting for objects only alice has
    sync(bob, LocalPeer(carol))        # carol lacks those objects: not asked for them
    assert bob.state_root() == carol.state_root() != alice.state_root()
    sync(bob, LocalPeer(alice))
    assert bob.state_root() == alice.state_root() and bob.store.staged_rows() == []


def test_one_sync_brings_both_sides_to_the_union(fast_tmp):
    """Ops pushed to the peer can let it commit ops it had staged; sync carries those back
    in the same call, so both sides end with one root."""
    pool = make_pool()
    admit, c2 = pool.ops[pool.names["admit bob"]], pool.ops[pool.names["c2 bob m2 delta"]]
    x = join(fast_tmp / "x", pool.genesis.data, "x")
    y = join(fast_tmp / "y", pool.genesis.data, "y")
    x.apply(admit.data)
    for object_id in pool.needs(c2):
        y.store.put(pool.objects[object_id])
    y.stage(c2.data)
    assert y.commit_staged().waiting == [c2.id]  # bob's admission is not held here yet
    sync(x, LocalPeer(y))
    assert x.state_root() == y.state_root() and c2.id in x.ops()
    assert moved(sync(x, LocalPeer(y))) == (0, 0, 0, 0)


def test_sync_stats_add_up(alice, fast_tmp):
    alice.contribute(put_model(alice, 1))
    bob = replica(fast_tmp, alice, "bob")
    bob_model = put_model(bob, 2)
    sync(bob, LocalPeer(alice))  # bob's admission arrives
    bob.contribute(bob_model)
    stats = sync(bob, LocalPeer(alice))
    assert stats.ops_sent == 1 and stats.ops_received == 0 and not stats.rejected


def test_gc_keeps_pieces_when_a_live_contributions_manifest_is_lost(alice, fast_tmp):
    """While a live op's manifest is quarantined, gc cannot know which pieces it needs, so
    it deletes none of them; the next sync restores the manifest and nothing is missing."""
    bob = replica(fast_tmp, alice, "bob")
    m1, m2 = put_model(alice, 1), put_model(alice, 2)  # they share pieces
    alice.contribute(m1)
    doomed = alice.contribute(m2)
    sync(bob, LocalPeer(alice))
    alice.retract([doomed.id])
    flip_a_byte(alice, m1)
    assert maintenance.fsck(alice)["corrupt"] == [m1]
    shared = model_objects(bob, m1) & model_objects(bob, m2)
    assert shared and maintenance.gc(alice)["deleted"] == 0
    assert shared - {m1} <= set(alice.store.object_ids())
    sync(alice, LocalPeer(bob))
    assert maintenance.fsck(alice)["ok"]
    assert maintenance.gc(alice)["deleted"] == len(model_objects(bob, m2) - model_objects(bob, m1))
    assert maintenance.fsck(alice)["ok"]
