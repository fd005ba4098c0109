"""Finding 5 of issue 13: what a relay, a peer or a token holder sends costs bounded
resources. Staged junk is bounded and evicted; a msgpack body of tiny elements costs a
server memory within a small multiple of its size (peak RSS of a real server process); a
peer that streams an endless body for a piece is cut off at the size the manifest declares
and leaves no part file; objects no op references are deleted by gc after a grace period;
rendered checkpoints are pruned.
"""

from __future__ import annotations

import http.server
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt_merge import codec, maintenance
from crdt_merge.crdt import ops as opmod
from crdt_merge.errors import PeerError
from crdt_merge.hashing import digest
from crdt_merge.replica import Replica
from crdt_merge.store.db import Index
from crdt_merge.store.local import StagingLimits
from crdt_merge.sync import LocalPeer, wire
from crdt_merge.sync.http import HttpPeer
from crdt_merge.sync.protocol import pull, sync
from tests.relay.helpers import forged_retract, forged_retracts
from tests.server.http_helpers import (
    PYTHON,
    REPO,
    ServerProcess,
    contribute,
    join,
    new_project,
    objects_of,
)

READER = "reader-token-0123456789"
WRITER = "writer-token-0123456789"
TOKENS = f"ci read {READER}\nrelay contribute {WRITER}\n"


def headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": wire.MSGPACK,
            "Accept": wire.MSGPACK}


# -- staging ------------------------------------------------------------------------------------


def test_staged_junk_is_bounded_over_http(tmp_path: Path) -> None:
    a = new_project(tmp_path / "a")
    target = contribute(a, 1)
    c = join(tmp_path / "c", a.genesis_bytes(), "gamma")
    (tmp_path / "tokens").write_text(TOKENS)
    junk = [op.data for op in forged_retracts(a, target, tmp_path / "scratch", 300)]
    assert len(set(junk)) == 300
    server = ServerProcess(c.path, "--token-file", str(tmp_path / "tokens"),
                           env={"CRDT_MERGE_MAX_STAGED_OPS": "50",
                                "CRDT_MERGE_MAX_STAGED_BYTES": str(32 << 10)}).wait_ready()
    try:
        for i in range(0, 300, 30):
            r = httpx.post(server.url + "/v1/ops", headers=headers(WRITER),
                           content=codec.encode({"ops": junk[i:i + 30]}))
            assert r.status_code == 200, r.text
        rows = c.store.staged_rows()
        assert 0 < len(rows) <= 50 and sum(len(d) for _, d in rows) <= 32 << 10
        # the honest flow is unharmed: A's contribution reaches C
        with HttpPeer(server.url, WRITER) as peer:
            sync(a, peer)
        assert c.state_root() == a.state_root()
    finally:
        server.stop()
        a.close()
        c.close()


HONEST = "alpha-token-0123456789"


def test_a_flood_of_staged_junk_does_not_evict_an_honest_staged_op(tmp_path: Path) -> None:
    """alpha pushes a contribution op to C before its objects (it stays staged, waiting);
    then a keyless relay, with its own contribute token, pushes 300 forged ops that can
    never be verified, six times what C may stage. Eviction takes the newest ops of the
    source holding the most (the relay), so alpha's op survives, and joins when its
    objects arrive: no second sync of the op is needed. Oldest-first eviction dropped it."""
    a = new_project(tmp_path / "a")
    c = join(tmp_path / "c", a.genesis_bytes(), "gamma")
    target = contribute(a, 1)
    sync(c, LocalPeer(a))
    c.close()
    honest = a.get_op(contribute(a, 2))  # c lacks only this op and its objects
    junk = [op.data for op in forged_retracts(a, target, tmp_path / "scratch", 300)]
    (tmp_path / "tokens").write_text(TOKENS + f"alpha contribute {HONEST}\n")
    server = ServerProcess(c.path, "--token-file", str(tmp_path / "tokens"),
                           env={"CRDT_MERGE_MAX_STAGED_OPS": "50",
                                "CRDT_MERGE_MAX_STAGED_BYTES": str(64 << 10)}).wait_ready()
    try:
        r = httpx.post(server.url + "/v1/ops", headers=headers(HONEST),
                       content=codec.encode({"ops": [honest.data]}))
        assert r.status_code == 200 and codec.decode(r.content)["waiting"] == [honest.id]
        for i in range(0, 300, 30):
            r = httpx.post(server.url + "/v1/ops", headers=headers(WRITER),
                           content=codec.encode({"ops": junk[i:i + 30]}))
            assert r.status_code == 200, r.text
        with Replica.open(c.path) as view:
            staged = {i for i, _ in view.store.staged_rows()}
            assert 0 < len(staged) <= 50
            assert honest.id in staged  # the relay evicted its own ops, never alpha's
            assert view.store.index.staged_sources()[honest.id] == "push:alpha"
        with HttpPeer(server.url, HONEST) as peer:
            sync(a, peer)  # the objects: C lacks only them; the op is there
        assert httpx.get(server.url + "/v1/state", headers=headers(READER)).status_code == 200
        with Replica.open(c.path) as view:
            assert honest.id in view.ops()
            assert view.state_root() == a.state_root()
    finally:
        server.stop()
        a.close()


