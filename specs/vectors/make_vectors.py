"""Write the golden vectors of specs/formats.md into this folder (``python make_vectors.py``).

The bytes are built here from the msgpack specification and specs/formats.md, with a small
encoder of our own, ``blake3`` and ``cryptography``: nothing from ``crdt_merge`` and no
msgpack library, so the tests that load these files check crdt_merge against an
independent reading of the spec. Running this again must reproduce the files exactly
(tests/foundation/test_vectors.py checks that too).

JSON conventions: ``{"$bin": "<hex>"}`` is a byte string, ``{"$int": "<decimal>"}`` an
integer outside JSON's safe range; every other JSON value is itself.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import blake3
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

OUT = Path(__file__).resolve().parent

# -- the canonical msgpack encoder (specs/formats.md section 1) ---------------------------


def _head(n: int, fix: int | None, fix_max: int, codes: tuple[int, int, int]) -> bytes:
    """The header of a str/bin/array/map of length ``n``: fix form, else the 8/16/32-bit one."""
    if fix is not None and n <= fix_max:
        return bytes([fix | n])
    for code, fmt, limit in zip(codes, (">B", ">H", ">I"), (2**8, 2**16, 2**32), strict=True):
        if code and n < limit:
            return bytes([code]) + struct.pack(fmt, n)
    raise ValueError("too long for msgpack")


def enc(v: object) -> bytes:
    if v is None:
        return b"\xc0"
    if v is False:
        return b"\xc2"
    if v is True:
        return b"\xc3"
    if isinstance(v, int):
        if 0 <= v <= 0x7F:
            return bytes([v])                                   # positive fixint
        if v > 0:
            for code, fmt, limit in ((0xCC, ">B", 2**8), (0xCD, ">H", 2**16),
                                     (0xCE, ">I", 2**32), (0xCF, ">Q", 2**64)):
                if v < limit:
                    return bytes([code]) + struct.pack(fmt, v)  # uint 8/16/32/64
            raise ValueError("int too large")
        if v >= -32:
            return struct.pack(">b", v)                         # negative fixint
        for code, fmt, limit in ((0xD0, ">b", 2**7), (0xD1, ">h", 2**15),
                                 (0xD2, ">i", 2**31), (0xD3, ">q", 2**63)):
            if v >= -limit:
                return bytes([code]) + struct.pack(fmt, v)      # int 8/16/32/64
        raise ValueError("int too small")
    if isinstance(v, str):
        b = v.encode("utf-8")
        return _head(len(b), 0xA0, 31, (0xD9, 0xDA, 0xDB)) + b
    if isinstance(v, bytes):
        return _head(len(v), None, 0, (0xC4, 0xC5, 0xC6)) + v
    if isinstance(v, list):
        return _head(len(v), 0x90, 15, (0, 0xDC, 0xDD)) + b"".join(enc(x) for x in v)
    if isinstance(v, dict):
        keys = sorted(v, key=lambda k: k.encode("utf-8"))      # UTF-8 byte order
        body = b"".join(enc(k) + enc(v[k]) for k in keys)
        return _head(len(v), 0x80, 15, (0, 0xDE, 0xDF)) + body
    raise TypeError(type(v).__name__)


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def tagged(v: object) -> object:
    """A value as JSON, with the ``$bin`` / ``$int`` tags."""
    if isinstance(v, bytes):
        return {"$bin": v.hex()}
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int):
        return v if abs(v) < 2**53 else {"$int": str(v)}
    if isinstance(v, list):
        return [tagged(x) for x in v]
    if isinstance(v, dict):
        return {k: tagged(x) for k, x in v.items()}
    return v


# -- 1. canonical msgpack ---------------------------------------------------------------

CANONICAL = {
    "nil": None, "false": False, "true": True,
    "int 0": 0, "int 127 (largest positive fixint)": 127, "int 128 (uint8)": 128,
    "int 255": 255, "int 256 (uint16)": 256, "int 65535": 65535, "int 65536 (uint32)": 65536,
    "int 2^32-1": 2**32 - 1, "int 2^32 (uint64)": 2**32, "int 2^64-1": 2**64 - 1,
    "int -1": -1, "int -32 (smallest negative fixint)": -32, "int -33 (int8)": -33,
    "int -128": -128, "int -129 (int16)": -129, "int -32768": -32768,
    "int -32769 (int32)": -32769, "int -2^31": -(2**31), "int -2^31-1 (int64)": -(2**31) - 1,
    "int -2^63": -(2**63),
    "str empty": "", "str a": "a", "str 31 bytes (fixstr)": "x" * 31,
    "str 32 bytes (str8)": "y" * 32, "str 255 bytes": "z" * 255, "str 256 bytes (str16)": "w" * 256,
    "str unicode": "h\u00e9llo \u2603 \U0001f600", "str NUL inside": "a\x00b",
    "bin empty (bin8, never a fixstr)": b"", "bin 3": b"\x00\x01\xff",
    "bin 256 (bin16)": bytes(range(256)),
    "array empty": [], "array 15 (fixarray)": list(range(15)), "array 16 (array16)": list(range(16)),
    "array nested": [[], [[None]], [1, "a", b"b", True]],
    "map empty": {}, "map one": {"a": 1},
    "map sorted by code point": {"b": 1, "a": 2, "aa": 3, "B": 4, "": 5, "ab": 6},
    "map keys by code point, not by length": {"zz": 1, "a": 2, "b": 3, "aaa": 4},
    "map keys by code point, not UTF-16": {"\uffff": 1, "\U00010000": 2, "\u00e9": 3, "e": 4},
    "map 15 (fixmap)": {f"k{i:02d}": i for i in range(15)},
    "map 16 (map16)": {f"k{i:02d}": i for i in range(16)},
    "map nested": {"outer": {"z": [1, {"y": None, "x": b""}], "a": -1}},
    "depth 32 (deepest allowed value)": 1,
}
for _ in range(32):
    CANONICAL["depth 32 (deepest allowed value)"] = [CANONICAL["depth 32 (deepest allowed value)"]]

LARGE = [  # a value built from a rule, its header and the BLAKE3 of its whole encoding
    ("str32: 65536 times 'a'", {"type": "str", "unit": "a", "count": 65536}, "a" * 65536),
    ("bin32: 65536 zero bytes", {"type": "bin", "unit": "00", "count": 65536}, bytes(65536)),
    ("array32: 65536 nils", {"type": "array", "unit": None, "count": 65536}, [None] * 65536),
]

_deep = 1
for _ in range(33):
    _deep = [_deep]

REJECTED = [  # (why, bytes)
    ("empty input", b""),
    ("truncated: fixstr of 3 with 2 bytes", b"\xa3ab"),
    ("truncated: array of 1 with no element", b"\x91"),
    ("truncated: map value missing", b"\x81\xa1a"),
    ("truncated: uint16 with one byte", b"\xcd\x01"),
    ("trailing byte after a value", b"\xc0\xc0"),
    ("trailing byte after a map", enc({"a": 1}) + b"\x00"),
    ("reserved byte 0xc1", b"\xc1"),
    ("unsorted keys", b"\x82\xa1b\x01\xa1a\x02"),
    ("keys sorted by length, not code point", b"\x82\xa1b\x01\xa2aa\x02"),
    ("keys sorted by UTF-16, not code point", b"\x82" + enc("\U00010000") + b"\x01" + enc("\uffff") + b"\x02"),
    ("duplicate keys", b"\x82\xa1a\x01\xa1a\x01"),
    ("duplicate keys, different values", b"\x82\xa1a\x01\xa1a\x02"),
    ("uint8 for a fixint (5)", b"\xcc\x05"),
    ("int8 for a positive fixint (5)", b"\xd0\x05"),
    ("int8 for a negative fixint (-1)", b"\xd0\xff"),
    ("uint16 for a uint8 value (200)", b"\xcd\x00\xc8"),
    ("uint64 for 1", b"\xcf" + struct.pack(">Q", 1)),
    ("int16 for -100", b"\xd1" + struct.pack(">h", -100)),
    ("int64 for -2^31", b"\xd3" + struct.pack(">q", -(2**31))),
    ("int64 for a positive value (128)", b"\xd3" + struct.pack(">q", 128)),
    ("float32", b"\xca" + struct.pack(">f", 1.5)),
    ("float64", b"\xcb" + struct.pack(">d", 0.1)),
    ("float64 integral (1.0)", b"\xcb" + struct.pack(">d", 1.0)),
    ("float inside a map", b"\x81\xa1a\xcb" + struct.pack(">d", 0.5)),
    ("ext fixext1", b"\xd4\x05\x00"),
    ("ext8", b"\xc7\x02\x01ab"),
    ("ext -1 (timestamp32)", b"\xd6\xff\x00\x00\x00\x01"),
    ("ext -1 (timestamp96)", b"\xc7\x0c\xff" + bytes(12)),
    ("str8 for a 5-byte string", b"\xd9\x05hello"),
    ("str16 for a 1-byte string", b"\xda\x00\x01a"),
    ("str8 for an empty string", b"\xd9\x00"),
    ("str32 for a 40-byte string", b"\xdb" + struct.pack(">I", 40) + b"q" * 40),
    ("bin16 for a 1-byte bin", b"\xc5\x00\x01\x00"),
    ("bin used for a map key", b"\x81\xc4\x01a\x01"),
    ("int map key", b"\x81\x01\x02"),
    ("nil map key", b"\x81\xc0\x01"),
    ("array map key", b"\x81\x90\x01"),
    ("array16 for 2 elements", b"\xdc\x00\x02\x01\x02"),
    ("array32 for 1 element", b"\xdd\x00\x00\x00\x01\x01"),
    ("map16 for 1 entry", b"\xde\x00\x01\xa1a\x01"),
    ("map32 for 0 entries", b"\xdf\x00\x00\x00\x00"),
    ("invalid UTF-8 in a str", b"\xa2\xff\xfe"),
    ("UTF-8 encoded surrogate in a str", b"\xa3\xed\xa0\x80"),
    ("overlong UTF-8 in a str", b"\xa2\xc0\xaf"),
    ("non-canonical value nested in an array", b"\x92\x01\xcc\x02"),
    ("non-canonical value nested in a map", b"\x81\xa1a\x81\xa1b\xd9\x01c"),
    ("value deeper than 32", enc(_deep)),
]


def msgpack_vectors() -> dict:
    return {
        "canonical": [{"name": name, "value": tagged(v), "hex": enc(v).hex()}
                      for name, v in CANONICAL.items()],
        "large": [{"name": name, "build": build, "length": len(enc(v)),
                   "head": enc(v)[:5].hex(), "blake3": b3(enc(v))} for name, build, v in LARGE],
        "rejected": [{"why": why, "hex": data.hex()} for why, data in REJECTED],
    }


# -- 2. canonical decimals ---------------------------------------------------------------

DECIMALS = {
    "canonical_of": [  # [input, canonical decimal string]; written by hand from the rule
        ["0", "0"], ["0.0", "0"], ["-0", "0"], ["-0.000", "0"], ["00", "0"],
        ["0.3", "0.3"], ["0.30", "0.3"], [".3", "0.3"], ["+0.3", "0.3"], ["3.", "3"],
        ["1e3", "1000"], ["1E+3", "1000"], ["1.5e-3", "0.0015"], ["-2.50", "-2.5"],
        ["100", "100"], ["1e2", "100"], ["12.3400", "12.34"], [" 7 ", "7"],
        ["0.000001", "0.000001"], ["1e-7", "0.0000001"],
        ["123456789012345678901234567890.123456789", "123456789012345678901234567890.123456789"],
        ["0.12345678901234567890123456789012345", "0.12345678901234567890123456789012345"],
    ],
    "canonical_of_float": [  # a float is taken at its shortest round-trip repr
        ["0.1", "0.1"], ["0.30000000000000004", "0.30000000000000004"], ["1e-07", "0.0000001"],
        ["-0.0", "0"], ["100.0", "100"], ["2.5", "2.5"], ["1e+16", "10000000000000000"],
    ],
    "canonical_of_int": [[0, "0"], [7, "7"], [-12, "-12"], [{"$int": str(2**64)}, str(2**64)]],
    "not_a_number": ["", "abc", "1.2.3", "nan", "NaN", "inf", "-Infinity", "0x10", "1e", "--1"],
    "out_of_range": ["1e999999999", "1e-5000", "1e4097"],
    "canonical": ["0", "1", "-1", "0.3", "-0.3", "10", "1.05", "123.456", "0.0001"],
    "not_canonical": ["-0", "00", "01", "0.30", "1.0", "1.", ".5", "+1", "1e3", "1E3", "0.0",
                      "-0.0", " 1", "1 ", "1_000", "\u0661"],
}


# -- 3. pieces and tensors (test profile: 4096-byte pieces) --------------------------------

PIECE_SIZE = 4096
PIECES = [("empty", b""), ("abc", b"abc"), ("4096 bytes i mod 256", bytes(i % 256 for i in range(4096)))]


def tensor_bytes(dtype: str, count: int, fill: dict) -> bytes:
    if fill["kind"] == "zeros":
        values = [0] * count
    elif fill["kind"] == "ones":
        values = [1] * count
    else:
        values = [(i % fill["mod"]) + fill["offset"] for i in range(count)]
    if dtype == "F32":
        return struct.pack(f"<{count}f", *values)
    if dtype == "BF16":  # the top half of the float32: exact for these small integers
        return b"".join(struct.pack("<f", float(x))[2:] for x in values)
    if dtype == "I32":
        return struct.pack(f"<{count}i", *values)
    raise ValueError(dtype)


TENSORS = [  # name, dtype, shape, fill
    ("model.embed.weight", "F32", [3, 1000], {"kind": "mod", "mod": 251, "offset": -125}),
    ("model.norm.weight", "BF16", [8], {"kind": "mod", "mod": 7, "offset": -3}),
    ("model.zeros", "F32", [2048], {"kind": "zeros"}),
    ("model.empty", "F32", [0, 4], {"kind": "zeros"}),
    ("model.positions", "I32", [1024], {"kind": "mod", "mod": 1000, "offset": 0}),
]


def cut(data: bytes) -> list[bytes]:
    return [data[i:i + PIECE_SIZE] for i in range(0, len(data), PIECE_SIZE)]


def tensor_vector(name: str, dtype: str, shape: list[int], fill: dict) -> dict:
    count = 1
    for d in shape:
        count *= d
    data = tensor_bytes(dtype, count, fill)
    return {"name": name, "dtype": dtype, "shape": shape, "fill": fill, "nbytes": len(data),
            "head": data[:16].hex(), "blake3": b3(data),
            "pieces": [{"id": b3(p), "length": len(p)} for p in cut(data)],
            "record": {"dtype": dtype, "shape": shape, "pieces": [b3(p) for p in cut(data)]}}


def pieces_vectors() -> dict:
    return {
        "piece_size": PIECE_SIZE,
        "pieces": [{"name": name, "hex": data.hex(), "id": b3(data)} for name, data in PIECES],
        "tensors": [tensor_vector(*t) for t in TENSORS],
    }


# -- 4. manifests ------------------------------------------------------------------------

CONFIG = b'{"architectures": ["LlamaForCausalLM"], "hidden_size": 8}\n'


def manifest_model() -> dict:
    return {
        "v": 1, "piece_size": PIECE_SIZE,
        "tensors": {t["name"]: t["record"] for t in (tensor_vector(*x) for x in TENSORS)},
        "files": {"config.json": {"size": len(CONFIG), "pieces": [b3(CONFIG)]}},
        "meta": {"family": "llama", "source": "golden", "n": 5},
    }


def manifest_base() -> dict:
    rec = tensor_vector("model.norm.weight", "BF16", [8], {"kind": "ones"})["record"]
    return {"v": 1, "piece_size": PIECE_SIZE, "tensors": {"model.norm.weight": rec},
            "files": {}, "meta": {"family": "llama"}}


def invalid_manifests() -> list[tuple[str, dict]]:
    good = manifest_model()
    one = tensor_vector(*TENSORS[0])["record"]
    cases = []

    def variant(why: str, **changes: object) -> None:
        m = json.loads(json.dumps(good))
        for k, v in changes.items():
            if v is _DROP:
                del m[k]
            else:
                m[k] = v
        cases.append((why, m))

    variant("missing field meta", meta=_DROP)
    variant("extra field", extra=1)
    variant("version 2", v=2)
    variant("version true instead of 1", v=True)
    variant("piece_size 0", piece_size=0)
    variant("piece_size as a string", piece_size="4096")
    variant("unknown dtype", tensors={"t": dict(one, dtype="F128")})
    variant("dtype not a string", tensors={"t": dict(one, dtype=["F32"])})
    variant("negative dimension", tensors={"t": dict(one, shape=[-3, 1000])})
    variant("boolean dimension", tensors={"t": dict(one, shape=[True, 1000])})
    variant("one piece too few", tensors={"t": dict(one, pieces=one["pieces"][:2])})
    variant("one piece too many", tensors={"t": dict(one, pieces=one["pieces"] + one["pieces"][:1])})
    variant("piece id in upper case", tensors={"t": dict(one, pieces=[p.upper() for p in one["pieces"]])})
    variant("tensor record with an extra field", tensors={"t": dict(one, offset=0)})
    variant("empty tensor name", tensors={"": one})
    variant("file name with a path", files={"../config.json": {"size": 1, "pieces": [b3(b"x")]}})
    variant("file name with a slash", files={"a/b.json": {"size": 1, "pieces": [b3(b"x")]}})
    variant("negative file size", files={"c.json": {"size": -1, "pieces": []}})
    variant("tensors not a map", tensors=[])
    variant("meta not a map", meta=[])
    return cases


_DROP = object()


def manifests_vectors() -> dict:
    out = []
    for name, m in (("model", manifest_model()), ("base", manifest_base())):
        data = enc(m)
        out.append({"name": name, "value": tagged(m), "hex": data.hex(), "id": b3(data)})
    return {
        "files": [{"name": "config.json", "hex": CONFIG.hex(), "id": b3(CONFIG)}],
        "manifests": out,
        "invalid": [{"why": why, "hex": enc(m).hex()} for why, m in invalid_manifests()],
    }


# -- 5. ops, signatures and the state root ---------------------------------------------------

SIGN_DOMAIN = b"crdt-merge/op/v2\x00"
STATE_ROOT_DOMAIN = b"crdt-merge/state-root/v1\x00"
SEEDS = {  # RFC 8032 section 7.1 test keys 1-4, so the public keys are known from outside
    "alice": "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
    "bob": "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
    "carol": "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
    "carol2": "f5e5767cf153319517630f226876b86c8160cc583bc013744c6bf255f5cc0ee5",
}


def key(site: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(SEEDS[site]))


def pub(site: str) -> bytes:
    return key(site).public_key().public_bytes_raw()


def sign(body: dict, signer: str) -> tuple[bytes, bytes, str]:
    """(signing bytes, op bytes, op id) of ``body`` signed with ``signer``'s key."""
    signing = SIGN_DOMAIN + enc(body)
    data = enc(dict(body, sig=key(signer).sign(signing)))
    return signing, data, b3(data)


