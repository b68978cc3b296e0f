"""DINAttention alone: training and serving shapes, against the reference layout and the bare ops.

    python -m benchmarks.din_attention

Training: forward and backward of a batch (B queries [B, d], histories
[B, L, d] of random lengths 1..L, as benchmarks.ctr_step) through
`tfmm.layers.DINAttention` and through the reference layout (DeepCTR, the
DIN paper's code): the MLP on concatenated ``[q, k, q - k, q * k]`` rows of
every position, padding included.

Serving (the ``rank`` signature's case): one user's history [1, L, d]
against C candidates [1, C, d], forward only, next to the same reference
on C rows that repeat the history, and next to the floor: the bare ops the
layer cannot avoid (first layer as one matmul, both sigmoids, the 80 -> 40
and 40 -> 1 products), each timed alone and summed.

Calls alternate between the variants so that this VM's drift hits them
alike; p50 and p99 in ms.
"""

import os
import time

from absl import app, flags

flags.DEFINE_integer("batch_size", 1024, "Training batch.")
flags.DEFINE_integer("max_history", 50, "Training history length L.")
flags.DEFINE_integer("candidates", 200, "Serving candidates C.")
flags.DEFINE_integer("serving_history", 100, "Serving history length (all real).")
flags.DEFINE_integer("dim", 32, "Query/key width d (item + category embeddings of 16).")
flags.DEFINE_integer("calls", 100, "Timed calls per variant.")
FLAGS = flags.FLAGS

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfmm.keras_compat import keras  # noqa: E402
from tfmm.layers import DINAttention  # noqa: E402

UNITS = (80, 40)


def reference(din):
    """The reference layout with `din`'s weights: MLP over concat rows, masked sum."""
    def call(query, keys, weights):
        q = tf.broadcast_to(query[..., None, :], tf.shape(keys))
        x = tf.concat([q, keys, q - keys, q * keys], -1)
        x = tf.sigmoid(tf.matmul(x, din.kernel) + din.bias)
        x = tf.sigmoid(din.dense[0](x))
        scores = din.dense[1](x)[..., 0] * weights
        return tf.reduce_sum(scores[..., None] * keys, -2)
    return call


def timed(fns, calls):
    """ms per call of each fn(), alternating; returns one array per fn."""
    for fn in fns:
        for _ in range(5):
            fn()
    times = [[] for _ in fns]
    for i in range(calls):
        for j in (range(len(fns)) if i % 2 == 0 else reversed(range(len(fns)))):
            start = time.perf_counter()
            fns[j]()
            times[j].append(time.perf_counter() - start)
    return [1e3 * np.array(t) for t in times]


def row(label, ms):
    print(f"  {label:<58} {np.percentile(ms, 50):8.2f} {np.percentile(ms, 99):8.2f}", flush=True)


def training(din, rng):
    b, L, d = FLAGS.batch_size, FLAGS.max_history, FLAGS.dim
    lengths = rng.integers(1, L + 1, b)
    mask = tf.constant(np.arange(L)[None] < lengths[:, None])
    query = tf.constant(rng.normal(size=(b, d)), tf.float32)
    keys = tf.constant(rng.normal(size=(b, L, d)), tf.float32)
    ref = reference(din)

    def step(fn):
        @tf.function
        def run():
            with tf.GradientTape() as tape:
                tape.watch([query, keys])
                out = fn()
            return tape.gradient(tf.reduce_sum(out * out), [query, keys] + din.trainable_weights)
        return lambda: [tf.convert_to_tensor(g).numpy() for g in run()]

    ours, theirs = timed([step(lambda: din(query, keys, mask=mask, training=True)),
                          step(lambda: ref(query, keys, tf.cast(mask, tf.float32)))],
                         FLAGS.calls)
    print(f"training, forward + backward: B={b}, L={L} (mean length {lengths.mean():.1f}), "
          f"d={d}, attention {UNITS}")
    row("DINAttention (real positions only)", ours)
    row("reference layout (concat rows, every position)", theirs)
    print(f"  ratio DINAttention / reference: p50 {np.median(ours) / np.median(theirs):.2f}x")


def serving(din, rng):
    c, L, d = FLAGS.candidates, FLAGS.serving_history, FLAGS.dim
    h1, h2 = UNITS
    query = tf.constant(rng.normal(size=(1, c, d)), tf.float32)
    keys = tf.constant(rng.normal(size=(1, L, d)), tf.float32)
    mask = tf.ones((1, L), tf.bool)
    rows_q = tf.reshape(query, [c, d])
    rows_k = tf.broadcast_to(keys, [c, L, d])
    ref = reference(din)
    layer = tf.function(lambda: din(query, keys, mask=mask))
    per_row = tf.function(lambda: ref(rows_q, rows_k, tf.ones((c, L))))
    # The floor's operands, shaped as the layer's own.
    keys1 = tf.constant(rng.normal(size=(1, L, d + 1)), tf.float32)
    kernel = tf.constant(rng.normal(size=(1, d + 1, c * h1)), tf.float32)
    hidden1 = tf.constant(rng.normal(size=(c * L, h1)), tf.float32)
    hidden2 = tf.constant(rng.normal(size=(c * L, h2)), tf.float32)
    w2, w3 = din.dense[0].kernel, din.dense[1].kernel
    parts = {"first layer: [L, d + 1] @ [d + 1, C * 80]": tf.function(lambda: tf.matmul(keys1, kernel)),
             "sigmoid of [C * L, 80]": tf.function(lambda: tf.sigmoid(hidden1)),
             "[C * L, 80] @ [80, 40]": tf.function(lambda: tf.matmul(hidden1, w2)),
             "sigmoid of [C * L, 40]": tf.function(lambda: tf.sigmoid(hidden2)),
             "[C * L, 40] @ [40, 1]": tf.function(lambda: tf.matmul(hidden2, w3))}
    names = list(parts)
    results = timed([lambda: layer().numpy(), lambda: per_row().numpy()]
                    + [lambda f=f: f().numpy() for f in parts.values()], FLAGS.calls)
    print(f"serving, forward: 1 user x C={c} candidates, history {L}, d={d}")
    row("DINAttention (history once, candidates on an axis)", results[0])
    row("reference layout (C rows repeating the history)", results[1])
    floor = sum(np.median(t) for t in results[2:])
    for name, t in zip(names, results[2:]):
        row(f"  floor part: {name}", t)
    print(f"  floor (sum of the parts' p50): {floor:.2f} ms; DINAttention p50 is "
          f"{np.median(results[0]) / floor:.2f}x it, the reference "
          f"{np.median(results[1]) / floor:.2f}x")


def main(argv):
    del argv
    rng = np.random.default_rng(0)
    print(f"{os.cpu_count()} CPUs, TF {tf.__version__}, load average "
          f"{os.getloadavg()[0]:.2f}; {FLAGS.calls} calls each; {'':<8} p50 ms   p99 ms")
    din = DINAttention(hidden_units=UNITS)
    din(tf.zeros((1, FLAGS.dim)), tf.zeros((1, 2, FLAGS.dim)))
    keras.utils.set_random_seed(0)
    training(din, rng)
    serving(din, rng)


if __name__ == "__main__":
    app.run(main)