def test_eviction_takes_the_newest_of_the_greatest_source(tmp_path: Path) -> None:
    """The rule itself, on one replica: rows staged from three sources over the count
    bound; the source with the most loses its newest rows until the bound holds, and a
    source at or under every other's count keeps all of its rows."""
    a = new_project(tmp_path / "a")
    target = contribute(a, 1)
    ops = forged_retracts(a, target, tmp_path / "scratch", 14)
    limits = StagingLimits(max_ops=8)
    t = time.time()
    plan = [("relay", 10), ("bob", 3), ("carol", 1)]
    n = 0
    for source, count in plan:
        for _ in range(count):
            a.store.stage_op(ops[n].id, ops[n].data, StagingLimits(), now=t + n, source=source)
            n += 1
    evicted = a.store.evict_staged(limits, now=t + n)
    # 14 rows, 8 allowed: the relay goes from 10 to 4 (its 6 newest), then bob (3) and the
    # relay (4) ... the relay stays the greatest until the count holds
    assert evicted == [op.id for op in reversed(ops[4:10])]
    left = a.store.index.staged_sources()
    assert sorted(left.values()) == ["bob"] * 3 + ["carol"] + ["relay"] * 4
    a.close()


def test_staged_ops_past_their_age_are_evicted(tmp_path: Path) -> None:
    a = new_project(tmp_path / "a")
    target = contribute(a, 1)
    junk = forged_retract(a, target, tmp_path / "scratch")
    a.store.stage_op(junk.id, junk.data, StagingLimits(), now=time.time() - 3600)
    assert [op.id for op in a.staged()] == [junk.id]
    a.staging = StagingLimits(max_age=600)
    assert a.staged() == [] and a.store.staged_rows() == []
    a.close()


# -- decoding -------------------------------------------------------------------------------------


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_a_body_of_tiny_elements_costs_a_small_multiple_of_its_size(tmp_path: Path) -> None:
    """32 MiB of msgpack nils in {ids: [...]}, sent with a read token to each route that
    decodes a body: the server's peak RSS grows by at most 4x the body (it was ~20x)."""
    replica = new_project(tmp_path / "r")
    (tmp_path / "tokens").write_text(TOKENS)
    server = ServerProcess(replica.path, "--token-file", str(tmp_path / "tokens")).wait_ready()
    size = 32 << 20
    body = msgpack.packb({"ids": [None] * (size - 16)})
    assert len(body) <= size
    try:
        pid = server.proc.pid
        for route in ("/v1/pieces/missing", "/v1/ops/fetch", "/v1/ops/reconcile"):
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak to the current
            before = peak_rss(pid)
            r = httpx.post(server.url + route, headers=headers(READER), content=body,
                           timeout=120)
            assert r.status_code == 400, (route, r.status_code, r.text[:200])
            grown = peak_rss(pid) - before
            assert grown <= 4 * len(body), (route, grown / len(body))
    finally:
        server.stop()
        replica.close()


# -- downloads --------------------------------------------------------------------------------------


