r"""The near-line encoder service: new-item events -> exported encoder -> index table.

    python -m tfmm.serving.encoder --encoder=runs/small/export/encoder \
        --events=runs/small/events.db --index=runs/small/index/vectors.db

reads new-item events in batches (`tfmm.serving.events`), embeds them with
the SCL encoder's SavedModel (image or text, whichever its signature takes),
writes the vectors to the index table, and only then acknowledges the
events: a worker killed at any point loses nothing, since its unacknowledged
events are delivered again (to itself when restarted, or to another worker
after ``--reclaim_after`` seconds). An event that can never be embedded (no
content, an undecodable image) is logged with its item id and acknowledged,
so it cannot block the stream.
"""

import logging
import time

import numpy as np
import tensorflow as tf
from absl import app, flags

from tfmm.export import latest_version
from tfmm.index import open_index
from tfmm.serving.events import BadEvent, open_events

FLAGS = flags.FLAGS
flags.DEFINE_string("encoder", None, "The encoder's SavedModel (a version dir, or a base dir: "
                    "its latest version).")
flags.DEFINE_string("events", None, "New-item events: a SQLite file, or a redis:// URL.")
flags.DEFINE_string("index", None, "The index table: a SQLite file, or a redis:// URL.")
flags.DEFINE_string("consumer", "encoder-1", "This worker's name in the consumer group.")
flags.DEFINE_integer("max_batch", 64, "Most events embedded in one batch.")
flags.DEFINE_float("block", 0.5, "Seconds a read waits for the first event.")
flags.DEFINE_float("reclaim_after", 5.0, "Seconds after which another worker's pending "
                   "events are taken over.")
flags.DEFINE_integer("max_events", 0, "Stop after this many events (0: run until killed).")
flags.DEFINE_float("idle_exit", 0.0, "Stop after this many seconds without events (0: never).")

log = logging.getLogger("tfmm.serving.encoder")


class Encoder:
    """An exported encoder's ``serving_default``, fed from new-item events.

    Args:
        path: the SavedModel (a version dir or a base dir).
    """

    def __init__(self, path):
        self.path = latest_version(path)
        self._serve = tf.saved_model.load(self.path).signatures["serving_default"]
        (name, spec), = self._serve.structured_input_signature[1].items()
        self.input_name = name
        self.modality = "image" if spec.dtype == tf.uint8 else "text"
        self.image_size = tuple(spec.shape[1:3]) if self.modality == "image" else None
        self.dim = int(next(iter(self._serve.structured_outputs.values())).shape[-1])

    def content(self, event):
        """The model input of one event; BadEvent when it has none or it does not decode."""
        if self.modality == "text":
            if not event["title"]:
                raise BadEvent(f"item {event['item_id']}: the encoder embeds titles; "
                               "the event has none.")
            return event["title"]
        if not event["image"]:
            raise BadEvent(f"item {event['item_id']}: the encoder embeds images; "
                           "the event has none.")
        try:
            image = tf.io.decode_image(event["image"], channels=3, expand_animations=False)
        except tf.errors.InvalidArgumentError as e:
            raise BadEvent(f"item {event['item_id']}: the image does not decode "
                           f"({e.message.splitlines()[0]}).") from None
        if tuple(image.shape[:2]) != self.image_size:
            image = tf.cast(tf.clip_by_value(tf.round(tf.image.resize(image, self.image_size)),
                                             0, 255), tf.uint8)
        return image.numpy()

    def __call__(self, contents):
        """Vectors [n, dim] of model inputs built by `content`."""
        batch = np.stack(contents) if self.modality == "image" else np.array(contents, object)
        out = self._serve(**{self.input_name: tf.constant(batch)})
        return next(iter(out.values())).numpy()


def process(encoder, events, index, consumer, batch_size=64, block=0.5):
    """One read-embed-write-ack round; returns (events handled, bad events)."""
    got = events.read(consumer, count=batch_size, block=block)
    if not got:
        return 0, 0
    ids, contents, done, bad = [], [], [], 0
    for event_id, event in got:
        try:
            contents.append(encoder.content(event))
            ids.append(event["item_id"])
            done.append(event_id)
        except BadEvent as e:
            log.error("event %s skipped: %s", event_id, e)
            bad += 1
    if ids:
        # A repeated item in one batch (re-published) keeps its latest event.
        last = {item: k for k, item in enumerate(ids)}
        keep = sorted(last.values())
        index.put([ids[k] for k in keep], encoder([contents[k] for k in keep]))
    events.ack([event_id for event_id, _ in got])  # after the write: at-least-once
    return len(done), bad


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


def main(argv):
    del argv
    for name in ("encoder", "events", "index"):
        if not getattr(FLAGS, name):
            raise app.UsageError(f"--{name} is required.")
    encoder = Encoder(FLAGS.encoder)
    try:
        index = open_index(FLAGS.index, dim=encoder.dim)
    except ValueError as e:  # a corrupt index file, another width
        raise app.UsageError(f"--index: {e}") from None
    events = open_events(FLAGS.events, reclaim_after=FLAGS.reclaim_after)
    print(f"encoder {encoder.path} ({encoder.modality} -> {encoder.dim}-d): {events} -> {index}",
          flush=True)
    handled, bad = serve(encoder, events, index, FLAGS.consumer, FLAGS.max_batch, FLAGS.block,
                         FLAGS.max_events, FLAGS.idle_exit)
    print(f"embedded {handled} new items, skipped {bad} bad events", flush=True)


if __name__ == "__main__":
    app.run(main)
