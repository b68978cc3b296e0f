"""Data-parallel training on TensorFlow's own engine, `tf.distribute` (``--strategy``).

- ``none``: one process, Keras' ``model.fit`` (the jobs' own path).
- ``mirrored``: `tf.distribute.MirroredStrategy`, the devices of one machine.
- ``multi_worker``: `tf.distribute.MultiWorkerMirroredStrategy`, machines
  named by the standard ``TF_CONFIG``; every worker runs the same command.
- ``parameter_server``: `tf.distribute.ParameterServerStrategy`
  (`tfmm.parameter_server`): the chief alone runs the job, asynchronous steps
  on the workers, variables on the ``ps`` tasks; the ``worker`` and ``ps``
  tasks run servers.

Keras 3's ``fit`` fails under MultiWorkerMirroredStrategy ("Attempt to
convert a value (PerReplica...)"), so `fit` here is a loop of
``strategy.run(model.train_step)`` in a `tf.function`: the model's own step
(one definition of a step), Keras' own callbacks (`keras.callbacks.CallbackList`),
and checkpoints of model, optimizer and epoch with `tf.train.CheckpointManager`.
Keras 3 scales a compiled loss by 1 / replicas and its optimizer sums the
replicas' gradients, so a step equals the one-process step on the global
batch when every replica weighs its rows as in that batch (`replica_slices`).

The chief (worker 0, or the task of type ``chief``) alone writes records,
logs and exports; every worker writes its checkpoint, as `tf.distribute`
requires (saving may read variables through collectives), the others into a
temporary directory they delete. A killed job restarted with the same command
resumes on every worker from the chief's last checkpoint, which must be on a
file system every worker reads.

The jobs see none of this: `distribution` builds, once per process, a
`Distribution` for the setting, with the same calls with or without a
strategy (scope, chief, fit, predict, barrier, what metrics.json records of
the training, the model to export), so a job never branches on the strategy.
"""

import contextlib
import hashlib
import json
import os
import shutil
import socket
import weakref

import keras
import numpy as np
import tensorflow as tf

from tfmm import parameter_server
from tfmm.callbacks import BackupAndRestore

STRATEGIES = ("none", "mirrored", "multi_worker", "parameter_server")
_strategies = {}
_distributions = {}
_sums = weakref.WeakKeyDictionary()  # strategy -> its all-reduce of a number
_predictors = weakref.WeakKeyDictionary()  # model -> its `predictor`


def loopback_cluster(**tasks):
    """A ``TF_CONFIG`` cluster of ``tasks`` (e.g. ``worker=2`` or ``chief=1, worker=1,
    ps=2``) on free ports of this machine: a multi-worker job tried on one machine."""
    sockets = [socket.socket() for _ in range(sum(tasks.values()))]
    for s in sockets:  # all bound at once, so no two tasks get the same port
        s.bind(("localhost", 0))
    ports = iter([s.getsockname()[1] for s in sockets])
    for s in sockets:
        s.close()
    return {task: [f"localhost:{next(ports)}" for _ in range(n)] for task, n in tasks.items()}


