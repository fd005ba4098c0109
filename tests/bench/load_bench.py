"""Load benchmark: one server process, N client sites at once (docs/benchmarks.md "Load",
docs/reliability.md).

    .venv/bin/python tests/bench/load_bench.py                           # 8, then 16 clients, 60 s each
    .venv/bin/python tests/bench/load_bench.py --clients 8 --seconds 20  # a quicker run
    .venv/bin/python tests/bench/load_bench.py --out /tmp/load.json      # also write the JSON

The server is ``crdt-merge serve`` on a replica directory, with bearer tokens (one per
site). Each client is a process of its own holding a real replica: it joins the project
over HTTP (the genesis op from ``GET /v1/state`` and ``POST /v1/ops/fetch``), the project's
admin site admits it (``Replica.admit`` on the served directory while the server runs, as
``crdt-merge admit`` does) and it syncs until it holds its admit. Then, all clients at once
for the given time, each one loops:

- contribute a tiny model: a manifest and two 64-byte pieces, one of them its own and one
  shared by every site (so several sites upload the same object at about the same time);
- every third round, retract one of its own earlier contributions;
- push (``crdt_merge.sync.push`` over ``HttpPeer``), pull (``pull``), ``GET /v1/state``.

Every HTTP request is timed at the client's transport, from sending it to the last byte of
the answer; push, pull and the state query are timed as calls. The server's VmRSS, threads
and open file descriptors are sampled from /proc every 0.25 s.

When the time is up each client pushes what it holds; then every client syncs once more and
the run checks:

- the server's ops table holds exactly the genesis, the admits and every op a client
  authored: none lost, none extra, no id twice; nothing is left staged;
- the state root the server reports equals the root of its ops table, and every client's
  state root equals it;
- every client finished each phase within the timeout (no deadlock or hang);
- no 5xx answer, no failed request, no error in any client, no traceback in the server log;
  ``GET /v1/state`` always carried its body's state root as ETag.

Nothing is mocked. ``--threads`` runs the clients as threads of this process instead (what
tests/reliability/test_load.py does, to stay short).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import secrets
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run as a script: `tests.bench.machine` is found from the root
PYTHON = sys.executable
SHARED_VARIANTS = 256  # round i of every site uses shared tensor i % 256
RETRACT_EVERY = 3
TENSOR_ELEMENTS = 16  # 64 bytes of float32: one piece


# -- the machine ----------------------------------------------------------------------------------


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_times() -> list[int]:
    """The machine's CPU time so far, in ticks: user, nice, system, idle, iowait, irq,
    softirq, steal (the first line of /proc/stat)."""
    return [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]


def cpu_split(before: list[int], after: list[int]) -> dict[str, float]:
    """How the machine's CPUs spent the time between two :func:`cpu_times` (percent)."""
    d = [b - a for a, b in zip(before, after, strict=True)]
    total = sum(d) or 1
    return {"user": round(100 * (d[0] + d[1]) / total, 1),
            "system": round(100 * (d[2] + d[5] + d[6]) / total, 1),
            "iowait": round(100 * d[4] / total, 1), "idle": round(100 * d[3] / total, 1),
            "steal": round(100 * d[7] / total, 1)}


def machine() -> dict[str, Any]:
    from tests.bench.machine import describe

    m = describe(("crdt-model-merge", "fastapi", "starlette", "uvicorn", "httpx", "anyio",
                  "msgpack", "blake3", "cryptography", "numpy"))
    m["libraries"]["sqlite"] = m["sqlite"]
    return m


# -- timing every request at the client's transport ---------------------------------------------


def route_of(request: httpx.Request) -> str:
    path = request.url.path
    if path.startswith("/v1/pieces/") and path != "/v1/pieces/missing":
        path = "/v1/pieces/{id}"
    return f"{request.method} {path}"


class _TimedStream(httpx.SyncByteStream):
    """A response body that reports, once, when it is closed (after its last byte was read)."""

    def __init__(self, inner: httpx.SyncByteStream, done: Callable[[], None]) -> None:
        self._inner, self._done = inner, done
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        yield from self._inner

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._inner.close()
        finally:
            self._done()


