"""Corruption over real HTTP: damaged bytes at rest and on the wire are never taken for an
object.

At rest: replica B got its objects from crdt_merge_server A by sync; then a byte flips in one of its
stored pieces (and, in a second round, in a piece and a manifest). ``resolve`` refuses to
write a checkpoint from it (a typed error, no output folder, not even a partial one), ``crdt-merge
fsck`` exits non-zero, the damaged objects are quarantined and wanted, and the next ``crdt-merge
sync`` from A over HTTP fetches exactly them again; then fsck is clean and B resolves the
checkpoint id A's server reports.

On the wire (a proxy in front of A, a real HTTP hop each way): a piece served with the right
length but wrong bytes, a body cut off after half of its announced ``Content-Length``, and a
complete answer whose ``Content-Length`` is short. None is stored or left visible under
objects/; a cut body leaves only a part file holding a true prefix, which the next sync from an
honest server resumes (or, if the resumed bytes are bad too, drops and fetches whole).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from crdt_merge.cli.main import main as cli_main
from crdt_merge.errors import HashMismatch
from crdt_merge.replica import Replica
from crdt_merge.sync import sync, wire
from crdt_merge.sync.http import HttpPeer
from tests.reliability.reliability_helpers import TamperingProxy, inspect_after_crash, truth_of
from tests.server.http_helpers import (
    PYTHON,
    REPO,
    ServerProcess,
    contribute,
    join,
    new_project,
    objects_of,
)


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Replica, ServerProcess]]:
    """Replica A (two contributions and a linear recipe) served by ``crdt-merge serve``."""
    root = tmp_path_factory.mktemp("corruption")
    a = new_project(root / "a")
    contribute(a, 1)
    contribute(a, 2)
    a.set_recipe("linear", {})
    server = ServerProcess(a.path).wait_ready()
    yield a, server
    server.stop()
    a.close()


def crdt_merge(*args: str) -> tuple[int, dict]:
    """Run the real ``crdt-merge --json ARGS`` program; (exit code, its JSON output)."""
    done = subprocess.run([PYTHON, "-m", "crdt_merge", "--json", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    text = done.stdout if done.stdout.strip() else done.stderr
    return done.returncode, json.loads(text)


def resolve_in_process(replica_dir: Path, out: Path, capsys: pytest.CaptureFixture[str]
                       ) -> tuple[int, dict]:
    """``crdt-merge --json resolve`` in this process (which has torch loaded already)."""
    capsys.readouterr()
    code = cli_main(["--json", "resolve", str(replica_dir), "--out", str(out),
                     "--workers", "1"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out if code == 0 else captured.err)


def flip_byte(replica_dir: Path, object_id: str) -> None:
    path = replica_dir / "objects" / object_id[:2] / object_id
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))


def no_output(out: Path) -> None:
    """Nothing of a checkpoint folder is left: neither ``out`` nor a partial one."""
    left = sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name))
    assert left == [], f"resolve left {left}"


def quarantined(replica_dir: Path) -> set[str]:
    return {p.name.split(".")[0] for p in (replica_dir / "quarantine").iterdir()}


def test_flipped_bytes_at_rest_are_refused_quarantined_and_fetched_again(origin, tmp_path,
                                                                          capsys):
    a, server = origin
    with ThreadPoolExecutor(1) as pool:  # A's server resolves its checkpoint meanwhile
        view = pool.submit(served_checkpoint, server.url)
        resolved = corrupt_resolve_repair(a, server, tmp_path, capsys)
        view = view.result()
    assert view["checkpoint_id"] is not None, view
    assert resolved["checkpoint_id"] == view["checkpoint_id"]
    assert resolved["plan_id"] == view["plan_id"]


def served_checkpoint(url: str) -> dict:
    with HttpPeer(url, timeout=300) as peer:
        return peer.checkpoint()


def corrupt_resolve_repair(a: Replica, server: ServerProcess, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> dict:
    b_dir = tmp_path / "b"
    with join(b_dir, a.genesis_bytes(), "bob") as b, HttpPeer(server.url) as peer:
        sync(b, peer)
        assert b.state_root() == a.state_root()
        first, second = sorted(op.body["manifest"] for op in b.ops().values()
                               if op.kind == "contribute")
        piece_y = b.get_manifest(first).tensors["layers.0.attn"].pieces[1]
        piece_x = b.get_manifest(second).tensors["layers.0.mlp"].pieces[1]
        manifest_z = second
    # a checkpoint resolved while every byte was sound (it also records the plan's
    # NaN/inf checks, so the next resolve reads the pieces only to compute the merge)
    code, before = resolve_in_process(b_dir, tmp_path / "before", capsys)
    assert code == 0, before

    # a flipped piece that resolve meets first: a typed error, nothing written
    flip_byte(b_dir, piece_y)
    code, err = resolve_in_process(b_dir, tmp_path / "out", capsys)
    assert (code, err["error"]) == (2, "piece_corrupt"), err
    assert piece_y in err["detail"]
    no_output(tmp_path / "out")
    assert piece_y in quarantined(b_dir)

    # a flipped piece and a flipped manifest that fsck meets first
    flip_byte(b_dir, piece_x)
    flip_byte(b_dir, manifest_z)
    code, report = crdt_merge("fsck", str(b_dir))
    assert code == 1 and not report["ok"], report
    assert sorted(report["corrupt"]) == sorted([piece_x, manifest_z])
    assert sorted(report["wanted"]) == sorted([piece_x, piece_y, manifest_z])
    assert report["incomplete_ops"]
    assert {piece_x, piece_y, manifest_z} <= quarantined(b_dir)
    for object_id in (piece_x, piece_y, manifest_z):
        assert not (b_dir / "objects" / object_id[:2] / object_id).exists()
    code, err = resolve_in_process(b_dir, tmp_path / "out", capsys)
    assert code == 2 and err["error"] in ("piece_missing", "piece_corrupt", "incomplete_op"), err
    no_output(tmp_path / "out")

    # the next sync from A over HTTP fetches exactly the three again
    code, stats = crdt_merge("sync", str(b_dir), server.url)
    assert code == 0, stats
    assert stats["objects_received"] == 3
    truth = truth_of(a.path)
    assert stats["bytes_received"] == sum(len(truth(o)) for o in (piece_x, piece_y, manifest_z))
    code, report = crdt_merge("fsck", str(b_dir))
    assert code == 0 and report["ok"] and not report["wanted"], report

    code, resolved = resolve_in_process(b_dir, tmp_path / "out", capsys)
    assert code == 0, resolved
    assert resolved["checkpoint_id"] == before["checkpoint_id"]
    return resolved


def target_piece(a: Replica) -> str:
    """A whole 4 KiB piece of A's first contribution."""
    manifest = sorted(op.body["manifest"] for op in a.ops().values() if op.kind == "contribute")[0]
    return a.get_manifest(manifest).tensors["layers.0.mlp"].pieces[1]


