"""The replicated state: a grow-only set of ops, and the pure functions that read it.

Merge is set union, so it commutes, associates and is idempotent by construction. Everything
else here is a pure function of a set of ops: which contributions a retract removes, which
recipe wins, the state root. None of it looks at arrival order.

Retract rule (observed-remove): a retract names the op ids it removes. It takes effect on a
target only when the same site made both (both ops are signed, so this is decidable from
their bytes on every replica); a retract of another site's op is held but has no effect.
A retract that arrives before its target still removes it when the target arrives.

Every function here takes any iterable of ops and treats it as a set: an op that appears
twice counts once.

Recipe rule: the winner is the greatest ``(clock, op id)`` among recipes no held recipe
supersedes. When more than one recipe is unsuperseded, the others are reported as a
conflict (a person should supersede them), never hidden.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from crdt_merge.crdt.ops import Op
from crdt_merge.hashing import StateRoot, state_root


def as_set(ops: Iterable[Op]) -> list[Op]:
    """The distinct ops of ``ops`` (an op that arrived twice counts once)."""
    return list({op.id: op for op in ops}.values())


@dataclass(frozen=True)
class RecipeState:
    winner: Op | None
    #: unsuperseded recipes other than the winner, greatest first (non-empty = conflict)
    conflicts: tuple[Op, ...] = field(default=())


def recipe_state(ops: Iterable[Op]) -> RecipeState:
    recipes = [op for op in as_set(ops) if op.kind == "recipe"]
    superseded = {s for op in recipes for s in op.body["supersedes"]}
    heads = sorted((op for op in recipes if op.id not in superseded),
                   key=lambda op: (op.clock, op.id), reverse=True)
    if not heads:
        return RecipeState(None)
    return RecipeState(heads[0], tuple(heads[1:]))


def retracts_by_target(ops: Iterable[Op]) -> dict[str, list[Op]]:
    """Target op id -> the retract ops naming it (whatever their site)."""
    out: dict[str, list[Op]] = {}
    for op in sorted(as_set(ops), key=lambda op: op.id):
        if op.kind == "retract":
            for target in op.body["targets"]:
                out.setdefault(target, []).append(op)
    return out


def is_retracted(contribution: Op, retracts: Mapping[str, list[Op]]) -> bool:
    """True when a retract by the contribution's own site names it."""
    return any(r.site == contribution.site for r in retracts.get(contribution.id, ()))


def live_contributions(ops: Iterable[Op]) -> list[Op]:
    """Contribute ops not retracted by their own site, in canonical order (by op id)."""
    ops = as_set(ops)
    retracts = retracts_by_target(ops)
    return sorted((op for op in ops if op.kind == "contribute" and not is_retracted(op, retracts)),
                  key=lambda op: op.id)


def ignored_retracts(ops: Iterable[Op]) -> list[tuple[Op, str]]:
    """(retract, target id) pairs that have no effect because another site made the target."""
    ops = as_set(ops)
    by_id = {op.id: op for op in ops}
    out = []
    for op in ops:
        if op.kind == "retract":
            for target in op.body["targets"]:
                held = by_id.get(target)
                if held is not None and held.site != op.site:
                    out.append((op, target))
    return sorted(out, key=lambda pair: (pair[0].id, pair[1]))


def next_clock(ops: Iterable[Op]) -> int:
    """The Lamport clock for a new op: one more than any held."""
    return 1 + max((op.clock for op in ops), default=0)


def root(ops: Iterable[Op]) -> StateRoot:
    return state_root(op.id for op in ops)


def commit_order(ops: Iterable[Op]) -> list[Op]:
    """Order ops so that a membership op comes before the ops that rely on it (admits by
    depth of their admission chain, then everything else), ties by op id."""
    ops = as_set(ops)
    by_id = {op.id: op for op in ops}
    depth: dict[str, int] = {}

    def depth_of(op: Op, seen: frozenset[str] = frozenset()) -> int:
        if op.id in depth:
            return depth[op.id]
        member = op.member
        parent = by_id.get(member) if member else None
        d = 0 if parent is None or parent.id in seen else 1 + depth_of(parent, seen | {op.id})
        depth[op.id] = d
        return d

    return sorted(ops, key=lambda op: (depth_of(op), op.id))
