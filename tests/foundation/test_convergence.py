"""Convergence as properties over real replica directories: the same ops, delivered in any
order, any number of times, through any sequence of pairwise syncs (some of them cut off
half way), retracts before their targets included, give every replica the same state root,
the root of the union."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from crdt_merge import maintenance
from crdt_merge.crdt import ops as opmod
from crdt_merge.crdt.ops import Op
from crdt_merge.errors import PeerError
from crdt_merge.replica import Replica
from crdt_merge.sync import LocalPeer, pull, push, sync

from .helpers import expected_root, join, same_view, scratch
from .pool import Pool, make_pool

POOL = make_pool()
OPS = list(POOL.ops.values())
NAMES = sorted(POOL.names)  # strategies draw names: an Op's repr is a kilobyte


def op(name: str) -> Op:
    return POOL.ops[POOL.names[name]]

# Each example builds several replica directories; shrinking a failure would take minutes, so
# a failure is reported as generated (Hypothesis prints it, and the seed to replay it).
NO_SHRINK = [Phase.explicit, Phase.reuse, Phase.generate]


class FlakyPeer(LocalPeer):
    """A peer whose connection drops after ``budget`` object transfers."""

    def __init__(self, replica: Replica, budget: int) -> None:
        super().__init__(replica)
        self.budget = budget

    def _spend(self) -> None:
        if self.budget <= 0:
            raise PeerError("connection dropped")
        self.budget -= 1

    def get_object(self, object_id: str) -> bytes:
        self._spend()
        return super().get_object(object_id)

    def put_object(self, object_id: str, data: bytes) -> None:
        self._spend()
        super().put_object(object_id, data)

    def put_ops(self, ops: Sequence[bytes]) -> list[str]:
        self._spend()
        return super().put_ops(ops)


def deliver(replica: Replica, pool: Pool, given: Op, *, with_objects: bool, commit: bool) -> None:
    """Hand an op to ``replica`` as its author's replica would have it."""
    if with_objects:
        for object_id in pool.needs(given):
            replica.store.put(pool.objects[object_id], expected=object_id)
    replica.stage(given.data)
    if commit:
        replica.commit_staged()


def check_root(replica: Replica) -> None:
    ids = replica.op_ids()
    assert replica.state_root() == expected_root(ids)
    assert maintenance.fsck(replica)["ok"]


@st.composite
def origins(draw: Any, n: int) -> list[list[tuple[str, bool, bool]]]:
    """For each of ``n`` replicas, the ops it starts with: a subset of the pool in any order
    with repeats, each with (objects given?, commit right away?). A contribution's objects
    may be withheld only where its own site's retract is also given."""
    given_to: list[set[str]] = [set() for _ in range(n)]
    for name in NAMES:
        for i in draw(st.sets(st.integers(0, n - 1), max_size=n)):
            given_to[i].add(name)
    # an op arrives with its causal past (deps and membership op), as every replica that
    # authored or committed it holds that past: staged ops never travel, so an op whose
    # past is staged elsewhere could otherwise wait for ever (a state no history makes)
    by_id = {op_id: name for name, op_id in POOL.names.items()}
    for mine in given_to:
        todo = list(mine)
        while todo:
            for ref in opmod.references(op(todo.pop())):
                if ref in by_id and by_id[ref] not in mine:
                    mine.add(by_id[ref])
                    todo.append(by_id[ref])
    out = []
    for mine in given_to:
        order = draw(st.permutations(sorted(mine)))
        order += draw(st.lists(st.sampled_from(sorted(mine)), max_size=3)) if mine else []
        held = {POOL.names[name] for name in mine}
        seq = []
        for name in order:
            retracted_here = any(r in held for r in POOL.effective_retracts(op(name)))
            with_objects = not retracted_here or draw(st.booleans())
            seq.append((name, with_objects, draw(st.booleans())))
        out.append(seq)
    return out


steps = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3),
                           st.sampled_from(["sync", "pull", "push", "flaky"]),
                           st.integers(0, 12)), max_size=10)