def strategy(name, cluster_timeout=300.0):
    """The process's `tf.distribute.Strategy` of `name` (None for ``none``).

    Made once per process: MultiWorkerMirroredStrategy must exist before
    TensorFlow runs its first operation, so callers create it first thing.
    A ``parameter_server`` chief waits up to `cluster_timeout` seconds (0: no
    limit) for its cluster's servers (`tfmm.parameter_server.wait_for_servers`).
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy={name!r} is not one of {STRATEGIES}.")
    if name == "none":
        return None
    if name not in _strategies:
        if name == "mirrored":
            _strategies[name] = tf.distribute.MirroredStrategy()
        else:
            check_tf_config(name)
            if name == "multi_worker":
                _strategies[name] = tf.distribute.MultiWorkerMirroredStrategy()
            elif parameter_server.is_server():
                raise ValueError("$TF_CONFIG names a worker or ps task: it runs its server "
                                 "(tfmm.parameter_server.serve); the chief trains.")
            else:
                _strategies[name] = parameter_server.strategy(timeout=cluster_timeout)
    return _strategies[name]


def check_tf_config(name):
    """Raises ValueError unless ``$TF_CONFIG`` names a cluster for strategy `name` and this
    process's task in it: an empty one (``{}``) would train as one local worker."""
    if "TF_CONFIG" not in os.environ:
        raise ValueError(f"strategy={name!r} needs the cluster in $TF_CONFIG.")
    try:
        config = json.loads(os.environ["TF_CONFIG"])
    except ValueError as e:
        raise ValueError(f"$TF_CONFIG is not JSON: {e}") from None
    config = config if isinstance(config, dict) else {}
    cluster, task = config.get("cluster"), config.get("task")
    # Task lists, or TensorFlow's sparse {"index": "host:port"} form.
    cluster = {k: v for k, v in cluster.items() if isinstance(v, (list, dict)) and v} \
        if isinstance(cluster, dict) else {}
    needs = ("ps", "worker") if name == "parameter_server" else ("worker",)
    if not all(t in cluster for t in needs) and not (needs == ("worker",) and "chief" in cluster):
        example = ", ".join(f'"{t}": ["host:port", ...]' for t in needs)
        raise ValueError(f"$TF_CONFIG names no cluster for strategy={name!r}: it needs "
                         f'{{"cluster": {{{example}}}, "task": {{"type": ..., "index": ...}}}}, '
                         "each process its own task.")
    kind, index = (task.get("type"), task.get("index")) if isinstance(task, dict) else (None, None)
    tasks = cluster.get(kind, [])
    if not (isinstance(index, int) and (str(index) in tasks if isinstance(tasks, dict)
                                        else 0 <= index < len(tasks))):
        raise ValueError(f"$TF_CONFIG's task {task!r} is not a task of its cluster "
                         f"({', '.join(f'{t}: {len(v)}' for t, v in cluster.items())}): "
                         'give this process\'s own as "task": {"type": ..., "index": ...}.')


def is_chief(strategy):
    """Whether this process writes the run's records, logs and exports."""
    return alone(strategy) or strategy.extended.should_checkpoint


def alone(strategy):
    """Whether this process runs the job alone: no strategy, or the chief (coordinator)
    of a `tf.distribute.ParameterServerStrategy`, the only one that runs it."""
    return strategy is None or isinstance(strategy, tf.distribute.ParameterServerStrategy)


def worker_id(strategy):
    """This worker's index among its task type's (0 without a cluster)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    return getattr(resolver, "task_id", None) or 0


def chief_value(strategy, value):
    """The chief's integer `value` on every worker; also a barrier (all must call it)."""
    if alone(strategy):
        return value

    if strategy not in _sums:  # traced once per value (a tensor made outside the
        # replica function has no device for the all-reduce to start from)
        _sums[strategy] = tf.function(lambda v: strategy.run(
            lambda: tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, tf.constant(v, tf.int64))))
    mine = int(value) if is_chief(strategy) else 0
    # Every local replica of the chief's machine adds it once.
    total = int(strategy.experimental_local_results(_sums[strategy](mine))[0])
    local = strategy.num_replicas_in_sync // max(1, _num_workers(strategy))
    return total // local


