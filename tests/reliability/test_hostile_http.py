"""Hostile clients against a real server process (uvicorn, on 127.0.0.1): path traversal
through ids, oversized headers and bodies, and slow-loris connections.

The server runs with short limits (header and body timeouts of 1.5 s, 64 KiB bodies) so
that each case ends in seconds. Every hostile request must be refused with its documented
status (or its connection closed) within those limits, the server must keep answering
other clients meanwhile, and nothing may be stored: the replica (ops, staged ops, indexed
objects, objects/, tmp/) and the folder around it are the same afterwards.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from crdt_merge import codec
from crdt_merge.hashing import digest
from crdt_merge.replica import Replica
from crdt_merge.sync import wire
from tests.reliability.fuzzing import snapshot
from tests.server.http_helpers import ServerProcess, contribute, new_project

ADMIN = "admin-token-0123456789"
WRITER = "writer-token-0123456789"
READER = "reader-token-0123456789"
TOKENS = f"alpha admin {ADMIN}\nbeta contribute {WRITER}\nci read {READER}\n"
HEADER_TIMEOUT = 1.5
BODY_TIMEOUT = 1.5
LIMIT = 64 * 1024
#: what a deadline may overrun by on a loaded two-core machine
SLACK = 3.0
SECRETS = (b"SQLite format 3", b"root:", b"BEGIN", b"PRIVATE")


@dataclass
class Served:
    replica: Replica
    server: ServerProcess
    around: Path  # the folder holding the replica, its tokens and a canary

    @property
    def port(self) -> int:
        return self.server.port

    def tree(self) -> list[str]:
        """Every file under the folder around the replica, but the server's log and the
        SQLite files (which the server writes to on any read)."""
        return sorted(str(p.relative_to(self.around)) for p in self.around.rglob("*")
                      if not p.name.startswith("replica.sqlite") and not p.name.endswith(".log"))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    around = tmp_path_factory.mktemp("hostile")
    replica = new_project(around / "replica")
    contribute(replica, 1)
    (around / "tokens").write_text(TOKENS)
    (around / "canary").mkdir()
    (around / "canary" / "passwd").write_text("root:x:0:0\n")
    env = {"CRDT_MERGE_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
           "CRDT_MERGE_BODY_TIMEOUT": str(BODY_TIMEOUT),
           "CRDT_MERGE_MAX_OBJECT_BYTES": str(LIMIT), "CRDT_MERGE_MAX_MESSAGE_BYTES": str(LIMIT)}
    server = ServerProcess(replica.path, "--token-file", str(around / "tokens"), env=env)
    try:
        server.wait_ready()
        yield Served(replica, server, around)
    finally:
        server.stop()
        replica.close()


@pytest.fixture
def unchanged(served: Served) -> Iterator[Served]:
    """The test's hostile requests must leave the replica and the folder around it as they
    were."""
    before = (snapshot(served.replica), served.tree())
    yield served
    after = (snapshot(served.replica), served.tree())
    assert after == before, "a hostile request changed the replica or the files around it"


# -- raw HTTP ---------------------------------------------------------------------------------


def head(method: str, target: str, token: str | None = READER, extra: str = "",
         close: bool = True) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode("latin-1")


def exchange(port: int, data: bytes, timeout: float = 15.0) -> bytes:
    """Send ``data`` and read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it answered and closed before taking everything: read what it said
        out = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
    return out


