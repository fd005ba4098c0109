"""Multi-site trust over HTTP, with real server processes (issue 13, findings 1-3): a member
pushing a recipe with a huge clock, a second key for a live site name retracting the first
key's contribution, and a revoked site that contributes again and pushes. Three sites, each
serving its replica; the hostile ops travel by push and pull like any other."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from http_helpers import contribute, join, new_project, rng, start_servers

from crdt_merge import maintenance
from crdt_merge.crdt import ops as opmod
from crdt_merge.crdt import opset
from crdt_merge.errors import BadClock, Revoked
from crdt_merge.replica import Replica
from crdt_merge.sync import sync
from crdt_merge.sync.http import HttpPeer

TOKENS = {"alpha": "alpha-token-0123456789abcdef", "beta": "beta-token-0123456789abcdef",
          "gamma": "gamma-token-0123456789abcdef"}
TOKEN_FILE = "\n".join(f"{site} {'admin' if site == 'alpha' else 'contribute'} {token}"
                       for site, token in TOKENS.items())


class Site:
    def __init__(self, replica: Replica, server) -> None:
        self.replica, self.server = replica, server
        self.name = replica.site
        self.token = TOKENS[self.name]

    def sync_with(self, other: Site) -> dict:
        with HttpPeer(other.server.url, self.token) as peer:
            return sync(self.replica, peer).rejected

    def push_op(self, other: Site, op: opmod.Op) -> None:
        with HttpPeer(other.server.url, self.token) as peer:
            peer.put_ops([op.data])


def counted(site: Site) -> frozenset[str]:
    return opset.membership(site.replica.ops().values()).counted


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("trust")
    (root / "tokens").write_text(TOKEN_FILE)
    alpha = new_project(root / "alpha")
    beta = join(root / "beta", alpha.genesis_bytes(), "beta")
    gamma = join(root / "gamma", alpha.genesis_bytes(), "gamma")
    alpha.admit("gamma", gamma.public_key, role="admin")
    alpha.admit("beta", beta.public_key)
    args = ("--token-file", str(root / "tokens"))
    servers = start_servers([(r.path, args) for r in (alpha, beta, gamma)])
    out = [Site(r, s) for r, s in zip((alpha, beta, gamma), servers, strict=True)]
    for s in out[1:]:
        s.sync_with(out[0])
    yield out
    for s in out:
        s.server.stop()
        s.replica.close()


def converge(sites: list[Site]) -> None:
    a, b, c = sites
    for x, y in ((a, b), (b, c), (c, a), (a, b), (b, c)):
        x.sync_with(y)
    assert len({s.replica.state_root() for s in sites}) == 1


def test_finding1_a_huge_clock_pushed_over_http_is_refused(sites):
    alpha, beta, gamma = sites
    body = beta.replica.new_body("recipe", method="linear", params={})
    attack = opmod.sign(dict(body, clock=2**63 - 1), beta.replica.key)
    for target in (alpha, gamma):
        beta.push_op(target, attack)
        assert attack.id not in target.replica.ops()
    with pytest.raises(BadClock):
        beta.replica.apply(attack.data)
    recipe = alpha.replica.set_recipe("linear", {"round": "1"})  # authoring still works
    converge(sites)
    for s in sites:
        assert opset.recipe_state(s.replica.ops().values()).winner.id == recipe.id


def test_finding2_a_second_key_for_beta_cannot_retract_betas_contribution_over_http(sites):
    alpha, beta, gamma = sites
    mine = beta.replica.get_op(contribute(beta.replica, 21))
    converge(sites)
    # gamma (an admin) admits the name beta again with a key of its own, with deps that
    # hide beta's admit (its own admit had not seen it): a valid, concurrent admit
    key = Ed25519PrivateKey.from_private_bytes(rng("impostor")(32))
    own = gamma.replica.membership()
    admit = opmod.sign(dict(gamma.replica.new_body("admit", admit={
        "site": "beta", "key": opmod.public_bytes(key), "role": "member"}),
        deps=[own.id], clock=own.clock + 1), gamma.replica.key)
    gamma.replica.apply(admit.data)
    theft = opmod.sign({"v": opmod.VERSION, "kind": "retract", "site": "beta",
                        "clock": admit.clock + 1, "deps": [admit.id],
                        "project": gamma.replica.genesis_id, "member": admit.id,
                        "targets": [mine.id]}, key)
    gamma.push_op(alpha, admit)
    gamma.push_op(alpha, theft)
    converge(sites)
    for s in sites:
        assert theft.id in s.replica.ops() and theft.id in counted(s)
        assert mine.id in {op.id for op in opset.live_contributions(s.replica.ops().values())}
        assert (theft.id, mine.id) in {(r.id, t) for r, t in
                                       opset.ignored_retracts(s.replica.ops().values())}


def late_op(replica: Replica, member: str, manifest: str) -> opmod.Op:
    """A contribution signed with ``replica``'s key as the member ``member``, at the heads
    it holds (the CLI refuses to author with a revoked key: this is what a hostile holder
    of the key would send)."""
    ops = list(replica.ops().values())
    return opmod.sign({"v": opmod.VERSION, "kind": "contribute", "site": replica.site,
                       "clock": opset.next_clock(ops), "deps": opset.heads(ops),
                       "project": replica.genesis_id, "member": member, "manifest": manifest,
                       "form": "full", "params": {}, "label": "late", "family": "test"},
                      replica.key)


def test_finding3_revoked_site_contributes_again_and_pushes_no_replica_counts_it(sites):
    """beta contributes (counts), is revoked at alpha, then contributes again twice: once
    before it has heard of the revoke (concurrent with it) and once after (signed by hand:
    the CLI refuses). It pushes both to gamma before gamma hears of the revoke, and to
    alpha after; in the end no replica counts either, and the first one counts everywhere."""
    alpha, beta, gamma = sites
    kept = contribute(beta.replica, 31)
    converge(sites)
    member = beta.replica.membership().id
    revoke = alpha.replica.revoke("beta", member)  # finding 2 left a second key for beta
    concurrent = beta.replica.get_op(contribute(beta.replica, 32))  # has not seen the revoke
    beta.sync_with(gamma)  # gamma: the late op first, before the revoke
    assert concurrent.id in gamma.replica.ops() and revoke.id not in gamma.replica.ops()
    assert concurrent.id in counted(gamma)  # nothing tells gamma otherwise yet
    beta.sync_with(alpha)  # alpha: the revoke first, then the late op
    assert not beta.sync_with(alpha)
    with pytest.raises(Revoked):
        contribute(beta.replica, 33)
    after = late_op(beta.replica, member, beta.replica.get_op(kept).body["manifest"])
    beta.replica.apply(after.data)
    beta.sync_with(gamma)
    converge(sites)
    for s in sites:
        c = counted(s)
        assert kept in c and concurrent.id not in c and after.id not in c
        live = {x["op_id"] for x in maintenance.status(s.replica)["contributions"] if x["live"]}
        assert kept in live and not {concurrent.id, after.id} & live
        assert {n["op_id"] for n in maintenance.status(s.replica)["not_counted"]} >= {concurrent.id,
                                                                           after.id}
        with HttpPeer(s.server.url, s.token) as peer:
            assert peer.state().state_root == s.replica.state_root()
    roots = {s.replica.state_root() for s in sites}
    assert len(roots) == 1


def test_revoke_arrival_orders_in_process(tmp_path: Path):
    """The same history delivered to fresh replicas in every order of its three late pieces
    (the revoke, the concurrent contribution, the one signed after, one of them twice): one
    state root, one status (contributions, members, ops that do not count), everywhere."""
    import itertools

    a = new_project(tmp_path / "a")
    b = join(tmp_path / "b", a.genesis_bytes(), "beta")
    a.admit("gamma", join(tmp_path / "g0", a.genesis_bytes(), "gamma").public_key, "admin")
    a.admit("beta", b.public_key)
    from crdt_merge.sync import LocalPeer
    sync(b, LocalPeer(a))
    kept = contribute(b, 41)
    sync(a, LocalPeer(b))
    member = b.membership().id
    revoke = a.revoke("beta")
    concurrent = b.get_op(contribute(b, 42))
    sync(b, LocalPeer(a))
    after = late_op(b, member, b.get_op(kept).body["manifest"])
    b.apply(after.data)
    base = [op for op in b.ops().values() if op.id not in (revoke.id, concurrent.id, after.id)]
    outcomes = set()
    for i, order in enumerate(itertools.permutations([revoke, concurrent, after])):
        r = join(tmp_path / f"r{i}", a.genesis_bytes(), "viewer")
        for op in base + list(order) + [order[0]]:
            for obj in op.objects():
                for o in b.closure([obj]):
                    r.store.put(b.store.get(o))
            r.stage(op.data)
            r.commit_staged()
        assert set(r.ops()) == set(b.ops())
        c = opset.membership(r.ops().values()).counted
        st = maintenance.status(r)
        seen = repr([st[k] for k in ("contributions", "members", "not_counted", "recipe",
                                     "conflicts", "ignored_retracts")])
        outcomes.add((r.state_root(), kept in c, concurrent.id in c, after.id in c, seen))
        r.close()
    assert len(outcomes) == 1  # one state root, one status, whatever the order
    assert next(iter(outcomes))[:4] == (b.state_root(), True, False, False)
