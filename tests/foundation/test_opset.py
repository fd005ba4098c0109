"""The op set's laws as properties over pure functions: what the state says (root, live
contributions, recipe winner and conflicts, ignored retracts) is a function of the set of
ops alone, so union is commutative, associative and idempotent; and op validity cannot be
forged by changing bytes."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt_merge import codec
from crdt_merge.crdt import ops as opmod
from crdt_merge.crdt import opset
from crdt_merge.crdt.ops import Op
from crdt_merge.errors import (
    BadClock,
    BadSignature,
    DependencyMissing,
    NonCanonicalEncoding,
    NotAuthorized,
    SchemaError,
    UnknownSite,
    WrongProject,
)
from crdt_merge.store import manifests

from .helpers import expected_root
from .pool import make_pool, site_key

SETTINGS = settings(deadline=None, max_examples=150)

POOL = make_pool()
ALL = [POOL.genesis, *POOL.ops.values()]
INDEX = st.integers(0, len(ALL) - 1)  # strategies draw indices: an Op's repr is a kilobyte


def view(ops: list[Op]) -> dict[str, Any]:
    """Everything the op-set functions say about a collection of ops."""
    recipes = opset.recipe_state(ops)
    return {
        "root": opset.root(ops),
        "live": [op.id for op in opset.live_contributions(ops)],
        "winner": recipes.winner.id if recipes.winner else None,
        "conflicts": [op.id for op in recipes.conflicts],
        "ignored": [(r.id, t) for r, t in opset.ignored_retracts(ops)],
        "next_clock": opset.next_clock(ops),
    }


def union(*parts: list[Op]) -> list[Op]:
    """Set union of ops (by id), in a fixed order."""
    return sorted({op.id: op for part in parts for op in part}.values(), key=lambda op: op.id)


subsets = st.lists(INDEX, max_size=2 * len(ALL))


def pick(indices: list[int]) -> list[Op]:
    return [ALL[i] for i in indices]


@SETTINGS
@given(subsets, subsets, subsets)
def test_union_laws(x, y, z):
    x, y, z = pick(x), pick(y), pick(z)
    assert view(union(x, y)) == view(union(y, x))                         # commutative
    assert view(union(union(x, y), z)) == view(union(x, union(y, z)))     # associative
    assert view(union(x, x)) == view(union(x))                            # idempotent
    assert view(x + y) == view(union(x, y))  # any order, any repeats: a function of the set


@SETTINGS
@given(st.permutations(range(len(ALL))), st.lists(INDEX, max_size=10))
def test_state_is_independent_of_arrival_order_and_repeats(order, repeats):
    arrived = pick(list(order) + repeats)
    assert view(arrived) == view(ALL)
    assert view(arrived)["root"] == expected_root(op.id for op in ALL)


def test_pool_state():
    n = POOL.names
    v = view(ALL)
    # c2 retracted by bob and c3 by dave (their own sites); c4 is bob's, dave cannot retract it
    assert set(v["live"]) == {n["c1 alice m1"], n["c4 bob m1"]}
    assert v["live"] == sorted(v["live"])
    assert {t for _, t in v["ignored"]} == {n["c3 dave m3"], n["c4 bob m1"]}
    assert v["winner"] == n["p3 carol supersedes p1"]  # p1 is in p3's causal past
    assert v["conflicts"] == [n["p2 bob ties (concurrent)"]]


@SETTINGS
@given(st.permutations(range(len(ALL))))
def test_commit_order_puts_membership_first(order):
    ordered = opset.commit_order(pick(order))
    assert [op.id for op in ordered] == [op.id for op in opset.commit_order(ALL)]
    seen: set[str] = set()
    for op in ordered:
        assert op.member is None or op.member in seen, op.kind
        seen.add(op.id)


# -- recipes: the winner and the conflict are functions of the set --------------------------


def recipe(deps: list[Op], tag: int) -> Op:
    deps = deps or [POOL.genesis]
    return opmod.sign({"v": opmod.VERSION, "kind": "recipe", "site": "alice",
                       "clock": 1 + max(d.clock for d in deps),
                       "deps": sorted({d.id for d in deps}),
                       "project": POOL.genesis.id, "member": POOL.genesis.id,
                       "method": "linear", "params": {"tag": tag}}, site_key("alice"))


@st.composite
def recipe_specs(draw: Any) -> list[list[int]]:
    """The deps of each recipe, by index of an earlier one (none: the genesis): a random
    causal graph of recipes, with clocks that often tie."""
    return [draw(st.lists(st.integers(0, i - 1), max_size=3)) if i else []
            for i in range(draw(st.integers(1, 7)))]


def build_recipes(specs: list[list[int]]) -> list[Op]:
    made: list[Op] = []
    for tag, deps in enumerate(specs):
        made.append(recipe([made[j] for j in deps], tag))
    return made


def ancestors(specs: list[list[int]], i: int) -> set[int]:
    """Indices of the recipes in recipe i's causal past, from the spec (not the code)."""
    out: set[int] = set()
    todo = list(specs[i])
    while todo:
        j = todo.pop()
        if j not in out:
            out.add(j)
            todo.extend(specs[j])
    return out


