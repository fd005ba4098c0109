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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from crdt_merge.crdt import opset
from crdt_merge.crdt.ops import Op
from crdt_merge.errors import PeerError, WrongProject
from crdt_merge.replica import Replica


@dataclass(frozen=True)
class PeerState:
    genesis: str
    state_root: str
    ops: int


class Peer(Protocol):
    """What the protocol needs from the other side."""

    def state(self) -> PeerState: ...
    def op_ids(self) -> list[str]: ...
    def get_ops(self, ids: Sequence[str]) -> list[bytes]: ...
    def missing(self, ids: Sequence[str]) -> set[str]: ...
    def get_object(self, object_id: str) -> bytes: ...
    def put_object(self, object_id: str, data: bytes) -> None: ...
    def put_ops(self, ops: Sequence[bytes]) -> list[str]: ...


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
    """Manifest ids that ``ops`` reference, skipping contributions their own site retracted
    (by a held or an incoming retract: such an op is accepted without its objects)."""
    ops = list(ops)
    retracts = opset.retracts_by_target(list(held_ops) + ops)
    out: dict[str, None] = {}
    for op in ops:
        if op.kind == "contribute" and opset.is_retracted(op, retracts):
            continue
        out.update(dict.fromkeys(op.objects()))
    return sorted(out)


def ops_to_send(local: Iterable[str], remote: Iterable[str]) -> list[str]:
    return sorted(set(local) - set(remote))


# -- drivers ---------------------------------------------------------------------------------


def _check_project(replica: Replica, state: PeerState) -> None:
    if state.genesis != replica.genesis_id:
        raise WrongProject(replica.genesis_id, state.genesis)


def _fetch_objects(replica: Replica, peer: Peer, ids: Sequence[str], stats: SyncStats,
                   progress: Progress, stage: str) -> None:
    wanted = sorted(replica.store.missing(ids))
    for i, object_id in enumerate(wanted):
        data = peer.get_object(object_id)
        replica.store.put(data, expected=object_id)  # verified: HashMismatch if not
        stats.objects_received += 1
        stats.bytes_received += len(data)
        progress(stage, i + 1, len(wanted))


def pull(replica: Replica, peer: Peer, progress: Progress = _quiet) -> SyncStats:
    """Bring into ``replica`` every op ``peer`` holds, with the objects they need."""
    stats = SyncStats()
    state = peer.state()
    _check_project(replica, state)
    lost = replica.store.index.wanted()
    if lost:  # objects quarantined here: fetch again what the peer has
        present = sorted(set(lost) - peer.missing(lost))
        _fetch_objects(replica, peer, present, stats, progress, "repair")
    staged_before = replica.staged()
    if state.state_root == replica.state_root() and not staged_before:
        return stats
    want = ops_to_fetch(replica.ops(), (op.id for op in staged_before), peer.op_ids())
    incoming = []
    for data in peer.get_ops(want):
        incoming.append(replica.stage(data))
        stats.ops_received += 1
    got = {op.id for op in incoming}
    if got != set(want):
        raise PeerError(f"peer sent {len(got)} of the {len(want)} ops asked for")
    pending = staged_before + incoming
    manifest_ids = manifests_needed(pending, replica.ops().values())
    _fetch_objects(replica, peer, manifest_ids, stats, progress, "manifests")
    held_manifests = [m for m in manifest_ids if replica.store.has(m)]
    _fetch_objects(replica, peer, replica.closure(held_manifests), stats, progress, "pieces")
    report = replica.commit_staged()
    stats.rejected = {k: f"{v.code}: {v.detail}" for k, v in report.rejected.items()}
    stats.waiting = report.waiting
    return stats


def push(replica: Replica, peer: Peer, progress: Progress = _quiet) -> SyncStats:
    """Send ``peer`` every op ``replica`` holds that it lacks: objects first, then ops."""
    stats = SyncStats()
    state = peer.state()
    _check_project(replica, state)
    if state.state_root == replica.state_root():
        return stats
    ops = replica.ops()
    send = [ops[i] for i in ops_to_send(ops, peer.op_ids())]
    if not send:
        return stats
    manifest_ids = [m for m in manifests_needed(send, ops.values()) if replica.store.has(m)]
    objects = replica.closure(manifest_ids)
    lacking = peer.missing(objects)
    order = [o for o in objects if o in lacking]
    for i, object_id in enumerate(order):
        data = replica.store.get(object_id)
        peer.put_object(object_id, data)
        stats.objects_sent += 1
        stats.bytes_sent += len(data)
        progress("upload", i + 1, len(order))
    peer.put_ops([op.data for op in opset.commit_order(send)])
    stats.ops_sent = len(send)
    return stats


def sync(replica: Replica, peer: Peer, progress: Progress = _quiet) -> SyncStats:
    """Pull then push: afterwards both sides hold the union of their ops."""
    return pull(replica, peer, progress).add(push(replica, peer, progress))
