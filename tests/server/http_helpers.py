"""Helpers for the server tests: deterministic replicas and models in the 4 KiB "test"
profile, a synchronous bridge to httpx's in-process ASGI transport, and real server
processes on loopback (started and stopped by the tests, signalled only by their own pid)."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import blake3
import httpx
import torch

from crdt_merge.replica import Replica
from crdt_merge.store.manifests import FileRecord, Manifest, TensorRecord

PIECE_SIZE = 4096
REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def rng(seed: str) -> Callable[[int], bytes]:
    """A deterministic stand-in for os.urandom (keys and nonces)."""
    stream = blake3.blake3(seed.encode()).digest(length=4096)
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        pos += n
        return stream[pos - n:pos]

    return take


def new_project(path: Path, site: str = "alpha") -> Replica:
    return Replica.create(path, site, name="http-tests", profile="test",
                          rng=rng(f"genesis-{path.name}"))


def join(path: Path, genesis: bytes, site: str) -> Replica:
    return Replica.join(path, site, genesis, rng=rng(f"join-{site}-{path.name}"))


def cut(data: bytes, size: int = PIECE_SIZE) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def model_tensors(seed: int) -> dict[str, torch.Tensor]:
    """A small model whose tensors span many 4 KiB pieces; "embed" is the same in every
    model (shared, deduplicated pieces), the rest differs by seed."""
    g = torch.Generator().manual_seed(seed)
    return {
        "embed": torch.arange(4096, dtype=torch.float32).reshape(64, 64),  # 4 pieces, shared
        "layers.0.mlp": torch.randn(48, 64, generator=g),                 # 3 pieces
        "layers.0.attn": torch.randn(32, 96, generator=g),                # 3 pieces
        "norm": torch.randn(64, generator=g).to(torch.bfloat16),           # 1 piece
    }


def put_model(replica: Replica, seed: int, notes: str | None = None) -> str:
    """Store a model's pieces and manifest in ``replica``; return the manifest id.
    ``notes`` go into the manifest's meta (to make a manifest of a chosen size)."""
    store = replica.store
    tensors = {}
    for name, t in sorted(model_tensors(seed).items()):
        dtype = {torch.float32: "F32", torch.bfloat16: "BF16"}[t.dtype]
        ids = tuple(store.put(p) for p in cut(tensor_bytes(t)))
        tensors[name] = TensorRecord(dtype, tuple(t.shape), ids)
    config = json.dumps({"model_type": "test", "seed": seed}).encode()
    files = {"config.json": FileRecord(len(config), tuple(store.put(p) for p in cut(config)))}
    meta = {"family": "test"} if notes is None else {"family": "test", "notes": notes}
    return replica.put_manifest(Manifest(PIECE_SIZE, tensors, files, meta))


def contribute(replica: Replica, seed: int, weight: str = "1") -> str:
    """Contribute a fresh model; return the op id."""
    return replica.contribute(put_model(replica, seed), params={"weight": weight},
                              label=f"model-{seed}", family="test").id


def objects_of(replica: Replica, manifest_id: str) -> set[str]:
    return set(replica.closure([manifest_id]))


# -- a synchronous client over httpx.ASGITransport ------------------------------------------------


class _AsyncBody(httpx.AsyncByteStream):
    """Hands a synchronous request body to the async transport chunk by chunk (lazily)."""

    def __init__(self, stream: httpx.SyncByteStream) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self._stream:
            yield chunk


class ASGIBridge(httpx.BaseTransport):
    """A sync httpx transport that runs ``httpx.ASGITransport`` (in-process, no sockets) on
    an event loop in a background thread, so the synchronous HttpPeer can drive an app."""

    def __init__(self, app: Any, client: tuple[str, int] = ("127.0.0.1", 50000)) -> None:
        self._asgi = httpx.ASGITransport(app=app, client=client)
        self._portal_cm: AbstractContextManager[Any] = anyio.from_thread.start_blocking_portal()
        self._portal = self._portal_cm.__enter__()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def call() -> tuple[int, list[tuple[bytes, bytes]], bytes]:
            inner = httpx.Request(request.method, request.url, headers=request.headers,
                                  stream=_AsyncBody(request.stream))  # type: ignore[arg-type]
            response = await self._asgi.handle_async_request(inner)
            body = await response.aread()
            return response.status_code, response.headers.raw, body

        status, headers, body = self._portal.call(call)
        return httpx.Response(status, headers=headers, content=body, request=request)

    def close(self) -> None:
        self._portal_cm.__exit__(None, None, None)


# -- real server processes ------------------------------------------------------------------------


class ServerProcess:
    """``crdt-merge serve`` in a child process on 127.0.0.1 (port 0 unless given); the URL
    comes from its first line of output."""

    def __init__(self, replica_dir: Path, *args: str, port: int = 0,
                 env: dict[str, str] | None = None, argv: list[str] | None = None,
                 ca: str | None = None) -> None:
        self.dir = replica_dir
        self.ca = ca  # the CA to check an https server's certificate against
        cmd = argv or [PYTHON, "-m", "crdt_merge", "serve", str(replica_dir),
                       "--host", "127.0.0.1", "--port", str(port), *args]
        self.log = replica_dir.parent / f"{replica_dir.name}-server.log"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self._out = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._out,
                                     env=full_env, text=True, cwd=REPO)
        self.url = ""
        self._drain: threading.Thread | None = None

    def wait_ready(self, timeout: float = 60.0) -> ServerProcess:
        stdout = self.proc.stdout
        assert stdout is not None
        deadline = time.monotonic() + timeout
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        line = box[0] if box else ""
        if " on http://" not in line and " on https://" not in line:
            self.stop()
            raise RuntimeError(f"server did not start: {line!r}\n{self.log.read_text()}")
        self.url = line.rsplit(" on ", 1)[1].strip()
        # drain the rest of stdout so the child never blocks on a full pipe
        self._drain = threading.Thread(target=stdout.read, daemon=True)
        self._drain.start()
        while time.monotonic() < deadline:
            try:
                verify = ssl.create_default_context(cafile=self.ca) if self.ca else True
                if httpx.get(self.url + "/healthz", timeout=2,
                             verify=verify).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"server at {self.url} did not answer /healthz")

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def kill(self) -> None:
        """SIGKILL, by this process's own pid."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._close_pipes()

    def _close_pipes(self) -> None:
        if self._drain is not None:
            self._drain.join(timeout=10)
        if self.proc.stdout is not None and not self.proc.stdout.closed:
            self.proc.stdout.close()
        if not self._out.closed:
            self._out.close()

    def stop(self) -> None:
        """SIGTERM (a graceful stop), then SIGKILL if it lingers; both by pid."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_pipes()


def start_servers(specs: list[tuple[Path, tuple[str, ...]]]) -> list[ServerProcess]:
    """Start several servers at once (their imports overlap), then wait for each."""
    procs = [ServerProcess(d, *args) for d, args in specs]
    for p in procs:
        p.wait_ready()
    return procs


def wait_for(check: Callable[[], bool], timeout: float = 30.0, every: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(every)
    return check()


def iter_lines(path: Path) -> Iterator[str]:
    yield from path.read_text().splitlines()
