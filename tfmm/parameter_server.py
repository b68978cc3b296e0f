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
without waiting for each other). `train` runs steps of a given loss; the
CTR job (``--strategy=parameter_server``) trains epochs of the model's own
``train_step`` through `tfmm.distribute.fit` (`epoch_function`), each worker
reading its own share of the batches (`per_worker_dataset`), and exports
the ranker with its shards joined (`joined`).

Every task reads the standard ``TF_CONFIG`` (a ``chief``, ``worker`` and
``ps`` cluster); ``python -m tfmm.parameter_server``, or the job's own
command, runs a ``worker`` or ``ps`` task's server until it is killed. Why
not Keras 3's Embedding with the strategy's ``variable_partitioner``:
DECISIONS.md, "ShardedEmbedding for tables bigger than one worker".
"""

import os
import socket
import sys
import time
import weakref

import numpy as np
import tensorflow as tf

from tfmm import cli
from tfmm.keras_compat import LEGACY, keras
from tfmm.layers import ShardedEmbedding

SERVER_TASKS = ("worker", "ps")
_coordinators = weakref.WeakKeyDictionary()  # strategy -> its one ClusterCoordinator


def is_server(resolver=None):
    """Whether ``TF_CONFIG`` (or `resolver`) names a ``worker`` or ``ps`` task: one that
    runs `serve` while the chief trains."""
    resolver = resolver or tf.distribute.cluster_resolver.TFConfigClusterResolver()
    return resolver.task_type in SERVER_TASKS


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


class ClusterTimeout(ValueError):
    """Tasks of the cluster that did not start within the chief's timeout."""


def _accepts(address, timeout=1.0):
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def wait_for_servers(resolver, timeout, poll=0.5):
    """Returns once every ``worker`` and ``ps`` task of `resolver`'s cluster accepts
    connections; says once on stderr which it waits for, and raises ClusterTimeout
    after `timeout` seconds (0: never). TensorFlow would wait for them silently,
    forever."""
    spec = resolver.cluster_spec()
    tasks = {f"{job} {i} ({spec.task_address(job, i)})": spec.task_address(job, i)
             for job in SERVER_TASKS if job in spec.jobs for i in spec.task_indices(job)}
    deadline = time.monotonic() + timeout
    said = False
    while True:
        missing = [name for name, address in tasks.items() if not _accepts(address)]
        if not missing:
            return
        if timeout and time.monotonic() >= deadline:
            raise ClusterTimeout(f"{', '.join(missing)} of the cluster in $TF_CONFIG did not "
                                 f"start within {timeout:g} s (--cluster_timeout): start "
                                 f"{'it' if len(missing) == 1 else 'them'} (the same command, "
                                 "or python -m tfmm.parameter_server, with each task's "
                                 "TF_CONFIG) or correct the addresses.")
        if not said:
            limit = f"giving up after {timeout:g} s" if timeout else "without a time limit"
            print(f"chief: waiting for {', '.join(missing)} of the cluster to start "
                  f"({limit}, --cluster_timeout)", file=sys.stderr, flush=True)
            said = True
        time.sleep(poll)


def strategy(resolver=None, timeout=300.0):
    """The strategy of the chief of ``TF_CONFIG``'s cluster (or of `resolver`'s), made
    once its servers are up (`wait_for_servers`, up to `timeout` seconds)."""
    resolver = resolver or tf.distribute.cluster_resolver.TFConfigClusterResolver()
    wait_for_servers(resolver, timeout)
    return tf.distribute.ParameterServerStrategy(resolver)


def cluster_resolver(strategy):
    """The cluster resolver `strategy` was made with (in TF 2.21 its public
    ``cluster_resolver`` is None)."""
    return strategy.cluster_resolver or strategy._cluster_resolver


def num_parameter_servers(resolver=None):
    """The ``ps`` tasks of ``TF_CONFIG``'s cluster (or of `resolver`'s): a `DINRanker`'s
    ``embedding_shards``, one shard of each table on every server."""
    resolver = resolver or tf.distribute.cluster_resolver.TFConfigClusterResolver()
    return resolver.cluster_spec().num_tasks("ps")