class TimedTransport(httpx.HTTPTransport):
    """An HTTP transport that records ``(route, status, seconds)`` per request; status 0
    when the connection failed."""

    def __init__(self, record: Callable[[str, int, float], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._record = record

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        route = route_of(request)
        start = time.perf_counter()
        try:
            response = super().handle_request(request)
        except httpx.TransportError:
            self._record(route, 0, time.perf_counter() - start)
            raise
        status = response.status_code
        inner = response.stream
        assert isinstance(inner, httpx.SyncByteStream)
        response.stream = _TimedStream(
            inner, lambda: self._record(route, status, time.perf_counter() - start))
        return response


# -- one client site ------------------------------------------------------------------------------


def tiny_contribution(replica: Any, seed: int, round_: int) -> Any:
    """Contribute a tiny model to ``replica`` and return the op: a manifest, one 64-byte
    piece of this site's own (from ``seed`` and ``round_``) and one 64-byte piece that every
    site contributes in the same round (so several sites upload that object at once)."""
    from crdt_merge.store.manifests import Manifest, TensorRecord

    own = np.random.default_rng([seed, round_])
    shared = np.random.default_rng([20261124, round_ % SHARED_VARIANTS])
    tensors = {}
    for name, gen in (("own", own), ("shared", shared)):
        values = gen.standard_normal(TENSOR_ELEMENTS, dtype=np.float32)
        piece = replica.store.put(values.tobytes())
        tensors[name] = TensorRecord("F32", (TENSOR_ELEMENTS,), (piece,))
    manifest = replica.put_manifest(Manifest(replica.piece_size, tensors, {}, {"family": "test"}))
    return replica.contribute(manifest, params={"weight": "1"},
                              label=f"{replica.site}-{round_}", family="test")


@dataclass(frozen=True)
class ClientConfig:
    url: str
    token: str
    directory: str
    site: str
    seed: int
    seconds: float
    timeout: float = 60.0


class LoadClient:
    """A client site: a replica of its own, an ``HttpPeer`` to the server and a plain httpx
    client for the state query, both on timed transports."""

    def __init__(self, cfg: ClientConfig) -> None:
        from crdt_merge.sync.http import HttpPeer

        self.cfg = cfg
        self.requests: list[tuple[str, int, float]] = []
        self.calls: dict[str, list[float]] = {"push": [], "pull": [], "state": []}
        self.errors: list[str] = []
        self.authored: list[str] = []
        self.live: list[str] = []  # own contributions not retracted yet
        self.rounds = 0
        self.contributions = 0
        self.retracts = 0
        self.etag_mismatches = 0
        self.rejected: dict[str, str] = {}
        self.rng = random.Random(cfg.seed)
        self.replica: Any = None
        limits = httpx.Limits(max_connections=4, max_keepalive_connections=4)
        self.peer = HttpPeer(cfg.url, cfg.token, workers=2, timeout=cfg.timeout,
                             transport=TimedTransport(self._record, limits=limits))
        self.http = httpx.Client(
            base_url=cfg.url, timeout=cfg.timeout,
            headers={"Authorization": f"Bearer {cfg.token}", "Accept": "application/json"},
            transport=TimedTransport(self._record, limits=httpx.Limits(max_connections=1)))

    def _record(self, route: str, status: int, seconds: float) -> None:
        self.requests.append((route, status, seconds))

    def close(self) -> None:
        self.peer.close()
        self.http.close()
        if self.replica is not None:
            self.replica.close()

    # -- phases ----------------------------------------------------------------------------

    def join(self) -> bytes:
        """Join the project over HTTP; return this site's public key (for the admin)."""
        from crdt_merge.replica import Replica

        genesis = self.peer.get_ops([self.peer.state().genesis])[0]
        self.replica = Replica.join(self.cfg.directory, self.cfg.site, genesis)
        return self.replica.public_key

    def wait_admitted(self) -> None:
        from crdt_merge.errors import UnknownSite
        from crdt_merge.sync import sync

        deadline = time.monotonic() + self.cfg.timeout
        while True:
            sync(self.replica, self.peer)
            try:
                self.replica.membership()
                return
            except UnknownSite:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def run(self, seconds: float) -> None:
        from crdt_merge.sync import pull, push

        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._step("author", self.author)
            self._timed("push", lambda: self._check(push(self.replica, self.peer)))
            self._timed("pull", lambda: self._check(pull(self.replica, self.peer)))
            self._timed("state", self.state)
            self.rounds += 1

    def flush(self) -> None:
        """Push until a push goes through (everything this site authored is sent)."""
        from crdt_merge.sync import push

        self._retry("final push", lambda: self._check(push(self.replica, self.peer)))

    def final_sync(self) -> None:
        from crdt_merge.sync import sync

        self._retry("final sync", lambda: self._check(sync(self.replica, self.peer)))

    # -- what a round does -------------------------------------------------------------------

    def author(self) -> None:
        r = self.replica
        op = tiny_contribution(r, self.cfg.seed, self.rounds)
        self.authored.append(op.id)
        self.live.append(op.id)
        self.contributions += 1
        if self.rounds % RETRACT_EVERY == RETRACT_EVERY - 1 and len(self.live) > 1:
            target = self.live.pop(self.rng.randrange(len(self.live) - 1))  # not the newest
            self.authored.append(r.retract([target]).id)
            self.retracts += 1

    def state(self) -> None:
        response = self.http.get("/v1/state")
        response.raise_for_status()
        if response.headers.get("etag") != f'"{response.json()["state_root"]}"':
            self.etag_mismatches += 1

    # -- bookkeeping -------------------------------------------------------------------------

    def _check(self, stats: Any) -> None:
        self.rejected.update(stats.rejected)
        self.rejected.update(self.peer.rejected)

    def _step(self, name: str, work: Callable[[], None]) -> bool:
        try:
            work()
        except Exception as exc:  # counted, reported; the load goes on
            self.errors.append(f"{name}: {type(exc).__name__}: {exc}")
            time.sleep(0.05)
            return False
        return True

    def _timed(self, name: str, work: Callable[[], None]) -> None:
        start = time.perf_counter()
        if self._step(name, work):
            self.calls[name].append(time.perf_counter() - start)

    def _retry(self, name: str, work: Callable[[], None], attempts: int = 5) -> None:
        for _ in range(attempts):
            if self._step(name, work):
                return
            time.sleep(0.5)
        raise RuntimeError(f"{self.cfg.site}: {name} failed {attempts} times: {self.errors[-1]}")

    def summary(self) -> dict[str, Any]:
        return {"site": self.cfg.site, "authored": list(self.authored), "rounds": self.rounds,
                "contributions": self.contributions, "retracts": self.retracts}

    def result(self) -> dict[str, Any]:
        r = self.replica
        return {**self.summary(), "requests": self.requests, "calls": self.calls,
                "errors": self.errors, "rejected": self.rejected,
                "etag_mismatches": self.etag_mismatches, "state_root": r.state_root(),
                "ops": len(r.ops()), "staged": len(r.store.staged_rows())}


def client_main(cfg: ClientConfig, conn: Connection) -> None:
    """A client's life, driven by the parent over ``conn``: joined -> (admitted) -> ready ->
    (start) -> pushed -> (final) -> done. Any failure is sent as ("failed", traceback)."""
    client = None
    try:
        client = LoadClient(cfg)
        conn.send(("joined", client.join()))
        _expect(conn, "admitted")
        client.wait_admitted()
        conn.send(("ready", None))
        _expect(conn, "start")
        client.run(cfg.seconds)
        client.flush()
        conn.send(("pushed", client.summary()))
        _expect(conn, "final")
        client.final_sync()
        conn.send(("done", client.result()))
    except Exception:
        try:
            conn.send(("failed", traceback.format_exc()))
        except OSError:
            pass  # the parent is gone
    finally:
        if client is not None:
            client.close()
        conn.close()


def _expect(conn: Connection, word: str) -> None:
    got = conn.recv()
    if got != word:
        raise RuntimeError(f"expected {word!r} from the parent, got {got!r}")


class Handle:
    """The parent's side of one client (a process, or a thread with ``threads=True``)."""

    def __init__(self, cfg: ClientConfig, threads: bool) -> None:
        self.cfg = cfg
        self.conn, child = multiprocessing.Pipe()
        self.problem: str | None = None
        self.runner: threading.Thread | multiprocessing.process.BaseProcess
        if threads:
            self.runner = threading.Thread(target=client_main, args=(cfg, child), daemon=True,
                                           name=f"load-{cfg.site}")
            self.runner.start()
        else:
            self.runner = multiprocessing.get_context("spawn").Process(
                target=client_main, args=(cfg, child), name=f"load-{cfg.site}")
            self.runner.start()
            child.close()

    def send(self, word: str) -> None:
        if self.problem is None:
            self.conn.send(word)

    def expect(self, kind: str, deadline: float) -> Any:
        """The payload of the next message, which must be ``kind``; None (and a problem
        noted) when it fails or does not come before ``deadline`` (a hang)."""
        if self.problem is not None:
            return None
        try:
            if self.conn.poll(max(0.0, deadline - time.monotonic())):
                got, payload = self.conn.recv()
                if got == kind:
                    return payload
                self.problem = f"{got} while waiting for {kind}: {payload}"
            else:
                self.problem = f"no {kind!r} before the timeout (hung)"
        except (EOFError, OSError) as exc:
            self.problem = f"connection lost while waiting for {kind}: {exc!r}"
        return None

    def stop(self) -> None:
        self.runner.join(timeout=15)
        if isinstance(self.runner, threading.Thread):
            if self.runner.is_alive() and self.problem is None:
                self.problem = "thread did not end"
        elif self.runner.is_alive():
            pid = self.runner.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)  # our own child, by pid
            self.runner.join(timeout=15)
            if self.problem is None:
                self.problem = "process did not end"
        self.conn.close()


# -- the server and its memory --------------------------------------------------------------------


class Server:
    """``crdt-merge serve DIR`` on 127.0.0.1, a free port, with a token file."""

    def __init__(self, directory: Path, token_file: Path, log: Path) -> None:
        self.log = log
        self._log = open(log, "w")
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "crdt_merge", "serve", str(directory), "--host", "127.0.0.1",
             "--port", "0", "--token-file", str(token_file)],
            stdout=subprocess.PIPE, stderr=self._log, text=True, cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if " on http://" not in line:
            self.stop()
            raise RuntimeError(f"the server did not start: {line!r}\n{log.read_text()}")
        self.url = line.rsplit(" on ", 1)[1].strip()
        self._drain = threading.Thread(target=self.proc.stdout.read, daemon=True)
        self._drain.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers; both by its pid."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)
        if getattr(self, "_drain", None) is not None:
            self._drain.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()

    def log_problems(self) -> list[str]:
        return [line for line in self.log.read_text().splitlines()
                if "Traceback" in line or "ERROR" in line or "Exception" in line]


