"""BLAKE3-256 ids and their types.

Every object is named by the BLAKE3-256 digest of its bytes, written as 64 lowercase hex
characters. The id types below are ``NewType``s over ``str`` so that signatures say which
kind of object an id names; :func:`check_id` is the one place ids from outside are validated.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import NewType

import blake3

from crdt_merge.errors import BadId

PieceId = NewType("PieceId", str)
ManifestId = NewType("ManifestId", str)
OpId = NewType("OpId", str)
PlanId = NewType("PlanId", str)
StateRoot = NewType("StateRoot", str)
SiteId = NewType("SiteId", str)

_ID = re.compile(r"[0-9a-f]{64}")

_THREADED_FROM = 1 << 20
_LOCAL = threading.local()
STATE_ROOT_DOMAIN = b"crdt-merge/state-root/v1\x00"


def digest(data: bytes | bytearray | memoryview) -> str:
    """The BLAKE3-256 of ``data`` as 64 lowercase hex characters (large inputs are hashed
    on several threads; BLAKE3's tree makes the digest the same)."""
    if len(data) >= _THREADED_FROM and not getattr(_LOCAL, "serial", False):
        return blake3.blake3(data, max_threads=blake3.blake3.AUTO).hexdigest()
    return blake3.blake3(data).hexdigest()


@contextmanager
def serial() -> Iterator[None]:
    """Within it, :func:`digest` hashes on this thread only: for work already spread over
    one thread per core, where BLAKE3's own threads would only contend (same digests)."""
    before = getattr(_LOCAL, "serial", False)
    _LOCAL.serial = True
    try:
        yield
    finally:
        _LOCAL.serial = before


def is_id(value: object) -> bool:
    """True when ``value`` is a well-formed id (64 lowercase hex characters)."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def check_id(value: object, what: str = "id") -> str:
    """Return ``value`` if it is a well-formed id, else raise :class:`BadId`."""
    if not is_id(value):
        raise BadId(value, what)
    assert isinstance(value, str)
    return value


def state_root(op_ids: Iterable[str]) -> StateRoot:
    """The state root of a set of ops: BLAKE3 over a domain tag and the sorted raw op ids.

    Duplicates count once, so the root is a function of the set, not of arrival order.
    """
    h = blake3.blake3(STATE_ROOT_DOMAIN)
    for op_id in sorted(set(op_ids)):
        h.update(bytes.fromhex(op_id))
    return StateRoot(h.hexdigest())


class Hasher:
    """Incremental BLAKE3 for bytes that arrive in chunks (streams, uploads)."""

    def __init__(self) -> None:
        self._h = blake3.blake3()
        self.size = 0

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        self._h.update(chunk)
        self.size += len(chunk)

    def hexdigest(self) -> str:
        return self._h.hexdigest()
