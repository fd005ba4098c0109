"""The checkpoint service: the checkpoint id of a replica's current plan, computed once per
plan and numeric profile and cached in the replica's metadata (one place for the CLI's
``resolve``/``verify`` and the server's ``GET /v1/checkpoint``).

A server renders each plan's checkpoint into ``render_dir/<plan id>``; :meth:`current`
keeps that folder for the current plan and ``keep`` more (the most recently rendered),
and deletes older ones, so the folder does not grow by one model per plan forever.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crdt_merge.errors import PlanError, RecipeError, ShapeMismatch
from crdt_merge.replica import Replica
from crdt_merge.resolve import MergePlan, Resolved, checkpoint_key, execute, plan
from crdt_merge.resolve.profile import numeric_profile


@dataclass
class Checkpoints:
    """Checkpoint ids of ``replica``'s plans (see the module docstring)."""

    replica: Replica
    render_dir: Path | None = None
    keep: int = 2
    _resolved: dict[str, tuple[str, str]] = field(default_factory=dict)

    def cached(self, the_plan: MergePlan) -> str | None:
        value = self.replica.get_meta(checkpoint_key(the_plan.id, the_plan.method))
        return value.decode() if value is not None else None

    def record(self, result: Resolved) -> None:
        """Remember a resolved checkpoint id (under its plan and numeric profile)."""
        self.replica.set_meta(checkpoint_key(result.plan_id, result.plan.method),
                              result.checkpoint_id.encode())

    def known(self, state_root: str) -> tuple[str, str] | None:
        """(plan id, checkpoint id) for a state root this service resolved, if any."""
        return self._resolved.get(state_root)

    def current(self) -> dict[str, Any]:
        """``{state_root, checkpoint_id, plan_id, numeric_profile}`` of the current plan
        (resolved once if need be; with a ``detail`` and no id when there is no plan), plus
        ``files`` when a render folder is set."""
        r = self.replica
        root = r.state_root()
        try:
            the_plan = plan(r)
        # RecipeError: the winning recipe names a method or parameters this installation
        # does not know (a valid op all the same): no plan here, not a bad request
        except (PlanError, RecipeError, ShapeMismatch) as exc:
            out: dict[str, Any] = {"state_root": root, "checkpoint_id": None, "plan_id": None,
                                   "numeric_profile": numeric_profile(), "detail": exc.detail}
            if self.render_dir is not None:
                out["files"] = []
            return out
        cached = self.cached(the_plan)
        folder = None if self.render_dir is None else Path(self.render_dir) / the_plan.id
        if cached is None or (folder is not None and not folder.is_dir()):
            if folder is None:
                with tempfile.TemporaryDirectory() as tmp:
                    result = execute(r, the_plan, Path(tmp) / "out")
            else:
                result = execute(r, the_plan, folder)
            self.record(result)
            cached = result.checkpoint_id
        state_root = the_plan.state_root or root
        self._resolved[state_root] = (the_plan.id, cached)
        view: dict[str, Any] = {"state_root": state_root, "checkpoint_id": cached,
                                "plan_id": the_plan.id,
                                "numeric_profile": numeric_profile(the_plan.method)}
        if folder is not None:
            folder.touch()  # the most recently used: pruned last
            self.prune(the_plan.id)
            view["files"] = [{"name": f.name, "size": f.stat().st_size}
                             for f in sorted(folder.iterdir()) if f.is_file()]
        return view

    def prune(self, current: str) -> list[str]:
        """Delete rendered checkpoints but ``current`` and the ``keep`` most recent others.
        Returns the plan ids deleted."""
        if self.render_dir is None or not Path(self.render_dir).is_dir():
            return []
        others = [d for d in Path(self.render_dir).iterdir()
                  if d.is_dir() and d.name != current and len(d.name) == 64]
        others.sort(key=lambda d: (d.stat().st_mtime, d.name), reverse=True)
        doomed = others[self.keep:]
        for d in doomed:
            shutil.rmtree(d, ignore_errors=True)
        return [d.name for d in doomed]