def ops_vectors() -> dict:
    """The golden project: one op of each kind, a revoke, an op its revoked author signed
    afterwards (valid, counts nowhere) and a key rotation; what the state says of them
    (written here from formats.md sections 6 and 8, not computed by crdt_merge); and ops a
    replica holding them must refuse, with the error code."""
    m_model = b3(enc(manifest_model()))
    m_base = b3(enc(manifest_base()))
    ops: list[dict] = []
    ids: dict[str, str] = {}
    clocks: dict[str, int] = {}

    def body_of(kind: str, site: str, member: str, deps: list[str], **fields: object) -> dict:
        """A non-genesis op body: its clock is 1 + the greatest clock of its deps."""
        return dict(v=2, kind=kind, site=site, clock=1 + max(clocks[d] for d in deps),
                    project=g, member=member, deps=sorted(deps), **fields)

    def add(name: str, body: dict, signer: str | None = None) -> str:
        signing, data, op_id = sign(body, signer or body["site"])
        ops.append({"name": name, "signer": signer or body["site"], "body": tagged(body),
                    "signing_hex": signing.hex(), "hex": data.hex(), "id": op_id})
        ids[name] = op_id
        clocks[op_id] = body["clock"]
        return op_id

    g = add("genesis", {
        "v": 2, "kind": "genesis", "site": "alice", "clock": 0, "name": "golden",
        "nonce": bytes(range(16)), "profile": {"name": "test", "piece_size": 4096},
        "sites": {"alice": {"key": pub("alice"), "role": "admin"}}})
    a_bob = add("admit bob", body_of("admit", "alice", g, [g],
                                     admit={"site": "bob", "key": pub("bob"), "role": "member"}))
    c_bob = add("contribute full", body_of("contribute", "bob", a_bob, [a_bob],
                                           manifest=m_model, form="full",
                                           params={"weight": "0.5", "density": "0.3"},
                                           label="bob fine-tune", family="llama"))
    c_alice = add("contribute delta", body_of("contribute", "alice", g, [c_bob],
                                              manifest=m_model, base=m_base, form="delta",
                                              params={"weight": "1", "n": 3,
                                                      "flags": [True, "a"]},
                                              label="", family="llama"))
    rt = add("retract", body_of("retract", "bob", a_bob, [c_alice], targets=[c_bob]))
    r1 = add("recipe", body_of("recipe", "alice", g, [rt], method="ties", anchor=m_base,
                               params={"density": "0.5", "normalize": True, "lambda_": "1"}))
    r2 = add("recipe superseding (the first is in its causal past)",
             body_of("recipe", "bob", a_bob, [r1], method="linear", params={}))
    x = add("retract of another site's op (held, no effect)",
            body_of("retract", "bob", a_bob, [r2], targets=[c_alice]))
    r3 = add("recipe concurrent with the superseding one (a conflict)",
             body_of("recipe", "alice", g, [r1], method="ties", params={"density": "0.7"}))
    a_carol = add("admit carol (admin)", body_of("admit", "alice", g, [x, r3],
                                                 admit={"site": "carol", "key": pub("carol"),
                                                        "role": "admin"}))
    c_adapter = add("contribute adapter with provenance",
                    body_of("contribute", "carol", a_carol, [a_carol], manifest=m_model,
                            base=m_base, form="adapter", params={"weight": "0.25"},
                            label="carol lora", family="llama",
                            provenance={"source": "peft", "rank": 8, "alpha": "16"}))
    rev = add("revoke bob", body_of("revoke", "carol", a_carol, [c_adapter],
                                    revoke={"member": a_bob, "site": "bob"}))
    late = add("contribute by bob after its revoke (valid, counts nowhere)",
               body_of("contribute", "bob", a_bob, [rev], manifest=m_model, form="full",
                       params={}, label="late", family="llama"))
    rot = add("rotate carol's key (admit that replaces her member)",
              body_of("admit", "alice", g, [late],
                      admit={"site": "carol", "key": pub("carol2"), "role": "admin"},
                      replaces=a_carol))
    c_carol2 = add("contribute by carol's new key", body_of(
        "contribute", "carol", rot, [rot], manifest=m_model, form="full", params={},
        label="carol again", family="llama"), signer="carol2")
    # bob's key after its revoke (formats.md 8, binding retracts): a retract whose causal
    # past holds the revoke is not binding and counts nowhere; one whose deps hide the
    # revoke is binding and counts (its target is already retracted: no other change)
    seen = add("retract by bob after seeing its revoke (not binding, counts nowhere)",
               body_of("retract", "bob", a_bob, [c_carol2], targets=[c_bob]))
    hidden = add("retract by bob whose deps hide its revoke (binding, counts)",
                 body_of("retract", "bob", a_bob, [rt], targets=[c_bob]))
    held = sorted(ids.values())
    state = {
        "live_contributions": sorted([c_alice, c_adapter, c_carol2]),
        "retracted": [c_bob],
        "not_counted": sorted([late, seen]),
        "binding_retracts_of_ended_members": [hidden],
        # r2 and r3 are concurrent, neither in the other's causal past: greatest (clock, id)
        "recipe_winner": max((clocks[r], r) for r in (r2, r3))[1],
        "recipe_conflicts": [min((clocks[r], r) for r in (r2, r3))[1]],
        "ignored_retracts": [[x, c_alice]],
        "members": sorted([
            {"site": "alice", "member": g, "role": "admin", "state": "live"},
            {"site": "bob", "member": a_bob, "role": "member", "state": "revoked",
             "ended_by": rev},
            {"site": "carol", "member": a_carol, "role": "admin", "state": "replaced",
             "ended_by": rot},
            {"site": "carol", "member": rot, "role": "admin", "state": "live"},
        ], key=lambda m: (m["site"], m["member"])),
    }

    v1 = add("genesis with the v1 profile (another project)", {
        "v": 2, "kind": "genesis", "site": "carol", "clock": 0, "name": "big",
        "nonce": bytes(16), "profile": {"name": "v1", "piece_size": 16 * 1024 * 1024},
        "sites": {"carol": {"key": pub("carol"), "role": "admin"},
                  "alice": {"key": pub("alice"), "role": "member"}}})

    rejected = []

    def reject(why: str, code: str, body: dict, signer: str | None = None,
               data: bytes | None = None) -> None:
        if data is None:
            data = sign(body, signer or body["site"])[1]
        rejected.append({"why": why, "code": code, "hex": data.hex()})

    top = c_carol2
    good_contrib = body_of("contribute", "alice", g, [top], manifest=m_model, form="full",
                           params={}, label="x", family="llama")
    reject("signed with another site's key", "bad_signature", good_contrib, signer="bob")
    _, data, _ = sign(good_contrib, "alice")
    flipped = bytearray(data)
    flipped[data.index(b"\xa3sig\xc4\x40") + 6 + 10] ^= 1  # a bit inside the 64 signature bytes
    reject("one bit of the signature flipped", "bad_signature", {}, data=bytes(flipped))
    reject("site not declared by its membership op", "unknown_site",
           dict(good_contrib, site="carol", member=g), signer="carol")
    reject("membership op not held", "unknown_site",
           dict(good_contrib, member=b3(b"no such op")))
    reject("a dep not held (the op waits; apply refuses it)", "dependency_missing",
           dict(good_contrib, deps=[b3(b"no such op")]))
    reject("clock 2^63-1 (finding 1: must be 1 + the clock of its deps)", "bad_clock",
           dict(good_contrib, clock=2**63 - 1))
    reject("clock one more than it should be", "bad_clock",
           dict(good_contrib, clock=good_contrib["clock"] + 1))
    reject("clock of its deps' clock, not one more", "bad_clock",
           dict(good_contrib, clock=clocks[top]))
    reject("a member admitting a site", "not_authorized",
           body_of("admit", "bob", a_bob, [top],
                   admit={"site": "dave", "key": pub("carol"), "role": "member"}))
    reject("a member revoking a member", "not_authorized",
           body_of("revoke", "bob", a_bob, [x], revoke={"member": g, "site": "alice"}))
    reject("admit of a name a live member holds (finding 2)", "site_taken",
           body_of("admit", "alice", g, [top],
                   admit={"site": "alice", "key": pub("bob"), "role": "admin"}))
    reject("admit of the rotated name again, without replaces", "site_taken",
           body_of("admit", "alice", g, [top],
                   admit={"site": "carol", "key": pub("bob"), "role": "member"}))
    reject("admit replacing a member already replaced in its causal past", "not_authorized",
           body_of("admit", "alice", g, [top],
                   admit={"site": "carol", "key": pub("bob"), "role": "admin"},
                   replaces=a_carol))
    reject("revoke of the only live admin in its causal past", "last_admin",
           body_of("revoke", "alice", g, [a_bob], revoke={"member": g, "site": "alice"}))
    reject("revoke of a member not in its causal past", "not_authorized",
           body_of("revoke", "alice", g, [g], revoke={"member": a_bob, "site": "bob"}))
    reject("revoke of a member already revoked in its causal past", "not_authorized",
           body_of("revoke", "alice", g, [top], revoke={"member": a_bob, "site": "bob"}))
    reject("op of another project", "wrong_project", dict(good_contrib, project=v1))
    reject("genesis of another project", "wrong_project", {},
           data=bytes.fromhex(ops[-1]["hex"]))
    reject("unknown kind", "schema_error", dict(good_contrib, kind="vote"))
    reject("kind not a string", "schema_error", dict(good_contrib, kind=["contribute"]))
    reject("version 1", "schema_error", dict(good_contrib, v=1))
    reject("version true", "schema_error", dict(good_contrib, v=True))
    reject("missing field label", "schema_error",
           {k: v for k, v in good_contrib.items() if k != "label"})
    reject("missing field deps", "schema_error",
           {k: v for k, v in good_contrib.items() if k != "deps"})
    reject("deps empty", "schema_error", dict(good_contrib, deps=[]))
    reject("deps unsorted", "schema_error", dict(good_contrib, deps=sorted([top, rot],
                                                                         reverse=True)))
    reject("deps with a repeat", "schema_error", dict(good_contrib, deps=[top, top]))
    reject("257 deps", "schema_error",
           dict(good_contrib, deps=sorted(b3(bytes([i % 256, i // 256])) for i in range(257))))
    reject("extra field", "schema_error", dict(good_contrib, note="hi"))
    reject("a recipe with the version 1 field supersedes", "schema_error",
           body_of("recipe", "alice", g, [top], method="linear", params={}, supersedes=[]))
    reject("negative clock", "schema_error", dict(good_contrib, clock=-1))
    reject("clock 2^63", "schema_error", dict(good_contrib, clock=2**63))
    reject("parameter 0.30 is not a canonical decimal", "schema_error",
           dict(good_contrib, params={"weight": "0.30"}))
    reject("parameter 1e999999999 is not a canonical decimal", "schema_error",
           dict(good_contrib, params={"weight": "1e999999999"}))
    reject("delta without base", "schema_error", dict(good_contrib, form="delta"))
    reject("adapter without base", "schema_error", dict(good_contrib, form="adapter"))
    reject("form lora", "schema_error", dict(good_contrib, form="lora", base=m_base))
    reject("provenance not a map", "schema_error", dict(good_contrib, provenance=["peft"]))
    reject("provenance 0.30 is not a canonical decimal", "schema_error",
           dict(good_contrib, provenance={"alpha": "0.30"}))
    reject("manifest id in upper case", "schema_error",
           dict(good_contrib, manifest=m_model.upper()))
    reject("retract targets unsorted", "schema_error",
           body_of("retract", "alice", g, [top], targets=sorted([c_bob, c_alice], reverse=True)))
    reject("retract of nothing", "schema_error",
           body_of("retract", "alice", g, [top], targets=[]))
    reject("revoke without site", "schema_error",
           body_of("revoke", "alice", g, [top], revoke={"member": a_bob}))
    reject("genesis with clock 1", "schema_error",
           {"v": 2, "kind": "genesis", "site": "alice", "clock": 1, "name": "g",
            "nonce": bytes(16), "profile": {"name": "test", "piece_size": 4096},
            "sites": {"alice": {"key": pub("alice"), "role": "admin"}}})
    reject("genesis with deps", "schema_error",
           {"v": 2, "kind": "genesis", "site": "alice", "clock": 0, "name": "g", "deps": [g],
            "nonce": bytes(16), "profile": {"name": "test", "piece_size": 4096},
            "sites": {"alice": {"key": pub("alice"), "role": "admin"}}})
    reject("profile test with the v1 piece size", "schema_error",
           {"v": 2, "kind": "genesis", "site": "alice", "clock": 0, "name": "g",
            "nonce": bytes(16), "profile": {"name": "test", "piece_size": 16 * 1024 * 1024},
            "sites": {"alice": {"key": pub("alice"), "role": "admin"}}})
    clock_bytes = b"\xa5clock" + enc(good_contrib["clock"])
    assert good_contrib["clock"] < 128 and data.count(clock_bytes) == 1
    reject("non-canonical encoding of a valid op (uint16 clock)", "non_canonical", {},
           data=data.replace(clock_bytes, b"\xa5clock\xcd\x00" + bytes([good_contrib["clock"]])))

    return {
        "sign_domain_hex": SIGN_DOMAIN.hex(),
        "keys": {site: {"seed": seed, "public": pub(site).hex()} for site, seed in SEEDS.items()},
        "manifests": {"model": m_model, "base": m_base},
        "ops": ops,
        "held": held,
        "state": state,
        "rejected": rejected,
    }


def state_root_vectors(ops: dict) -> dict:
    def root(ids: list[str]) -> str:
        return b3(STATE_ROOT_DOMAIN + b"".join(bytes.fromhex(i) for i in sorted(set(ids))))

    held = ops["held"]
    return {
        "domain_hex": STATE_ROOT_DOMAIN.hex(),
        "roots": [
            {"name": "empty set", "op_ids": [], "root": root([])},
            {"name": "the genesis alone", "op_ids": held[:1], "root": root(held[:1])},
            {"name": "every held op of ops.json", "op_ids": held, "root": root(held)},
            {"name": "the same ops reversed and repeated", "op_ids": held[::-1] + held,
             "root": root(held)},
        ],
    }


def write(name: str, value: object) -> None:
    text = json.dumps(value, indent=1, ensure_ascii=True) + "\n"
    (OUT / name).write_text(text)


def main() -> None:
    global OUT
    if len(sys.argv) > 1:
        OUT = Path(sys.argv[1])
    ops = ops_vectors()
    write("msgpack.json", msgpack_vectors())
    write("decimals.json", DECIMALS)
    write("pieces.json", pieces_vectors())
    write("manifests.json", manifests_vectors())
    write("ops.json", ops)
    write("state_root.json", state_root_vectors(ops))


if __name__ == "__main__":
    main()
