"""The SQLite index of a replica: committed ops, staged ops, held objects, settings.

SQLite in WAL mode with ``synchronous=FULL``: a transaction that returned is on disk. Every
write transaction starts with ``BEGIN IMMEDIATE`` so two processes never deadlock upgrading
read locks, and a busy timeout makes them wait for each other instead of failing. Several
processes (the CLI and a server) may use one replica at once; :meth:`Index.changed` tells a
caller when another connection committed (SQLite's ``data_version``), so caches are
recomputed instead of answering from stale state.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from crdt_merge.errors import IncompleteOp

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 30_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS ops (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, site TEXT NOT NULL,
    clock INTEGER NOT NULL, data BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS staged (
    id TEXT PRIMARY KEY, data BLOB NOT NULL, staged_at REAL NOT NULL DEFAULT 0,
    source TEXT NOT NULL DEFAULT '') WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS bad_ops (id TEXT PRIMARY KEY, data BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS objects (id TEXT PRIMARY KEY, size INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS wanted (id TEXT PRIMARY KEY) WITHOUT ROWID;
"""


class Index:
    """One connection to a replica's ``replica.sqlite``, safe to share between threads."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000,
                                     isolation_level=None, check_same_thread=False)
        self._conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)
        columns = {r[1] for r in self._conn.execute("PRAGMA table_info(staged)")}
        if "staged_at" not in columns:  # a replica made before staging had an age
            self._conn.execute("ALTER TABLE staged ADD COLUMN staged_at REAL NOT NULL DEFAULT 0")
        if "source" not in columns:  # ... or a source
            self._conn.execute("ALTER TABLE staged ADD COLUMN source TEXT NOT NULL DEFAULT ''")
        self._version = -1

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on error)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            self._version = -1

    def query(self, sql: str, params: Iterable[object] = ()) -> list[tuple]:
        with self._lock:
            return self._conn.execute(sql, tuple(params)).fetchall()

    def changed(self) -> bool:
        """True when the database may differ from the last time this was asked: another
        connection committed (``data_version`` moved) or this one wrote."""
        with self._lock:
            version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        if version != self._version:
            self._version = version
            return True
        return False

    # -- meta ---------------------------------------------------------------------------

    def get_meta(self, key: str) -> bytes | None:
        rows = self.query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def set_meta(self, key: str, value: bytes) -> None:
        self.set_metas({key: value})

    def set_metas(self, values: dict[str, bytes]) -> None:
        """Set several keys in one transaction."""
        with self.write() as c:
            c.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(values.items()))

    # -- objects ------------------------------------------------------------------------

    def has_objects(self, ids: Iterable[str]) -> set[str]:
        """The subset of ``ids`` this replica holds."""
        ids = list(dict.fromkeys(ids))
        held: set[str] = set()
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            marks = ",".join("?" * len(chunk))
            held.update(r[0] for r in self.query(f"SELECT id FROM objects WHERE id IN ({marks})", chunk))
        return held

    def add_object(self, object_id: str, size: int) -> None:
        with self.write() as c:
            c.execute("INSERT OR IGNORE INTO objects VALUES (?, ?)", (object_id, size))
            c.execute("DELETE FROM wanted WHERE id = ?", (object_id,))

    def add_objects(self, rows: Iterable[tuple[str, int]]) -> None:
        """Index several durable objects in one transaction."""
        rows = list(rows)
        with self.write() as c:
            c.executemany("INSERT OR IGNORE INTO objects VALUES (?, ?)", rows)
            c.executemany("DELETE FROM wanted WHERE id = ?", [(r[0],) for r in rows])

    def want(self, ids: Iterable[str]) -> None:
        """Record objects that were lost (quarantined) and must be fetched again."""
        with self.write() as c:
            c.executemany("DELETE FROM objects WHERE id = ?", [(i,) for i in ids])
            c.executemany("INSERT OR IGNORE INTO wanted VALUES (?)", [(i,) for i in ids])

    def wanted(self) -> list[str]:
        return [r[0] for r in self.query("SELECT id FROM wanted ORDER BY id")]

    def remove_objects(self, ids: Iterable[str]) -> None:
        with self.write() as c:
            c.executemany("DELETE FROM objects WHERE id = ?", [(i,) for i in ids])

    def object_totals(self) -> tuple[int, int]:
        """How many objects are indexed, and the sum of their sizes."""
        count, size = self.query("SELECT count(*), coalesce(sum(size), 0) FROM objects")[0]
        return int(count), int(size)

    def object_ids(self) -> list[str]:
        return [r[0] for r in self.query("SELECT id FROM objects ORDER BY id")]

    # -- committed ops ------------------------------------------------------------------

    def join_ops(self, rows: Iterable[tuple[str, str, str, int, bytes, Iterable[str]]],
                 stage: Iterable[tuple[str, bytes, str]], now: float,
                 bounds: tuple[int, int, float] | None,
                 before_commit: Callable[[], None] = lambda: None,
                 after_first: Callable[[], None] = lambda: None) -> list[str]:
        """In ONE transaction: commit the op rows ``(id, kind, site, clock, data,
        objects)`` whose objects are all held (checked in the transaction), then stage the
        ``(id, data, source)`` rows and evict to ``bounds`` (max ops, bytes, age). A crash
        leaves all of it or none. ``before_commit`` runs just before the first new row is
        written (its objects checked), ``after_first`` after it. Returns the ids committed (not held before).

        Raises:
            IncompleteOp: an object of a row is not held; nothing is written.
        """
        new: list[str] = []
        stage = list(stage)
        with self.write() as c:
            for op_id, kind, site, clock, data, objects in rows:
                if c.execute("SELECT 1 FROM ops WHERE id = ?", (op_id,)).fetchone():
                    c.execute("DELETE FROM staged WHERE id = ?", (op_id,))
                    continue
                missing = [o for o in sorted(set(objects))
                           if not c.execute("SELECT 1 FROM objects WHERE id = ?", (o,)).fetchone()]
                if missing:
                    raise IncompleteOp(op_id, missing)
                if not new:
                    before_commit()
                c.execute("INSERT INTO ops VALUES (?, ?, ?, ?, ?)", (op_id, kind, site, clock, data))
                c.execute("DELETE FROM staged WHERE id = ?", (op_id,))
                new.append(op_id)
                if len(new) == 1:
                    after_first()
            if stage:
                self.stage_rows(c, stage, now)
            if bounds is not None:
                self.evict(c, now, *bounds)
        return new

    def op_rows(self) -> list[tuple[str, bytes]]:
        return self.query("SELECT id, data FROM ops ORDER BY id")

    def op_ids(self) -> list[str]:
        return [r[0] for r in self.query("SELECT id FROM ops ORDER BY id")]

    def op_data(self, op_id: str) -> bytes | None:
        rows = self.query("SELECT data FROM ops WHERE id = ?", (op_id,))
        return rows[0][0] if rows else None

    def restore_op(self, op_id: str, kind: str, site: str, clock: int, data: bytes) -> None:
        """Put an op row back with the given (verified) bytes, in one transaction: a row
        held under that id with other bytes is moved to ``bad_ops`` first."""
        with self.write() as c:
            c.execute("INSERT OR REPLACE INTO bad_ops SELECT id, data FROM ops "
                      "WHERE id = ? AND data != ?", (op_id, data))
            c.execute("INSERT OR REPLACE INTO ops VALUES (?, ?, ?, ?, ?)",
                      (op_id, kind, site, clock, data))

    def quarantine_ops(self, ids: Iterable[str]) -> None:
        """Move op rows whose bytes fail their id aside (``bad_ops``): the op is no longer
        held, so reconciliation finds it missing and a sync fetches it again."""
        with self.write() as c:
            for op_id in ids:
                c.execute("INSERT OR REPLACE INTO bad_ops SELECT id, data FROM ops WHERE id = ?",
                          (op_id,))
                c.execute("DELETE FROM ops WHERE id = ?", (op_id,))

    def quarantined_ops(self) -> list[str]:
        """Ops quarantined and not yet held again."""
        return [r[0] for r in self.query(
            "SELECT id FROM bad_ops WHERE id NOT IN (SELECT id FROM ops) ORDER BY id")]

    # -- staged ops -----------------------------------------------------------------------

    def stage(self, op_id: str, data: bytes, now: float, max_ops: int, max_bytes: int,
              max_age: float, source: str = "") -> list[str]:
        """Stage an op (unless it is committed) and evict to the bounds (:meth:`evict`).
        Returns the ids evicted (the new one among them when it is the one to go)."""
        with self.write() as c:
            self.stage_rows(c, [(op_id, data, source)], now)
            return self.evict(c, now, max_ops, max_bytes, max_age)

    @staticmethod
    def stage_rows(c: sqlite3.Connection, rows: Iterable[tuple[str, bytes, str]],
                   now: float) -> None:
        """Stage ``(op id, data, source)`` rows that are not committed, inside ``c``'s
        transaction (a row staged already keeps its age and source)."""
        for op_id, data, source in rows:
            if not c.execute("SELECT 1 FROM ops WHERE id = ?", (op_id,)).fetchone():
                c.execute("INSERT OR IGNORE INTO staged VALUES (?, ?, ?, ?)",
                          (op_id, data, now, source))

    def evict_staged(self, now: float, max_ops: int, max_bytes: int,
                     max_age: float) -> list[str]:
        with self.write() as c:
            return self.evict(c, now, max_ops, max_bytes, max_age)

    @staticmethod
    def evict(c: sqlite3.Connection, now: float, max_ops: int, max_bytes: int,
              max_age: float) -> list[str]:
        """Evict staged rows older than ``max_age`` seconds; then, while more than
        ``max_ops`` rows or ``max_bytes`` bytes remain, the newest row of the source that
        holds the most (rows when over the count, bytes when over the bytes; ties: the
        greatest source name). A source flooding junk thus evicts its own rows, never
        another source's while it holds more than they do (specs/sync.md)."""
        rows = c.execute("SELECT id, length(data), staged_at, source FROM staged "
                         "ORDER BY staged_at, id").fetchall()
        doomed = [r[0] for r in rows if r[2] < now - max_age]
        rows = [r for r in rows if r[2] >= now - max_age]
        by_source: dict[str, list[tuple[str, int]]] = {}
        for op_id, size, _, source in rows:  # oldest first
            by_source.setdefault(source, []).append((op_id, size))
        count = len(rows)
        nbytes = sum(r[1] for r in rows)
        used = {s: [len(v), sum(n for _, n in v)] for s, v in by_source.items()}
        while count > max_ops or nbytes > max_bytes:
            axis = 0 if count > max_ops else 1
            source = max(used, key=lambda s: (used[s][axis], s))
            op_id, size = by_source[source].pop()  # its newest
            used[source][0] -= 1
            used[source][1] -= size
            if not by_source[source]:
                del used[source]
            doomed.append(op_id)
            count -= 1
            nbytes -= size
        c.executemany("DELETE FROM staged WHERE id = ?", [(i,) for i in doomed])
        return doomed

    def unstage(self, op_id: str) -> None:
        with self.write() as c:
            c.execute("DELETE FROM staged WHERE id = ?", (op_id,))

    def staged_rows(self) -> list[tuple[str, bytes]]:
        return self.query("SELECT id, data FROM staged ORDER BY id")

    def staged_sources(self) -> dict[str, str]:
        """Staged op id -> the source that staged it ("" when none was named)."""
        return dict(self.query("SELECT id, source FROM staged ORDER BY id"))

    def staged_count(self) -> int:
        return int(self.query("SELECT count(*) FROM staged")[0][0])

    def staged_bytes(self) -> int:
        return int(self.query("SELECT coalesce(sum(length(data)), 0) FROM staged")[0][0])
