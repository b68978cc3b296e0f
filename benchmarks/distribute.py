"""Data-parallel CTR training: the bytes a step exchanges, steps/s of 1 and 2 local
workers, and a projection to many workers, with the embedding gradients exchanged
as looked up (``--optimizer=adam``, Keras 3's) and summed by id (``sparse_adam``,
`tfmm.optimizers.PerIdSums`).

    python -m benchmarks.distribute --data_dir=data/small --batch_size=1024

Each worker count runs `tfmm.distribute`'s step (``strategy.run(model.train_step)``
under MultiWorkerMirroredStrategy, workers on loopback) on the small world's
training impressions, global batch --batch_size, for the ID and SimTier
rankers (SimTier on random unit vectors: the step does not care where they
come from), with each of --optimizers. On one machine the workers share its
cores, so 2 workers show the cost of the exchange, not a speed-up; 1 worker
against 1 worker is what summing by id costs a step (a unique and a segment
sum per table, on the replica; and Adam's second moment of the sums).

Bytes per step come from the gradients of one replica's rows: the dense
layers' (all-reduced: a ring moves 2 (R-1)/R of them through every worker)
and the embedding tables' (``tf.IndexedSlices``, which tf.distribute
all-gathers: every worker receives the other R-1 replicas'), as looked up
(a row per lookup) and summed by id (a row per distinct id: not proportional
to the rows, so measured at every replica batch size used), next to what dense
table gradients would cost. A projection to --project workers follows, from
each optimizer's 1-worker step time and stated network assumptions.
"""

import json
import os
import subprocess
import sys
import time

from absl import flags, logging
import numpy as np
import tensorflow as tf

from tfmm import cli, data, distribute
from tfmm.ctr import OPTIMIZERS
from tfmm.data import schema
from tfmm.keras_compat import keras
from tfmm.optimizers import PerIdSums, sum_by_id
from tfmm.ranker import DINRanker

FLAGS = flags.FLAGS

WARMUP = 5
TIMED_SUMS = 20


def _model(data_dir, method, optimizer="adam"):
    meta = schema.read_metadata(data_dir)
    vectors = None
    if method != "id":
        n = meta["vocab"]["num_items"]
        table = np.random.default_rng(0).normal(size=(n, FLAGS.vector_dim)).astype("float32")
        table /= np.linalg.norm(table, axis=1, keepdims=True)
        vectors = data.Vectors(table, np.ones(n, bool))
    keras.utils.set_random_seed(0)
    model = DINRanker(meta["vocab"], FLAGS.max_history, method=method,
                      vector_dim=FLAGS.vector_dim if vectors else None)
    model.compile(OPTIMIZERS[optimizer](1e-3), "binary_crossentropy")
    return model, vectors


def _batches(data_dir, model, vectors, batch_size, slices=None):
    return data.impressions(data_dir, "train", batch_size=batch_size,
                            max_history=FLAGS.max_history, vectors=vectors,
                            features=list(model.input), repeat=True, drop_remainder=True,
                            validate=False, slices=slices)


def run_worker(data_dir, method, optimizer):
    """Times the distributed step; the chief prints {"steps_per_s": ...}."""
    strategy = distribute.strategy("multi_worker")
    with strategy.scope():
        model, vectors = _model(data_dir, method, optimizer)
        model.optimizer.build(model.trainable_variables)
    replicas = strategy.num_replicas_in_sync
    dataset = strategy.distribute_datasets_from_function(lambda c: _batches(
        data_dir, model, vectors, FLAGS.batch_size, distribute.replica_slices(c, replicas)))
    step = distribute.step_function(model, strategy, dataset.element_spec)
    batches = iter(dataset)
    for _ in range(WARMUP):
        logs = step(next(batches))
    float(logs["loss"])
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
        logs = step(next(batches))
    float(logs["loss"])  # the last step has finished
    rate = FLAGS.steps / (time.perf_counter() - start)
    if distribute.is_chief(strategy):
        print(json.dumps({"steps_per_s": rate}))


