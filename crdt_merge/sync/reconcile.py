"""Range-based set reconciliation of op ids: pure functions over messages (specs/http.md).

Two replicas that hold 10^5 ops and differ in a few should not send 10^5 ids to find out
which. Following Meyer's range-based set reconciliation (https://arxiv.org/abs/2212.13567),
the 256-bit id space is cut into ranges; each side summarises a range by a fingerprint of the
ids it holds there. Equal fingerprints settle a range; unequal ones are split and compared
again, until a range is small enough to send its ids outright. The initiator (the client)
learns both differences; the responder (the server) keeps no state between messages.

A message is canonical msgpack ``{"v": 1, "ranges": [[lower, upper, mode, payload], ...]}``:

- ``lower`` (bin, 0-32 bytes, inclusive) and ``upper`` (bin, 1-32 bytes, exclusive, or nil
  for the end of the space) bound the range; ids are compared as raw 32-byte strings, and a
  bound may be a prefix (``b""`` is the start of the space).
- ``FINGERPRINT`` (0): payload is the 16-byte fingerprint of the sender's ids in the range.
- ``IDS`` (1): payload is the sender's ids in the range (raw 32 bytes each, ascending).
- ``DIFF`` (2, responder only, answering ``IDS``): payload is ``[responder_only, lacking]``:
  the responder's ids the initiator did not list, and a bitfield over the initiator's list
  (bit ``i``, least significant first within each byte, set when the responder lacks id
  ``i``).

The responder answers each range it was sent: nothing when its fingerprint is equal, its
ids when it holds at most :data:`ID_LIMIT` there, else :data:`BRANCHES` sub-ranges of about
equal count with their fingerprints; an ``IDS`` range always gets a ``DIFF``. The initiator
settles ``IDS``/``DIFF`` answers, and answers an unequal fingerprint with its own ids
(when it holds at most :data:`ID_LIMIT` there) or its own fingerprint, which makes the
responder split further. Every exchange halves the work by a factor of BRANCHES, so k
differences among n ids settle in about log_16(n / ID_LIMIT) + 2 round trips.

Fingerprint of a set S: ``blake3(DOMAIN + (sum of S as 256-bit big-endian integers mod
2^256, 32 bytes big-endian) + (|S| as 8 bytes big-endian))[:16]``. Sums make a range's
fingerprint O(1) from prefix sums. (Sums can be forced to collide by someone who chooses
ids freely; op ids are BLAKE3 hashes of signed ops, and a collision only delays
reconciliation of that range to the next full sync, never corrupts state.)
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import blake3

from crdt_merge import codec
from crdt_merge.errors import SchemaError

VERSION = 1
FINGERPRINT, IDS, DIFF = 0, 1, 2
ID_LIMIT = 32
BRANCHES = 16
ID_BYTES = 32
FP_BYTES = 16
DOMAIN = b"crdt-merge/rbsr/v1\x00"
_MOD = 1 << 256
#: responders refuse messages with more ranges than this (a body-size cap also applies)
MAX_RANGES = 1 << 16
#: initiators give up after this many round trips (a well-behaved peer needs ~10 for 10^9)
MAX_ROUNDS = 64

Bound = bytes | None  # None: the end of the id space (only as an upper bound)


def fingerprint(total: int, count: int) -> bytes:
    """The fingerprint of a set whose ids sum to ``total`` (any integer) and count ``count``."""
    return blake3.blake3(DOMAIN + (total % _MOD).to_bytes(32, "big")
                         + count.to_bytes(8, "big")).digest()[:FP_BYTES]


def _between(below: bytes, above: bytes) -> bytes:
    """The shortest prefix ``p`` of ``above`` with ``below < p``: a bound that puts ``below``
    in the range before it and ``above`` in the range from it."""
    i = 0
    while i < len(below) and below[i] == above[i]:
        i += 1
    return above[:i + 1]


class IdIndex:
    """A sorted set of 32-byte ids with prefix sums: any range's fingerprint in O(log n)."""

    def __init__(self, ids: Iterable[str | bytes]) -> None:
        hexes = {i if isinstance(i, str) else bytes(i).hex() for i in ids}
        raw = bytes.fromhex("".join(sorted(hexes)))  # lowercase hex sorts as the bytes do
        self.ids: list[bytes] = [raw[k:k + ID_BYTES] for k in range(0, len(raw), ID_BYTES)]
        self._sums = list(itertools.accumulate(
            (int.from_bytes(i, "big") for i in self.ids), initial=0))

    def __len__(self) -> int:
        return len(self.ids)

    def span(self, lower: bytes, upper: Bound) -> tuple[int, int]:
        """Index range ``[a, b)`` of the ids in ``[lower, upper)``."""
        a = bisect.bisect_left(self.ids, lower)
        b = len(self.ids) if upper is None else bisect.bisect_left(self.ids, upper)
        return a, max(a, b)

    def fingerprint(self, a: int, b: int) -> bytes:
        return fingerprint(self._sums[b] - self._sums[a], b - a)

    def split(self, lower: bytes, upper: Bound, a: int, b: int,
              parts: int) -> list[tuple[bytes, Bound, int, int]]:
        """Cut ids ``[a, b)`` (those in ``[lower, upper)``) into ``parts`` sub-ranges of
        about equal count, covering ``[lower, upper)`` exactly."""
        n = b - a
        cuts = [a + (n * k) // parts for k in range(1, parts)]
        cuts = sorted(set(c for c in cuts if a < c < b))
        out: list[tuple[bytes, Bound, int, int]] = []
        lo = lower
        prev = a
        for c in cuts:
            bound = _between(self.ids[c - 1], self.ids[c])
            out.append((lo, bound, prev, c))
            lo, prev = bound, c
        out.append((lo, upper, prev, b))
        return out


# -- messages ---------------------------------------------------------------------------------


def encode(ranges: Sequence[Sequence[Any]]) -> bytes:
    return codec.encode({"v": VERSION, "ranges": [list(r) for r in ranges]})


def _bad(msg: str) -> SchemaError:
    return SchemaError(f"invalid reconciliation message: {msg}")


def _id_list(value: Any, lower: bytes, upper: Bound) -> list[bytes]:
    if not isinstance(value, list):
        raise _bad("an id list must be a list")
    prev: bytes | None = None
    for i in value:
        if not isinstance(i, bytes) or len(i) != ID_BYTES:
            raise _bad("ids are 32 raw bytes")
        if (prev is not None and i <= prev) or i < lower or (upper is not None and i >= upper):
            raise _bad("ids must be ascending, unique and inside their range")
        prev = i
    return value


def decode(data: bytes, *, responder: bool) -> list[tuple[bytes, Bound, int, Any]]:
    """Decode and check a message. ``responder`` is True on the side that answers (which
    accepts FINGERPRINT and IDS), False on the initiator (which also accepts DIFF).

    Raises:
        NonCanonicalEncoding, SchemaError.
    """
    # at most 9 elements per range (a diff: 10 bytes at the least) and one per id (34
    # bytes): the memory decoding takes stays a small multiple of the message's size
    ranges = min(MAX_RANGES, len(data) // 10 + 1)
    value = codec.decode(data, max_items=9 * ranges + len(data) // (ID_BYTES + 2) + 64)
    if not isinstance(value, dict) or set(value) != {"v", "ranges"} or value["v"] != VERSION:
        raise _bad(f"expected {{v: {VERSION}, ranges}}")
    ranges = value["ranges"]
    if not isinstance(ranges, list) or len(ranges) > MAX_RANGES:
        raise _bad(f"ranges must be a list of at most {MAX_RANGES}")
    out = []
    prev_upper: Bound = b""
    for r in ranges:
        if not isinstance(r, list) or len(r) != 4:
            raise _bad("a range is [lower, upper, mode, payload]")
        lower, upper, mode, payload = r
        if not isinstance(lower, bytes) or len(lower) > ID_BYTES:
            raise _bad("lower bound must be at most 32 bytes")
        if upper is not None and (not isinstance(upper, bytes) or not 0 < len(upper) <= ID_BYTES
                                  or upper <= lower):
            raise _bad("upper bound must be 1-32 bytes above the lower bound, or nil")
        if prev_upper is None or lower < prev_upper:
            raise _bad("ranges must be ascending and disjoint")
        prev_upper = upper
        if mode == FINGERPRINT:
            if not isinstance(payload, bytes) or len(payload) != FP_BYTES:
                raise _bad("a fingerprint is 16 bytes")
        elif mode == IDS:
            _id_list(payload, lower, upper)
        elif mode == DIFF and not responder:
            if (not isinstance(payload, list) or len(payload) != 2
                    or not isinstance(payload[1], bytes)):
                raise _bad("a diff is [ids, bitfield]")
            _id_list(payload[0], lower, upper)
        else:
            raise _bad(f"mode {mode!r} is not allowed here")
        out.append((lower, upper, mode, payload))
    return out


# -- the responder (stateless) ----------------------------------------------------------------


def respond(index: IdIndex, message: bytes) -> bytes:
    """The responder's answer to one message (see the module docstring).

    Raises:
        NonCanonicalEncoding, SchemaError: a malformed message.
    """
    out: list[list[Any]] = []
    for lower, upper, mode, payload in decode(message, responder=True):
        a, b = index.span(lower, upper)
        if mode == FINGERPRINT:
            if index.fingerprint(a, b) == payload:
                continue
            if b - a <= ID_LIMIT:
                out.append([lower, upper, IDS, index.ids[a:b]])
                continue
            for lo, hi, x, y in index.split(lower, upper, a, b, BRANCHES):
                out.append([lo, hi, FINGERPRINT, index.fingerprint(x, y)])
        else:  # IDS: settle the range
            mine = index.ids[a:b]
            theirs = set(payload)
            held = set(mine)
            bits = bytearray((len(payload) + 7) // 8)
            for i, op_id in enumerate(payload):
                if op_id not in held:
                    bits[i // 8] |= 1 << (i % 8)
            out.append([lower, upper, DIFF, [[i for i in mine if i not in theirs], bytes(bits)]])
    return encode(out)


# -- the initiator ------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What a reconciliation found, and what it cost."""

    remote_only: list[str] = field(default_factory=list)  # the peer holds, we lack
    local_only: list[str] = field(default_factory=list)   # we hold, the peer lacks
    rounds: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


class Initiator:
    """The side that starts and learns the differences. Feed it the responder's answers."""

    def __init__(self, ids: Iterable[str | bytes]) -> None:
        self.index = IdIndex(ids)
        self.remote_only: set[bytes] = set()
        self.local_only: set[bytes] = set()

    def _ask(self, lower: bytes, upper: Bound, a: int, b: int) -> list[Any]:
        if b - a <= ID_LIMIT:
            return [lower, upper, IDS, self.index.ids[a:b]]
        return [lower, upper, FINGERPRINT, self.index.fingerprint(a, b)]

    def start(self) -> bytes:
        return encode([self._ask(b"", None, 0, len(self.index))])

    def step(self, answer: bytes) -> bytes | None:
        """Take the responder's answer; return the next message, or None when done.

        Raises:
            NonCanonicalEncoding, SchemaError: a malformed answer.
        """
        out = []
        for lower, upper, mode, payload in decode(answer, responder=False):
            a, b = self.index.span(lower, upper)
            mine = self.index.ids[a:b]
            if mode == FINGERPRINT:
                if self.index.fingerprint(a, b) != payload:
                    out.append(self._ask(lower, upper, a, b))
            elif mode == IDS:
                theirs = set(payload)
                held = set(mine)
                self.remote_only.update(i for i in payload if i not in held)
                self.local_only.update(i for i in mine if i not in theirs)
            else:  # DIFF, answering the ids we sent for exactly this range
                extra, bits = payload
                if len(bits) != (len(mine) + 7) // 8:
                    raise _bad("the diff bitfield does not match the ids sent")
                self.remote_only.update(extra)
                self.local_only.update(i for k, i in enumerate(mine) if bits[k // 8] >> (k % 8) & 1)
        return encode(out) if out else None

    def outcome(self) -> tuple[list[str], list[str]]:
        return (sorted(i.hex() for i in self.remote_only), sorted(i.hex() for i in self.local_only))


def run(local_ids: Iterable[str], respond_fn: Callable[[bytes], bytes]) -> Outcome:
    """Reconcile ``local_ids`` with a responder reached through ``respond_fn`` (one call per
    round trip).

    Raises:
        SchemaError: a malformed answer, or no agreement after :data:`MAX_ROUNDS` rounds;
            and whatever ``respond_fn`` raises.
    """
    init = Initiator(local_ids)
    out = Outcome()
    message: bytes | None = init.start()
    while message is not None:
        if out.rounds >= MAX_ROUNDS:
            raise _bad(f"no agreement after {MAX_ROUNDS} round trips")
        answer = respond_fn(message)
        out.rounds += 1
        out.bytes_sent += len(message)
        out.bytes_received += len(answer)
        message = init.step(answer)
    out.remote_only, out.local_only = init.outcome()
    return out
