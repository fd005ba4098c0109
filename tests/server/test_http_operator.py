"""What an operator sees (issue 19): the status page, /metrics, the access log, push on write.

Real servers throughout: uvicorn processes, or uvicorn in a thread of this process where a
test must reach into the app (hold its round lock, read what its puller counted)."""

from __future__ import annotations

import base64
import json
import logging
import os
import re

import httpx
from fastapi.testclient import TestClient
from http_helpers import ServerProcess, contribute, join, new_project, put_model, wait_for
from operator_helpers import ThreadServer, parse, scrape, total, value

from crdt_merge import codec, maintenance
from crdt_merge.replica import Replica
from crdt_merge.sync import sync
from crdt_merge.sync.http import HttpPeer
from crdt_merge_server.app import create_app
from crdt_merge_server.logs import FIELDS, JsonFormatter, TextFormatter
from crdt_merge_server.push import MAX_HINTS
from crdt_merge_server.settings import Settings, parse_tokens

TOKENS = {"alpha": "alpha-admin-token-0123456789", "beta": "beta-contrib-token-0123456789",
          "ci": "ci-read-only-token-0123456789"}
TOKEN_FILE = (f"alpha admin {TOKENS['alpha']}\nbeta contribute {TOKENS['beta']}\n"
              f"ci read {TOKENS['ci']}\n")
XSS = '<script>alert("x")</script><img src=x onerror="alert(1)">'
HEX64 = re.compile(r"[0-9a-f]{64}")
LOCAL = ("127.0.0.1", 50000)


def bearer(site: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[site]}"}


def basic(secret: str, user: str = "someone") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()}


def xss_project(tmp_path) -> Replica:
    """A project whose name, labels and parameters are markup (other members write them)."""
    r = Replica.create(tmp_path / "x", "alpha", name=f"proj{XSS}", profile="test",
                       rng=__import__("http_helpers").rng("xss"))
    r.contribute(put_model(r, 1), params={"weight": "1", "note": XSS}, label=XSS, family="test")
    r.contribute(put_model(r, 2), params={"weight": "1"}, label="plain-label", family="test")
    r.set_recipe("linear", {})
    return r


# -- the status page ------------------------------------------------------------------------------


def test_status_page_escapes_what_members_wrote(tmp_path):
    r = xss_project(tmp_path)
    with TestClient(create_app(r.path, Settings()), client=LOCAL) as client:
        page = client.get("/?resolve=1")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src" not in csp  # no script at all
        text = page.text
        assert "<script" not in text and "<img" not in text and "onerror=\"" not in text
        escaped = ("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&lt;img src=x "
                   "onerror=&quot;alert(1)&quot;&gt;")
        assert text.count(escaped) >= 3  # project name (title, header), label, parameter
        assert "plain-label" in text
        # what the page must show
        assert r.genesis_id in text and r.state_root() in text
        checkpoint = client.get("/v1/checkpoint", headers={"Accept": "application/json"}).json()
        assert f'id="checkpoint-id">{checkpoint["checkpoint_id"]}<' in text
        # "note" is no parameter of linear: ignored, and the fate says so (as status does)
        assert text.count(">counted<") == 1
        assert ">counted; note is not used by linear; ignored, as mergekit ignores it<" in text
        assert "linear" in text and "alpha" in text and "admin" in text
        assert checkpoint["numeric_profile"]["torch"] in text
        # the page links the checkpoint's files, and they download
        links = re.findall(r'href="(/v1/checkpoint/files/[^"]+)"', text)
        assert "/v1/checkpoint/files/model.safetensors" in links
        folder = r.path / "checkpoints" / checkpoint["plan_id"]
        got = client.get("/v1/checkpoint/files/model.safetensors")
        assert got.content == (folder / "model.safetensors").read_bytes()
        for bad in ("nope.bin", "site.key", "replica.sqlite"):  # not in the checkpoint
            assert client.get(f"/v1/checkpoint/files/{bad}").status_code == 404, bad
        for bad in ("%2E%2E", "%2E", "a%00b", ".hidden"):  # not a file name
            assert client.get(f"/v1/checkpoint/files/{bad}").status_code == 422, bad
        # a slash, even encoded, leaves the route
        assert client.get("/v1/checkpoint/files/..%2Freplica.sqlite").status_code == 404
    r.close()