def _num_workers(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    spec = resolver.cluster_spec().as_dict() if resolver is not None else {}
    return sum(len(spec.get(t, [])) for t in ("chief", "worker")) or 1


def replica_slices(context, num_replicas, weights=True):
    """A function of a dataset of global batches that keeps this input pipeline's rows.

    Every worker reads the same global batches; replica r of R keeps the r-th
    of R contiguous slices of each (sizes differing by at most one, a last
    short batch included), so the k-th step of R replicas holds the k-th
    global batch's rows, as in one process. A pipeline feeding several local
    replicas yields their slices in turn. With `weights`, each slice comes
    with a weight per row, R * n_r / N (1 for equal slices): Keras averages a
    replica's loss over its n_r rows and scales it by 1 / R, so that every row
    weighs 1 / N, as in the global batch.

    Args:
        context: the `tf.distribute.InputContext` of
            ``distribute_datasets_from_function``.
        num_replicas: replicas in sync (R).
    """
    local = num_replicas // context.num_input_pipelines
    first = context.input_pipeline_id * local

    def cut(batch, r):
        first_part = tf.nest.flatten(batch)[0]
        rows = tf.shape(first_part, out_type=tf.int64)[0]
        start, stop = (rows * r) // num_replicas, (rows * (r + 1)) // num_replicas
        part = tf.nest.map_structure(lambda t: t[start:stop], batch)
        static = first_part.shape[0]
        if static is not None and static % num_replicas == 0:  # equal slices stay static
            part = tf.nest.map_structure(
                lambda t: tf.ensure_shape(t, [static // num_replicas, *t.shape[1:]]), part)
        if not weights:
            return part
        weight = tf.cast(num_replicas * (stop - start), tf.float32) / tf.cast(
            tf.maximum(rows, 1), tf.float32)
        return part, tf.fill([stop - start], weight)

    def apply(ds):
        if local == 1:
            return ds.map(lambda *b: cut(b if len(b) > 1 else b[0], first))
        return ds.flat_map(lambda *b: tf.data.Dataset.range(first, first + local).map(
            lambda r: cut(b if len(b) > 1 else b[0], r)))

    return apply


def predictor(model):
    """``model(x, training=False)`` as a `tf.function` that runs on this process alone.

    Keras' ``predict`` on a model made under a multi-worker strategy gathers
    through collectives, which would wait for the other workers; the chief
    evaluates alone with this instead (the variables' values are the same on
    every worker).
    """
    if model not in _predictors:
        _predictors[model] = tf.function(lambda x: model(x, training=False),
                                         reduce_retracing=True)
    return _predictors[model]


def weights_digest(model, strategy):
    """SHA-256 of the model's weights, which every worker prints: they are equal
    after every step."""
    digest = hashlib.sha256()
    for w in model.weights:
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(w)).tobytes())
    digest = digest.hexdigest()
    print(f"trained weights (worker {worker_id(strategy)}): sha256 {digest}", flush=True)
    return digest


def _temporary_dir(directory, strategy):
    """Where a worker that is not the chief writes what must be written, then deleted."""
    return os.path.join(os.path.dirname(os.path.normpath(directory)),
                        f"workertemp_{worker_id(strategy)}", os.path.basename(directory))


def step_function(model, strategy, element_spec):
    """One training step of `model` on a distributed batch: its logs, averaged over the
    replicas."""

    @tf.function(input_signature=[element_spec])
    def step(batch):
        logs = strategy.run(model.train_step, args=(batch,))
        return {k: strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None)
                for k, v in logs.items()}

    return step


def _epoch_function(model, strategy, dataset_fn, steps, callbacks):
    """A function that trains `model` for one epoch in step on every worker; it returns
    the last step's logs."""
    dataset = strategy.distribute_datasets_from_function(dataset_fn)
    step = step_function(model, strategy, dataset.element_spec)
    iterator = iter(dataset) if steps else None

    def epoch():
        logs = {}
        batches = (next(iterator) for _ in range(steps)) if steps else iter(dataset)
        for k, batch in enumerate(batches):
            callbacks.on_train_batch_begin(k)
            logs = step(batch)
            callbacks.on_train_batch_end(k, logs)
        return logs

    return epoch


def fit(model, strategy, dataset_fn, epochs, backup, steps=None, callbacks=(),
        chief_callbacks=(), verbose=2):
    """Trains `model` (compiled under ``strategy.scope()``) like ``fit``, under `strategy`.

    Under a `tf.distribute.ParameterServerStrategy` the chief schedules
    ``steps`` steps an epoch on the workers (`tfmm.parameter_server.epoch_function`),
    then runs the epoch's callbacks and checkpoint alone, reading the variables
    from the parameter servers.

    Args:
        dataset_fn: of a `tf.distribute.InputContext`, the pipeline's dataset
            (``strategy.distribute_datasets_from_function``), e.g. global batches
            cut by `replica_slices`; under a ParameterServerStrategy, of
            ``(num_workers, index)``, a worker's share of repeated batches
            (`tfmm.parameter_server.per_worker_dataset`).
        epochs: epochs in all, the resumed ones included.
        backup: the checkpoint directory (model, optimizer, finished epochs);
            a run finds it there when resuming and deletes it when done, as
            `keras.callbacks.BackupAndRestore` does.
        steps: steps per epoch of a repeating dataset; None: one pass (not under a
            ParameterServerStrategy).
        callbacks: Keras callbacks every worker runs (that change the training).
        chief_callbacks: Keras callbacks only the chief runs (that write).

    Returns the last epoch's logs (averaged over the replicas).
    """
    chief = is_chief(strategy)
    callbacks = keras.callbacks.CallbackList(
        list(callbacks) + (list(chief_callbacks) if chief else []), add_history=False,
        add_progbar=chief and verbose != 0, model=model, verbose=verbose, epochs=epochs,
        steps=steps)
    if not model.optimizer.built:
        with strategy.scope():
            model.optimizer.build(model.trainable_variables)
    done = tf.Variable(0, dtype=tf.int64, trainable=False, name="epochs_done")
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer, epochs_done=done)
    write_dir = backup if chief else _temporary_dir(backup, strategy)
    manager = tf.train.CheckpointManager(checkpoint, write_dir, max_to_keep=1)
    latest = tf.train.latest_checkpoint(backup)
    if latest:
        checkpoint.restore(latest).assert_existing_objects_matched()
    if isinstance(strategy, tf.distribute.ParameterServerStrategy):
        train_epoch = parameter_server.epoch_function(model, strategy, dataset_fn, steps,
                                                      callbacks)
    else:
        train_epoch = _epoch_function(model, strategy, dataset_fn, steps, callbacks)
    callbacks.on_train_begin()
    logs = {}
    model.stop_training = False
    for epoch in range(int(done.numpy()), epochs):
        for metric in model.metrics:
            metric.reset_state()
        callbacks.on_epoch_begin(epoch)
        logs = {k: float(v) for k, v in train_epoch().items()}
        callbacks.on_epoch_end(epoch, logs)  # records first: see tfmm.callbacks
        done.assign(epoch + 1)
        manager.save()
        if not chief:
            shutil.rmtree(os.path.dirname(write_dir), ignore_errors=True)
        if model.stop_training:
            break
    callbacks.on_train_end(logs)
    chief_value(strategy, 0)  # no worker still needs the backup the chief deletes
    if chief:
        shutil.rmtree(backup, ignore_errors=True)
    return logs