class Sampler(threading.Thread):
    """Samples a process's VmRSS, VmHWM, threads, open descriptors and CPU time (user +
    system) every ``every`` s."""

    def __init__(self, pid: int, every: float = 0.25) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.pid, self.every = pid, every
        # (monotonic time, VmRSS KiB, VmHWM KiB, threads, descriptors, CPU seconds)
        self.samples: list[tuple[float, int, int, int, int, float]] = []
        self.marks: dict[str, float] = {}
        self._halt = threading.Event()

    def sample(self) -> None:
        try:
            fields = {}
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                fields[key] = value.split()[0] if value.split() else ""
            fds = len(os.listdir(f"/proc/{self.pid}/fd"))
            stat = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            return
        cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        self.samples.append((time.monotonic(), int(fields["VmRSS"]), int(fields["VmHWM"]),
                             int(fields["Threads"]), fds, cpu))

    def run(self) -> None:
        self.sample()
        while not self._halt.wait(self.every):
            self.sample()

    def mark(self, name: str) -> None:
        self.sample()
        self.marks[name] = time.monotonic()

    def halt(self) -> None:
        self._halt.set()
        self.join(timeout=10)
        self.sample()


# -- statistics -----------------------------------------------------------------------------------


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p95/p99/max in milliseconds (nearest rank) and the count."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def rank(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, int(np.ceil(p / 100 * len(ordered))) - 1))]

    return {"n": len(ordered), "p50": round(rank(50) * 1000, 2), "p95": round(rank(95) * 1000, 2),
            "p99": round(rank(99) * 1000, 2), "max": round(ordered[-1] * 1000, 2)}