def steps_per_s(data_dir, method, optimizer, workers):
    cluster = distribute.loopback_cluster(worker=workers)
    argv = [a for a in sys.argv[1:] if not a.startswith(("--only", "--data_dir"))]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "benchmarks.distribute", f"--only={method},{optimizer}",
         f"--data_dir={data_dir}", *argv], stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": i}})))
        for i in range(workers)]
    try:
        outputs = [p.communicate(timeout=900)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(p.returncode for p in procs):
        raise SystemExit(f"a {method} worker with {optimizer} failed (of {workers})")
    return json.loads(outputs[0].strip().splitlines()[-1])["steps_per_s"]


def gradient_bytes(data_dir, method, rows):
    """Bytes of one replica's gradients on `rows` rows: dense layers, embedding
    ``IndexedSlices`` as looked up and summed by id (`tfmm.optimizers.sum_by_id`, as
    `PerIdSums` hands them to the exchange), and the tables if dense; and the
    median time of summing them by id (``sum_ms``)."""
    model, vectors = _model(data_dir, method)
    x, y = next(iter(_batches(data_dir, model, vectors, rows)))
    with tf.GradientTape() as tape:
        loss = keras.losses.binary_crossentropy(y[:, None], model(x, training=True))
        loss = tf.reduce_mean(loss)
    out = {"dense": 0, "rows": 0, "ids": 0, "tables": 0, "lookups": 0, "distinct": 0}
    grads = tape.gradient(loss, model.trainable_variables)
    sparse = [g for g in grads if isinstance(g, tf.IndexedSlices)]
    summing = tf.function(lambda: [sum_by_id(g).values for g in sparse])
    for _ in range(3):
        summing()
    times = []
    for _ in range(TIMED_SUMS):
        start = time.perf_counter()
        [t.numpy() for t in summing()]
        times.append(time.perf_counter() - start)
    out["sum_ms"] = 1e3 * float(np.median(times))  # what PerIdSums adds to a replica's step

    def size(t):
        return t.shape.num_elements() * t.dtype.size

    for v, g in zip(model.trainable_variables, grads):
        if isinstance(g, tf.IndexedSlices):
            summed = sum_by_id(g)
            out["rows"] += size(g.values) + size(g.indices)
            out["ids"] += size(summed.values) + size(summed.indices)
            out["lookups"] += int(g.indices.shape[0])
            out["distinct"] += int(summed.indices.shape[0])
            out["tables"] += v.shape.num_elements() * 4
        else:
            out["dense"] += v.shape.num_elements() * 4
    return out


def received(b, workers, sparse):
    """Bytes every worker receives a step, `b` one replica's gradients: a ring
    all-reduce of the dense layers' gradients, an all-gather of the other replicas'
    embedding rows (``sparse``: "rows" as looked up, "ids" summed by id), and what
    a ring all-reduce of dense tables would be."""
    r = workers
    return 2 * (r - 1) / r * b["dense"], (r - 1) * b[sparse], 2 * (r - 1) / r * b["tables"]


def define_flags():
    cli.define_data_flags("A tfmm data directory (default data/<world>).")
    flags.DEFINE_list("models", ["id", "simtier"], "Rankers to run.")
    flags.DEFINE_list("workers", ["1", "2"], "Worker counts to measure.")
    flags.DEFINE_list("optimizers", ["adam", "sparse_adam"],
                      f"Optimizers to run (of {', '.join(OPTIMIZERS)}): adam exchanges the "
                      "embedding rows as looked up, sparse_adam and sgd summed by id.")
    flags.DEFINE_integer("batch_size", 1024, "Global batch size.")
    flags.DEFINE_integer("max_history", 50, "History length L.")
    flags.DEFINE_integer("vector_dim", 128, "SimTier's vector width.")
    flags.DEFINE_integer("steps", 40, "Timed steps (after 5 untimed).")
    flags.DEFINE_list("project", ["8", "64"], "Worker counts to project to.")
    flags.DEFINE_float("bandwidth_gbit", 10.0, "Projection: network bandwidth per worker, Gbit/s.")
    flags.DEFINE_float("latency_us", 50.0, "Projection: latency of one message, microseconds.")
    flags.DEFINE_string("only", "", "Internal: run one worker of this model,optimizer "
                                    "(TF_CONFIG set).")


def main(argv):
    data_dir = cli.data_dir()  # generated once, by the parent; its workers get the path
    if FLAGS.only:
        logging.set_verbosity(logging.WARNING)  # tf.distribute's INFO lines, per worker
        tf.get_logger().setLevel("WARNING")
        return run_worker(data_dir, *FLAGS.only.split(","))
    mb = 1 / 2 ** 20
    bandwidth = FLAGS.bandwidth_gbit * 1e9 / 8
    batch = FLAGS.batch_size
    workers, project = list(map(int, FLAGS.workers)), list(map(int, FLAGS.project))
    print(f"global batch {batch}, L={FLAGS.max_history}, {data_dir}; workers on "
          f"loopback of one {os.cpu_count()}-core machine")
    for method in FLAGS.models:
        # One replica's rows: the global batch split over w workers, or a batch per worker.
        sizes = sorted({max(1, batch // w) for w in workers + project} | {batch}, reverse=True)
        b = {rows: gradient_bytes(data_dir, method, rows) for rows in sizes}
        print(f"\n{method}: a replica's gradients: dense layers {b[batch]['dense'] * mb:.2f} "
              f"MiB; embedding tables {b[batch]['tables'] * mb:.2f} MiB if dense; "
              "embedding rows as looked up -> summed by id:")
        for rows in sizes:
            print(f"  {rows:5d} rows: {b[rows]['lookups']:6d} rows {b[rows]['rows'] * mb:6.3f} MiB"
                  f" -> {b[rows]['distinct']:5d} ids {b[rows]['ids'] * mb:6.3f} MiB "
                  f"({b[rows]['rows'] / b[rows]['ids']:.1f}x fewer bytes); summing them "
                  f"{b[rows]['sum_ms']:.2f} ms")
        rates = {}
        for optimizer in FLAGS.optimizers:
            sparse = "ids" if issubclass(OPTIMIZERS[optimizer], PerIdSums) else "rows"
            for w in workers:
                rates[optimizer, w] = steps_per_s(data_dir, method, optimizer, w)
                dense, rows, tables = received(b[max(1, batch // w)], w, sparse)
                print(f"  {optimizer:11s} {w} worker(s): {rates[optimizer, w]:7.2f} steps/s, "
                      f"{rates[optimizer, w] * batch:8.0f} examples/s; received per worker a "
                      f"step: dense {dense * mb:.2f} MiB + embedding {sparse} "
                      f"{rows * mb:.3f} MiB (dense tables would be {tables * mb:.2f} MiB)")
        if 1 not in workers:
            continue
        base = FLAGS.optimizers[0]
        for optimizer in FLAGS.optimizers[1:]:
            print(f"  1 worker, {optimizer} vs {base}: step {1e3 / rates[optimizer, 1]:.1f} vs "
                  f"{1e3 / rates[base, 1]:.1f} ms ({rates[base, 1] / rates[optimizer, 1]:.2f}x)")
        print(f"  projection ({FLAGS.bandwidth_gbit:g} Gbit/s a worker, {FLAGS.latency_us:g} us "
              "a message, 3 (w-1) messages a step (ring all-reduce + all-gather); compute = "
              "the optimizer's 1-worker step split evenly; no overlap of compute and "
              f"exchange; speed-up against that optimizer's 1 worker, and {base}'s):")
        for optimizer in FLAGS.optimizers:
            sparse = "ids" if issubclass(OPTIMIZERS[optimizer], PerIdSums) else "rows"
            t1 = 1 / rates[optimizer, 1]  # one worker's step on the global batch: all compute
            for w in project:
                for rows in (max(1, batch // w), batch):  # fixed global batch, or per worker
                    scale = rows * w / batch
                    dense, sparse_bytes, _ = received(b[rows], w, sparse)
                    exchange = ((dense + sparse_bytes) / bandwidth
                                + 3 * (w - 1) * FLAGS.latency_us * 1e-6)
                    step = t1 * scale / w + exchange
                    print(f"    {optimizer:11s} {w:3d} workers, {rows:5d} rows each: "
                          f"exchange {(dense + sparse_bytes) * mb:6.2f} MiB {exchange * 1e3:6.1f}"
                          f" ms, {rows * w / step:9.0f} examples/s ({t1 * scale / step:4.1f}x "
                          f"1 worker, {scale / rates[base, 1] / step:4.1f}x 1 {base} worker), "
                          f"exchange {exchange / step:.0%} of the step")

if __name__ == "__main__":
    define_flags()
    cli.run(main)
