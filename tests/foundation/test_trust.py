"""Multi-site trust (issue 13, findings 1-3): clocks are causal and bounded, members are
keys, and keys can be revoked. Each finding is a named regression test that attacks the
rule as a hostile member or admin would; the property tests check that the membership
rules are a pure function of the op set and never leave a project without a live admin."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt_merge import maintenance
from crdt_merge.crdt import ops as opmod
from crdt_merge.crdt import opset
from crdt_merge.crdt.ops import Op
from crdt_merge.errors import (
    BadClock,
    CrdtMergeError,
    LastAdmin,
    NotAuthorized,
    Revoked,
    SchemaError,
    SiteTaken,
)
from crdt_merge.replica import Replica
from crdt_merge.sync import LocalPeer, sync
from tests.fixtures.causal import causal_past

from .helpers import join, new_project, put_model, rng_from, snapshot
from .pool import site_key


@pytest.fixture
def trio(fast_tmp):
    """alice (founder, admin) admits beta (member) and carol (admin); all synced."""
    alice = new_project(fast_tmp / "a", "alice")
    beta = join(fast_tmp / "b", alice.genesis_bytes(), "beta")
    carol = join(fast_tmp / "c", alice.genesis_bytes(), "carol")
    alice.admit("carol", carol.public_key, role="admin")  # carol's admit has not seen beta's
    alice.admit("beta", beta.public_key)
    for r in (beta, carol):
        sync(r, LocalPeer(alice))
    yield alice, beta, carol
    for r in (alice, beta, carol):
        r.close()


def new_key(path: Any, genesis: bytes, site: str) -> Replica:
    """A replica for ``site`` with another key than :func:`join` gives it."""
    return Replica.join(path, site, genesis, rng=rng_from(f"new key {path}"))


def signed(replica: Replica, kind: str, key: Any = None, **fields: Any) -> Op:
    """An op ``replica``'s site signs by hand (with ``key``, default its own), from a draft
    whose fields the test may then change."""
    body = replica.new_body(kind, **{k: v for k, v in fields.items() if k not in ("clock", "deps")})
    for k in ("clock", "deps"):
        if k in fields:
            body[k] = fields[k]
    return opmod.sign(body, key or replica.key)


def counts(replica: Replica, op_id: str) -> bool:
    return op_id in opset.membership(replica.ops().values()).counted


def live(replica: Replica) -> set[str]:
    return {op.id for op in opset.live_contributions(replica.ops().values())}


# -- finding 1: a huge clock froze the project ----------------------------------------------


def test_finding1_a_member_cannot_freeze_the_project_with_a_huge_clock(trio):
    alice, beta, _ = trio
    attack = signed(beta, "recipe", method="linear", params={"x": 1}, clock=2**63 - 1)
    before = snapshot(alice)
    with pytest.raises(BadClock):
        alice.apply(attack.data)
    assert snapshot(alice) == before
    # a clock can only be 1 + the clock of ops its author names in deps: the greatest a
    # member can reach is one per op it signs, and every later op by anyone still works
    honest = beta.set_recipe("linear", {"x": 2})
    sync(alice, LocalPeer(beta))
    mine = alice.set_recipe("ties", {"density": "0.5"})
    assert mine.clock == honest.clock + 1
    assert opset.recipe_state(alice.ops().values()).winner.id == mine.id
    assert alice.contribute(put_model(alice, 1)).clock == mine.clock + 1


def test_finding1_a_clock_at_the_top_of_the_range_is_refused_by_its_structure(trio):
    _, beta, _ = trio
    with pytest.raises(SchemaError):
        signed(beta, "recipe", method="linear", params={}, clock=2**63)


# -- finding 2: identity was the site name, not the key -------------------------------------


def test_finding2_a_second_admit_of_a_live_name_is_refused(trio, fast_tmp):
    alice, beta, carol = trio
    impostor = new_key(fast_tmp / "x", alice.genesis_bytes(), "beta")
    with pytest.raises(SiteTaken):
        alice.admit("beta", impostor.public_key)
    with pytest.raises(SiteTaken):  # an admin taking over the founder's name
        carol.admit("alice", impostor.public_key, role="admin")
    # signed by hand, the same admits are invalid ops everywhere
    for by, name in ((alice, "beta"), (carol, "alice")):
        op = signed(by, "admit", admit={"site": name, "key": impostor.public_key,
                                        "role": "admin"})
        before = snapshot(by)
        with pytest.raises(SiteTaken):
            by.apply(op.data)
        assert snapshot(by) == before
    impostor.close()


def test_finding2_a_new_key_for_the_same_name_cannot_retract_the_first_keys_ops(trio, fast_tmp):
    """An admin that pretends not to have seen beta's admit (deps: the genesis only) can
    admit the name again: the op is valid, but the new key is another member, so its
    retract of the first key's contribution has no effect on any replica."""
    alice, beta, carol = trio
    first = beta.contribute(put_model(beta, 2), label="beta's model")
    founders = alice.contribute(put_model(alice, 3), label="alice's model")
    for r in (alice, carol):
        sync(r, LocalPeer(beta))
        sync(r, LocalPeer(alice))
    impostor = new_key(fast_tmp / "x", alice.genesis_bytes(), "beta")
    own = carol.membership()
    op = signed(carol, "admit", deps=[own.id], clock=own.clock + 1,  # has not seen beta's
                admit={"site": "beta", "key": impostor.public_key, "role": "member"})
    carol.apply(op.data)
    sync(impostor, LocalPeer(carol))
    assert len([m for m in carol.members() if m["site"] == "beta" and m["state"] == "live"]) == 2
    theft = impostor.retract([first.id])
    sync(carol, LocalPeer(impostor))
    # the founder's name is in every op's causal past: no deps can hide it
    with pytest.raises(SiteTaken):
        carol.apply(signed(carol, "admit", deps=[own.id], clock=own.clock + 1,
                           admit={"site": "alice", "key": impostor.public_key,
                                  "role": "admin"}).data)
    for r in (alice, beta, carol):
        sync(r, LocalPeer(carol))
        assert theft.id in r.ops() and counts(r, theft.id)
        assert {first.id, founders.id} <= live(r)
        assert (theft.id, first.id) in {(x.id, t) for x, t in
                                         opset.ignored_retracts(r.ops().values())}
    impostor.close()