@contextmanager
def endless_piece_proxy(upstream: str, victim: str) -> Iterator[str]:
    """A hostile peer on loopback: forwards every request to ``upstream`` but answers
    ``GET /v1/pieces/<victim>`` with bytes that never end (bounded: 64 MiB at most)."""
    sent = {"bytes": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _forward(self) -> None:
            if self.command == "GET" and self.path == f"/v1/pieces/{victim}":
                self.send_response(200)
                self.send_header("Content-Type", wire.OCTETS)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                chunk = b"\0" * 65536
                try:
                    while sent["bytes"] < 64 << 20:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        sent["bytes"] += len(chunk)
                except OSError:
                    pass
                self.close_connection = True
                return
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else None
            keep = {k: v for k, v in self.headers.items()
                    if k.lower() not in ("host", "content-length", "connection")}
            r = httpx.request(self.command, upstream + self.path, content=body, headers=keep)
            self.send_response(r.status_code)
            for k, v in r.headers.items():
                if k.lower() not in ("content-length", "transfer-encoding", "connection",
                                     "content-encoding"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(r.content)))
            self.end_headers()
            self.wfile.write(r.content)

        do_GET = do_POST = do_PUT = _forward

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_an_endless_piece_is_cut_at_its_declared_size_and_leaves_no_part(tmp_path: Path) -> None:
    a = new_project(tmp_path / "a")
    op_id = contribute(a, 3)
    manifest = a.get_op(op_id).body["manifest"]
    victim = sorted(objects_of(a, manifest) - {manifest})[0]
    c = join(tmp_path / "c", a.genesis_bytes(), "gamma")
    server = ServerProcess(a.path).wait_ready()
    try:
        with endless_piece_proxy(server.url, victim) as hostile, HttpPeer(hostile) as peer:
            with pytest.raises(PeerError):
                pull(c, peer)
            assert peer.downloaded.get(victim, 0) <= 4096 + 65536  # one chunk past the size
        assert not list((c.path / "tmp").glob("*.part"))
        assert not c.store.has(victim) and op_id not in c.ops()
        with HttpPeer(server.url) as peer:  # an honest peer completes it
            pull(c, peer)
        assert c.state_root() == a.state_root()
    finally:
        server.stop()
        a.close()
        c.close()


def test_stale_part_files_are_removed_when_the_store_opens(tmp_path: Path) -> None:
    a = new_project(tmp_path / "a")
    stale = a.path / "tmp" / f"{digest(b'x')}.part"
    stale.write_bytes(b"partial")
    old = time.time() - 3 * 86400
    os.utime(stale, (old, old))
    fresh = a.path / "tmp" / f"{digest(b'y')}.part"
    fresh.write_bytes(b"resumable")
    a.close()
    Replica.open(tmp_path / "a").close()
    assert not stale.exists() and fresh.exists()


# -- unreferenced objects and rendered checkpoints ------------------------------------------------


def test_gc_removes_objects_no_op_references_after_the_grace(tmp_path: Path) -> None:
    a = new_project(tmp_path / "a")
    op_id = contribute(a, 4)
    kept = objects_of(a, a.get_op(op_id).body["manifest"])
    (tmp_path / "tokens").write_text(TOKENS)
    server = ServerProcess(a.path, "--token-file", str(tmp_path / "tokens")).wait_ready()
    loose = [os.urandom(1000) for _ in range(5)]
    try:
        for data in loose:
            r = httpx.put(f"{server.url}/v1/pieces/{digest(data)}", content=data,
                          headers={**headers(WRITER), "Content-Type": wire.OCTETS})
            assert r.status_code == 201
    finally:
        server.stop()
    root = a.state_root()
    a.close()

    def gc(grace: str) -> None:
        subprocess.run([PYTHON, "-m", "crdt_merge", "gc", str(tmp_path / "a"), "--grace", grace],
                       check=True, cwd=REPO, capture_output=True, timeout=120)

    gc("3600")  # within the grace: a push's objects may come before its ops
    with Replica.open(tmp_path / "a") as r:
        assert all(r.store.has(digest(d)) for d in loose)
    gc("0")
    with Replica.open(tmp_path / "a") as r:
        assert not any(r.store.has(digest(d)) for d in loose)
        assert all(r.store.has(o) for o in kept)
        assert r.state_root() == root and maintenance.fsck(r)["ok"]


def test_rendered_checkpoints_are_pruned(tmp_path: Path) -> None:
    pytest.importorskip("crdt_merge.resolve")
    from crdt_merge.resolve.checkpoint_cache import Checkpoints
    a = new_project(tmp_path / "a")
    a.set_recipe("linear", {})
    render = tmp_path / "checkpoints"
    service = Checkpoints(a, render, keep=1)
    ids = []
    for seed in (5, 6, 7, 8):  # each contribution makes a new plan
        contribute(a, seed)
        view = service.current()
        assert view["checkpoint_id"] is not None, view
        ids.append(view["plan_id"])
    folders = sorted(p.name for p in render.iterdir())
    assert ids[-1] in folders and len(folders) <= 2
    a.close()


