"""New-item events (paper §5, Figure 4): the queue between item creation and the encoder.

An event is a new item's content, ``{"item_id", "image" (PNG bytes), "title",
"category_id"}``; the encoder service embeds it and writes the index table.
Delivery is at-least-once: an event stays pending from `read` until `ack`,
and one that a dead consumer left pending for longer than ``reclaim_after``
seconds is delivered again to the next consumer that reads. Consumers are
idempotent (writing an item's vector twice gives the same table).

An event that can never be embedded (a missing or malformed field, an item id
below 2, a title that is not UTF-8, content the encoder cannot decode) never
blocks the queue: `read` (or the consumer, through `reject`) moves it to a
dead-letter list with the reason and its event id, acknowledged in the same
transaction, and logs it; `dead_letters()` lists them for an operator.

Two backends behind `ItemEvents`, chosen by `open_events(spec)`:

- `SQLiteEvents`, the embedded default: one SQLite file, no server; dead
  letters in its table ``dead_events``;
- `RedisEvents`: a Redis Stream with a consumer group (XADD, XREADGROUP,
  XAUTOCLAIM, XACK), for producers and encoders on many hosts; dead letters
  in the stream ``<stream>:dead``.

Example:

>>> events = open_events("/tmp/events.db")  # doctest: +SKIP
>>> events.publish([{"item_id": 4001, "image": png, "title": "red mug", "category_id": 3}])
>>> for event_id, item in events.read("encoder-1", count=64, block=1.0):
...     ...  # embed, write the index, then
>>> events.ack([event_id])
"""

import contextlib
import logging
import os
import sqlite3
import time

from tfmm.index import FIRST_ID

FIELDS = ("item_id", "image", "title", "category_id")

log = logging.getLogger("tfmm.serving.events")


class BadEvent(ValueError):
    """An event that can never be embedded (missing field, undecodable content)."""


class EventsUnavailable(ConnectionError):
    """The event queue's server cannot be reached (after the client's retries)."""


def check_event(event):
    """Returns the event with typed fields (from `publish`'s dicts, or the stored
    fields `read` gets); BadEvent names the item and the field."""
    if event.get("item_id") is None:
        raise BadEvent(f"new-item event {event!r:.80}: missing field 'item_id'.")
    try:
        item_id = int(event["item_id"])
    except (TypeError, ValueError, OverflowError):  # OverflowError: an infinite REAL in SQLite
        raise BadEvent(f"new-item event {event!r:.80}: item_id {event['item_id']!r:.40} is "
                       "not an integer.") from None
    if item_id < FIRST_ID:
        raise BadEvent(f"new-item event for item {item_id}: item ids start at {FIRST_ID} "
                       "(0 is padding, 1 out-of-vocabulary).")
    where = f"new-item event for item {item_id}"
    try:
        category = int(event.get("category_id") or 0)
        created_at = float(event.get("created_at") or time.time())
    except (TypeError, ValueError, OverflowError) as e:
        raise BadEvent(f"{where}: {e}") from None
    # Ids are int64 everywhere downstream (SQLite, NumPy, the index, the ranker).
    for name, value in (("item_id", item_id), ("category_id", category)):
        if not -2**63 <= value < 2**63:
            raise BadEvent(f"{where}: {name} {value} does not fit in a signed 64-bit integer.")
    image, title = event.get("image") or b"", event.get("title") or ""
    if not isinstance(image, (bytes, bytearray, memoryview)):
        raise BadEvent(f"{where}: the image must be bytes, not {type(image).__name__}.")
    if isinstance(title, bytes):
        try:
            title = title.decode("utf-8")
        except UnicodeDecodeError:
            raise BadEvent(f"{where}: the title is not UTF-8 ({title!r:.40}).") from None
    if not image and not title:
        raise BadEvent(f"{where}: needs an `image` or a `title`.")
    return {"item_id": item_id, "image": bytes(image), "title": str(title),
            "category_id": category, "created_at": created_at}


