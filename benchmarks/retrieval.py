"""Acc@N's cost against the bare chunked matrix products it needs.

    python -m benchmarks.retrieval --n=100000 --dim=128 [--json=PATH]

Acc@N (paper eq. 6) scores every query against every positive; tfmm does it
exactly, in chunks of queries. The peer is the same chunked products with
only a sum kept, i.e. the arithmetic any exact method must do.
"""

import os
import time

from absl import flags
import numpy as np
import tensorflow as tf

from benchmarks import report
from tfmm import cli
from tfmm.metrics import acc_at_n

FLAGS = flags.FLAGS


def bare_products(q, p, chunk_size):
    @tf.function
    def chunk(start, stop):
        return tf.reduce_sum(tf.matmul(q[start:stop], p, transpose_b=True))

    n = int(q.shape[0])
    return sum(float(chunk(tf.constant(s), tf.constant(min(s + chunk_size, n))))
               for s in range(0, n, chunk_size))


def best_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def define_flags():
    flags.DEFINE_integer("n", 100_000, "Queries and positives.")
    flags.DEFINE_integer("dim", 128, "Vector dimension.")
    flags.DEFINE_integer("chunk_size", 4096, "Queries per chunk.")
    flags.DEFINE_integer("repeats", 2, "Timed repetitions (best kept).")
    report.define_json_flag()


def main(argv):
    del argv
    rng = np.random.default_rng(0)
    p = rng.normal(size=(FLAGS.n, FLAGS.dim)).astype("float32")
    q = (p + rng.normal(size=p.shape).astype("float32"))
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    qt, pt = tf.constant(q), tf.constant(p)
    bare_products(qt, pt, FLAGS.chunk_size)  # warm up
    acc_at_n(q, p, chunk_size=FLAGS.chunk_size)
    bare = best_time(lambda: bare_products(qt, pt, FLAGS.chunk_size), FLAGS.repeats)
    ours = best_time(lambda: acc_at_n(q, p, chunk_size=FLAGS.chunk_size), FLAGS.repeats)
    print(f"{FLAGS.n} queries x {FLAGS.n} positives, d={FLAGS.dim}, chunk {FLAGS.chunk_size}, "
          f"{os.cpu_count()} CPUs, TF {tf.__version__}")
    print(f"bare chunked products: {bare:8.2f} s")
    print(f"tfmm Acc@N (exact):    {ours:8.2f} s   ({ours / bare:.2f}x the products)")
    report.write_json({"bare_products_s": bare, "acc_at_n_s": ours,
                       "acc_at_n_over_bare": ours / bare})


if __name__ == "__main__":
    define_flags()
    cli.run(main)
