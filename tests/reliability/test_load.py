"""Load, in short: one real server process (``crdt-merge serve``) and eight client sites
syncing with it at once for 10 s (tests/bench/load_bench.py is the full benchmark; its
numbers are in docs/benchmarks.md). Checked: no op lost or stored twice, nothing left
staged, equal state roots everywhere after a final sync, every client finished (no
deadlock), no 5xx, no client error, no traceback in the server's log.

Then regression tests for what the load runs found: ``Replica.state_root`` could cache
the root of an older op set when another thread reloaded the ops in between (the server
then reported a stale root until the next commit); ``GET /v1/state`` computed its ETag and
its body's state root separately, so an op committed in between made them disagree; and
the server closed idle keep-alive connections after 5 s, as httpx clients do, so a request
sent as the server closed one failed with a connection reset.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from crdt_merge.hashing import state_root
from crdt_merge.replica import Replica
from tests.bench.load_bench import run_load, tiny_contribution

TOKEN = "load-test-admin-token-0123456789"


def test_eight_clients_at_once_lose_nothing_and_converge(tmp_path: Path) -> None:
    report = run_load(8, seconds=10, work=tmp_path, threads=True, timeout=60)
    inv = report["invariants"]
    assert inv["finished"], inv["problems"]
    assert inv["lost"] == [] and inv["extra"] == []
    assert inv["duplicate_rows"] == 0 and inv["authored_twice"] == 0
    assert inv["staged_left"] == 0
    assert inv["server_root_is_table_root"]
    assert inv["client_roots_equal_server"], inv["clients_off_root"]
    assert inv["responses_5xx"] == 0 and inv["failed_requests"] == 0, report["statuses"]
    assert inv["client_error_count"] == 0, inv["client_errors"]
    assert inv["rejected"] == {}
    assert inv["etag_mismatches"] == 0
    assert inv["server_log_problems"] == []
    assert inv["ok"]
    # the load did happen: every client made several rounds, every op reached the server
    assert report["throughput"]["contributions"] >= 8 * 2
    assert report["throughput"]["retracts"] >= 1
    assert report["throughput"]["ops_at_end"] == 1 + 8 + report["throughput"]["ops_authored"]
    assert report["server_memory"]["peak_rss_mib"] < 512


def test_state_root_is_never_cached_from_an_older_op_set(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    writer = Replica.create(tmp_path / "r", "origin", name="load", profile="test")
    reader = Replica.open(writer.path)  # the server's handle; the writer is another process's
    reader.state_root()
    original = reader.ops
    paused, resume = threading.Event(), threading.Event()

    def slow_ops() -> dict:
        held = original()
        if threading.current_thread().name == "slow-reader" and not paused.is_set():
            paused.set()  # this thread holds the op set as it was; let the world move on
            resume.wait(5)
        return held

    monkeypatch.setattr(reader, "ops", slow_ops)
    tiny_contribution(writer, 1, 0)
    slow = threading.Thread(target=reader.state_root, name="slow-reader")
    slow.start()
    assert paused.wait(5)
    tiny_contribution(writer, 1, 1)  # another commit lands meanwhile ...
    fast = threading.Thread(target=reader.ops, name="fast-reader")
    fast.start()  # ... and another request reloads the op set
    fast.join(0.5)
    resume.set()
    slow.join(5)
    fast.join(5)
    assert not slow.is_alive() and not fast.is_alive()
    assert reader.state_root() == state_root(reader.store.op_ids())
    reader.close()
    writer.close()


def test_state_etag_is_the_root_of_its_body_when_an_op_commits_meanwhile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from starlette.testclient import TestClient

    from crdt_merge_server.app import create_app
    from crdt_merge_server.settings import Settings, parse_tokens

    writer = Replica.create(tmp_path / "r", "origin", name="load", profile="test")
    app = create_app(writer.path, Settings(tokens=parse_tokens(f"origin admin {TOKEN}")))
    service = app.state.service
    original = service.state
    rounds = iter(range(100))

    def state_after_a_commit() -> dict:
        tiny_contribution(writer, 2, next(rounds))  # committed while the request runs
        return original()

    monkeypatch.setattr(service, "state", state_after_a_commit)
    with TestClient(app) as client:
        for accept in ("application/json", "application/vnd.msgpack"):
            response = client.get("/v1/state", headers={"Authorization": f"Bearer {TOKEN}",
                                                         "Accept": accept})
            assert response.status_code == 200
            if accept == "application/json":
                root = response.json()["state_root"]
            else:
                from crdt_merge import codec

                root = codec.decode(response.content)["state_root"]
            assert response.headers["etag"] == f'"{root}"'
            assert root == writer.state_root()
    writer.close()


def test_server_keeps_an_idle_connection_longer_than_clients_do(tmp_path: Path) -> None:
    """uvicorn closed idle keep-alive connections after 5 s, just when httpx (HttpPeer)
    gives them up itself; under load a request sent on a connection the server was closing
    failed with "connection reset by peer" (the 16-client load run). The server must keep
    an idle connection open for longer than a client keeps it."""
    import socket

    import httpx

    from crdt_merge_server.main import KEEP_ALIVE_SECONDS
    from tests.bench.load_bench import Server

    client_expiry = httpx.Limits().keepalive_expiry
    assert client_expiry is not None and KEEP_ALIVE_SECONDS > client_expiry + 5
    with Replica.create(tmp_path / "r", "origin", name="load", profile="test"):
        pass
    (tmp_path / "tokens").write_text(f"origin admin {TOKEN}\n")
    server = Server(tmp_path / "r", tmp_path / "tokens", tmp_path / "server.log")
    try:
        port = int(server.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            assert healthz(sock, port).startswith(b"HTTP/1.1 200")
            time.sleep(client_expiry + 1)  # idle for longer than a client keeps it
            assert healthz(sock, port).startswith(b"HTTP/1.1 200")
    finally:
        server.stop()


def healthz(sock: Any, port: int) -> bytes:
    """``GET /healthz`` on an open connection; the whole answer (head and body)."""
    sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        body += chunk
    return head + b"\r\n\r\n" + body