def test_local_peer_roundtrip_still_moves_everything(tmp_path: Path) -> None:
    a = new_project(tmp_path / "a")
    contribute(a, 7)
    c = join(tmp_path / "c", a.genesis_bytes(), "gamma")
    sync(c, LocalPeer(a))
    assert c.state_root() == a.state_root()
    a.close()
    c.close()


def _tiny_element_ops(replica: Replica, count: int, per_element: int) -> list[bytes]:
    """``count`` ops of nearly 256 KiB that decode to a structurally valid recipe (its
    signature random, its member op nobody's) whose params hold one empty array per ``per_element`` bytes, the
    rest of the bytes in long strings: made by hand (the library refuses to build them)."""
    out = []
    for n in range(count):
        body = replica.new_body("recipe", method="linear", params={})
        body["member"] = digest(b"nobody %d" % n)
        empties = (opmod.MAX_OP_BYTES - 2048) // per_element * 15 // 16  # just within
        pad = (opmod.MAX_OP_BYTES - 2048 - empties) // 4099
        body["params"] = {"pad": ["x" * 4096] * pad, "x": [[]] * empties}
        body["sig"] = os.urandom(64)  # nobody checks it before the budget: any 64 bytes
        # msgpack-python writes what the canonical encoder would (sorted keys, shortest
        # forms), in C: the library's encoder would take minutes over 8M elements
        data = msgpack.packb(dict(sorted(body.items())), use_bin_type=True)
        assert len(data) <= opmod.MAX_OP_BYTES
        out.append(data)
    return out


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_ops_of_tiny_elements_in_a_push_cost_a_small_multiple_of_their_size(
        tmp_path: Path) -> None:
    """A contribute-token holder pushes 32 ops of nearly 256 KiB whose params are empty
    arrays (one byte each). Each op decodes under its own element budget, one element per
    4 bytes of the op, an array counting its elements and itself (specs/formats.md 6), so
    at most one empty array per 8 bytes: an op of one-byte elements is refused at once
    (peak RSS of the real server grows by at most 6x the body, the body's own copies; it
    was 77x, and the ops were staged), and ops right at the budget cost at most 20x."""
    replica = new_project(tmp_path / "r")
    (tmp_path / "tokens").write_text(TOKENS)
    server = ServerProcess(replica.path, "--token-file", str(tmp_path / "tokens")).wait_ready()
    try:
        pid = server.proc.pid
        for per_element, status, multiple in ((1, 400, 6), (8, 200, 20)):
            body = codec.encode({"ops": _tiny_element_ops(replica, 32, per_element)})
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak to the current
            before = peak_rss(pid)
            r = httpx.post(server.url + "/v1/ops", headers=headers(WRITER), content=body,
                           timeout=120)
            grown = peak_rss(pid) - before
            print(f"one element per {per_element} bytes: HTTP {r.status_code}, peak RSS "
                  f"+{grown / len(body):.2f}x the {len(body)} byte body")
            assert r.status_code == status, (per_element, r.status_code, r.text[:300])
            if status == 400:
                assert r.json()["code"] == "non_canonical"
            assert grown <= multiple * len(body), (per_element, grown / len(body))
    finally:
        server.stop()
        replica.close()


@settings(deadline=None, max_examples=60)
@given(st.lists(st.sampled_from("abcd"), min_size=1, max_size=60), st.integers(1, 20))
def test_eviction_is_fair_for_any_arrivals(arrivals: list[str], max_ops: int) -> None:
    """The eviction law for any order of arrivals from sources a-d under a count bound:
    the bound holds after every staging, and each row evicted is the newest row of a
    source that held the most rows (ties allowed) just before: a source is never cut
    while another holds more, whoever staged first."""
    with tempfile.TemporaryDirectory() as d:
        index = Index(Path(d) / "x.sqlite")
        for n, source in enumerate(arrivals):
            op_id = f"{n:064x}"
            before = index.staged_sources() | {op_id: source}
            evicted = index.stage(op_id, b"x", float(n), max_ops, 1 << 30, 1e9, source)
            after = index.staged_sources()
            assert len(after) == min(len(before), max_ops)
            assert set(after) | set(evicted) == set(before)
            counts = {s: list(before.values()).count(s) for s in set(before.values())}
            for gone in evicted:
                owner = before[gone]
                assert counts[owner] == max(counts.values()), (counts, owner)
                assert gone == max(i for i, s in before.items() if s == owner)  # its newest
        index.close()
