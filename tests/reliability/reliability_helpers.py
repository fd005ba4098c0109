"""Helpers for the reliability tests: servers and clients that die at a crash point, what a
replica directory must look like after such a death, and a proxy that damages responses.

Processes are real (``crdt-merge serve``/``sync`` or the small drivers next to this file) and
talk HTTP over loopback; every process is started here and signalled only by its own pid.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import blake3
import httpx

from crdt_merge import maintenance
from crdt_merge.replica import Replica
from crdt_merge.store.objects import ObjectFiles
from tests.server.http_helpers import (
    PYTHON,
    REPO,
    put_model,
    wait_for,
)

HERE = Path(__file__).resolve().parent
PACKAGE = HERE.parents[1] / "crdt_merge"

#: every crash point of crdt_merge.store (crashpoint(NAME) calls), in the order a write
#: meets them
CRASH_POINTS = ["piece.mid_stream", "piece.before_fsync", "piece.after_fsync",
                "piece.after_rename", "piece.before_index", "op.before_commit",
                "ops.after_first_insert"]


def crash_points_in_code() -> set[str]:
    found: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        found.update(re.findall(r"""crashpoint\(\s*["']([^"']+)["']\s*\)""", path.read_text()))
    return found


# -- models --------------------------------------------------------------------------------------


def padded_model(replica: Replica, seed: int, pad: int = 160_000) -> str:
    """Store a model (http_helpers' tensors, 4 KiB pieces) whose manifest carries ``pad``
    bytes of notes in its meta, so that the manifest crosses the wire in several chunks (a
    transfer killed after its first chunk leaves a real prefix). Returns the manifest id."""
    return put_model(replica, seed, blake3.blake3(f"notes-{seed}".encode()).hexdigest(length=pad // 2))


def contribute_padded(replica: Replica, seed: int, pad: int = 160_000) -> str:
    """Contribute a :func:`padded_model`; return the op id."""
    return replica.contribute(padded_model(replica, seed, pad), params={"weight": "1"},
                              label=f"padded-{seed}", family="test").id


# -- processes -------------------------------------------------------------------------------------


class Proc:
    """A server or CLI process started by a :class:`Launcher` (signalled only by its pid)."""

    def __init__(self, pid: int, out: Path, err: Path, armed_file: Path | None = None) -> None:
        self.pid, self.out, self.err, self.armed_file = pid, out, err, armed_file
        self.url = ""
        self.returncode: int | None = None

    def _wait(self, timeout: float) -> int | None:
        raise NotImplementedError

    def wait(self, timeout: float = 120.0) -> int | None:
        """The return code (minus the signal number when killed); None if still running."""
        if self.returncode is None:
            self.returncode = self._wait(timeout)
        return self.returncode

    def log(self) -> str:
        return (self.out.read_text(errors="replace") + self.err.read_text(errors="replace")
                if self.out.exists() and self.err.exists() else "")

    def wait_ready(self, timeout: float = 60.0) -> Proc:
        """Wait for a server's first line (its URL) and its /healthz."""
        def announced() -> bool:
            text = self.out.read_text() if self.out.exists() else ""
            for line in text.splitlines():
                if " on http://" in line:
                    self.url = line.rsplit(" on ", 1)[1].strip()
                    return True
            return self.wait(0) is not None

        assert wait_for(announced, timeout, every=0.02) and self.url, self.log()

        def healthy() -> bool:
            try:
                return httpx.get(self.url + "/healthz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        assert wait_for(healthy, timeout, every=0.02), self.log()
        return self

    def arm(self) -> None:
        """Arm a server's crash point (SIGUSR1; see procs.py) and wait until it is."""
        assert self.armed_file is not None
        os.kill(self.pid, signal.SIGUSR1)
        assert wait_for(self.armed_file.exists, timeout=20, every=0.02), "not armed"

    def stop(self) -> None:
        """SIGTERM (a graceful stop), then SIGKILL if it lingers; both by this pid."""
        if self.wait(0) is None:
            os.kill(self.pid, signal.SIGTERM)
            if self.wait(20) is None:
                os.kill(self.pid, signal.SIGKILL)
                self.wait(20)


class _ForkedProc(Proc):
    def __init__(self, forks: _ForkServer, *args: Any) -> None:
        super().__init__(*args)
        self._forks = forks

    def _wait(self, timeout: float) -> int | None:
        return self._forks.request({"op": "wait", "pid": self.pid, "timeout": timeout})[
            "returncode"]


class _ExecProc(Proc):
    def __init__(self, popen: subprocess.Popen[bytes], *args: Any) -> None:
        super().__init__(popen.pid, *args)
        self._popen = popen

    def _wait(self, timeout: float) -> int | None:
        try:
            return self._popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None


class _ForkServer:
    """Client of ``procs.py forkserver``."""

    def __init__(self, log: Path) -> None:
        self._log = open(log, "wb")
        self.proc = subprocess.Popen([PYTHON, str(HERE / "procs.py"), "forkserver"], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True)
        self._lock = threading.Lock()

    def request(self, value: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with self._lock:
            self.proc.stdin.write(json.dumps(value) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        assert line, "the fork server died"
        return json.loads(line)

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.proc.stdout.close()
        self._log.close()


class Launcher:
    """Starts the crash tests' processes, either forked from a warm fork server (``fork``:
    milliseconds each, the default run) or as fresh programs (``exec``: ``python -m
    crdt_merge serve``/``sync`` themselves where nothing needs arming, the drivers in
    procs.py otherwise). Every process it started is stopped by :meth:`close`."""

    def __init__(self, mode: str, workdir: Path) -> None:
        assert mode in ("fork", "exec")
        self.mode, self.workdir = mode, workdir
        self._forks = _ForkServer(workdir / "forkserver.log") if mode == "fork" else None
        self._procs: list[Proc] = []
        self._n = 0

    def _start(self, kind: str, args: list[str], genuine: list[str] | None,
               env: dict[str, str], armed_file: Path | None = None) -> Proc:
        self._n += 1
        out = self.workdir / f"{self._n}-{kind}.out"
        err = self.workdir / f"{self._n}-{kind}.err"
        proc: Proc
        if self._forks is not None:
            pid = self._forks.request({"op": "start", "kind": kind, "args": args,
                                       "stdout": str(out), "stderr": str(err), "env": env,
                                       "cwd": str(REPO)})["pid"]
            proc = _ForkedProc(self._forks, pid, out, err, armed_file)
        else:
            argv = genuine or [PYTHON, str(HERE / "procs.py"), kind, *args]
            with open(out, "wb") as o, open(err, "wb") as e:
                popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=o, stderr=e,
                                         env=env, cwd=REPO)
            proc = _ExecProc(popen, out, err, armed_file)
        self._procs.append(proc)
        return proc

    @staticmethod
    def _env(**extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "CRDT_MERGE_CRASH_AT"}
        env["PYTHONUNBUFFERED"] = "1"
        return {**env, **extra}

    def server(self, replica_dir: Path, point: str | None = None,
               sabotage: str | None = None) -> Proc:
        """A server for ``replica_dir`` on a free loopback port (ready when this returns);
        with ``point``, :meth:`Proc.arm` arms that crash point."""
        serve_args = [str(replica_dir), "--host", "127.0.0.1", "--port", "0"]
        own: list[str] = []
        armed_file = None
        if point:
            armed_file = self.workdir / f"{self._n + 1}.armed"
            own += ["--crash-point", point, "--armed-file", str(armed_file)]
        if sabotage:
            own += ["--sabotage", sabotage]
        genuine = None if own else [PYTHON, "-m", "crdt_merge", "serve", *serve_args]
        return self._start("serve", [*own, "--", *serve_args], genuine, self._env(),
                           armed_file).wait_ready()

    def cli(self, cli_args: list[str], point: str, after: int = 0) -> Proc:
        """``crdt-merge CLI_ARGS`` that SIGKILLs itself at ``point`` once ``after`` objects
        were stored (0: at the first time it gets there)."""
        genuine = [PYTHON, "-m", "crdt_merge", *cli_args] if after == 0 else None
        env = self._env(CRDT_MERGE_CRASH_AT=point) if genuine else self._env()
        return self._start("cli", ["--crash-point", point, "--after", str(after), "--",
                                   *cli_args], genuine, env)

    def close(self) -> None:
        for proc in self._procs:
            proc.stop()
        if self._forks is not None:
            self._forks.close()


# -- what a replica holds after a crash ------------------------------------------------------------


@dataclass
class Aftermath:
    """A replica directory as a killed process left it, and as it reopened."""

    dead_tmp: list[str]        # temp files (``*.tmp``) found before it reopened
    parts: dict[str, int]      # object id -> bytes kept in tmp/<id>.part (for resuming)
    files: set[str]            # whole, verified files under objects/ (by name)
    indexed: set[str]          # objects the index holds, after reopening
    ops: set[str]
    staged: set[str]

    @property
    def arrived(self) -> set[str]:
        """Objects whose bytes are all here: indexed, or whole and verified in objects/."""
        return self.indexed | self.files


def inspect_after_crash(path: Path, truth: Callable[[str], bytes] | None = None) -> Aftermath:
    """Check what must hold in a replica directory after its process was SIGKILLed, and
    return what is there. Before it is reopened: every file under objects/ hashes to its name
    (never a torn or unverified object visible), every part file is a prefix of its object's
    true bytes (``truth``; with None, part files are not allowed), and tmp/ holds nothing
    else. After reopening: no temp file of the dead process is left (part files stay, to
    resume), every indexed object is a whole verified file, and fsck is clean."""
    files: set[str] = set()
    for f in sorted((path / "objects").rglob("*")):
        if f.is_file():
            assert blake3.blake3(f.read_bytes()).hexdigest() == f.name, f"torn object file {f}"
            assert f.parent.name == f.name[:2], f"object file in the wrong place: {f}"
            files.add(f.name)
    names = sorted(p.name for p in (path / "tmp").iterdir())
    dead_tmp = [n for n in names if n.endswith(".tmp")]
    parts: dict[str, int] = {}
    for name in names:
        if name.endswith(".part"):
            assert truth is not None, f"unexpected part file {name}"
            object_id = name[:-len(".part")]
            data = (path / "tmp" / name).read_bytes()
            assert truth(object_id).startswith(data), f"part file {name} is not a prefix"
            parts[object_id] = len(data)
    assert set(names) == set(dead_tmp) | {f"{o}.part" for o in parts}, names
    with Replica.open(path) as r:
        left = sorted(p.name for p in (path / "tmp").iterdir() if not p.name.endswith(".part"))
        assert left == [], f"temp files left after reopening: {left}"
        report = maintenance.fsck(r)
        assert report["ok"] and not report["wanted"], report
        indexed = set(r.store.object_ids())
        assert indexed <= files
        ops = set(r.op_ids())
        staged = {op_id for op_id, _ in r.store.staged_rows()}
    return Aftermath(dead_tmp, parts, files, indexed, ops, staged)


def truth_of(replica_dir: Path) -> Callable[[str], bytes]:
    """Read objects (verified) from another replica's files: what the bytes must be."""
    files = ObjectFiles(replica_dir)
    return files.read


# -- a proxy that damages one object's responses ---------------------------------------------------


class TamperingProxy:
    """An HTTP/1.1 proxy on 127.0.0.1 in front of ``upstream`` that forwards every request
    and damages the answers for the object ``target`` (``GET /v1/pieces/<target>``):

    - ``flip``: same status, same length, one byte changed;
    - ``cut``: the full ``Content-Length`` is announced, half the body is sent, then the
      connection is closed;
    - ``short``: a complete answer whose body (and ``Content-Length``) lacks its last 100
      bytes.

    ``served`` counts the damaged answers sent.
    """

    def __init__(self, upstream: str, mode: str, target: str) -> None:
        assert mode in ("flip", "cut", "short")
        self.upstream = urlsplit(upstream)
        self.mode, self.target = mode, target
        self.served = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                proxy._forward(self)

            do_POST = do_PUT = do_GET

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a client that went away mid-answer is expected here

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _forward(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else None
        headers = {k: v for k, v in h.headers.items()
                   if k.lower() not in ("host", "connection", "keep-alive", "content-length")}
        conn = HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            conn.request(h.command, h.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            status, reason = response.status, response.reason
            answer = [(k, v) for k, v in response.getheaders()
                      if k.lower() not in ("content-length", "connection", "keep-alive",
                                           "transfer-encoding", "date", "server")]
        finally:
            conn.close()
        damaged = (h.command == "GET" and h.path == f"/v1/pieces/{self.target}"
                   and status in (200, 206) and len(data) > 100)
        send, declared = data, len(data)
        if damaged:
            with self._lock:
                self.served += 1
            if self.mode == "flip":
                i = len(data) // 2
                send = data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1:]
                declared = len(send)
            elif self.mode == "cut":
                send = data[:len(data) // 2]
            else:
                send = data[:-100]
                declared = len(send)
        h.send_response(status, reason)
        for k, v in answer:
            h.send_header(k, v)
        h.send_header("Content-Length", str(declared))
        h.end_headers()
        h.wfile.write(send)
        h.wfile.flush()
        if damaged and self.mode == "cut":
            h.close_connection = True
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
