"""What does the MoCo queue cost? One SCL training step with a K-key queue
against the same step with a minimal queue, next to the extra logits matmul
(forward, and its gradient) that K keys require. Then the image-title
objective's queue, rows of [image key, title key] (`tfmm.image_title`): its
two InfoNCE losses, forward and backward, against the same on two separate
[K, d] queues (what the two keys per row cost).

    python -m benchmarks.moco_queue --queue_size=196800 --batch_size=64 [--json=PATH]
"""

import os
import time

from absl import flags
import keras
import numpy as np
import tensorflow as tf

from benchmarks import report
from tfmm import cli
from tfmm.scl import SCLModel
from tfmm.towers import image_tower

FLAGS = flags.FLAGS


def step_time(queue_size, batch):
    model = SCLModel(image_tower(dim=FLAGS.dim), make_key_tower=lambda: image_tower(dim=FLAGS.dim),
                     queue_size=queue_size, momentum=0.99)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    data = tf.data.Dataset.from_tensors(batch).repeat()
    model.fit(data, steps_per_epoch=3, verbose=0)  # trace, warm up
    return timed(lambda: model.fit(data, steps_per_epoch=FLAGS.steps, verbose=0))


def timed(run):
    """(wall, CPU) seconds per step of `run` (FLAGS.steps steps): the CPU time of
    the process's threads is less disturbed by other jobs on a shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return ((time.perf_counter() - wall) / FLAGS.steps, (time.process_time() - cpu) / FLAGS.steps)


def matmul_time(batch_size, queue_size, dim):
    q = tf.random.normal([batch_size, dim])
    keys = tf.random.normal([queue_size, dim])

    @tf.function
    def logits_and_grad():
        with tf.GradientTape() as tape:
            tape.watch(q)
            s = tf.reduce_sum(tf.matmul(q, keys, transpose_b=True))
        # Return the sum too: else the forward matmul is pruned (the gradient of a
        # sum of products needs only the backward one).
        return s, tape.gradient(s, q)

    logits_and_grad()
    return timed(lambda: [[t.numpy() for t in logits_and_grad()] for _ in range(FLAGS.steps)])


def pair_queue_times(batch_size, queue_size, dim):
    """(wall, CPU) s per call of image-title's two queue losses and their gradient: on
    one [K, 2d] queue of [image key, title key] rows, and on two [K, d] queues."""
    from tfmm.scl import info_nce

    rng = np.random.default_rng(1)
    wide = tf.constant(rng.normal(size=(queue_size, 2 * dim)).astype("float32"))
    image_keys, title_keys = tf.constant(wide[:, :dim]), tf.constant(wide[:, dim:])
    ids = tf.constant(rng.integers(0, 10 * queue_size, queue_size))
    images, titles = (tf.constant(rng.normal(size=(batch_size, dim)).astype("float32"))
                      for _ in range(2))
    batch_ids = tf.constant(rng.integers(0, 10 * queue_size, batch_size))

    def losses(image_queue, title_queue, image_columns=None, title_columns=None):
        @tf.function
        def run():
            with tf.GradientTape() as tape:
                tape.watch([images, titles])
                loss = tf.reduce_mean(info_nce(images, titles, 14.0, title_queue, batch_ids, ids,
                                               extra_columns=title_columns)
                                      + info_nce(titles, images, 14.0, image_queue, batch_ids,
                                                 ids, extra_columns=image_columns))
            return loss, tape.gradient(loss, [images, titles])

        run()
        return timed(lambda: [tf.nest.map_structure(lambda t: t.numpy(), run())
                              for _ in range(FLAGS.steps)])

    return (losses(wide, wide, slice(0, dim), slice(dim, None)),
            losses(image_keys, title_keys))


def define_flags():
    flags.DEFINE_integer("queue_size", 196_800, "K (the paper's).")
    flags.DEFINE_integer("batch_size", 64, "Batch size (K must be a multiple).")
    flags.DEFINE_integer("dim", 128, "Vector dimension.")
    flags.DEFINE_integer("steps", 20, "Timed steps.")
    report.define_json_flag()


def main(argv):
    del argv
    b = FLAGS.batch_size
    rng = np.random.default_rng(0)
    batch = {k: rng.integers(0, 255, (b, 64, 64, 3)).astype("uint8")
             for k in ("query", "positive", "negative")}
    batch["positive_id"] = np.arange(b)
    small = step_time(b, batch)
    big = step_time(FLAGS.queue_size, batch)
    extra = matmul_time(b, FLAGS.queue_size, FLAGS.dim)
    cost = [x - y for x, y in zip(big, small)]
    print(f"batch {b}, d={FLAGS.dim}, {os.cpu_count()} CPUs, TF {tf.__version__}, "
          f"load {os.getloadavg()[0]:.2f}; ms per step, wall / CPU time")
    print(f"SCL step, queue of {b}:           {ms(small)}")
    print(f"SCL step, queue of {FLAGS.queue_size}:       {ms(big)}")
    print(f"queue's extra cost:               {ms(cost)}")
    print(f"extra logits matmul + its grad:   {ms(extra)}")
    print(f"queue cost / matmul:              {cost[0] / extra[0]:8.2f} / {cost[1] / extra[1]:.2f}")
    rows, separate = pair_queue_times(b, FLAGS.queue_size, FLAGS.dim)
    print(f"image-title queue losses + grads, [K, 2d] rows: {ms(rows)}")
    print(f"the same on two [K, d] queues:                  {ms(separate)}")
    print(f"rows / separate:                  {rows[0] / separate[0]:8.2f} / "
          f"{rows[1] / separate[1]:.2f}")
    report.write_json({"step_small_queue_ms": small[0] * 1e3, "step_queue_ms": big[0] * 1e3,
                       "queue_cost_ms": cost[0] * 1e3, "matmul_and_grad_ms": extra[0] * 1e3,
                       "queue_cost_over_matmul": cost[0] / extra[0],
                       "cpu_ms": {"step_small_queue": small[1] * 1e3, "step_queue": big[1] * 1e3,
                                  "queue_cost": cost[1] * 1e3, "matmul_and_grad": extra[1] * 1e3,
                                  "queue_cost_over_matmul": cost[1] / extra[1]},
                       "image_title_queue_ms": rows[0] * 1e3,
                       "image_title_separate_queues_ms": separate[0] * 1e3,
                       "image_title_rows_over_separate": rows[0] / separate[0]})


def ms(seconds):
    return f"{seconds[0] * 1e3:8.1f} / {seconds[1] * 1e3:8.1f}"


if __name__ == "__main__":
    define_flags()
    cli.run(main)
