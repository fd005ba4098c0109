"""A replica of a merge project: one directory, one site's key, the op set and the objects.

This is the public Python API over the store and the CRDT::

    r = Replica.create("a", site="alice")             # a new project; alice is its admin
    b = Replica.join("b", site="bob", genesis=r.genesis_bytes())
    r.admit("bob", b.public_key)
    op = r.contribute(manifest_id, params={"weight": "0.5"})
    sync(r, b)                                          # crdt_merge.sync
    assert r.state_root() == b.state_root()

Ops enter the set only through :meth:`stage` and :meth:`commit_staged` (or :meth:`apply`,
both at once): an op joins the set when the ops it references (deps, membership op) are
held, it is valid (specs/formats.md section 6), and every object it references is held and
verified, except a contribute op that its own member has retracted, which needs no objects.
Whether a held op *counts* (its author's key was not revoked before it) is decided by
:func:`crdt_merge.crdt.opset.membership`.
"""

from __future__ import annotations

import os
import threading
from collections import ChainMap
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from crdt_merge.crdt import ops as opmod
from crdt_merge.crdt import opset
from crdt_merge.crdt.ops import Op
from crdt_merge.errors import (
    CrdtMergeError,
    DependencyMissing,
    GenesisCorrupt,
    IncompleteOp,
    NonCanonicalEncoding,
    NotAReplica,
    OpMissing,
    PieceCorrupt,
    PieceMissing,
    Revoked,
    SchemaError,
    SiteTaken,
    UnknownSite,
    WrongProject,
)
from crdt_merge.hashing import ManifestId, OpId, StateRoot, check_id, digest
from crdt_merge.store import manifests
from crdt_merge.store.local import LocalStore, StagingLimits
from crdt_merge.store.manifests import Manifest

KEY_FILE = "site.key"
#: a copy of the genesis op beside the index: a corrupt genesis row is restored from it
GENESIS_FILE = "genesis.op"


def _write_durable(path: Path, data: bytes) -> None:
    """Write a small file whole (temp file, fsync, rename, directory fsync)."""
    # a name of this writer's own: a CLI and a server may open (and mend) one replica at once
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fingerprint(public_key: bytes) -> str:
    """A short, stable name for a public key: the first 16 hex digits of its BLAKE3."""
    return digest(public_key)[:16]


@dataclass
class CommitReport:
    """What taking in ops did: ``committed`` now, ``rejected`` (never valid, not kept),
    ``waiting`` (staged: a membership op or objects still missing), ``already`` held."""

    committed: list[str] = field(default_factory=list)
    rejected: dict[str, CrdtMergeError] = field(default_factory=dict)
    waiting: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)


