"""Hostile bytes against every decoder: canonical msgpack, ops, manifests, the wire bodies,
reconciliation messages and safetensors import.

For each, Hypothesis feeds arbitrary bytes, valid encodings damaged at the byte level (bit
flips, truncations, extensions, inserted length prefixes) and valid values edited at the
structure level (a field of another type, a field removed or added), then re-encoded. Only
errors of the project's tree (:class:`crdt_merge.errors.CrdtMergeError`) may escape, never a
KeyError, TypeError, IndexError, plain ValueError, RecursionError or MemoryError; whatever a
decoder accepts re-encodes to the same bytes; and valid values round trip. A model file that
import refuses leaves the replica as it was, and what import stores, the manifest decoder
accepts. Budgets and the bigger documented run: tests/reliability/fuzzing.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from crdt_merge import codec
from crdt_merge.crdt import ops as opmod
from crdt_merge.errors import (
    BadId,
    CrdtMergeError,
    ModelImportError,
    NonCanonicalEncoding,
    PeerError,
    PieceMissing,
    SchemaError,
)
from crdt_merge.hashing import digest
from crdt_merge.replica import Replica
from crdt_merge.store import manifests
from crdt_merge.store.importer import import_model
from crdt_merge.store.manifests import DTYPE_SIZES, FileRecord, Manifest, TensorRecord
from crdt_merge.sync import reconcile, wire
from tests.reliability.fuzzing import (
    count,
    edited,
    fuzz_settings,
    loose_encoding,
    mutated,
    restore,
    snapshot,
    u64,
    values,
)
from tests.server.http_helpers import new_project

VECTORS = Path(__file__).resolve().parents[2] / "specs" / "vectors"


def _load(name: str) -> dict[str, Any]:
    return json.loads((VECTORS / name).read_text())


OPS = _load("ops.json")
MANIFESTS = _load("manifests.json")
MSGPACK = _load("msgpack.json")
KEYS = {name: Ed25519PrivateKey.from_private_bytes(bytes.fromhex(k["seed"]))
        for name, k in OPS["keys"].items()}
OP_SEEDS = [bytes.fromhex(o["hex"]) for o in OPS["ops"]]
HELD = {digest(data): opmod.decode(data) for data in OP_SEEDS}
GENESIS = opmod.decode(OP_SEEDS[0])
MANIFEST_SEEDS = [bytes.fromhex(m["hex"]) for m in MANIFESTS["manifests"]]
REJECTED = ([bytes.fromhex(r["hex"]) for r in MSGPACK["rejected"]]
            + [bytes.fromhex(r["hex"]) for r in OPS["rejected"]]
            + [bytes.fromhex(r["hex"]) for r in MANIFESTS["invalid"]])
CANONICAL = [bytes.fromhex(c["hex"]) for c in MSGPACK["canonical"]]
SEEDS = CANONICAL + OP_SEEDS + MANIFEST_SEEDS + REJECTED


ids = st.binary(min_size=1, max_size=8).map(digest)
#: values a field of an op or manifest might plausibly be replaced with
field_values = (values(max_leaves=6) | ids | st.binary(min_size=16, max_size=16)
                | st.binary(min_size=32, max_size=32) | st.binary(min_size=64, max_size=64)
                | st.sampled_from(["genesis", "admit", "contribute", "retract", "recipe", "full",
                                   "delta", "admin", "member", "test", "v1", "F32", "BF16",
                                   "0.30", "1e3", "-0", "", "a" * 300, True, 1, 0, -1, 2**63,
                                   4096, 2**31 + 1, [], {}, None]))


REFUSED = object()


def typed(call: Callable[[], Any], *allowed: type[BaseException]) -> Any:
    """Run a decoder: return its value, or REFUSED when it raised one of ``allowed``
    (default: any error of the project's tree). Anything else fails the test, with its type."""
    allowed = allowed or (CrdtMergeError,)
    try:
        return call()
    except allowed:
        return REFUSED
    except Exception as exc:  # noqa: BLE001 - the point: nothing else may escape
        raise AssertionError(f"untyped {type(exc).__name__} escaped: {exc!r:.300}") from exc


def hostile(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, loose msgpack, and the seeds damaged at the byte level."""
    return st.one_of(
        st.binary(max_size=200),
        loose_encoding(),
        st.sampled_from(seeds).flatmap(lambda s: mutated(s)),
    )


def edited_encoding(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    """The seeds decoded, edited at the structure level, and encoded canonically again."""
    return st.sampled_from(seeds).map(codec.decode).flatmap(
        lambda v: edited(v, field_values)).map(codec.encode)


# -- canonical msgpack ------------------------------------------------------------------------


@fuzz_settings(300)
@given(data=hostile(SEEDS))
def test_codec_decode_accepts_only_canonical_bytes(data: bytes) -> None:
    value = typed(lambda: codec.decode(data), NonCanonicalEncoding)
    count("codec.decode (hostile bytes)", "refused" if value is REFUSED else "accepted")
    if value is not REFUSED:
        assert codec.encode(value) == data


@fuzz_settings(100)
@given(value=values(max_leaves=30))
def test_codec_round_trips(value: Any) -> None:
    count("codec.decode (round trip)")
    data = codec.encode(value)
    assert codec.decode(data) == value
    assert codec.encode(codec.decode(data)) == data


def test_codec_refuses_deep_and_huge_inputs() -> None:
    """Nesting far beyond the depth limit and lengths far beyond the input: refused as
    non-canonical, without recursing or allocating for the claimed size."""
    for data in (b"\x91" * 100_000 + b"\xc0", b"\x81\xa1a" * 50_000 + b"\xc0",
                 b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff",
                 b"\xdb\xff\xff\xff\xffabc"):
        assert typed(lambda d=data: codec.decode(d), NonCanonicalEncoding) is REFUSED
    assert typed(lambda: codec.decode(b"\x91" * 33 + b"\xc0"), NonCanonicalEncoding) is REFUSED


# -- ops --------------------------------------------------------------------------------------


def check_op(data: bytes, target: str) -> None:
    op = typed(lambda: opmod.decode(data), NonCanonicalEncoding, SchemaError)
    count(target, "refused" if op is REFUSED else "accepted")
    if op is REFUSED:
        return
    assert op.data == data and op.id == digest(data) and codec.encode(op.body) == data
    # what decode accepts, verification judges without crashing, against the vector ops
    typed(lambda: opmod.verify(op, GENESIS.id, HELD.get))
    typed(lambda: opmod.verify(op, None, HELD.get))
    op.objects()
    opmod.references(op)


@fuzz_settings(200)
@given(data=hostile(OP_SEEDS))
def test_op_decoder_on_damaged_bytes(data: bytes) -> None:
    check_op(data, "ops.decode (damaged bytes)")


@fuzz_settings(200)
@given(data=edited_encoding(OP_SEEDS))
def test_op_decoder_on_edited_ops(data: bytes) -> None:
    check_op(data, "ops.decode (edited fields)")


param_keys = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.\-]{0,10}", fullmatch=True)
param_leaves = (st.booleans() | st.integers(-(2**63), 2**64 - 1)
                | st.decimals(allow_nan=False, allow_infinity=False, places=4).map(
                    codec.canonical_decimal)
                | st.text(st.characters(blacklist_categories=["Cs", "Nd"]), max_size=12).filter(
                    lambda s: not codec.looks_numeric(s)))
params = st.dictionaries(param_keys, st.recursive(
    param_leaves, lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(param_keys, inner, max_size=3), max_leaves=8), max_size=4)
sites = st.from_regex(r"[a-z0-9][a-z0-9_.\-]{0,12}", fullmatch=True)
sorted_ids = st.lists(ids, max_size=4, unique=True).map(sorted)


@st.composite
def valid_op_bodies(draw: st.DrawFn) -> tuple[dict[str, Any], Ed25519PrivateKey]:
    kind = draw(st.sampled_from(["admit", "contribute", "retract", "recipe"]))
    body: dict[str, Any] = {"v": opmod.VERSION, "kind": kind, "site": "alice", "clock": 1,
                            "deps": [GENESIS.id], "project": GENESIS.id, "member": GENESIS.id}
    if kind == "admit":
        key = draw(st.binary(min_size=32, max_size=32))
        body["admit"] = {"site": draw(sites.filter(lambda s: s != "alice")), "key": key,
                         "role": draw(st.sampled_from(["admin", "member"]))}
    elif kind == "contribute":
        body |= {"manifest": draw(ids),
                 "form": draw(st.sampled_from(["full", "delta", "adapter"])),
                 "params": draw(params), "label": draw(st.text(max_size=20)),
                 "family": draw(st.text(max_size=20))}
        if body["form"] != "full" or draw(st.booleans()):
            body["base"] = draw(ids)
        if draw(st.booleans()):
            body["provenance"] = draw(params)
    elif kind == "retract":
        body["targets"] = draw(sorted_ids.filter(bool))
    else:
        body |= {"method": draw(st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True)),
                 "params": draw(params)}
        if draw(st.booleans()):
            body["anchor"] = draw(ids)
    return body, KEYS["alice"]


@fuzz_settings(100)
@given(made=valid_op_bodies())
def test_valid_ops_round_trip_and_verify(made: tuple[dict[str, Any], Ed25519PrivateKey]) -> None:
    count("ops.decode (round trip, signed)")
    body, key = made
    op = opmod.sign(body, key)
    again = opmod.decode(codec.encode(dict(op.body)))
    assert again == op and {k: v for k, v in again.body.items() if k != "sig"} == body
    opmod.verify(again, GENESIS.id, HELD.get)  # alice is the genesis admin: valid


# -- manifests --------------------------------------------------------------------------------


def check_manifest(data: bytes, target: str) -> None:
    m = typed(lambda: manifests.decode(data), NonCanonicalEncoding, SchemaError)
    count(target, "refused" if m is REFUSED else "accepted")
    if m is not REFUSED:
        assert m.encode() == data
        for rec in m.tensors.values():
            assert len(rec.pieces) == manifests.piece_count(rec.nbytes, m.piece_size)
        list(m.piece_ids())


@fuzz_settings(200)
@given(data=hostile(MANIFEST_SEEDS))
def test_manifest_decoder_on_damaged_bytes(data: bytes) -> None:
    check_manifest(data, "manifests.decode (damaged bytes)")


@fuzz_settings(200)
@given(data=edited_encoding(MANIFEST_SEEDS))
def test_manifest_decoder_on_edited_manifests(data: bytes) -> None:
    check_manifest(data, "manifests.decode (edited fields)")


tensor_names = st.text(min_size=1, max_size=30)
file_names = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,20}", fullmatch=True).filter(
    lambda n: ".." not in n)


@st.composite
def valid_manifests(draw: st.DrawFn) -> Manifest:
    piece_size = draw(st.sampled_from([64, 4096, 2**31]))

    def pieces(nbytes: int) -> tuple[str, ...]:
        n = manifests.piece_count(nbytes, piece_size)
        return tuple(draw(st.lists(ids, min_size=n, max_size=n)))

    tensors = {}
    for name in draw(st.lists(tensor_names, max_size=3, unique=True)):
        dtype = draw(st.sampled_from(sorted(DTYPE_SIZES)))
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        tensors[name] = TensorRecord(dtype, shape,
                                     pieces(math.prod(shape) * DTYPE_SIZES[dtype]))
    files = {}
    for name in draw(st.lists(file_names, max_size=2, unique=True)):
        size = draw(st.integers(0, 200))
        files[name] = FileRecord(size, pieces(size))
    meta = draw(st.dictionaries(st.text(max_size=8), values(max_leaves=4), max_size=3))
    return Manifest(piece_size, tensors, files, meta)


@fuzz_settings(100)
@given(m=valid_manifests())
def test_valid_manifests_round_trip(m: Manifest) -> None:
    count("manifests.decode (round trip)")
    again = manifests.decode(m.encode())
    assert again.encode() == m.encode() and again.id == m.id
    assert again.tensors == m.tensors and again.files == m.files


# -- wire bodies ------------------------------------------------------------------------------


WIRE_SEEDS = [codec.encode({"ids": [digest(b"a"), digest(b"b")]}), codec.encode({"ops": OP_SEEDS}),
              codec.encode({"ids": []}), codec.encode({"ops": []})]


@fuzz_settings(200)
@given(data=hostile(WIRE_SEEDS) | edited_encoding(WIRE_SEEDS),
       fields=st.sampled_from([{"ids": list}, {"ops": list}]))
def test_wire_request_bodies(data: bytes, fields: dict[str, type]) -> None:
    value = typed(lambda: wire.decode_map(data, fields), NonCanonicalEncoding, SchemaError)
    count("wire.decode_map + id_list", "refused" if value is REFUSED else "accepted")
    if value is REFUSED:
        return
    assert set(value) == set(fields)
    if "ids" in fields:
        checked = typed(lambda: wire.id_list(value["ids"], "op id"), BadId)
        assert checked is REFUSED or checked == value["ids"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                 max_size=4),
    max_leaves=12)
codes = st.sampled_from(["piece_missing", "hash_mismatch", "bad_id", "body_too_large",
                         "unauthenticated", "no_such_code", "", "crdt_merge_error"])
field_names = st.sampled_from(["detail", "code", "args", "piece_id", "expected", "limit",
                               "__class__", "__dict__", "with_traceback", "_x", "1x", "a b"])


@st.composite
def error_bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["json", "json", "json", "partial", "raw", "deep", "digits"]))
    if kind == "raw":
        return draw(st.binary(max_size=100))
    if kind == "deep":
        n = draw(st.integers(1_000, 5_000))  # json recurses once per level
        return draw(st.sampled_from([b"[" * n, b'{"code": ' + b"[" * n, b"[" * n + b"]" * n]))
    if kind == "digits":
        return b'{"code": "bad_id", "detail": "x", "fields": {"limit": ' + b"7" * 5000 + b"}}"
    body = {"code": draw(codes | st.text(max_size=8) | json_values),
            "detail": draw(st.text(max_size=20) | json_values),
            "fields": draw(st.dictionaries(field_names | st.text(max_size=6), json_values,
                                           max_size=4) | json_values)}
    if kind == "json":
        body["code"], body["detail"] = draw(codes), draw(st.text(max_size=20))
        body["fields"] = draw(st.dictionaries(field_names, json_values, min_size=1, max_size=4))
    else:
        for name in draw(st.sets(st.sampled_from(sorted(body)), min_size=1)):
            del body[name]
    return json.dumps(body).encode()


@fuzz_settings(200)
@given(status=st.sampled_from([400, 401, 403, 404, 413, 422, 500, 502, 503]), body=error_bodies())
def test_error_bodies_from_a_hostile_peer(status: int, body: bytes) -> None:
    """A client rebuilds the error a peer answered: always one of ours, its ``detail`` a
    string, whatever the body holds."""
    exc = wire.error_from_body(status, body)  # raising anything at all fails
    count("wire.error_from_body", exc.code)
    assert isinstance(exc, CrdtMergeError)
    assert isinstance(exc.code, str) and isinstance(exc.detail, str)
    str(exc)


# -- reconciliation messages ------------------------------------------------------------------


raw_ids = st.lists(st.binary(min_size=32, max_size=32), max_size=120, unique=True)


@st.composite
def exchanges(draw: st.DrawFn) -> tuple[reconcile.IdIndex, list[bytes], list[bytes]]:
    """A responder's index, and the messages and answers of a real reconciliation with it."""
    shared = draw(raw_ids)
    mine = shared + draw(raw_ids)
    theirs = shared[: draw(st.integers(0, len(shared)))] + draw(raw_ids)
    index = reconcile.IdIndex(theirs)
    init = reconcile.Initiator(mine)
    messages: list[bytes] = []
    answers: list[bytes] = []
    message: bytes | None = init.start()
    while message is not None and len(messages) < 8:
        messages.append(message)
        answers.append(reconcile.respond(index, message))
        message = init.step(answers[-1])
    return index, messages, answers


@fuzz_settings(50)
@given(exchange=exchanges())
def test_reconcile_messages_round_trip(exchange: tuple[Any, list[bytes], list[bytes]]) -> None:
    count("reconcile.decode (round trip)")
    _, messages, answers = exchange
    for data, responder in [(m, True) for m in messages] + [(a, False) for a in answers]:
        assert reconcile.encode(reconcile.decode(data, responder=responder)) == data


@st.composite
def hostile_messages(draw: st.DrawFn) -> tuple[reconcile.IdIndex, bytes, bool]:
    index, messages, answers = draw(exchanges())
    responder = draw(st.booleans())
    seeds = messages if responder else answers
    seed = draw(st.sampled_from(seeds))
    how = draw(st.sampled_from(["bytes", "edit", "random"]))
    if how == "bytes":
        data = draw(mutated(seed))
    elif how == "edit":
        replacements = (field_values | st.sampled_from([0, 1, 2, 3, b"", b"\x00" * 33])
                        | st.binary(min_size=16, max_size=16))
        data = codec.encode(draw(edited(codec.decode(seed), replacements)))
    else:
        data = draw(st.binary(max_size=100) | loose_encoding())
    return index, data, responder


@fuzz_settings(200)
@given(case=hostile_messages())
def test_reconcile_decoders_on_hostile_messages(case: tuple[Any, bytes, bool]) -> None:
    """The responder (the server, facing any client) and the initiator (the client, facing
    any server) answer a damaged message with a typed error or a well-formed message."""
    index, data, responder = case
    ok = typed(lambda: reconcile.decode(data, responder=responder), NonCanonicalEncoding,
               SchemaError)
    count("reconcile.decode/respond/step", "refused" if ok is REFUSED else "accepted")
    if responder:
        answer = typed(lambda: reconcile.respond(index, data), NonCanonicalEncoding, SchemaError)
        assert (answer is REFUSED) == (ok is REFUSED)
        if answer is not REFUSED:
            reconcile.decode(answer, responder=False)
    else:
        init = reconcile.Initiator(index.ids[: len(index.ids) // 2])
        init.start()
        nxt = typed(lambda: init.step(data), NonCanonicalEncoding, SchemaError)
        if nxt not in (None, REFUSED):
            reconcile.decode(nxt, responder=True)


# -- safetensors import -----------------------------------------------------------------------


def span(rec: dict[str, Any]) -> tuple[int, int]:
    """A record's data offsets if they are two integers, else (0, 0)."""
    offsets = rec.get("data_offsets")
    if (isinstance(offsets, list) and len(offsets) == 2
            and all(type(o) is int for o in offsets)):
        return offsets[0], offsets[1]
    return 0, 0


class Raw(str):
    """JSON text put into a header as it is (numbers too long for Python's int, deep nesting,
    lone surrogates, constants JSON does not have)."""


def render(value: Any) -> str:
    """JSON text; a list of pairs renders as an object (so keys may repeat)."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, Pairs):
        return "{" + ",".join(f"{json.dumps(k)}:{render(v)}" for k, v in value) + "}"
    if isinstance(value, dict):
        return render(Pairs(value.items()))
    if isinstance(value, list):
        return "[" + ",".join(render(v) for v in value) + "]"
    return json.dumps(value)


class Pairs(list):
    """A JSON object as (key, value) pairs, in order, repeats allowed."""


RAW_JSON = [Raw("1" * 5000), Raw("-" + "9" * 5000), Raw("1e999"), Raw("NaN"), Raw("-Infinity"),
            Raw("[" * 5000 + "]" * 5000), Raw('{"a":' * 3000 + "1" + "}" * 3000),
            Raw('"\\ud800"'), Raw("true"), Raw("0.5"), Raw("-0"), Raw("18446744073709551616"),
            Raw("1" * 400)]
junk = st.one_of(
    st.sampled_from(RAW_JSON),
    json_values,
    st.integers(-(2**70), 2**70),
    st.lists(st.integers(-(2**65), 2**65), max_size=4),
)
names = st.one_of(
    st.text(max_size=10),
    st.sampled_from(["", "a" * 513, "a" * 5000, "\ud800", "x\udcff", "__metadata__", "../x",
                     "x\x00y", "\u202e", "t" * 512]),
)


@st.composite
def headers(draw: st.DrawFn) -> tuple[bytes, str]:
    """A safetensors file: a valid header and data, then 0-3 header edits and perhaps byte
    damage. Returns the file and what was done to it (shown when a case fails)."""
    specs = draw(st.lists(st.tuples(st.text(min_size=1, max_size=12),
                                    st.sampled_from(sorted(DTYPE_SIZES)),
                                    st.lists(st.integers(0, 4), max_size=3)),
                          max_size=3, unique_by=lambda s: s[0]))
    entries = Pairs()
    pos = 0
    for name, dtype, shape in specs:
        n = math.prod(shape) * DTYPE_SIZES[dtype]
        entries.append((name, {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}))
        pos += n
    data = draw(st.binary(min_size=pos, max_size=pos))
    if draw(st.booleans()):
        entries.append(("__metadata__", {"format": "pt"}))
    done = []
    header: Any = entries
    for _ in range(draw(st.integers(0, 3))):
        edit = draw(st.sampled_from(["dtype", "shape", "offsets", "overlap", "name", "duplicate",
                                     "drop", "extra", "metadata", "toplevel", "bool"]))
        done.append(edit)
        if edit == "toplevel":
            header = draw(junk)
            break
        records = [i for i, (k, v) in enumerate(entries) if isinstance(v, dict)
                   and k != "__metadata__"]
        if edit == "metadata":
            entries.append(("__metadata__", draw(junk | st.dictionaries(st.text(max_size=4),
                                                                         junk, max_size=2))))
            continue
        if not records:
            continue
        i = draw(st.sampled_from(records))
        name, rec = entries[i]
        rec = dict(rec)
        if edit in ("dtype", "shape"):
            rec[edit] = draw(junk | st.text(max_size=5))
        elif edit == "offsets":
            rec["data_offsets"] = draw(junk | st.lists(st.integers(-5, pos + 10), max_size=3))
        elif edit == "overlap":  # another tensor's record: the same bytes, twice
            other = entries[draw(st.sampled_from(records))][1]
            rec["data_offsets"] = list(span(other))
            rec["shape"], rec["dtype"] = other.get("shape"), other.get("dtype")
        elif edit == "name":
            name = draw(names)
        elif edit == "duplicate":  # the same name again, its data at the start
            begin, end = span(rec)
            entries.append((name, dict(rec, data_offsets=[0, end - begin])))
        elif edit == "drop":
            rec.pop(draw(st.sampled_from(sorted(rec))), None)
        elif edit == "extra":
            rec[draw(st.text(max_size=6))] = draw(junk)
        elif edit == "bool":
            shape = rec.get("shape")
            rec["shape"] = [True] * (len(shape) if isinstance(shape, list) else 1)
            rec["data_offsets"] = [False, span(rec)[1]]
        entries[i] = (name, rec)
    text = render(header).encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        text += b" " * (-len(text) % 8)
    length = len(text)
    tail = draw(st.sampled_from(["none", "length", "non_utf8", "bytes"]))
    done.append(tail)
    if tail == "length":
        length = draw(st.sampled_from([0, 1, length - 1, length + 1, 2**63, 2**64 - 1,
                                       100 * 2**20 + 1, length + len(data) + 1]))
        length = max(0, min(length, 2**64 - 1))
    elif tail == "non_utf8":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80",
                                                 b"\xf8\x88\x80\x80\x80"])) + text[at:]
        length = len(text)
    out = u64(length) + text + data
    if tail == "bytes":
        out = draw(mutated(out))
    return out, " ".join(done)


@pytest.fixture(scope="module")
def import_replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    replica = new_project(tmp_path_factory.mktemp("import") / "replica")
    yield replica
    replica.close()


def attempt_import(replica: Replica, source: Path) -> str:
    """Import ``source``: refused with ModelImportError and the replica untouched, or
    imported into a manifest the decoder accepts."""
    before = snapshot(replica)
    try:
        imported = import_model(replica.store, str(source), replica.piece_size)
    except ModelImportError:
        after = snapshot(replica)
        restore(replica, before)
        assert after == before, "a refused import changed the replica"
        return "refused"
    except Exception as exc:  # noqa: BLE001
        restore(replica, before)
        raise AssertionError(f"import raised {type(exc).__name__}: {exc!r:.300}") from exc
    try:
        stored = manifests.decode(replica.store.get(imported.manifest_id))
        assert stored == imported.manifest
    finally:
        restore(replica, before)
    return "imported"


@fuzz_settings(200, shrink=False)
@given(made=headers())
def test_import_of_hostile_safetensors_files(import_replica: Replica, tmp_path_factory:
                                             pytest.TempPathFactory, made: tuple[bytes, str]) -> None:
    data, _how = made
    folder = tmp_path_factory.getbasetemp() / "hostile-file"
    folder.mkdir(exist_ok=True)
    path = folder / "model.safetensors"
    path.write_bytes(data)
    count("importer.import_model (file)", attempt_import(import_replica, path))


def _valid_file(tensors: dict[str, tuple[str, list[int]]], seed: bytes = b"") -> bytes:
    entries = Pairs()
    pos = 0
    for name, (dtype, shape) in sorted(tensors.items()):
        n = math.prod(shape) * DTYPE_SIZES[dtype]
        entries.append((name, {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}))
        pos += n
    text = render(entries).encode()
    return u64(len(text)) + text + (seed * pos)[:pos].ljust(pos, b"\x01")


CONFIGS = [b'{"model_type": "llama"}', b"\xff\xfe{}", b"{" * 5000, b"[" * 100_000,
           b'{"model_type": ' + b"1" * 5000 + b"}", b"[]", b"null", b'{"model_type": ["x"]}',
           b'{"model_type": "a", "model_type": "b"}', b"", b'"\\ud800"']
INDEXES = [None, b'{"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}',
           b'{"weight_map": {"a": "../model-1.safetensors"}}', b'{"weight_map": {"a": 5}}',
           b'{"weight_map": {"a": "missing.safetensors"}}', b"\xff", b"[" * 100_000,
           b'{"weight_map": {"a": ' + b"1" * 5000 + b"}}", b'{"weight_map": []}',
           b'{"weight_map": {"a": ".hidden.safetensors"}}', b'{"weight_map": {"a": ["x"]}}',
           b'{"weight_map": {"a": "sub/x.safetensors"}}']


@fuzz_settings(60, shrink=False)
@given(config=st.sampled_from(CONFIGS), index=st.sampled_from(INDEXES),
       second=st.sampled_from(["valid", "duplicate", "damaged", "absent"]),
       damage=st.data())
def test_import_of_hostile_model_folders(import_replica: Replica, tmp_path_factory:
                                         pytest.TempPathFactory, config: bytes,
                                         index: bytes | None, second: str,
                                         damage: st.DataObject) -> None:
    """A folder: config.json, perhaps a shard index, two shards (the second valid, naming a
    tensor of the first, damaged, or missing). Refused imports store nothing at all, not
    even the first shard's pieces."""
    seed = damage.draw(st.binary(min_size=1, max_size=4))
    folder = tmp_path_factory.mktemp("hostile-folder")
    (folder / "config.json").write_bytes(config)
    (folder / "model-1.safetensors").write_bytes(_valid_file({"a": ("F32", [3, 5])}, seed))
    if second != "absent":
        data = _valid_file({"a" if second == "duplicate" else "b": ("BF16", [7])}, seed)
        if second == "damaged":
            data = damage.draw(mutated(data))
        (folder / "model-2.safetensors").write_bytes(data)
    if index is not None:
        (folder / "model.safetensors.index.json").write_bytes(index)
    count("importer.import_model (folder)", attempt_import(import_replica, folder))


def test_import_refusals_named_in_the_brief(import_replica: Replica, tmp_path: Path) -> None:
    """The header faults listed one by one: each a ModelImportError, nothing stored."""
    def file(header: str, data: bytes = b"\x00" * 16, length: int | None = None) -> bytes:
        raw = header.encode("utf-8", "surrogatepass")
        return u64(len(raw) if length is None else length) + raw + data

    rec = '{"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}'
    cases = {
        "bad json": file('{"a": {"dtype": "F32",'),
        "offsets out of range": file('{"a": {"dtype": "F32", "shape": [2, 2], '
                                     '"data_offsets": [16, 32]}}'),
        "overlapping offsets": file(f'{{"a": {rec}, "b": {rec}}}'),
        "huge header length": file(f'{{"a": {rec}}}', length=2**63),
        "header longer than file": file(f'{{"a": {rec}}}', length=10**6),
        "unknown dtype": file('{"a": {"dtype": "F128", "shape": [2], "data_offsets": [0, 32]}}',
                              b"\x00" * 32),
        "unhashable dtype": file('{"a": {"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}}'),
        "shape/size mismatch": file('{"a": {"dtype": "F32", "shape": [3, 2], '
                                    '"data_offsets": [0, 16]}}'),
        "non-utf8": u64(3) + b'{\xff}',
        "duplicate keys": file(f'{{"a": {rec}, "a": {rec}}}'),
        "duplicate fields": file('{"a": {"dtype": "F32", "dtype": "I32", "shape": [2, 2], '
                                 '"data_offsets": [0, 16]}}'),
        "negative offsets": file('{"a": {"dtype": "F32", "shape": [2, 2], '
                                 '"data_offsets": [-16, 0]}}'),
        "negative dimension": file('{"a": {"dtype": "F32", "shape": [-2, -2], '
                                   '"data_offsets": [0, 16]}}'),
        "5000-digit number": file('{"a": {"dtype": "F32", "shape": [' + "9" * 5000 + '], '
                                  '"data_offsets": [0, 16]}}'),
        "deep nesting": file('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        "empty tensor name": file(f'{{"": {rec}}}'),
        "tensor name too long": file(f'{{"{"n" * 513}": {rec}}}'),
        "lone surrogate in a name": file(f'{{"\\ud800": {rec}}}'),
        "boolean shape": file('{"a": {"dtype": "F32", "shape": [true, 4], '
                              '"data_offsets": [0, 16]}}'),
        "nine dimensions": file('{"a": {"dtype": "U8", "shape": [1, 1, 1, 1, 1, 1, 1, 1, 1], '
                                '"data_offsets": [0, 1]}}', b"\x00"),
        "dimension of 2^40": file('{"a": {"dtype": "U8", "shape": [1099511627776, 0], '
                                  '"data_offsets": [0, 0]}}', b""),
        "metadata not strings": file(f'{{"__metadata__": {{"a": 1}}, "a": {rec}}}'),
        "too short": b"\x01\x02",
    }
    for why, data in cases.items():
        path = tmp_path / "m.safetensors"
        path.write_bytes(data)
        before = snapshot(import_replica)
        try:
            with pytest.raises(ModelImportError):
                import_model(import_replica.store, str(path), import_replica.piece_size)
            assert snapshot(import_replica) == before, why
        finally:
            restore(import_replica, before)


# -- regressions of what the fuzzing found ------------------------------------------------------


def test_error_bodies_regressions() -> None:
    """A peer's error body nested deeper than ``json`` recurses raised RecursionError; a
    ``detail`` among the fields replaced the error's detail string with anything."""
    assert isinstance(wire.error_from_body(502, b"[" * 100_000), PeerError)
    body = {"code": "piece_missing", "detail": "gone", "fields": {"detail": 5, "piece_id": "p"}}
    exc = wire.error_from_body(404, json.dumps(body).encode())
    assert isinstance(exc, PieceMissing) and exc.detail == "gone" and exc.piece_id == "p"


@pytest.mark.parametrize("case", ["config not UTF-8", "config nested deep", "config digits",
                                  "config surrogate model_type", "tensor in two shards",
                                  "second shard damaged", "index nested deep"])
def test_refused_folder_imports_store_nothing(import_replica: Replica, tmp_path: Path,
                                              case: str) -> None:
    """Config, index and every shard header are checked before a piece is stored: these
    were refused only after the first shard's pieces (and for a bad config, every piece)
    were in the store, or raised UnicodeDecodeError, RecursionError or ValueError."""
    folder = tmp_path / "m"
    folder.mkdir()
    config = {"config not UTF-8": b"\xff\xfe{}", "config nested deep": b"[" * 100_000,
              "config digits": b'{"model_type": ' + b"1" * 5000 + b"}",
              "config surrogate model_type": b'{"model_type": "\\ud800"}'}
    (folder / "config.json").write_bytes(config.get(case, b'{"model_type": "llama"}'))
    seed = case.encode()  # pieces no other case stores
    (folder / "model-1.safetensors").write_bytes(_valid_file({"a": ("F32", [64, 64])}, seed))
    second = _valid_file({"a" if case == "tensor in two shards" else "b": ("F32", [8])}, seed)
    if case == "second shard damaged":
        second = u64(10**6) + second[8:]
    (folder / "model-2.safetensors").write_bytes(second)
    if case == "index nested deep":
        (folder / "model.safetensors.index.json").write_bytes(b'{"weight_map": '
                                                              + b"[" * 100_000)
    before = snapshot(import_replica)
    try:
        with pytest.raises(ModelImportError):
            import_model(import_replica.store, str(folder), import_replica.piece_size)
        assert snapshot(import_replica) == before
    finally:
        restore(import_replica, before)
