"""``crdt-merge ops export DIR --out FILE``: every op of a replica's state as one file of
canonical bytes, readable without crdt-merge (specs/checkpoint.md, "Op export").

The file is the canonical msgpack of ``{"v": 1, "project": genesis op id, "state_root":
state root, "ops": [op bytes, ...]}``, the ops (each its exact signed bytes, a msgpack bin)
in ascending op id order, each once, the genesis op among them. A reader recomputes each
op id as the BLAKE3 of its bytes and the state root from the ids (specs/formats.md
section 8); two replicas in the same state export the same bytes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from crdt_merge import codec
from crdt_merge.hashing import digest
from crdt_merge.replica import Replica
from crdt_merge.store.objects import fsync_dir

EXPORT_VERSION = 1


def export_bytes(replica: Replica) -> bytes:
    """The export of ``replica``'s state (see the module docstring)."""
    ops = replica.ops()
    return codec.encode({"v": EXPORT_VERSION, "project": replica.genesis_id,
                         "state_root": replica.state_root(),
                         "ops": [ops[k].data for k in sorted(ops)]})


def cmd_ops(args: Any) -> tuple[int, Any]:
    with Replica.open(args.dir) as r:
        data = export_bytes(r)
        count = len(r.ops())
        root = r.state_root()
    if args.out == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return 0, None
    out = Path(args.out)
    tmp = out.with_name(out.name + ".partial")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    return 0, {"out": str(out), "ops": count, "state_root": root, "bytes": len(data),
               "blake3": digest(data),
               "text": f"{count} ops (state root {root}) written to {out}"}
