"""Finding 4 of issue 13: a keyless relay must not make a replica diverge.

An unverifiable retract (random membership op, random key) of a contribution, staged at
replica C before C holds that contribution, must not stop C from fetching the
contribution's objects: staged ops decide nothing. Over real server processes: the junk is
pushed to C's server with a contribute token, and C converges by anti-entropy and by pull.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from crdt_merge import codec
from crdt_merge.sync import wire
from crdt_merge.sync.http import HttpPeer
from crdt_merge.sync.protocol import pull
from tests.relay.helpers import forged_retract
from tests.server.http_helpers import ServerProcess, contribute, join, new_project, wait_for

WRITER = "writer-token-0123456789"
TOKENS = f"relay contribute {WRITER}\n"


def test_staged_forged_retract_does_not_stop_fetches_over_http(tmp_path: Path) -> None:
    a = new_project(tmp_path / "a")
    target = contribute(a, 1)
    junk = forged_retract(a, target, tmp_path / "scratch")
    c = join(tmp_path / "c", a.genesis_bytes(), "gamma")
    (tmp_path / "tokens").write_text(TOKENS)
    server_a = ServerProcess(a.path).wait_ready()
    server_c = None
    try:
        server_c = ServerProcess(c.path, "--token-file", str(tmp_path / "tokens"),
                                 env={"CRDT_MERGE_PEERS": server_a.url,
                                      "CRDT_MERGE_SYNC_INTERVAL": "0.3"})
        # the relay pushes its junk before C has seen the contribution: nothing stops
        # the server from staging it (a contribute token is all it needs)
        server_c.wait_ready()
        r = httpx.post(server_c.url + "/v1/ops", content=codec.encode({"ops": [junk.data]}),
                       headers={"Authorization": f"Bearer {WRITER}",
                                "Content-Type": wire.MSGPACK, "Accept": wire.MSGPACK})
        assert r.status_code == 200, r.text
        assert codec.decode(r.content)["committed"] == []
        # anti-entropy (C pulls from A every 0.3 s) must bring C to A's state
        assert wait_for(lambda: c.state_root() == a.state_root(), 20), \
            "C never converged with A under anti-entropy"
        assert target in c.ops()
        assert not c.store.missing(c.closure([c.ops()[target].body["manifest"]]))
    finally:
        if server_c is not None:
            server_c.stop()
        server_a.stop()
        a.close()
        c.close()


def test_staged_forged_retract_does_not_stop_a_pull(tmp_path: Path) -> None:
    """The same through a plain pull from a peer that serves the junk itself (a relay C
    pulls from): the first pull already completes C."""
    a = new_project(tmp_path / "a")
    target = contribute(a, 2)
    junk = forged_retract(a, target, tmp_path / "scratch")
    c = join(tmp_path / "c", a.genesis_bytes(), "gamma")
    c.stage(junk.data)  # what a relay's push or a relay's answer leaves staged
    server_a = ServerProcess(a.path).wait_ready()
    try:
        with HttpPeer(server_a.url) as peer:
            pull(c, peer)
            assert c.state_root() == a.state_root()
            pull(c, peer)
            assert c.state_root() == a.state_root()
        assert target in c.ops()
    finally:
        server_a.stop()
        a.close()
        c.close()