def cluster_coordinator(strategy):
    """The `ClusterCoordinator` of `strategy` (a strategy has at most one)."""
    if strategy not in _coordinators:
        _coordinators[strategy] = tf.distribute.coordinator.ClusterCoordinator(strategy)
    return _coordinators[strategy]


def per_worker_dataset(strategy, dataset_fn):
    """``dataset_fn(num_workers, index)`` on every worker, each with its own `index`.

    The strategy gives every worker the same input context, so each worker
    draws its index from a counter on a parameter server when it makes its
    iterator (a worker that is restarted draws again; indexes wrap around).
    """
    with strategy.scope():
        drawn = tf.Variable(0, dtype=tf.int64, trainable=False, name="input_shards_drawn")
    workers = cluster_resolver(strategy).cluster_spec().num_tasks("worker")

    @tf.autograph.experimental.do_not_convert  # the coordinator traces it: Python as is
    def worker_dataset():
        return dataset_fn(workers, (drawn.assign_add(1) - 1) % workers)

    return cluster_coordinator(strategy).create_per_worker_dataset(worker_dataset)


def epoch_function(model, strategy, dataset_fn, steps, callbacks):
    """A function that trains compiled `model` for one epoch of `steps` steps of
    ``model.train_step``, scheduled on the workers; it returns the epoch's last logs.

    Args:
        dataset_fn: `per_worker_dataset`'s, of repeated batches.
        callbacks: a `keras.callbacks.CallbackList`; its batch hooks see no logs
            (a step's logs stay on its worker until it is fetched).
    """
    batches = iter(per_worker_dataset(strategy, dataset_fn))

    @tf.function
    def step(batches):
        return strategy.run(model.train_step, args=(next(batches),))

    def epoch():
        for k in range(steps):
            callbacks.on_train_batch_begin(k)
            logs = cluster_coordinator(strategy).schedule(step, args=(batches,))
            callbacks.on_train_batch_end(k)
        cluster_coordinator(strategy).join()
        return logs.fetch()

    return epoch


def placement(model):
    """Where the rows of each of `model`'s `ShardedEmbedding` tables are:
    ``{table: [{"device", "rows"}, ...]}``, in shard order."""
    return {layer.name: [{"device": (s if LEGACY else s.value).device,
                          "rows": int(s.shape[0])} for s in layer.weights]
            for layer in model._flatten_layers() if isinstance(layer, ShardedEmbedding)}


def joined_weights(model):
    """`model`'s weights as the same model with one variable per `ShardedEmbedding`
    lists them: each table's shards concatenated, in place of its first shard."""
    tables = {id(w): layer for layer in model._flatten_layers()
              if isinstance(layer, ShardedEmbedding) for w in layer.weights}
    out, done = [], set()
    for w in model.weights:
        table = tables.get(id(w))
        if table is None:
            out.append(w.numpy())
        elif id(table) not in done:
            done.add(id(table))
            out.append(np.concatenate([s.numpy() for s in table.weights]))
    return out


def joined(model):
    """A `DINRanker` equal to sharded `model` with each table in one variable, made on
    this process (outside any strategy): what one machine exports and serves."""
    from tfmm.ranker import DINRanker

    single = DINRanker.from_config({**model.get_config(), "embedding_shards": 1})
    single.set_weights(joined_weights(model))
    return single


def train(strategy, model, optimizer, dataset_fn, steps, coordinator=None):
    """Trains `model` for `steps` steps on the workers; returns each step's loss.

    Args:
        strategy: a `ParameterServerStrategy`; `model` was built under its scope.
        optimizer: a Keras optimizer made under the strategy's scope (it keeps
            the strategy it was made under); built here on first use.
        dataset_fn: no arguments to ``(features, label)`` batches, repeated;
            each worker runs it and takes the next batch for every step.
        coordinator: the strategy's `ClusterCoordinator` (default
            `cluster_coordinator`'s).

    The loss is binary cross-entropy, the mean over the batch.
    """
    coordinator = coordinator or cluster_coordinator(strategy)
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
    cli.run(main)