# -- finding 3: nobody could be revoked ---------------------------------------------------


def test_finding3_a_revoked_key_cannot_author_ops_that_count(trio):
    alice, beta, carol = trio
    before = beta.contribute(put_model(beta, 4))
    sync(alice, LocalPeer(beta))
    revoke = alice.revoke("beta")
    sync(beta, LocalPeer(alice))
    with pytest.raises(Revoked):
        beta.contribute(put_model(beta, 5))
    late = signed_as_old_key(beta, "contribute", manifest=put_model(beta, 5), form="full",
                             params={}, label="late", family="test")
    beta.apply(late.data)  # valid (signed by a key that was a member): held, never counted
    for r in (alice, carol):
        sync(r, LocalPeer(beta))
        assert late.id in r.ops() and not counts(r, late.id)
        assert counts(r, before.id) and before.id in live(r)
        state = {m["site"]: m["state"] for m in r.members()}
        assert state == {"alice": "live", "beta": "revoked", "carol": "live"}
        assert next(m for m in r.members() if m["site"] == "beta")["ended_by"] == revoke.id
        status = maintenance.status(r)
        assert [n["op_id"] for n in status["not_counted"]] == [late.id]


def signed_as_old_key(replica: Replica, kind: str, **fields: Any) -> Op:
    """An op signed with ``replica``'s key after that key was revoked: the draft a replica
    would make, with the (no longer live) membership op filled in by hand."""
    ops = list(replica.ops().values())
    mine = [m for m in replica.members() if m["site"] == replica.site
            and m["key"] == replica.public_key.hex()]
    body = {"v": opmod.VERSION, "kind": kind, "site": replica.site,
            "clock": opset.next_clock(ops), "deps": opset.heads(ops),
            "project": replica.genesis_id, "member": mine[0]["member"], **fields}
    return opmod.sign(body, replica.key)


def test_finding3_rotation_revokes_the_old_key(trio, fast_tmp):
    """The site is re-admitted with a new key (rotate-key): the old key keeps signing, and
    none of what it signs after the rotation counts."""
    alice, beta, _ = trio
    kept = beta.contribute(put_model(beta, 6))
    sync(alice, LocalPeer(beta))
    fresh = new_key(fast_tmp / "b2", alice.genesis_bytes(), "beta")
    rotation = alice.rotate_key("beta", fresh.public_key)
    assert rotation.body["replaces"] == beta.membership().id
    sync(beta, LocalPeer(alice))
    sync(fresh, LocalPeer(alice))
    old = signed_as_old_key(beta, "retract", targets=[kept.id])
    beta.apply(old.data)
    new = fresh.contribute(put_model(fresh, 7))
    for r in (beta, fresh):
        sync(alice, LocalPeer(r))
    assert not counts(alice, old.id) and kept.id in live(alice)  # the old key's retract
    assert counts(alice, new.id) and new.id in live(alice)
    states = sorted((m["state"], m["member"]) for m in alice.members() if m["site"] == "beta")
    assert [s for s, _ in states] == ["live", "replaced"]
    fresh.close()


