"""Content-addressed object files: pieces and manifests under their BLAKE3 id.

Layout inside a replica directory::

    objects/ab/abcdef...   one file per object, named by its 64-hex id
    tmp/                   temp files being written (``<pid>-<n>.tmp``); never read;
                           ``<id>.part``: a download to resume (:class:`ObjectWriter`)
    quarantine/            objects that failed their hash when read back

Writes are atomic and durable: bytes go to a temp file, which is fsynced, renamed into
place and the directory fsynced. A reader therefore sees either no file or the whole,
verified file. Every read is verified against the id; a mismatch moves the file to
``quarantine/`` and raises :class:`PieceCorrupt`, so a flipped bit is never served twice.

This module knows files only; which objects a replica *holds* is the SQLite index's job
(:mod:`crdt_merge.store.db`), written after the file is durable.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import signal
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from crdt_merge import testpoints
from crdt_merge.errors import HashMismatch, PieceCorrupt, PieceMissing, ShapeMismatch
from crdt_merge.hashing import Hasher, PieceId, check_id, digest, is_id

_COUNTER = itertools.count()
#: seconds an interrupted download's part file is kept for resuming
PART_MAX_AGE = 24 * 3600.0


def crashpoint(name: str) -> None:
    """Fault injection for crash tests: SIGKILL this process at the step named by the
    ``CRDT_MERGE_CRASH_AT`` environment variable. Does nothing when it is unset. Each
    crash point is also a pause point of the CLI's interrupt tests (:mod:`crdt_merge.testpoints`)."""
    if os.environ.get("CRDT_MERGE_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
    testpoints.pause(name)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_parent(target: Path) -> None:
    """Create ``target``'s directory if needed; a new directory's own entry is made durable
    too (its parent fsynced), or a power cut could lose the whole fan-out directory."""
    if not target.parent.is_dir():
        target.parent.mkdir(exist_ok=True)
        fsync_dir(target.parent.parent)


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
        """Make the store's folders, with every fan-out folder of ``objects`` (ids start
        with one of 256 hex pairs): made once here and fsynced together, rather than one
        at a time by the first writes, each with its own fsync of ``objects``."""
        for d in (self.objects, self.tmp, self.quarantine):
            d.mkdir(parents=True, exist_ok=True)
        for i in range(256):
            (self.objects / f"{i:02x}").mkdir(exist_ok=True)
        fsync_dir(self.objects)
        fsync_dir(self.root)

    def clean_parts(self, max_age: float = PART_MAX_AGE) -> int:
        """Delete download part files no transfer holds (unlocked) that are older than
        ``max_age`` seconds or whose object is stored already. Returns how many."""
        removed = 0
        now = time.time()
        for entry in self.tmp.glob("*.part"):
            try:
                fd = os.open(entry, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a transfer is writing it
                name = entry.name[:-len(".part")]
                done = is_id(name) and self.exists(name)
                if done or now - os.fstat(fd).st_mtime > max_age:
                    entry.unlink(missing_ok=True)
                    removed += 1
            finally:
                os.close(fd)
        return removed

    def clean_tmp(self) -> int:
        """Delete temp files left by processes that no longer run, and stale download part
        files (:meth:`clean_parts`). Returns how many."""
        removed = self.clean_parts()
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

    def tmp_path(self) -> Path:
        """A fresh, unique path in the tmp folder (for a write to rename into place)."""
        return self.tmp / f"{os.getpid()}-{next(_COUNTER)}-{os.urandom(4).hex()}.tmp"

    def write(self, data: bytes | memoryview, object_id: str) -> PieceId:
        """Write ``data``, whose BLAKE3 the caller computed as ``object_id``, durably."""
        return self.write_stream(object_id, [data], verified_id=object_id)

    def write_stream(self, object_id: str, chunks: Iterable[bytes | memoryview],
                     verified_id: str | None = None, max_size: int | None = None,
                     sync_dir: bool = True) -> PieceId:
        """Write an object that arrives in chunks, hashing while it streams.

        The file becomes visible under ``object_id`` only once it is whole, fsynced and its
        hash matches; otherwise the temp file is removed and nothing is stored. An existing
        file of that name (one a crash left unindexed) is atomically replaced.

        With ``sync_dir=False`` the caller fsyncs the object's directory itself (once for a
        batch of objects, see :meth:`LocalStore.put_many`) before relying on the rename.

        Raises:
            HashMismatch: the streamed bytes do not hash to ``object_id``.
            ValueError: more than ``max_size`` bytes arrived.
        """
        target = self.path(object_id)
        tmp = self.tmp_path()
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
            make_parent(target)
            os.replace(tmp, target)
            crashpoint("piece.after_rename")
            if sync_dir:
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

    def read_into(self, object_id: str, buf: memoryview) -> int:
        """Read an object into ``buf`` (at least its size) and verify it; return its size.
        Saves the copy :meth:`read` makes when the bytes go into a larger buffer.

        Raises:
            PieceMissing, PieceCorrupt: as :meth:`read`.
        """
        path = self.path(object_id)
        try:
            with open(path, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                if size > len(buf):  # the manifest is wrong, not the object
                    raise ShapeMismatch(f"object {object_id} holds {size} bytes, more than "
                                        f"the {len(buf)} its tensor has left")
                got = f.readinto(buf[:size])
        except FileNotFoundError:
            raise PieceMissing(object_id) from None
        if got != size or digest(buf[:size]) != object_id:
            raise PieceCorrupt(object_id, str(self.quarantine_file(object_id)))
        return size

    def quarantined_count(self) -> int:
        """How many files ``quarantine/`` holds."""
        try:
            with os.scandir(self.quarantine) as entries:
                return sum(1 for e in entries if e.is_file())
        except FileNotFoundError:
            return 0

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

    def mtime(self, object_id: str) -> float:
        """When the object's file was written (0 when it is gone)."""
        try:
            return self.path(object_id).stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def delete(self, object_id: str) -> None:
        self.path(object_id).unlink(missing_ok=True)

    def writer(self, object_id: str, resumable: bool = False) -> ObjectWriter:
        """An :class:`ObjectWriter` for ``object_id`` (see there)."""
        return ObjectWriter(self, object_id, resumable)

    def all_ids(self) -> Iterator[str]:
        for sub in sorted(self.objects.iterdir()):
            if sub.is_dir():
                for f in sorted(sub.iterdir()):
                    yield f.name


class ObjectWriter:
    """The bytes of one object arriving in chunks, hashed as they are written to a file in
    ``tmp/``; the object appears under its id only when :meth:`commit` finds it whole and
    matching its id (fsynced, renamed, directory fsynced, as :meth:`ObjectFiles.write_stream`).

    A resumable writer uses the stable name ``tmp/<id>.part`` and holds an exclusive lock on
    it, so a transfer interrupted in this process or a killed one continues from
    :attr:`size` instead of starting over (the bytes already there are hashed when it
    opens). Other writers use a unique temp name and leave nothing behind when discarded.
    """

    def __init__(self, files: ObjectFiles, object_id: str, resumable: bool = False) -> None:
        self.object_id = check_id(object_id, "object id")
        self._files = files
        self.resumable = resumable
        self._hasher = Hasher()
        if resumable:
            self.path = files.tmp / f"{object_id}.part"
            self._fd = self._open_locked()
            self._rehash()
        else:
            self.path = files.tmp_path()
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)

    def _open_locked(self) -> int:
        """Open and lock the part file, making sure the lock is on the file that still has
        that name (a writer that finished first renamed its file away)."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    def _rehash(self) -> None:
        offset = 0
        while True:
            block = os.pread(self._fd, 1 << 20, offset)
            if not block:
                break
            self._hasher.update(block)
            offset += len(block)
        os.lseek(self._fd, offset, os.SEEK_SET)

    @property
    def size(self) -> int:
        """Bytes written so far (including what an earlier, interrupted transfer left)."""
        return self._hasher.size

    def write(self, chunk: bytes | memoryview) -> None:
        self._hasher.update(chunk)
        view = memoryview(chunk)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        crashpoint("piece.mid_stream")

    def restart(self) -> None:
        """Drop what was written (the sender could not resume) and start again at 0."""
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        self._hasher = Hasher()

    def commit(self) -> PieceId:
        """Verify, make durable and move into place; the writer is closed afterwards.

        Raises:
            HashMismatch: the bytes do not hash to the id; the file is deleted.
        """
        try:
            actual = self._hasher.hexdigest()
            if actual != self.object_id:
                raise HashMismatch(self.object_id, actual)
            crashpoint("piece.before_fsync")
            os.fsync(self._fd)
            crashpoint("piece.after_fsync")
            target = self._files.path(self.object_id)
            make_parent(target)
            os.replace(self.path, target)
            crashpoint("piece.after_rename")
            fsync_dir(target.parent)
        except BaseException:
            self.discard()
            raise
        os.close(self._fd)  # the name is the object's now: nothing to delete
        self._fd = -1
        return PieceId(self.object_id)

    def discard(self) -> None:
        """Delete the file and close (the object is held already, or failed its hash)."""
        if self._fd >= 0:
            self.path.unlink(missing_ok=True)
            self.close()

    def close(self) -> None:
        """Close; a resumable file with bytes in it stays for the next attempt, any other
        is deleted."""
        if self._fd < 0:
            return
        if not self.resumable or self.size == 0:
            self.path.unlink(missing_ok=True)
        os.close(self._fd)  # releases the lock
        self._fd = -1

    def __enter__(self) -> ObjectWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
