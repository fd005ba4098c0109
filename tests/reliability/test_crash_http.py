"""Crash injection over real HTTP: a server process SIGKILLed at each crash point while a
client pushes a contribution (pieces, then the op) to it, and a client process (``crdt-merge
sync DIR URL``) SIGKILLed at each crash point while it pulls from a server.

After each death the dead side's replica directory is checked (reliability_helpers.
inspect_after_crash): no torn or unverified object visible, part files only ever a prefix
of the true bytes, the dead process's temp files gone once the replica reopens, fsck clean,
and every op acknowledged before the kill still held. Then the dead side restarts and the
next sync must complete without sending again anything that had arrived: every object
whose bytes were all on disk is not transferred again, a part file is resumed from its end,
and an op that was staged is not fetched again.

``test_checks_catch_a_store_that_is_not_crash_safe`` runs the server-side scenario against
a server whose store was broken on purpose (no temp file; index row before the file), to
show that these checks fail when the write ordering is wrong.
"""

from __future__ import annotations

import itertools
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from crdt_merge.hashing import digest
from crdt_merge.replica import Replica
from crdt_merge.sync import sync, wire
from crdt_merge.sync.http import HttpPeer
from tests.reliability.reliability_helpers import (
    CRASH_POINTS,
    Aftermath,
    Launcher,
    Proc,
    contribute_padded,
    crash_points_in_code,
    inspect_after_crash,
    truth_of,
)
from tests.server.http_helpers import join, new_project, objects_of

#: crash points where the killed writer's bytes are still in a temp (or part) file
BEFORE_RENAME = {"piece.mid_stream", "piece.before_fsync", "piece.after_fsync"}
#: crash points where the killed writer's object is whole in objects/ but not indexed
AFTER_RENAME = {"piece.after_rename", "piece.before_index"}


@pytest.fixture(scope="module")
def launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    """Server and CLI processes forked from one warm fork server (reliability_helpers)."""
    out = Launcher("fork", tmp_path_factory.mktemp("procs"))
    yield out
    out.close()


def test_every_crash_point_in_the_code_is_tried_here():
    assert crash_points_in_code() == set(CRASH_POINTS), (
        "crash points changed: list each in tests/reliability/reliability_helpers.py")


def test_an_object_renamed_into_place_but_not_indexed_is_adopted(tmp_path):
    """Regression: a process killed between an object's rename and its index row left the
    whole, verified file in objects/, yet the store reported it missing, so the next sync
    transferred it again (both directions). ``missing`` now verifies and indexes it."""
    with new_project(tmp_path / "r") as r:
        data = bytes(range(256)) * 20
        object_id = digest(data)
        r.store.files.write(data, object_id)  # what the killed writer left: no index row
        assert not r.store.has(object_id)
        assert r.store.missing([object_id]) == set()
        assert r.store.has(object_id) and r.store.get(object_id) == data
        # a file under an id it does not hash to is not adopted, and is moved aside
        other = digest(b"other bytes")
        path = r.store.files.path(other)
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"not the other bytes")
        assert r.store.missing([other, "not-an-id"]) == {other, "not-an-id"}
        assert not path.exists() and not r.store.has(other)
        assert [q.name.split(".")[0] for q in (tmp_path / "r" / "quarantine").iterdir()] == [other]


def object_puts(peer: HttpPeer) -> list[str]:
    return [e.path.rsplit("/", 1)[1] for e in peer.log
            if e.method == "PUT" and e.path.startswith("/v1/pieces/")]


def object_gets(peer: HttpPeer) -> list[str]:
    return [e.path.rsplit("/", 1)[1] for e in peer.log
            if e.method == "GET" and e.path.startswith("/v1/pieces/")]


# -- the server dies while a client pushes to it -----------------------------------------------