@settings(deadline=None, max_examples=40, phases=NO_SHRINK)
@given(st.integers(3, 4).flatmap(lambda n: st.tuples(st.just(n), origins(n))), steps)
def test_any_deliveries_and_syncs_converge(setup, plan):
    n, starts = setup
    with scratch() as tmp:
        replicas = [join(Path(tmp) / f"r{i}", POOL.genesis.data, f"r{i}") for i in range(n)]
        try:
            for r, seq in zip(replicas, starts, strict=True):
                for name, with_objects, commit in seq:
                    deliver(r, POOL, op(name), with_objects=with_objects, commit=commit)
                r.commit_staged()
                check_root(r)
            held = [set(r.op_ids()) for r in replicas]
            for i, j, how, budget in plan:
                a, b = replicas[i % n], replicas[j % n]
                if a is b:
                    continue
                if how == "sync":
                    sync(a, LocalPeer(b))
                elif how == "pull":
                    pull(a, LocalPeer(b))
                elif how == "push":
                    push(a, LocalPeer(b))
                else:
                    try:
                        sync(a, FlakyPeer(b, budget))
                    except PeerError:
                        pass
                check_root(a)
                check_root(b)
                now = [set(r.op_ids()) for r in replicas]
                assert all(old <= new for old, new in zip(held, now, strict=True))  # only grows
                held = now
            # anti-entropy: sync along the line and back, which reaches a fixpoint
            for _ in range(2):
                for a, b in zip(replicas, replicas[1:], strict=False):
                    sync(a, LocalPeer(b))
                for a, b in zip(replicas[::-1], replicas[-2::-1], strict=False):
                    sync(a, LocalPeer(b))
            delivered = {POOL.names[name] for seq in starts for name, _, _ in seq}
            with_objects = {POOL.names[name] for seq in starts for name, given, _ in seq if given}
            want = POOL.committable(delivered, with_objects)
            for r in replicas:
                assert set(r.op_ids()) == want
                assert r.state_root() == expected_root(want)
                check_root(r)
            same_view(replicas)
            again = sync(replicas[0], LocalPeer(replicas[-1]))
            assert (again.ops_received, again.ops_sent, again.objects_received,
                    again.objects_sent) == (0, 0, 0, 0)
        finally:
            for r in replicas:
                r.close()


def fresh(tmp: Path, name: str, state: set[str]) -> Replica:
    """A replica whose state is exactly the ops ``state`` (no op left waiting)."""
    r = join(tmp / name, POOL.genesis.data, name)
    for op_id in sorted(state - {POOL.genesis.id}):
        deliver(r, POOL, POOL.ops[op_id], with_objects=True, commit=False)
    r.commit_staged()
    assert set(r.op_ids()) == state and r.store.staged_rows() == []
    return r


def state_of(names: list[str]) -> set[str]:
    """The ops of ``names`` that can be a replica's state (their membership chain is there)."""
    return POOL.committable({POOL.names[n] for n in names})


subsets = st.lists(st.sampled_from(NAMES), max_size=len(NAMES)).map(state_of)


@settings(deadline=None, max_examples=20, phases=NO_SHRINK)
@given(subsets, subsets, subsets)
def test_sync_is_a_commutative_associative_idempotent_union(x, y, z):
    """Sync as the merge of two replicas' states (sets of committed ops): the laws of set
    union, measured by state roots. (Ops left waiting are the convergence test's business.)"""
    with scratch() as tmp_name:
        tmp = Path(tmp_name)
        a, b = fresh(tmp, "a", x), fresh(tmp, "b", y)
        sync(a, LocalPeer(b))                                  # a := a ⊔ b, b := b ⊔ a
        assert a.state_root() == b.state_root() == expected_root(x | y)
        b2, a2 = fresh(tmp, "b2", y), fresh(tmp, "a2", x)
        sync(b2, LocalPeer(a2))                                # commutative
        assert b2.state_root() == a2.state_root() == a.state_root()
        c = fresh(tmp, "c", z)
        sync(c, LocalPeer(a))                                  # (x ⊔ y) ⊔ z
        b3, c3, a3 = fresh(tmp, "b3", y), fresh(tmp, "c3", z), fresh(tmp, "a3", x)
        sync(b3, LocalPeer(c3))
        sync(a3, LocalPeer(b3))                                # x ⊔ (y ⊔ z): associative
        assert c.state_root() == a3.state_root() == expected_root(x | y | z)
        before = a3.state_root()
        stats = sync(a3, LocalPeer(c))                         # x ⊔ x = x: idempotent
        assert a3.state_root() == c.state_root() == before
        assert (stats.ops_received, stats.ops_sent, stats.objects_received,
                stats.objects_sent) == (0, 0, 0, 0)
        for r in (a, b, b2, a2, c, b3, c3, a3):
            r.close()


@settings(deadline=None, max_examples=25, phases=NO_SHRINK)
@given(st.permutations(NAMES), st.lists(st.sampled_from(NAMES), max_size=6), st.booleans())
def test_one_replica_any_arrival_order(order, repeats, objects_first):
    """Ops handed to one replica one at a time, retracts before their targets and ops before
    their membership ops included: the root is always that of the ops committed, and in
    the end that of the whole pool."""
    with scratch() as tmp:
        r = join(Path(tmp) / "r", POOL.genesis.data, "r")
        try:
            if objects_first:
                for object_id, data in sorted(POOL.objects.items()):
                    r.store.put(data, expected=object_id)
            for name in list(order) + repeats:
                deliver(r, POOL, op(name), with_objects=not objects_first, commit=True)
                assert r.state_root() == expected_root(r.op_ids())
            assert set(r.op_ids()) == {POOL.genesis.id, *POOL.ops}
            assert r.state_root() == expected_root([POOL.genesis.id, *POOL.ops])
            assert r.store.staged_rows() == []
        finally:
            r.close()
