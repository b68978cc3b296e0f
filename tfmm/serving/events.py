"""New-item events (paper §5, Figure 4): the queue between item creation and the encoder.

An event is a new item's content, ``{"item_id", "image" (PNG bytes), "title",
"category_id"}``; the encoder service embeds it and writes the index table.
Delivery is at-least-once: an event stays pending from `read` until `ack`,
and one that a dead consumer left pending for longer than ``reclaim_after``
seconds is delivered again to the next consumer that reads. Consumers are
idempotent (writing an item's vector twice gives the same table).

Two backends behind `ItemEvents`, chosen by `open_events(spec)`:

- `SQLiteEvents`, the embedded default: one SQLite file, no server;
- `RedisEvents`: a Redis Stream with a consumer group (XADD, XREADGROUP,
  XAUTOCLAIM, XACK), for producers and encoders on many hosts.

Example:

>>> events = open_events("/tmp/events.db")  # doctest: +SKIP
>>> events.publish([{"item_id": 4001, "image": png, "title": "red mug", "category_id": 3}])
>>> for event_id, item in events.read("encoder-1", count=64, block=1.0):
...     ...  # embed, write the index, then
>>> events.ack([event_id])
"""

import contextlib
import os
import sqlite3
import time

FIELDS = ("item_id", "image", "title", "category_id")


class BadEvent(ValueError):
    """An event that can never be embedded (missing field, undecodable content)."""


class EventsUnavailable(ConnectionError):
    """The event queue's server cannot be reached (after the client's retries)."""


def check_event(event):
    """Returns the event with typed fields; BadEvent names the field."""
    missing = [f for f in ("item_id",) if f not in event]
    if missing:
        raise BadEvent(f"new-item event {event!r:.80}: missing field {missing[0]!r}.")
    try:
        item_id = int(event["item_id"])
        category = int(event.get("category_id", 0))
    except (TypeError, ValueError) as e:
        raise BadEvent(f"new-item event for item {event.get('item_id')!r}: {e}") from None
    image, title = event.get("image", b""), event.get("title", "")
    if isinstance(title, bytes):
        title = title.decode("utf-8")
    if not image and not title:
        raise BadEvent(f"new-item event for item {item_id}: needs an `image` or a `title`.")
    return {"item_id": item_id, "image": bytes(image), "title": str(title),
            "category_id": category, "created_at": float(event.get("created_at", time.time()))}


class ItemEvents:
    """The queue interface; a Kafka client could implement it too."""

    def publish(self, events):
        """Appends new-item events (dicts); returns their event ids."""
        raise NotImplementedError

    def read(self, consumer, count=64, block=1.0):
        """Up to `count` (event_id, event) delivered to `consumer`, waiting up to
        `block` seconds for the first. Events left pending by another consumer
        for longer than ``reclaim_after`` come first."""
        raise NotImplementedError

    def ack(self, event_ids):
        """Marks events done; they are never delivered again."""
        raise NotImplementedError

    def pending(self):
        """How many published events are not acknowledged yet."""
        raise NotImplementedError


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

    def __repr__(self):
        return f"SQLiteEvents({self.path})"

    def publish(self, events):
        rows = [check_event(e) for e in events]
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            ids = [db.execute("INSERT INTO events (item_id, image, title, category_id, created_at) "
                              "VALUES (?, ?, ?, ?, ?)",
                              (r["item_id"], r["image"], r["title"], r["category_id"],
                               r["created_at"])).lastrowid for r in rows]
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return [str(i) for i in ids]

    def _claim(self, consumer, count):
        db = self._db
        now = time.time()
        db.execute("BEGIN IMMEDIATE")
        try:
            rows = db.execute(
                "SELECT id, item_id, image, title, category_id, created_at FROM events "
                "WHERE delivered_at IS NULL OR delivered_at < ? ORDER BY id LIMIT ?",
                (now - self.reclaim_after, count)).fetchall()
            db.executemany("UPDATE events SET consumer = ?, delivered_at = ? WHERE id = ?",
                           [(consumer, now, r[0]) for r in rows])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return [(str(r[0]), dict(zip(FIELDS + ("created_at",), r[1:]))) for r in rows]

    def read(self, consumer, count=64, block=1.0):
        deadline = time.monotonic() + block
        while True:
            got = self._claim(consumer, count)
            if got or time.monotonic() >= deadline:
                return got
            time.sleep(self.poll)

    def ack(self, event_ids):
        self._db.executemany("DELETE FROM events WHERE id = ?", [(int(i),) for i in event_ids])

    def pending(self):
        return self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0]

    def close(self):
        self._db.close()


class RedisEvents(ItemEvents):
    """A Redis Stream read by a consumer group (created on first use)."""

    def __init__(self, url, stream="tfmm:new_items", group="encoder", reclaim_after=5.0):
        from tfmm.index import redis_client

        self.client, self.address = redis_client(url)
        self.stream, self.group = stream, group
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
        f = {k.decode(): v for k, v in fields.items()}
        return {"item_id": int(f["item_id"]), "image": f.get("image", b""),
                "title": f.get("title", b"").decode("utf-8"),
                "category_id": int(f.get("category_id", 0)),
                "created_at": float(f.get("created_at", 0.0))}

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
        return [(i.decode(), self._decode(f)) for i, f in entries]

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


def open_events(spec, **kwargs):
    """A `redis://` URL gives `RedisEvents`; anything else is a `SQLiteEvents` file."""
    if str(spec).startswith(("redis://", "rediss://", "unix://")):
        return RedisEvents(spec, **kwargs)
    return SQLiteEvents(spec, **kwargs)
