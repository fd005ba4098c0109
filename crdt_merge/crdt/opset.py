"""The replicated state: a grow-only set of ops, and the pure functions that read it.

Merge is set union, so it commutes, associates and is idempotent by construction. Everything
else here is a pure function of a set of ops (specs/formats.md section 8): which members are
live, which ops *count*, which contributions a retract removes, which recipe wins, the state
root. None of it looks at arrival order; an op that appears twice counts once.

Members are keys: a member is a membership declaration, ``(membership op id, site)`` (a
genesis entry or an admit). Authority is checked against the member, never the site name.

Which ops count (:func:`membership`): the admits and revokes are processed in ``(clock, op
id)`` order (a topological order of the causal graph); each counts only when its author is
a live member at that point and, for a revoke or a replacing admit, when the project keeps a
live admin. A counted revoke (or replacing admit) ends its target member: exactly the
member's ops in the causal past of the op that ended it count; its other ops count nowhere,
whatever the arrival order. When an ended member's admit or revoke was counted although it
is outside that causal past, the processing starts again without it (it can only end: every
round excludes at least one more op). Every other op counts when its author's declaration
counts and the author is live, or the op is in the causal past of the op that ended it; a
retract also counts when its own causal past holds no op ending its author (it is
*binding*, :func:`binding_retracts`): a retract concurrent with its author's revoke.

Retract rule (observed-remove): a retract names op ids. It takes effect on a target only when
both count and the same member (membership op and site) made both; a retract of another
member's op is held but has no effect. A retract that arrives before its target still
removes it when the target arrives.

Why binding retracts count: whether a contribution needs its objects must be decided by
the set monotonically (a contribution that joined without them, or whose objects gc
deleted, must never become live again). A binding retract by the contribution's own member
makes it not live in every superset of the set (:func:`self_retracted`): the contribution
counts only if its author's declaration counts, and then so does the retract. Were a
concurrent revoke able to cancel the retract, any admin could later sign a revoke whose
deps hide it and resurrect a contribution whose objects nobody kept (issue 13, left open).

Recipe rule: a counted recipe supersedes every recipe in its causal past. The winner is the
greatest ``(clock, op id)`` among the counted recipes no counted recipe supersedes; the
others are reported as a conflict (a person should supersede them), never hidden.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from crdt_merge.crdt.ops import MAX_DEPS, Op
from crdt_merge.hashing import StateRoot, state_root

Member = tuple[str, str]  # (membership op id, site)


def as_set(ops: Iterable[Op]) -> list[Op]:
    """The distinct ops of ``ops`` (an op that arrived twice counts once)."""
    return list({op.id: op for op in ops}.values())


def topological(ops: Iterable[Op]) -> list[Op]:
    """The ops by ``(clock, op id)``: every op after the ops it references (a valid op's
    deps and membership op have smaller clocks)."""
    return sorted(as_set(ops), key=lambda op: (op.clock, op.id))


commit_order = topological


class _Past:
    """Causal pasts within one set of ops (ops not in the set are skipped), memoized."""

    def __init__(self, by_id: Mapping[str, Op]) -> None:
        self.by_id = by_id
        self.cache: dict[str, frozenset[str]] = {}

    def __call__(self, op_id: str) -> frozenset[str]:
        if op_id not in self.cache:
            out: set[str] = set()
            todo = list(self.by_id[op_id].deps)
            while todo:
                d = todo.pop()
                if d in out or d not in self.by_id:
                    continue
                out.add(d)
                todo.extend(self.by_id[d].deps)
            self.cache[op_id] = frozenset(out)
        return self.cache[op_id]


@dataclass(frozen=True)
class MemberInfo:
    member: Member
    key: bytes
    role: str
    #: "live", "revoked" or "replaced"
    state: str
    #: the counted revoke (or replacing admit) that ended it
    ended_by: str | None = None


@dataclass(frozen=True)
class Membership:
    """Who is a member, and which ops count (see the module docstring)."""

    members: dict[Member, MemberInfo]
    counted: frozenset[str]
    #: op id -> why it does not count
    not_counted: dict[str, str] = field(default_factory=dict)

    def live(self) -> list[MemberInfo]:
        return [m for m in self.members.values() if m.state == "live"]


def _process(order: list[Op], excluded: set[str]) -> tuple[dict[Member, MemberInfo],
                                                          dict[str, str], set[str]]:
    members: dict[Member, MemberInfo] = {}
    why: dict[str, str] = {}
    counted: set[str] = set()

    def live_admins() -> set[Member]:
        return {m for m, info in members.items() if info.state == "live" and info.role == "admin"}

    for op in order:
        if op.kind == "genesis":
            for m, (key, role) in op.declares().items():
                members[m] = MemberInfo(m, key, role, "live")
            counted.add(op.id)
            continue
        if op.id in excluded:
            why[op.id] = "its author's key was revoked or replaced by an op that had not seen it"
            continue
        author = members.get(op.author)  # type: ignore[arg-type]
        if author is None:
            why[op.id] = "its author's membership does not count"
            continue
        if author.state != "live":
            why[op.id] = f"its author's key was {author.state} before it"
            continue
        if op.kind == "admit":
            a = op.body["admit"]
            if "replaces" in op.body:
                old = members.get((op.body["replaces"], a["site"]))
                if old is None or old.state != "live":
                    why[op.id] = "the member it replaces is not live"
                    continue
                if a["role"] != "admin" and not live_admins() - {old.member}:
                    why[op.id] = "it would leave no live admin"
                    continue
                members[old.member] = MemberInfo(old.member, old.key, old.role, "replaced", op.id)
            new = (op.id, a["site"])
            members[new] = MemberInfo(new, a["key"], a["role"], "live")
        else:  # revoke
            target = members.get((op.body["revoke"]["member"], op.body["revoke"]["site"]))
            if target is None or target.state != "live":
                why[op.id] = "the member it revokes is not live"
                continue
            if not live_admins() - {target.member}:
                why[op.id] = "it would leave no live admin"
                continue
            members[target.member] = MemberInfo(target.member, target.key, target.role,
                                                "revoked", op.id)
        counted.add(op.id)
    return members, why, counted


def _enders(ops: Iterable[Op]) -> dict[Member, set[str]]:
    """Member -> the held ops that would end it: revokes naming it, admits replacing it
    (counted or not: what matters is what an op's author had seen)."""
    out: dict[Member, set[str]] = {}
    for op in ops:
        if op.kind == "revoke":
            m = (op.body["revoke"]["member"], op.body["revoke"]["site"])
        elif op.kind == "admit" and "replaces" in op.body:
            m = (op.body["replaces"], op.body["admit"]["site"])
        else:
            continue
        out.setdefault(m, set()).add(op.id)
    return out


def binding_retracts(ops: Iterable[Op], past: _Past | None = None) -> set[str]:
    """The retracts whose causal past holds no op (revoke, or admit replacing it) that ends
    their author. Whether a retract is binding depends only on its causal past, so it
    never changes once the retract is held. The ops must be causally complete (held ops,
    or held ops plus ops joining with them)."""
    ops = as_set(ops)
    enders = _enders(ops)
    if past is None:
        past = _Past({op.id: op for op in ops})
    return {op.id for op in ops if op.kind == "retract"
            and not (enders.get(op.author, set()) & past(op.id))}  # type: ignore[arg-type]


def self_retracted(ops: Iterable[Op]) -> set[str]:
    """The contribute ops of ``ops`` that a binding retract of ``ops`` by the same member
    names. Monotone: such a contribution is not live in this set or in any set holding it,
    so it needs no objects (it joins without them, gc may delete them)."""
    ops = as_set(ops)
    by_id = {op.id: op for op in ops}
    out: set[str] = set()
    for r in binding_retracts(ops):
        retract = by_id[r]
        for target in retract.body["targets"]:
            t = by_id.get(target)
            if t is not None and t.kind == "contribute" and t.author == retract.author:
                out.add(target)
    return out


def membership(ops: Iterable[Op]) -> Membership:
    """The members and the ops that count (module docstring), a function of the set."""
    ops = as_set(ops)
    by_id = {op.id: op for op in ops}
    past = _Past(by_id)
    binding = binding_retracts(ops, past)
    order = topological(op for op in ops if op.kind in ("genesis", "admit", "revoke"))
    excluded: set[str] = set()
    while True:
        members, why, counted = _process(order, excluded)
        late = {op.id for op in order
                if op.id in counted and op.kind != "genesis"
                and (info := members.get(op.author)) is not None  # type: ignore[arg-type]
                and info.ended_by is not None and op.id not in past(info.ended_by)}
        if not late:
            break
        excluded |= late
    for op in ops:
        if op.kind in ("genesis", "admit", "revoke"):
            continue
        info = members.get(op.author)  # type: ignore[arg-type]
        if info is None:
            why[op.id] = "its author's membership does not count"
        elif (info.ended_by is not None and op.id not in past(info.ended_by)
              and op.id not in binding):
            why[op.id] = (f"its author's key was {info.state} by op {info.ended_by}, "
                          "which had not seen it")
        else:
            counted.add(op.id)
    return Membership(members, frozenset(counted), dict(sorted(why.items())))


def counted_ops(ops: Iterable[Op]) -> list[Op]:
    ops = as_set(ops)
    counted = membership(ops).counted
    return [op for op in ops if op.id in counted]


@dataclass(frozen=True)
class RecipeState:
    winner: Op | None
    #: unsuperseded recipes other than the winner, greatest first (non-empty = conflict)
    conflicts: tuple[Op, ...] = field(default=())


def recipe_state(ops: Iterable[Op], counted: frozenset[str] | None = None) -> RecipeState:
    ops = as_set(ops)
    if counted is None:
        counted = membership(ops).counted
    recipes = {op.id for op in ops if op.kind == "recipe" and op.id in counted}
    if not recipes:
        return RecipeState(None)
    # the counted recipes in each op's causal past, propagated in topological order
    seen: dict[str, frozenset[str]] = {}
    by_id = {op.id: op for op in ops}
    superseded: set[str] = set()
    for op in topological(ops):
        acc: set[str] = set()
        for d in op.deps:
            if d in by_id:
                acc |= seen.get(d, frozenset())
                if d in recipes:
                    acc.add(d)
        seen[op.id] = frozenset(acc)
        if op.id in recipes:
            superseded |= acc
    heads = sorted((by_id[r] for r in recipes if r not in superseded),
                   key=lambda op: (op.clock, op.id), reverse=True)
    return RecipeState(heads[0], tuple(heads[1:]))


def retracts_by_target(ops: Iterable[Op], counted: frozenset[str] | None = None
                       ) -> dict[str, list[Op]]:
    """Target op id -> the counted retract ops naming it (whatever their author)."""
    ops = as_set(ops)
    if counted is None:
        counted = membership(ops).counted
    out: dict[str, list[Op]] = {}
    for op in sorted(ops, key=lambda op: op.id):
        if op.kind == "retract" and op.id in counted:
            for target in op.body["targets"]:
                out.setdefault(target, []).append(op)
    return out


def is_retracted(contribution: Op, retracts: Mapping[str, list[Op]]) -> bool:
    """True when a retract by the contribution's own member names it."""
    return any(r.author == contribution.author for r in retracts.get(contribution.id, ()))


def live_contributions(ops: Iterable[Op], counted: frozenset[str] | None = None) -> list[Op]:
    """Counted contribute ops not retracted by their own member, by op id."""
    ops = as_set(ops)
    if counted is None:
        counted = membership(ops).counted
    retracts = retracts_by_target(ops, counted)
    return sorted((op for op in ops if op.kind == "contribute" and op.id in counted
                   and not is_retracted(op, retracts)), key=lambda op: op.id)


def ignored_retracts(ops: Iterable[Op], counted: frozenset[str] | None = None
                     ) -> list[tuple[Op, str]]:
    """(retract, target id) pairs of counted retracts that have no effect because another
    member made the target."""
    ops = as_set(ops)
    if counted is None:
        counted = membership(ops).counted
    by_id = {op.id: op for op in ops}
    out = []
    for op in ops:
        if op.kind == "retract" and op.id in counted:
            for target in op.body["targets"]:
                held = by_id.get(target)
                if held is not None and held.author != op.author:
                    out.append((op, target))
    return sorted(out, key=lambda pair: (pair[0].id, pair[1]))


def heads(ops: Iterable[Op]) -> list[str]:
    """The deps of a new op: the held ops no held op names in its deps, at most
    :data:`~crdt_merge.crdt.ops.MAX_DEPS` of them (the greatest ``(clock, op id)``), by id."""
    ops = as_set(ops)
    named = {d for op in ops for d in op.deps}
    tips = sorted((op for op in ops if op.id not in named),
                  key=lambda op: (op.clock, op.id), reverse=True)[:MAX_DEPS]
    return sorted(op.id for op in tips)


def next_clock(ops: Iterable[Op]) -> int:
    """The clock of a new op whose deps are :func:`heads`: one more than theirs."""
    ops = as_set(ops)
    by_id = {op.id: op for op in ops}
    return 1 + max((by_id[h].clock for h in heads(ops)), default=-1)


def root(ops: Iterable[Op]) -> StateRoot:
    return state_root(op.id for op in ops)
