r"""The near-line encoder service: new-item events -> exported encoder -> index table.

    python -m tfmm.serving.encoder --encoder=runs/small/export/encoder \
        --events=runs/small/events.db --index=runs/small/index/vectors.db

reads new-item events in batches (`tfmm.serving.events`), embeds them with
the encoder's SavedModel (image, text or both, whichever its signature takes),
writes the vectors to the index table, and only then acknowledges the
events: a worker killed at any point loses nothing, since its unacknowledged
events are delivered again (to itself when restarted, or to another worker
after ``--reclaim_after`` seconds). An event that can never be embedded (a
malformed field, no content, an undecodable image) is moved to the queue's
dead-letter list with the reason, acknowledged and logged with its event id,
so it cannot block the stream.
"""

import logging
import time

from absl import flags

from tfmm import cli
from tfmm.index import open_index
from tfmm.serving.encoding import Encoder
from tfmm.serving.events import BadEvent, open_events

FLAGS = flags.FLAGS

log = logging.getLogger("tfmm.serving.encoder")


def process(encoder, events, index, consumer, batch_size=64, block=0.5):
    """One read-embed-write-ack round; returns (events embedded, events moved to the
    dead-letter list: malformed ones by `read`, undecodable ones here)."""
    dead = events.dead_lettered
    ids, contents, done, bad = [], [], [], []
    for event_id, event in events.read(consumer, count=batch_size, block=block):
        try:
            contents.append(encoder.content(event))
            ids.append(event["item_id"])
            done.append(event_id)
        except BadEvent as e:
            bad.append((event_id, str(e)))
    if ids:
        # A repeated item in one batch (re-published) keeps its latest event.
        last = {item: k for k, item in enumerate(ids)}
        keep = sorted(last.values())
        index.put([ids[k] for k in keep], encoder([contents[k] for k in keep]))
    events.ack(done)  # after the write: at-least-once
    events.reject(bad)
    return len(done), events.dead_lettered - dead


def serve(encoder, events, index, consumer, batch_size=64, block=0.5, max_events=0,
          idle_exit=0.0, retry_after=0.5):
    """Runs `process` until `max_events` were handled or `idle_exit` seconds pass idle.

    An unreachable index or queue (a Redis restart) is logged and retried every
    `retry_after` seconds; the batch in hand was not acknowledged, so it is
    delivered again.
    """
    handled = bad = 0
    last_event = time.monotonic()
    while not max_events or handled + bad < max_events:
        try:
            n, b = process(encoder, events, index, consumer, batch_size, block)
        except ConnectionError as e:  # IndexUnavailable, EventsUnavailable
            log.warning("retrying in %.1f s: %s", retry_after, e)
            time.sleep(retry_after)
            continue
        handled, bad = handled + n, bad + b
        if n or b:
            last_event = time.monotonic()
        elif idle_exit and time.monotonic() - last_event >= idle_exit:
            break
    return handled, bad


def define_flags():
    flags.DEFINE_string("encoder", None, "The encoder's SavedModel (a version dir, or a base "
                        "dir: its latest version).")
    flags.DEFINE_string("events", None, "New-item events: a SQLite file, or a redis:// URL.")
    flags.DEFINE_string("index", None, "The index table: a SQLite file, or a redis:// URL.")
    flags.DEFINE_string("consumer", "encoder-1", "This worker's name in the consumer group.")
    flags.DEFINE_integer("max_batch", 64, "Most events embedded in one batch.")
    flags.DEFINE_float("block", 0.5, "Seconds a read waits for the first event.")
    flags.DEFINE_float("reclaim_after", 5.0, "Seconds after which another worker's pending "
                       "events are taken over.")
    flags.DEFINE_integer("max_events", 0, "Stop after this many events (0: run until killed).")
    flags.DEFINE_float("idle_exit", 0.0, "Stop after this many seconds without events "
                       "(0: never).")


def main(argv):
    del argv
    for name in ("encoder", "events", "index"):
        if not getattr(FLAGS, name):
            cli.fail(f"--{name} is required.")
    try:
        encoder = Encoder(FLAGS.encoder)
    except (OSError, ValueError) as e:
        cli.fail(f"--encoder={FLAGS.encoder}: {e}")
    try:
        index = open_index(FLAGS.index, dim=encoder.dim)
    except ValueError as e:  # a corrupt index file, another width
        cli.fail(f"--index: {e}")
    events = open_events(FLAGS.events, reclaim_after=FLAGS.reclaim_after)
    print(f"encoder {encoder.path} ({encoder.modality} -> {encoder.dim}-d): {events} -> {index}",
          flush=True)
    handled, bad = serve(encoder, events, index, FLAGS.consumer, FLAGS.max_batch, FLAGS.block,
                         FLAGS.max_events, FLAGS.idle_exit)
    print(f"embedded {handled} new items; {bad} bad events moved to the dead-letter list",
          flush=True)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