def read_response(sock: socket.socket) -> bytes:
    """One whole response (head and Content-Length bytes of body) from a kept-alive
    connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed mid-response: {data[:200]!r}"
        data += chunk
    head_part, body = data.split(b"\r\n\r\n", 1)
    length = int(head_part.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed mid-body"
        body += chunk
    return head_part + b"\r\n\r\n" + body


def status(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer[9:12])


def error_code(answer: bytes) -> str:
    body = answer.split(b"\r\n\r\n", 1)[1]
    return json.loads(body)["code"]


def still_serving(served: Served) -> None:
    with httpx.Client(base_url=served.server.url, timeout=10,
                      headers={"Authorization": f"Bearer {READER}"}) as client:
        assert client.get("/v1/state").status_code == 200


# -- path traversal ---------------------------------------------------------------------------

PLAIN = digest(b"absent")
TRAVERSALS = [
    "..%2F..%2Fetc%2Fpasswd", "../../etc/passwd", "..%2F..%2Freplica.sqlite",
    "%2e%2e%2f%2e%2e%2freplica.sqlite", "..%5C..%5Creplica.sqlite", "..\\..\\site.key",
    "%2F%2Fetc%2Fpasswd", "site.key", "..%2Fsite.key", "..%2F..%2Fcanary%2Fpasswd",
    f"{PLAIN[:2]}%2F{PLAIN}", f"..%2Fobjects%2F{PLAIN[:2]}%2F{PLAIN}", f"{PLAIN}%00",
    f"{PLAIN[:63]}%00", "%00" * 64, f"{PLAIN}%2F..%2F..%2Freplica.sqlite", f"{PLAIN}/",
    f"{PLAIN}/../../replica.sqlite", f"{PLAIN.upper()}", f"{PLAIN} ", f"%20{PLAIN}",
    f"{PLAIN}%0d%0aX-Injected:%201", "a" * 64 + "%E2%80%AE", "0" * 8000, "%2e" * 2000,
    f"{PLAIN}?../../replica.sqlite", f"{PLAIN}#x", "~root", "%u002e%u002e%u2215etc",
]


@pytest.mark.parametrize("target", TRAVERSALS)
def test_path_traversal_through_object_ids(unchanged: Served, target: str) -> None:
    """Ids that are paths, or paths that are ids with something added: 400 bad_id or no
    route at all, never a file from outside objects/ nor one written anywhere."""
    port = unchanged.port
    for method, token, body in (("GET", READER, b""), ("PUT", WRITER, b"pwned")):
        extra = f"Content-Length: {len(body)}\r\n" if method == "PUT" else ""
        answer = exchange(port, head(method, f"/v1/pieces/{target}", token, extra) + body)
        code = status(answer)
        if code == 307:  # Starlette's redirect of a trailing slash: to the id itself
            location = answer.split(b"\r\nlocation: ", 1)[1].split(b"\r\n", 1)[0]
            assert location == f"http://127.0.0.1/v1/pieces/{target.rstrip('/')}".encode()
            continue
        if code == 422:  # the query is not part of the id: a plain id, the wrong bytes
            assert method == "PUT" and error_code(answer) == "hash_mismatch", answer[:300]
        else:
            assert code in (400, 404, 405, 431), answer[:300]
        for secret in SECRETS:
            assert secret not in answer, (method, target, answer[:300])
        assert b"X-Injected" not in answer.split(b"\r\n\r\n", 1)[0]


@pytest.mark.parametrize("bad", ["../../etc/passwd", "..\\..\\site.key", "\x00" * 64,
                                 f"{PLAIN}\x00", "a/" * 32, "0" * 10_000, f"{PLAIN}\n"])
def test_path_traversal_through_ids_in_bodies(unchanged: Served, bad: str) -> None:
    with httpx.Client(base_url=unchanged.server.url, timeout=10) as client:
        for path, token in (("/v1/pieces/missing", READER), ("/v1/ops/fetch", READER)):
            r = client.post(path, content=codec.encode({"ids": [PLAIN, bad]}),
                            headers={"Authorization": f"Bearer {token}",
                                     "Content-Type": wire.MSGPACK})
            assert r.status_code == 400 and r.json()["code"] == "bad_id", r.text


# -- oversized headers --------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["one 100 KB header", "3000 headers", "101 headers",
                                  "20 KB request line", "trickled 40 KB header"])
def test_oversized_headers_are_refused(unchanged: Served, case: str) -> None:
    port = unchanged.port
    start = time.monotonic()
    if case == "one 100 KB header":
        answer = exchange(port, head("GET", "/healthz", extra="X-Big: " + "a" * 100_000 + "\r\n"))
    elif case == "3000 headers":
        answer = exchange(port, head("GET", "/healthz", extra="".join(
            f"X-{i}: {i}\r\n" for i in range(3000))))
    elif case == "101 headers":  # with Host, Authorization and Connection: 104
        answer = exchange(port, head("GET", "/v1/state", extra="".join(
            f"X-{i}: {i}\r\n" for i in range(101))))
    elif case == "20 KB request line":
        answer = exchange(port, head("GET", "/v1/pieces/" + "a" * 20_000))
    else:  # more than h11 buffers for an incomplete head, sent in small pieces
        with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
            sock.sendall(head("GET", "/healthz", close=True)[:-2])
            answer = b""
            try:
                for _ in range(400):
                    sock.sendall(b"X-Pad: " + b"p" * 90 + b"\r\n")
                    if select.select([sock], [], [], 0)[0]:
                        break
            except (BrokenPipeError, ConnectionResetError):
                pass
            try:
                while chunk := sock.recv(65536):
                    answer += chunk
            except ConnectionResetError:
                pass
    if not answer and case.startswith("trickled"):
        pass  # closed while we were still sending: the reset may beat the 400 to us
    else:
        assert status(answer) in (400, 431), answer[:300]
        if status(answer) == 431:
            assert error_code(answer) == "headers_too_large"
    assert time.monotonic() - start < SLACK
    still_serving(unchanged)


def test_headers_within_the_limits_are_served(served: Served) -> None:
    extra = "".join(f"X-{i}: {i}\r\n" for i in range(90)) + "X-Big: " + "b" * 8000 + "\r\n"
    assert status(exchange(served.port, head("GET", "/v1/state", extra=extra))) == 200


# -- oversized bodies ---------------------------------------------------------------------------


def chunked(method: str, target: str, token: str, total: int, content_type: str) -> bytes:
    piece = b"z" * 16384
    body = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(total // len(piece)))
    return head(method, target, token, f"Content-Type: {content_type}\r\n"
                                       "Transfer-Encoding: chunked\r\n") + body + b"0\r\n\r\n"


@pytest.mark.parametrize("case", ["declared object", "streamed object", "declared message",
                                  "streamed message", "streamed to a held object"])
def test_oversized_bodies_are_refused(unchanged: Served, case: str) -> None:
    port = unchanged.port
    held = unchanged.replica.store.object_ids()[0]
    target = f"/v1/pieces/{held if 'held' in case else digest(b'big')}"
    if case == "declared object":
        data = head("PUT", target, WRITER, f"Content-Length: {1 << 40}\r\n") + b"z" * 1000
    elif case == "declared message":
        data = head("POST", "/v1/ops", WRITER, f"Content-Type: {wire.MSGPACK}\r\n"
                                               f"Content-Length: {LIMIT + 1}\r\n") + b"z" * 1000
    elif case == "streamed message":
        data = chunked("POST", "/v1/ops", WRITER, 4 * LIMIT, wire.MSGPACK)
    else:
        data = chunked("PUT", target, WRITER, 4 * LIMIT, wire.OCTETS)
    start = time.monotonic()
    answer = exchange(port, data)
    assert status(answer) == 413 and error_code(answer) == "body_too_large", answer[:300]
    assert time.monotonic() - start < SLACK
    still_serving(unchanged)


# -- slow loris ---------------------------------------------------------------------------------


@dataclass
class Loris:
    """One hostile connection: sends ``prefix``, then ``trickle`` one byte every ``every``
    seconds, until the server answers or closes (or ``give_up`` seconds pass)."""

    name: str
    prefix: bytes
    trickle: bytes = b""
    every: float = 0.25
    give_up: float = 20.0
    answer: bytes = b""
    elapsed: float = -1.0
    closed: bool = False
    thread: threading.Thread = field(init=False)

    def run(self, port: int) -> None:
        start = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=self.give_up) as sock:
                sock.sendall(self.prefix)
                pending = self.trickle
                while time.monotonic() - start < self.give_up:
                    if select.select([sock], [], [], self.every)[0]:
                        self._read(sock, start)
                        return
                    if pending:
                        sock.sendall(pending[:1])
                        pending = pending[1:]
        except (BrokenPipeError, ConnectionResetError):
            self.closed = True
            self.elapsed = time.monotonic() - start

    def _read(self, sock: socket.socket, start: float) -> None:
        try:
            while chunk := sock.recv(65536):
                self.answer += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        self.closed = True
        self.elapsed = time.monotonic() - start

    def start(self, port: int) -> Loris:
        self.thread = threading.Thread(target=self.run, args=(port,), daemon=True)
        self.thread.start()
        return self


def test_slow_loris_connections_are_cut_and_others_served(unchanged: Served) -> None:
    """Connections that send nothing, trickle a request head, trickle a body (a PUT holds a
    temp file meanwhile; a POST holds a buffer), or trickle a body the route never reads are
    closed within the configured timeouts, while other clients are served as usual."""
    port = unchanged.port
    piece = digest(b"x" * 1000)
    body_head = head("PUT", f"/v1/pieces/{piece}", WRITER, "Content-Length: 1000\r\n")
    lorises = [Loris(f"silent {i}", b"") for i in range(6)] + [
        Loris("head trickle", b"", head("GET", "/v1/state") + b"X-a: b\r\n" * 200),
        Loris("head trickle, keep-alive", b"", head("GET", "/healthz", close=False) * 4),
        Loris("PUT body trickle", body_head, b"x" * 1000),
        Loris("POST body trickle", head("POST", "/v1/ops", WRITER,
                                        f"Content-Type: {wire.MSGPACK}\r\nContent-Length: 500\r\n"),
              b"\x81" * 500, every=0.1),
        Loris("PUT body stalled", body_head + b"x" * 10),
        Loris("unread body trickle", head("GET", "/v1/state", READER, "Content-Length: 900\r\n",
                                          close=False), b"y" * 900),
    ]
    for loris in lorises:
        loris.start(port)
    time.sleep(0.3)
    # meanwhile, ordinary clients are served promptly
    with httpx.Client(base_url=unchanged.server.url, timeout=10,
                      headers={"Authorization": f"Bearer {READER}"}) as client:
        held = unchanged.replica.store.object_ids()[0]
        for _ in range(10):
            t = time.monotonic()
            assert client.get("/v1/state").status_code == 200
            assert client.get(f"/v1/pieces/{held}").status_code == 200
            r = client.post("/v1/pieces/missing", content=codec.encode({"ids": [held]}),
                            headers={"Content-Type": wire.MSGPACK})
            assert r.status_code == 200
            assert time.monotonic() - t < SLACK
            time.sleep(0.1)
    for loris in lorises:
        loris.thread.join(timeout=30)
    for loris in lorises:
        assert loris.closed, f"{loris.name}: still open after {loris.give_up} s"
        limit = BODY_TIMEOUT if "body" in loris.name else HEADER_TIMEOUT
        assert loris.elapsed < limit + SLACK, f"{loris.name}: closed after {loris.elapsed:.1f} s"
        if loris.name.startswith(("PUT body", "POST body")):
            assert status(loris.answer) == 408 and error_code(loris.answer) == "request_timeout"
            assert b"connection: close" in loris.answer.lower()
        if loris.name == "unread body trickle":  # answered at once, then cut
            assert status(loris.answer) == 200
    assert not list((unchanged.replica.path / "tmp").iterdir()), "a temp file was left behind"


def test_limits_spare_honest_clients(served: Served) -> None:
    """A kept-alive connection may idle past the header timeout (it is the keep-alive
    timeout's, 30 s), and an upload slower than the body timeout per byte but above the
    minimum rate completes."""
    port = served.port
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(head("GET", "/healthz", close=False))
        assert status(read_response(sock)) == 200
        time.sleep(HEADER_TIMEOUT + 0.5)  # idle, kept alive
        sock.sendall(head("GET", "/healthz", close=False))
        assert status(read_response(sock)) == 200
    data = bytes(range(256)) * 100  # 25.6 KB, in 8 parts 0.25 s apart: ~12 KB/s
    piece = digest(data)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
            sock.sendall(head("PUT", f"/v1/pieces/{piece}", WRITER,
                              f"Content-Length: {len(data)}\r\n"))
            step = len(data) // 8
            for i in range(0, len(data), step):
                time.sleep(0.25)
                sock.sendall(data[i:i + step])
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert status(answer) == 201, answer[:300]
        assert served.replica.store.has(piece)
    finally:
        served.replica.store.delete_objects([piece])


def test_numbers_of_thousands_of_digits_in_headers(unchanged: Served) -> None:
    """A Range position or a Content-Length of 5000 digits (int() refuses more than 4300):
    the Range is past any object's end or clipped to it, the length over any cap. Both
    were a 500 (a ValueError in the route)."""
    port = unchanged.port
    held = unchanged.replica.store.object_ids()[0]
    for value in ("9" * 5000 + "-", "-" + "9" * 5000, "0-" + "9" * 5000):
        answer = exchange(port, head("GET", f"/v1/pieces/{held}", extra=f"Range: bytes={value}\r\n"))
        assert status(answer) in (200, 206, 416), answer[:300]
    answer = exchange(port, head("PUT", f"/v1/pieces/{digest(b'q')}", WRITER,
                                 f"Content-Length: {'9' * 5000}\r\n") + b"q")
    assert status(answer) in (400, 413), answer[:300]
    still_serving(unchanged)
