"""Sync between replicas: the transport-independent protocol and its transports."""

from crdt_merge.sync.local import LocalPeer
from crdt_merge.sync.protocol import Peer, PeerState, SyncStats, pull, push, sync

__all__ = ["LocalPeer", "Peer", "PeerState", "SyncStats", "pull", "push", "sync"]