def test_revoke_is_admin_only_and_never_the_last_admin(trio):
    alice, beta, carol = trio
    with pytest.raises(NotAuthorized):
        beta.revoke("alice")
    alice.revoke("carol")
    with pytest.raises(LastAdmin):
        alice.revoke("alice")
    with pytest.raises(CrdtMergeError):
        alice.revoke("nobody")


def test_concurrent_mutual_revokes_leave_exactly_one_of_the_two_admins(trio):
    alice, _, carol = trio
    a_revokes_c = alice.revoke("carol")
    c_revokes_a = carol.revoke("alice")  # neither has seen the other's
    for first, second in ((alice, carol), (carol, alice)):
        sync(first, LocalPeer(second))
    for r in (alice, carol):
        state = {m["site"]: m["state"] for m in r.members()}
        winner = min((a_revokes_c.clock, a_revokes_c.id), (c_revokes_a.clock, c_revokes_a.id))
        survivor = "alice" if winner[1] == a_revokes_c.id else "carol"
        assert state[survivor] == "live"
        assert state["carol" if survivor == "alice" else "alice"] == "revoked"


def test_the_revoke_cli_refuses_an_ambiguous_name(trio, fast_tmp):
    alice, _, carol = trio
    twin = new_key(fast_tmp / "t", alice.genesis_bytes(), "beta")
    own = carol.membership()
    op = signed(carol, "admit", deps=[own.id], clock=own.clock + 1,
                admit={"site": "beta", "key": twin.public_key, "role": "member"})
    carol.apply(op.data)
    with pytest.raises(SchemaError, match="--member"):
        carol.revoke("beta")
    carol.revoke("beta", member=op.id)
    assert {m["state"] for m in carol.members() if m["site"] == "beta"} == {"live", "revoked"}
    twin.close()


# -- properties: a pure function of the op set; an admin always survives ------------------

KEYS = {f"k{i}": site_key(f"trust k{i}") for i in range(5)}


@st.composite
def histories(draw: Any) -> list[Op]:
    """A random history of valid ops: admits (new names, names already held, rotations),
    revokes (of anyone, by anyone, concurrent ones included), contributions and retracts,
    each with random deps (so any two may be concurrent), signed by any key ever admitted
    (revoked ones included: a hostile or leaked key keeps signing)."""
    genesis = opmod.sign({"v": opmod.VERSION, "kind": "genesis", "site": "s0", "clock": 0,
                          "name": "trust", "nonce": bytes(16),
                          "profile": {"name": "test", "piece_size": 4096},
                          "sites": {"s0": {"key": opmod.public_bytes(KEYS["k0"]),
                                           "role": "admin"}}}, KEYS["k0"])
    ops: dict[str, Op] = {genesis.id: genesis}
    members: list[tuple[str, str, str]] = [(genesis.id, "s0", "k0")]  # (op, site, key name)
    for _ in range(draw(st.integers(1, 14))):
        member_op, site, keyname = draw(st.sampled_from(members))
        ids = sorted(ops)
        deps = sorted(set(draw(st.lists(st.sampled_from(ids), min_size=1, max_size=3))))
        clock = 1 + max(ops[d].clock for d in deps)
        body: dict[str, Any] = {"v": opmod.VERSION, "site": site, "clock": clock, "deps": deps,
                                "project": genesis.id, "member": member_op}
        what = draw(st.sampled_from(["admit", "admit", "rotate", "revoke", "revoke",
                                     "contribute", "retract"]))
        if what in ("admit", "rotate"):
            target = draw(st.sampled_from(members))
            name = (draw(st.sampled_from(["s0", "s1", "s2", "s3"])) if what == "admit"
                    else target[1])
            newkey = draw(st.sampled_from(sorted(KEYS)))
            body |= {"kind": "admit", "admit": {"site": name,
                                                "key": opmod.public_bytes(KEYS[newkey]),
                                                "role": draw(st.sampled_from(["admin", "member"]))}}
            if what == "rotate":
                body["replaces"] = target[0]
        elif what == "revoke":
            target = draw(st.sampled_from(members))
            body |= {"kind": "revoke", "revoke": {"member": target[0], "site": target[1]}}
        elif what == "contribute":
            body |= {"kind": "contribute", "manifest": "ab" * 32, "form": "full",
                     "params": {"n": len(ops)}, "label": "", "family": ""}
        else:
            mine = sorted(i for i, o in ops.items() if o.kind == "contribute")
            if not mine:
                continue
            body |= {"kind": "retract", "targets": [draw(st.sampled_from(mine))]}
        op = opmod.sign(body, KEYS[keyname])
        try:
            opmod.verify(op, genesis.id, ops.get)
        except CrdtMergeError:
            continue
        ops[op.id] = op
        if op.kind == "admit":
            members.append((op.id, op.body["admit"]["site"], next(
                k for k in KEYS if opmod.public_bytes(KEYS[k]) == op.body["admit"]["key"])))
    return list(ops.values())


