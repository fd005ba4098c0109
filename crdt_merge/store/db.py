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
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 30_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS ops (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, site TEXT NOT NULL,
    clock INTEGER NOT NULL, data BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS staged (id TEXT PRIMARY KEY, data BLOB NOT NULL) WITHOUT ROWID;
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
        with self.write() as c:
            c.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

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

    def object_ids(self) -> list[str]:
        return [r[0] for r in self.query("SELECT id FROM objects ORDER BY id")]
