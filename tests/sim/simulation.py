"""One seeded run of several replicas over a faulty network, and the checks after it.

:func:`run_seed` builds 3-5 replica directories (profile "test", 4 KiB pieces), then plays
a workload drawn from ``random.Random(seed)``: contributions of tiny float32 models,
retracts (of a site's own contributions and of other sites', which have no effect),
concurrent recipe changes (``linear``, or ``task_arithmetic`` with an anchor), pairwise
``sync``/``pull``/``push`` through :class:`~tests.sim.network.SimNetwork` (drops,
duplicates, reorders, delays, partitions and heals). A keyless relay, drawing from its own
RNG (so seeds replay their workload as before), stages forged ops at random replicas:
retracts naming a contribution the victim may not hold yet, and contributions of random
manifests, each naming a random membership op and signed by a key nobody admitted (issue
13 finding 4). Then the network heals, messages still
in flight arrive or are lost, and anti-entropy runs (every pair syncs until nothing moves).

It must end with, on every replica: the same state root; every op any site authored; none
of the relay's ops committed; no honest op left staged; and the same resolve outcome: the
same checkpoint id, or the same plan or recipe error (any other error, such as a missing
piece, fails the seed).

A Byzantine member ``byz`` (an admin in some seeds) takes part: it syncs like any replica,
and it also signs ops by hand and hands them to honest replicas: recipes with huge clocks,
admits of honest sites' names with new keys (concurrent ones, hiding the real admit from
their deps), retracts of other members' ops (by itself and by those impostor keys), junk
(random bytes, flipped bits, ops naming deps no one has), and, after an honest admin
revokes it at some step, more contributions and retracts with its revoked key; it also
retracts its own contributions, half the time with deps that hide everything after the
target (the revoke included), then runs gc; honest sites run gc after half their retracts.

Besides, on every honest replica: the same state root; every op any honest site
authored, and every one of them counts; no byz op outside the revoke's causal past counts
(but for its binding retracts, formats.md 8); fsck clean (no live contribution without
its objects);
no huge-clock op is held; none of byz's junk committed (ops that can never be valid, or
that name deps no one has, may stay staged). The byz replica itself is not checked.

Every draw comes from the one seeded RNG (keys and nonces included), so a seed replays
exactly; :class:`SimulationFailed` carries the seed and the event log.
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from crdt_merge import maintenance
from crdt_merge.crdt import ops as opmod
from crdt_merge.crdt import opset
from crdt_merge.errors import CrdtMergeError, PeerError, PlanError, RecipeError, UnknownSite
from crdt_merge.hashing import digest
from crdt_merge.replica import Replica
from crdt_merge.resolve import resolve
from crdt_merge.store.manifests import Manifest, TensorRecord, piece_lengths
from crdt_merge.sync import LocalPeer, pull, push, sync
from tests.fixtures.causal import causal_past

from .network import HEALED, LOSSY, SimNetwork, SimPeer

SHAPES = {"layers.0.w": (24, 48), "layers.0.b": (48,), "norm": (4, 4)}  # w: 2 pieces
WEIGHTS = ["0.5", "1", "1.5", "2", "-1"]
ANTI_ENTROPY_ROUNDS = 8
#: the chance, after each step, that the keyless relay stages a forged op somewhere
RELAY_RATE = 0.15


class SimulationFailed(AssertionError):
    """A seed broke an invariant; the message holds the seed and the event log to replay."""

    def __init__(self, seed: int, reason: str, log: list[str]) -> None:
        super().__init__(f"seed {seed}: {reason}\nreplay: python -m tests.sim.run --seed {seed}"
                         " -v\n" + "\n".join(log))
        self.seed, self.reason, self.log = seed, reason, log

    def __reduce__(self) -> tuple[object, ...]:  # it crosses the runner's process pool
        return SimulationFailed, (self.seed, self.reason, self.log)


@dataclass
class Outcome:
    """What a seed ended with (equal on every replica, or the run raised)."""

    seed: int
    log: list[str]
    state_root: str
    resolved: str  # "checkpoint <id>" or "<error code>: <detail>"
    ops: int
    counts: dict[str, int] = field(default_factory=dict)


def tiny_model(rng: random.Random, replica: Replica) -> str:
    """Store a small float32 model with seeded values; return its manifest id. The "norm"
    tensor is the same in every model, so its piece is shared."""
    tensors = {}
    for name, shape in SHAPES.items():
        n = 1
        for d in shape:
            n *= d
        if name == "norm":
            values = array("f", [1.0] * n)
        else:
            values = array("f", [round(rng.uniform(-1, 1), 3) for _ in range(n)])
        data = values.tobytes()  # little-endian on every machine this runs on
        pieces, pos = [], 0
        for length in piece_lengths(len(data), replica.piece_size):
            pieces.append(replica.store.put(data[pos:pos + length]))
            pos += length
        tensors[name] = TensorRecord("F32", shape, tuple(pieces))
    return replica.put_manifest(Manifest(replica.piece_size, tensors, {}, {"family": "sim"}))


class Simulation:
    """The replicas, the network and the workload of one seed."""

    def __init__(self, seed: int, workdir: Path, *, steps: int | None = None,
                 echo: Callable[[str], None] | None = None) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.workdir = workdir
        self.log: list[str] = []
        self.echo = echo
        self.step = 0
        self.net = SimNetwork(random.Random(self.rng.getrandbits(64)), self.note, LOSSY)
        n = self.rng.randint(3, 5)
        self.steps = steps if steps is not None else self.rng.randint(20, 40)
        self.sites = [f"s{i}" for i in range(n)]
        self.authored: set[str] = set()
        self.junk: set[str] = set()  # ops the keyless relay forged: none may ever count
        self.relay_rng = random.Random(seed ^ 0x5E1A7)
        self.counts: dict[str, int] = {}
        first = Replica.create(workdir / "s0", "s0", name="sim", profile="test",
                               rng=self.rng.randbytes)
        self.replicas = {"s0": first}
        for site in self.sites[1:]:
            self.replicas[site] = Replica.join(workdir / site, site, first.genesis_bytes(),
                                               rng=self.rng.randbytes)
        self.note(f"seed {seed}: {n} replicas, {self.steps} steps")
        # the Byzantine member, admitted first: its admit has not seen the honest ones, so
        # (as an admin) it can admit their names again concurrently
        byz = Replica.join(workdir / "byz", "byz", first.genesis_bytes(), rng=self.rng.randbytes)
        self.replicas["byz"] = byz
        byz_role = "admin" if self.rng.random() < 0.5 else "member"
        self.byz_member = first.admit("byz", byz.public_key, byz_role).id
        self.note(f"s0 admit byz as {byz_role}")
        self.byz_ops: set[str] = set()         # valid ops byz signed (held by byz)
        self.huge: set[str] = set()            # ops with forged clocks: never held
        self.impostors: list[tuple[str, Ed25519PrivateKey]] = []  # (admit id, key)
        self.revoke_id: str | None = None
        sync(byz, LocalPeer(first))
        for site in self.sites[1:]:  # admitted at s0; some learn it now, the rest by syncing
            role = "admin" if self.rng.random() < 0.3 else "member"
            self.authored.add(first.admit(site, self.replicas[site].public_key, role).id)
            self.note(f"s0 admit {site} as {role}")
        for site in self.sites[1:]:
            if self.rng.random() < 0.5:
                sync(self.replicas[site], LocalPeer(first))
                self.note(f"setup: {site} synced with s0 over a perfect link")

    def note(self, text: str) -> None:
        line = f"{self.step:03d} {text}"
        self.log.append(line)
        if self.echo is not None:
            self.echo(line)

    def fail(self, reason: str) -> SimulationFailed:
        return SimulationFailed(self.seed, reason, self.log)

    def close(self) -> None:
        for r in self.replicas.values():
            r.close()

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    # -- the workload ---------------------------------------------------------------------

    def run(self) -> Outcome:
        events = [(self.contribute, 25), (self.retract, 8), (self.recipe, 12),
                  (self.sync_pair, 40), (self.partition, 5), (self.heal, 4),
                  (self.deliver, 8), (self.byzantine, 12), (self.revoke_byz, 3)]
        actions, weights = zip(*events, strict=True)
        for step in range(1, self.steps + 1):
            self.step = step
            self.rng.choices(actions, weights)[0]()
            if self.relay_rng.random() < RELAY_RATE:  # its own RNG: seeds replay as before
                self.relay_junk()
        self.step = self.steps + 1
        return self.finish()

    def author(self, site: str, kind: str, what: str, make: Callable[[Replica], str]) -> None:
        """Author one op at ``site`` (``kind`` names it in the counts), unless the site does
        not hold its own admit yet."""
        r = self.replicas[site]
        try:
            r.membership()
        except UnknownSite:
            self.count("skipped: not admitted yet")
            self.note(f"{site} {what}: skipped, {site} does not hold its admit yet")
            return
        op_id = make(r)
        self.authored.add(op_id)
        self.count(kind)
        self.note(f"{site} {what} -> {op_id[:12]}")

    def contribute(self) -> None:
        site = self.rng.choice(self.sites)
        roll = self.rng.random()
        params = {} if roll < 0.05 else {"weight": self.rng.choice(WEIGHTS)}

        def make(r: Replica) -> str:
            manifest = tiny_model(self.rng, r)
            return r.contribute(manifest, params=params, label=f"{site}-{self.step}").id
        self.author(site, "contribute", f"contribute {params}", make)

    def retract(self) -> None:
        site = self.rng.choice(self.sites)
        r = self.replicas[site]
        held = sorted(op.id for op in r.ops().values() if op.kind == "contribute")
        if not held:
            self.note(f"{site} retract: skipped, no contribution held")
            return
        target = self.rng.choice(held)
        whose = "own" if r.get_op(target).site == site else "other's"
        self.author(site, f"retract {whose}", f"retract {whose} {target[:12]}",
                    lambda r: r.retract([target]).id)
        if self.rng.random() < 0.5:  # collect what only retracted contributions use
            self.note(f"{site} gc: {maintenance.gc(r)}")

    def recipe(self) -> None:
        site = self.rng.choice(self.sites)
        if self.rng.random() < 0.5:
            params = {} if self.rng.random() < 0.7 else {"normalize": False}
            self.author(site, "recipe linear", f"recipe linear {params}",
                        lambda r: r.set_recipe("linear", params).id)
            return

        def make(r: Replica) -> str:
            # a retracted contribution joins without its objects: its manifest may be held
            # without its pieces, and such an anchor is refused (IncompleteOp)
            held = sorted({op.body["manifest"] for op in r.ops().values()
                           if op.kind == "contribute" and r.store.has(op.body["manifest"])
                           and not r.store.missing(r.closure([op.body["manifest"]]))})
            if held and self.rng.random() < 0.5:
                anchor = self.rng.choice(held)
            else:
                anchor = tiny_model(self.rng, r)
            return r.set_recipe("task_arithmetic", {}, anchor=anchor).id
        self.author(site, "recipe task_arithmetic", "recipe task_arithmetic", make)

    # -- the Byzantine member ------------------------------------------------------------

    def byz_sign(self, kind: str, key: Ed25519PrivateKey | None = None,
                 member: str | None = None, site: str = "byz", **fields: object) -> opmod.Op:
        """An op byz signs by hand at the heads it holds, as its original member (which
        may be revoked by now) or as an impostor key it admitted."""
        b = self.replicas["byz"]
        ops = list(b.ops().values())
        body = {"v": opmod.VERSION, "kind": kind, "site": site, "clock": opset.next_clock(ops),
                "deps": opset.heads(ops), "project": b.genesis_id,
                "member": member or self.byz_member, **fields}
        return opmod.sign(body, key or b.key)

    def hand(self, op_data: bytes, what: str) -> str | None:
        """Hand bytes straight to an honest replica (a perfect link); return the op id if it
        was staged."""
        site = self.rng.choice(self.sites)
        r = self.replicas[site]
        try:
            op = r.stage(op_data)
        except CrdtMergeError as exc:
            self.count("byz: refused on arrival")
            self.note(f"byz {what} -> {site}: refused ({exc.code})")
            return None
        report = r.commit_staged()
        state = ("committed" if op.id in r.ops() else
                 f"rejected ({report.rejected[op.id].code})" if op.id in report.rejected
                 else "staged")
        self.count(f"byz: {state.split(' ')[0]}")
        self.note(f"byz {what} -> {site}: {state}")
        return op.id

    def byz_keep(self, op: opmod.Op, what: str) -> None:
        """A valid op byz signed: byz holds it and syncs it like any other."""
        try:
            self.replicas["byz"].apply(op.data)
        except CrdtMergeError as exc:
            self.note(f"byz {what}: invalid ({exc.code})")
            return
        self.byz_ops.add(op.id)
        self.count(f"byz {what}")
        self.note(f"byz {what} -> {op.id[:12]}")

    def byzantine(self) -> None:
        b = self.replicas["byz"]
        action = self.rng.choice(["huge clock", "same-name admit", "retract other's",
                                  "impostor retract", "junk", "contribute", "recipe",
                                  "retract own"])
        contributions = sorted(op.id for op in b.ops().values()
                               if op.kind == "contribute" and op.site != "byz")
        own = sorted(op.id for op in b.ops().values() if op.kind == "contribute"
                     and op.author == (self.byz_member, "byz"))
        if action == "huge clock":
            base = self.byz_sign("recipe", method="linear", params={})
            body = dict(base.body, clock=self.rng.choice([2**63 - 1, 2**62, base.clock + 2]))
            body.pop("sig")
            op = opmod.sign(body, b.key)
            self.huge.add(op.id)
            self.hand(op.data, f"recipe with clock {body['clock']}")
        elif action == "same-name admit":
            name = self.rng.choice(self.sites)
            key = Ed25519PrivateKey.from_private_bytes(self.rng.randbytes(32))
            own = b.get_op(self.byz_member)
            body = dict(self.byz_sign("admit", admit={
                "site": name, "key": opmod.public_bytes(key), "role": "member"}).body,
                deps=[own.id], clock=own.clock + 1)  # hides the real admit of ``name``
            body.pop("sig")
            op = opmod.sign(body, b.key)
            self.byz_keep(op, f"admit {name} again")
            if op.id in b.ops():
                self.impostors.append((op.id, key))
        elif action == "retract other's" and contributions:
            self.byz_keep(self.byz_sign("retract", targets=[self.rng.choice(contributions)]),
                          "retract other's")
        elif action == "impostor retract" and contributions and self.impostors:
            member, key = self.rng.choice(self.impostors)
            site = b.get_op(member).body["admit"]["site"]
            self.byz_keep(self.byz_sign("retract", key=key, member=member, site=site,
                                        targets=[self.rng.choice(contributions)]),
                          f"impostor {site} retract")
        elif action == "junk":
            kind = self.rng.choice(["random bytes", "flipped bit", "missing dep"])
            if kind == "random bytes":
                data = self.rng.randbytes(self.rng.randint(0, 200))
            elif kind == "flipped bit":
                held = sorted(b.ops())
                src = bytearray(b.get_op(self.rng.choice(held)).data)
                bit = self.rng.randrange(8 * len(src))
                src[bit // 8] ^= 1 << (bit % 8)
                data = bytes(src)
            else:
                body = dict(self.byz_sign("retract", targets=[digest(b"x")]).body,
                            deps=[digest(self.rng.randbytes(8))])
                body.pop("sig")
                data = opmod.sign(body, b.key).data
            op_id = self.hand(data, f"junk ({kind})")
            if op_id is not None:
                self.junk.add(op_id)  # never valid: must never commit, may stay staged
        elif action == "contribute":
            manifest = tiny_model(self.rng, b)
            self.byz_keep(self.byz_sign("contribute", manifest=manifest, form="full",
                                        params={"weight": "1"}, label="byz", family="sim"),
                          "contribute")
        elif action == "recipe":
            self.byz_keep(self.byz_sign("recipe", method="linear", params={}), "recipe")
        elif action == "retract own" and own:
            target = b.get_op(self.rng.choice(own))
            op = self.byz_sign("retract", targets=[target.id])
            if self.rng.random() < 0.5:  # deps that hide everything after the target,
                body = dict(op.body, deps=[target.id], clock=target.clock + 1)  # the revoke too
                body.pop("sig")
                op = opmod.sign(body, b.key)
            self.byz_keep(op, "retract own")
            self.note(f"byz gc: {maintenance.gc(b)}")
        else:
            self.note(f"byz {action}: skipped, nothing to target")

    def revoke_byz(self) -> None:
        """s0 (an admin) revokes byz, once, if it holds byz's admit (it always does)."""
        if self.revoke_id is not None:
            return
        op = self.replicas["s0"].revoke("byz", self.byz_member)
        self.revoke_id = op.id
        self.authored.add(op.id)
        self.count("revoke byz")
        self.note(f"s0 revoke byz -> {op.id[:12]}")

    def sync_pair(self) -> None:
        a, b = self.rng.sample(self.sites + ["byz"], 2)
        how = self.rng.choice(["sync", "sync", "pull", "push"])
        driver = {"sync": sync, "pull": pull, "push": push}[how]
        self.note(f"{how} {a}<->{b}")
        try:
            stats = driver(self.replicas[a], SimPeer(self.net, a, self.replicas[b]))
        except PeerError as exc:
            self.count("sync failed")
            self.note(f"  failed: {exc.detail}")
            return
        self.count("sync ok")
        self.note(f"  ok: ops {stats.ops_received} in, {stats.ops_sent} out; objects "
                  f"{stats.objects_received} in, {stats.objects_sent} out")

    def relay_junk(self) -> None:
        """The keyless relay stages junk at a replica, as a push of its own would: a
        retract of a contribution (preferably one the victim does not hold yet) naming a
        random membership op, or a contribution of a random manifest, signed by a key
        nobody admitted. It decodes, so it is staged; it must never count nor stop the
        victim fetching what honest ops need (issue 13 finding 4)."""
        victim = self.relay_rng.choice(self.sites)
        r = self.replicas[victim]
        contributions = sorted({op.id: op for rep in self.replicas.values()
                                for op in rep.ops().values()
                                if op.kind == "contribute"}.items())
        if not contributions:
            self.note(f"relay junk at {victim}: skipped, no contribution anywhere")
            return
        lacking = [op for i, op in contributions if i not in r.ops()]
        template = self.relay_rng.choice(lacking or [op for _, op in contributions])
        body = {k: v for k, v in template.body.items() if k != "sig"}
        body["member"] = self.relay_rng.randbytes(32).hex()
        if self.relay_rng.random() < 0.6:
            for key in ("manifest", "form", "params", "label", "family", "base"):
                body.pop(key, None)
            body["kind"], body["targets"] = "retract", [template.id]
            what = f"retract of {template.id[:12]}"
        else:
            body["manifest"] = self.relay_rng.randbytes(32).hex()
            what = "contribution of a random manifest"
        key = Ed25519PrivateKey.from_private_bytes(self.relay_rng.randbytes(32))
        forged = opmod.sign(body, key)
        self.junk.add(forged.id)
        try:
            r.receive([forged.data], source="relay")
        except CrdtMergeError as exc:  # refused outright: fine as well
            self.note(f"relay junk at {victim}: refused ({exc.code})")
            return
        self.count("relay junk")
        self.note(f"relay junk at {victim}: {what} -> {forged.id[:12]}")

    def partition(self) -> None:
        order = self.sites[:]
        self.rng.shuffle(order)
        cut = self.rng.randint(1, len(order) - 1)
        sides = {s: int(i >= cut) for i, s in enumerate(order)}
        self.net.partition(sides)
        self.count("partition")
        self.note(f"partition {sorted(order[:cut])} | {sorted(order[cut:])}")

    def heal(self) -> None:
        self.net.heal()
        self.note("heal")

    def deliver(self) -> None:
        self.net.deliver_one(self.replicas)

    # -- the end --------------------------------------------------------------------------

    def roots(self) -> dict[str, str]:
        return {s: self.replicas[s].state_root() for s in self.sites}

    def finish(self) -> Outcome:
        self.note("heal; flush; anti-entropy")
        self.net.heal()
        self.net.flush(self.replicas)
        self.net.faults = HEALED
        everyone = self.sites + ["byz"]
        pairs = [(a, b) for a in everyone for b in everyone if a < b]
        for round_no in range(1, ANTI_ENTROPY_ROUNDS + 1):
            before = self.roots()
            self.rng.shuffle(pairs)
            for a, b in pairs:
                try:
                    sync(self.replicas[a], SimPeer(self.net, a, self.replicas[b]))
                except PeerError as exc:  # the healed network drops nothing
                    raise self.fail(f"anti-entropy sync {a}<->{b} failed: {exc}") from exc
            after = self.roots()
            if after == before and len(set(after.values())) == 1:
                self.note(f"anti-entropy quiescent after {round_no} rounds")
                break
        else:
            raise self.fail(f"anti-entropy did not converge in {ANTI_ENTROPY_ROUNDS} rounds: "
                            f"{self.roots()}")
        return self.check()

    def check(self) -> Outcome:
        roots = self.roots()
        for site in self.sites:
            r = self.replicas[site]
            lost = sorted(self.authored - set(r.op_ids()))
            if lost:
                raise self.fail(f"{site} lacks authored ops {lost}")
            staged = [op_id for op_id, _ in r.store.staged_rows() if op_id not in self.junk]
            if staged:
                raise self.fail(f"{site} still has staged ops {staged}")
            counted = sorted(self.junk & set(r.op_ids()))
            if counted:
                raise self.fail(f"{site} committed the relay's junk {counted}")
            held = r.ops()
            if self.huge & set(held):
                raise self.fail(f"{site} holds an op with a forged clock")
            state = opset.membership(held.values())
            uncounted = sorted(self.authored - state.counted)
            if uncounted:
                raise self.fail(f"{site}: honest ops do not count: {uncounted}")
            if self.revoke_id is not None:
                past = causal_past(held, self.revoke_id)
                # a retract byz signed without seeing the revoke is binding (formats.md 8)
                late = sorted(i for i in self.byz_ops & set(held) if i not in past
                              and held[i].author == (self.byz_member, "byz")
                              and i in state.counted
                              and not (held[i].kind == "retract"
                                       and self.revoke_id not in causal_past(held, i)))
                if late:
                    raise self.fail(f"{site}: byz ops after its revoke count: {late}")
                self.count("byz ops not counted") if site == "s0" else None
        for site in self.sites:
            report = maintenance.fsck(self.replicas[site])
            if not report["ok"]:  # e.g. a live contribution whose objects nobody kept
                raise self.fail(f"{site} fsck: {report}")
        resolved = {}
        for site in self.sites:
            try:
                result = resolve(self.replicas[site], self.workdir / f"out-{site}", workers=1)
            except (PlanError, RecipeError) as exc:  # a decision every replica must share
                resolved[site] = f"{exc.code}: {exc.detail}"
            except CrdtMergeError as exc:  # missing or corrupt objects: never acceptable
                raise self.fail(f"{site} resolve failed: {exc.code}: {exc.detail}") from exc
            else:
                resolved[site] = f"checkpoint {result.checkpoint_id}"
        status = maintenance.status(self.replicas["s0"])
        self.note(f"state: {status['ops']} ops, {len(status['contributions'])} contributions, "
                  f"{len(status['conflicts'])} recipe conflicts, "
                  f"{len(status['ignored_retracts'])} ignored retracts")
        self.note(f"roots {sorted(set(roots.values()))}")
        self.note(f"resolved {sorted(set(resolved.values()))}")
        if len(set(roots.values())) != 1:
            raise self.fail(f"state roots differ: {roots}")
        if len(set(resolved.values())) != 1:
            raise self.fail(f"resolve outcomes differ: {resolved}")
        ops = len(self.replicas["s0"].ops())
        return Outcome(self.seed, self.log, roots["s0"], resolved["s0"], ops, self.counts)


def run_seed(seed: int, workdir: Path, *, steps: int | None = None,
             echo: Callable[[str], None] | None = None) -> Outcome:
    """Run one seed in the empty directory ``workdir``.

    Raises:
        SimulationFailed: an invariant broke (the seed and the event log are in it).
    """
    sim = Simulation(seed, workdir, steps=steps, echo=echo)
    try:
        return sim.run()
    finally:
        sim.close()
