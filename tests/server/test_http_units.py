"""Small parts of the server and the HTTP client: settings read once from arguments or
``CRDT_MERGE_*`` variables, token files, Range headers, JSON/msgpack negotiation, the
OpenAPI schema, error bodies, and the CLI over HTTP (``init --join URL``, ``sync DIR URL``)."""

from __future__ import annotations

import json

import httpx
import pytest
from http_helpers import ASGIBridge, ServerProcess, contribute, new_project

from crdt_merge import codec
from crdt_merge.cli.main import main as cli_main
from crdt_merge.errors import BadParameter, HashMismatch, IncompleteOp, PieceMissing
from crdt_merge.sync import wire
from crdt_merge_server.app import create_app
from crdt_merge_server.errors import STATUS, status_of
from crdt_merge_server.pieces import parse_range
from crdt_merge_server.service import numeric_version
from crdt_merge_server.settings import Settings, parse_tokens


def test_settings_from_environment_and_arguments(tmp_path):
    (tmp_path / "tokens").write_text("alpha admin " + "a" * 32 + "\nci read " + "b" * 32 + "\n")
    (tmp_path / "peer.token").write_text("c" * 32 + "\n")
    env = {"CRDT_MERGE_HOST": "0.0.0.0", "CRDT_MERGE_PORT": "9001",
           "CRDT_MERGE_TOKEN_FILE": str(tmp_path / "tokens"),
           "CRDT_MERGE_PEERS": "http://a:1, http://b:2/",
           "CRDT_MERGE_PEER_TOKEN_FILE": str(tmp_path / "peer.token"),
           "CRDT_MERGE_SYNC_INTERVAL": "2.5", "CRDT_MERGE_MAX_OBJECT_BYTES": "1000"}
    s = Settings.from_env(env)
    assert (s.host, s.port, s.peers, s.peer_token) == ("0.0.0.0", 9001, ("http://a:1", "http://b:2"),
                                                      "c" * 32)
    assert (s.sync_interval, s.max_object_bytes) == (2.5, 1000)
    assert {t.site: sorted(t.scopes) for t in s.tokens} == {
        "alpha": ["admin", "contribute", "read"], "ci": ["read"]}
    # arguments win over the environment; None means "not given"
    s = Settings.from_env(env, host="127.0.0.1", port=None, peers=("http://c:3",))
    assert (s.host, s.port, s.peers) == ("127.0.0.1", 9001, ("http://c:3",))
    assert Settings.from_env({}) == Settings()
    with pytest.raises(BadParameter):
        Settings.from_env({"CRDT_MERGE_PORT": "eighty"})
    with pytest.raises(BadParameter):
        Settings.from_env({"CRDT_MERGE_PEERS": "ftp://x"})
    with pytest.raises(BadParameter):
        Settings.from_env({"CRDT_MERGE_TOKEN_FILE": str(tmp_path / "absent")})


@pytest.mark.parametrize("text", ["alpha admin", "alpha root " + "a" * 32, "alpha read short",
                                  "Alpha read " + "a" * 32,
                                  "a read " + "x" * 32 + "\nb read " + "x" * 32])
def test_bad_token_files_are_refused(text):
    with pytest.raises(BadParameter):
        parse_tokens(text)


def test_range_headers():
    assert parse_range("bytes=0-99", 1000) == (0, 99)
    assert parse_range("bytes=900-", 1000) == (900, 999)
    assert parse_range("bytes=-100", 1000) == (900, 999)
    assert parse_range("bytes=990-5000", 1000) == (990, 999)
    assert parse_range("bytes=1000-", 1000) is False
    assert parse_range("bytes=5-1", 1000) is None
    assert parse_range("bytes=0-1,5-6", 1000) is None
    assert parse_range("items=0-1", 1000) is None