def push_into_dying_server(launch: Launcher, tmp_path: Path, point: str,
                           sabotage: str | None = None, workers: int = 4,
                           pad: int = 160_000) -> tuple[Replica, Path, set[str], str]:
    """A client (alpha) pushes a contribution to a server that acknowledges it; then the
    server's crash point is armed and the client pushes a second one (``workers`` uploads
    at once; its manifest holds ``pad`` bytes of notes), during which the server SIGKILLs
    itself. Returns the client, the server's directory, the ops the server had acknowledged
    and the second contribution's op id."""
    client = new_project(tmp_path / "client")
    join(tmp_path / "server", client.genesis_bytes(), "bob").close()
    server = launch.server(tmp_path / "server", point, sabotage)
    contribute_padded(client, 1)
    with HttpPeer(server.url) as peer:
        sync(client, peer)
        assert peer.state().state_root == client.state_root()  # every op acknowledged
    acknowledged = set(client.op_ids())
    server.arm()
    second = contribute_padded(client, 2, pad)
    with HttpPeer(server.url, timeout=30, workers=workers) as peer, \
            pytest.raises(wire.PeerUnreachable):
        sync(client, peer)
    assert server.wait(60) == -signal.SIGKILL, server.log()
    return client, tmp_path / "server", acknowledged, second


def check_server_death(point: str, after: Aftermath, acknowledged: set[str], second: str,
                       wanted: set[str]) -> None:
    assert acknowledged <= after.ops, "an acknowledged op was lost"
    assert second not in after.ops
    # the process died where it was meant to (not somewhere else on the way)
    if point in BEFORE_RENAME:
        assert after.dead_tmp, "no temp file: the upload was not cut before its rename"
    elif point in AFTER_RENAME:
        assert (after.files - after.indexed) & wanted, "no whole object left unindexed"
    else:  # in the one transaction that stages and commits the pushed ops: none of it
        assert second not in after.staged and wanted <= after.indexed


def server_killed_during_a_push(launch: Launcher, tmp_path: Path, point: str) -> None:
    client, server_dir, acknowledged, second = push_into_dying_server(launch, tmp_path, point)
    wanted = objects_of(client, client.get_op(second).body["manifest"])
    after = inspect_after_crash(server_dir)
    check_server_death(point, after, acknowledged, second, wanted)

    server = launch.server(server_dir)  # restarted
    try:
        with HttpPeer(server.url) as peer:
            stats = sync(client, peer)
            puts = object_puts(peer)
            assert peer.state().state_root == client.state_root()
        assert len(puts) == len(set(puts)), "an object was uploaded twice"
        assert not set(puts) & after.arrived, "an object the server had was sent again"
        assert set(puts) == wanted - after.arrived
        assert stats.ops_sent == 1 and stats.ops_received == 0
    finally:
        server.stop()
        client.close()
    inspect_after_crash(server_dir)
    with Replica.open(server_dir) as r:
        assert second in r.ops() and acknowledged <= set(r.ops())
        assert not r.store.staged_rows()


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_server_killed_during_a_push(launcher, tmp_path, point):
    server_killed_during_a_push(launcher, tmp_path, point)


@pytest.mark.parametrize("sabotage,point,caught", [
    ("in-place", "piece.mid_stream", "torn object file"),
    ("index-first", "piece.before_fsync", "'ok': False"),
])
def test_checks_catch_a_store_that_is_not_crash_safe(launcher, tmp_path, sabotage, point, caught):
    """The same scenario against a store whose write ordering is broken on purpose: an
    upload written in place (a kill mid-stream leaves a torn object under its id), or an
    index row written before the file is in place (a kill before the fsync leaves an
    indexed object with no file). The checks above must catch both. The uploads go one at
    a time and the manifest, first, is 1 MB: the server receives it in several chunks, so
    the in-place file is really cut short when the server dies after the first one."""
    client, server_dir, _, _ = push_into_dying_server(launcher, tmp_path, point, sabotage,
                                                      workers=1, pad=1_000_000)
    client.close()
    with pytest.raises(AssertionError, match=caught):
        inspect_after_crash(server_dir)


# -- the client dies while it pulls from a server ------------------------------------------------


def serve_origin(launch: Launcher, root: Path) -> tuple[Replica, Proc]:
    """A replica with one contribution, served by a real server for a whole module (each
    test adds a contribution of its own to it, through the directory)."""
    replica = new_project(root / "origin")
    contribute_padded(replica, 1)
    return replica, launch.server(replica.path)


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory, launcher: Launcher):
    replica, server = serve_origin(launcher, tmp_path_factory.mktemp("origin"))
    yield replica, server
    server.stop()
    replica.close()


#: (crash point, objects stored before it is armed): with 0 the client dies the first time
#: it gets there (at the first object: the manifest, which arrives in several chunks; or at
#: the op's commit); with more it dies among pieces downloaded in parallel, some stored,
#: some in flight. The default run tries every point at 0 and two at 4 (one before the
#: rename, one after); the slow run every point after 0, 1, 3 and 5 objects. A pull here
#: stores 9 new objects (the manifest, then 8 pieces on 4 threads): armed after at most 5,
#: at least one object has not started, so the point is always met.
CLIENT_CASES = [(p, 0) for p in CRASH_POINTS] + [("piece.mid_stream", 4),
                                                 ("piece.after_rename", 4)]
