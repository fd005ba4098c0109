"""Canonical msgpack and canonical decimals as properties: every value has exactly one
encoding, and the decoder accepts exactly that one."""

from __future__ import annotations

import struct
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt_merge import codec
from crdt_merge.errors import FormatError, NonCanonicalEncoding

SETTINGS = settings(deadline=None, max_examples=150)

scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
           | st.integers(-300, 300) | st.text(max_size=40) | st.binary(max_size=40))
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=6),
    max_leaves=30,
)


def same(a: Any, b: Any) -> bool:
    """Equal and of the same types all the way down (``True == 1`` in Python, not here)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return sorted(a) == sorted(b) and all(same(a[k], b[k]) for k in a)
    return a == b


# -- a loose encoder: every valid msgpack encoding of a value, chosen by Hypothesis ----------


def _int_forms(v: int) -> list[bytes]:
    forms = []
    if 0 <= v <= 0x7F:
        forms.append(bytes([v]))
    if -32 <= v < 0:
        forms.append(struct.pack(">b", v))
    for code, fmt, lo, hi in ((0xCC, ">B", 0, 2**8), (0xCD, ">H", 0, 2**16),
                              (0xCE, ">I", 0, 2**32), (0xCF, ">Q", 0, 2**64),
                              (0xD0, ">b", -(2**7), 2**7), (0xD1, ">h", -(2**15), 2**15),
                              (0xD2, ">i", -(2**31), 2**31), (0xD3, ">q", -(2**63), 2**63)):
        if lo <= v < hi:
            forms.append(bytes([code]) + struct.pack(fmt, v))
    return forms


def _len_forms(n: int, fix: int | None, fix_max: int, codes: tuple[int, int, int]) -> list[bytes]:
    forms = [bytes([fix | n])] if fix is not None and n <= fix_max else []
    for code, fmt, limit in zip(codes, (">B", ">H", ">I"), (2**8, 2**16, 2**32), strict=True):
        if code and n < limit:
            forms.append(bytes([code]) + struct.pack(fmt, n))
    return forms


def loose(draw: Any, v: Any) -> bytes:
    """One valid msgpack encoding of ``v`` (widths, key order and duplicate keys drawn)."""
    pick = lambda forms: draw(st.sampled_from(forms))  # noqa: E731
    if v is None:
        return b"\xc0"
    if isinstance(v, bool):
        return b"\xc3" if v else b"\xc2"
    if isinstance(v, int):
        return pick(_int_forms(v))
    if isinstance(v, str):
        b = v.encode()
        return pick(_len_forms(len(b), 0xA0, 31, (0xD9, 0xDA, 0xDB))) + b
    if isinstance(v, bytes):
        return pick(_len_forms(len(v), None, 0, (0xC4, 0xC5, 0xC6))) + v
    if isinstance(v, list):
        return pick(_len_forms(len(v), 0x90, 15, (0, 0xDC, 0xDD))) + b"".join(loose(draw, x) for x in v)
    keys = draw(st.permutations(list(v)))
    entries = [loose(draw, k) + loose(draw, v[k]) for k in keys]
    if keys and draw(st.booleans()):  # a duplicate key before the real entry (last one wins)
        k = draw(st.sampled_from(keys))
        entries.insert(0, loose(draw, k) + loose(draw, None))
    return pick(_len_forms(len(entries), 0x80, 15, (0, 0xDE, 0xDF))) + b"".join(entries)


# -- properties -----------------------------------------------------------------------------


@SETTINGS
@given(values)
def test_round_trip(value):
    data = codec.encode(value)
    assert same(codec.decode(data), value)
    assert codec.encode(codec.decode(data)) == data


@SETTINGS
@given(st.data(), values)
def test_decoder_accepts_exactly_the_canonical_encoding(data, value):
    encoded = loose(data.draw, value)
    if encoded == codec.encode(value):
        assert same(codec.decode(encoded), value)
    else:
        with pytest.raises(NonCanonicalEncoding):
            codec.decode(encoded)


@SETTINGS
@given(values, st.data())
def test_prefixes_and_extensions_are_rejected(value, data):
    encoded = codec.encode(value)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(NonCanonicalEncoding):
        codec.decode(encoded[:cut])
    with pytest.raises(NonCanonicalEncoding):
        codec.decode(encoded + data.draw(st.binary(min_size=1, max_size=4)))


@SETTINGS
@given(st.binary(max_size=64) | values.map(codec.encode).flatmap(
    lambda b: st.tuples(st.integers(0, len(b) - 1), st.integers(0, 255)).map(
        lambda t: b[:t[0]] + bytes([t[1]]) + b[t[0] + 1:])))
def test_any_bytes_that_decode_re_encode_identically(data):
    try:
        value = codec.decode(data)
    except NonCanonicalEncoding:
        return
    assert codec.encode(value) == data


@SETTINGS
@given(st.lists(scalars, max_size=4), st.floats(), st.data())
def test_floats_have_no_encoding(items, x, data):
    items.insert(data.draw(st.integers(0, len(items))), x)
    nested = data.draw(st.sampled_from([items, {"k": items}, [[items]], x]))
    with pytest.raises(FormatError):
        codec.encode(nested)


@pytest.mark.parametrize("value", [
    {1: "int key"}, {b"k": "bytes key"}, {None: 1}, {(1,): 1}, 1.5, {"a": [0.0]},
    2**64, -(2**63) - 1, {1, 2}, object(), "\ud800", {"\udfff": 1},
])
def test_values_without_a_canonical_encoding(value):
    with pytest.raises(FormatError):
        codec.encode(value)


def test_nesting_limit():
    deep: Any = 1
    for _ in range(codec.MAX_DEPTH):
        deep = [deep]
    assert codec.decode(codec.encode(deep)) == deep
    with pytest.raises(FormatError):
        codec.encode([deep])


def test_tuples_and_bytearrays_encode_as_lists_and_bin():
    assert codec.encode((1, bytearray(b"x"), memoryview(b"y"))) == codec.encode([1, b"x", b"y"])


# -- canonical decimals ------------------------------------------------------------------------

decimals = st.decimals(allow_nan=False, allow_infinity=False, min_value=Decimal("-1e60"),
                       max_value=Decimal("1e60")) | st.decimals(allow_nan=False,
                                                                allow_infinity=False, places=40)


@SETTINGS
@given(decimals)
def test_canonical_decimal_is_exact_and_unique(dec):
    text = codec.canonical_decimal(dec)
    assert codec.is_canonical_decimal(text)
    assert Decimal(text) == dec  # every digit kept, no rounding
    assert codec.canonical_decimal(text) == text
    for spelling in (str(dec), f"{dec:e}", f"{dec:f}", format(dec, "f") + (".000" if "." not in
                                                                            format(dec, "f") else "000")):
        assert codec.canonical_decimal(spelling) == text


@SETTINGS
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_canonical_decimal_of_a_float_round_trips(x):
    text = codec.canonical_decimal(x)
    assert codec.is_canonical_decimal(text)
    assert float(text) == x


@SETTINGS
@given(st.text(alphabet="-+.0123456789eE_ ", max_size=12))
def test_canonical_strings_are_fixed_points(text):
    if codec.is_canonical_decimal(text):
        assert codec.canonical_decimal(text) == text
    try:
        canon = codec.canonical_decimal(text)
    except FormatError:
        return
    assert codec.is_canonical_decimal(canon)


# -- map key order: a permutation of a canonical map's keys is rejected ------------------------

def _with_keys_in(order: list[str], value: dict[str, Any]) -> bytes:
    """``value`` encoded canonically except that its top-level keys come in ``order``."""
    n = len(order)
    head = bytes([0x80 | n]) if n < 16 else b"\xde" + struct.pack(">H", n)
    return head + b"".join(codec.encode(k) + codec.encode(value[k]) for k in order)


@SETTINGS
@given(st.dictionaries(st.text(max_size=6), values, min_size=2, max_size=20), st.data())
def test_a_map_with_its_keys_permuted_is_rejected(value, data):
    canonical = sorted(value, key=lambda k: k.encode("utf-8"))
    order = data.draw(st.permutations(canonical))
    encoded = _with_keys_in(order, value)
    if order == canonical:
        assert encoded == codec.encode(value) and same(codec.decode(encoded), value)
    else:
        with pytest.raises(NonCanonicalEncoding):
            codec.decode(encoded)
        # also when the map is nested inside another value
        with pytest.raises(NonCanonicalEncoding):
            codec.decode(b"\x92\xc0" + encoded)


@SETTINGS
@given(st.lists(st.text(max_size=4), min_size=2, max_size=8, unique=True))
def test_utf8_order_is_not_utf16_or_length_order(keys):
    """The canonical order is that of the keys' UTF-8 bytes, for any keys."""
    value = {k: 0 for k in keys}
    decoded = codec.decode(codec.encode(value))
    assert list(decoded) == sorted(keys, key=lambda k: k.encode("utf-8"))
