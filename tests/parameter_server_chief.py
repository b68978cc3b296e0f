"""The chief of test_parameter_server's cluster: ``python -m tests.parameter_server_chief
DATA_DIR OUT`` trains a small id ranker for one step, then for STEPS more, and writes
OUT.npz (the weights with each table's shards joined, before, after one step and at the end,
as prefix:index) and OUT.json (the losses, the device and shape of every item-table shard, and
the input shard each of STEPS steps read)."""

import json
import sys

import numpy as np
import tensorflow as tf

from tfmm import data, parameter_server
from tfmm.data import schema
from tfmm.keras_compat import keras
from tfmm.ranker import DINRanker

STEPS = 20
RANKER = {"max_history": 10, "embedding_dim": 8, "attention_units": (8,), "mlp_units": (16,)}
BATCH_SIZE, LEARNING_RATE = 64, 3e-3


def weights(model, prefix):
    return {f"{prefix}:{i:03d}": w for i, w in enumerate(parameter_server.joined_weights(model))}


def main(data_dir, out):
    strategy = parameter_server.strategy()
    meta = schema.read_metadata(data_dir)
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = DINRanker(meta["vocab"], embedding_shards=parameter_server.num_parameter_servers(),
                          **RANKER)
        optimizer = keras.optimizers.Adam(LEARNING_RATE)
    saved = weights(model, "init")

    def dataset_fn():
        return data.impressions(data_dir, "train", batch_size=BATCH_SIZE,
                                max_history=RANKER["max_history"], features=list(model.input),
                                repeat=True, validate=False)

    coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
    first = parameter_server.train(strategy, model, optimizer, dataset_fn, 1, coordinator)
    saved.update(weights(model, "step1"))
    rest = parameter_server.train(strategy, model, optimizer, dataset_fn, STEPS, coordinator)
    saved.update(weights(model, "end"))
    # Which input shard each step's worker reads: every index once per worker.
    shard_of = iter(parameter_server.per_worker_dataset(
        strategy, lambda workers, index: tf.data.Dataset.from_tensors(index).repeat()))
    # A step of some milliseconds: the coordinator gives the next one to the idle worker.
    take = tf.function(lambda iterator: next(iterator) + tf.cast(tf.reduce_min(
        tf.linalg.matmul(tf.ones([400, 400]), tf.ones([400, 400]))) * 0, tf.int64))
    read = [coordinator.schedule(take, args=(shard_of,)) for _ in range(STEPS)]
    coordinator.join()
    np.savez(out + ".npz", **saved)
    shards = [{"device": s.value.device, "shape": list(s.shape)}
              for s in model.item_embedding.shards]
    with open(out + ".json", "w") as f:
        json.dump({"losses": first + rest, "item_shards": shards,
                   "input_shards": [int(r.fetch()) for r in read]}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
