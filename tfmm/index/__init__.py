"""The multimodal index table: item id -> vector, with versions and timestamps.

The embedded default, `SQLiteIndex`, needs no server: one SQLite file (stdlib
`sqlite3`) in WAL mode, so writes are atomic and crash-safe and many
processes can read while one writes. `RedisIndex` implements the same
`VectorIndex` interface on a Redis server for many readers and writers.
Vectors are float32 bytes in both. `open_index` picks the backend from a
file path or a ``redis://`` URL. `tfmm.index.files` and
``python -m tfmm.index import|export`` move vectors by raw item id between
an index and Parquet, CSV or ``.npy`` files.
"""

import contextlib
import json
import os
import sqlite3
import time
import urllib.parse

import numpy as np
import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

# tfmm.data.schema.FIRST_ID (0 is padding, 1 out-of-vocabulary), not imported from
# there: serving processes that only read or write vectors need no TensorFlow.
FIRST_ID = 2


class IndexNotFound(ValueError):
    """Opening an index that does not exist yet without the `dim` to create it."""


class IndexUnavailable(ConnectionError):
    """The index's server cannot be reached (after the client's retries)."""


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

    def count(self):
        """How many items the index holds."""
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

    def catalogue(self):
        """The fingerprint `claim` recorded, or None when no writer claimed the index."""
        raise NotImplementedError

    def _set_meta(self, key, value):
        raise NotImplementedError

    def _get_meta(self, key):
        """The meta value of `key` (str), or None."""
        raise NotImplementedError

    def describe(self, encoder):
        """Records what made the index's vectors: `encoder`, a JSON-able dict (the
        pre-training's source and checks, or an import's file), replacing any earlier
        record; the CTR job prints it (`tfmm.encoder_checks`)."""
        self._set_meta("encoder", json.dumps(encoder, sort_keys=True))

    def description(self):
        """The record `describe` wrote last, or None."""
        value = self._get_meta("encoder")
        return None if value is None else json.loads(value)

    def snapshot(self, num_items):
        """All vectors as a `tfmm.data.Vectors` table over dense ids [0, num_items),
        read as of one moment: never part of a put."""
        from tfmm.data import Vectors

        ids, vectors = self._items_below(num_items)
        return Vectors.from_items(ids, vectors, num_items, source=repr(self))

    def _items_below(self, num_items):
        """(ids, vectors) of every item with id < `num_items`, in one consistent read."""
        raise NotImplementedError

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
        low = ids < FIRST_ID
        if low.any():
            raise ValueError(f"{self}: item id {ids[low][0]} is not an item ({low.sum()} such "
                             f"ids): ids start at {FIRST_ID}, 0 is padding and 1 "
                             "out-of-vocabulary; nothing was written.")
        return ids, vectors


