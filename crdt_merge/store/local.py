"""The embedded default store: one directory per replica.

    DIR/replica.sqlite   ops, staged ops, the object index, settings (crdt_merge.store.db)
    DIR/objects/...      content-addressed object files (crdt_merge.store.objects)
    DIR/site.key         this site's Ed25519 private key (mode 0600)

An object is durable on disk before its index row is written, and an op row is written
only in a transaction that checks its objects' rows are present, so the index never names
an object or an op whose objects a crash could have lost.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crdt_merge.errors import (
    HashMismatch,
    NotAReplica,
    PieceCorrupt,
    PieceMissing,
    ReplicaExists,
)
from crdt_merge.hashing import PieceId, check_id, digest, is_id, serial
from crdt_merge.store.db import Index
from crdt_merge.store.objects import ObjectFiles, ObjectWriter, crashpoint, fsync_dir

DB_NAME = "replica.sqlite"
_IO_THREADS = 4
#: the I/O threads hash a piece each; BLAKE3 also splits a piece over threads of its own
#: only when they leave cores idle (else its threads contend with them: on 2 cores that
#: made a re-import 7% slower)
_SPLIT_HASHES = _IO_THREADS < (os.cpu_count() or 1)


@dataclass(frozen=True)
class StagingLimits:
    """Bounds on ops staged but not committed (not yet verifiable, or waiting for objects).
    Past the age, the old are evicted; past the count or bytes, the newest of the source
    that staged the most (:meth:`Index.evict`): a flood evicts itself. An honest op evicted
    is fetched again by the next sync (it is neither held nor staged), junk is simply gone
    (specs/sync.md)."""

    max_ops: int = 10_000
    max_bytes: int = 16 << 20
    max_age: float = 24 * 3600.0


class LocalStore:
    """Objects and op rows of one replica directory. Implements the PieceStore seam::

        put(data) -> id        idempotent; verified; durable before it returns
        get(id) -> bytes       verified on every read (PieceMissing / PieceCorrupt)
        missing(ids) -> set    the ids this store lacks
    """

    def __init__(self, root: Path, index: Index) -> None:
        self.root = Path(root)
        self.files = ObjectFiles(self.root)
        self.index = index

    @classmethod
    def create(cls, root: Path) -> LocalStore:
        root = Path(root)
        if (root / DB_NAME).exists():
            raise ReplicaExists(str(root))
        root.mkdir(parents=True, exist_ok=True)
        if any(p.name not in (".", "..") for p in root.iterdir()):
            raise ReplicaExists(str(root))
        ObjectFiles(root).create()
        return cls(root, Index(root / DB_NAME))

    @classmethod
    def open(cls, root: Path) -> LocalStore:
        root = Path(root)
        if not (root / DB_NAME).is_file():
            raise NotAReplica(str(root))
        store = cls(root, Index(root / DB_NAME))
        store.files.clean_tmp()
        return store

    def close(self) -> None:
        self.index.close()

    # -- objects --------------------------------------------------------------------------

    def put(self, data: bytes | memoryview, expected: str | None = None) -> PieceId:
        """Store bytes under their BLAKE3 id (once, however often they arrive).

        Raises:
            BadId: ``expected`` is not a well-formed id.
            HashMismatch: ``expected`` is given and is not the BLAKE3 of ``data``.
        """
        return self.put_if_new(data, expected)[0]

    def put_if_new(self, data: bytes | memoryview,
                   expected: str | None = None) -> tuple[PieceId, bool]:
        """Like :meth:`put`; also says whether the bytes were new to this store."""
        if expected is not None:
            check_id(expected, "object id")
        object_id = digest(data)
        if expected is not None and expected != object_id:
            raise HashMismatch(expected, object_id)
        if self.index.has_objects([object_id]):
            return PieceId(object_id), False
        self.files.write(data, object_id)
        crashpoint("piece.before_index")
        self.index.add_object(object_id, len(data))
        return PieceId(object_id), True

    def put_many(self, pieces: Sequence[bytes | memoryview]) -> tuple[list[PieceId], int]:
        """Store several pieces at once; return their ids and how many were new.

        Each new piece is written and fsynced like :meth:`put`, but each directory is
        fsynced once for the batch and the index rows go in one transaction, after every
        piece is durable: the same guarantees for a fraction of the fsyncs.
        """
        ids, new, _ = self.put_many_scan(pieces)
        return ids, new

    def put_many_scan(self, pieces: Sequence[bytes | memoryview],
                      scan: Callable[[int, memoryview], Any] | None = None,
                      ) -> tuple[list[PieceId], int, list[Any]]:
        """:meth:`put_many`, also returning ``scan(i, piece)`` for each piece this call
        writes, computed on the worker thread that writes it while its bytes are hot (the
        importer's NaN/inf test), and None for each piece it does not write: the store
        held it already, or an equal piece earlier in ``pieces`` was written instead. The
        caller tests those itself if it needs to (a re-import mostly does not).

        Each piece is hashed and, unless its file is there already, written and fsynced by
        one task, so hashing one piece overlaps writing another.
        """
        def write(i: int, pid: PieceId) -> Any:
            piece = memoryview(pieces[i])
            flag = scan(i, piece) if scan is not None else None
            self.files.write_stream(pid, [piece], verified_id=pid, sync_dir=False)
            return flag

        def one(i: int) -> tuple[PieceId, bool, Any]:
            with nullcontext() if _SPLIT_HASHES else serial():
                pid = PieceId(digest(memoryview(pieces[i])))
            if self.files.exists(pid):
                return pid, False, None
            return pid, True, write(i, pid)

        with ThreadPoolExecutor(max_workers=_IO_THREADS) as pool:
            # hashing, writing and fsync release the GIL: a few threads overlap them
            results = list(pool.map(one, range(len(pieces))))
            ids = [r[0] for r in results]
            flags = [r[2] for r in results]
            held = self.index.has_objects(ids)
            # a file there but not indexed (a crash between its rename and its index row)
            # is written again, as a new piece would be; one this call wrote is not
            wrote = {pid for pid, was_written, _ in results if was_written}
            redo = {pid: i for i, (pid, was_written, _) in enumerate(results)
                    if not was_written and pid not in held and pid not in wrote}
            for i, flag in zip(redo.values(), pool.map(write, redo.values(), redo.keys()),
                               strict=True):
                flags[i] = flag
            written = {pid: memoryview(pieces[i]).nbytes for i, pid in enumerate(ids)
                       if pid not in held}
            # concurrent directory fsyncs share journal commits
            list(pool.map(fsync_dir, sorted({self.files.path(i).parent for i in written})))
        if written:
            crashpoint("piece.before_index")
            self.index.add_objects(written.items())
        return ids, len(written), flags

    def put_stream(self, object_id: str, chunks: Iterable[bytes], max_size: int | None = None) -> PieceId:
        """Store bytes that arrive in chunks, verified against ``object_id`` as they stream."""
        check_id(object_id, "object id")
        if self.index.has_objects([object_id]):
            for _ in chunks:  # drain: the caller's transport stays in step
                pass
            return PieceId(object_id)
        self.files.write_stream(object_id, chunks, max_size=max_size)
        self.index.add_object(object_id, self.files.size(object_id))
        return PieceId(object_id)

    def writer(self, object_id: str, *, resumable: bool = False) -> ObjectWriter:
        """A writer for an object that arrives in pieces (an upload, a resumable download);
        hand it to :meth:`finish` once every byte is written."""
        return self.files.writer(object_id, resumable)

    def finish(self, writer: ObjectWriter) -> tuple[PieceId, bool]:
        """Store what ``writer`` received: verified, durable, then indexed. Returns the id
        and whether it was new (when the object is held already, the writer is discarded).

        Raises:
            HashMismatch: the bytes do not hash to the writer's id; nothing is stored.
        """
        object_id = writer.object_id
        if self.index.has_objects([object_id]):
            writer.discard()
            return PieceId(object_id), False
        size = writer.size
        writer.commit()
        crashpoint("piece.before_index")
        self.index.add_object(object_id, size)
        return PieceId(object_id), True

    def get(self, object_id: str) -> bytes:
        check_id(object_id, "object id")
        if not self.index.has_objects([object_id]):
            raise PieceMissing(object_id)
        try:
            return self.files.read(object_id)
        except (PieceCorrupt, PieceMissing):
            self.index.want([object_id])
            raise

    def get_into(self, object_id: str, buf: memoryview) -> int:
        """Read and verify an object into ``buf``; return its size (see :meth:`get`)."""
        check_id(object_id, "object id")
        if not self.index.has_objects([object_id]):
            raise PieceMissing(object_id)
        try:
            return self.files.read_into(object_id, buf)
        except (PieceCorrupt, PieceMissing):
            self.index.want([object_id])
            raise

    def size(self, object_id: str) -> int:
        """The stored length of an object (PieceMissing when its file is gone)."""
        return self.files.size(object_id)

    def read_range(self, object_id: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of an object, unverified (resumed transfers; the receiver
        verifies the whole)."""
        return self.files.read_range(object_id, start, end)

    def has(self, object_id: str) -> bool:
        return bool(self.index.has_objects([object_id]))

    def missing(self, ids: Iterable[str]) -> set[str]:
        """The ids this store lacks. An object whose file is in place but not indexed (a
        process was killed between the rename and the index row) is verified and indexed
        here instead, so its bytes, which all arrived, are not transferred again."""
        ids = set(ids)
        lacking = ids - self.index.has_objects(ids)
        return {i for i in lacking if not self._adopt(i)}

    def _adopt(self, object_id: str) -> bool:
        """Index an unindexed object file if it verifies (made durable first, as a write
        would have). False when there is no such file or it fails its hash (quarantined)."""
        if not is_id(object_id) or not self.files.exists(object_id):
            return False
        path = self.files.path(object_id)
        try:
            size = len(self.files.read(object_id))
            fd = os.open(path, os.O_RDONLY)
        except (PieceCorrupt, PieceMissing, FileNotFoundError):
            return False
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(path.parent)
        self.index.add_object(object_id, size)
        return True

    def object_ids(self) -> list[str]:
        return self.index.object_ids()

    def mtime(self, object_id: str) -> float:
        """When the object's file was written (0 when it is gone)."""
        return self.files.mtime(object_id)

    def clean_parts(self) -> int:
        """Delete stale download part files (see :meth:`ObjectFiles.clean_parts`)."""
        return self.files.clean_parts()

    def object_totals(self) -> tuple[int, int]:
        """How many objects are indexed, and their bytes."""
        return self.index.object_totals()

    def quarantined_files(self) -> int:
        """How many object files were moved to quarantine (failed their hash when read)."""
        return self.files.quarantined_count()

    def delete_objects(self, ids: Iterable[str]) -> None:
        ids = list(ids)
        self.index.remove_objects(ids)
        for object_id in ids:
            self.files.delete(object_id)

    # -- ops ------------------------------------------------------------------------------

    def op_rows(self) -> list[tuple[str, bytes]]:
        return self.index.op_rows()

    def op_ids(self) -> list[str]:
        return self.index.op_ids()

    def op_data(self, op_id: str) -> bytes | None:
        return self.index.op_data(op_id)

    def insert_op(self, op_id: str, kind: str, site: str, clock: int, data: bytes,
                  objects: Iterable[str]) -> bool:
        """Commit one op row once all its objects are held (:meth:`join_ops`). Returns
        False when the op was already held.

        Raises:
            IncompleteOp: an object is not held.
        """
        return bool(self.join_ops([(op_id, kind, site, clock, data, objects)]))

    def join_ops(self, rows: Sequence[tuple[str, str, str, int, bytes, Iterable[str]]],
                 stage: Sequence[tuple[str, bytes]] = (), source: str = "",
                 limits: StagingLimits | None = None, now: float | None = None) -> list[str]:
        """Commit op rows ``(id, kind, site, clock, data, objects)`` and stage the ops of
        ``stage`` (``(id, data)``, from ``source``) in ONE transaction
        (:meth:`Index.join_ops`): a crash leaves all of it or none. Returns the ids
        committed now (not held before).

        Raises:
            IncompleteOp: an object of a row is not held; nothing is written.
        """
        limits = limits or StagingLimits()
        return self.index.join_ops(
            rows, [(i, d, source) for i, d in stage], time.time() if now is None else now,
            (limits.max_ops, limits.max_bytes, limits.max_age),
            before_commit=lambda: crashpoint("op.before_commit"),
            after_first=lambda: crashpoint("ops.after_first_insert"))

    def stage_op(self, op_id: str, data: bytes, limits: StagingLimits | None = None,
                 now: float | None = None, source: str = "") -> list[str]:
        """Stage an op within ``limits``; returns the ids evicted to stay within them."""
        limits = limits or StagingLimits()
        return self.index.stage(op_id, data, time.time() if now is None else now,
                                limits.max_ops, limits.max_bytes, limits.max_age, source)

    def evict_staged(self, limits: StagingLimits | None = None,
                     now: float | None = None) -> list[str]:
        limits = limits or StagingLimits()
        return self.index.evict_staged(time.time() if now is None else now,
                                       limits.max_ops, limits.max_bytes, limits.max_age)

    def unstage_op(self, op_id: str) -> None:
        self.index.unstage(op_id)

    def staged_rows(self) -> list[tuple[str, bytes]]:
        return self.index.staged_rows()

    def iter_objects_on_disk(self) -> Iterator[str]:
        return self.files.all_ids()