SLOW_CLIENT_CASES = [(p, n) for p in CRASH_POINTS for n in (0, 1, 3, 5)
                     if n == 0 or p.startswith("piece.")]
_seeds = itertools.count(10)


def client_killed_during_a_pull(launch: Launcher, origin: tuple[Replica, Proc], tmp_path: Path,
                                point: str, armed_after: int) -> None:
    a, server = origin
    with join(tmp_path / "client", a.genesis_bytes(), "carol") as c:
        with HttpPeer(server.url) as peer:
            sync(c, peer)
        acknowledged = set(c.op_ids())
        acknowledged_objects = set(c.store.object_ids())
        assert c.state_root() == a.state_root()
    new_op = contribute_padded(a, next(_seeds))
    wanted = objects_of(a, a.get_op(new_op).body["manifest"])

    proc = launch.cli(["sync", str(tmp_path / "client"), server.url], point, armed_after)
    assert proc.wait(300) == -signal.SIGKILL, proc.log()

    truth = truth_of(a.path)
    after = inspect_after_crash(tmp_path / "client", truth)
    assert acknowledged <= after.ops, "an op committed before the kill was lost"
    assert new_op in after.staged  # staged before its first object was asked for
    if point in BEFORE_RENAME:
        assert after.parts, "no part file: the download was not cut before its rename"
        if point == "piece.mid_stream" and not armed_after:  # the manifest, after one chunk
            assert any(0 < n < len(truth(o)) for o, n in after.parts.items()), after.parts
    elif point in AFTER_RENAME:
        assert (after.files - after.indexed) & wanted, "no whole object left unindexed"
    else:
        assert wanted <= after.indexed
    if armed_after:
        assert len(wanted - acknowledged_objects) == 9
        assert len(after.arrived & wanted) >= armed_after

    with Replica.open(tmp_path / "client") as c, HttpPeer(server.url) as peer:
        stats = sync(c, peer)
        gets = object_gets(peer)
        fetched = dict(peer.downloaded)
        assert c.state_root() == a.state_root()
    assert stats.ops_received == 0, "the staged op was fetched again"
    assert len(gets) == len(set(gets)), "an object was asked for twice"
    assert not set(fetched) & after.arrived, "an object that had arrived was fetched again"
    assert set(fetched) == wanted - after.arrived
    for object_id, n in fetched.items():
        assert n == len(truth(object_id)) - after.parts.get(object_id, 0), object_id
    again = inspect_after_crash(tmp_path / "client", truth)
    assert not again.parts and new_op in again.ops


@pytest.mark.parametrize("point,armed_after", CLIENT_CASES)
def test_client_killed_during_a_pull(launcher, origin, tmp_path, point, armed_after):
    client_killed_during_a_pull(launcher, origin, tmp_path, point, armed_after)


# -- the slow run: every case, with fresh programs ----------------------------------------------
# (python -m crdt_merge serve / sync themselves wherever nothing needs arming later; the
# drivers in procs.py, run as programs, where something does)


@pytest.fixture(scope="module")
def exec_launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    out = Launcher("exec", tmp_path_factory.mktemp("exec-procs"))
    yield out
    out.close()


@pytest.fixture(scope="module")
def exec_origin(tmp_path_factory: pytest.TempPathFactory, exec_launcher: Launcher):
    replica, server = serve_origin(exec_launcher, tmp_path_factory.mktemp("exec-origin"))
    yield replica, server
    server.stop()
    replica.close()


@pytest.mark.slow
@pytest.mark.parametrize("point", CRASH_POINTS)
def test_server_killed_during_a_push_fresh_programs(exec_launcher, tmp_path, point):
    server_killed_during_a_push(exec_launcher, tmp_path, point)


@pytest.mark.slow
@pytest.mark.parametrize("point,armed_after", SLOW_CLIENT_CASES)
def test_client_killed_during_a_pull_fresh_programs(exec_launcher, exec_origin, tmp_path, point,
                                                    armed_after):
    client_killed_during_a_pull(exec_launcher, exec_origin, tmp_path, point, armed_after)
