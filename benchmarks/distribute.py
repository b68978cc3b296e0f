"""Data-parallel CTR training: steps/s of 1 and 2 local workers, and the bytes a step exchanges.

    python -m benchmarks.distribute --data_dir=data/small --batch_size=1024

Each worker count runs `tfmm.distribute`'s step (``strategy.run(model.train_step)``
under MultiWorkerMirroredStrategy, workers on loopback) on the small world's
training impressions, global batch --batch_size, for the ID and SimTier
rankers (SimTier on random unit vectors: the step does not care where they
come from). On one machine the workers share its cores, so 2 workers show
the cost of the exchange, not a speed-up.

Bytes per step come from the gradients of one replica's batch: the dense
layers' (all-reduced: a ring moves 2 (R-1)/R of them through every worker)
and the embedding tables' (``tf.IndexedSlices``, one row per lookup, which
tf.distribute all-gathers: every worker receives the other R-1 replicas'),
next to what dense table gradients would cost. A projection to 8 and 64
workers follows, from the 1-worker step time and stated network assumptions.
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
from tfmm.data import schema
from tfmm.keras_compat import keras
from tfmm.ranker import DINRanker

FLAGS = flags.FLAGS

WARMUP = 5


def _model(data_dir, method):
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
    model.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy")
    return model, vectors


def _batches(data_dir, model, vectors, batch_size, slices=None):
    return data.impressions(data_dir, "train", batch_size=batch_size,
                            max_history=FLAGS.max_history, vectors=vectors,
                            features=list(model.input), repeat=True, drop_remainder=True,
                            validate=False, slices=slices)


def run_worker(data_dir, method):
    """Times the distributed step; the chief prints {"steps_per_s": ...}."""
    strategy = distribute.strategy("multi_worker")
    with strategy.scope():
        model, vectors = _model(data_dir, method)
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


def steps_per_s(data_dir, method, workers):
    cluster = distribute.loopback_cluster(worker=workers)
    argv = [a for a in sys.argv[1:] if not a.startswith(("--only", "--data_dir"))]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "benchmarks.distribute", f"--only={method}",
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
        raise SystemExit(f"a {method} worker failed (of {workers})")
    return json.loads(outputs[0].strip().splitlines()[-1])["steps_per_s"]


def gradient_bytes(data_dir, method, rows):
    """Bytes of one replica's gradients on `rows` rows: dense layers, embedding
    IndexedSlices (values float32 + int64 indices; and with one row per distinct
    id), and the tables if dense."""
    model, vectors = _model(data_dir, method)
    x, y = next(iter(_batches(data_dir, model, vectors, rows)))
    with tf.GradientTape() as tape:
        loss = keras.losses.binary_crossentropy(y[:, None], model(x, training=True))
        loss = tf.reduce_mean(loss)
    out = {"dense": 0, "sparse": 0, "tables": 0, "lookups": 0, "unique": 0}
    for v, g in zip(model.trainable_variables, tape.gradient(loss, model.trainable_variables)):
        if isinstance(g, tf.IndexedSlices):
            row = v.shape[1] * 4 + 8  # float32 values and an int64 index
            out["sparse"] += g.indices.shape[0] * row
            out["tables"] += v.shape.num_elements() * 4
            out["lookups"] += int(g.indices.shape[0])
            out["unique"] += len(np.unique(g.indices.numpy())) * row
        else:
            out["dense"] += v.shape.num_elements() * 4
    return out


def traffic(b, workers):
    """Bytes every worker receives a step: ring all-reduce of the dense gradients,
    all-gather of the other replicas' embedding rows (the global batch split in
    `workers`: each replica's rows are b["sparse"] / workers)."""
    r = workers
    dense = 2 * (r - 1) / r * b["dense"]
    sparse = (r - 1) / r * b["sparse"]
    tables = 2 * (r - 1) / r * b["tables"]
    return dense, sparse, tables