class SQLiteIndex(VectorIndex):
    """File-backed index in one SQLite file (created with ``dim`` if new)."""

    def __init__(self, path, dim=None):
        self.path = os.path.abspath(path)
        if os.path.isdir(self.path):
            raise ValueError(f"{path} is a directory; an index is a file (e.g. "
                             f"{os.path.join(path, 'vectors.db')}).")
        new = not os.path.exists(self.path)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                                       check_same_thread=False)
        except sqlite3.Error as e:  # e.g. a folder that is not writable
            raise OSError(f"{self.path}: cannot open the index file ({e}).") from None
        try:
            self._create(dim)
        except BaseException:
            if new:  # a half-made file would read as an index without a width
                self.close()
                remove_files(self.path)
            raise

    def _create(self, dim):
        with self._valid():
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            self._db.execute("CREATE TABLE IF NOT EXISTS vectors (id INTEGER PRIMARY KEY, "
                             "vector BLOB NOT NULL, version INTEGER NOT NULL, "
                             "updated_at REAL NOT NULL)")
            row = self._db.execute("SELECT value FROM meta WHERE key='dim'").fetchone()
            if row is None:
                if dim is None:
                    raise IndexNotFound(f"{self.path}: a new index needs `dim`.")
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('dim', ?)", (str(int(dim)),))
                row = self._db.execute("SELECT value FROM meta WHERE key='dim'").fetchone()
        self.dim = int(row[0])
        if dim is not None and int(dim) != self.dim:
            raise ValueError(f"{self.path}: the index holds {self.dim}-d vectors, asked for {dim}.")

    @contextlib.contextmanager
    def _valid(self):
        """SQLite's "file is not a database" and "malformed" errors as a ValueError naming
        the file (they name none); they can surface at open or at any later read. A full
        disk, a failed write or open: an OSError naming the file."""
        try:
            yield
        except sqlite3.DatabaseError as e:
            code = getattr(e, "sqlite_errorcode", None) or 0
            if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
                raise ValueError(f"{self.path} is not a valid index: the SQLite file is "
                                 f"corrupt or not a database ({e}).") from None
            if code & 0xFF in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR,
                               sqlite3.SQLITE_CANTOPEN):  # extended codes: the low byte
                raise OSError(f"{self.path}: {e} (SQLite); nothing was written.") from None
            raise

    def __repr__(self):
        return f"SQLiteIndex({self.path}, dim={self.dim})"

    def put(self, ids, vectors):
        ids, vectors = self.check(ids, vectors)
        now = time.time()
        db = self._db
        with self._valid():
            db.execute("BEGIN IMMEDIATE")
            try:
                version = int(db.execute(
                    "SELECT COALESCE(MAX(version), 0) FROM vectors").fetchone()[0]) + 1
                db.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?, ?, ?)",
                               ((int(i), v.tobytes(), version, now)
                                for i, v in zip(ids, vectors)))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # SQLite ends it itself on some errors (a full disk)
                    db.execute("ROLLBACK")
                raise
        return version

    def _rows(self, ids, columns):
        """{id: columns} of the `ids` in the index, in one statement: a statement reads one
        snapshot of the file, so however many ids, never part of a put."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        query = (f"SELECT id, {columns} FROM vectors "
                 "WHERE id IN (SELECT value FROM json_each(?))")
        with self._valid():
            found = {row[0]: row[1:]
                     for row in self._db.execute(query, (json.dumps(ids.tolist()),))}
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

    def _items_below(self, num_items):
        with self._valid():
            rows = self._db.execute("SELECT id, vector FROM vectors WHERE id < ? ORDER BY id",
                                    (int(num_items),)).fetchall()
        ids = np.array([r[0] for r in rows], np.int64)
        vectors = np.frombuffer(b"".join(r[1] for r in rows), np.float32)
        return ids, vectors.reshape(len(ids), self.dim)

    def ids(self):
        with self._valid():
            rows = self._db.execute("SELECT id FROM vectors ORDER BY id").fetchall()
        return np.array([r[0] for r in rows], np.int64)

    def count(self):
        with self._valid():
            return int(self._db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0])

    def claim(self, catalogue):
        with self._valid():
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('catalogue', ?)",
                             (str(catalogue),))
        held = self.catalogue()
        if held != str(catalogue):
            raise ValueError(f"{self.path} holds vectors of another catalogue ({held}, not "
                             f"{catalogue}); use another index for this data directory.")

    def catalogue(self):
        return self._get_meta("catalogue")

    def _set_meta(self, key, value):
        with self._valid():
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def _get_meta(self, key):
        with self._valid():
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else row[0]

    def close(self):
        self._db.close()


def redact(spec):
    """`spec` with a Redis URL's password (``[user]:password@`` and ``?password=``) as
    ``***``, the rest kept: safe for logs, metrics files and errors."""
    if not is_redis(spec):
        return spec
    if _misplaced_at(spec):  # where the password ends is unknown: all up to the last '@'
        return f"{urllib.parse.urlsplit(str(spec)).scheme}://***@{str(spec).rpartition('@')[2]}"
    parts = urllib.parse.urlsplit(str(spec))
    netloc, query = parts.netloc, urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    if parts.password is not None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.partition(':')[0]}:***@{host}"
    if any(k == "password" for k, _ in query):
        query = urllib.parse.urlencode([(k, "***" if k == "password" else v) for k, v in query],
                                       safe="*")
    else:
        query = parts.query
    # Joined by hand: urlunsplit drops the empty host of unix:///path.
    return (f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
            + (f"#{parts.fragment}" if parts.fragment else ""))


def _misplaced_at(spec):
    """Whether an '@' follows a URL's host part where a password holding an unescaped '?',
    '#' or '/' ended it early: the host part then does not parse (a parser takes part of
    the password for the port) or the '@' is where none belongs (path, a query name).
    An '@' in a query value (``?password=p@ss``) is fine."""
    spec = str(spec)
    parts = urllib.parse.urlsplit(spec)
    if "@" not in spec[spec.index("://") + 3 + len(parts.netloc):]:
        return False
    try:
        _ = parts.port  # ValueError unless a number in range
        host = parts.path if parts.scheme == "unix" else parts.hostname
    except ValueError:
        host = None
    names = [k for k, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)]
    return not host or "@" in parts.path + parts.fragment or any("@" in k for k in names)


def redis_url(url=None):
    """`url`, else ``$TFMM_REDIS_URL``, else the local default server."""
    return url or os.environ.get("TFMM_REDIS_URL") or "redis://127.0.0.1:6379/0"


def _checked_url(url=None):
    """`redis_url(url)`; ValueError, showing none of the password, when it is malformed."""
    url = redis_url(url)
    if _misplaced_at(url):
        raise ValueError(f"{redact(url)} is not a valid Redis URL: an '@' after the host; a "
                         "password holding '?', '#', '/' or '@' must be percent-encoded (%3F, "
                         "%23, %2F, %40), or given in $TFMM_REDIS_PASSWORD.")
    return url


def redis_client(url=None, retries=3, backoff=0.01, connect_timeout=0.5, timeout=5.0):
    """A redis-py client for `url` and the server's "host:port" or socket path (for errors
    and logs: never the password).

    Args:
      url: ``redis://[[user]:password@]host:port/db`` (also ``rediss://``,
        ``unix://[[user]:password@]/socket/path?db=0`` and ``?password=``);
        default `redis_url()`. Without a password in the URL,
        ``$TFMM_REDIS_PASSWORD`` is used, so it need not be on a command line.
      retries, backoff: a failed command is retried `retries` times after
        exponential sleeps of ``backoff * 2**k`` seconds (k = 1, 2, ...; 0.14 s
        in all by default). Each retry opens a fresh connection, so a client
        works again, without any step, once a restarted server is back.
      connect_timeout, timeout: socket timeouts in seconds for connecting and
        for a command's reply (``?socket_connect_timeout=`` and
        ``?socket_timeout=`` in the URL win). A hung server costs
        ``retries + 1`` timeouts: an online predictor wants a far smaller
        `timeout` than the default, which leaves room for bulk writes.
    """
    url = _checked_url(url)
    try:
        client = redis.Redis.from_url(
            url, password=os.environ.get("TFMM_REDIS_PASSWORD"),  # the URL's wins
            retry=Retry(ExponentialBackoff(cap=1.0, base=backoff), retries),
            socket_connect_timeout=connect_timeout, socket_timeout=timeout)
    except ValueError as e:  # a port that is no number, an unknown scheme
        password = urllib.parse.urlsplit(url).password
        reason = str(e).replace(password, "***") if password else str(e)
        raise ValueError(f"{redact(url)} is not a valid Redis URL: {reason}") from None
    options = client.connection_pool.connection_kwargs
    return client, options.get("path") or f"{options.get('host')}:{options.get('port')}"


# One atomic script: the version comes from INCR and is stamped on every item in
# commit order (as SQLite's MAX + 1 in its transaction), with no WATCH retry loop
# that a stream of small puts could starve a bulk put with. It also records `dim`
# again, so an index emptied by a Redis restart describes itself once written, and
# each item's version in the log (a snapshot reads what changed while it ran).
# KEYS: version counter, id set, meta hash, log, then (vector key, stamp key) per item.
# ARGV: the time, dim, then (id, vector bytes) per item.
_PUT = """
redis.call('HSETNX', KEYS[3], 'dim', ARGV[2])
local dim = redis.call('HGET', KEYS[3], 'dim')
if dim ~= ARGV[2] then
  return redis.error_reply('DIM the index now holds ' .. dim .. '-d vectors')
