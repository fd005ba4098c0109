"""Abuse: what a hostile or broken client sends is refused with the right status and a
``{code, detail}`` body, and nothing is stored in any case (objects, ops, staged ops, temp
files all unchanged). Driven in-process through httpx.ASGITransport, plus the two checks
that need a real socket (a huge declared body; a non-loopback bind without tokens)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from http_helpers import PYTHON, REPO, ASGIBridge, ServerProcess, contribute, join, new_project

from crdt_merge import codec
from crdt_merge.errors import BadId, HashMismatch, PieceMissing
from crdt_merge.hashing import digest
from crdt_merge.sync import wire
from crdt_merge.sync.http import HttpPeer
from crdt_merge_server.app import create_app
from crdt_merge_server.main import check_exposure
from crdt_merge_server.settings import Settings, parse_tokens

ADMIN = "admin-token-0123456789"
WRITER = "writer-token-0123456789"
READER = "reader-token-0123456789"
TOKENS = f"""
# site scopes token
alpha admin {ADMIN}
beta contribute {WRITER}
ci read {READER}
"""
LIMIT = 64 * 1024
MSGPACK = {"Content-Type": wire.MSGPACK}


def snapshot(replica) -> dict:
    tmp = sorted(p.name for p in (replica.path / "tmp").iterdir())
    return {"root": replica.state_root(), "objects": replica.store.object_ids(),
            "staged": replica.store.staged_rows(), "tmp": tmp}


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple]:
    replica = new_project(tmp_path / "origin")
    contribute(replica, 1)
    settings = Settings(tokens=parse_tokens(TOKENS), max_object_bytes=LIMIT,
                        max_message_bytes=LIMIT)
    app = create_app(replica.path, settings)
    bridge = ASGIBridge(app)
    client = httpx.Client(base_url="http://testserver", transport=bridge)
    try:
        before = snapshot(replica)
        yield replica, client, bridge
        assert snapshot(replica) == before, "an abusive request changed the replica"
    finally:  # a failed check must not leave the bridge's threads running (pytest would hang)
        client.close()
        bridge.close()
        app.state.service.close()
        replica.close()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def check_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["code"] == code and body["detail"]


def test_missing_or_unknown_token_is_401(site):
    _, client, _ = site
    check_error(client.get("/v1/state"), 401, "unauthenticated")
    assert client.get("/v1/state").headers["www-authenticate"] == "Bearer"
    check_error(client.get("/v1/state", headers=auth("not-a-token-at-all")), 401,
                "unauthenticated")
    check_error(client.get("/v1/state", headers={"Authorization": ADMIN}), 401,
                "unauthenticated")
    data = b"x" * 100
    check_error(client.put(f"/v1/pieces/{digest(data)}", content=data), 401, "unauthenticated")
    assert client.get("/healthz").status_code == 200  # liveness needs no token


def test_read_only_token_cannot_write(site):
    replica, client, _ = site
    assert client.get("/v1/state", headers=auth(READER)).status_code == 200
    data = b"y" * 100
    check_error(client.put(f"/v1/pieces/{digest(data)}", content=data, headers=auth(READER)),
                403, "forbidden")
    op = next(iter(replica.ops().values())).data
    check_error(client.post("/v1/ops", content=codec.encode({"ops": [op]}),
                            headers={**auth(READER), **MSGPACK}), 403, "forbidden")
    check_error(client.post("/v1/sync", headers=auth(WRITER)), 403, "forbidden")
    # the client maps the code back to the same class
    peer = HttpPeer("http://testserver", READER, transport=site[2])
    with pytest.raises(wire.Forbidden):
        peer.put_object(digest(data), data)
    with pytest.raises(wire.Unauthenticated):
        HttpPeer("http://testserver", transport=site[2]).state()


def test_oversized_body_is_413_without_buffering(site):
    _, client, _ = site
    sent = []

    def body() -> Iterator[bytes]:
        for _ in range(1024):  # 16 MiB offered, 16 KiB at a time, no Content-Length
            sent.append(1)
            yield b"z" * 16384

    object_id = digest(b"whatever")
    response = client.put(f"/v1/pieces/{object_id}", content=body(), headers=auth(WRITER))
    check_error(response, 413, "body_too_large")
    assert len(sent) <= LIMIT // 16384 + 2, f"the server read {len(sent)} chunks"
    # a declared length over the cap is refused before any of the body is read
    sent.clear()
    response = client.put(f"/v1/pieces/{object_id}", content=body(),
                          headers={**auth(WRITER), "Content-Length": str(1 << 30)})
    check_error(response, 413, "body_too_large")
    assert len(sent) <= 1
    # msgpack bodies too
    big = codec.encode({"ops": [b"o" * 1000] * 100})
    check_error(client.post("/v1/ops", content=big, headers={**auth(WRITER), **MSGPACK}),
                413, "body_too_large")


def test_malformed_bodies_are_400_or_422(site):
    _, client, _ = site
    h = {**auth(WRITER), **MSGPACK}
    check_error(client.post("/v1/ops", content=b"\xc1\xc1not msgpack", headers=h), 400,
                "non_canonical")
    unsorted = b"\x82\xa3ops\x90\xa1a\x01"  # {"ops": [], "a": 1}: keys out of order
    check_error(client.post("/v1/ops", content=unsorted, headers=h), 400, "non_canonical")
    check_error(client.post("/v1/ops", content=codec.encode({"ops": "no"}), headers=h), 422,
                "schema_error")
    check_error(client.post("/v1/ops", content=codec.encode({"ops": [b"\x80"]}), headers=h),
                422, "schema_error")
    check_error(client.post("/v1/pieces/missing", content=codec.encode([1, 2]), headers=h),
                422, "schema_error")
    check_error(client.post("/v1/ops/reconcile", content=codec.encode({"v": 1, "ranges": [
        [b"", None, 1, [b"short"]]]}), headers=h), 422, "schema_error")


def test_piece_that_does_not_match_its_id_is_rejected(site):
    _, client, bridge = site
    data = b"honest bytes" * 300
    claimed = digest(b"other bytes")
    check_error(client.put(f"/v1/pieces/{claimed}", content=data, headers=auth(WRITER)), 422,
                "hash_mismatch")
    peer = HttpPeer("http://testserver", WRITER, transport=bridge)
    with pytest.raises(HashMismatch) as err:
        peer.put_object(claimed, data)
    assert err.value.expected == claimed and err.value.actual == digest(data)


@pytest.mark.parametrize("bad", ["abc", "A" * 64, "g" * 64, "0" * 63, "0" * 65, "%2E%2E", "a b"])
def test_ids_that_are_not_64_hex_are_rejected(site, bad):
    _, client, bridge = site
    check_error(client.get(f"/v1/pieces/{bad}", headers=auth(READER)), 400, "bad_id")
    check_error(client.put(f"/v1/pieces/{bad}", content=b"q", headers=auth(WRITER)), 400,
                "bad_id")
    h = {**auth(READER), **MSGPACK}
    check_error(client.post("/v1/pieces/missing", content=codec.encode({"ids": [bad]}),
                            headers=h), 400, "bad_id")
    check_error(client.post("/v1/ops/fetch", content=codec.encode({"ids": [bad]}), headers=h),
                400, "bad_id")
    with pytest.raises(BadId):
        HttpPeer("http://testserver", READER, transport=bridge).missing([bad])


def test_op_with_bad_signature_or_other_project_is_refused(site, tmp_path):
    replica, client, _ = site
    h = {**auth(WRITER), **MSGPACK}
    genuine = next(op for op in replica.ops().values() if op.kind == "contribute")
    forged = codec.encode(dict(genuine.body, label="forged", sig=bytes(64)))
    response = client.post("/v1/ops", content=codec.encode({"ops": [forged]}), headers=h)
    assert response.status_code == 200
    report = codec.decode(response.content)
    assert report["committed"] == []
    assert report["rejected"][digest(forged)]["code"] == "bad_signature"
    stranger = new_project(tmp_path / "stranger", site="zeta")
    contribute(stranger, 2)
    foreign = [op.data for op in stranger.ops().values()]
    check_error(client.post("/v1/ops", content=codec.encode({"ops": foreign}), headers=h), 409,
                "wrong_project")
    stranger.close()


def test_unknown_objects_and_ops_map_back_to_their_classes(site):
    _, client, bridge = site
    check_error(client.get(f"/v1/pieces/{digest(b'none')}", headers=auth(READER)), 404,
                "piece_missing")
    check_error(client.get("/v1/no-such-route", headers=auth(READER)), 404, "not_found")
    sneaky = client.get("/v1/pieces/..%2F..%2Freplica.sqlite", headers=auth(READER))
    assert sneaky.status_code in (400, 404) and b"SQLite" not in sneaky.content
    peer = HttpPeer("http://testserver", READER, transport=bridge)
    with pytest.raises(PieceMissing) as err:
        peer.get_object(digest(b"none"))
    assert err.value.piece_id == digest(b"none")


def test_no_tokens_serves_loopback_clients_only(tmp_path):
    replica = new_project(tmp_path / "open")
    app = create_app(replica.path, Settings())
    for client_host, status in ((("10.1.2.3", 5000), 403), (("127.0.0.1", 5000), 200)):
        bridge = ASGIBridge(app, client=client_host)
        with httpx.Client(base_url="http://t", transport=bridge) as client:
            assert client.get("/v1/state").status_code == status
        bridge.close()
    app.state.service.close()
    replica.close()


def test_refuses_a_public_address_without_tokens(tmp_path):
    assert check_exposure(Settings(host="127.0.0.1")) is not None  # the start-up warning
    assert check_exposure(Settings(host="0.0.0.0", tokens=parse_tokens(TOKENS))) is None
    replica = new_project(tmp_path / "r")
    replica.close()
    proc = subprocess.run([PYTHON, "-m", "crdt_merge", "serve", str(tmp_path / "r"),
                           "--host", "0.0.0.0", "--port", "0"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2
    assert "refusing to listen on 0.0.0.0 without tokens" in proc.stderr


def test_real_server_refuses_a_huge_declared_body_unread(tmp_path):
    replica = new_project(tmp_path / "r")
    (tmp_path / "tokens").write_text(TOKENS)
    server = ServerProcess(replica.path, "--token-file", str(tmp_path / "tokens")).wait_ready()
    try:
        object_id = digest(b"huge")
        head = (f"PUT /v1/pieces/{object_id} HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {WRITER}\r\nContent-Length: {1 << 40}\r\n\r\n")
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(head.encode() + b"z" * 1000)
            answer = ""
            while "}" not in answer:  # the head, then the JSON body
                chunk = sock.recv(4096).decode()
                if not chunk:
                    break
                answer += chunk
        assert answer.startswith("HTTP/1.1 413"), answer
        assert '"body_too_large"' in answer
        assert time.monotonic() - start < 5
        assert replica.store.object_ids() == []
        assert not list((replica.path / "tmp").iterdir())
    finally:
        server.stop()
        replica.close()


def test_join_needs_a_token_when_tokens_are_configured(site, tmp_path):
    replica, _, bridge = site
    peer = HttpPeer("http://testserver", transport=bridge)
    with pytest.raises(wire.Unauthenticated):
        peer.get_ops([replica.genesis_id])
    reader = HttpPeer("http://testserver", READER, transport=bridge)
    genesis = reader.get_ops([reader.state().genesis])[0]
    joined = join(tmp_path / "joined", genesis, "ci")
    assert joined.genesis_id == replica.genesis_id
    joined.close()