def test_status_page_shows_fates_members_and_no_plan(tmp_path):
    a = new_project(tmp_path / "a")
    b = join(tmp_path / "b", a.genesis_bytes(), "beta")
    a.admit("beta", b.public_key)
    with TestClient(create_app(a.path, Settings()), client=LOCAL) as client:
        text = client.get("/").text
        assert "no recipe yet" in text and "not resolved for this state yet" in text
        assert re.search(r"<td>beta</td><td>member</td><td><span class=\"state-live\">", text)
        first = contribute(a, 1)
        a.set_recipe("linear", {})
        second = contribute(a, 2)
        a.retract([first])
        text = client.get("/").text
        rows = re.findall(r"<tr><td>alpha</td><td><span class=\"label\">(model-\d)</span>"
                          r"</td><td>full</td><td>([^<]+)</td><td>[^<]*</td><td>([^<]+)</td>",
                          text)
        assert sorted((label, fate) for label, _, fate in rows) == [
            ("model-1", "retracted"), ("model-2", "counted")], rows
        assert all(size.endswith("KiB") for _, size, _ in rows)
        assert second[:16] in text
    a.close()
    b.close()


def test_page_and_metrics_take_the_same_tokens(tmp_path):
    r = new_project(tmp_path / "r")
    (tmp_path / "tokens").write_text(TOKEN_FILE)
    settings = Settings(tokens=parse_tokens(TOKEN_FILE))
    with TestClient(create_app(r.path, settings), client=("192.0.2.7", 4000)) as client:
        none = client.get("/")
        assert none.status_code == 401
        assert "Basic" in none.headers["www-authenticate"]
        assert "Bearer" in none.headers["www-authenticate"]
        assert client.get("/", headers={"Authorization": "Bearer wrong-token-000000000"}
                          ).status_code == 401
        assert client.get("/", headers=basic("wrong-token-0000000000")).status_code == 401
        assert client.get("/", headers={"Authorization": "Basic !!!"}).status_code == 401
        for site in TOKENS:  # read scope: every token
            assert client.get("/", headers=bearer(site)).status_code == 200
            assert client.get("/", headers=basic(TOKENS[site])).status_code == 200
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers=bearer("ci")).status_code == 200
        assert client.get("/metrics", headers=basic(TOKENS["ci"])).status_code == 200
    for scope, allowed, refused in (("admin", "alpha", "beta"), ("contribute", "beta", "ci")):
        app = create_app(r.path, settings.with_(metrics_scope=scope))
        with TestClient(app, client=("192.0.2.7", 4000)) as client:
            assert client.get("/metrics", headers=bearer(allowed)).status_code == 200
            assert client.get("/metrics", headers=bearer(refused)).status_code == 403
    app = create_app(r.path, settings.with_(metrics_scope="none"))
    with TestClient(app, client=("192.0.2.7", 4000)) as client:
        assert client.get("/metrics").status_code == 200
        assert client.get("/").status_code == 401  # the page keeps the read scope
    # no tokens: loopback clients only, as for every route
    with TestClient(create_app(r.path, Settings()), client=("192.0.2.7", 4000)) as client:
        assert client.get("/").status_code == 403
        assert client.get("/metrics").status_code == 403
    r.close()


# -- /metrics -------------------------------------------------------------------------------------


def route_templates(app) -> set[str]:
    """Every path the app routes (as its schema names them), and "unmatched"."""
    return (set(app.openapi()["paths"]) | {getattr(r, "path", "") for r in app.routes}
            | {"unmatched"})