def lacking_nothing_twice(b: Replica, a: Replica, peer: HttpPeer, held: set[str],
                          parts: dict[str, int]) -> None:
    """After a sync from an honest server: same state, each object B lacked fetched once
    (resumed from its part file), nothing B held fetched at all."""
    assert b.state_root() == a.state_root()
    gets = [e.path.rsplit("/", 1)[1] for e in peer.log
            if e.method == "GET" and e.path.startswith("/v1/pieces/")]
    assert len(gets) == len(set(gets))
    everything = set().union(*(objects_of(a, op.body["manifest"]) for op in a.ops().values()
                               if op.kind == "contribute"))
    assert set(peer.downloaded) == everything - held
    truth = truth_of(a.path)
    for object_id, n in peer.downloaded.items():
        assert n == len(truth(object_id)) - parts.get(object_id, 0), object_id


def test_wrong_bytes_of_the_right_size_are_never_accepted(origin, tmp_path):
    a, server = origin
    target = target_piece(a)
    join(tmp_path / "b", a.genesis_bytes(), "bob").close()
    proxy = TamperingProxy(server.url, "flip", target)
    try:
        code, err = crdt_merge("sync", str(tmp_path / "b"), proxy.url)
    finally:
        proxy.close()
    assert proxy.served == 1  # sent once, refused, not asked again
    assert (code, err["error"]) == (2, "hash_mismatch"), err
    after = inspect_after_crash(tmp_path / "b", truth_of(a.path))
    assert target not in after.files and target not in after.indexed and not after.parts
    # what did verify was kept; the ops wait for the refused piece
    assert after.indexed and after.staged
    with Replica.open(tmp_path / "b") as b, HttpPeer(server.url) as peer:
        sync(b, peer)
        lacking_nothing_twice(b, a, peer, after.indexed, {})
        assert b.store.get(target) == a.store.get(target)
    assert not list((tmp_path / "b" / "tmp").iterdir())


@pytest.mark.parametrize("mode", ["cut", "short", "cut-then-flip"])
def test_a_truncated_download_is_never_taken_for_a_whole_piece(origin, tmp_path, mode):
    a, server = origin
    target = target_piece(a)
    size = len(a.store.get(target))
    truth = truth_of(a.path)
    with join(tmp_path / "b", a.genesis_bytes(), "bob") as b:
        proxy = TamperingProxy(server.url, "short" if mode == "short" else "cut", target)
        try:
            with HttpPeer(proxy.url) as peer:
                error = HashMismatch if mode == "short" else wire.PeerUnreachable
                with pytest.raises(error):
                    sync(b, peer)
            assert proxy.served == 1
            assert not b.store.has(target)
            part = tmp_path / "b" / "tmp" / f"{target}.part"
            if mode == "short":
                assert not part.exists()  # refused by its hash, and deleted
            else:
                assert part.read_bytes() == truth(target)[:size // 2]
            if mode == "cut-then-flip":
                # the rest, asked for with a Range request, comes back damaged: the whole
                # fails its hash, so the part is dropped and the object fetched whole,
                # once, damaged again: refused again, nothing kept
                proxy.mode = "flip"
                with HttpPeer(proxy.url) as peer:
                    with pytest.raises(HashMismatch):
                        sync(b, peer)
                    statuses = [e.status for e in peer.log if e.path.endswith(target)]
                    assert statuses == [206, 200]
                assert proxy.served == 3
                assert not part.exists() and not b.store.has(target)
        finally:
            proxy.close()
    after = inspect_after_crash(tmp_path / "b", truth)
    assert target not in after.files and target not in after.indexed
    with Replica.open(tmp_path / "b") as b, HttpPeer(server.url) as peer:
        sync(b, peer)
        lacking_nothing_twice(b, a, peer, after.indexed, after.parts)
        if mode == "cut":
            assert peer.downloaded[target] == size - size // 2  # resumed, not refetched
    assert not list((tmp_path / "b" / "tmp").iterdir())
    assert inspect_after_crash(tmp_path / "b").indexed >= {target}