def memory(sampler: Sampler, ops_during_load: int) -> dict[str, Any]:
    """Peak RSS, RSS at each phase, and how RSS moved during the load (a least-squares
    slope, and the growth per 1000 ops the server committed); the server's CPU use during
    the load (100% is one core)."""
    s = sampler.samples
    mib = 1024
    start, end = sampler.marks["load"], sampler.marks["final"]
    during = [(t, rss) for t, rss, *_ in s if start <= t <= end]

    def at(when: float) -> tuple[float, ...]:
        return min(s, key=lambda row: abs(row[0] - when))

    def rss_at(when: float) -> float:
        return at(when)[1] / mib

    out: dict[str, Any] = {
        "samples": len(s), "peak_rss_mib": round(max(row[1] for row in s) / mib, 1),
        "vm_hwm_mib": round(s[-1][2] / mib, 1),
        "rss_before_load_mib": round(rss_at(start), 1),
        "rss_mid_load_mib": round(rss_at((start + end) / 2), 1),
        "rss_end_load_mib": round(rss_at(end), 1), "rss_end_mib": round(s[-1][1] / mib, 1),
        "threads_max": max(row[3] for row in s), "fds_before_load": min(
            (row for row in s if row[0] >= start), key=lambda row: row[0])[4],
        "fds_max": max(row[4] for row in s), "fds_end": s[-1][4],
        "cpu_percent_during_load": round((at(end)[5] - at(start)[5]) / (end - start) * 100),
    }
    if len(during) >= 3:
        t = np.array([row[0] - start for row in during])
        y = np.array([row[1] / mib for row in during])
        out["slope_mib_per_min"] = round(float(np.polyfit(t, y, 1)[0]) * 60, 2)
        half = len(during) // 2
        out["growth_first_half_mib"] = round(float(y[half] - y[0]), 1)
        out["growth_second_half_mib"] = round(float(y[-1] - y[half]), 1)
    if ops_during_load:
        out["growth_mib_per_1k_ops"] = round(
            (rss_at(end) - rss_at(start)) / (ops_during_load / 1000), 2)
    return out


