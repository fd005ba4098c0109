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
from crdt_merge.errors import BadParameter, PlanError, RecipeError
from crdt_merge.replica import Replica
from crdt_merge.sync import reconcile, wire
from crdt_merge_server.antientropy import AntiEntropy
from crdt_merge_server.settings import Settings


def numeric_version() -> str:
    return NUMERIC_VERSION


class Service:
    def __init__(self, replica: Replica, settings: Settings) -> None:
        self.replica = replica
        self.settings = settings
        self.checkpoint_dir = Path(settings.checkpoint_dir or replica.path / "checkpoints")
        self.anti_entropy = AntiEntropy(replica, settings)
        self._lock = threading.Lock()
        self._index: tuple[str, reconcile.IdIndex] | None = None
        self._resolving = threading.Lock()
        self._resolved: dict[str, tuple[str, str]] = {}  # state root -> (plan id, checkpoint id)
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
        resolved = self._resolved.get(root)
        return {
            "genesis": r.genesis_id, "state_root": root, "ops": len(r.ops()),
            "staged": len(r.store.staged_rows()), "site": r.site, "profile": self.profile,
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

    def checkpoint(self) -> dict[str, Any]:
        """The checkpoint of the current state: resolved once per plan into
        ``checkpoint_dir/<plan id>`` and listed from there."""
        r = self.replica
        root = r.state_root()
        try:
            from crdt_merge.resolve import checkpoint_key, execute, plan
            from crdt_merge.resolve.execute import numeric_profile
        except ImportError as exc:
            return {"state_root": root, "checkpoint_id": None, "plan_id": None,
                    "numeric_profile": None, "files": [],
                    "detail": f"resolve is not available in this installation ({exc})"}
        with self._resolving:
            try:
                the_plan = plan(r)
            # RecipeError: the winning recipe names a method or parameters this installation
            # does not know (a valid op all the same): no plan here, not a bad request
            except (PlanError, RecipeError) as exc:
                return {"state_root": root, "checkpoint_id": None, "plan_id": None,
                        "numeric_profile": numeric_profile(), "files": [],
                        "detail": exc.detail}
            out = self.checkpoint_dir / the_plan.id
            cached = r.store.index.get_meta(checkpoint_key(the_plan.id, the_plan.method))
            if cached is None or not out.is_dir():
                result = execute(r, the_plan, out)
                r.store.index.set_meta(checkpoint_key(the_plan.id, the_plan.method), result.checkpoint_id.encode())
                cached = result.checkpoint_id.encode()
            checkpoint_id = cached.decode()
            self._resolved[the_plan.state_root or root] = (the_plan.id, checkpoint_id)
            files = [{"name": f.name, "size": f.stat().st_size}
                     for f in sorted(out.iterdir()) if f.is_file()]
            return {"state_root": the_plan.state_root or root, "checkpoint_id": checkpoint_id,
                    "plan_id": the_plan.id, "numeric_profile": numeric_profile(the_plan.method),
                    "files": files}
