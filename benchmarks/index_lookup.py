"""Index look-up latency of one predictor request: RedisIndex vs SQLiteIndex.

    python -m benchmarks.index_lookup --items=100000 --dim=128 --requests=2000

A request needs the vectors of its user's history (100 ids) and of its
candidates (200 ids): one `get` of 300 ids (the goal in DESIGN.md: p99 <= 3 ms
on Redis). Also timed: 100 ids, and for reference redis-py's bare MGET of the
same keys (the floor any Redis look-up pays). Without --redis_url the
benchmark starts its own redis-server on a free loopback port.
"""

import os
import tempfile
import time

from absl import flags
import numpy as np
import redis

from benchmarks.timing import latencies
from tfmm import cli
from tfmm.index import FIRST_ID, RedisIndex, SQLiteIndex

FLAGS = flags.FLAGS


def fill(index, vectors, chunk=10_000):
    """Seconds to write all vectors, `chunk` items per put."""
    start = time.perf_counter()
    for s in range(0, len(vectors), chunk):
        index.put(FIRST_ID + np.arange(s, min(s + chunk, len(vectors))), vectors[s:s + chunk])
    return time.perf_counter() - start


def define_flags():
    flags.DEFINE_integer("items", 100_000, "Items in the index.")
    flags.DEFINE_integer("dim", 128, "Vector dimension.")
    flags.DEFINE_integer("requests", 2000, "Timed look-ups per row.")
    flags.DEFINE_list("sizes", ["300", "100"], "Ids per look-up (history 100 + 200 candidates "
                      "= 300).")
    flags.DEFINE_string("redis_url", "", "An existing Redis (its keys under --prefix are "
                        "overwritten); default: a private redis-server.")
    flags.DEFINE_string("prefix", "tfmm-bench", "Key prefix of the benchmark's index.")


def main(argv):
    del argv
    server = None
    url = FLAGS.redis_url
    workdir = tempfile.mkdtemp(prefix="index_lookup-")
    if not url:
        from tests.redis_server import RedisServer  # the tests' private server

        server = RedisServer(workdir)
        url = server.url
    try:
        rng = np.random.default_rng(0)
        vectors = rng.normal(size=(FLAGS.items, FLAGS.dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        client = redis.Redis.from_url(url)
        for key in client.scan_iter(f"{FLAGS.prefix}:*", count=10_000):
            client.delete(key)
        indexes = {"RedisIndex": RedisIndex(url, dim=FLAGS.dim, prefix=FLAGS.prefix),
                   "SQLiteIndex": SQLiteIndex(os.path.join(workdir, "vectors.db"), dim=FLAGS.dim)}
        for name, index in indexes.items():
            print(f"{name}: filled {FLAGS.items} x {FLAGS.dim} in {fill(index, vectors):.1f} s")
        calls = {name: index.get for name, index in indexes.items()}
        calls["redis-py MGET (bare)"] = lambda ids: client.mget(
            [f"{FLAGS.prefix}:v:{i}" for i in ids.tolist()])
        print(f"\n{FLAGS.requests} look-ups each, {os.cpu_count()} CPUs, "
              f"Redis {client.info('server')['redis_version']} on {url.split('@')[-1]}")
        print(f"{'ids':>4}  {'backend':<22} {'p50 ms':>7} {'p99 ms':>7} {'mean ms':>8}")
        for size in map(int, FLAGS.sizes):
            requests = [FIRST_ID + rng.choice(FLAGS.items, size, replace=False)
                        for _ in range(FLAGS.requests)]
            for name, fn in calls.items():
                ms = latencies(fn, requests, warmup=50)[0]
                print(f"{size:>4}  {name:<22} {np.percentile(ms, 50):7.3f} "
                      f"{np.percentile(ms, 99):7.3f} {ms.mean():8.3f}")
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    define_flags()
    cli.run(main)
