"""Shared helpers for the foundation tests: deterministic replicas, small models cut into
test-profile pieces, and snapshots that show a replica did not change."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import blake3
import torch

from crdt_merge import maintenance
from crdt_merge.errors import PieceCorrupt, PieceMissing
from crdt_merge.hashing import STATE_ROOT_DOMAIN
from crdt_merge.replica import Replica
from crdt_merge.store.local import LocalStore
from crdt_merge.store.manifests import FileRecord, Manifest, TensorRecord, piece_lengths

PIECE_SIZE = 4096  # the "test" protocol profile

DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
          torch.float64: "F64", torch.int32: "I32", torch.int64: "I64", torch.uint8: "U8"}


def scratch() -> tempfile.TemporaryDirectory[str]:
    """A temporary directory for property tests, on tmpfs when the machine has one: they
    test logic over many replica directories, not durability, and every commit fsyncs.
    (The crash tests use pytest's tmp_path, on the real disk.)"""
    shm = Path("/dev/shm")
    base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    return tempfile.TemporaryDirectory(dir=base, prefix="crdt-merge-test-")


def rng_from(seed: str) -> Callable[[int], bytes]:
    """A deterministic stand-in for ``os.urandom`` (keys and nonces that tests can repeat)."""
    stream = blake3.blake3(seed.encode()).digest(length=1 << 12)
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        out = stream[pos:pos + n]
        pos += n
        assert len(out) == n, "rng_from ran out of bytes"
        return out

    return take


def new_project(root: Path, site: str = "alice", seed: str = "project") -> Replica:
    return Replica.create(root, site, name="test", profile="test", rng=rng_from(seed))


def join(root: Path, genesis: bytes, site: str) -> Replica:
    return Replica.join(root, site, genesis, rng=rng_from(f"join-{site}"))


def tensor_bytes(t: torch.Tensor) -> bytes:
    """A tensor's raw little-endian bytes (row-major)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def cut(data: bytes, piece_size: int = PIECE_SIZE) -> list[bytes]:
    """Bytes cut into pieces the way specs/formats.md says (crdt_merge's piece_lengths)."""
    out, pos = [], 0
    for n in piece_lengths(len(data), piece_size):
        out.append(data[pos:pos + n])
        pos += n
    assert pos == len(data)
    return out


def put_tensor(store: LocalStore, t: torch.Tensor, piece_size: int = PIECE_SIZE) -> TensorRecord:
    ids = tuple(store.put(p) for p in cut(tensor_bytes(t), piece_size))
    return TensorRecord(DTYPES[t.dtype], tuple(t.shape), ids)


def model_tensors(seed: int, shared: bool = True) -> dict[str, torch.Tensor]:
    """A tiny model whose tensors span several 4 KiB pieces; with ``shared`` the zero tensor
    and the frozen "embed" tensor are the same in every model (deduplicated pieces)."""
    g = torch.Generator().manual_seed(seed)
    out = {
        "layers.0.attn.q": torch.randn(24, 100, generator=g),     # 9600 bytes: 3 pieces
        "layers.0.norm": torch.randn(16, generator=g).to(torch.bfloat16),
        "layers.0.zeros": torch.zeros(2048),                       # 2 equal pieces
    }
    if shared:
        out["embed"] = torch.arange(3000, dtype=torch.float32)    # 3 pieces, in every model
    return out


def put_model(replica: Replica, seed: int, *, shared: bool = True,
              config: bytes | None = None) -> str:
    """Store a tiny model's pieces and manifest in ``replica``; return the manifest id."""
    store = replica.store
    tensors = {name: put_tensor(store, t, replica.piece_size)
               for name, t in sorted(model_tensors(seed, shared).items())}
    config = config if config is not None else f'{{"seed": {seed}}}'.encode()
    files = {"config.json": FileRecord(len(config),
                                       tuple(store.put(p) for p in cut(config, replica.piece_size)))}
    manifest = Manifest(replica.piece_size, tensors, files, {"family": "test", "seed": seed})
    return replica.put_manifest(manifest)


def model_objects(replica: Replica, manifest_id: str) -> set[str]:
    """The manifest and every piece it names."""
    return set(replica.closure([manifest_id]))


def expected_root(op_ids) -> str:
    """The state root computed here from the spec, not by crdt_merge."""
    ids = sorted(set(op_ids))
    return blake3.blake3(STATE_ROOT_DOMAIN + b"".join(bytes.fromhex(i) for i in ids)).hexdigest()


def tree(path: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``path`` (empty if it does not exist)."""
    out = {}
    if path.exists():
        for f in sorted(path.rglob("*")):
            if f.is_file():
                out[str(f.relative_to(path))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def snapshot(replica: Replica) -> dict[str, Any]:
    """What "the replica is unchanged" compares: committed ops, the object index, the
    object, temp and quarantine files."""
    root = replica.path
    return {
        "state_root": replica.state_root(),
        "ops": replica.op_ids(),
        "objects": replica.store.object_ids(),
        "wanted": replica.store.index.wanted(),
        "files": tree(root / "objects"),
        "tmp": tree(root / "tmp"),
        "quarantine": tree(root / "quarantine"),
    }


def check_invariants(path: Path) -> None:
    """Open a replica directory and check what must hold after any crash: every indexed
    object is a whole, verified file; every file under objects/ verifies; every committed op
    has its objects; no temp file of a dead process is left."""
    with Replica.open(path) as r:
        for object_id in r.store.object_ids():
            try:
                r.store.files.read(object_id)
            except (PieceCorrupt, PieceMissing) as exc:  # pragma: no cover - a failure
                raise AssertionError(f"indexed object {object_id} does not verify: {exc}") from exc
        for f in (path / "objects").rglob("*"):
            if f.is_file():
                assert blake3.blake3(f.read_bytes()).hexdigest() == f.name, f"torn file {f}"
        report = maintenance.fsck(r)
        assert report["ok"], report
        assert not report["wanted"], report
        leftovers = [p.name for p in (path / "tmp").iterdir()
                     if not p.name.startswith(f"{os.getpid()}-")]
        assert leftovers == [], leftovers


def same_view(replicas: list[Replica]) -> None:
    """Every replica holds the same ops and reads the same state from them."""
    first = maintenance.status(replicas[0])
    for r in replicas[1:]:
        s = maintenance.status(r)
        for key in ("state_root", "ops", "contributions", "recipe", "conflicts",
                    "ignored_retracts"):
            assert s[key] == first[key], (key, s[key], first[key])


def op_bytes(ops: Mapping[str, Any]) -> dict[str, bytes]:
    return {i: op.data for i, op in ops.items()}
