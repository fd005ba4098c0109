"""HTTP sync benchmark (docs/benchmarks.md, section "HTTP sync").

    .venv/bin/python tests/bench/sync_bench.py                  # 1 GiB donor, v1 profile
    .venv/bin/python tests/bench/sync_bench.py --size-mib 256   # a quicker run

Measures, in one run, on loopback:

1. Throughput: server B pulls a new 1 GiB donor from crdt_merge_server A (``POST /v1/sync`` on B: B's
   anti-entropy client fetches the op, the manifest and every 16 MiB piece, verifies each
   and stores it durably) against a plain download of the same safetensors file through
   the same stack (uvicorn + Starlette's FileResponse, an httpx client writing the file and
   fsyncing it). Reported as the ratio of the two times (target >= 0.70).
2. Bytes on the wire against the bytes B was missing (target <= 1.01x): HTTP heads and
   bodies as B's client counted them, and the loopback interface's byte counter.
3. Reconciliation of 10^4 and 10^5 op ids differing in 1 and 100: round trips and bytes,
   against sending the plain id list (the pure protocol of crdt_merge.sync.reconcile, the
   exact messages the server answers; op ids are BLAKE3 hashes, so uniform random ids).

The servers run as separate processes (``crdt-merge serve``); nothing here is mocked.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run as a script: `tests.bench.machine` is found from the root
PYTHON = sys.executable


def machine() -> dict[str, Any]:
    from tests.bench.machine import describe

    return describe(("crdt-model-merge", "httpx", "numpy", "blake3"))


def lo_rx_bytes() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[0])
    return 0


# -- processes ---------------------------------------------------------------------------------


class Proc:
    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self._log = open(log, "w")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                     cwd=REPO)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if " on http://" not in line:
            self.stop()
            raise SystemExit(f"a server did not start: {line!r}; see {log}")
        self.url = line.rsplit(" on ", 1)[1].strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        self._log.close()


def serve_file(path: str) -> None:
    """The baseline server: the same uvicorn + Starlette stack, one file, no crdt-merge."""
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import FileResponse

    from crdt_merge_server.main import bind

    app = FastAPI()

    @app.get("/file")
    def get_file() -> FileResponse:
        return FileResponse(path, media_type="application/octet-stream")

    sock = bind("127.0.0.1", 0)
    print(f"serving {path} on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])


# -- the 1 GiB case ------------------------------------------------------------------------------


def make_donor(folder: Path, size_mib: int) -> Path:
    """A safetensors file of ``size_mib`` MiB of float32 noise (tensors of 64 MiB)."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    rng = np.random.default_rng(20261124)
    per = min(64, size_mib)
    tensors = {f"layers.{i}.weight": rng.standard_normal(per * 2**18, dtype=np.float32)
               .reshape(-1, 4096) for i in range(size_mib // per)}
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def plain_download(url: str, dest: Path) -> tuple[float, int]:
    start = time.perf_counter()
    n = 0
    with httpx.Client(timeout=600) as client, open(dest, "wb") as f:
        with client.stream("GET", url + "/file") as response:
            response.raise_for_status()
            for chunk in response.iter_bytes():
                f.write(chunk)
                n += len(chunk)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - start, n


def throughput(work: Path, size_mib: int, profile: str, workers: int) -> dict:
    from crdt_merge.replica import Replica
    from crdt_merge.store.importer import import_model
    from crdt_merge.sync import LocalPeer, sync

    donor = make_donor(work / "donor", size_mib)
    a = Replica.create(work / "a", "alpha", profile=profile)
    b = Replica.join(work / "b", "beta", a.genesis_bytes())
    a.admit("beta", b.public_key)
    sync(b, LocalPeer(a))  # B knows the project; it lacks only the donor
    imported = import_model(a.store, str(donor), a.piece_size)
    a.contribute(imported.manifest_id, params={"weight": "1"}, label="donor")
    missing = sorted(b.store.missing(a.closure([imported.manifest_id])))
    missing_bytes = sum(a.store.files.size(o) for o in missing)
    b.close()

    server_a = Proc([PYTHON, "-m", "crdt_merge", "serve", str(work / "a"), "--port", "0"],
                    work / "a.log")
    server_b = Proc([PYTHON, "-m", "crdt_merge", "serve", str(work / "b"), "--port", "0",
                     "--peer", server_a.url, "--sync-interval", "86400"], work / "b.log",
                    env={"CRDT_MERGE_TRANSFER_WORKERS": str(workers)})
    plain = Proc([PYTHON, __file__, "--serve-file", str(donor / "model.safetensors")],
                 work / "plain.log")
    try:
        base_time, base_bytes = plain_download(plain.url, work / "downloaded.safetensors")
        lo_before = lo_rx_bytes()
        start = time.perf_counter()
        with httpx.Client(timeout=3600) as client:
            response = client.post(server_b.url + "/v1/sync",
                                   headers={"Accept": "application/json"})
        sync_time = time.perf_counter() - start
        lo_delta = lo_rx_bytes() - lo_before
        response.raise_for_status()
        result = response.json()["peers"][server_a.url]
        if not result["ok"]:
            raise SystemExit(f"sync failed: {result}")
        base_time2, _ = plain_download(plain.url, work / "downloaded2.safetensors")
    finally:
        for p in (plain, server_b, server_a):
            p.stop()
    with Replica.open(work / "b") as b2, Replica.open(work / "a") as a2:
        converged = b2.state_root() == a2.state_root()
    wire = result["wire"]
    baseline = min(base_time, base_time2)
    return {
        "donor_bytes": base_bytes, "objects_missing": len(missing),
        "missing_bytes": missing_bytes, "converged": converged,
        "plain_download_s": round(baseline, 3), "plain_download_runs_s": [
            round(base_time, 3), round(base_time2, 3)],
        "sync_s": round(sync_time, 3),
        "plain_MBps": round(base_bytes / baseline / 1e6, 1),
        "sync_MBps": round(missing_bytes / sync_time / 1e6, 1),
        "throughput_ratio": round(baseline / sync_time, 3),
        "requests": wire["requests"], "http_bytes": wire["sent"] + wire["received"],
        "http_ratio": round((wire["sent"] + wire["received"]) / missing_bytes, 5),
        "loopback_bytes": lo_delta, "loopback_ratio": round(lo_delta / missing_bytes, 5),
        "objects_received": result["objects_received"],
    }


# -- reconciliation -------------------------------------------------------------------------------


def reconciliation() -> list[dict]:
    from crdt_merge.sync import reconcile as rc

    rng = np.random.default_rng(7)
    rows = []
    for n in (10_000, 100_000):
        common = [bytes(x).hex() for x in rng.integers(0, 256, (n, 32), dtype=np.uint8)]
        for diffs in (1, 100):
            extra = [bytes(x).hex() for x in rng.integers(0, 256, (diffs, 32), dtype=np.uint8)]
            local = common + extra[: (diffs + 1) // 2]
            remote = common + extra[(diffs + 1) // 2:]
            index = rc.IdIndex(remote)
            start = time.perf_counter()
            out = rc.run(local, lambda m, index=index: rc.respond(index, m))
            took = time.perf_counter() - start
            assert len(out.local_only) + len(out.remote_only) == diffs
            plain = len(remote) * 34 + 8  # GET /v1/ops as raw ids: 2-byte bin head + 32 each
            rows.append({"ops": n, "differences": diffs, "round_trips": out.rounds,
                         "bytes_sent": out.bytes_sent, "bytes_received": out.bytes_received,
                         "bytes_total": out.bytes_sent + out.bytes_received,
                         "plain_list_bytes": plain,
                         "fraction_of_plain": round((out.bytes_sent + out.bytes_received) / plain, 4),
                         "seconds": round(took, 2)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--profile", default="v1", choices=["v1", "test"])
    p.add_argument("--dir", help="work directory (default: a new temporary one)")
    p.add_argument("--workers", type=int, default=4, help="server B's transfer workers")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--serve-file", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_file:
        serve_file(args.serve_file)
        return
    report: dict = {"machine": machine(), "command": " ".join([Path(PYTHON).name, *sys.argv])}
    if not args.skip_throughput:
        work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="sync-bench-"))
        report["throughput"] = throughput(work, args.size_mib, args.profile, args.workers)
    report["reconciliation"] = reconciliation()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
