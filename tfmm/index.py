"""The multimodal index table: item id -> vector, with versions and timestamps.

The embedded default, `SQLiteIndex`, needs no server: one SQLite file (stdlib
`sqlite3`) in WAL mode, so writes are atomic and crash-safe and many
processes can read while one writes. Vectors are float32 bytes. A Redis
backend implements the same `VectorIndex` interface for many writers.
"""

import os
import sqlite3
import time

import numpy as np


class VectorIndex:
    """What every backend provides. ``dim`` is fixed when the index is created."""

    dim: int

    def put(self, ids, vectors):
        """Writes vectors [n, dim] for item ids [n], all or none; returns the new version."""
        raise NotImplementedError

    def get(self, ids):
        """Returns (vectors [n, dim] float32, found [n] bool); missing rows are zeros."""
        raise NotImplementedError

    def ids(self):
        """All item ids in the index, sorted."""
        raise NotImplementedError

    def versions(self, ids):
        """(version [n] int64, updated_at [n] float64 seconds); 0 and NaN when missing."""
        raise NotImplementedError

    def claim(self, catalogue):
        """Marks the index as holding vectors of `catalogue` (a fingerprint).

        Raises ValueError when it already holds another catalogue's vectors:
        item ids of two datasets are unrelated.
        """
        raise NotImplementedError

    def snapshot(self, num_items):
        """All vectors as a `tfmm.data.Vectors` table over dense ids [0, num_items)."""
        from tfmm.data import Vectors

        ids = self.ids()
        ids = ids[ids < num_items]
        vectors, _ = self.get(ids)
        return Vectors.from_items(ids, vectors, num_items)

    def check(self, ids, vectors):
        """Validated (ids int64 [n], vectors float32 [n, dim]); errors name the item."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"{self}: vectors must be [n, {self.dim}], got {vectors.shape}.")
        if len(vectors) != len(ids):
            raise ValueError(f"{self}: {len(ids)} ids but {len(vectors)} vectors.")
        bad = ~np.isfinite(vectors).all(axis=1)
        if bad.any():
            raise ValueError(f"{self}: the vector of item {ids[bad][0]} has NaN or Inf "
                             f"({bad.sum()} such items); nothing was written.")
        if len(np.unique(ids)) != len(ids):
            raise ValueError(f"{self}: duplicate item ids in one put; nothing was written.")
        return ids, vectors


class SQLiteIndex(VectorIndex):
    """File-backed index in one SQLite file (created with ``dim`` if new)."""

    def __init__(self, path, dim=None):
        self.path = os.path.abspath(path)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        self._db.execute("CREATE TABLE IF NOT EXISTS vectors (id INTEGER PRIMARY KEY, "
                         "vector BLOB NOT NULL, version INTEGER NOT NULL, updated_at REAL NOT NULL)")
        row = self._db.execute("SELECT value FROM meta WHERE key='dim'").fetchone()
        if row is None:
            if dim is None:
                raise ValueError(f"{self.path}: a new index needs `dim`.")
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('dim', ?)", (str(int(dim)),))
            row = self._db.execute("SELECT value FROM meta WHERE key='dim'").fetchone()
        self.dim = int(row[0])
        if dim is not None and int(dim) != self.dim:
            raise ValueError(f"{self.path}: the index holds {self.dim}-d vectors, asked for {dim}.")

    def __repr__(self):
        return f"SQLiteIndex({self.path}, dim={self.dim})"

    def put(self, ids, vectors):
        ids, vectors = self.check(ids, vectors)
        now = time.time()
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            version = int(db.execute("SELECT COALESCE(MAX(version), 0) FROM vectors").fetchone()[0]) + 1
            db.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?, ?, ?)",
                           ((int(i), v.tobytes(), version, now) for i, v in zip(ids, vectors)))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return version

    def _rows(self, ids, columns):
        ids = np.asarray(ids, np.int64).reshape(-1)
        found = {}
        for start in range(0, len(ids), 900):  # SQLite's bound-parameter limit
            chunk = [int(i) for i in ids[start:start + 900]]
            query = f"SELECT id, {columns} FROM vectors WHERE id IN ({','.join('?' * len(chunk))})"
            found.update((row[0], row[1:]) for row in self._db.execute(query, chunk))
        return ids, found

    def get(self, ids):
        ids, rows = self._rows(ids, "vector")
        vectors = np.zeros((len(ids), self.dim), np.float32)
        present = np.zeros(len(ids), bool)
        for k, i in enumerate(ids):
            row = rows.get(int(i))
            if row is not None:
                vectors[k] = np.frombuffer(row[0], np.float32)
                present[k] = True
        return vectors, present

    def versions(self, ids):
        ids, rows = self._rows(ids, "version, updated_at")
        version = np.array([rows.get(int(i), (0, np.nan))[0] for i in ids], np.int64)
        updated = np.array([rows.get(int(i), (0, np.nan))[1] for i in ids], np.float64)
        return version, updated

    def ids(self):
        return np.array([r[0] for r in self._db.execute("SELECT id FROM vectors ORDER BY id")],
                        np.int64)

    def claim(self, catalogue):
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('catalogue', ?)", (str(catalogue),))
        held = self._db.execute("SELECT value FROM meta WHERE key='catalogue'").fetchone()[0]
        if held != str(catalogue):
            raise ValueError(f"{self.path} holds vectors of another catalogue ({held}, not "
                             f"{catalogue}); use another index for this data directory.")

    def close(self):
        self._db.close()
