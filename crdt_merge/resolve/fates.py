"""fates: what the current plan does with each contribution, in one vocabulary for every
reader (``crdt-merge status`` and the server's status page)::

    counted                the plan merges it
    excluded: WHY          the plan leaves it out, a recorded decision (non-finite values, a
                           shape mismatch, an outlier...)
    retracted              its own site retracted it
    does not count: WHY    its author's key was revoked or replaced before it
    not used               a plan exists and neither merges nor excludes it
    live (no plan yet)     no plan can be made for this state (the caller says why)

A live contribution may carry notes after ``; ``: a retract of it by another site is
ignored, a parameter the method does not use is ignored. A fate is a pure function of the
op set and its plan, like the plan itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from crdt_merge.crdt import opset
from crdt_merge.crdt.ops import Op
from crdt_merge.errors import CrdtMergeError
from crdt_merge.replica import Replica
from crdt_merge.resolve.merge_plan import MergePlan, plan

#: the fate kinds, in the order of the module docstring
KINDS = ("counted", "excluded", "retracted", "not_counted", "not_used", "no_plan")
#: why a contribution of a revoked or replaced key does not count
NOT_COUNTED = "its author's key was revoked or replaced before it"
IGNORED_RETRACT = "a retract of it by another site is ignored"


@dataclass(frozen=True)
class Fate:
    """One contribution's fate: ``kind`` (one of :data:`KINDS`), the plan's ``detail``
    (why it is excluded or does not count) and ``notes``. ``str()`` is the text both the
    CLI and the page print."""

    kind: str
    detail: str = ""
    notes: tuple[str, ...] = ()

    def __str__(self) -> str:
        text = {"counted": "counted", "excluded": f"excluded: {self.detail}",
                "retracted": "retracted", "not_counted": f"does not count: {self.detail}",
                "not_used": "not used", "no_plan": "live (no plan yet)"}[self.kind]
        return "; ".join((text, *self.notes))


def fates(ops: Iterable[Op], the_plan: MergePlan | None) -> dict[str, Fate]:
    """The fate of every held contribution (by op id, sorted) under ``the_plan``, the plan
    of ``ops`` (None when no plan can be made)."""
    ops = opset.as_set(ops)
    state = opset.membership(ops)
    live = {op.id for op in opset.live_contributions(ops, state.counted)}
    ignored = {target for _, target in opset.ignored_retracts(ops, state.counted)}
    merged: set[str] = set()
    excluded: dict[str, str] = {}
    notes: dict[str, list[str]] = {}
    if the_plan is not None:
        merged = {c.op_id for c in the_plan.contributions}
        for d in the_plan.decisions:
            if d.get("decision") == "excluded" and "op_id" in d:
                excluded[d["op_id"]] = str(d.get("detail", ""))
            elif d.get("decision") == "params_ignored":
                notes.setdefault(d["op_id"], []).append(str(d["detail"]))
    out: dict[str, Fate] = {}
    for op in sorted((o for o in ops if o.kind == "contribute"), key=lambda o: o.id):
        i = op.id
        if i not in state.counted:
            out[i] = Fate("not_counted", NOT_COUNTED)
            continue
        if i not in live:
            out[i] = Fate("retracted")
            continue
        extra = ((IGNORED_RETRACT,) if i in ignored else ()) + tuple(notes.get(i, ()))
        if i in merged:
            out[i] = Fate("counted", notes=extra)
        elif i in excluded:
            out[i] = Fate("excluded", excluded[i], extra)
        else:
            out[i] = Fate("not_used" if the_plan is not None else "no_plan", notes=extra)
    return out


def planned_fates(replica: Replica, extra: Sequence[Op] = ()
                  ) -> tuple[MergePlan | None, CrdtMergeError | None, dict[str, Fate]]:
    """The replica's plan (with ``extra`` ops as if written), the error that prevents one
    (or None), and every contribution's fate under it."""
    try:
        the_plan, error = plan(replica, extra), None
    except CrdtMergeError as exc:
        the_plan, error = None, exc
    return the_plan, error, fates(list(replica.ops().values()) + list(extra), the_plan)