class ItemEvents:
    """The queue interface; a Kafka client could implement it too."""

    dead_lettered = 0  # events this object moved to the dead-letter list

    def publish(self, events):
        """Appends new-item events (dicts); returns their event ids."""
        raise NotImplementedError

    def read(self, consumer, count=64, block=1.0):
        """Up to `count` (event_id, event) delivered to `consumer`, waiting up to
        `block` seconds for the first. Events left pending by another consumer
        for longer than ``reclaim_after`` come first. Malformed entries (queued
        without `publish`'s checks) are not returned but rejected (`reject`)."""
        raise NotImplementedError

    def ack(self, event_ids):
        """Marks events done; they are never delivered again."""
        raise NotImplementedError

    def pending(self):
        """How many published events are not acknowledged yet."""
        raise NotImplementedError

    def reject(self, rejected):
        """Moves events that can never be embedded, ``[(event_id, reason)]``, to the
        dead-letter list; each is acknowledged with the move and logged."""
        if not rejected:
            return
        self._move_dead(rejected)
        self.dead_lettered += len(rejected)
        for event_id, reason in rejected:
            log.error("event %s of %s moved to the dead-letter list: %s", event_id, self, reason)

    def dead_letters(self, count=None):
        """The oldest `count` (default all) dead letters: dicts of the event's fields
        as stored, plus its ``event_id`` and the ``reason``."""
        raise NotImplementedError

    def _move_dead(self, rejected):
        """Copies the events to the dead-letter list and acknowledges them, atomically."""
        raise NotImplementedError

    def _checked(self, entries):
        """`read`'s (event_id, event) of raw entries; the malformed ones are rejected."""
        good, bad = [], []
        for event_id, fields in entries:
            try:
                good.append((event_id, check_event(fields)))
            except BadEvent as e:
                bad.append((event_id, str(e)))
        self.reject(bad)
        return good


class SQLiteEvents(ItemEvents):
    """The embedded default: events in one SQLite file (WAL, crash-safe)."""

    def __init__(self, path, reclaim_after=5.0, poll=0.005):
        self.path = os.path.abspath(path)
        self.reclaim_after = reclaim_after
        self.poll = poll
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                         "item_id INTEGER NOT NULL, image BLOB, title TEXT, category_id INTEGER, "
                         "created_at REAL NOT NULL, consumer TEXT, delivered_at REAL)")
        # Untyped columns: a dead letter keeps the values exactly as they were queued.
        self._db.execute("CREATE TABLE IF NOT EXISTS dead_events (id INTEGER PRIMARY KEY, "
                         "item_id, image, title, category_id, created_at, reason TEXT NOT NULL, "
                         "dead_at REAL NOT NULL)")

    def __repr__(self):
        return f"SQLiteEvents({self.path})"

    @contextlib.contextmanager
    def _transaction(self):
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def publish(self, events):
        rows = [check_event(e) for e in events]
        with self._transaction() as db:
            ids = [db.execute("INSERT INTO events (item_id, image, title, category_id, created_at) "
                              "VALUES (?, ?, ?, ?, ?)",
                              (r["item_id"], r["image"], r["title"], r["category_id"],
                               r["created_at"])).lastrowid for r in rows]
        return [str(i) for i in ids]

    def _claim(self, consumer, count):
        now = time.time()
        with self._transaction() as db:
            rows = db.execute(
                "SELECT id, item_id, image, title, category_id, created_at FROM events "
                "WHERE delivered_at IS NULL OR delivered_at < ? ORDER BY id LIMIT ?",
                (now - self.reclaim_after, count)).fetchall()
            db.executemany("UPDATE events SET consumer = ?, delivered_at = ? WHERE id = ?",
                           [(consumer, now, r[0]) for r in rows])
        return [(str(r[0]), dict(zip(FIELDS + ("created_at",), r[1:]))) for r in rows]

    def read(self, consumer, count=64, block=1.0):
        deadline = time.monotonic() + block
        while True:
            got = self._checked(self._claim(consumer, count))
            if got or time.monotonic() >= deadline:
                return got
            time.sleep(self.poll)

    def _move_dead(self, rejected):
        now = time.time()
        with self._transaction() as db:
            for event_id, reason in rejected:
                db.execute("INSERT OR REPLACE INTO dead_events SELECT id, item_id, image, title, "
                           "category_id, created_at, ?, ? FROM events WHERE id = ?",
                           (reason, now, int(event_id)))
                db.execute("DELETE FROM events WHERE id = ?", (int(event_id),))

    def dead_letters(self, count=None):
        rows = self._db.execute("SELECT id, reason, item_id, image, title, category_id, "
                                "created_at FROM dead_events ORDER BY dead_at, id LIMIT ?",
                                (-1 if count is None else count,))
        return [dict(zip(("event_id", "reason") + FIELDS + ("created_at",), (str(r[0]), *r[1:])))
                for r in rows]

    def ack(self, event_ids):
        self._db.executemany("DELETE FROM events WHERE id = ?", [(int(i),) for i in event_ids])

    def pending(self):
        return self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0]

    def close(self):
        self._db.close()