def backup_dir(directory):
    """Where `Distribution.fit` keeps the checkpoint a killed run resumes from."""
    return os.path.join(directory, "backup")


def distribution(name, cluster_timeout=300.0):
    """The process's `Distribution` of strategy `name` (one of `STRATEGIES`), made once
    (a ``parameter_server`` chief waits up to `cluster_timeout` seconds: `strategy`).

    Made first thing: MultiWorkerMirroredStrategy must exist before TensorFlow
    runs its first operation. ValueError where the strategy cannot be made
    (no cluster in ``$TF_CONFIG``, a worker or ps task of parameter servers).
    """
    if name not in _distributions:
        made = strategy(name, cluster_timeout)
        kind = (Distribution if made is None
                else ParameterServers if isinstance(made, tf.distribute.ParameterServerStrategy)
                else Replicas)
        _distributions[name] = kind(made)
    return _distributions[name]


class Distribution:
    """How a job trains, behind the same calls with or without a strategy: one process
    (this class), `Replicas` in sync or `ParameterServers`.

    Example:

    ```python
    dist = distribute.distribution("none")  # the job's --strategy
    with dist.scope():
        model = keras.Sequential([keras.layers.Dense(1, activation="sigmoid")])
        model.compile("adam", "binary_crossentropy")
    record = EpochRecord("runs/x/epochs.json", distribute.backup_dir("runs/x"))
    dist.fit(model, lambda slices=None, shard=None: batches, 2, "runs/x", record)
    p = dist.predict(model, test_batches)
    ```
    """

    def __init__(self, strategy=None):
        self.strategy = strategy

    @property
    def is_chief(self):
        """Whether this process writes the run's records, logs and exports."""
        return is_chief(self.strategy)

    @property
    def embedding_shards(self):
        """The shards of each ID table: a `DINRanker`'s ``embedding_shards``."""
        return 1

    def scope(self):
        """Where models and optimizers trained here are made."""
        return contextlib.nullcontext()

    def chief_value(self, value):
        """The chief's integer `value` on every worker; also a barrier (all must call it)."""
        return chief_value(self.strategy, value)

    def barrier(self):
        """Returns when every worker has reached it (e.g. to read what the chief wrote)."""
        self.chief_value(0)

    def fit(self, model, batches, epochs, directory, record, steps=None, callbacks=(),
            verbose=2, weigh_rows=True):
        """Trains compiled `model` for `epochs` (the resumed ones included), resuming a
        killed run from its checkpoint in `backup_dir(directory)`, with TensorBoard logs
        in ``<directory>/logs``.

        Args:
            batches: ``batches(slices=None, shard=None)``, the training batches in
                order: all of them in one process; with `slices`
                (`replica_slices`, weighing the rows when `weigh_rows`) this input
                pipeline's rows of every global batch; with ``shard=(workers,
                index)`` a parameter-server worker's share, repeated.
            record: the chief's `tfmm.callbacks.EpochRecord`, made with
                ``backup_dir(directory)``: it writes an epoch's entry before the
                checkpoint marks the epoch done.
            steps: steps per epoch; None: one pass over ``batches()``.
            callbacks: Keras callbacks every worker runs (that change the training).
        """
        model.fit(batches(), epochs=epochs, steps_per_epoch=steps, shuffle=False,
                  callbacks=[record, BackupAndRestore(backup_dir(directory)),
                             _logs(directory), *callbacks], verbose=verbose)

    def predict(self, model, batches):
        """`model`'s outputs on a dataset of ``(inputs, label)`` batches, as one array."""
        return model.predict(batches, verbose=0)

    def predict_on_batch(self, model, x):
        """`model`'s outputs on one batch of inputs, as an array."""
        return model.predict_on_batch(x)

    def describe(self, model):
        """What metrics.json records of how trained `model` was distributed (every
        worker calls it): nothing in one process."""
        return {}

    def exportable(self, model):
        """Trained `model` as one machine serves it."""
        return model


