"""A fork server for the crash and concurrency tests (``python -m tests.foundation.forkserver``).

Starting a Python that imports crdt_merge (and so torch) costs seconds; forking one that
already has costs milliseconds. The server reads one JSON command a line from stdin: a
list of jobs. It forks one real child process per job, all at once, waits for every child
and answers one JSON line: each child's pid and how it ended (exit code or signal). A job
sets ``crash_at`` to make crdt_merge SIGKILL the child at that crash point
(``CRDT_MERGE_CRASH_AT``, see crdt_merge.store.objects.crashpoint).

Jobs (``action``):
    write       put a model's pieces (the first one streamed in chunks) and its manifest,
                then contribute it: {"dir", "seed"}
    contribute  ``count`` such contributions one after another: {"dir", "seed", "count"}
    pull        pull into {"dir"} from the replica at {"source"}
    receive     ``Replica.receive`` the ops of {"batch"} (a JSON file: a list of hex op bytes)

Models are built from BLAKE3 output, not torch: a child never runs torch code.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import blake3

from crdt_merge.replica import Replica
from crdt_merge.store.manifests import FileRecord, Manifest, TensorRecord, piece_lengths
from crdt_merge.sync import LocalPeer, pull

SHAPES = {"a.weight": ("F32", (3, 1000)), "b.weight": ("U8", (5000,)), "zeros": ("F32", (2048,))}


def model_bytes(seed: int) -> dict[str, bytes]:
    """Raw tensor bytes of a model; "zeros" is the same in every model (shared pieces)."""
    out = {}
    for name, (dtype, shape) in SHAPES.items():
        n = (4 if dtype == "F32" else 1) * shape[0] * (shape[1] if len(shape) > 1 else 1)
        out[name] = bytes(n) if name == "zeros" else blake3.blake3(
            f"{seed}/{name}".encode()).digest(length=n)
    return out


def cut(data: bytes, piece_size: int) -> list[bytes]:
    out, pos = [], 0
    for n in piece_lengths(len(data), piece_size):
        out.append(data[pos:pos + n])
        pos += n
    return out


def write_model(replica: Replica, seed: int) -> str:
    store, size = replica.store, replica.piece_size
    tensors, streamed = {}, False
    for name, data in model_bytes(seed).items():
        ids = []
        for piece in cut(data, size):
            if not streamed and not store.has(blake3.blake3(piece).hexdigest()):
                chunks = [piece[i:i + 1000] for i in range(0, len(piece), 1000)]
                ids.append(store.put_stream(blake3.blake3(piece).hexdigest(), chunks))
                streamed = True
            else:
                ids.append(store.put(piece))
        dtype, shape = SHAPES[name]
        tensors[name] = TensorRecord(dtype, shape, tuple(ids))
    config = json.dumps({"seed": seed}).encode()
    files = {"config.json": FileRecord(len(config), tuple(store.put(p) for p in cut(config, size)))}
    return replica.put_manifest(Manifest(size, tensors, files, {"family": "test"}))


def run(job: dict) -> None:
    if job.get("crash_at"):
        os.environ["CRDT_MERGE_CRASH_AT"] = job["crash_at"]
    else:
        os.environ.pop("CRDT_MERGE_CRASH_AT", None)
    with Replica.open(job["dir"]) as r:
        if job["action"] == "write":
            r.contribute(write_model(r, job["seed"]), label=f"seed {job['seed']}")
        elif job["action"] == "contribute":
            for i in range(job["count"]):
                r.contribute(write_model(r, job["seed"] + i), label=f"seed {job['seed'] + i}")
        elif job["action"] == "receive":
            batch = json.loads(open(job["batch"]).read())
            r.receive([bytes.fromhex(h) for h in batch])
        elif job["action"] == "pull":
            with Replica.open(job["source"]) as source:
                pull(r, LocalPeer(source))
        else:
            raise ValueError(job["action"])


def main() -> None:
    for line in sys.stdin:
        jobs = json.loads(line)
        pids = []
        for job in jobs:
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    run(job)
                except BaseException:
                    traceback.print_exc()
                    code = 1
                sys.stdout.flush()
                os._exit(code)
            pids.append(pid)
        results = []
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            results.append({"pid": pid,
                            "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None})
        print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
