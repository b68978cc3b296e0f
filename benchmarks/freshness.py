"""Freshness: from a new item's event to the first prediction that used its vector.

    python -m benchmarks.freshness --rate=20 --seconds=30

Paper §5 / Figure 4 end to end, each part as in production: a producer
publishes new-item events (PNG image + title) at a steady --rate; the encoder
service (`python -m tfmm.serving.encoder`, its own process) embeds them and
writes the index table; an online predictor (`tfmm.serving.Predictor`,
in-process SavedModel) scores one user's 200 candidates in a loop, the
newest items among them. An item's freshness is the time from its event's
creation to the end of the first prediction whose inputs held its vector
(DESIGN.md: p99 <= 1 s). Runs once with the embedded backends (SQLite index
and events) and once with Redis (index and stream; a private redis-server
unless --redis_url). The encoder and ranker are untrained exports of the
small world's shapes (freshness does not depend on weights) unless
--encoder/--ranker name real ones.
"""

import os
import subprocess
import sys
import tempfile
import threading
import time

from absl import flags, logging
import numpy as np
import tensorflow as tf

from tfmm import cli
from tfmm.export import export_saved_model
from tfmm.index import open_index
from tfmm.ranker import DINRanker
from tfmm.serving.events import open_events
from tfmm.serving.predictor import Predictor, Request
from tfmm.towers import image_tower

FLAGS = flags.FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_NEW_ID = 1_000_000  # new items: ids beyond every trained vocabulary
DIM = 128


def exports(workdir):
    encoder = FLAGS.encoder or export_saved_model(image_tower(dim=DIM), f"{workdir}/encoder",
                                                  "vector")
    ranker = FLAGS.ranker or export_saved_model(
        DINRanker({"num_items": 4002, "num_users": 3002, "num_categories": 10}, 100,
                     "simtier", vector_dim=DIM), f"{workdir}/ranker", "probability")
    return encoder, ranker


def run(encoder, ranker, index_spec, events_spec):
    """Freshness in seconds of every item created during the run (NaN: never served)."""
    index = open_index(index_spec, dim=DIM)
    rng = np.random.default_rng(0)
    index.put(np.arange(2, 4002), rng.normal(size=(4001, DIM)).astype(np.float32)[1:])
    events = open_events(events_spec)
    log = open(os.path.join(os.path.dirname(encoder.rstrip("/")), "encoder.log"), "a")
    worker = subprocess.Popen(
        [sys.executable, "-m", "tfmm.serving.encoder", f"--encoder={encoder}",
         f"--events={events_spec}", f"--index={index_spec}", "--block=0.05"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
    if not worker.stdout.readline().startswith("encoder"):  # its banner: ready
        raise RuntimeError(f"the encoder service did not start; see {log.name}")
    predictor = Predictor(ranker, index)
    history = rng.integers(1, 4002, 100)
    count = int(FLAGS.rate * FLAGS.seconds)
    created = np.full(count, np.nan)
    served = np.full(count, np.nan)
    images = rng.integers(0, 256, (16, 64, 64, 3), dtype=np.uint8)
    pngs = [tf.io.encode_png(i).numpy() for i in images]
    done = threading.Event()

    def produce():
        start = time.monotonic()
        for k in range(count):
            time.sleep(max(0.0, start + k / FLAGS.rate - time.monotonic()))
            created[k] = time.time()
            events.publish([{"item_id": FIRST_NEW_ID + k, "image": pngs[k % len(pngs)],
                             "title": f"new item {k}", "category_id": 1 + k % 9,
                             "created_at": created[k]}])
        done.set()

    producer = threading.Thread(target=produce)
    producer.start()
    predictions = 0
    deadline = None
    while True:
        # The newest items not yet served, then known items, as candidates.
        published = int(np.sum(~np.isnan(created)))
        waiting = np.flatnonzero(np.isnan(served[:published]))[-FLAGS.candidates:]
        candidates = np.concatenate([FIRST_NEW_ID + waiting,
                                     rng.integers(2, 4002, FLAGS.candidates - len(waiting))])
        features, missing = predictor.assemble(Request(7, history, candidates))
        predictor.model(features)
        now = time.time()
        predictions += 1
        used = np.setdiff1d(FIRST_NEW_ID + waiting, missing) - FIRST_NEW_ID
        served[used] = now
        if done.is_set():
            deadline = deadline or time.monotonic() + 10
            if not np.isnan(served).any() or time.monotonic() > deadline:
                break
    producer.join()
    worker.terminate()
    worker.wait()
    return served - created, predictions


def define_flags():
    flags.DEFINE_float("rate", 20.0, "New items per second.")
    flags.DEFINE_float("seconds", 30.0, "How long items are created.")
    flags.DEFINE_list("backends", ["embedded", "redis"], "embedded (SQLite) and/or redis.")
    flags.DEFINE_string("encoder", "", "An exported encoder (default: an untrained image tower).")
    flags.DEFINE_string("ranker", "", "An exported ranker taking vectors (default: an untrained "
                        "SimTier ranker, L=100).")
    flags.DEFINE_integer("candidates", 200, "Candidates per prediction.")
    flags.DEFINE_string("redis_url", "", "An existing Redis (keys under tfmm-fresh are "
                        "overwritten); default: a private redis-server.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    workdir = tempfile.mkdtemp(prefix="freshness-")
    encoder, ranker = exports(workdir)
    server = None
    print(f"{FLAGS.rate:g} new items/s for {FLAGS.seconds:g} s; a prediction scores "
          f"{FLAGS.candidates} candidates, the newest items among them; {os.cpu_count()} CPUs")
    print(f"{'backend':<9} {'items':>6} {'served':>7} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
          f"{'predictions/s':>13}")
    try:
        for backend in FLAGS.backends:
            if backend == "redis":
                url = FLAGS.redis_url
                if not url:
                    from tests.redis_server import RedisServer  # the tests' private server

                    server = RedisServer(workdir)
                    url = server.url
                specs = (f"{url}?prefix=tfmm-fresh", url)
            else:
                specs = (f"{workdir}/vectors.db", f"{workdir}/events.db")
            start = time.monotonic()
            fresh, predictions = run(encoder, ranker, *specs)
            ms = 1e3 * fresh[~np.isnan(fresh)]
            print(f"{backend:<9} {len(fresh):>6} {len(ms):>7} {np.percentile(ms, 50):>7.1f} "
                  f"{np.percentile(ms, 99):>7.1f} {ms.max():>7.1f} "
                  f"{predictions / (time.monotonic() - start):>13.1f}", flush=True)
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    define_flags()
    cli.run(main)