def test_metrics_parse_and_move_as_a_sync_runs(tmp_path):
    """A server pulls from a peer (an anti-entropy round on request), a client pushes to it
    and fetches pieces; the counters, histograms and gauges move by what moved (read with
    prometheus_client's parser); label values stay bounded (no ids, no raw paths)."""
    origin = new_project(tmp_path / "origin")
    for seed in (1, 2):
        contribute(origin, seed)
    peer = ServerProcess(origin.path).wait_ready()
    here = join(tmp_path / "here", origin.genesis_bytes(), "beta")
    origin.admit("beta", here.public_key)
    held = {i: len(origin.store.get(i)) for i in origin.store.object_ids()}
    server = ThreadServer(here.path, Settings(peers=(peer.url,), sync_interval=3600))
    try:
        before = scrape(server.url)
        assert value(before, "crdt_merge_sync_rounds_total", trigger="request") == 0
        assert value(before, "crdt_merge_objects") == 0
        assert value(before, "crdt_merge_ops", kind="genesis") == 1
        assert value(before, "crdt_merge_ops", kind="contribute") == 0

        answer = httpx.post(server.url + "/v1/sync", headers={"Accept": "application/json"},
                            timeout=60).json()
        assert answer["peers"][peer.url]["ok"] is True
        after = scrape(server.url)
        assert value(after, "crdt_merge_sync_rounds_total", trigger="request") == 1
        assert value(after, "crdt_merge_sync_round_duration_seconds_count") == 1
        assert value(after, "crdt_merge_sync_round_duration_seconds_sum") > 0
        assert value(after, "crdt_merge_antientropy_pulls_total", peer=peer.url,
                     result="ok") == 1
        assert value(after, "crdt_merge_pieces_received_total", via="pull") == len(held)
        assert value(after, "crdt_merge_piece_bytes_received_total",
                     via="pull") == sum(held.values())
        assert value(after, "crdt_merge_ops_received_total", via="pull") == 3  # 2 + the admit
        assert value(after, "crdt_merge_ops", kind="contribute") == 2
        assert value(after, "crdt_merge_ops", kind="admit") == 1
        assert value(after, "crdt_merge_objects") == len(held)
        assert value(after, "crdt_merge_object_bytes") == sum(held.values())
        assert value(after, "crdt_merge_staged_ops") == 0
        assert value(after, "crdt_merge_quarantined_objects") == 0
        assert value(after, "crdt_merge_http_requests_total", method="POST", route="/v1/sync",
                     status="200") == 1
        assert value(after, "crdt_merge_http_request_duration_seconds_count", method="POST",
                     route="/v1/sync") == 1

        # a client pushes a new contribution: ops and pieces received "via push"
        new_op = contribute(origin, 3)
        manifest = origin.get_op(new_op).body["manifest"]
        fresh = here.store.missing(origin.closure([manifest]))
        with HttpPeer(server.url) as client:
            stats = sync(origin, client)
        assert stats.objects_sent == len(fresh) > 0
        pushed = scrape(server.url)
        assert value(pushed, "crdt_merge_pieces_received_total", via="push") == len(fresh)
        assert value(pushed, "crdt_merge_piece_bytes_received_total", via="push") == sum(
            len(origin.store.get(i)) for i in fresh)
        assert value(pushed, "crdt_merge_ops_received_total", via="push") == 1
        assert value(pushed, "crdt_merge_http_requests_total", method="PUT",
                     route="/v1/pieces/{object_id}", status="201") == len(fresh)
        assert value(pushed, "crdt_merge_http_requests_total", method="POST",
                     route="/v1/ops/reconcile", status="200") >= 1

        # pieces served: two whole, one range
        some = sorted(held)[:2]
        for object_id in some:
            assert httpx.get(f"{server.url}/v1/pieces/{object_id}").status_code == 200
        assert httpx.get(f"{server.url}/v1/pieces/{some[0]}",
                         headers={"Range": "bytes=0-99"}).status_code == 206
        served = scrape(server.url)
        assert value(served, "crdt_merge_pieces_served_total") == 3
        assert value(served, "crdt_merge_piece_bytes_served_total") == (
            held[some[0]] + held[some[1]] + 100)

        # the peer goes away: a failed pull, counted by peer and error code
        peer.stop()
        httpx.post(server.url + "/v1/sync", timeout=60)
        failed = scrape(server.url)
        assert value(failed, "crdt_merge_antientropy_pulls_total", peer=peer.url,
                     result="failed") == 1
        codes = [dict(ls)["code"] for (n, ls), v in failed.items()
                 if n == "crdt_merge_antientropy_failures_total" and v == 1]
        assert codes == ["peer_unreachable"], codes
        assert value(failed, "crdt_merge_antientropy_last_round_ok", peer=peer.url) == 0

        # requests for ids and paths nobody routes: templates, never the raw path
        assert httpx.get(f"{server.url}/v1/pieces/{'ab' * 32}").status_code == 404
        assert httpx.get(f"{server.url}/no/such/{'cd' * 32}?token=x").status_code == 404
        assert httpx.request("BREW", f"{server.url}/v1/state").status_code == 405
        response = httpx.get(server.url + "/metrics")
        samples = parse(response.text)
        routes = {dict(ls).get("route") for (_, ls) in samples} - {None}
        assert routes <= route_templates(server.app), routes - route_templates(server.app)
        assert "unmatched" in routes and "/v1/pieces/{object_id}" in routes
        methods = {dict(ls).get("method") for (_, ls) in samples} - {None}
        assert methods <= {"GET", "POST", "PUT", "other"}, methods
        labels = {v for (_, ls) in samples for _, v in ls}
        assert not any(HEX64.search(v) for v in labels)
    finally:
        server.stop()
        peer.stop()
        origin.close()
        here.close()


# -- the access log -------------------------------------------------------------------------------