def test_one_status_table_and_error_bodies_round_trip():
    assert status_of(PieceMissing("x")) == 404
    assert status_of(HashMismatch("a", "b")) == 422
    assert status_of(wire.BodyTooLarge(10)) == 413
    assert all(100 <= s < 600 for s in STATUS.values())
    for exc in (PieceMissing("0" * 64), HashMismatch("a" * 64, "b" * 64),
                IncompleteOp("c" * 64, ["d" * 64]), wire.BodyTooLarge(5)):
        body = json.dumps(wire.error_body(exc)).encode()
        back = wire.error_from_body(status_of(exc), body)
        assert type(back) is type(exc) and back.detail == exc.detail
        assert {k: v for k, v in vars(back).items()} == {k: v for k, v in vars(exc).items()}
    assert type(wire.error_from_body(502, b"<html>bad gateway</html>")).__name__ == "PeerError"


def test_numeric_version_read_without_torch_matches_the_module():
    from crdt_merge.numeric import NUMERIC_VERSION

    assert numeric_version() == NUMERIC_VERSION


def test_gets_answer_json_or_msgpack_and_the_schema_lists_the_routes(tmp_path):
    replica = new_project(tmp_path / "r")
    contribute(replica, 1)
    app = create_app(replica.path, Settings())
    bridge = ASGIBridge(app)
    with httpx.Client(base_url="http://t", transport=bridge) as client:
        as_json = client.get("/v1/state", headers={"Accept": "application/json"})
        as_msgpack = client.get("/v1/state")
        assert as_json.json() == wire.to_json(codec.decode(as_msgpack.content))
        assert as_msgpack.headers["content-type"] == wire.MSGPACK
        assert as_json.json()["state_root"] == replica.state_root()
        assert as_json.headers["etag"] == f'"{replica.state_root()}"'
        object_id = replica.store.object_ids()[0]
        meta = client.get(f"/v1/pieces/{object_id}", headers={"Accept": "application/json"})
        assert meta.json() == {"id": object_id, "size": len(replica.store.get(object_id))}
        piece = client.get(f"/v1/pieces/{object_id}")
        assert piece.headers["etag"] == f'"{object_id}"'
        assert "immutable" in piece.headers["cache-control"]
        assert client.get(f"/v1/pieces/{object_id}",
                          headers={"If-None-Match": f'"{object_id}"'}).status_code == 304
        assert client.get("/v1/ops", headers={"Accept": "application/json"}).json() == {
            "ids": replica.op_ids()}
        assert client.get("/v1/checkpoint", headers={"Accept": "application/json"}).json()[
            "checkpoint_id"] is None  # no recipe yet
        schema = client.get("/openapi.json").json()
        for route in ("/v1/state", "/v1/ops", "/v1/ops/reconcile", "/v1/ops/fetch",
                      "/v1/pieces/missing", "/v1/pieces/{object_id}", "/v1/checkpoint",
                      "/v1/sync", "/healthz"):
            assert route in schema["paths"], route
    bridge.close()
    app.state.service.close()
    replica.close()


def test_cli_joins_and_syncs_over_http(tmp_path, capsys):
    """``crdt-merge init --join URL`` and ``crdt-merge sync DIR URL`` (the CLI's own code, run
    in this process) against a real server."""
    origin = new_project(tmp_path / "origin")
    contribute(origin, 1)
    server = ServerProcess(origin.path).wait_ready()  # no tokens: loopback only
    try:
        delta = str(tmp_path / "delta")
        assert cli_main(["--json", "init", delta, "--site", "delta", "--join", server.url]) == 0
        joined = json.loads(capsys.readouterr().out)
        assert joined["state_root"] == origin.state_root()
        origin.admit("delta", bytes.fromhex(joined["public_key"]))
        assert cli_main(["--json", "sync", delta, server.url]) == 0
        synced = json.loads(capsys.readouterr().out)
        assert synced["state_root"] == origin.state_root()
        assert synced["ops_received"] == 1
    finally:
        server.stop()
        origin.close()
