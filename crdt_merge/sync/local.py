"""The filesystem transport: the peer is another replica directory on this machine."""

from __future__ import annotations

from collections.abc import Sequence

from crdt_merge.replica import Replica
from crdt_merge.sync.protocol import Peer, PeerState


class LocalPeer(Peer):
    """A :class:`~crdt_merge.sync.protocol.Peer` backed by a replica opened in-process.

    Counts the objects it served and received, so tests can check that nothing moves twice.
    """

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.source = f"pull:{replica.path}"
        self._owned = False
        self.objects_served = 0
        self.objects_received = 0

    def state(self) -> PeerState:
        r = self.replica
        return PeerState(r.genesis_id, r.state_root(), len(r.ops()))

    def op_ids(self) -> list[str]:
        return self.replica.op_ids()

    def get_ops(self, ids: Sequence[str]) -> list[bytes]:
        return self.replica.serve_ops(ids)

    def missing(self, ids: Sequence[str]) -> set[str]:
        return self.replica.store.missing(ids)

    def get_object(self, object_id: str) -> bytes:
        self.objects_served += 1
        return self.replica.store.get(object_id)

    def put_object(self, object_id: str, data: bytes) -> None:
        self.replica.store.put(data, expected=object_id)
        self.objects_received += 1

    def close(self) -> None:
        """Close the replica this peer opened for itself (:meth:`open`); a replica handed
        in stays open for its owner."""
        if self._owned:
            self.replica.close()

    @classmethod
    def open(cls, path: str) -> LocalPeer:
        """A peer over the replica directory ``path``, closed with the peer."""
        peer = cls(Replica.open(path))
        peer._owned = True
        return peer

    def put_ops(self, ops: Sequence[bytes]) -> list[str]:
        return self.replica.receive(ops, source="push:local").committed
