"""Bearer tokens are compared exactly: a token in another case, one character off, a prefix,
an extension or with a character swapped is refused (every other test's tokens are lower
case hex, so a case-insensitive comparison passed them all)."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from crdt_merge.sync.wire import Unauthenticated
from crdt_merge_server.auth import Gate
from crdt_merge_server.settings import Settings, parse_tokens

SECRET = "Mixed-Case_Token-9f8E7d6C5b4A3f2e1D0c"


def request(header: str) -> Request:
    return Request({"type": "http", "method": "GET", "path": "/v1/state", "headers":
                    [(b"authorization", header.encode())], "client": ("10.0.0.9", 5000)})


@pytest.fixture
def gate() -> Gate:
    return Gate(Settings(tokens=parse_tokens(f"alpha admin {SECRET}\nbeta read {'x' * 40}\n")))


def test_the_exact_token_passes(gate: Gate) -> None:
    token = gate.check(request(f"Bearer {SECRET}"), "admin")
    assert token is not None and token.site == "alpha"


@pytest.mark.parametrize("presented", [
    SECRET.lower(), SECRET.upper(), SECRET.swapcase(),
    SECRET[:-1], SECRET + "0", SECRET[:-1] + "d",    # one character short, long or off
    SECRET[1:], "m" + SECRET[1:],                    # first character dropped or re-cased
    SECRET[:5] + SECRET[6] + SECRET[5] + SECRET[7:],  # two characters swapped
    "X" * 40,                                        # another token's upper case
])
def test_a_near_miss_is_refused(gate: Gate, presented: str) -> None:
    assert gate.token_for(presented) is None
    with pytest.raises(Unauthenticated):
        gate.check(request(f"Bearer {presented}"), "read")
