"""The CLI as a terminal program: real processes, real signals, a real pseudo-terminal.

- Ctrl-C (SIGINT) at named steps of contribute, resolve, sync and verify (the test-only
  pause points of crdt_merge/testpoints.py: the command waits there for the signal, so no
  timing decides what is tested): "interrupted", exit 130, no traceback, the replicas
  still pass ``fsck``, and a rerun gives what an uninterrupted run gives.
- A closed pipe (``| head``) ends quietly.
- Progress bars appear on a terminal (run under ``script``, which gives the command a pty)
  and not with ``--json``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crdt_merge", *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, **kw)


def big_model(folder: Path, mib: int, seed: int) -> Path:
    """A safetensors model of about ``mib`` MiB (float32), enough for an import to last."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = mib * 1024 * 1024 // 4 // 4
    save_file({f"model.layers.{i}.mlp.weight": rng.standard_normal(n, dtype=np.float32)
               for i in range(4)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("terminal")
    return {"a": big_model(root / "a", 64, 1), "b": big_model(root / "b", 64, 2)}


def small_model(folder: Path, kib: int, seed: int) -> Path:
    """A safetensors model of ``kib`` KiB in four tensors: with 4 KiB pieces (the replica's
    ``test`` profile) an import stores several batches of pieces and a sync many pieces."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = kib * 1024 // 4 // 4
    save_file({f"model.layers.{i}.mlp.weight": rng.standard_normal(n, dtype=np.float32)
               for i in range(4)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


PAUSE = "CRDT_MERGE_TEST_PAUSE"  # the CLI's test-only pause points (crdt_merge/testpoints.py)


def interrupt_at(point: str, args: list[str], marker: Path) -> subprocess.CompletedProcess:
    """Run ``crdt-merge ARGS`` until its main thread reaches the pause point ``point``, then
    send it a real SIGINT. Fails when the command ends without reaching the point."""
    env = {**os.environ, PAUSE: f"{point}:{marker}"}
    # Ctrl-C's default action in the command, whatever this run inherited: a suite started
    # as a background job of a non-interactive shell ignores SIGINT, and an ignored SIGINT
    # stays ignored across exec (Python then installs no KeyboardInterrupt handler)
    proc = subprocess.Popen([sys.executable, "-m", "crdt_merge", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while not marker.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"{args[0]} ended (exit {proc.returncode}) before reaching {point}: "
                        f"{out}{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{args[0]} did not reach {point} in time")
        time.sleep(0.02)
    assert marker.read_text().split() == [str(proc.pid), point]
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"{args[0]} did not end within 60 s of a SIGINT at {point}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_interrupted(done: subprocess.CompletedProcess, *replicas: str) -> None:
    """Exit 130, one short line on stderr (no traceback), nothing on stdout, and every
    replica the command touched still passes fsck."""
    assert done.returncode == 130, (done.returncode, done.stdout, done.stderr)
    assert done.stderr == "crdt-merge: interrupted\n", done.stderr
    assert done.stdout == ""
    for replica in replicas:
        fsck = cli("--json", "fsck", replica)
        assert fsck.returncode == 0 and json.loads(fsck.stdout)["ok"], fsck.stdout + fsck.stderr


def ok_json(*args: str) -> dict:
    done = cli("--json", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_ctrl_c_at_each_step_ends_cleanly_and_a_rerun_gives_the_same_result(tmp_path) -> None:
    """A real SIGINT at named steps (test-only pause points, so every signal meets a
    running command) of contribute, resolve, sync and verify: exit 130, "interrupted",
    the replicas intact, and a rerun gives what an uninterrupted run gives."""
    m1 = small_model(tmp_path / "m1", 1152, 1)  # 288 pieces of 4 KiB: two import batches
    m2 = small_model(tmp_path / "m2", 1152, 2)
    r, peer, far, ref = (str(tmp_path / n) for n in ("r", "peer", "far", "ref"))
    for where in (r, ref):
        assert cli("init", where, "--site", "alpha", "--profile", "test").returncode == 0
    for where in (peer, far):  # they hold nothing yet
        assert cli("init", where, "--site", "beta", "--join", r).returncode == 0
    reference = ok_json("contribute", ref, str(m1), "--weight", "1")  # uninterrupted
    markers = iter(tmp_path / f"paused-{i}" for i in range(100))

    # contribute: between two batches of pieces, while the manifest's bytes are in a temp
    # file, inside the transaction that commits the op
    for point in ("import.batch", "piece.mid_stream", "op.before_commit"):
        done = interrupt_at(point, ["contribute", r, str(m1), "--weight", "1"], next(markers))
        assert_interrupted(done, r)
        state = ok_json("status", r)
        # nothing half-recorded: no contribution, and no op left staged for the next
        # command to commit as a side effect
        assert state["contributions"] == [] and state["staged"] == 0, state
    again = ok_json("contribute", r, str(m1), "--weight", "1")
    assert again["manifest"] == reference["manifest"]
    assert len(ok_json("status", r)["contributions"]) == 1
    ok_json("contribute", r, str(m2), "--weight", "1")
    ok_json("recipe", r, "--method", "linear")

    # resolve: after one output tensor of four is written (one worker, and a pool of two)
    expected = ok_json("resolve", r, "--out", str(tmp_path / "expected"))["checkpoint_id"]
    out = tmp_path / "out"
    for workers in ("1", "2"):
        done = interrupt_at("resolve.job", ["resolve", r, "--out", str(out), "--workers",
                                            workers], next(markers))
        assert_interrupted(done, r)
        assert not out.exists() and not (tmp_path / "out.partial").exists()
    assert ok_json("resolve", r, "--out", str(out))["checkpoint_id"] == expected

    # sync: while an object's bytes are in a temp file, and between two pieces
    for point in ("piece.mid_stream", "sync.pieces"):
        done = interrupt_at(point, ["sync", peer, r], next(markers))
        assert_interrupted(done, peer, r)
    synced = ok_json("sync", peer, r)
    # and over HTTP (a real server on 127.0.0.1), where pieces download on worker threads:
    # the transfers not yet started are cancelled, the command ends at once
    from tests.server.http_helpers import ServerProcess

    server = ServerProcess(Path(r)).wait_ready()
    try:
        done = interrupt_at("sync.pieces", ["sync", far, server.url], next(markers))
        assert_interrupted(done, far)
        assert ok_json("sync", far, server.url)["state_root"] == synced["state_root"]
    finally:
        server.stop()
    uninterrupted = tmp_path / "joined"
    assert cli("init", str(uninterrupted), "--site", "gamma", "--join", r).returncode == 0
    assert synced["state_root"] == ok_json("status", r)["state_root"]
    assert synced["state_root"] == ok_json("status", str(uninterrupted))["state_root"]

    # verify: while it resolves (a new recipe: no checkpoint of it is cached anywhere)
    ok_json("recipe", r, "--method", "linear", "--param", "dtype=float16")
    ok_json("sync", peer, r)
    done = interrupt_at("resolve.job", ["verify", r, peer], next(markers))
    assert_interrupted(done, r, peer)
    verdict = ok_json("verify", r, peer)
    assert verdict["ok"]
    fresh = ok_json("resolve", r, "--out", str(tmp_path / "fp16"))["checkpoint_id"]
    assert {v["checkpoint_id"] for v in verdict["replicas"].values()} == {fresh}


def test_the_pause_points_are_armed_only_by_the_cli(tmp_path) -> None:
    """The test hook is inert outside ``crdt-merge``: the library (an import through the
    in-process API with the variable set) and the server (``crdt-merge serve`` with it set,
    taking pushes) never pause, and a malformed value is refused with one line."""
    model = small_model(tmp_path / "m", 1152, 3)
    marker = tmp_path / "never"
    code = ("import os, sys; os.environ['CRDT_MERGE_TEST_PAUSE'] = sys.argv[1]\n"
            "from crdt_merge.replica import Replica\n"
            "from crdt_merge.store.importer import import_model\n"
            "r = Replica.create(sys.argv[2], 'alpha', profile='test')\n"
            "import_model(r.store, sys.argv[3], r.piece_size); r.close()\n")
    done = subprocess.run([sys.executable, "-c", code, f"import.batch:{marker}",
                           str(tmp_path / "r"), str(model)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert not marker.exists()
    # a server started with the variable set never pauses: pushes through its write points
    # (pieces mid-stream, an op's commit) go through, and no marker appears
    from tests.server.http_helpers import ServerProcess

    served, client = tmp_path / "served", str(tmp_path / "client")
    assert cli("init", str(served), "--site", "alpha", "--profile", "test").returncode == 0
    joined = cli("--json", "init", client, "--site", "beta", "--join", str(served))
    key = json.loads(joined.stdout)["public_key"]
    assert cli("admit", str(served), "beta", key).returncode == 0
    assert cli("sync", client, str(served)).returncode == 0
    for i, point in enumerate(("piece.mid_stream", "op.before_commit")):
        donor = small_model(tmp_path / f"donor{i}", 64, 10 + i)
        assert cli("contribute", client, str(donor), "--weight", "1").returncode == 0
        server = ServerProcess(served, env={PAUSE: f"{point}:{marker}"}).wait_ready()
        try:
            done = cli("--json", "sync", client, server.url)
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)["objects_sent"] > 0
        finally:
            server.stop()
    assert not marker.exists()
    assert len(ok_json("status", str(served))["contributions"]) == 2
    bad = cli("families", "list", env={**os.environ, PAUSE: "no-marker"})
    assert bad.returncode == 2 and "POINT:MARKER_FILE" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_closed_pipe_ends_quietly(tmp_path) -> None:
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written (as `| head` after a line)
    try:
        proc = subprocess.run([sys.executable, "-m", "crdt_merge", "families", "list"],
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=300,
                              cwd=ROOT)
    finally:
        os.close(write)
    assert proc.returncode == 141 and "Traceback" not in proc.stderr, proc.stderr
    assert "BrokenPipe" not in proc.stderr


@pytest.mark.skipif(shutil.which("script") is None, reason="util-linux `script` is absent")
def test_progress_shows_on_a_terminal_and_not_with_json(tmp_path, models) -> None:
    replica = str(tmp_path / "r")
    assert cli("init", replica, "--site", "alpha").returncode == 0

    def on_tty(*args: str) -> str:
        command = " ".join([sys.executable, "-m", "crdt_merge", *args])
        proc = subprocess.run(["script", "-qefc", command, "/dev/null"], capture_output=True,
                              text=True, timeout=300, cwd=ROOT, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    shown = on_tty("contribute", replica, str(models["a"]), "--weight", "1")
    assert "import a:" in shown and "100%" in shown
    assert re.search(r"\d+(\.\d+)?M/\d+(\.\d+)?M", shown)  # bytes done / total
    assert re.search(r"\d+(\.\d+)?[kMG]?B/s", shown)  # a rate
    quiet = on_tty("--json", "contribute", replica, str(models["b"]), "--weight", "1")
    assert "import" not in quiet and "%" not in quiet
    assert json.loads(quiet[quiet.index("{"):])["op_id"]
    off_tty = cli("contribute", replica, str(models["b"]), "--weight", "1", "--label", "again")
    assert off_tty.returncode == 0 and "%" not in off_tty.stderr


def on_tty(*args: str, stdout_to: Path | None = None) -> str:
    """What a terminal shows while ``crdt-merge ARGS`` runs (``script`` gives it a pty);
    with ``stdout_to``, the command's stdout goes to that file instead (``> FILE``)."""
    command = " ".join([sys.executable, "-m", "crdt_merge", *args])
    if stdout_to is not None:
        command += f" > {stdout_to}"
    proc = subprocess.run(["script", "-qefc", command, "/dev/null"], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


BYTES_AND_RATE = re.compile(r"\d+(\.\d)? MiB, \d+(\.\d)? [KMG]iB/s")


@pytest.mark.skipif(shutil.which("script") is None, reason="util-linux `script` is absent")
def test_sync_and_verify_show_progress_on_a_terminal_only(tmp_path, models) -> None:
    """``sync`` (with a peer folder) shows a bar per stage with the bytes moved and their
    rate; ``verify`` shows its resolve's bar. Not with ``--json``, not when stderr is not
    a terminal, and never on stdout (``verify ... > file`` on a terminal)."""
    a = str(tmp_path / "a")
    assert cli("init", a, "--site", "alpha").returncode == 0
    peers = {n: str(tmp_path / n) for n in ("tty", "json", "piped")}
    for n, where in peers.items():  # each joins before there is anything to fetch
        assert cli("init", where, "--site", n, "--join", a).returncode == 0
    for m in ("a", "b"):
        assert cli("contribute", a, str(models[m]), "--weight", "1").returncode == 0
    assert cli("recipe", a, "--method", "linear").returncode == 0

    shown = on_tty("sync", peers["tty"], a)
    assert "received 3 ops" in shown
    # 2 models of 4 pieces of 16 MiB, and their config.json (one object): 128 MiB or a
    # little more (the index's reads) by the last piece
    assert re.search(r"pieces: 100%.*9/9.*12[89]\.\d MiB, ", shown), shown
    assert BYTES_AND_RATE.search(shown), shown
    quiet = on_tty("--json", "sync", peers["json"], a)
    assert "%" not in quiet and "MiB" not in quiet, quiet
    assert json.loads(quiet[quiet.index("{"):])["ops_received"] == 3
    piped = cli("sync", peers["piped"], a)
    assert piped.returncode == 0 and piped.stderr == "", piped.stderr
    assert piped.stdout.startswith("received 3 ops")

    # verify resolves each replica's checkpoint (none is cached yet): a bar per resolve
    out = tmp_path / "verdict.txt"
    shown = on_tty("verify", peers["tty"], a, stdout_to=out)
    assert len(re.findall(r"resolve: +0%\|[^|]*\| 0\.00/", shown)) == 2, shown  # two bars
    assert "resolve: 100%" in shown, shown
    assert re.search(r"\d+(\.\d+)?M/\d+(\.\d+)?M", shown)  # bytes written / total
    assert re.search(r"\d+(\.\d+)?[kMG]?B/s", shown)  # a rate
    assert "agrees" not in shown  # the verdict went to the file, the bars did not
    verdict = out.read_text()
    assert verdict.count("agrees") == 2 and "%" not in verdict and "\r" not in verdict
    # new recipe: nothing cached, so both runs below resolve again, silently
    assert cli("recipe", a, "--method", "linear", "--param", "dtype=float16").returncode == 0
    for where in (peers["json"], peers["piped"]):
        assert cli("sync", where, a).returncode == 0
    quiet = on_tty("--json", "verify", peers["json"], a)
    assert "%" not in quiet and json.loads(quiet[quiet.index("{"):])["ok"], quiet
    piped = cli("verify", peers["piped"], a)
    assert piped.returncode == 0 and piped.stderr == "" and "%" not in piped.stdout
