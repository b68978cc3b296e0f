"""Trains a small embedding model a few steps with `tfmm.optimizers` on 2 replicas
(MirroredStrategy, 2 logical CPUs, ``strategy.run(model.train_step)``) and in one
process on the same global batches, recording the sparse gradients each replica
hands to the exchange (``ReplicaContext.all_reduce``); writes them and the
weights to an .npz for tests/test_optimizers.py.

A script run in a subprocess: logical devices must be set before TensorFlow
initialises its runtime, which a pytest session has done.

Usage: python -m tests.per_id_replicas OUT.npz
"""

import sys

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tfmm import distribute  # noqa: E402
from tfmm.optimizers import DenseGradientAdam, PerIdAdam, PerIdSGD  # noqa: E402

BATCH, STEPS, IDS = 8, 3, 6  # 40 lookups a batch of 6 ids: every id repeats
OPTIMIZERS = {"keras_adam": keras.optimizers.Adam, "per_id_adam": PerIdAdam,
              "dense_adam": DenseGradientAdam, "per_id_sgd": PerIdSGD}

exchanged = []  # (indices, dense sum) of each sparse gradient handed to all_reduce
_all_reduce = tf.distribute.ReplicaContext.all_reduce


def spy(self, reduce_op, value, options=None):
    for g in tf.nest.flatten(value, expand_composites=False):
        if isinstance(g, tf.IndexedSlices):
            exchanged.append((g.indices.numpy(), tf.convert_to_tensor(g).numpy()))
    return _all_reduce(self, reduce_op, value, options)


tf.distribute.ReplicaContext.all_reduce = spy


def data():
    rng = np.random.default_rng(0)
    x = rng.integers(0, IDS, (BATCH * STEPS, 5)).astype("int32")
    y = rng.normal(size=(BATCH * STEPS, 1)).astype("float32")
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)


def train(optimizer, strategy=None):
    """The weights after STEPS steps, and the sparse gradients exchanged."""
    exchanged.clear()
    with strategy.scope() if strategy else tf.device("/cpu:0"):
        keras.utils.set_random_seed(0)
        ids = keras.Input((5,), dtype="int32")
        h = keras.layers.Flatten()(keras.layers.Embedding(IDS, 3)(ids))
        model = keras.Model(ids, keras.layers.Dense(1)(h))
        model.compile(OPTIMIZERS[optimizer](0.05), "mse")
        model.optimizer.build(model.trainable_variables)
    if strategy:  # eager: the spy reads the values
        batches = strategy.distribute_datasets_from_function(
            lambda c: data().apply(distribute.replica_slices(c, 2)).map(lambda xy, w: (*xy, w)))
        for batch in batches:
            strategy.run(model.train_step, args=(batch,))
    else:
        for batch in data():
            model.train_step(batch)
    out = {f"weight_{i}": w.numpy() for i, w in enumerate(model.weights)}
    out.update({f"indices_{i}": g for i, (g, _) in enumerate(exchanged)})
    out.update({f"sum_{i}": s for i, (_, s) in enumerate(exchanged)})
    return out


def main(out):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    runs = {}
    for optimizer in OPTIMIZERS:
        for name, run in (("single", train(optimizer)),
                          ("replicas", train(optimizer, strategy))):
            runs.update({f"{optimizer}/{name}/{k}": v for k, v in run.items()})
    np.savez(out, **runs)


if __name__ == "__main__":
    main(sys.argv[1])