def server_tables(directory: Path) -> dict[str, Any]:
    """The server's ops table read straight from its SQLite file."""
    from crdt_merge.hashing import state_root

    with closing(sqlite3.connect(directory / "replica.sqlite", timeout=30)) as db:
        ids = [row[0] for row in db.execute("SELECT id FROM ops")]
        rows, distinct = db.execute("SELECT count(*), count(DISTINCT id) FROM ops").fetchone()
        staged = db.execute("SELECT count(*) FROM staged").fetchone()[0]
    return {"ids": set(ids), "rows": rows, "distinct": distinct, "staged": staged,
            "root": state_root(ids)}


def server_state(url: str, token: str) -> dict[str, Any]:
    response = httpx.get(url + "/v1/state", headers={"Authorization": f"Bearer {token}",
                                                      "Accept": "application/json"}, timeout=60)
    response.raise_for_status()
    return response.json()


# -- one run ---------------------------------------------------------------------------------------


def site_name(i: int) -> str:
    return f"site-{i:02d}"


def run_load(clients: int, seconds: float, work: Path, *, threads: bool = False,
             timeout: float = 120.0) -> dict[str, Any]:
    """One server, ``clients`` client sites for ``seconds``; returns the report (see the
    module docstring). ``timeout`` bounds each phase beyond the load itself."""
    from crdt_merge.replica import Replica

    work.mkdir(parents=True, exist_ok=True)
    tokens = {"origin": secrets.token_hex(16)}
    tokens.update({site_name(i): secrets.token_hex(16) for i in range(clients)})
    token_file = work / "tokens"
    token_file.write_text("".join(f"{site} {'admin' if site == 'origin' else 'contribute'} "
                                  f"{token}\n" for site, token in tokens.items()))
    server_dir = work / "server"
    with Replica.create(server_dir, "origin", name="load", profile="test") as origin:
        expected = {origin.genesis_id}
    load_before = load_average()
    server = Server(server_dir, token_file, work / "server.log")
    sampler = Sampler(server.pid)
    sampler.start()
    handles: list[Handle] = []
    try:
        for i in range(clients):
            site = site_name(i)
            handles.append(Handle(ClientConfig(server.url, tokens[site], str(work / site), site,
                                               seed=1000 + i, seconds=seconds), threads))
        deadline = time.monotonic() + timeout
        keys = {h.cfg.site: h.expect("joined", deadline) for h in handles}
        with Replica.open(server_dir) as origin:
            for site, key in keys.items():
                if key is not None:
                    expected.add(origin.admit(site, key).id)
        for h in handles:
            h.send("admitted")
        deadline = time.monotonic() + timeout
        for h in handles:
            h.expect("ready", deadline)
        setup_problems = {h.cfg.site: h.problem for h in handles if h.problem}
        if setup_problems:
            raise RuntimeError(f"clients failed to join: {setup_problems}")

        sampler.mark("load")
        cpu_before = cpu_times()
        ops_before = server_state(server.url, tokens["origin"])["ops"]
        start = time.monotonic()
        for h in handles:
            h.send("start")
        deadline = start + seconds + timeout
        pushed = {h.cfg.site: h.expect("pushed", deadline) for h in handles}
        load_seconds = time.monotonic() - start
        sampler.mark("final")
        cpu_during = cpu_split(cpu_before, cpu_times())
        load_after = load_average()
        ops_after_load = server_state(server.url, tokens["origin"])["ops"]

        for h in handles:
            h.send("final")
        deadline = time.monotonic() + timeout
        results = [r for r in (h.expect("done", deadline) for h in handles) if r is not None]
        sampler.mark("done")
        served = server_state(server.url, tokens["origin"])
        table = server_tables(server_dir)
    finally:
        for h in handles:
            h.stop()
        sampler.halt()
        server.stop()

    problems = {h.cfg.site: h.problem for h in handles if h.problem}
    authored = [op for p in pushed.values() if p for op in p["authored"]]
    expected.update(authored)
    requests = [req for r in results for req in r["requests"]]
    by_route: dict[str, list[float]] = {}
    statuses: dict[str, int] = {}
    for route, status, took in requests:
        by_route.setdefault(route, []).append(took)
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    calls = {name: [x for r in results for x in r["calls"][name]] for name in ("push", "pull",
                                                                                "state")}
    done_pushing = [p for p in pushed.values() if p]
    rounds = sum(p["rounds"] for p in done_pushing)
    roots = {r["site"]: r["state_root"] for r in results}
    invariants = {
        "finished": not problems and len(results) == clients, "problems": problems,
        "lost": sorted(expected - table["ids"]), "extra": sorted(table["ids"] - expected),
        "authored_twice": len(authored) - len(set(authored)),
        "duplicate_rows": table["rows"] - table["distinct"], "staged_left": table["staged"],
        "server_root_is_table_root": served["state_root"] == table["root"],
        "client_roots_equal_server": bool(roots) and set(roots.values()) == {served["state_root"]},
        "clients_off_root": sorted(s for s, root in roots.items() if root != served["state_root"]),
        "responses_5xx": sum(n for code, n in statuses.items() if code.startswith("5")),
        "failed_requests": statuses.get("0", 0),
        "client_errors": [e for r in results for e in r["errors"]][:20],
        "client_error_count": sum(len(r["errors"]) for r in results),
        "rejected": {k: v for r in results for k, v in r["rejected"].items()},
        "etag_mismatches": sum(r["etag_mismatches"] for r in results),
        "server_log_problems": server.log_problems()[:20],
    }
    invariants["ok"] = (invariants["finished"] and not invariants["lost"]
                        and not invariants["extra"] and not invariants["authored_twice"]
                        and not invariants["duplicate_rows"] and not invariants["staged_left"]
                        and invariants["server_root_is_table_root"]
                        and invariants["client_roots_equal_server"]
                        and not invariants["responses_5xx"] and not invariants["failed_requests"]
                        and not invariants["client_error_count"] and not invariants["rejected"]
                        and not invariants["etag_mismatches"]
                        and not invariants["server_log_problems"])
    return {
        "clients": clients, "mode": "threads" if threads else "processes",
        "seconds": seconds, "load_seconds": round(load_seconds, 2),
        "loadavg_before": load_before, "loadavg_after_load": load_after,
        "machine_cpu_during_load_percent": cpu_during,
        "throughput": {
            "ops_authored": len(authored),
            "contributions": sum(p["contributions"] for p in done_pushing),
            "retracts": sum(p["retracts"] for p in done_pushing),
            "ops_per_s": round(len(authored) / load_seconds, 1),
            "server_ops_committed_during_load": ops_after_load - ops_before,
            "requests": len(requests), "requests_per_s": round(len(requests) / load_seconds, 1),
            "rounds_per_s": round(rounds / load_seconds, 1),
            "ops_at_end": served["ops"],
        },
        "latency_ms": {
            "push": percentiles(calls["push"]), "pull": percentiles(calls["pull"]),
            "state": percentiles(calls["state"]),
            "all_requests": percentiles([took for _, _, took in requests]),
            "by_route": {route: percentiles(v) for route, v in sorted(by_route.items())},
        },
        "statuses": dict(sorted(statuses.items())),
        "server_memory": memory(sampler, ops_after_load - ops_before),
        "invariants": invariants,
    }


