"""What a training job's index snapshots cost the predictor's look-ups on the same Redis.

    python -m benchmarks.snapshot_stall --items=100000 --dim=128 --seconds=10

`--refresh_vectors` takes `RedisIndex.snapshot` of the whole catalogue at every
epoch while predictors read the same server. Redis runs one command (or one
MULTI/EXEC) at a time, so a snapshot read as one transaction holds every other
client until it ends. A separate process (no GIL shared with the snapshots)
times one predictor request's look-up, `get` of 300 ids (history 100 +
200 candidates), back to back: first alone, then while this process takes
snapshots back to back. Printed: look-up p50/p99/max ms in each phase; the
longest single call the server ran in the phase (Redis' latency monitor: a
MULTI/EXEC or script counts whole, and no other client is served during it),
which client-side CPU contention does not blur; and each snapshot's duration.
The benchmark runs a private redis-server.
"""

import multiprocessing
import tempfile
import time

import numpy as np
import redis
from absl import flags

from tfmm import cli
from tfmm.index import FIRST_ID, RedisIndex

FLAGS = flags.FLAGS

PREFIX = "tfmm-stall"


def _reader(url, dim, items, ids, start, stop, out):
    """Look-ups back to back from `start` until `stop` is set: their (end time, ms)."""
    index = RedisIndex(url, dim=dim, prefix=PREFIX)
    rng = np.random.default_rng(0)
    start.wait()
    times = []
    while not stop.is_set():
        request = FIRST_ID + rng.choice(items, ids, replace=False)
        t = time.perf_counter()
        index.get(request)
        times.append((time.time(), 1e3 * (time.perf_counter() - t)))
    out.put(times)


def _phase(url, snapshots):
    """Look-up latencies (ms) over FLAGS.seconds, with snapshots back to back if asked;
    also each snapshot's seconds."""
    context = multiprocessing.get_context("spawn")
    start, stop, out = context.Event(), context.Event(), context.Queue()
    reader = context.Process(target=_reader, args=(url, FLAGS.dim, FLAGS.items, FLAGS.ids,
                                                   start, stop, out))
    reader.start()
    index = RedisIndex(url, dim=FLAGS.dim, prefix=PREFIX)
    monitor = redis.Redis.from_url(url)
    monitor.config_set("latency-monitor-threshold", 1)  # ms
    start.set()
    time.sleep(0.5)  # the reader's first look-ups
    monitor.execute_command("LATENCY", "RESET")
    took, end = [], time.monotonic() + FLAGS.seconds
    while time.monotonic() < end:
        if snapshots:
            t = time.perf_counter()
            table = index.snapshot(FIRST_ID + FLAGS.items)
            took.append(time.perf_counter() - t)
            assert int(table.present.sum()) == FLAGS.items
        else:
            time.sleep(0.05)
    # (event, time, latest ms, max ms) per event type: "command", "fast-command"
    held = max([event[3] for event in monitor.execute_command("LATENCY", "LATEST")], default=0)
    stop.set()
    times = np.array([ms for _, ms in out.get()])
    reader.join()
    return times, np.array(took), held


def main(argv):
    del argv
    from tests.redis_server import RedisServer  # the tests' private server

    server = RedisServer(tempfile.mkdtemp(prefix="snapshot_stall-"))
    try:
        index = RedisIndex(server.url, dim=FLAGS.dim, prefix=PREFIX)
        vectors = np.random.default_rng(0).normal(size=(FLAGS.items, FLAGS.dim))
        for s in range(0, FLAGS.items, 10_000):
            index.put(FIRST_ID + np.arange(s, min(s + 10_000, FLAGS.items)), vectors[s:s + 10_000])
        print(f"{FLAGS.items} x {FLAGS.dim} vectors; look-ups of {FLAGS.ids} ids, "
              f"{FLAGS.seconds:g} s a phase")
        print(f"{'phase':<18} {'look-ups':>8} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
              f"{'server held ms':>14}  snapshot s (mean, max)")
        for name, snapshots in (("alone", False), ("during snapshots", True)):
            times, took, held = _phase(server.url, snapshots)
            print(f"{name:<18} {len(times):>8} {np.percentile(times, 50):7.2f} "
                  f"{np.percentile(times, 99):7.2f} {times.max():7.1f} {held:>14}  "
                  + (f"{took.mean():.3f}, {took.max():.3f} ({len(took)})" if len(took) else ""))
    finally:
        server.stop()


def define_flags():
    flags.DEFINE_integer("items", 100_000, "Items in the index.")
    flags.DEFINE_integer("dim", 128, "Vector dimension.")
    flags.DEFINE_float("seconds", 10.0, "Seconds each phase lasts.")
    flags.DEFINE_integer("ids", 300, "Ids per look-up.")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
