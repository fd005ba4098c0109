"""A fixed pool of signed ops and the objects they reference, built once, so property tests
can deliver the same ops to replicas in any order, any number of times, through any syncs.

Sites: alice (admin, in the genesis) admits bob (member) and carol (admin); carol admits
dave (member), so dave's ops rely on a membership chain two admits deep. The pool holds
effective retracts (by the contribution's own member), ineffective ones (by another site),
a retract naming an op no one holds, and concurrent recipes (a conflict).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from crdt_merge import codec
from crdt_merge.crdt import ops as opmod
from crdt_merge.crdt.ops import Op
from crdt_merge.hashing import digest
from crdt_merge.store.manifests import FileRecord, Manifest, TensorRecord

from .helpers import DTYPES, PIECE_SIZE, cut, model_tensors, tensor_bytes


def site_key(site: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(digest(f"key of {site}".encode())))


@dataclass
class Pool:
    genesis: Op
    ops: dict[str, Op] = field(default_factory=dict)          # every op but the genesis
    names: dict[str, str] = field(default_factory=dict)        # name -> op id
    objects: dict[str, bytes] = field(default_factory=dict)    # object id -> bytes
    closure: dict[str, list[str]] = field(default_factory=dict)  # manifest -> it + its pieces

    def needs(self, op: Op) -> list[str]:
        """Every object ``op`` references, manifests first."""
        out: dict[str, None] = {}
        for m in op.objects():
            out.update(dict.fromkeys(self.closure[m]))
        return list(out)

    def effective_retracts(self, op: Op) -> list[str]:
        """Retract ops in the pool by ``op``'s own member that name it."""
        return [r.id for r in self.ops.values()
                if r.kind == "retract" and r.author == op.author and op.id in r.body["targets"]]

    def committable(self, delivered: set[str], objects: set[str] | None = None) -> set[str]:
        """Ops of ``delivered`` that end in the state (with the genesis): their references
        (deps and membership op) end in it too, and their objects were delivered with them
        somewhere (``objects``: those ops' ids; None: all of them), or a valid retract by
        their own member is delivered (such a contribution joins without its objects)."""
        valid = {self.genesis.id}
        changed = True
        while changed:
            changed = False
            for op_id in delivered:
                op = self.ops[op_id]
                if op_id not in valid and all(r in valid for r in opmod.references(op)):
                    valid.add(op_id)
                    changed = True
        held = {o for op_id in (objects or ()) for o in self.needs(self.ops[op_id])}
        out = {self.genesis.id}
        changed = True
        while changed:
            changed = False
            for op_id in sorted(valid - out):
                op = self.ops[op_id]
                has = (objects is None or set(self.needs(op)) <= held
                       or any(r in valid for r in self.effective_retracts(op)))
                if has and all(r in out for r in opmod.references(op)):
                    out.add(op_id)
                    changed = True
        return out


def _manifest(pool: Pool, seed: int) -> str:
    tensors = {}
    for name, t in sorted(model_tensors(seed).items()):
        pieces = cut(tensor_bytes(t))
        for p in pieces:
            pool.objects[digest(p)] = p
        tensors[name] = TensorRecord(DTYPES[t.dtype], tuple(t.shape),
                                     tuple(digest(p) for p in pieces))
    config = f'{{"seed": {seed}}}'.encode()
    pool.objects[digest(config)] = config
    manifest = Manifest(PIECE_SIZE, tensors,
                        {"config.json": FileRecord(len(config), (digest(config),))},
                        {"family": "test", "seed": seed})
    data = manifest.encode()
    pool.objects[manifest.id] = data
    pool.closure[manifest.id] = [manifest.id] + list(dict.fromkeys(manifest.piece_ids()))
    return manifest.id


@cache
def make_pool() -> Pool:
    g = opmod.sign({"v": opmod.VERSION, "kind": "genesis", "site": "alice", "clock": 0,
                    "name": "pool", "nonce": bytes(16),
                    "profile": {"name": "test", "piece_size": PIECE_SIZE},
                    "sites": {"alice": {"key": opmod.public_bytes(site_key("alice")),
                                        "role": "admin"}}}, site_key("alice"))
    pool = Pool(g)
    m1, m2, m3 = (_manifest(pool, seed) for seed in (1, 2, 3))
    members = {"alice": g.id}
    clocks = {g.id: 0}

    def add(name: str, site: str, deps: list[str], kind: str, **fields: object) -> str:
        clock = 1 + max(clocks[d] for d in deps)
        body = {"v": opmod.VERSION, "kind": kind, "site": site, "clock": clock,
                "project": g.id, "member": members[site], "deps": sorted(set(deps)), **fields}
        op = opmod.sign(codec.decode(codec.encode(body)), site_key(site))
        pool.ops[op.id] = op
        pool.names[name] = op.id
        clocks[op.id] = clock
        return op.id

    def admit(name: str, by: str, site: str, role: str, deps: list[str]) -> str:
        members[site] = add(name, by, deps, "admit",
                            admit={"site": site, "key": opmod.public_bytes(site_key(site)),
                                   "role": role})
        return members[site]

    a_bob = admit("admit bob", "alice", "bob", "member", [g.id])
    a_carol = admit("admit carol", "alice", "carol", "admin", [g.id])
    a_dave = admit("admit dave", "carol", "dave", "member", [a_carol])

    def contribute(name: str, site: str, deps: list[str], manifest: str, **extra: object) -> str:
        fields = {"manifest": manifest, "form": "full", "params": {"weight": "0.5"},
                  "label": name, "family": "test", **extra}
        return add(name, site, deps, "contribute", **fields)

    c1 = contribute("c1 alice m1", "alice", [a_bob, a_carol], m1)
    c2 = contribute("c2 bob m2 delta", "bob", [a_bob], m2, form="delta", base=m1)
    c3 = contribute("c3 dave m3", "dave", [a_dave], m3)
    c4 = contribute("c4 bob m1", "bob", [c2], m1)
    add("r1 bob retracts c2", "bob", [c4], "retract", targets=[c2])
    add("r2 carol retracts c3 (no effect)", "carol", [c3], "retract", targets=[c3])
    add("r3 dave retracts c3 and c4", "dave", [c3, c4], "retract", targets=sorted([c3, c4]))
    add("r4 alice retracts an unknown op", "alice", [c1], "retract",
        targets=[digest(b"nothing")])
    p1 = add("p1 alice linear", "alice", [c1], "recipe", method="linear", params={}, anchor=m1)
    add("p2 bob ties (concurrent)", "bob", [c2], "recipe", method="ties",
        params={"density": "0.5"})
    add("p3 carol supersedes p1", "carol", [p1, a_dave], "recipe", method="task_arithmetic",
        params={"lambda_": "1"}, anchor=m2)
    return pool
