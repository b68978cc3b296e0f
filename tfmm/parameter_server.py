"""Training a ranker whose ID embedding tables are split over parameter servers.

``tf.distribute.ParameterServerStrategy`` with a ``ClusterCoordinator``: the
chief builds the model under the strategy's scope and schedules training
steps; each worker runs them on its own copy of the input; the variables
live on the ``ps`` tasks, placed in turn. A `DINRanker` built under the scope
with ``embedding_shards=num_parameter_servers()`` stores each ID table as
one `ShardedEmbedding` shard per parameter server, so a table
needs 1/P of its size on each of P servers and none of it on a worker:
lookups gather rows on the servers and the optimizer updates each shard
where it lives. Training is asynchronous (workers apply their gradients
without waiting for each other) and, as in TensorFlow's own, a worker's
input is not a slice of the others': `dataset_fn` runs on every worker.

Every task reads the standard ``TF_CONFIG`` (a ``chief``, ``worker`` and
``ps`` cluster); ``python -m tfmm.parameter_server`` runs a ``worker`` or
``ps`` task's server until it is killed. Why not Keras 3's Embedding with
the strategy's ``variable_partitioner``: BUILD.md, "Embedding tables bigger
than one worker".
"""

import os

import tensorflow as tf
from absl import app

from tfmm.keras_compat import keras

SERVER_TASKS = ("worker", "ps")


def serve(resolver=None):
    """Runs this ``worker`` or ``ps`` task's server (from ``TF_CONFIG``); never returns."""
    resolver = resolver or tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if resolver.task_type not in SERVER_TASKS:
        raise ValueError(f"serve: TF_CONFIG's task type is {resolver.task_type!r}; servers run "
                         f"the {SERVER_TASKS} tasks, the chief trains.")
    # As TensorFlow's PS guide sets it: the coordinator then sees a lost task and
    # reschedules its steps (untested here).
    os.environ["GRPC_FAIL_FAST"] = "use_caller"
    server = tf.distribute.Server(resolver.cluster_spec(), job_name=resolver.task_type,
                                  task_index=resolver.task_id,
                                  protocol=resolver.rpc_layer or "grpc", start=True)
    server.join()


def strategy(resolver=None):
    """The strategy of the chief of ``TF_CONFIG``'s cluster (or of `resolver`'s)."""
    resolver = resolver or tf.distribute.cluster_resolver.TFConfigClusterResolver()
    return tf.distribute.ParameterServerStrategy(resolver)


def num_parameter_servers(resolver=None):
    """The ``ps`` tasks of ``TF_CONFIG``'s cluster (or of `resolver`'s): a `DINRanker`'s
    ``embedding_shards``, one shard of each table on every server."""
    resolver = resolver or tf.distribute.cluster_resolver.TFConfigClusterResolver()
    return resolver.cluster_spec().num_tasks("ps")


def train(strategy, model, optimizer, dataset_fn, steps, coordinator=None):
    """Trains `model` for `steps` steps on the workers; returns each step's loss.

    Args:
        strategy: a `ParameterServerStrategy`; `model` was built under its scope.
        optimizer: a Keras optimizer made under the strategy's scope (it keeps
            the strategy it was made under); built here on first use.
        dataset_fn: no arguments to ``(features, label)`` batches, repeated;
            each worker runs it and takes the next batch for every step.
        coordinator: the strategy's `ClusterCoordinator` (one is made if None;
            a strategy has at most one).

    The loss is binary cross-entropy, the mean over the batch.
    """
    coordinator = coordinator or tf.distribute.coordinator.ClusterCoordinator(strategy)
    if not optimizer.built:
        with strategy.scope():
            # Slots next to their variables, before a step (steps cannot make variables).
            optimizer.build(model.trainable_variables)
    batches = iter(coordinator.create_per_worker_dataset(dataset_fn))

    @tf.function
    def step(batches):
        def replica_step(features, label):
            with tf.GradientTape() as tape:
                p = model(features, training=True)
                loss = tf.reduce_mean(keras.losses.binary_crossentropy(
                    tf.reshape(tf.cast(label, p.dtype), tf.shape(p)), p))
            variables = model.trainable_variables
            optimizer.apply(tape.gradient(loss, variables), variables)
            return loss

        return strategy.run(replica_step, args=next(batches))

    losses = [coordinator.schedule(step, args=(batches,)) for _ in range(steps)]
    coordinator.join()
    return [float(loss.fetch()) for loss in losses]


def main(argv):
    del argv
    try:
        serve()
    except ValueError as e:
        raise SystemExit(f"tfmm.parameter_server: {e}") from None


if __name__ == "__main__":
    app.run(main)