def define_flags():
    cli.define_data_flags("A tfmm data directory (default data/<world>).")
    flags.DEFINE_list("models", ["id", "simtier"], "Rankers to run.")
    flags.DEFINE_list("workers", ["1", "2"], "Worker counts to measure.")
    flags.DEFINE_integer("batch_size", 1024, "Global batch size.")
    flags.DEFINE_integer("max_history", 50, "History length L.")
    flags.DEFINE_integer("vector_dim", 128, "SimTier's vector width.")
    flags.DEFINE_integer("steps", 40, "Timed steps (after 5 untimed).")
    flags.DEFINE_list("project", ["8", "64"], "Worker counts to project to.")
    flags.DEFINE_float("bandwidth_gbit", 10.0, "Projection: network bandwidth per worker, Gbit/s.")
    flags.DEFINE_float("latency_us", 50.0, "Projection: latency of one message, microseconds.")
    flags.DEFINE_string("only", "", "Internal: run one worker of this model (TF_CONFIG set).")


def main(argv):
    data_dir = cli.data_dir()  # generated once, by the parent; its workers get the path
    if FLAGS.only:
        logging.set_verbosity(logging.WARNING)  # tf.distribute's INFO lines, per worker
        tf.get_logger().setLevel("WARNING")
        return run_worker(data_dir, FLAGS.only)
    mb = 1 / 2 ** 20
    bandwidth = FLAGS.bandwidth_gbit * 1e9 / 8
    print(f"global batch {FLAGS.batch_size}, L={FLAGS.max_history}, {data_dir}; workers on "
          f"loopback of one {os.cpu_count()}-core machine")
    for method in FLAGS.models:
        b = gradient_bytes(data_dir, method, FLAGS.batch_size)
        print(f"\n{method}: gradients of a {FLAGS.batch_size}-row batch: dense layers "
              f"{b['dense'] * mb:.2f} MiB; embeddings {b['lookups']} looked-up rows = "
              f"{b['sparse'] * mb:.2f} MiB as IndexedSlices ({b['unique'] * mb:.2f} MiB with "
              f"each id's rows summed first), {b['tables'] * mb:.2f} MiB as dense tables")
        rates = {}
        for w in map(int, FLAGS.workers):
            rates[w] = steps_per_s(data_dir, method, w)
            dense, sparse, tables = traffic(b, w)
            print(f"  {w} worker(s): {rates[w]:7.2f} steps/s, "
                  f"{rates[w] * FLAGS.batch_size:8.0f} examples/s; received per worker "
                  f"a step: dense {dense * mb:.2f} MiB + embedding rows {sparse * mb:.2f} MiB "
                  f"(dense tables would be {tables * mb:.2f} MiB)")
        if 1 not in rates:
            continue
        t1 = 1 / rates[1]  # one worker's step on the global batch: all compute
        print(f"  projection ({FLAGS.bandwidth_gbit:g} Gbit/s, {FLAGS.latency_us:g} us a "
              "message, compute split evenly, no overlap of compute and exchange):")
        for w in map(int, FLAGS.project):
            dense, sparse, _ = traffic(b, w)
            for batch in (FLAGS.batch_size, FLAGS.batch_size * w):  # fixed global, per worker
                scale = batch / FLAGS.batch_size
                # all-gathered rows grow with the global batch; 2 (w-1) ring messages + (w-1)
                exchange = ((dense + sparse * scale) / bandwidth
                            + 3 * (w - 1) * FLAGS.latency_us * 1e-6)
                step = t1 * scale / w + exchange
                speedup = batch / step / (rates[1] * FLAGS.batch_size)
                print(f"    {w:3d} workers, global batch {batch:6d}: {1 / step:7.1f} steps/s, "
                      f"{batch / step:9.0f} examples/s ({speedup:.1f}x 1 worker), exchange "
                      f"{exchange / step:.0%} of the step")

if __name__ == "__main__":
    define_flags()
    cli.run(main)