class Replica:
    """One replica directory (see the module docstring). Safe to share between threads."""

    def __init__(self, store: LocalStore) -> None:
        self.store = store
        self.path = store.root
        genesis = store.index.get_meta("genesis")
        site = store.index.get_meta("site")
        if genesis is None or site is None:
            raise NotAReplica(str(self.path))
        self.genesis_id = OpId(genesis.decode())
        self.site = site.decode()
        self._lock = threading.RLock()
        self._ops: dict[str, Op] = {}
        self._root: StateRoot | None = None
        self._key: Ed25519PrivateKey | None = None
        #: bounds on staged ops (a server sets them from its settings)
        self.staging = StagingLimits()
        #: True when opening (or :meth:`check_genesis`) put the genesis row back from its copy
        self.genesis_restored = self.check_genesis()
        genesis_op = self._genesis_from(self.store.op_data(self.genesis_id))
        assert genesis_op is not None
        self.piece_size: int = genesis_op.body["profile"]["piece_size"]

    # -- lifecycle --------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Replica:
        return cls(LocalStore.open(Path(path)))

    def check_genesis(self) -> bool:
        """Verify the genesis row against the project id (the hash of its bytes). A row that
        is gone or fails it (a flipped bit) is put back from ``genesis.op``, the copy kept
        beside the index, when that copy verifies; returns True then. The copy is written
        when it is missing or differs (a replica made before it existed).

        Raises:
            GenesisCorrupt: neither the row nor the copy holds the genesis; nothing changed
                (``crdt-merge fsck DIR --genesis PEER_OR_FILE``: :meth:`repair_genesis`).
        """
        copy = self.path / GENESIS_FILE
        kept = copy.read_bytes() if copy.is_file() else None
        op = self._genesis_from(self.store.op_data(self.genesis_id))
        restored = False
        if op is None:
            op = self._genesis_from(kept)
            if op is None:
                raise GenesisCorrupt(str(self.path), self.genesis_id)
            self.store.index.restore_op(op.id, op.kind, op.site, op.clock, op.data)
            restored = True
        if kept != op.data:
            _write_durable(copy, op.data)
        return restored

    def _genesis_from(self, data: bytes | None) -> Op | None:
        """The genesis op of this project if ``data`` is exactly it, else None."""
        op = self._verified(self.genesis_id, data) if data is not None else None
        return op if op is not None and op.kind == "genesis" else None

    @staticmethod
    def repair_genesis(path: str | os.PathLike[str], genesis: bytes) -> OpId:
        """Put a replica's genesis back from ``genesis`` (the bytes ``join`` takes, from a
        file or any member's replica or server) when :class:`GenesisCorrupt` keeps it
        from opening: the bytes must hash to the project id the replica records and be a
        validly signed genesis. Writes the row and the copy; returns the project id.

        Raises:
            NotAReplica; WrongProject: the bytes are another op; NonCanonicalEncoding,
            SchemaError, BadSignature: they are not a genesis at all.
        """
        store = LocalStore.open(Path(path))
        try:
            recorded = store.index.get_meta("genesis")
            if recorded is None:
                raise NotAReplica(str(path))
            op = opmod.decode(genesis)
            if op.id != recorded.decode() or op.kind != "genesis":
                raise WrongProject(recorded.decode(), op.id)
            opmod.verify(op, None, lambda _id: None)
            _write_durable(Path(path) / GENESIS_FILE, op.data)
            store.index.restore_op(op.id, op.kind, op.site, op.clock, op.data)
        finally:
            store.close()
        return op.id

    @classmethod
    def create(cls, path: str | os.PathLike[str], site: str, *, name: str = "merge",
               profile: str = "v1", rng: Callable[[int], bytes] = os.urandom) -> Replica:
        """Create a new merge project in an empty directory; ``site`` is its first admin."""
        key = Ed25519PrivateKey.from_private_bytes(rng(32))
        body = {
            "v": opmod.VERSION, "kind": "genesis", "site": site, "clock": 0, "name": name,
            "nonce": rng(16),
            "profile": {"name": profile, "piece_size": opmod.PROFILES.get(profile, -1)},
            "sites": {site: {"key": opmod.public_bytes(key), "role": "admin"}},
        }
        genesis = opmod.sign(body, key)
        return cls._init_dir(Path(path), site, key, genesis)

    @classmethod
    def join(cls, path: str | os.PathLike[str], site: str, genesis: bytes, *,
             rng: Callable[[int], bytes] = os.urandom) -> Replica:
        """Create a replica of an existing project from its genesis op, with a new key for
        ``site``. An admin must :meth:`admit` the site before it can author ops."""
        op = opmod.decode(genesis)
        if op.kind != "genesis":
            raise SchemaError("join needs the project's genesis op")
        opmod.verify(op, None, lambda _id: None)
        key = Ed25519PrivateKey.from_private_bytes(rng(32))
        return cls._init_dir(Path(path), site, key, op)

    @classmethod
    def _init_dir(cls, path: Path, site: str, key: Ed25519PrivateKey, genesis: Op) -> Replica:
        if not opmod.SITE_NAME.fullmatch(site):
            raise SchemaError(f"site name {site!r}: use 1-64 of [a-z0-9_.-]")
        store = LocalStore.create(path)
        _write_durable(path / GENESIS_FILE, genesis.data)
        key_path = path / KEY_FILE
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes_raw())
            f.flush()
            os.fsync(f.fileno())
        store.insert_op(genesis.id, genesis.kind, genesis.site, genesis.clock, genesis.data, [])
        store.index.set_metas({"genesis": genesis.id.encode(), "site": site.encode()})
        return cls(store)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Replica:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- identity -----------------------------------------------------------------------------

    @property
    def key(self) -> Ed25519PrivateKey:
        if self._key is None:
            self._key = Ed25519PrivateKey.from_private_bytes((self.path / KEY_FILE).read_bytes())
        return self._key

    @property
    def public_key(self) -> bytes:
        return opmod.public_bytes(self.key)

    def get_meta(self, key: str) -> bytes | None:
        """A value this replica keeps for itself (not replicated), e.g. cached checkpoints."""
        return self.store.index.get_meta(key)

    def set_meta(self, key: str, value: bytes) -> None:
        self.store.index.set_meta(key, value)

    def genesis_bytes(self) -> bytes:
        data = self.store.op_data(self.genesis_id)
        assert data is not None
        return data

    def membership(self) -> Op:
        """The held membership op that declares this site's key as a live member.

        Raises:
            UnknownSite: no held op declares it; Revoked: it was revoked or replaced.
        """
        pub = self.public_key
        state = opset.membership(self.ops().values())
        mine = sorted((info for info in state.members.values()
                       if info.member[1] == self.site and info.key == pub),
                      key=lambda info: (info.state != "live", info.role != "admin", info.member))
        if not mine:
            raise UnknownSite(f"site {self.site!r} is not admitted to this project yet; an admin "
                              f"runs `crdt-merge admit DIR {self.site} {pub.hex()}` and syncs")
        if mine[0].state != "live":
            raise Revoked(f"this replica's key for site {self.site!r} was {mine[0].state} by op "
                          f"{mine[0].ended_by}; ops it signs count nowhere. Ask an admin to "
                          f"admit a new key (`crdt-merge rotate-key`)")
        op = self.get_op(mine[0].member[0])
        assert op is not None
        return op

    def members(self) -> list[dict[str, Any]]:
        """Every member declared by a counted membership op: site, key fingerprint, role and
        state (live / revoked / replaced), by site then membership op id."""
        state = opset.membership(self.ops().values())
        return [{"site": info.member[1], "member": info.member[0],
                 "key": info.key.hex(), "fingerprint": fingerprint(info.key),
                 "role": info.role, "state": info.state, "ended_by": info.ended_by}
                for info in sorted(state.members.values(),
                                   key=lambda i: (i.member[1], i.member[0]))]

    # -- the op set -------------------------------------------------------------------------

    def ops(self) -> dict[str, Op]:
        """All committed ops by id (cached; reloaded when any process committed)."""
        with self._lock:
            if self.store.index.changed():
                ops: dict[str, Op] = {}
                bad = []
                for i, d in self.store.op_rows():
                    op = self._ops.get(i) or self._verified(i, d)
                    if op is None:
                        bad.append(i)
                    else:
                        ops[i] = op
                if bad:
                    self.store.index.quarantine_ops(bad)
                self._ops = ops
                self._root = None
            return self._ops

    @staticmethod
    def _verified(op_id: str, data: bytes) -> Op | None:
        """The op stored under ``op_id``, or None when its bytes are not that op (a
        flipped bit on disk): such a row is quarantined and the op fetched again."""
        try:
            op = opmod.decode(data)
        except (NonCanonicalEncoding, SchemaError):
            return None
        return op if op.id == op_id else None

    def recheck_ops(self) -> list[str]:
        """Verify every stored op's bytes against its id again (the cache trusted nothing
        it did not read); quarantine the rows that fail and return their ids."""
        bad = [op_id for op_id, data in self.store.op_rows()
               if self._verified(op_id, data) is None]
        if bad:
            self.store.index.quarantine_ops(bad)
        return bad

    def wanted_objects(self) -> list[str]:
        """Objects lost here (quarantined by a read or fsck) and wanted again from a peer."""
        return self.store.index.wanted()

    def quarantined_ops(self) -> list[str]:
        """Ops whose stored bytes failed their id, not yet fetched again from a peer."""
        self.ops()
        return self.store.index.quarantined_ops()

    def op_ids(self) -> list[str]:
        return sorted(self.ops())

    def get_op(self, op_id: str) -> Op | None:
        return self.ops().get(op_id)

    def state_root(self) -> StateRoot:
        # ops() and the root under one hold of the lock: another thread's reload between
        # the two would otherwise cache the root of the older op set until the next change
        with self._lock:
            ops = self.ops()
            if self._root is None:
                self._root = opset.root(ops.values())
            return self._root

    # -- objects ----------------------------------------------------------------------------

    def put_manifest(self, manifest: Manifest) -> ManifestId:
        return ManifestId(self.store.put(manifest.encode()))

    def get_manifest(self, manifest_id: str) -> Manifest:
        return manifests.decode(self.store.get(manifest_id))

    def objects_needed(self, op: Op, retracted: Collection[str] | None = None) -> list[str]:
        """The manifests ``op`` references; none for a contribute in ``retracted`` (default:
        :func:`~crdt_merge.crdt.opset.self_retracted` of the held ops), which a binding
        retract by its own member names and which is therefore never live again."""
        if op.kind == "contribute":
            if retracted is None:
                retracted = opset.self_retracted(self.ops().values())
            if op.id in retracted:
                return []
        return op.objects()

    def object_sizes(self, manifest_ids: Iterable[str]) -> dict[str, int]:
        """The declared length of every piece the given (held) manifests reference."""
        out: dict[str, int] = {}
        for mid in manifest_ids:
            out.update(self.get_manifest(mid).piece_sizes())
        return out

    def closure(self, manifest_ids: Iterable[str]) -> list[str]:
        """The manifests given plus every piece they reference (manifests must be held)."""
        out = dict.fromkeys(manifest_ids)
        for mid in list(out):
            out.update(dict.fromkeys(self.get_manifest(mid).piece_ids()))
        return list(out)

    # -- applying ops -------------------------------------------------------------------------

    def stage(self, data: bytes, source: str = "") -> Op:
        """Check an incoming op's encoding, structure and project, and stage it (from
        ``source``, for fair eviction).

        Raises:
            NonCanonicalEncoding, SchemaError, WrongProject.
        """
        op = opmod.decode(data)
        if op.project != self.genesis_id:
            raise WrongProject(self.genesis_id, op.project)
        if op.id not in self.ops():
            self.store.stage_op(op.id, op.data, self.staging, source=source)
        return op

    def staged(self) -> list[Op]:
        """The staged ops, unverified (after evicting those past :attr:`staging`)."""
        self.store.evict_staged(self.staging)
        out = []
        for op_id, data in self.store.staged_rows():
            op = self._verified(op_id, data)
            if op is None:
                self.store.unstage_op(op_id)
            else:
                out.append(op)
        return out

    def staged_ids(self) -> list[str]:
        return [op_id for op_id, _ in self.store.staged_rows()]

    def staged_count(self) -> int:
        return self.store.index.staged_count()

    def pending(self) -> list[Op]:
        """Staged ops that verify now: valid (formats.md section 6) given the held ops and
        the other staged ops that verify (in ``(clock, op id)`` order, so a batch of ops
        that depend on each other verifies at once); they wait only for objects. Only these
        decide what is fetched: an op nobody can verify decides nothing."""
        return list(self._verify_staged(self.staged(), None).values())

    def _verify_staged(self, staged: Iterable[Op], report: CommitReport | None
                       ) -> dict[str, Op]:
        """The staged ops valid given the held ops and each other, by id. With ``report``,
        the ones that can never be valid are unstaged and reported as rejected."""
        held = self.ops()
        valid: dict[str, Op] = {}
        view = ChainMap(valid, held).get  # type: ignore[arg-type]
        for op in opset.topological(staged):
            if any(view(r) is None for r in opmod.references(op)):
                continue  # waits for its deps or membership op
            try:
                opmod.verify(op, self.genesis_id, view)
            except DependencyMissing:
                continue
            except CrdtMergeError as exc:
                if report is not None:
                    self.store.unstage_op(op.id)
                    report.rejected[op.id] = exc
                continue
            valid[op.id] = op
        return valid

    def receive(self, ops: Iterable[bytes], source: str = "") -> CommitReport:
        """Take in ops from elsewhere (a push, a pull, a filesystem peer): every op is
        decoded and checked for its project first, and one malformed op refuses them all
        (nothing is staged); then, in ONE store transaction, the greatest self-supporting
        set of them and of the staged ops joins the state and the rest of them is staged
        (``source`` names where they came from, for fair eviction: :class:`StagingLimits`).
        A crash leaves the whole of it or none (:meth:`commit_staged`).

        Raises:
            NonCanonicalEncoding, SchemaError, WrongProject.
        """
        decoded = [opmod.decode(data) for data in ops]
        for op in decoded:
            if op.project != self.genesis_id:
                raise WrongProject(self.genesis_id, op.project)
        held = self.ops()
        already = sorted({op.id for op in decoded if op.id in held})
        report = self._join([op for op in decoded if op.id not in held], source)
        report.already = already
        return report

    def serve_ops(self, ids: Iterable[str]) -> list[bytes]:
        """The bytes of committed ops, in the order asked (verified: a corrupt row is never
        served).

        Raises:
            OpMissing: one of them is not held.
        """
        ops = self.ops()
        out = []
        for op_id in ids:
            if op_id not in ops:
                raise OpMissing(op_id)
            out.append(ops[op_id].data)
        return out

    def commit_staged(self) -> CommitReport:
        """Commit every staged op that is valid and whose references and objects are held;
        drop the ones that can never be valid (bad signature, bad clock, not a manifest).
        The ops that join, join in one store transaction (:meth:`_join`)."""
        return self._join([], "")

    def _join(self, incoming: list[Op], source: str, stage: bool = True) -> CommitReport:
        """Join the greatest self-supporting set of the staged ops and ``incoming`` in one
        store transaction, staging (with ``stage``) the incoming ops that cannot join yet.

        Validity is checked first for the ops whose references are held or are themselves
        valid ops of the batch; the ops that join are the greatest set of those whose every
        op has its references held or in the set and its objects held, or a binding retract
        by its own member held or in the set (:func:`opset.self_retracted`; a retract and
        its target support each other, an op that cannot join drops what relies on it).
        They are written in ``(clock, op id)`` order in one transaction that checks every
        object row, so a crash leaves all of them or none.
        """
        with self._lock:
            for _ in range(3):  # again when objects were lost between the check and the write
                report = CommitReport()
                held = self.ops()
                pending = {op.id: op for op in self.staged()}
                fresh = {op.id: op for op in incoming if op.id not in held and op.id not in pending}
                pending.update(fresh)
                valid = self._verify_staged(pending.values(), report)
                for op_id in report.rejected:
                    pending.pop(op_id, None)
                ready = dict(valid)
                changed = True
                while changed:
                    changed = False
                    retracted = opset.self_retracted([*held.values(), *ready.values()])
                    for op in list(ready.values()):
                        try:
                            needed = self.objects_needed(op, retracted)
                            ok = (all(r in held or r in ready for r in opmod.references(op))
                                  and not self.store.missing(needed)
                                  and not self.store.missing(self.closure(needed)))
                        except (IncompleteOp, PieceCorrupt, PieceMissing):
                            ok = False
                        except CrdtMergeError as exc:  # e.g. a manifest that is not one
                            self.store.unstage_op(op.id)
                            report.rejected[op.id] = exc
                            pending.pop(op.id, None)
                            ok = False
                        if not ok:
                            del ready[op.id]
                            changed = True
                retracted = opset.self_retracted([*held.values(), *ready.values()])
                waiting = [op for op in fresh.values()
                           if op.id not in ready and op.id not in report.rejected]
                try:
                    rows = [(op.id, op.kind, op.site, op.clock, op.data,
                             self.closure(self.objects_needed(op, retracted)))
                            for op in opset.topological(ready.values())]
                    report.committed = self.store.join_ops(
                        rows, [(op.id, op.data) for op in waiting] if stage else [],
                        source, self.staging)
                except (IncompleteOp, PieceCorrupt, PieceMissing):
                    continue  # objects lost meanwhile (wanted again): decide again
                report.waiting = sorted(set(pending) - set(ready))
                return report
            # objects kept vanishing under us: stage what came, commit nothing now
            if stage:  # not the ops refused (bad signature, clock...): they never join
                self.store.join_ops([], [(op.id, op.data) for op in fresh.values()
                                         if op.id not in report.rejected], source,
                                    self.staging)
            report.waiting = sorted(pending)
            return report

    def apply(self, data: bytes) -> OpId:
        """Commit one op (with the staged ops it completes); raise why when it cannot join
        the set now (it is not left staged)."""
        op = opmod.decode(data)
        if op.project != self.genesis_id:
            raise WrongProject(self.genesis_id, op.project)
        if op.id in self.ops():
            return op.id
        report = self._join([op], "", stage=False)
        if op.id in report.rejected:
            raise report.rejected[op.id]
        if op.id not in self.ops():
            self.store.unstage_op(op.id)
            if op.member not in self.ops():
                raise UnknownSite(f"op {op.id} relies on membership op {op.member}, "
                                  "which this replica does not hold")
            absent = [r for r in opmod.references(op) if r not in self.ops()]
            if absent:
                raise DependencyMissing(f"op {op.id} names op {absent[0]} in its deps, which "
                                        "this replica does not hold")
            missing = self.store.missing(self.objects_needed(op))
            if not missing:
                missing = self.store.missing(self.closure(self.objects_needed(op)))
            raise IncompleteOp(op.id, sorted(missing))
        return op.id

    # -- authoring ------------------------------------------------------------------------

    def new_body(self, kind: str, **fields: Any) -> dict[str, Any]:
        """The unsigned body of a new op by this site: its live membership op, the heads of
        the held ops as deps, and the clock they give."""
        member = self.membership()
        ops = list(self.ops().values())
        return {"v": opmod.VERSION, "kind": kind, "site": self.site,
                "clock": opset.next_clock(ops), "deps": opset.heads(ops),
                "project": self.genesis_id, "member": member.id, **fields}

    def _author(self, kind: str, fields: Mapping[str, Any], draft: bool = False) -> Op:
        op = opmod.sign(self.new_body(kind, **fields), self.key)
        if not draft:
            try:
                self.apply(op.data)
            except BaseException:
                # not in the set (Ctrl-C before its commit, a failure): not left staged
                # either, where the next command would commit it as a side effect
                if op.id not in self.ops():
                    self.store.unstage_op(op.id)
                raise
        return op

    def admit(self, site: str, public_key: bytes, role: str = "member") -> Op:
        """Admit a new member. Refused (:class:`SiteTaken`) while a live member holds the
        site name: revoke it first, or :meth:`rotate_key`."""
        if not opmod.SITE_NAME.fullmatch(site):
            raise SchemaError(f"site name {site!r}: use 1-64 of [a-z0-9_.-]")
        live = [m for m in self.members() if m["site"] == site and m["state"] == "live"]
        if live:
            raise SiteTaken(f"site {site!r} is already a live member (key {live[0]['fingerprint']}, "
                            f"op {live[0]['member']}); revoke it first (`crdt-merge revoke`) or "
                            "give it a new key (`crdt-merge rotate-key`)")
        return self._author("admit", {"admit": {"site": site, "key": bytes(public_key),
                                                "role": role}})

    def _live_member(self, site: str, member: str | None) -> dict[str, Any]:
        live = [m for m in self.members() if m["site"] == site and m["state"] == "live"
                and (member is None or m["member"] == member)]
        if not live:
            raise UnknownSite(f"no live member holds site {site!r}"
                              + (f" with membership op {member}" if member else ""))
        if len(live) > 1:
            raise SchemaError(f"site {site!r} is held by {len(live)} live members (concurrent "
                              "admits): name one with --member: "
                              + ", ".join(f"{m['member']} (key {m['fingerprint']})" for m in live))
        return live[0]

    def revoke(self, site: str, member: str | None = None) -> Op:
        """Revoke the live member holding ``site`` (``member``: its membership op id, needed
        when concurrent admits gave the name to more than one key). Admins only; never the
        last live admin."""
        target = self._live_member(site, member)
        return self._author("revoke", {"revoke": {"member": target["member"], "site": site}})

    def rotate_key(self, site: str, public_key: bytes, *, role: str | None = None,
                   member: str | None = None) -> Op:
        """Admit ``public_key`` for ``site`` in place of its live member's key, which is
        revoked at that point (its ops so far still count). Admins only."""
        old = self._live_member(site, member)
        if old["key"] == bytes(public_key).hex():
            raise SchemaError(f"that is already the key of {site!r}: rotate to a new key")
        return self._author("admit", {"admit": {"site": site, "key": bytes(public_key),
                                                "role": role or old["role"]},
                                      "replaces": old["member"]})

    def contribute(self, manifest_id: str, *, form: str = "full", base: str | None = None,
                   params: Mapping[str, Any] | None = None, label: str = "",
                   family: str = "", provenance: Mapping[str, Any] | None = None,
                   draft: bool = False) -> Op:
        """Author a contribution; with ``draft``, only return the signed op (not applied),
        so it can be planned before it is written."""
        fields: dict[str, Any] = {"manifest": check_id(manifest_id, "manifest id"),
                                  "form": form, "params": dict(params or {}),
                                  "label": label, "family": family}
        if base is not None:
            fields["base"] = check_id(base, "base manifest id")
        if provenance is not None:
            fields["provenance"] = dict(provenance)
        return self._author("contribute", fields, draft)

    def retract(self, op_ids: Iterable[str], draft: bool = False) -> Op:
        targets = sorted({check_id(i, "op id") for i in op_ids})
        for target in targets:
            held = self.get_op(target)
            if held is None:
                raise OpMissing(target)
            if held.kind != "contribute":
                raise SchemaError(f"op {target} is a {held.kind}, not a contribution")
        return self._author("retract", {"targets": targets}, draft)

    def set_recipe(self, method: str, params: Mapping[str, Any] | None = None, *,
                   anchor: str | None = None, draft: bool = False) -> Op:
        """Author a recipe. It supersedes every recipe in its causal past: every recipe this
        replica holds, which resolves a conflict. With ``draft``, only return the signed op
        (not applied)."""
        fields: dict[str, Any] = {"method": method, "params": dict(params or {})}
        if anchor is not None:
            fields["anchor"] = check_id(anchor, "anchor manifest id")
            self._check_anchor(fields["anchor"])
        return self._author("recipe", fields, draft)

    def _check_anchor(self, anchor: str) -> None:
        """Refuse, before authoring, an anchor whose manifest or pieces are not all held
        (the recipe op could not join the state), saying which and why."""
        if not self.store.has(anchor):
            raise IncompleteOp("(not authored)", [anchor], detail=(
                f"anchor manifest {anchor} is not in this replica; give the anchor as a model "
                "path or repo id (it is imported), or sync with a replica that holds it"))
        missing = self.store.missing(self.closure([anchor]))
        if not missing:
            return
        ops = self.ops().values()
        gone = opset.self_retracted(ops)
        retracted = sorted(op.id for op in ops if op.kind == "contribute"
                           and op.body["manifest"] == anchor and op.id in gone)
        why = (f"it is the model of contribution {retracted[0]}, which its site retracted, so "
               "syncs do not fetch its pieces" if retracted else
               "this replica holds the manifest but not all its pieces")
        raise IncompleteOp("(not authored)", sorted(missing), detail=(
            f"anchor manifest {anchor} lacks {len(missing)} of its pieces here: {why}. Import "
            "the model again (`--anchor PATH`), sync with a replica that holds every piece, "
            "or choose another anchor"))