def test_access_log_names_sites_never_tokens_and_json_lines_parse(tmp_path):
    r = new_project(tmp_path / "r")
    object_id = r.store.object_ids()[0] if r.store.object_ids() else None
    contribute(r, 1)
    object_id = r.store.object_ids()[0]
    (tmp_path / "tokens").write_text(TOKEN_FILE)
    server = ServerProcess(r.path, "--token-file", str(tmp_path / "tokens"),
                           "--log-format", "json").wait_ready()
    try:
        url = server.url
        assert httpx.get(url + "/", headers=bearer("alpha")).status_code == 200
        assert httpx.get(url + "/", headers=basic(TOKENS["ci"])).status_code == 200
        assert httpx.get(url + "/v1/state", headers=bearer("beta")).status_code == 200
        assert httpx.get(url + "/metrics", headers=bearer("ci")).status_code == 200
        assert httpx.get(f"{url}/v1/pieces/{object_id}", headers=bearer("ci")
                         ).status_code == 200
        # tokens where they do not belong, or not accepted: refused, and not logged either
        assert httpx.get(url + "/v1/state", headers={
            "Authorization": "Bearer not-a-token-but-secret-looking"}).status_code == 401
        assert httpx.get(f"{url}/v1/state?token={TOKENS['alpha']}").status_code == 401
        assert httpx.get(f"{url}/{TOKENS['beta']}").status_code == 404
        assert httpx.post(f"{url}/v1/sync", headers=bearer("beta")).status_code == 403
    finally:
        server.stop()
    log = server.log.read_text()
    for secret in (*TOKENS.values(), "not-a-token-but-secret-looking"):
        assert secret not in log
    lines = [json.loads(line) for line in log.splitlines() if line.strip()]  # every line
    requests = [e for e in lines if e.get("event") == "request"]
    assert len(requests) >= 9 + 1  # ours, and the /healthz of wait_ready
    for e in requests:
        assert set(FIELDS) <= set(e), e
        assert e["logger"] == "crdt_merge.server.access" and e["level"] == "info"
        assert "?" not in e["route"] and e["ms"] >= 0
    seen = {(e["method"], e["route"], e["status"], e["site"]) for e in requests}
    assert {("GET", "/", 200, "alpha"), ("GET", "/", 200, "ci"),
            ("GET", "/v1/state", 200, "beta"), ("GET", "/metrics", 200, "ci"),
            ("GET", "/v1/pieces/{object_id}", 200, "ci"), ("GET", "/v1/state", 401, "-"),
            ("GET", "unmatched", 404, "-"), ("POST", "/v1/sync", 403, "-")} <= seen, seen
    piece = next(e for e in requests if e["route"] == "/v1/pieces/{object_id}")
    assert piece["bytes_out"] == len(r.store.get(object_id)) and piece["client"] == "127.0.0.1"
    r.close()


def test_text_and_json_lines(caplog):
    """The two formats of one access record and of an ordinary line."""
    fields = {"client": "127.0.0.1", "site": "alpha", "method": "GET",
              "route": "/v1/pieces/{object_id}", "status": 200, "bytes_in": 0,
              "bytes_out": 4096, "ms": 1.5}
    record = logging.LogRecord("crdt_merge.server.access", logging.INFO, __file__, 1,
                               "GET %s", ("x",), None)
    record.access = fields
    text = TextFormatter().format(record)
    pairs = dict(part.split("=", 1) for part in text.split(" ")[3:])
    assert pairs == {k: str(v) for k, v in fields.items()}
    assert json.loads(JsonFormatter().format(record)) == {
        **fields, "ts": json.loads(JsonFormatter().format(record))["ts"], "level": "info",
        "logger": "crdt_merge.server.access", "event": "request"}
    plain = logging.LogRecord("crdt_merge.server", logging.WARNING, __file__, 1,
                              'quote " and\nnewline %s', ("arg",), None)
    parsed = json.loads(JsonFormatter().format(plain))
    assert parsed["message"] == 'quote " and\nnewline arg' and parsed["level"] == "warning"


# -- push on write --------------------------------------------------------------------------------


def free_port() -> int:
    from crdt_merge_server.main import bind

    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    return port


