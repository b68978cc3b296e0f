"""DINAttention alone: training and serving shapes, against the reference layout and the bare ops.

    python -m benchmarks.din_attention

Training: forward and backward of a batch (B queries [B, d], histories
[B, L, d] of random lengths 1..L, as benchmarks.ctr_step) through
`tfmm.layers.DINAttention` and through the reference layout (DeepCTR, the
DIN paper's code): the MLP on concatenated ``[q, k, q - k, q * k]`` rows of
every position, padding included.

Serving (the ``rank`` signature's case): one user's history [1, L, d]
against C candidates [1, C, d], forward only, next to the same reference
on C rows that repeat the history, and next to the floor: a function of
only the products and sigmoids the layer cannot avoid (the first layer as
one matmul, 80 -> 40, 40 -> 1).

Calls alternate between the variants so that this VM's drift hits them
alike; p50 and p99 in ms.
"""

import os

from absl import flags
import numpy as np
import tensorflow as tf

from benchmarks.timing import paired
from tfmm import cli
from tfmm.keras_compat import keras
from tfmm.layers import DINAttention

FLAGS = flags.FLAGS

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


def alternating(fns):
    """ms per call of each fn(), --calls times each, in turn (benchmarks.timing.paired)."""
    return paired([lambda _, fn=fn: fn() for fn in fns], range(FLAGS.calls), warmup=5)


def row(label, ms):
    print(f"  {label:<72} {np.percentile(ms, 50):8.2f} {np.percentile(ms, 99):8.2f}", flush=True)


def training(din, rng):
    b, L, d = FLAGS.batch_size, FLAGS.max_history, FLAGS.dim
    lengths = rng.integers(1, L + 1, b)
    mask = tf.constant(np.arange(L)[None] < lengths[:, None])
    query = tf.constant(rng.normal(size=(b, d)), tf.float32)
    keys = tf.constant(rng.normal(size=(b, L, d)), tf.float32)
    ref = reference(din)

    def step(fn):
        @tf.function
        def run(query, keys):
            with tf.GradientTape() as tape:
                tape.watch([query, keys])
                out = fn(query, keys)
                loss = tf.reduce_sum(out * out)
            return tape.gradient(loss, [query, keys] + din.trainable_weights)
        return lambda: [g.numpy() for g in run(query, keys)]

    weights = tf.cast(mask, tf.float32)
    ours, theirs = alternating([step(lambda q, k: din(q, k, mask=mask, training=True)),
                                step(lambda q, k: ref(q, k, weights))])
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
    # The floor: the same products and sigmoids, shaped as the layer's own, and nothing else.
    keys1 = tf.constant(rng.normal(size=(1, L, d + 1)), tf.float32)
    kernel = tf.constant(rng.normal(size=(1, d + 1, c * h1)), tf.float32)
    w2, w3 = din.dense[0].kernel, din.dense[1].kernel

    @tf.function
    def floor():
        x = tf.sigmoid(tf.reshape(tf.matmul(keys1, kernel), [-1, h1]))
        return tf.reshape(tf.matmul(tf.sigmoid(tf.matmul(x, w2)), w3), [1, L, c])

    results = alternating([lambda: layer().numpy(), lambda: per_row().numpy(),
                           lambda: floor().numpy()])
    print(f"serving, forward: 1 user x C={c} candidates, history {L}, d={d}")
    row("DINAttention (history once, candidates on an axis)", results[0])
    row("reference layout (C rows repeating the history)", results[1])
    row("floor: [L, d+1] @ [d+1, C*80], sigmoid, @ [80, 40], sigmoid, @ [40, 1]", results[2])
    floor_ms = np.median(results[2])
    print(f"  DINAttention p50 is {np.median(results[0]) / floor_ms:.2f}x the floor's, the "
          f"reference {np.median(results[1]) / floor_ms:.2f}x")


def define_flags():
    flags.DEFINE_integer("batch_size", 1024, "Training batch.")
    flags.DEFINE_integer("max_history", 50, "Training history length L.")
    flags.DEFINE_integer("candidates", 200, "Serving candidates C.")
    flags.DEFINE_integer("serving_history", 100, "Serving history length (all real).")
    flags.DEFINE_integer("dim", 32, "Query/key width d (item + category embeddings of 16).")
    flags.DEFINE_integer("calls", 100, "Timed calls per variant.")


def main(argv):
    del argv
    rng = np.random.default_rng(0)
    print(f"{os.cpu_count()} CPUs, TF {tf.__version__}, load average "
          f"{os.getloadavg()[0]:.2f}; {FLAGS.calls} calls each")
    print(f"  {'':<72} {'p50 ms':>8} {'p99 ms':>8}")
    keras.utils.set_random_seed(0)
    din = DINAttention(hidden_units=UNITS)
    din(tf.zeros((1, FLAGS.dim)), tf.zeros((1, 2, FLAGS.dim)))
    training(din, rng)
    serving(din, rng)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