# One atomic script: each entry's fields are copied to the dead-letter stream with
# its id and the reason, then acknowledged and deleted. An entry already gone
# (acknowledged by a consumer that reclaimed it) is only acknowledged.
# KEYS: the stream, the dead-letter stream. ARGV: the group, then (id, reason) pairs.
_DEAD = """
for i = 2, #ARGV, 2 do
  local entry = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])[1]
  if entry then
    local fields = entry[2]
    table.insert(fields, 'event_id')
    table.insert(fields, ARGV[i])
    table.insert(fields, 'reason')
    table.insert(fields, ARGV[i + 1])
    redis.call('XADD', KEYS[2], '*', unpack(fields))
  end
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
  redis.call('XDEL', KEYS[1], ARGV[i])
end
"""


class RedisEvents(ItemEvents):
    """A Redis Stream read by a consumer group (created on first use)."""

    def __init__(self, url, stream="tfmm:new_items", group="encoder", reclaim_after=5.0):
        from tfmm.index import redis_client

        self.client, self.address = redis_client(url)
        self.stream, self.group = stream, group
        self.dead_stream = f"{stream}:dead"
        self._dead = self.client.register_script(_DEAD)
        self.reclaim_after = reclaim_after
        self._group_ready = False

    def __repr__(self):
        return f"RedisEvents({self.address}, stream={self.stream}, group={self.group})"

    @contextlib.contextmanager
    def _reachable(self):
        """Connection errors (after the client's retries) as EventsUnavailable; a
        stream lost with a restarted server gets its group again on the next call."""
        import redis

        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as e:
            self._group_ready = False
            raise EventsUnavailable(f"Redis events at {self.address} are unreachable: "
                                    f"{e}") from e
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            self._group_ready = False
            raise EventsUnavailable(f"Redis events at {self.address}: the consumer group "
                                    f"{self.group} is gone (a restarted server?); it is "
                                    "created again on the next read.") from e

    def _ensure_group(self):
        import redis

        if not self._group_ready:
            try:
                self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
            except redis.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise
            self._group_ready = True

    def publish(self, events):
        rows = [check_event(e) for e in events]
        pipe = self.client.pipeline(transaction=True)
        for r in rows:
            pipe.xadd(self.stream, r)
        with self._reachable():
            return [i.decode() for i in pipe.execute()]

    @staticmethod
    def _decode(fields):
        """Field names as str (values stay bytes: `check_event` parses them)."""
        return {k.decode("utf-8", "replace"): v for k, v in fields.items()}

    def read(self, consumer, count=64, block=1.0):
        with self._reachable():
            self._ensure_group()
            # Work a dead consumer left pending comes first (at-least-once).
            _, claimed, _ = self.client.xautoclaim(self.stream, self.group, consumer,
                                                   min_idle_time=int(self.reclaim_after * 1000),
                                                   start_id="0-0", count=count)
            entries = [(i, f) for i, f in claimed if f]
            if not entries:
                reply = self.client.xreadgroup(self.group, consumer, {self.stream: ">"},
                                               count=count, block=max(1, int(block * 1000)))
                entries = reply[0][1] if reply else []
        return self._checked([(i.decode(), self._decode(f)) for i, f in entries])

    def ack(self, event_ids):
        if event_ids:
            pipe = self.client.pipeline(transaction=True)
            pipe.xack(self.stream, self.group, *event_ids)
            pipe.xdel(self.stream, *event_ids)
            with self._reachable():
                pipe.execute()

    def pending(self):
        with self._reachable():
            return self.client.xlen(self.stream)

    def _move_dead(self, rejected):
        args = [self.group] + [a for event_id, reason in rejected for a in (event_id, reason)]
        with self._reachable():
            self._dead(keys=[self.stream, self.dead_stream], args=args)

    def dead_letters(self, count=None):
        with self._reachable():
            entries = self.client.xrange(self.dead_stream, count=count)
        letters = []
        for _, fields in entries:
            letter = self._decode(fields)
            letter["event_id"], letter["reason"] = (letter[k].decode("utf-8", "replace")
                                                    for k in ("event_id", "reason"))
            letters.append(letter)
        return letters


def open_events(spec, **kwargs):
    """A `redis://` URL gives `RedisEvents`; anything else is a `SQLiteEvents` file."""
    if str(spec).startswith(("redis://", "rediss://", "unix://")):
        return RedisEvents(spec, **kwargs)
    return SQLiteEvents(spec, **kwargs)