# -- output ----------------------------------------------------------------------------------------


def table(runs: list[dict[str, Any]]) -> str:
    """A markdown table: one row per run."""
    def lat(p: dict[str, float]) -> str:
        return f"{p['p50']:.0f} / {p['p95']:.0f} / {p['p99']:.0f} / {p['max']:.0f}" if p["n"] else "-"

    head = ("| clients | load s | ops | ops/s | requests/s | push ms p50/p95/p99/max "
            "| pull ms p50/p95/p99/max | GET state ms p50/p95/p99/max "
            "| all requests ms p50/p95/p99/max | server RSS before -> end, peak MiB "
            "| server CPU | loadavg before / after | invariants |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in runs:
        t, lat_ms, m = r["throughput"], r["latency_ms"], r["server_memory"]
        rows.append(
            f"| {r['clients']} | {r['load_seconds']:.0f} | {t['ops_authored']} | {t['ops_per_s']} "
            f"| {t['requests_per_s']} | {lat(lat_ms['push'])} | {lat(lat_ms['pull'])} "
            f"| {lat(lat_ms['state'])} | {lat(lat_ms['all_requests'])} "
            f"| {m['rss_before_load_mib']} -> {m['rss_end_load_mib']}, {m['peak_rss_mib']} "
            f"| {m['cpu_percent_during_load']}% | {r['loadavg_before']} / {r['loadavg_after_load']} "
            f"| {'ok' if r['invariants']['ok'] else 'FAILED'} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[8, 16])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds each phase may take beyond the load before a client counts "
                        "as hung")
    p.add_argument("--threads", action="store_true", help="client threads, not processes")
    p.add_argument("--dir", help="work directory (default: a new temporary one)")
    p.add_argument("--out", help="also write the JSON report here")
    args = p.parse_args()
    import tempfile

    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="load-bench-"))
    report: dict[str, Any] = {"machine": machine(), "loadavg_at_start": load_average(),
                              "command": " ".join([Path(PYTHON).name, *sys.argv]), "runs": []}
    for n in args.clients:
        run = run_load(n, args.seconds, base / f"clients-{n}", threads=args.threads,
                       timeout=args.timeout)
        report["runs"].append(run)
        print(f"{n} clients: {'ok' if run['invariants']['ok'] else 'FAILED'}", file=sys.stderr)
    report["table"] = table(report["runs"])
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(report["table"])
    print()
    print(text)
    if not all(r["invariants"]["ok"] for r in report["runs"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
