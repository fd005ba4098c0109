"""Content-addressed object files: pieces and manifests under their BLAKE3 id.

Layout inside a replica directory::

    objects/ab/abcdef...   one file per object, named by its 64-hex id
    tmp/                   temp files being written (``<pid>-<n>.tmp``); never read
    quarantine/            objects that failed their hash when read back

Writes are atomic and durable: bytes go to a temp file, which is fsynced, renamed into
place and the directory fsynced. A reader therefore sees either no file or the whole,
verified file. Every read is verified against the id; a mismatch moves the file to
``quarantine/`` and raises :class:`PieceCorrupt`, so a flipped bit is never served twice.

This module knows files only; which objects a replica *holds* is the SQLite index's job
(:mod:`crdt_merge.store.db`), written after the file is durable.
"""

from __future__ import annotations

import itertools
import os
import signal
from collections.abc import Iterable, Iterator
from pathlib import Path

from crdt_merge.errors import HashMismatch, PieceCorrupt, PieceMissing
from crdt_merge.hashing import Hasher, PieceId, check_id, digest

_COUNTER = itertools.count()


def crashpoint(name: str) -> None:
    """Fault injection for crash tests: SIGKILL this process at the step named by the
    ``CRDT_MERGE_CRASH_AT`` environment variable. Does nothing when it is unset."""
    if os.environ.get("CRDT_MERGE_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ObjectFiles:
    """The object files of one replica directory (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        self.quarantine = self.root / "quarantine"

    def create(self) -> None:
        for d in (self.objects, self.tmp, self.quarantine):
            d.mkdir(parents=True, exist_ok=True)
        fsync_dir(self.root)

    def clean_tmp(self) -> int:
        """Delete temp files left by processes that no longer run. Returns how many."""
        removed = 0
        for entry in self.tmp.glob("*.tmp"):
            pid_text = entry.name.split("-", 1)[0]
            if pid_text.isdigit() and _pid_alive(int(pid_text)):
                continue  # a live writer's file (ours included)
            entry.unlink(missing_ok=True)
            removed += 1
        return removed

    def path(self, object_id: str) -> Path:
        check_id(object_id, "object id")
        return self.objects / object_id[:2] / object_id

    def exists(self, object_id: str) -> bool:
        return self.path(object_id).is_file()

    def _tmp_path(self) -> Path:
        return self.tmp / f"{os.getpid()}-{next(_COUNTER)}-{os.urandom(4).hex()}.tmp"

    def write(self, data: bytes | memoryview, object_id: str) -> PieceId:
        """Write ``data``, whose BLAKE3 the caller computed as ``object_id``, durably."""
        return self.write_stream(object_id, [data], verified_id=object_id)

    def write_stream(self, object_id: str, chunks: Iterable[bytes | memoryview],
                     verified_id: str | None = None, max_size: int | None = None) -> PieceId:
        """Write an object that arrives in chunks, hashing while it streams.

        The file becomes visible under ``object_id`` only once it is whole, fsynced and its
        hash matches; otherwise the temp file is removed and nothing is stored. An existing
        file of that name (one a crash left unindexed) is atomically replaced.

        Raises:
            HashMismatch: the streamed bytes do not hash to ``object_id``.
            ValueError: more than ``max_size`` bytes arrived.
        """
        target = self.path(object_id)
        tmp = self._tmp_path()
        hasher = Hasher()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            try:
                for chunk in chunks:
                    if verified_id is None:
                        hasher.update(chunk)
                    view = memoryview(chunk)
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
                    crashpoint("piece.mid_stream")
                    if max_size is not None and os.fstat(fd).st_size > max_size:
                        raise ValueError(f"object is larger than the limit of {max_size} bytes")
                if verified_id is None:
                    actual = hasher.hexdigest()
                    if actual != object_id:
                        raise HashMismatch(object_id, actual)
                crashpoint("piece.before_fsync")
                os.fsync(fd)
                crashpoint("piece.after_fsync")
            finally:
                os.close(fd)
            target.parent.mkdir(exist_ok=True)
            os.replace(tmp, target)
            crashpoint("piece.after_rename")
            fsync_dir(target.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return PieceId(object_id)

    def read(self, object_id: str) -> bytes:
        """Read and verify an object.

        Raises:
            PieceMissing: no such file.
            PieceCorrupt: the file fails its hash; it has been moved to ``quarantine/``.
        """
        path = self.path(object_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise PieceMissing(object_id) from None
        if digest(data) != object_id:
            raise PieceCorrupt(object_id, str(self.quarantine_file(object_id)))
        return data

    def quarantine_file(self, object_id: str) -> Path:
        """Move a stored object aside (it failed verification). Returns its new path."""
        src = self.path(object_id)
        dst = self.quarantine / f"{object_id}.{os.getpid()}-{next(_COUNTER)}"
        try:
            os.replace(src, dst)
        except FileNotFoundError:
            pass
        return dst

    def read_range(self, object_id: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of a stored object, unverified (for resumable transfer;
        the receiver verifies the whole)."""
        path = self.path(object_id)
        try:
            with open(path, "rb") as f:
                f.seek(start)
                return f.read(max(0, end - start))
        except FileNotFoundError:
            raise PieceMissing(object_id) from None

    def size(self, object_id: str) -> int:
        try:
            return self.path(object_id).stat().st_size
        except FileNotFoundError:
            raise PieceMissing(object_id) from None

    def delete(self, object_id: str) -> None:
        self.path(object_id).unlink(missing_ok=True)

    def all_ids(self) -> Iterator[str]:
        for sub in sorted(self.objects.iterdir()):
            if sub.is_dir():
                for f in sorted(sub.iterdir()):
                    yield f.name
