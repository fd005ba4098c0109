"""Fixtures for the server tests: the three sync transports behind one factory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from http_helpers import ASGIBridge, ServerProcess

from crdt_merge.replica import Replica
from crdt_merge.sync import LocalPeer
from crdt_merge.sync.http import HttpPeer

TRANSPORTS = ["filesystem", "asgi", "uvicorn"]


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def serve(transport: str) -> Iterator[Callable[..., Any]]:
    """``serve(replica) -> Peer``: the replica's directory, reached through the transport
    under test (another Replica handle, an in-process ASGI app, or a uvicorn process)."""
    cleanups: list[Callable[[], None]] = []

    def make(replica: Replica, token: str | None = None, settings: Any = None) -> Any:
        if transport == "filesystem":
            other = Replica.open(replica.path)
            cleanups.append(other.close)
            return LocalPeer(other)
        if transport == "asgi":
            from crdt_merge_server.app import create_app
            from crdt_merge_server.settings import Settings

            app = create_app(replica.path, settings or Settings())
            bridge = ASGIBridge(app)
            peer = HttpPeer("http://testserver", token, transport=bridge)
            cleanups.extend([app.state.service.close, bridge.close, peer.close])
            return peer
        proc = ServerProcess(replica.path).wait_ready()
        peer = HttpPeer(proc.url, token)
        cleanups.extend([proc.stop, peer.close])
        return peer

    yield make
    for cleanup in reversed(cleanups):
        cleanup()


#: seconds one server test may take, setup and teardown included (pytest-timeout): a hung
#: bridge, server process or teardown fails the test instead of holding the run
SERVER_TEST_TIMEOUT = 240


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/server/" in item.nodeid and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SERVER_TEST_TIMEOUT))