def summary(ops: list[Op]) -> Any:
    m = opset.membership(ops)
    recipes = opset.recipe_state(ops, m.counted)
    return (sorted(m.counted), sorted((k, v.state, v.ended_by) for k, v in m.members.items()),
            [op.id for op in opset.live_contributions(ops, m.counted)],
            recipes.winner.id if recipes.winner else None)


@settings(deadline=None, max_examples=200)
@given(histories(), st.data())
def test_membership_is_a_function_of_the_set_and_an_admin_survives(ops, data):
    shuffled = data.draw(st.permutations(ops))
    repeats = data.draw(st.lists(st.sampled_from(ops), max_size=5))
    assert summary(shuffled + repeats) == summary(ops)
    m = opset.membership(ops)
    assert any(v.role == "admin" for v in m.live())
    by_id = {op.id: op for op in ops}
    for op in ops:
        if op.kind == "genesis":
            continue
        info = m.members.get(op.author)
        # a retract is binding when its causal past holds no op ending its author
        binding = op.kind == "retract" and not any(
            enders(by_id[p], op.author) for p in causal_past(by_id, op.id))
        if info is not None and info.ended_by is not None and op.id in m.counted:
            # an ended member's op counts only when the op that ended it had seen it, or
            # it is a retract made without seeing any op that ends its author
            assert op.id in causal_past(by_id, info.ended_by) or binding
        if op.kind in ("contribute", "retract"):
            expect = info is not None and (info.ended_by is None or binding
                                           or op.id in causal_past(by_id, info.ended_by))
            assert (op.id in m.counted) == expect


def enders(op: Op, member: Any) -> bool:
    """Whether ``op`` is a revoke of ``member`` or an admit replacing it."""
    if op.kind == "revoke":
        return (op.body["revoke"]["member"], op.body["revoke"]["site"]) == member
    return (op.kind == "admit" and "replaces" in op.body
            and (op.body["replaces"], op.body["admit"]["site"]) == member)


@settings(deadline=None, max_examples=100)
@given(histories(), st.data())
def test_a_contribution_that_needs_no_objects_is_never_live_again(ops, data):
    """What lets a contribution join without its objects, and gc delete them, is monotone:
    a contribution :func:`opset.self_retracted` names in a causally closed subset (what
    some replica holds) is not live in the whole set, nor in any closed subset holding the
    first, whatever revokes the rest adds."""
    cut = data.draw(st.integers(1, len(ops)))
    subset = ops[:cut]  # histories() appends each op after its references
    gone = opset.self_retracted(subset)
    for later in (ops[:k] for k in range(cut, len(ops) + 1)):
        alive = {op.id for op in opset.live_contributions(later)}
        assert not gone & alive
    assert gone <= opset.self_retracted(ops)


