"""Range-based set reconciliation (crdt_merge.sync.reconcile): it finds exactly the set
differences, whatever the sets, and its cost grows with the differences, not the sets."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt_merge import codec
from crdt_merge.errors import NonCanonicalEncoding, SchemaError
from crdt_merge.sync import reconcile as rc


def ids(n: int, salt: str) -> list[str]:
    return [hashlib.blake2b(f"{salt}-{i}".encode(), digest_size=32).hexdigest() for i in range(n)]


def run(local: list[str], remote: list[str]) -> rc.Outcome:
    index = rc.IdIndex(remote)
    return rc.run(local, lambda message: rc.respond(index, message))


@settings(max_examples=60, deadline=None)
@given(shared=st.integers(0, 400), only_local=st.integers(0, 60), only_remote=st.integers(0, 60),
       salt=st.text(min_size=1, max_size=4))
def test_finds_exactly_the_differences(shared, only_local, only_remote, salt):
    common = ids(shared, salt + "c")
    mine, theirs = ids(only_local, salt + "l"), ids(only_remote, salt + "r")
    out = run(common + mine, common + theirs)
    assert out.remote_only == sorted(theirs)
    assert out.local_only == sorted(mine)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.binary(min_size=32, max_size=32), max_size=200),
       st.lists(st.binary(min_size=32, max_size=32), max_size=200))
def test_arbitrary_sets_including_shared_prefixes(a, b):
    """Ids that share long prefixes (bounds are prefixes of ids) still settle exactly."""
    a = [x.hex() for x in a] + ["00" * 31 + "01", "00" * 31 + "02"]
    b = [x.hex() for x in b] + ["00" * 31 + "02", "00" * 31 + "03"]
    out = run(a, b)
    assert out.remote_only == sorted(set(b) - set(a))
    assert out.local_only == sorted(set(a) - set(b))


@pytest.mark.parametrize("n, diffs, max_rounds, max_bytes", [
    (10_000, 1, 5, 4_000), (10_000, 100, 5, 80_000),
    (100_000, 1, 5, 4_000), (100_000, 100, 5, 160_000),
])
def test_cost_grows_with_differences_not_size(n, diffs, max_rounds, max_bytes):
    common = ids(n, "common")
    extra_local, extra_remote = ids(diffs // 2 + diffs % 2, "l"), ids(diffs // 2, "r")
    out = run(common + extra_local, common + extra_remote)
    assert len(out.remote_only) + len(out.local_only) == diffs
    assert out.rounds <= max_rounds
    assert out.bytes_sent + out.bytes_received <= max_bytes
    assert out.bytes_sent + out.bytes_received < n * 32 / 4  # well below the plain id list


def test_small_or_empty_sides_settle_in_one_round():
    assert run([], []).rounds == 1
    out = run([], ids(1000, "x"))  # an empty replica joining: one round, the ids once
    assert out.rounds == 1 and len(out.remote_only) == 1000
    assert out.bytes_received < 1000 * 34 + 100  # 32 bytes and a 2-byte header per id
    out = run(ids(1000, "y"), [])  # an empty server
    assert out.rounds == 1 and len(out.local_only) == 1000
    assert out.bytes_received < 100


def test_equal_sets_cost_one_fingerprint():
    same = ids(5000, "same")
    out = run(same, list(reversed(same)))
    assert out.rounds == 1 and out.bytes_sent + out.bytes_received < 100
    assert out.remote_only == out.local_only == []


def test_malformed_messages_are_refused():
    index = rc.IdIndex(ids(10, "m"))
    with pytest.raises(NonCanonicalEncoding):
        rc.respond(index, b"\xc1")
    bad = [
        {"v": 2, "ranges": []},
        {"v": 1, "ranges": [[b"", None, 7, b""]]},                          # unknown mode
        {"v": 1, "ranges": [[b"", None, rc.DIFF, [[], b""]]]},              # responder-only
        {"v": 1, "ranges": [[b"", None, rc.FINGERPRINT, b"short"]]},
        {"v": 1, "ranges": [[b"\x05", b"\x01", rc.FINGERPRINT, bytes(16)]]},  # empty range
        {"v": 1, "ranges": [[b"", b"\x80", rc.IDS, []], [b"\x10", None, rc.IDS, []]]},  # overlap
        {"v": 1, "ranges": [[b"", None, rc.IDS, [b"\x02" * 32, b"\x01" * 32]]]},  # unsorted
        {"v": 1, "ranges": [[b"\x80", None, rc.IDS, [b"\x01" * 32]]]},      # outside its range
    ]
    for value in bad:
        with pytest.raises(SchemaError):
            rc.respond(index, codec.encode(value))


def test_a_responder_that_never_agrees_is_cut_off():
    local = ids(1000, "z")
    index = rc.IdIndex(local)
    liar = rc.encode([[b"", None, rc.FINGERPRINT, bytes(16)]])

    def respond(message: bytes) -> bytes:
        rc.respond(index, message)
        return liar

    with pytest.raises(SchemaError):
        rc.run(local, respond)