end
local version = redis.call('INCR', KEYS[1])
local stamp = version .. ' ' .. ARGV[1]
for i = 3, #ARGV, 2 do
  redis.call('SET', KEYS[i + 2], ARGV[i + 1])
  redis.call('SET', KEYS[i + 3], stamp)
  redis.call('SADD', KEYS[2], ARGV[i])
  redis.call('ZADD', KEYS[4], version, ARGV[i])
end
return version
"""

# A snapshot's last step, atomic: the version, and the ids below num_items that puts
# after version `base` wrote (from the log), with their vectors now.
# KEYS: version counter, log. ARGV: base, the vector keys' prefix, num_items, chunk.
_CHANGED = """
local now = tonumber(redis.call('GET', KEYS[1]) or '0')
local ids, values = {}, {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf')) do
  if tonumber(id) < tonumber(ARGV[3]) then table.insert(ids, id) end
end
for s = 1, #ids, tonumber(ARGV[4]) do
  local keys = {}
  for i = s, math.min(s + tonumber(ARGV[4]) - 1, #ids) do table.insert(keys, ARGV[2] .. ids[i]) end
  for _, v in ipairs(redis.call('MGET', unpack(keys))) do table.insert(values, v) end
end
return {now, ids, values}
"""


class RedisIndex(VectorIndex):
    """Index on a Redis server, under keys starting with ``<prefix>:``.

    Layout: ``<prefix>:v:<id>`` the float32 bytes of one vector (`get` is one
    MGET), ``<prefix>:t:<id>`` "<version> <updated_at>", ``<prefix>:ids`` the
    set of ids, ``<prefix>:version`` the put counter, ``<prefix>:log`` a sorted
    set of ids by the version that last wrote them, ``<prefix>:meta`` a hash
    with ``dim`` and ``catalogue``. Several indexes share a database with
    different prefixes.

    `snapshot` never holds the server for the whole catalogue (Redis runs one
    command at a time: a MULTI of every vector stalled every other client,
    predictors included): it reads in commands of ``SNAPSHOT_CHUNK`` keys, then
    re-reads what puts wrote meanwhile (the log), the last of it in one small
    atomic script, so it still shows one moment of the index.

    Args:
      url: as `redis_client`'s, plus an optional ``?prefix=name`` query.
      dim: vector width; needed when the index is new.
      prefix: key prefix (default "tfmm"; the URL's ``prefix`` wins).
      **client: `redis_client`'s retries, backoff and timeouts. When they are
        spent, methods raise `IndexUnavailable` naming host:port; the same
        object works again once the server is back.
    """

    CHUNK = 10_000  # keys per MGET of a longer `get` (one MULTI/EXEC)
    SNAPSHOT_CHUNK = 1000  # keys per command of a snapshot (about a millisecond of the server)
    CATCH_UP = 3  # chunked re-reads of a snapshot's changed items before the atomic one

    def __init__(self, url=None, dim=None, prefix="tfmm", **client):
        parts = urllib.parse.urlsplit(_checked_url(url))
        query = dict(urllib.parse.parse_qsl(parts.query))
        self.prefix = query.pop("prefix", prefix)  # ours, not a redis-py option
        url = parts._replace(query=urllib.parse.urlencode(query)).geturl()
        if not parts.netloc:  # unix:///path: urlunsplit drops the empty authority's "//"
            url = url.replace(f"{parts.scheme}:", f"{parts.scheme}://", 1)
        self._redis, self.address = redis_client(url, **client)
        db = self._redis.connection_pool.connection_kwargs.get("db", 0)
        # Never the password: this names the index in errors and logs.
        self.location = f"{parts.scheme}://{self.address}/{db} prefix={self.prefix}"
        self._put = self._redis.register_script(_PUT)
        self._changed = self._redis.register_script(_CHANGED)
        held = self._meta("dim", None if dim is None else int(dim))
        if held is None:
            raise IndexNotFound(f"{self.location}: a new index needs `dim`.")
        self.dim = int(held)
        if dim is not None and int(dim) != self.dim:
            raise ValueError(f"{self.location}: the index holds {self.dim}-d vectors, "
                             f"asked for {dim}.")

    def __repr__(self):
        return f"RedisIndex({self.location}, dim={self.dim})"

    def _key(self, *parts):
        return ":".join((self.prefix, *map(str, parts)))

    def _meta(self, field, value=None):
        """A field of the meta hash (bytes or None), first set to `value` if unset.

        The first writer wins (HSETNX); set and read are one MULTI/EXEC round trip.
        """
        pipe = self._redis.pipeline()
        if value is not None:
            pipe.hsetnx(self._key("meta"), field, value)
        pipe.hget(self._key("meta"), field)
        with self._reachable():
            return pipe.execute()[-1]

    @contextlib.contextmanager
    def _reachable(self):
        """Raises the client's connection and login errors (retries spent) as IndexUnavailable."""
        try:
            yield
        except redis.AuthenticationError as e:
            raise IndexUnavailable(f"Redis index at {self.address} refused the credentials ({e}); "
                                   "give the password in the URL or $TFMM_REDIS_PASSWORD.") from e
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise IndexUnavailable(f"Redis index at {self.address} is unreachable: {e}") from e

    def _mget(self, kind, ids):
        """(ids, keys, values) of `kind` keys as of one moment: a put between MGET chunks
        would otherwise show half of it."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        keys = [f"{self.prefix}:{kind}:{i}" for i in ids.tolist()]
        with self._reachable():
            if len(keys) <= self.CHUNK:
                return ids, keys, self._redis.mget(keys) if keys else []
            pipe = self._redis.pipeline(transaction=True)  # MULTI/EXEC
            for start in range(0, len(keys), self.CHUNK):
                pipe.mget(keys[start:start + self.CHUNK])
            replies = pipe.execute()
        return ids, keys, [value for chunk in replies for value in chunk]

    def put(self, ids, vectors):
        """Writes all items or none, in one atomic script.

        A connection lost before the reply is retried, so a put that had
        already run may run twice: the same vectors under the next version.
        """
        ids, vectors = self.check(ids, vectors)
        keys = [self._key("version"), self._key("ids"), self._key("meta"), self._key("log")]
        args = [repr(time.time()), self.dim]
        for i, v in zip(ids.tolist(), vectors):
            keys += [self._key("v", i), self._key("t", i)]
            args += [i, v.tobytes()]
        with self._reachable():
            try:
                return int(self._put(keys=keys, args=args))
            except redis.ResponseError as e:
                if not str(e).startswith("DIM "):
                    raise
                raise ValueError(f"{self}: {str(e)[4:]} (recreated since this object opened "
                                 "it); nothing was written.") from None

    def get(self, ids):
        ids, keys, blobs = self._mget("v", ids)
        return self._vectors(keys, blobs)

    def _vectors(self, keys, blobs):
        size = 4 * self.dim
        missing = bytes(size)
        for key, blob in zip(keys, blobs):
            if blob is not None and len(blob) != size:
                raise ValueError(f"{self}: key {key} holds {len(blob)} bytes, not a "
                                 f"{self.dim}-d float32 vector ({size} bytes); it was not "
                                 "written by this index.")
        present = np.array([blob is not None for blob in blobs], bool)
        joined = bytearray(b"".join(missing if blob is None else blob for blob in blobs))
        return np.frombuffer(joined, np.float32).reshape(len(keys), self.dim), present

    def _items_below(self, num_items):
        """Every item once, `SNAPSHOT_CHUNK` keys a command; then, until no put came
        between, the items that puts wrote since the last pass (the log), read again;
        after `CATCH_UP` such passes the rest in one atomic script. Each value read is
        then the item's value at the last pass's moment, so the whole is one moment."""
        blobs, chunk = {}, self.SNAPSHOT_CHUNK

        def read(ids):
            for start in range(0, len(ids), chunk):
                part = ids[start:start + chunk]
                blobs.update(zip(part, self._redis.mget([self._key("v", i) for i in part])))

        def version():
            return int(self._redis.get(self._key("version")) or 0)

        with self._reachable():
            base = version()  # every put after this one is in the log
            read([int(m) for m in self._redis.sscan_iter(self._key("ids"), count=chunk)
                  if int(m) < num_items])
            for _ in range(self.CATCH_UP):
                pipe = self._redis.pipeline(transaction=True)  # two small reads, one moment
                pipe.get(self._key("version"))
                pipe.zrangebyscore(self._key("log"), f"({base}", "+inf")
                now, changed = pipe.execute()
                now = int(now or 0)
                if now == base:
                    break
                self._check_not_emptied(now, base)
                read([int(i) for i in changed if int(i) < num_items])
                base = now
            else:
                now, changed, values = self._changed(
                    keys=[self._key("version"), self._key("log")],
                    args=[base, self._key("v", ""), int(num_items), chunk])
                self._check_not_emptied(int(now), base)
                blobs.update(zip(map(int, changed), values))
        ids = np.array(sorted(blobs), np.int64)
        vectors, present = self._vectors([self._key("v", i) for i in ids.tolist()],
                                          [blobs[i] for i in ids.tolist()])
        return ids[present], vectors[present]

    def _check_not_emptied(self, now, base):
        if now < base:  # the counter went back: the server restarted without its data
            raise IndexUnavailable(f"{self} was emptied while a snapshot read it (a restarted "
                                   "Redis without persistence?); nothing was returned.")

    def versions(self, ids):
        ids, _, stamps = self._mget("t", ids)
        stamps = [(0, np.nan) if s is None else s.split() for s in stamps]
        return (np.array([int(s[0]) for s in stamps], np.int64),
                np.array([float(s[1]) for s in stamps], np.float64))

    def ids(self):
        with self._reachable():
            members = self._redis.smembers(self._key("ids"))
        return np.array(sorted(int(m) for m in members), np.int64)

    def count(self):
        with self._reachable():
            return int(self._redis.scard(self._key("ids")))

    def claim(self, catalogue):
        held = self._meta("catalogue", str(catalogue)).decode()
        if held != str(catalogue):
            raise ValueError(f"{self.location} holds vectors of another catalogue ({held}, not "
                             f"{catalogue}); use another index (or prefix) for this data "
                             "directory.")

    def catalogue(self):
        return self._get_meta("catalogue")

    def _set_meta(self, key, value):
        with self._reachable():
            self._redis.hset(self._key("meta"), key, value)

    def _get_meta(self, key):
        held = self._meta(key)
        return None if held is None else held.decode()

    def close(self):
        self._redis.close()


def is_redis(spec):
    """Whether an index spec is a Redis URL (else a SQLite file path)."""
    return str(spec).startswith(("redis://", "rediss://", "unix://"))


def remove_files(path):
    """Deletes a SQLite index file and its write-ahead log and shared memory files."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path + suffix)


def local_index(spec):
    """The file of a SQLite index spec; None for a Redis URL (or no spec)."""
    return None if not spec or is_redis(spec) else spec


def open_index(spec, dim=None):
    """The index at `spec`: a ``redis://``, ``rediss://`` or ``unix://`` URL (`RedisIndex`)
    or a file path (`SQLiteIndex`).

    `dim` is needed to create a new index and checked against an existing one.
    """
    return RedisIndex(spec, dim=dim) if is_redis(spec) else SQLiteIndex(spec, dim=dim)


def is_empty(spec):
    """Whether the index at `spec` does not exist yet or holds no vectors; creates nothing."""
    if not is_redis(spec) and not os.path.exists(spec):
        return True  # opening would create the file
    try:
        with contextlib.closing(open_index(spec)) as index:
            return index.count() == 0
    except IndexNotFound:
        return True