@SETTINGS
@given(recipe_specs(), st.data())
def test_recipe_winner_and_conflict_are_order_independent(specs, data):
    recipes = build_recipes(specs)
    superseded = {j for i in range(len(specs)) for j in ancestors(specs, i)}
    heads = sorted((recipes[i] for i in range(len(specs)) if i not in superseded),
                   key=lambda op: (op.clock, op.id), reverse=True)
    n = len(recipes)
    arrived = [POOL.genesis] + [recipes[i] for i in data.draw(st.permutations(range(n)))
                                + data.draw(st.lists(st.integers(0, n - 1), max_size=4))]
    state = opset.recipe_state(arrived)
    assert state.winner.id == heads[0].id
    assert [op.id for op in state.conflicts] == [op.id for op in heads[1:]]
    assert all(state.winner.clock >= op.clock for op in state.conflicts)


def test_no_recipe_no_winner():
    assert opset.recipe_state([POOL.genesis]) == opset.RecipeState(None)


# -- validity cannot be forged ----------------------------------------------------------------


def verify(data: bytes) -> None:
    op = opmod.decode(data)
    opmod.verify(op, POOL.genesis.id, {o.id: o for o in ALL}.get)


REFUSALS = (NonCanonicalEncoding, SchemaError, BadSignature, UnknownSite, WrongProject,
            NotAuthorized, DependencyMissing, BadClock)


@pytest.mark.parametrize("op", ALL, ids=lambda op: op.kind)
def test_every_pool_op_verifies(op):
    verify(op.data)


@settings(deadline=None, max_examples=300)
@given(INDEX, st.data())
def test_a_flipped_bit_never_gives_a_valid_op(i, data):
    op = ALL[i]
    bit = data.draw(st.integers(0, 8 * len(op.data) - 1))
    changed = bytearray(op.data)
    changed[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(REFUSALS):
        verify(bytes(changed))


values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2**40) | st.text(max_size=8) | st.binary(max_size=8)
    | st.sampled_from(["0.30", "1e999999999", "full", "delta", "admin", "test", "F32", POOL.genesis.id]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def mutate(draw: Any, value: Any) -> Any:
    """Replace, drop or add one field somewhere in a map, or replace a list element."""
    if isinstance(value, dict) and value:
        key = draw(st.sampled_from(sorted(value)))
        action = draw(st.sampled_from(["replace", "drop", "add", "descend"]))
        out = dict(value)
        if action == "replace":
            out[key] = draw(values)
        elif action == "drop":
            del out[key]
        elif action == "add":
            out[draw(st.text(max_size=6))] = draw(values)
        else:
            out[key] = mutate(draw, value[key])
        return out
    if isinstance(value, list) and value:
        i = draw(st.integers(0, len(value) - 1))
        return value[:i] + [mutate(draw, value[i])] + value[i + 1:]
    return draw(values)


@SETTINGS
@given(INDEX, st.data())
def test_malformed_op_bodies_are_schema_errors(i, data):
    body = mutate(data.draw, dict(ALL[i].body))
    try:
        decoded = opmod.decode(codec.encode(body))
    except SchemaError:
        return
    assert decoded.body == body  # accepted only as exactly what was encoded


@SETTINGS
@given(st.sampled_from(sorted(m for m in POOL.closure)), st.data())
def test_malformed_manifests_are_schema_errors(manifest_id, data):
    wire = codec.decode(POOL.objects[manifest_id])
    changed = mutate(data.draw, wire)
    try:
        m = manifests.from_wire(changed)
    except SchemaError:
        return
    assert m.to_wire() == changed and m.encode() == codec.encode(changed)
