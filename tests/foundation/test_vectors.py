"""Golden vectors: crdt_merge reproduces, byte for byte, the encodings and ids that
specs/vectors/make_vectors.py derives from the spec with its own encoder."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from crdt_merge import codec, maintenance
from crdt_merge.crdt import ops as opmod
from crdt_merge.crdt import opset
from crdt_merge.errors import FormatError, NonCanonicalEncoding, SchemaError, error_for_code
from crdt_merge.hashing import digest, state_root
from crdt_merge.replica import Replica
from crdt_merge.store import manifests
from crdt_merge.store.local import LocalStore
from crdt_merge.store.manifests import FileRecord, Manifest
from tests.fixtures.causal import causal_past

from .helpers import cut, put_tensor, snapshot, tensor_bytes

VECTORS = Path(__file__).resolve().parents[2] / "specs" / "vectors"
TORCH_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "I32": torch.int32}


def load(name: str) -> Any:
    return json.loads((VECTORS / name).read_text())


def untag(v: Any) -> Any:
    """JSON -> value: ``{"$bin": hex}`` is bytes, ``{"$int": text}`` an int."""
    if isinstance(v, dict):
        if set(v) == {"$bin"}:
            return bytes.fromhex(v["$bin"])
        if set(v) == {"$int"}:
            return int(v["$int"])
        return {k: untag(x) for k, x in v.items()}
    if isinstance(v, list):
        return [untag(x) for x in v]
    return v


def reverse_keys(v: Any) -> Any:
    """The same value with every map built in reverse key order."""
    if isinstance(v, dict):
        return {k: reverse_keys(v[k]) for k in reversed(list(v))}
    if isinstance(v, list):
        return [reverse_keys(x) for x in v]
    return v


MSGPACK = load("msgpack.json")
DECIMALS = load("decimals.json")
PIECES = load("pieces.json")
MANIFESTS = load("manifests.json")
OPS = load("ops.json")
ROOTS = load("state_root.json")


# -- the generator -----------------------------------------------------------------------


def test_generator_uses_no_code_under_test():
    source = (VECTORS / "make_vectors.py").read_text()
    imported, names = set(), set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
        elif isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
    assert imported <= {"__future__", "json", "struct", "sys", "pathlib", "blake3", "cryptography"}
    assert not names & {"packb", "unpackb", "Packer", "__import__", "import_module"}


def test_vector_files_are_what_the_generator_writes(fast_tmp):
    subprocess.run([sys.executable, str(VECTORS / "make_vectors.py"), str(fast_tmp)], check=True)
    written = sorted(p.name for p in fast_tmp.iterdir())
    assert written == sorted(p.name for p in VECTORS.glob("*.json"))
    for name in written:
        assert (fast_tmp / name).read_bytes() == (VECTORS / name).read_bytes(), name


# -- canonical msgpack ---------------------------------------------------------------------


@pytest.mark.parametrize("case", MSGPACK["canonical"], ids=lambda c: c["name"])
def test_msgpack_canonical(case):
    value = untag(case["value"])
    data = bytes.fromhex(case["hex"])
    assert codec.encode(value) == data
    assert codec.encode(reverse_keys(value)) == data  # key order given does not matter
    assert codec.decode(data) == value


@pytest.mark.parametrize("case", MSGPACK["large"], ids=lambda c: c["name"])
def test_msgpack_large(case):
    build = case["build"]
    if build["type"] == "str":
        value = build["unit"] * build["count"]
    elif build["type"] == "bin":
        value = bytes.fromhex(build["unit"]) * build["count"]
    else:
        value = [build["unit"]] * build["count"]
    data = codec.encode(value)
    assert (len(data), data[:5].hex(), digest(data)) == (case["length"], case["head"], case["blake3"])
    assert codec.decode(data) == value


@pytest.mark.parametrize("case", MSGPACK["rejected"], ids=lambda c: c["why"])
def test_msgpack_rejected(case):
    with pytest.raises(NonCanonicalEncoding):
        codec.decode(bytes.fromhex(case["hex"]))


# -- canonical decimals --------------------------------------------------------------------


def test_decimals():
    for text, want in DECIMALS["canonical_of"]:
        assert codec.canonical_decimal(text) == want, text
        assert codec.is_canonical_decimal(want)
    for text, want in DECIMALS["canonical_of_float"]:
        assert codec.canonical_decimal(float(text)) == want, text
    for value, want in DECIMALS["canonical_of_int"]:
        assert codec.canonical_decimal(untag(value)) == want
    for text in DECIMALS["canonical"]:
        assert codec.is_canonical_decimal(text), text
        assert codec.canonical_decimal(text) == text
    for text in DECIMALS["not_canonical"]:
        assert not codec.is_canonical_decimal(text), text
    for text in DECIMALS["not_a_number"] + DECIMALS["out_of_range"]:
        with pytest.raises(FormatError):
            codec.canonical_decimal(text)


# -- pieces, tensors, manifests --------------------------------------------------------------


def fill(dtype: str, shape: list[int], rule: dict) -> torch.Tensor:
    count = math.prod(shape)
    if rule["kind"] == "zeros":
        t = torch.zeros(count, dtype=torch.int64)
    elif rule["kind"] == "ones":
        t = torch.ones(count, dtype=torch.int64)
    else:
        t = torch.arange(count) % rule["mod"] + rule["offset"]
    return t.to(TORCH_DTYPES[dtype]).reshape(shape)


@pytest.fixture
def store(fast_tmp):
    s = LocalStore.create(fast_tmp / "store")
    yield s
    s.close()


def test_pieces(store):
    assert PIECES["piece_size"] == opmod.PROFILES["test"]
    for case in PIECES["pieces"]:
        data = bytes.fromhex(case["hex"])
        assert digest(data) == case["id"]
        assert store.put(data) == case["id"]
        assert store.put(data) == case["id"]  # stored once however often it arrives
        assert store.get(case["id"]) == data


@pytest.mark.parametrize("case", PIECES["tensors"], ids=lambda c: c["name"])
def test_tensor_split(store, case):
    t = fill(case["dtype"], case["shape"], case["fill"])
    data = tensor_bytes(t)
    assert (len(data), data[:16].hex(), digest(data)) == (case["nbytes"], case["head"], case["blake3"])
    pieces = cut(data, PIECES["piece_size"])
    assert [{"id": digest(p), "length": len(p)} for p in pieces] == case["pieces"]
    record = put_tensor(store, t, PIECES["piece_size"])
    assert record.to_wire() == case["record"]
    assert record.nbytes == case["nbytes"]


def test_manifests(store):
    for f in MANIFESTS["files"]:
        assert store.put(bytes.fromhex(f["hex"])) == f["id"]
    tensors = {c["name"]: put_tensor(store, fill(c["dtype"], c["shape"], c["fill"]))
               for c in reversed(PIECES["tensors"])}
    config = bytes.fromhex(MANIFESTS["files"][0]["hex"])
    model = Manifest(4096, tensors, {"config.json": FileRecord(len(config), (digest(config),))},
                     {"n": 5, "source": "golden", "family": "llama"})
    want = MANIFESTS["manifests"][0]
    assert want["name"] == "model"
    assert model.encode().hex() == want["hex"]
    assert model.id == want["id"] == digest(bytes.fromhex(want["hex"]))
    for case in MANIFESTS["manifests"]:
        data = bytes.fromhex(case["hex"])
        decoded = manifests.decode(data)
        assert decoded.to_wire() == untag(case["value"])
        assert decoded.encode() == data and decoded.id == case["id"]
        assert manifests.from_wire(reverse_keys(untag(case["value"]))).id == case["id"]


@pytest.mark.parametrize("case", MANIFESTS["invalid"], ids=lambda c: c["why"])
def test_invalid_manifests(case):
    with pytest.raises(SchemaError):
        manifests.decode(bytes.fromhex(case["hex"]))


# -- ops and state roots -------------------------------------------------------------------


def key_of(site: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(OPS["keys"][site]["seed"]))


def test_keys():
    for site, k in OPS["keys"].items():
        assert opmod.public_bytes(key_of(site)).hex() == k["public"]
    assert opmod.SIGN_DOMAIN.hex() == OPS["sign_domain_hex"]


@pytest.mark.parametrize("case", OPS["ops"], ids=lambda c: c["name"])
def test_op_encoding_and_signature(case):
    body = untag(case["body"])
    assert opmod.signing_bytes(body).hex() == case["signing_hex"]
    op = opmod.sign(reverse_keys(body), key_of(case["signer"]))
    assert op.data.hex() == case["hex"]
    assert op.id == case["id"] == digest(op.data)
    decoded = opmod.decode(bytes.fromhex(case["hex"]))
    assert decoded.id == case["id"] and dict(decoded.body) == dict(op.body)
    by_id = {c["id"]: opmod.decode(bytes.fromhex(c["hex"])) for c in OPS["ops"]}
    opmod.verify(decoded, None, by_id.get)  # the signature verifies against its site's key


def test_state_roots():
    assert bytes.fromhex(ROOTS["domain_hex"]) == b"crdt-merge/state-root/v1\x00"
    for case in ROOTS["roots"]:
        assert state_root(case["op_ids"]) == case["root"], case["name"]


def golden_replica(path: Path) -> Replica:
    """A replica of the golden project holding the objects the golden ops reference."""
    genesis = next(c for c in OPS["ops"] if c["name"] == "genesis")
    r = Replica.join(path, "viewer", bytes.fromhex(genesis["hex"]))
    for c in PIECES["tensors"]:
        put_tensor(r.store, fill(c["dtype"], c["shape"], c["fill"]))
    put_tensor(r.store, torch.ones(8, dtype=torch.bfloat16))  # the base manifest's tensor
    for f in MANIFESTS["files"]:
        r.store.put(bytes.fromhex(f["hex"]))
    for m in MANIFESTS["manifests"]:
        r.store.put(bytes.fromhex(m["hex"]))
    return r


def test_golden_project_reaches_the_golden_state(fast_tmp):
    held = [c for c in OPS["ops"] if c["id"] in OPS["held"]]
    want_root = next(c["root"] for c in ROOTS["roots"] if c["name"] == "every held op of ops.json")
    want = OPS["state"]
    with golden_replica(fast_tmp / "a") as a:
        for c in held:
            assert a.apply(bytes.fromhex(c["hex"])) == c["id"]
        assert a.state_root() == want_root
        check_golden_state(a, want)
    with golden_replica(fast_tmp / "b") as b:  # the same ops staged in reverse order
        for c in reversed(held):
            b.stage(bytes.fromhex(c["hex"]))
        b.commit_staged()
        assert b.state_root() == want_root
        check_golden_state(b, want)


def check_golden_state(r: Replica, want: dict) -> None:
    ops = list(r.ops().values())
    state = opset.membership(ops)
    assert [op.id for op in opset.live_contributions(ops)] == want["live_contributions"]
    assert sorted(set(r.ops()) - state.counted) == want["not_counted"]
    # retracts of an ended member that count only because they are binding (formats.md 8)
    held = r.ops()

    ended = {m.member: m.ended_by for m in state.members.values() if m.ended_by is not None}
    assert sorted(op.id for op in ops if op.kind == "retract" and op.author in ended
                  and op.id in state.counted and op.id not in causal_past(held, ended[op.author])
                  ) == want["binding_retracts_of_ended_members"]
    recipes = opset.recipe_state(ops)
    assert recipes.winner.id == want["recipe_winner"]
    assert [op.id for op in recipes.conflicts] == want["recipe_conflicts"]
    assert [[x.id, t] for x, t in opset.ignored_retracts(ops)] == want["ignored_retracts"]
    members = [{k: v for k, v in m.items() if k in ("site", "member", "role", "state")
                or (k == "ended_by" and v is not None)} for m in r.members()]
    assert members == want["members"]
    status = maintenance.status(r)
    assert [n["op_id"] for n in status["not_counted"]] == want["not_counted"]
    assert [c["op_id"] for c in status["contributions"] if c["live"]] == want["live_contributions"]


@pytest.mark.parametrize("case", OPS["rejected"], ids=lambda c: c["why"])
def test_rejected_ops(fast_tmp, case):
    with golden_replica(fast_tmp / "r") as r:
        for c in OPS["ops"]:
            if c["id"] in OPS["held"]:
                r.apply(bytes.fromhex(c["hex"]))
        before = snapshot(r)
        with pytest.raises(error_for_code(case["code"])) as info:
            r.apply(bytes.fromhex(case["hex"]))
        assert info.value.code == case["code"]
        assert snapshot(r) == before
        assert r.store.staged_rows() == []