def test_a_burst_of_writes_makes_one_round_per_peer(tmp_path):
    """Ten commits at A in a burst; A notifies B (push on write); B pulls once. B's round
    lock is held while the burst's notices arrive, so the count does not depend on timing:
    every notice of the burst must be served by one round."""
    a = new_project(tmp_path / "a")
    b_replica = join(tmp_path / "b", a.genesis_bytes(), "beta")
    port = free_port()
    b = ThreadServer(b_replica.path, Settings(peers=(f"http://127.0.0.1:{port}",),
                                              sync_interval=3600, notice_interval=0))
    server_a = ServerProcess(a.path, "--peer", b.url, "--sync-interval", "3600", port=port,
                             env={"CRDT_MERGE_WATCH_INTERVAL": "0.1"}).wait_ready()
    try:
        lock = b.service.anti_entropy.round_lock
        with lock:
            models = [put_model(a, seed) for seed in range(10)]
            for seed, manifest in enumerate(models):  # the burst: ten commits
                a.contribute(manifest, params={"weight": "1"}, label=f"m{seed}",
                             family="test")
            final = a.state_root()
            assert wait_for(lambda: b.puller.hinted(final), timeout=30)
            assert b.puller.rounds == 0  # all waiting on the one round
        assert wait_for(lambda: b_replica.state_root() == final and b.puller.idle, timeout=60)
        # B's own commit made it notify A, which already holds that root: no round there
        assert wait_for(lambda: b.notifier.announced == final, timeout=30)
        samples_b = scrape(b.url)
        samples_a = scrape(server_a.url)
        assert b.puller.rounds == 1
        assert value(samples_b, "crdt_merge_sync_rounds_total", trigger="notice") == 1
        assert value(samples_b, "crdt_merge_antientropy_pulls_total",
                     peer=f"http://127.0.0.1:{port}", result="ok") == 1
        received = total(samples_b, "crdt_merge_notices_received_total")
        assert value(samples_b, "crdt_merge_notices_received_total", result="pull") == 1
        assert received >= 1 and value(samples_b, "crdt_merge_notices_received_total",
                                       result="coalesced") == received - 1
        assert value(samples_a, "crdt_merge_notices_sent_total", peer=b.url,
                     result="ok") == received
        assert wait_for(lambda: total(scrape(server_a.url),
                                      "crdt_merge_notices_received_total", result="current")
                        == 1, timeout=30)
        assert value(scrape(server_a.url), "crdt_merge_sync_rounds_total",
                     trigger="notice") == 0
        assert {c["label"] for c in maintenance.status(b_replica)["contributions"]} == {
            f"m{i}" for i in range(10)}
    finally:
        server_a.stop()
        b.stop()
        a.close()
        b_replica.close()


def notice(root: str) -> bytes:
    return codec.encode({"state_root": root})


def test_notices_are_bounded_coalesced_and_never_trusted(tmp_path):
    """Notices cost O(1) each and at most one pending round in all; they need the
    contribute scope, carry only a root (no address: the server pulls from its own peers),
    and a malformed one is refused without effect."""
    r = new_project(tmp_path / "r")
    settings = Settings(tokens=parse_tokens(TOKEN_FILE), peers=("http://127.0.0.1:9",),
                        sync_interval=3600, notice_interval=0)
    app = create_app(r.path, settings)
    headers = {**bearer("beta"), "Content-Type": "application/vnd.msgpack",
               "Accept": "application/json"}
    with TestClient(app, client=LOCAL) as client:
        puller = app.state.puller

        def post(body: bytes, **extra: str) -> httpx.Response:
            return client.post("/v1/notify", content=body, headers={**headers, **extra})

        roots = [os.urandom(32).hex() for _ in range(300)]
        assert post(notice(roots[0]), Authorization="").status_code == 401
        assert post(notice(roots[0]), **bearer("ci")).status_code == 403  # read only
        assert post(notice(r.state_root())).json() == {"result": "current"}
        with app.state.service.anti_entropy.round_lock:
            results = [post(notice(root)).json()["result"] for root in roots]
            assert results == ["pull"] + ["coalesced"] * 299
            assert len(puller._hints) <= MAX_HINTS + 1
        assert wait_for(lambda: puller.idle, timeout=60)
        assert puller.rounds == 1  # one pull from the one configured peer
        bad = [
            (b"\xc1", 400),  # not msgpack
            (codec.encode({"state_root": "zz"}), 400),
            (codec.encode({"state_root": roots[0], "url": "http://127.0.0.1:1"}), 422),
            (codec.encode({"root": roots[0]}), 422),
            (codec.encode([roots[0]]), 422),
            (b"\x81" + codec.encode("state_root") + codec.encode("a" * 2000), 413),
        ]
        for body, status in bad:
            assert post(body).status_code == status, (body[:20], status)
        assert wait_for(lambda: puller.idle, timeout=10)
        assert puller.rounds == 1
        samples = parse(client.get("/metrics", headers=bearer("ci")).text)
        assert value(samples, "crdt_merge_notices_received_total", result="coalesced") == 299
        assert value(samples, "crdt_merge_sync_rounds_total", trigger="notice") == 1
        assert value(samples, "crdt_merge_antientropy_pulls_total",
                     peer="http://127.0.0.1:9", result="failed") == 1
    r.close()