@settings(deadline=None, max_examples=60)
@given(histories())
def test_any_prefix_closed_under_references_keeps_an_admin(ops):
    """Every replica holds some causally closed subset while ops travel: each keeps a
    live admin too."""
    for cut in range(1, len(ops) + 1, max(1, len(ops) // 4)):
        subset = ops[:cut]  # histories() appends each op after its references
        assert any(v.role == "admin" for v in opset.membership(subset).live())


def test_mutual_revokes_in_every_arrival_order(trio):
    alice, _, carol = trio
    ops = list(alice.ops().values())
    r1 = signed(alice, "revoke", revoke={"member": carol.membership().id, "site": "carol"})
    r2 = signed(carol, "revoke", revoke={"member": alice.membership().id, "site": "alice"})
    outcomes = {tuple(sorted((k[1], v.state) for k, v in
                             opset.membership(ops + list(order)).members.items()))
                for order in itertools.permutations([r1, r2, r1])}
    assert len(outcomes) == 1
    (outcome,) = outcomes
    assert sum(1 for site, state in outcome if site in ("alice", "carol") and state == "live") == 1


# -- the CLI ------------------------------------------------------------------------------


def cli(capsys: Any, *args: str) -> tuple[int, dict]:
    import json

    from crdt_merge.cli.main import main

    code = main(["--json", *args])
    out = capsys.readouterr()
    text = out.out.strip() or out.err.strip().splitlines()[-1]
    return code, json.loads(text)


def test_cli_admit_revoke_rotate_and_status(trio, fast_tmp, capsys):
    alice, beta, carol = trio
    a = str(alice.path)
    twin = new_key(fast_tmp / "t", alice.genesis_bytes(), "beta")
    code, err = cli(capsys, "admit", a, "beta", twin.public_key.hex())
    assert code != 0 and err["error"] == "site_taken" and "rotate-key" in err["detail"]
    code, out = cli(capsys, "rotate-key", a, "beta", twin.public_key.hex())
    assert code == 0 and out["replaces"] == beta.membership().id
    code, out = cli(capsys, "revoke", a, "carol")
    assert code == 0 and out["site"] == "carol"
    code, err = cli(capsys, "revoke", a, "alice")
    assert code != 0 and err["error"] == "last_admin"
    code, status = cli(capsys, "status", a)
    assert code == 0
    states = sorted((m["site"], m["state"]) for m in status["members"])
    assert states == [("alice", "live"), ("beta", "live"), ("beta", "replaced"),
                      ("carol", "revoked")]
    assert all(len(m["fingerprint"]) == 16 for m in status["members"])
    from crdt_merge.cli.main import main

    assert main(["status", a]) == 0
    text = capsys.readouterr().out
    assert "replaced" in text and "revoked" in text and "members:" in text
    twin.close()


# -- a retract concurrent with its author's revoke (issue 13, left open; fixed) -------------


def _lives_with_objects(replicas: list[Replica], contribution: str) -> set[bool]:
    """Whether ``contribution`` is live on each replica, checking that every replica on
    which it is live holds its manifest and every piece (fsck clean everywhere)."""
    out = set()
    for r in replicas:
        report = maintenance.fsck(r)
        assert report["ok"], (r.site, report)
        is_live = contribution in live(r)
        if is_live:
            manifest = r.get_op(contribution).body["manifest"]
            assert r.store.has(manifest), (r.site, "live contribution without its manifest")
            assert not r.store.missing(r.closure([manifest])), (r.site, "pieces missing")
        out.add(is_live)
    return out


@pytest.mark.parametrize("order", ["revoke first", "retract first"])
def test_a_retract_concurrent_with_its_authors_revoke_leaves_no_live_contribution_without_objects(
        trio, fast_tmp, order):
    """beta contributes; alice revokes beta having seen the contribution, while beta,
    not having seen the revoke, retracts it and gc deletes its objects. carol hears of the
    two in either order; alice hears of the retract last. Every replica must agree whether
    the contribution is live, and wherever it is live its objects must be held: the
    revoke must not resurrect a contribution whose objects were (rightly) never fetched or
    already collected."""
    alice, beta, carol = trio
    c = beta.contribute(put_model(beta, 31))
    sync(alice, LocalPeer(beta))  # alice holds c with its objects
    revoke = alice.revoke("beta")
    r = beta.retract([c.id])
    assert revoke.id not in beta.ops() and r.id not in alice.ops()  # concurrent
    assert maintenance.gc(beta)["deleted"] > 0  # c's objects: only a retracted contribution used them
    if order == "revoke first":
        sync(carol, LocalPeer(alice))
        sync(carol, LocalPeer(beta))
    else:
        sync(carol, LocalPeer(beta))  # c and r join together, c without its objects
        assert not carol.store.has(c.body["manifest"])
        maintenance.gc(carol)
        sync(carol, LocalPeer(alice))
    for a, b in [(alice, carol), (beta, carol), (alice, beta)]:
        sync(a, LocalPeer(b))
    assert len({x.state_root() for x in trio}) == 1
    for x in trio:
        maintenance.gc(x, grace=0)
    assert _lives_with_objects(list(trio), c.id) == {False}  # the retract takes effect
    assert all(counts(x, r.id) for x in trio)
    assert all(x.members() == alice.members() for x in trio)
    assert {m["site"]: m["state"] for m in alice.members()}["beta"] == "revoked"
