"""Embedding a whole catalogue: the batch job (locally and on Beam's DirectRunner) against
the near-line encoder service fed the same items as new-item events.

    python -m benchmarks.embed --world=small [--json=PATH]

One export (an untrained image tower of --dim, unless --encoder names one)
and one catalogue (a generated world's items). Each way writes a fresh SQLite
index; items/s counts the items embedded and written:

- local: `tfmm.serving.encoding.embed_catalogue` (``python -m
  tfmm.serving.embed``), tf.data decoding the item records, --batch_size per
  model call and put;
- DirectRunner: `tfmm.serving.embed_beam.run` (``--runner=DirectRunner``), end
  to end, the pipeline's start and model load included;
- near-line: every item published as an event (its stored image bytes and
  title; publishing not timed), then `tfmm.serving.encoder.serve` in its
  --max_batch event batches: read, decode one image at a time, embed, put, ack.
"""

import os
import tempfile
import time

from absl import flags
import tensorflow as tf

from benchmarks import report
from tfmm import cli
from tfmm.data import schema
from tfmm.export import export_saved_model
from tfmm.index import open_index
from tfmm.serving import embed_beam
from tfmm.serving.encoder import serve
from tfmm.serving.encoding import Encoder, IndexSink, embed_catalogue, job_manifest
from tfmm.serving.events import open_events
from tfmm.towers import image_tower

FLAGS = flags.FLAGS


def events_of(data_dir):
    """A new-item event of every item with an image: its stored bytes, as published."""
    paths = schema.files(data_dir, schema.read_metadata(data_dir), "items")
    events = []
    for item in tf.data.TFRecordDataset(paths).map(
            lambda r: tf.io.parse_single_example(r, schema.item_spec())).as_numpy_iterator():
        if item["image"]:
            events.append({"item_id": int(item["item_id"]), "image": item["image"],
                           "title": item["title"].decode(),
                           "category_id": int(item["category_id"])})
    return events


def timed(fn):
    start = time.perf_counter()
    n = fn()
    return n, n / (time.perf_counter() - start)


def define_flags():
    cli.define_data_flags("A tfmm data directory (default data/<world>).")
    flags.DEFINE_string("encoder", None, "An exported encoder (default: an untrained image "
                        "tower of --dim).")
    flags.DEFINE_integer("dim", 128, "Width of the default encoder.")
    flags.DEFINE_integer("max_batch", 64, "Events per batch of the near-line encoder (its "
                         "--max_batch).")
    flags.DEFINE_integer("batch_size", 256, "Items per model call and put of the batch job.")
    flags.DEFINE_list("beam_options", [], "Pipeline options of the DirectRunner run, e.g. "
                      "--direct_num_workers=2.")
    report.define_json_flag()


def main(argv):
    del argv
    data_dir = cli.data_dir()
    with tempfile.TemporaryDirectory(prefix="embed-bench-") as work:
        compare(data_dir, work)


def compare(data_dir, work):
    """Prints the items/s of each way, on one export and catalogue, indexes under `work`."""
    size = schema.read_metadata(data_dir).get("image_size") or 64
    path = FLAGS.encoder or export_saved_model(image_tower(dim=FLAGS.dim, input_size=size),
                                               f"{work}/encoder", "vector")
    encoder = Encoder(path)
    job = job_manifest(encoder, data_dir)
    events = events_of(data_dir)
    encoder([encoder.content(e) for e in events[:FLAGS.max_batch]])  # trace once, for all
    print(f"catalogue {data_dir}: {len(events)} items with an image; encoder {encoder.path} "
          f"({encoder.modality} -> {encoder.dim}-d)")

    def local():
        sink = IndexSink(f"{work}/local.db", encoder.dim, job["catalogue"])
        return embed_catalogue(encoder, data_dir, sink, FLAGS.batch_size, verbose=0)["embedded"]

    def beam():
        options = ["--runner=DirectRunner", *FLAGS.beam_options]
        return embed_beam.run(encoder, data_dir, job, options, index=f"{work}/beam.db",
                              batch_size=FLAGS.batch_size)["embedded"]

    queue = open_events(f"{work}/events.db")
    for start in range(0, len(events), 1000):
        queue.publish(events[start:start + 1000])

    def nearline():
        index = open_index(f"{work}/nearline.db", dim=encoder.dim)
        handled, _ = serve(encoder, queue, index, "bench", FLAGS.max_batch, block=0.05,
                           max_events=len(events))
        return handled

    rates, items = {}, {}
    for key, name, fn in (
            ("local", f"batch job, local, batches of {FLAGS.batch_size}", local),
            ("directrunner", f"batch job, DirectRunner, batches of {FLAGS.batch_size}", beam),
            ("nearline", f"near-line encoder, batches of {FLAGS.max_batch} events", nearline)):
        items[key], rates[key] = timed(fn)
        print(f"{name}: {items[key]} items, {rates[key]:.0f} items/s", flush=True)
    local_rate, beam_rate, nearline_rate = rates.values()
    print(f"local / near-line: {local_rate / nearline_rate:.2f}x; "
          f"DirectRunner / near-line: {beam_rate / nearline_rate:.2f}x")
    print(f"load average {os.getloadavg()[0]:.2f}")
    report.write_json({"items": items, "items_per_s": rates,
                       "local_over_nearline": local_rate / nearline_rate,
                       "directrunner_over_nearline": beam_rate / nearline_rate})


if __name__ == "__main__":
    define_flags()
    cli.run(main)
