"""What the HTTP server and the HTTP client share: media types, limits, request bodies and
the transport's own errors (specs/http.md).

The transport errors (``TransportError`` and its subclasses, under ``SyncError``) are
defined in :mod:`crdt_merge.errors`, so that every code decodes, and re-exported here.
Their ``code`` values travel in ``{code, detail}`` error bodies like every other error's, and
:func:`error_from_body` rebuilds the same class on the client.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from crdt_merge import codec
from crdt_merge.errors import (  # noqa: F401  (the transport errors are re-exported)
    BodyTooLarge,
    CrdtMergeError,
    Forbidden,
    HeadersTooLarge,
    PeerError,
    PeerUnreachable,
    RequestTimeout,
    SchemaError,
    TransportError,
    Unauthenticated,
    error_for_code,
)
from crdt_merge.hashing import check_id

PROTOCOL_VERSION = 1
MSGPACK = "application/vnd.msgpack"
JSON = "application/json"
OCTETS = "application/octet-stream"
#: ids per request in batched calls (fetching ops, asking which objects are missing)
BATCH = 4096
#: the fewest encoded bytes an element of a request body's list may take (an id is 66, an
#: op over 100): a body may hold at most ``len(body) // MIN_ITEM_BYTES + ITEM_SLACK``
#: array and map elements, which keeps the memory decoding costs within a small multiple
#: of the body's size (specs/http.md section 2)
MIN_ITEM_BYTES = 32
ITEM_SLACK = 64


def max_items(data: bytes, min_item_bytes: int = MIN_ITEM_BYTES) -> int:
    """The element budget of a message of ``len(data)`` bytes (see :data:`MIN_ITEM_BYTES`)."""
    return len(data) // min_item_bytes + ITEM_SLACK


# -- error bodies -----------------------------------------------------------------------------


def _plain(value: Any) -> bool:
    if isinstance(value, (str, int, bool)) or value is None:
        return True
    return isinstance(value, list) and all(isinstance(v, (str, int)) for v in value)


def error_body(exc: CrdtMergeError) -> dict[str, Any]:
    """``{code, detail, fields}``: fields are the error's own plain attributes (ids, sizes)."""
    fields = {k: v for k, v in vars(exc).items() if k != "detail" and _plain(v)}
    return {"code": exc.code, "detail": exc.detail, "fields": dict(sorted(fields.items()))}


def error_from_body(status: int, body: bytes) -> CrdtMergeError:
    """The typed error an error response stands for (``PeerError`` when it is not one of
    ours). Classes with their own ``__init__`` are built without calling it, so any class
    can be rebuilt from ``{code, detail}``."""
    try:
        value = json.loads(body)
        code, detail = value["code"], value["detail"]
        if not isinstance(code, str) or not isinstance(detail, str):
            raise TypeError
    except (ValueError, TypeError, KeyError, RecursionError):  # RecursionError: deep nesting
        text = body[:200].decode("utf-8", "replace")
        return PeerError(f"the peer answered HTTP {status} without an error body: {text!r}")
    cls = error_for_code(code)
    exc = cls.__new__(cls)
    CrdtMergeError.__init__(exc, detail)
    fields = value.get("fields")
    if isinstance(fields, dict):
        for key, val in fields.items():
            # data attributes only: nothing the class defines (args, code, methods...), and
            # not ``detail``, which the body's own string set
            if (isinstance(key, str) and key.isidentifier() and not key.startswith("_")
                    and key != "detail" and not hasattr(cls, key)):
                setattr(exc, key, val)
    return exc


# -- bodies -----------------------------------------------------------------------------------


def to_json(value: Any) -> Any:
    """A msgpack value as JSON-able data: bytes become hex strings."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, Mapping):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


def decode_map(data: bytes, fields: Mapping[str, type]) -> dict[str, Any]:
    """Decode a canonical msgpack request body that must be a map with exactly ``fields``
    of the given types.

    Raises:
        NonCanonicalEncoding: not canonical msgpack.
        SchemaError: another shape.
    """
    value = codec.decode(data, max_items=max_items(data))
    if not isinstance(value, dict) or set(value) != set(fields):
        raise SchemaError(f"the body must be a map with fields {sorted(fields)}")
    for name, kind in fields.items():
        if not isinstance(value[name], kind):
            raise SchemaError(f"field {name} must be a {kind.__name__}")
    return value


def id_list(value: list[Any], what: str = "id") -> list[str]:
    """Check a list of ids (64 lowercase hex each).

    Raises:
        BadId: one of them is not an id.
    """
    return [check_id(v, what) for v in value]