def _logs(directory):
    return keras.callbacks.TensorBoard(os.path.join(directory, "logs"))


class Replicas(Distribution):
    """Replicas in sync (`tf.distribute.MirroredStrategy`,
    `tf.distribute.MultiWorkerMirroredStrategy`): every worker runs the job, the
    chief alone writes and evaluates."""

    def scope(self):
        return self.strategy.scope()

    def fit(self, model, batches, epochs, directory, record, steps=None, callbacks=(),
            verbose=2, weigh_rows=True):
        replicas = self.strategy.num_replicas_in_sync
        fit(model, self.strategy,
            lambda c: batches(slices=replica_slices(c, replicas, weights=weigh_rows)),
            epochs, backup_dir(directory), steps=steps, callbacks=callbacks,
            chief_callbacks=[record, _logs(directory)], verbose=verbose)

    def predict(self, model, batches):
        # On the chief alone: Keras' predict would wait for the other workers (`predictor`).
        return np.concatenate([predictor(model)(x).numpy() for x, _ in batches])

    def predict_on_batch(self, model, x):
        return predictor(model)(x).numpy()

    def describe(self, model):
        """The weights' SHA-256, which every worker prints: they are equal."""
        return {"weights_sha256": weights_digest(model, self.strategy)}


class ParameterServers(Replicas):
    """`tf.distribute.ParameterServerStrategy` (`tfmm.parameter_server`): the chief runs
    the job alone, scheduling asynchronous steps on the workers; each ID table is
    split in rows over the ``ps`` tasks."""

    @property
    def embedding_shards(self):
        return parameter_server.num_parameter_servers(
            parameter_server.cluster_resolver(self.strategy))

    def fit(self, model, batches, epochs, directory, record, steps=None, callbacks=(),
            verbose=2, weigh_rows=True):
        if steps is None:  # the workers' batches repeat: an epoch is one pass's steps
            steps = int(batches().cardinality())
            if steps < 0:
                raise ValueError("fit: the batches' count is unknown; give steps.")
        fit(model, self.strategy, lambda workers, index: batches(shard=(workers, index)),
            epochs, backup_dir(directory), steps=steps, callbacks=callbacks,
            chief_callbacks=[record, _logs(directory)], verbose=verbose)

    def describe(self, model):
        """The weights' SHA-256 and where each ID table's rows are."""
        return {**super().describe(model), "embedding_shards": parameter_server.placement(model)}

    def exportable(self, model):
        """The ranker with each table's shards joined (`tfmm.parameter_server.joined`)."""
        return parameter_server.joined(model)
