"""Ops: the immutable, signed, content-addressed changes a merge project is made of.

Every op is a canonical msgpack map (specs/formats.md section 6). Fields common to all kinds::

    v        2
    kind     "genesis" | "admit" | "revoke" | "contribute" | "retract" | "recipe"
    site     the author's site name
    clock    0 for a genesis; otherwise exactly 1 + the greatest clock of its deps
    project  the genesis op id (every kind but genesis)
    member   id of the membership op (genesis or admit) that declares the author's key
             (every kind but genesis)
    deps     the op ids its author had seen and no other seen op names (its heads):
             ascending, without repeats, 1 to MAX_DEPS of them (every kind but genesis)
    sig      Ed25519 signature (64 bytes) of SIGN_DOMAIN + encode(op without "sig")

``op_id = blake3(encode(op))``, signature included. Validity (:func:`verify`) is a pure
function of the op's bytes and the ops it references (deps and member, transitively): the
same on every replica. Whether a valid op *counts* (its author's key was not revoked before
it) is decided by :mod:`crdt_merge.crdt.opset` from the whole set.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from crdt_merge import codec
from crdt_merge.errors import (
    BadClock,
    BadSignature,
    DependencyMissing,
    FormatError,
    LastAdmin,
    NotAuthorized,
    SchemaError,
    SiteTaken,
    UnknownSite,
    WrongProject,
)
from crdt_merge.hashing import OpId, digest, is_id

VERSION = 2
SIGN_DOMAIN = b"crdt-merge/op/v2\x00"
KINDS = ("genesis", "admit", "revoke", "contribute", "retract", "recipe")
ROLES = ("admin", "member")
FORMS = ("full", "delta", "adapter")
#: most op ids one op may name in ``deps`` (an author with more heads names the greatest)
MAX_DEPS = 256
#: largest op encoding: every op fits in any request a server accepts
MAX_OP_BYTES = 256 * 1024
#: an op holds at most ``len(op) // OP_MIN_ITEM_BYTES + OP_ITEM_SLACK`` array elements and
#: map pairs (each array and map counts one more): its own element budget, whatever
#: message carries it, so decoding an op costs a bounded multiple of its size (formats.md 6)
OP_MIN_ITEM_BYTES = 4
OP_ITEM_SLACK = 16

#: protocol profiles: name -> piece size in bytes
PROFILES = {"v1": 16 * 1024 * 1024, "test": 4096}

#: a site name: 1-64 of ``[a-z0-9_.-]``, starting with a letter or digit
SITE_NAME = re.compile(r"[a-z0-9][a-z0-9_.\-]{0,63}")
_METHOD = re.compile(r"[a-z][a-z0-9_]{0,63}")
_PARAM_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,127}")
_COMMON = {"v", "kind", "site", "clock", "sig"}
_REF = {"project", "member", "deps"}
_FIELDS: dict[str, tuple[set[str], set[str]]] = {  # kind -> (required, optional), besides common
    "genesis": ({"name", "nonce", "profile", "sites"}, set()),
    "admit": (_REF | {"admit"}, {"replaces"}),
    "revoke": (_REF | {"revoke"}, set()),
    "contribute": (_REF | {"manifest", "form", "params", "label", "family"},
                   {"base", "provenance"}),
    "retract": (_REF | {"targets"}, set()),
    "recipe": (_REF | {"method", "params"}, {"anchor"}),
}
MEMBERSHIP_KINDS = ("genesis", "admit")


@dataclass(frozen=True)
class Op:
    """A decoded, structurally valid op. ``data`` is its exact bytes, ``id`` their hash."""

    id: OpId
    data: bytes
    body: Mapping[str, Any]

    @property
    def kind(self) -> str:
        return self.body["kind"]

    @property
    def site(self) -> str:
        return self.body["site"]

    @property
    def clock(self) -> int:
        return self.body["clock"]

    @property
    def member(self) -> str | None:
        return self.body.get("member")

    @property
    def project(self) -> str:
        return self.id if self.kind == "genesis" else self.body["project"]

    @property
    def deps(self) -> list[str]:
        return self.body.get("deps", [])

    @property
    def author(self) -> tuple[str, str] | None:
        """The member that signed it: (membership op id, site); None for a genesis, whose
        signer is one of the members it declares."""
        return None if self.kind == "genesis" else (self.body["member"], self.site)

    def declares(self) -> dict[tuple[str, str], tuple[bytes, str]]:
        """For a membership op: member (its id, site) -> (public key, role) it declares."""
        if self.kind == "genesis":
            return {(self.id, name): (e["key"], e["role"]) for name, e in self.body["sites"].items()}
        if self.kind == "admit":
            a = self.body["admit"]
            return {(self.id, a["site"]): (a["key"], a["role"])}
        return {}

    def objects(self) -> list[str]:
        """Object ids this op references (manifests), which must be held before it is."""
        b = self.body
        if self.kind == "contribute":
            return [b["manifest"]] + ([b["base"]] if "base" in b else [])
        if self.kind == "recipe" and "anchor" in b:
            return [b["anchor"]]
        return []

    def site_key(self, site: str) -> tuple[bytes, str] | None:
        """For a membership op (genesis or admit): the (public key, role) it declares for
        ``site``, or None."""
        return self.declares().get((self.id, site))


def _is_int(value: Any) -> bool:
    """An integer that is not a bool (msgpack keeps them apart; Python's ``True == 1``)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _bad(msg: str) -> SchemaError:
    return SchemaError(f"invalid op: {msg}")


def _check_params(value: Any, where: str, depth: int = 0) -> None:
    """Parameter values: canonical decimal strings, other strings, bools, ints, and lists
    or maps of these. A string that reads as a number must be a canonical decimal, so that
    ``0.3`` and ``0.30`` are one value."""
    if depth > 8:
        raise _bad(f"{where} nests too deep")
    if isinstance(value, str):
        if len(value) > 4096:
            raise _bad(f"{where}: string too long")
        if codec.looks_numeric(value) and not codec.is_canonical_decimal(value):
            try:
                hint = f" (write {codec.canonical_decimal(value)!r})"
            except FormatError:
                hint = ""
            raise _bad(f"{where}: {value[:40]!r} is not a canonical decimal{hint}")
    elif isinstance(value, (bool, int)):
        pass
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_params(v, f"{where}[{i}]", depth + 1)
    elif isinstance(value, dict):
        for k, v in value.items():
            if not _PARAM_KEY.fullmatch(k):
                raise _bad(f"{where}: parameter name {k[:40]!r} is not allowed")
            _check_params(v, f"{where}.{k}", depth + 1)
    else:
        raise _bad(f"{where}: {type(value).__name__} is not a parameter value")


def _sorted_ids(value: Any, where: str, nonempty: bool) -> None:
    if not isinstance(value, list) or not all(is_id(x) for x in value):
        raise _bad(f"{where} must be a list of 64-hex op ids")
    if value != sorted(set(value)) or (nonempty and not value):
        raise _bad(f"{where} must be sorted, without repeats" + (", non-empty" if nonempty else ""))


def _check_key(entry: Any, where: str) -> None:
    if not isinstance(entry, dict) or set(entry) != {"key", "role"}:
        raise _bad(f"{where}: expected fields key, role")
    if not isinstance(entry["key"], bytes) or len(entry["key"]) != 32:
        raise _bad(f"{where}: key must be 32 bytes (Ed25519 public key)")
    if entry["role"] not in ROLES:
        raise _bad(f"{where}: role must be one of {ROLES}")


def check_structure(body: Any) -> None:
    """Raise :class:`SchemaError` unless ``body`` has the fields and types of its kind."""
    if not isinstance(body, dict):
        raise _bad("not a map")
    kind = body.get("kind")
    if not isinstance(kind, str) or kind not in _FIELDS:
        raise _bad(f"unknown kind {kind!r}")
    required, optional = _FIELDS[kind]
    keys = set(body)
    if not (_COMMON | required) <= keys or not keys <= (_COMMON | required | optional):
        raise _bad(f"a {kind} op has fields {sorted(_COMMON | required)}"
                   + (f" and optionally {sorted(optional)}" if optional else "")
                   + f", got {sorted(keys)}")
    if not _is_int(body["v"]) or body["v"] != VERSION:
        raise _bad(f"unsupported version {body['v']!r}")
    if not isinstance(body["site"], str) or not SITE_NAME.fullmatch(body["site"]):
        raise _bad("site must be 1-64 of [a-z0-9_.-], starting with a letter or digit")
    clock = body["clock"]
    if not _is_int(clock) or not 0 <= clock < 2**63:
        raise _bad("clock must be a non-negative integer")
    if not isinstance(body["sig"], bytes) or len(body["sig"]) != 64:
        raise _bad("sig must be 64 bytes")
    for field in ("project", "member", "manifest", "base", "anchor", "replaces"):
        if field in body and not is_id(body[field]):
            raise _bad(f"{field} must be a 64-hex id")
    if kind != "genesis":
        _sorted_ids(body["deps"], "deps", nonempty=True)
        if len(body["deps"]) > MAX_DEPS:
            raise _bad(f"deps names {len(body['deps'])} ops; at most {MAX_DEPS}")
        if clock < 1:
            raise _bad("an op other than a genesis has clock >= 1 (1 + the clock of its deps)")
    if kind == "genesis":
        if not isinstance(body["name"], str) or not 0 < len(body["name"]) <= 200:
            raise _bad("name must be a non-empty string")
        if not isinstance(body["nonce"], bytes) or len(body["nonce"]) != 16:
            raise _bad("nonce must be 16 bytes")
        profile = body["profile"]
        if (not isinstance(profile, dict) or set(profile) != {"name", "piece_size"}
                or not isinstance(profile["name"], str) or not _is_int(profile["piece_size"])
                or PROFILES.get(profile["name"]) != profile["piece_size"]):
            raise _bad(f"profile must be one of {PROFILES}")
        sites = body["sites"]
        if not isinstance(sites, dict) or not sites:
            raise _bad("sites must be a non-empty map")
        for name, entry in sites.items():
            if not SITE_NAME.fullmatch(name):
                raise _bad(f"site name {name[:40]!r} is not allowed")
            _check_key(entry, f"sites.{name}")
        if clock != 0:
            raise _bad("a genesis has clock 0")
    elif kind == "admit":
        a = body["admit"]
        if not isinstance(a, dict) or set(a) != {"site", "key", "role"}:
            raise _bad("admit must have fields site, key, role")
        if not isinstance(a["site"], str) or not SITE_NAME.fullmatch(a["site"]):
            raise _bad("admit.site is not an allowed site name")
        _check_key({"key": a["key"], "role": a["role"]}, "admit")
    elif kind == "revoke":
        r = body["revoke"]
        if not isinstance(r, dict) or set(r) != {"member", "site"}:
            raise _bad("revoke must have fields member, site")
        if not is_id(r["member"]):
            raise _bad("revoke.member must be a 64-hex op id")
        if not isinstance(r["site"], str) or not SITE_NAME.fullmatch(r["site"]):
            raise _bad("revoke.site is not an allowed site name")
    elif kind == "contribute":
        if body["form"] not in FORMS:
            raise _bad(f"form must be one of {FORMS}")
        if body["form"] in ("delta", "adapter") and "base" not in body:
            raise _bad(f"a {body['form']} contribution names its base")
        if "provenance" in body:
            if not isinstance(body["provenance"], dict):
                raise _bad("provenance must be a map")
            _check_params(body["provenance"], "provenance")
        for field in ("label", "family"):
            if not isinstance(body[field], str) or len(body[field]) > 200:
                raise _bad(f"{field} must be a string of at most 200 characters")
        if not isinstance(body["params"], dict):
            raise _bad("params must be a map")
        _check_params(body["params"], "params")
    elif kind == "retract":
        _sorted_ids(body["targets"], "targets", nonempty=True)
    elif kind == "recipe":
        if not isinstance(body["method"], str) or not _METHOD.fullmatch(body["method"]):
            raise _bad("method must be a lowercase name")
        if not isinstance(body["params"], dict):
            raise _bad("params must be a map")
        _check_params(body["params"], "params")


def decode(data: bytes) -> Op:
    """Decode op bytes and check their structure (not the signature: see :func:`verify`).

    Raises:
        NonCanonicalEncoding, SchemaError.
    """
    if len(data) > MAX_OP_BYTES:
        raise _bad(f"{len(data)} bytes; an op is at most {MAX_OP_BYTES}")
    body = codec.decode(data, max_items=len(data) // OP_MIN_ITEM_BYTES + OP_ITEM_SLACK)
    check_structure(body)
    return Op(OpId(digest(data)), bytes(data), body)


def signing_bytes(body: Mapping[str, Any]) -> bytes:
    return SIGN_DOMAIN + codec.encode({k: v for k, v in body.items() if k != "sig"})


def sign(body: Mapping[str, Any], key: Ed25519PrivateKey) -> Op:
    """Sign an op body (without ``sig``) and return the op, structurally checked."""
    unsigned = {k: v for k, v in body.items() if k != "sig"}
    signed = dict(unsigned, sig=key.sign(signing_bytes(unsigned)))
    return decode(codec.encode(signed))


def _verify_sig(op: Op, public_key: bytes) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(op.body["sig"],
                                                              signing_bytes(op.body))
    except (InvalidSignature, ValueError):
        raise BadSignature(f"op {op.id} is not signed by the key of site {op.site!r}") from None


def causal_past(op: Op, get_op: Callable[[str], Op | None]) -> dict[str, Op]:
    """The ops ``op`` has seen: its deps, their deps, and so on (not ``op`` itself).

    Raises:
        DependencyMissing: one of them is not held.
    """
    out: dict[str, Op] = {}
    todo = list(op.deps)
    while todo:
        op_id = todo.pop()
        if op_id in out:
            continue
        held = get_op(op_id)
        if held is None:
            raise DependencyMissing(f"op {op.id} has op {op_id} in its causal past, which this "
                                    "replica does not hold; it waits until a sync brings it")
        out[op_id] = held
        todo.extend(d for d in held.deps if d not in out)
    return out


def live_in_view(view: Mapping[str, Op]) -> dict[tuple[str, str], tuple[bytes, str]]:
    """The members a set of ops declares and does not revoke or replace: (membership op id,
    site) -> (key, role). Used for validity, in an op's causal past (its *view*)."""
    members: dict[tuple[str, str], tuple[bytes, str]] = {}
    gone: set[tuple[str, str]] = set()
    for op in view.values():
        members.update(op.declares())
        if op.kind == "revoke":
            gone.add((op.body["revoke"]["member"], op.body["revoke"]["site"]))
        elif op.kind == "admit" and "replaces" in op.body:
            gone.add((op.body["replaces"], op.body["admit"]["site"]))
    return {m: v for m, v in members.items() if m not in gone}


def verify(op: Op, project: str | None, get_op: Callable[[str], Op | None]) -> None:
    """Check what the structure cannot: project, references, clock, role, the membership
    rules of admits and revokes, and the signature.

    ``get_op`` returns a held op by id (or None). The answer depends only on ``op`` and the
    ops it references, so every replica decides the same.

    Raises:
        WrongProject, UnknownSite, DependencyMissing (the op must wait), BadClock,
        NotAuthorized (SiteTaken, LastAdmin), BadSignature.
    """
    if op.kind == "genesis":
        entry = op.body["sites"].get(op.site)
        if entry is None or entry["role"] != "admin":
            raise UnknownSite(f"genesis {op.id} is signed by {op.site!r}, which it does not "
                              "declare as an admin")
        if project is not None and project != op.id:
            raise WrongProject(project, op.id)
        _verify_sig(op, entry["key"])
        return
    if project is not None and op.body["project"] != project:
        raise WrongProject(project, op.body["project"])
    member = get_op(op.body["member"])
    if member is None or member.kind not in MEMBERSHIP_KINDS or member.project != op.project:
        raise UnknownSite(f"op {op.id} by {op.site!r} relies on membership op "
                          f"{op.body['member']}, which this replica does not hold")
    declared = member.declares().get((member.id, op.site))
    if declared is None:
        raise UnknownSite(f"membership op {member.id} does not declare site {op.site!r}")
    key, role = declared
    _verify_sig(op, key)  # before the deps: forged bytes are refused, never left waiting
    deps = [get_op(d) for d in op.deps]
    missing = [d for d, held in zip(op.deps, deps, strict=True) if held is None]
    if missing:
        raise DependencyMissing(f"op {op.id} names {len(missing)} op(s) in deps this replica "
                                f"does not hold (first {missing[0]}); it waits until a sync "
                                "brings them")
    if any(d.project != op.project for d in deps if d is not None):
        raise WrongProject(op.project, next(d.project for d in deps
                                            if d is not None and d.project != op.project))
    want = 1 + max(d.clock for d in deps if d is not None)
    if op.clock != want:
        raise BadClock(f"op {op.id} has clock {op.clock}; its deps make it exactly {want}")
    if member.clock >= op.clock:
        raise BadClock(f"op {op.id} (clock {op.clock}) relies on membership op {member.id} "
                       f"with clock {member.clock}: a membership op comes before the ops "
                       "that rely on it")
    if op.kind in ("admit", "revoke"):
        if role != "admin":
            raise NotAuthorized(f"site {op.site!r} is not an admin and cannot {op.kind} members")
        _check_membership_change(op, causal_past(op, get_op))


def _admins(members: Mapping[tuple[str, str], tuple[bytes, str]]) -> set[tuple[str, str]]:
    return {m for m, (_key, role) in members.items() if role == "admin"}


def _check_membership_change(op: Op, view: Mapping[str, Op]) -> None:
    """The rules of admit and revoke, judged in the op's causal past (its view)."""
    live = live_in_view(view)
    if op.kind == "admit":
        a = op.body["admit"]
        if "replaces" in op.body:
            old = (op.body["replaces"], a["site"])
            if old not in live:
                raise NotAuthorized(f"admit {op.id} replaces member {old[1]!r} of op "
                                    f"{old[0]}, which is not a live member in its causal past")
            if not (_admins(live) - {old}) and a["role"] != "admin":
                raise LastAdmin(f"admit {op.id} would replace the last live admin with a "
                                "member")
            return
        taken = sorted(m for m in live if m[1] == a["site"])
        if taken:
            raise SiteTaken(f"site {a['site']!r} is held by the live member of op "
                            f"{taken[0][0]}; revoke it first, or rotate its key "
                            "(an admit that replaces it)")
        return
    target = (op.body["revoke"]["member"], op.body["revoke"]["site"])
    if target not in live:
        raise NotAuthorized(f"revoke {op.id} names member {target[1]!r} of op {target[0]}, "
                            "which is not a live member in its causal past")
    if not _admins(live) - {target}:
        raise LastAdmin(f"revoke {op.id} would leave the project without a live admin")


def references(op: Op) -> list[str]:
    """Op ids that must be held before ``op`` can be verified: its deps and its membership
    op (which its deps' causal past may or may not hold)."""
    if op.kind == "genesis":
        return []
    return sorted(set(op.deps) | {op.body["member"]})


def new_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)
