"""What the routes read: one replica, and the caches derived from its state root.

Every cache is keyed by the state root, which the replica recomputes whenever SQLite's
``data_version`` moved (another process, such as the CLI, committed). So the server never
answers from a state it no longer holds.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from crdt_merge import ENGINE, NUMERIC_VERSION
from crdt_merge.errors import BadParameter
from crdt_merge.replica import Replica
from crdt_merge.store.local import StagingLimits
from crdt_merge.sync import reconcile, wire
from crdt_merge_server.antientropy import AntiEntropy
from crdt_merge_server.settings import Settings


def numeric_version() -> str:
    return NUMERIC_VERSION


class Service:
    def __init__(self, replica: Replica, settings: Settings) -> None:
        self.replica = replica
        self.settings = settings
        replica.staging = StagingLimits(settings.max_staged_ops, settings.max_staged_bytes,
                                        settings.max_staged_age)
        self.checkpoint_dir = Path(settings.checkpoint_dir or replica.path / "checkpoints")
        self.anti_entropy = AntiEntropy(replica, settings)
        self._lock = threading.Lock()
        self._index: tuple[str, reconcile.IdIndex] | None = None
        self._resolving = threading.Lock()
        self._checkpoints: Any = None
        genesis = replica.get_op(replica.genesis_id)
        self.profile = dict(genesis.body["profile"]) if genesis is not None else {}
        if settings.max_object_bytes < replica.piece_size:
            raise BadParameter(f"max_object_bytes ({settings.max_object_bytes}) is below this "
                               f"project's piece size ({replica.piece_size}): no piece could "
                               "be pushed")

    def close(self) -> None:
        self.anti_entropy.stop()
        self.replica.close()

    def state(self) -> dict[str, Any]:
        r = self.replica
        root = r.state_root()
        resolved = self._checkpoints.known(root) if self._checkpoints is not None else None
        return {
            "genesis": r.genesis_id, "state_root": root, "ops": len(r.ops()),
            "staged": r.staged_count(), "site": r.site, "profile": self.profile,
            "checkpoint_id": resolved[1] if resolved else None,
            "plan_id": resolved[0] if resolved else None,
            "engine": ENGINE, "protocol": wire.PROTOCOL_VERSION, "numeric": numeric_version(),
        }

    def id_index(self) -> reconcile.IdIndex:
        """The reconciliation index of the committed op ids (rebuilt when the root moves)."""
        root = self.replica.state_root()
        with self._lock:
            if self._index is None or self._index[0] != root:
                self._index = (root, reconcile.IdIndex(self.replica.op_ids()))
            return self._index[1]

    def checkpoints(self) -> Any:
        """The checkpoint service (made on first use: resolve may be missing here)."""
        if self._checkpoints is None:
            from crdt_merge.resolve.checkpoint_cache import Checkpoints
            self._checkpoints = Checkpoints(self.replica, self.checkpoint_dir,
                                            self.settings.keep_checkpoints)
        return self._checkpoints

    def checkpoint(self) -> dict[str, Any]:
        """The checkpoint of the current state: resolved once per plan into
        ``checkpoint_dir/<plan id>`` (older renders pruned) and listed from there."""
        with self._resolving:
            try:
                service = self.checkpoints()
            except ImportError as exc:
                return {"state_root": self.replica.state_root(), "checkpoint_id": None,
                        "plan_id": None, "numeric_profile": None, "files": [],
                        "detail": f"resolve is not available in this installation ({exc})"}
            return service.current()
