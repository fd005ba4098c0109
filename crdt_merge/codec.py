"""Canonical msgpack: one byte string per value, and a strict decoder.

The canonical form (specs/formats.md): maps have ``str`` keys in ascending code-point order
(the same as UTF-8 byte order), integers take their shortest encoding, strings use the
``str`` family and byte strings the ``bin`` family, and there are no floats and no
extension types. :func:`decode` accepts exactly the bytes :func:`encode` produces: anything
that does not re-encode to itself raises :class:`NonCanonicalEncoding`.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

import msgpack

from crdt_merge.errors import FormatError, NonCanonicalEncoding

MAX_DEPTH = 32
_DECIMAL = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]*[1-9])?")
_NUMBERISH = re.compile(r"[-+]?[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?|[-+]?[0-9]+\.")


def _canon(value: Any, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise FormatError(f"value nests deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, (bool, str, bytes)):
        return value
    if isinstance(value, int):
        if not -(2**63) <= value < 2**64:
            raise FormatError(f"integer {value} does not fit msgpack's 64 bits")
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, float):
        raise FormatError("floats are not allowed; write numbers as canonical decimal strings")
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise FormatError(f"map key {key!r} is not a string")
        return {k: _canon(value[k], depth + 1) for k in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [_canon(v, depth + 1) for v in value]
    raise FormatError(f"{type(value).__name__} has no canonical msgpack encoding")


def encode(value: Any) -> bytes:
    """The canonical msgpack bytes of ``value`` (dicts, lists, str, bytes, int, bool, None).

    Raises:
        FormatError: a float, a non-string map key, an unsupported type or too deep nesting.
    """
    try:
        return msgpack.packb(_canon(value, 0), use_bin_type=True)
    except UnicodeEncodeError as exc:  # a lone surrogate has no UTF-8 form
        raise FormatError(f"string is not valid Unicode: {exc.reason}") from None


def _reject_ext(code: int, data: bytes) -> Any:
    raise NonCanonicalEncoding(f"msgpack extension type {code} is not allowed")


class _Budget:
    """Counts the elements of the arrays and maps msgpack builds, refusing past ``limit``:
    each hook runs as its container is completed, and no container may be longer than
    the limit either, so at most about twice ``limit`` elements are ever built."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def _spend(self, n: int) -> None:
        self.left -= n + 1
        if self.left < 0:
            raise NonCanonicalEncoding("too many elements for the size of the message")

    def array(self, value: list[Any]) -> list[Any]:
        self._spend(len(value))
        return value

    def map(self, pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
        self._spend(len(pairs))
        return dict(pairs)


def decode(data: bytes, *, max_items: int | None = None) -> Any:
    """Decode canonical msgpack strictly.

    ``max_items`` bounds the array and map elements of the whole value (and so the memory
    decoding may take: a body of one-byte elements would otherwise cost some 60 bytes of
    Python objects per byte). Callers decoding a request body derive it from the body's
    size and the smallest element they accept (specs/http.md).

    Raises:
        NonCanonicalEncoding: the bytes are malformed, contain floats or extension types,
            do not re-encode to themselves (unsorted or duplicate keys, long integer forms,
            trailing bytes, ...), or hold more than ``max_items`` elements.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise NonCanonicalEncoding("expected bytes")
    data = bytes(data)
    bounds: dict[str, Any] = {}
    if max_items is not None:
        budget = _Budget(max_items)
        bounds = {"max_array_len": max_items, "max_map_len": max_items,
                  "list_hook": budget.array, "object_pairs_hook": budget.map}
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=_reject_ext,
            **bounds,
        )
    except NonCanonicalEncoding:
        raise
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError, UnicodeDecodeError, RecursionError) as exc:
        raise NonCanonicalEncoding(f"malformed msgpack: {exc}") from None
    try:
        again = encode(value)
    except FormatError as exc:
        raise NonCanonicalEncoding(f"not canonical: {exc.detail}") from None
    if again != data:
        raise NonCanonicalEncoding("bytes do not re-encode to themselves (key order, "
                                   "integer width or duplicate keys)")
    return value


def is_canonical_decimal(text: str) -> bool:
    """True for canonical decimal strings: ``0``, ``-1.5``, ``0.3``; not ``0.30``, ``-0``, ``1e3``."""
    return _DECIMAL.fullmatch(text) is not None and text != "-0"


def looks_numeric(text: str) -> bool:
    """True for strings a person would read as a number (``0.30``, ``1e-3``, ``.5``)."""
    return _NUMBERISH.fullmatch(text) is not None


#: decimal exponents beyond this have no canonical decimal (the string would be huge)
MAX_DECIMAL_EXPONENT = 4096


def canonical_decimal(value: str | int | float | Decimal) -> str:
    """The canonical decimal string of a number: no exponent, no trailing zeros, no ``-0``.

    Floats are taken at their shortest round-trip ``repr`` (``0.1`` -> ``"0.1"``). Every
    digit is kept (no rounding to a context precision).

    Raises:
        FormatError: not a finite number, or a decimal exponent beyond
            :data:`MAX_DECIMAL_EXPONENT` either way.
    """
    if isinstance(value, bool):
        raise FormatError("a boolean is not a number")
    try:
        if isinstance(value, float):
            dec = Decimal(repr(value))
        else:
            dec = Decimal(str(value).strip())
    except (InvalidOperation, ValueError):  # ValueError: an int too long for str()
        raise FormatError(f"{str(value)[:40]!r} is not a number") from None
    if not dec.is_finite():
        raise FormatError(f"{value!r} is not a finite number")
    if dec == 0:
        return "0"
    # bounded before formatting: "1e999999999" would otherwise expand to a gigabyte
    if (abs(dec.adjusted()) > MAX_DECIMAL_EXPONENT
            or len(dec.as_tuple().digits) > 2 * MAX_DECIMAL_EXPONENT):
        raise FormatError(f"{str(value)[:40]!r} is out of range for a canonical decimal")
    # format(..., "f") keeps every digit; normalize() would round to 28 significant digits
    text = format(dec, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text
