"""The sync protocol, independent of transport.

A transport implements :class:`Peer` (another replica directory, an HTTP server, a
simulated network); :func:`pull` and :func:`push` drive one direction each and
:func:`sync` runs both. The decisions (what to fetch, in what order, what to send) are pure
functions of id sets, so a deterministic simulation can drive them with its own network.

Pull, in order: compare states (one call when in sync); fetch the ops the peer has and we
lack, stage them; fetch the manifests they name, then the pieces those manifests name that
we lack; commit the staged ops last. Each missing object crosses the wire once; nothing
the receiver holds is sent. Push is the mirror image: objects the peer lacks first, ops
after, so the peer can commit them at once.

A transport subclasses :class:`Peer` and may override its optional capabilities; the
drivers always call them (the base class has plain defaults): a conditional state query
(an in-sync check is one round trip), range-based reconciliation of the op ids
(:mod:`crdt_merge.sync.reconcile`) instead of the whole id list, and parallel, resumable
object transfers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from crdt_merge import testpoints
from crdt_merge.crdt import ops as opmod
from crdt_merge.crdt import opset
from crdt_merge.crdt.ops import Op
from crdt_merge.errors import PeerError, WrongProject
from crdt_merge.replica import Replica
from crdt_merge.store.local import LocalStore
from crdt_merge.sync import reconcile


@dataclass(frozen=True)
class PeerState:
    genesis: str
    state_root: str
    ops: int


class Peer:
    """What the protocol needs from the other side: a transport subclasses this and
    implements the seven calls; the optional capabilities have plain defaults here, which
    a transport overrides when it can do better (``HttpPeer``):

    - ``state_unless(root)``: the peer's state, or None when its state root is ``root``
      (over HTTP one conditional request).
    - ``reconciles`` / ``reconcile(message)``: range-based reconciliation of the op ids
      instead of the whole id list.
    - ``fetch_objects(store, ids, progress, limits)``: fetch ``ids`` into ``store``
      (verified, each cut off past ``limits[id]`` bytes); returns (objects, bytes).
    - ``put_objects(store, ids, progress)``: send ``ids`` from ``store``; (objects, bytes).

    A peer is a context manager; :meth:`close` releases what it holds (connections).
    """

    #: True when :meth:`reconcile` answers reconciliation messages
    reconciles = False
    #: what ops pulled from this peer are staged as coming from (fair eviction,
    #: :class:`~crdt_merge.store.local.StagingLimits`)
    source = "pull"

    def state(self) -> PeerState:
        raise NotImplementedError

    def op_ids(self) -> list[str]:
        raise NotImplementedError

    def get_ops(self, ids: Sequence[str]) -> list[bytes]:
        raise NotImplementedError

    def missing(self, ids: Sequence[str]) -> set[str]:
        raise NotImplementedError

    def get_object(self, object_id: str) -> bytes:
        raise NotImplementedError

    def put_object(self, object_id: str, data: bytes) -> None:
        raise NotImplementedError

    def put_ops(self, ops: Sequence[bytes]) -> list[str]:
        raise NotImplementedError

    # -- optional capabilities, with their plain defaults ---------------------------------

    def state_unless(self, root: str) -> PeerState | None:
        state = self.state()
        return None if state.state_root == root else state

    def reconcile(self, message: bytes) -> bytes:
        raise NotImplementedError(f"{type(self).__name__} does not reconcile")

    def fetch_objects(self, store: LocalStore, ids: Sequence[str],
                      progress: Callable[[int, int], None],
                      limits: Mapping[str, int] | None = None) -> tuple[int, int]:
        nbytes = 0
        for i, object_id in enumerate(ids):
            data = self.get_object(object_id)
            limit = (limits or {}).get(object_id)
            if limit is not None and len(data) > limit:
                raise PeerError(f"the peer sent {len(data)} bytes for object {object_id}, "
                                f"more than the {limit} it can have")
            store.put(data, expected=object_id)  # verified: HashMismatch if not
            nbytes += len(data)
            progress(i + 1, len(ids))
        return len(ids), nbytes

    def put_objects(self, store: LocalStore, ids: Sequence[str],
                    progress: Callable[[int, int], None]) -> tuple[int, int]:
        nbytes = 0
        for i, object_id in enumerate(ids):
            data = store.get(object_id)
            self.put_object(object_id, data)
            nbytes += len(data)
            progress(i + 1, len(ids))
        return len(ids), nbytes

    def close(self) -> None:
        """Release what this peer holds (nothing by default)."""

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class SyncStats:
    """What one sync moved, per direction."""

    ops_received: int = 0
    ops_sent: int = 0
    objects_received: int = 0
    objects_sent: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    rejected: dict[str, str] = field(default_factory=dict)
    waiting: list[str] = field(default_factory=list)

    def add(self, other: SyncStats) -> SyncStats:
        return SyncStats(
            self.ops_received + other.ops_received, self.ops_sent + other.ops_sent,
            self.objects_received + other.objects_received,
            self.objects_sent + other.objects_sent,
            self.bytes_received + other.bytes_received, self.bytes_sent + other.bytes_sent,
            {**self.rejected, **other.rejected}, sorted(set(self.waiting) | set(other.waiting)),
        )


Progress = Callable[[str, int, int], None]


def _quiet(stage: str, done: int, total: int) -> None:
    pass


# -- pure decisions ----------------------------------------------------------------------------


def ops_to_fetch(local: Iterable[str], staged: Iterable[str], remote: Iterable[str]) -> list[str]:
    """Op ids the peer holds that we neither hold nor have staged, sorted."""
    return sorted(set(remote) - set(local) - set(staged))


def manifests_needed(ops: Iterable[Op], held_ops: Iterable[Op]) -> list[str]:
    """Manifest ids that ``ops`` reference, skipping contributions a binding retract by their
    own member names (:func:`opset.self_retracted`: never live again, accepted without
    their objects). ``ops`` must be verified: committed ops,
    or staged ops that verify (:meth:`Replica.pending`); only they and ``held_ops`` decide,
    a staged op nobody could verify skips nothing. A retract has its target in its causal
    past, so it is never held before it: a retract verified together with it counts."""
    ops = list(ops)
    retracted = opset.self_retracted(list(held_ops) + ops)
    out: dict[str, None] = {}
    for op in ops:
        if op.id in retracted:
            continue
        out.update(dict.fromkeys(op.objects()))
    return sorted(out)


def ops_to_send(local: Iterable[str], remote: Iterable[str]) -> list[str]:
    return sorted(set(local) - set(remote))


# -- drivers ---------------------------------------------------------------------------------


def _state(replica: Replica, peer: Peer) -> PeerState:
    """The peer's state; one conditional request when the transport offers it.

    Raises:
        WrongProject: the peer replicates another project.
    """
    state = peer.state_unless(replica.state_root())
    if state is None:  # same state root, hence the same genesis and op set
        return PeerState(replica.genesis_id, replica.state_root(), len(replica.ops()))
    if state.genesis != replica.genesis_id:
        raise WrongProject(replica.genesis_id, state.genesis)
    return state


class _Difference:
    """The op ids only the peer holds and only we hold, computed once, when first needed
    (before the pull changes our set)."""

    def __init__(self, replica: Replica, peer: Peer) -> None:
        self._replica, self._peer = replica, peer
        self._value: tuple[list[str], list[str]] | None = None

    def get(self) -> tuple[list[str], list[str]]:
        if self._value is None:
            local = self._replica.op_ids()
            if not self._peer.reconciles:
                remote = self._peer.op_ids()
                self._value = (ops_to_send(remote, local), ops_to_send(local, remote))
            else:
                outcome = reconcile.run(local, self._peer.reconcile)
                self._value = (outcome.remote_only, outcome.local_only)
        return self._value


#: the most bytes a download of an object whose size no held manifest declares (a manifest,
#: a lost object) may take; a piece may take exactly what its manifest declares
MAX_OBJECT_BYTES = 64 << 20


def _fetch_objects(replica: Replica, peer: Peer, ids: Sequence[str], stats: SyncStats,
                   progress: Progress, stage: str,
                   sizes: Mapping[str, int] | None = None) -> None:
    """Fetch the objects of ``ids`` that we lack and the peer holds. Ops staged earlier may
    name objects this peer never had (they came from another peer, and that transfer was
    cut off): those are left for a peer that has them, not asked for. A download stops
    past ``sizes[id]`` bytes (or :data:`MAX_OBJECT_BYTES`)."""
    wanted = sorted(replica.store.missing(ids))
    if wanted:
        lacking = peer.missing(wanted)
        wanted = [o for o in wanted if o not in lacking]
    if wanted:
        limits = {o: (sizes or {}).get(o, MAX_OBJECT_BYTES) for o in wanted}
        def fetched(done: int, total: int) -> None:
            progress(stage, done, total)
            if done < total:
                testpoints.pause(f"sync.{stage}")

        count, nbytes = peer.fetch_objects(replica.store, wanted, fetched, limits)
        stats.objects_received += count
        stats.bytes_received += nbytes


def pull(replica: Replica, peer: Peer, progress: Progress = _quiet) -> SyncStats:
    """Bring into ``replica`` every op ``peer`` holds, with the objects they need."""
    return _pull(replica, peer, _state(replica, peer), _Difference(replica, peer), progress)


def _pull(replica: Replica, peer: Peer, state: PeerState, difference: _Difference,
          progress: Progress) -> SyncStats:
    stats = SyncStats()
    lost = replica.wanted_objects()
    if lost:  # objects quarantined here: fetch again what the peer has
        _fetch_objects(replica, peer, lost, stats, progress, "repair")
    if state.state_root == replica.state_root() and not replica.pending():
        return stats
    staged = replica.staged_ids()
    want = ops_to_fetch(replica.ops(), staged, difference.get()[0])
    if want:
        received = peer.get_ops(want)
        got = {opmod.decode(data).id for data in received}
        if got != set(want):
            raise PeerError(f"peer sent {len(got)} of the {len(want)} ops asked for")
        # committed first, so that what decides the fetches below is verified: the
        # membership ops, retracts and complete ops among them join the set now
        replica.receive(received, source=peer.source)
        stats.ops_received += len(received)
    # only ops that verify decide which objects to fetch (a relay's junk decides nothing)
    manifest_ids = manifests_needed(replica.pending(), replica.ops().values())
    _fetch_objects(replica, peer, manifest_ids, stats, progress, "manifests")
    held_manifests = [m for m in manifest_ids if replica.store.has(m)]
    _fetch_objects(replica, peer, replica.closure(held_manifests), stats, progress, "pieces",
                   replica.object_sizes(held_manifests))
    report = replica.commit_staged()
    stats.rejected = {k: f"{v.code}: {v.detail}" for k, v in report.rejected.items()}
    stats.waiting = report.waiting
    return stats


def push(replica: Replica, peer: Peer, progress: Progress = _quiet) -> SyncStats:
    """Send ``peer`` every op ``replica`` holds that it lacks: objects first, then ops."""
    return _push(replica, peer, _state(replica, peer), _Difference(replica, peer), progress)


def _push(replica: Replica, peer: Peer, state: PeerState, difference: _Difference,
          progress: Progress) -> SyncStats:
    stats = SyncStats()
    if state.state_root == replica.state_root():
        return stats
    ops = replica.ops()
    send = [ops[i] for i in difference.get()[1] if i in ops]
    if not send:
        return stats
    manifest_ids = [m for m in manifests_needed(send, ops.values()) if replica.store.has(m)]
    objects = [o for o in replica.closure(manifest_ids) if replica.store.has(o)]
    lacking = peer.missing(objects)
    order = [o for o in objects if o in lacking]
    if order:
        count, nbytes = peer.put_objects(replica.store, order,
                                         lambda done, total: progress("upload", done, total))
        stats.objects_sent += count
        stats.bytes_sent += nbytes
    peer.put_ops([op.data for op in opset.commit_order(send)])
    stats.ops_sent = len(send)
    return stats


def sync(replica: Replica, peer: Peer, progress: Progress = _quiet) -> SyncStats:
    """Pull then push: afterwards both sides hold the union of their ops. The peer's state
    is asked once and the op ids are compared once, for both directions.

    One round is not always enough: ops we push can let the peer commit ops it had staged
    (waiting for a membership op or for objects), and ops we pull can do the same here.
    So while the two roots differ, another round runs, as long as the last one changed
    either root: op sets only grow, so this ends.
    """
    state = _state(replica, peer)
    stats = SyncStats()
    while True:
        before = (replica.state_root(), state.state_root)
        difference = _Difference(replica, peer)
        stats = stats.add(_pull(replica, peer, state, difference, progress))
        stats = stats.add(_push(replica, peer, state, difference, progress))
        if not (stats.ops_received or stats.ops_sent):
            return stats  # nothing moved: the common case costs no extra round trip
        state = _state(replica, peer)
        if state.state_root == replica.state_root() or before == (replica.state_root(),
                                                                  state.state_root):
            return stats
