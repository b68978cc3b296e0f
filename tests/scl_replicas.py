"""Trains an SCLModel a few steps on 2 replicas, the way a distributed loop
does (``strategy.run(model.train_step)`` in a tf.function), and the same model
in one process on the same global batches; writes the states to an .npz for
tests/test_scl.py.

A script run in subprocesses: logical devices and TF_CONFIG must be set
before TensorFlow initialises its runtime, which a pytest session has done.

Usage: python -m tests.scl_replicas OUT.npz  (MirroredStrategy, 2 logical CPUs)
       python -m tests.scl_replicas OUT.npz WORKER PORT0,PORT1
       (MultiWorkerMirroredStrategy, worker WORKER of 2 on localhost)
"""

import contextlib
import json
import os
import sys

import tensorflow as tf

MULTI_WORKER = len(sys.argv) == 4
if MULTI_WORKER:
    os.environ["TF_CONFIG"] = json.dumps({
        "cluster": {"worker": [f"localhost:{port}" for port in sys.argv[3].split(",")]},
        "task": {"type": "worker", "index": int(sys.argv[2])}})
else:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tests.test_scl import batches  # noqa: E402
from tfmm.momentum_queue import MomentumQueueCallback, gather_replicas  # noqa: E402
from tfmm.scl import SCLModel  # noqa: E402

REPLICAS, BATCH, STEPS = 2, 8, 3  # a queue of 16: the pointer ends at 8


def bn_tower():
    x = keras.Input((3,))
    h = keras.layers.BatchNormalization()(keras.layers.Dense(8, use_bias=False)(x))
    h = keras.layers.Activation("tanh")(h)
    return keras.Model(x, keras.layers.UnitNormalization()(keras.layers.Dense(4)(h)))


def train(positive_tower, strategy=None, fit=False):
    """Per-step losses (with `fit`, Keras' fit: the epoch's), the queue's ids
    and pointer, the final weights, and whether every variable's replica
    copies are equal (True in one process)."""
    with strategy.scope() if strategy else contextlib.nullcontext():
        keras.utils.set_random_seed(0)
        model = SCLModel(bn_tower(), make_key_tower=bn_tower, queue_size=16, momentum=0.9,
                         positive_tower=positive_tower)
        model.compile(optimizer=keras.optimizers.Adam(0.05))
        if not fit:  # SCLModel.fit builds it
            model.optimizer.build(model.trained_weights())
    data = batches(n=BATCH * STEPS, batch=BATCH)
    if fit:
        return state(model, strategy, model.fit(data, verbose=0).history["loss"])
    callbacks = keras.callbacks.CallbackList([MomentumQueueCallback(0.9)], model=model)
    step = tf.function(lambda b: strategy.run(model.train_step, args=(b,))) if strategy else \
        tf.function(model.train_step)
    if strategy:
        data = strategy.experimental_distribute_dataset(data)
    callbacks.on_train_begin()
    losses = []
    for batch in data:
        for m in model.metrics:
            m.reset_state()
        logs = step(batch)
        if strategy:  # each replica tracks its rows; their mean, as Keras' fit reduces logs
            logs = {k: strategy.reduce("MEAN", v, axis=None) for k, v in logs.items()}
        losses.append(float(logs["loss"]))
    callbacks.on_train_end()
    return state(model, strategy, losses)


def state(model, strategy, losses):
    same = all(all(np.array_equal(c.numpy(), w.value.values[0].numpy()) for c in w.value.values)
               for w in model.weights) if strategy else True
    return {"losses": losses, "queue_ids": model.queue.ids.numpy(),
            "pointer": model.queue.pointer.numpy(), "copies_equal": same,
            **{f"weight_{i}": w.numpy() for i, w in enumerate(model.weights)}}


def gather_order():
    """gather_replicas under strategy.run, replica r holding rows [10r, 10r + 1, 10r + 2]."""
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    rows = strategy.experimental_distribute_values_from_function(
        lambda context: 10 * context.replica_id_in_sync_group + tf.range(3))
    (gathered,), start = strategy.run(gather_replicas, args=(rows,))
    return ([t.numpy() for t in strategy.experimental_local_results(gathered)],
            [int(t) for t in strategy.experimental_local_results(start)])


def main(out):
    if MULTI_WORKER:  # created first: it sets up the collectives
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        runs = {}
    else:
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        gathered, starts = gather_order()
        runs = {"gathered": np.stack(gathered), "starts": starts}
    assert strategy.num_replicas_in_sync == REPLICAS
    runs["ids"] = np.concatenate([b["positive_id"].numpy()
                                  for b in batches(n=BATCH * STEPS, batch=BATCH)])
    cases = {"momentum": {}, "query": {"positive_tower": "query"}}
    if not MULTI_WORKER:  # Keras 3's fit runs under MirroredStrategy (not under MWMS)
        cases["fit"] = {"fit": True}
    for case, kwargs in cases.items():
        kwargs = {"positive_tower": "momentum", **kwargs}
        for name, run in (("single", train(**kwargs)),
                          ("replicas", train(**kwargs, strategy=strategy))):
            runs.update({f"{case}/{name}/{k}": v for k, v in run.items()})
    np.savez(out, **runs)


if __name__ == "__main__":
    main(sys.argv[1])
