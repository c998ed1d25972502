"""The one on-disk cache: JSON values keyed by (namespace, key) in an sqlite file, safe to share.

Every cache of the project (fine-tuned accuracies, the per-layer latency table, the report's
accuracies and CPU latencies) lives here under a namespace of its own, by default in
``cache_dir()/cache.sqlite``. Why sqlite rather than JSON files: each write is its own committed
transaction (WAL journal, ``synchronous=FULL``), so two processes writing at once never lose an
entry, and a killed process loses at most the write in flight. A read-merge-rewrite JSON file
loses one writer's entries whenever two write at the same time.

A file that is not a usable sqlite database is moved aside to ``<name>.corrupt-<timestamp>``
with one warning, and a fresh, empty store takes its place: a cache is never worth a crash.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from releq_tvm.config import cache_dir

#: File name of the default store under ``cache_dir()``.
DEFAULT_NAME = "cache.sqlite"
#: How long (s) a writer waits for another process's transaction before giving up.
BUSY_TIMEOUT_S = 60.0

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS entries ("
    " namespace TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, updated REAL NOT NULL,"
    " PRIMARY KEY (namespace, key))"
)


class CorruptStoreWarning(RuntimeWarning):
    """A cache file could not be read as a store and was moved aside."""


class Store:
    """JSON values under (namespace, key) in the sqlite file ``path``; every write commits at once.

    Safe across processes (sqlite's locking; writers wait up to :data:`BUSY_TIMEOUT_S`) and
    across threads of one process (one lock around the connection).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = self._open()

    # -- opening -------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: autocommit, so each statement is its own transaction unless we BEGIN
        db = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute(_SCHEMA)
            # a damaged page deeper in the file shows here, not as a crash in the middle of a run
            problems = [row[0] for row in db.execute("PRAGMA quick_check(3)").fetchall()]
            if problems != ["ok"]:
                raise _DamagedStore("quick_check: " + "; ".join(problems))
        except BaseException:
            db.close()
            raise
        return db

    def _open(self) -> sqlite3.Connection:
        for _ in range(3):
            try:
                inode = self.path.stat().st_ino
            except FileNotFoundError:
                inode = None
            try:
                return self._connect()
            except sqlite3.DatabaseError as err:
                if not _is_corruption(err):
                    raise
                self._set_aside(inode, err)
        return self._connect()

    def _set_aside(self, inode: int | None, err: Exception) -> None:
        """Rename the unreadable file (and its WAL leftovers) to ``<name>.corrupt-<timestamp>``."""
        try:
            if self.path.stat().st_ino != inode:
                return  # another process has already replaced it: try again with the new file
        except FileNotFoundError:
            return
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        if aside.exists():
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return  # another process moved it first
        for suffix in ("-wal", "-shm"):
            leftover = self.path.with_name(self.path.name + suffix)
            if leftover.exists():
                os.replace(leftover, aside.with_name(aside.name + suffix))
        reason = " ".join(str(err).split())  # one line, whatever sqlite's message looks like
        warnings.warn(f"cache file {self.path} is damaged or not an sqlite database ({reason}); "
                      f"moved it to {aside.name} and started an empty cache", CorruptStoreWarning, stacklevel=4)

    # -- reading -------------------------------------------------------------------------------
    def get(self, namespace: str, key: str, default: Any = None) -> Any:
        """The value stored under (``namespace``, ``key``), or ``default``."""
        with self._lock:
            row = self._db.execute("SELECT value FROM entries WHERE namespace = ? AND key = ?",
                                   (namespace, key)).fetchone()
        return default if row is None else json.loads(row[0])

    def items(self, namespace: str) -> dict[str, Any]:
        """Every (key, value) of ``namespace``, sorted by key."""
        with self._lock:
            rows = self._db.execute("SELECT key, value FROM entries WHERE namespace = ? ORDER BY key",
                                    (namespace,)).fetchall()
        return {key: json.loads(value) for key, value in rows}

    def count(self, namespace: str) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM entries WHERE namespace = ?", (namespace,)).fetchone()[0])

    def namespaces(self, prefix: str = "") -> Iterator[str]:
        """The namespaces that hold at least one entry and start with ``prefix``."""
        with self._lock:
            rows = self._db.execute("SELECT DISTINCT namespace FROM entries ORDER BY namespace").fetchall()
        return (ns for (ns,) in rows if ns.startswith(prefix))

    # -- writing (each call one committed transaction) ------------------------------------------
    def put(self, namespace: str, key: str, value: Any) -> None:
        """Store ``value`` (anything ``json.dumps`` takes) under (``namespace``, ``key``), replacing it."""
        self.put_many(namespace, {key: value})

    def put_many(self, namespace: str, values: Mapping[str, Any]) -> None:
        """Store several values of one namespace in one transaction (all or none)."""
        if not values:
            return
        now = time.time()
        rows = [(namespace, key, json.dumps(value), now) for key, value in values.items()]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # take the write lock now: no upgrade deadlock
            try:
                self._db.executemany("INSERT OR REPLACE INTO entries (namespace, key, value, updated) "
                                     "VALUES (?, ?, ?, ?)", rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def delete(self, namespace: str, key: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM entries WHERE namespace = ? AND key = ?", (namespace, key))

    def clear(self, namespace: str) -> None:
        """Remove every entry of ``namespace``."""
        with self._lock:
            self._db.execute("DELETE FROM entries WHERE namespace = ?", (namespace,))

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _DamagedStore(sqlite3.DatabaseError):
    """The file opens as a database but sqlite's integrity check finds damage."""


def _is_corruption(err: sqlite3.DatabaseError) -> bool:
    """Not a database / malformed (never "locked" or "busy": those are waits, not damage)."""
    if isinstance(err, _DamagedStore):
        return True
    name = getattr(err, "sqlite_errorname", "")
    if name:
        return name in ("SQLITE_NOTADB", "SQLITE_CORRUPT") or name.startswith("SQLITE_CORRUPT_")
    text = str(err).lower()
    return "not a database" in text or "malformed" in text


_OPEN: dict[tuple[int, Path], Store] = {}


def open_store(path: str | Path | None = None) -> Store:
    """The store at ``path`` (None: ``cache_dir()/cache.sqlite``), one connection per file and process."""
    resolved = Path(path) if path is not None else cache_dir() / DEFAULT_NAME
    key = (os.getpid(), resolved.resolve())  # a forked child opens its own connection
    if key not in _OPEN:
        _OPEN[key] = Store(resolved)
    return _OPEN[key]
