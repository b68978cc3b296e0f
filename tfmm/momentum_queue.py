"""The momentum (MoCo) memory bank: a key tower that is an EMA of the query tower,
and a queue of its past keys used as extra negatives (paper §3.2, K = 196,800).

The queue, its item ids and the write pointer are non-trainable variables of
the model, so checkpoints carry them and a resumed run continues with the same
queue. The updates run in-graph at the end of every training step (after the
step's logits were computed), so they are exact whatever
``steps_per_execution`` is; `MomentumQueueCallback` switches them on and sets
the momentum.

Under a tf.distribute strategy (a step run by ``strategy.run`` on N replicas)
the keys of every replica enter the queue, gathered in replica order as in
MoCo's ``concat_all_gather``, and the pointer advances by the global batch.
As in MoCo's reference, each replica applies the same update (queue and EMA)
to its own copy of the variables, so the copies stay identical.
"""

import keras
import tensorflow as tf

EMPTY = -1  # queue_ids of slots not written yet (masked out of the logits)


def replica_context():
    """The replica context of a step that tf.distribute runs on more than one
    replica, else None (one process, or a cross-replica context)."""
    context = tf.distribute.get_replica_context()
    return context if context is not None and context.num_replicas_in_sync > 1 else None


def gather_replicas(*tensors):
    """MoCo's concat_all_gather: `tensors` concatenated along axis 0 over the
    replicas, in replica order, and where this replica's rows start; outside a
    distributed step, `tensors` themselves and 0.

    Differentiable: a replica's rows get the gradient from every replica's loss.
    """
    context = replica_context()
    if context is None:
        return list(tensors), 0
    start = tf.cast(context.replica_id_in_sync_group, tf.int32) * tf.shape(tensors[0])[0]
    # One call per tensor: all_gather's gradient cannot mix dtypes (float keys, int ids).
    # The identity puts a step input (the ids) on the replica's device, which
    # MultiWorkerMirroredStrategy's gather needs.
    return [context.all_gather(tf.identity(t), axis=0) for t in tensors], start


class MomentumQueue:
    """Queue of ``size`` keys of width ``dim`` owned by `layer` (a Keras model)."""

    def __init__(self, layer, size, dim):
        if size < 0:
            raise ValueError(f"MomentumQueue: queue_size={size} must be >= 0.")
        self.size = size
        self.keys = layer.add_weight(name="queue", shape=(max(size, 1), dim), initializer="zeros",
                                     trainable=False)
        self.ids = layer.add_weight(name="queue_ids", shape=(max(size, 1),), dtype="int64",
                                    initializer=keras.initializers.Constant(EMPTY), trainable=False)
        self.pointer = layer.add_weight(name="queue_pointer", shape=(), dtype="int64",
                                        initializer="zeros", trainable=False)
        self.momentum = layer.add_weight(name="momentum", shape=(), initializer="zeros",
                                         trainable=False)
        self.enabled = layer.add_weight(name="queue_enabled", shape=(), dtype="bool",
                                        initializer="zeros", trainable=False)

    def check_batch(self, batch_size):
        """Checks the global batch size (a replica's times the number of replicas)."""
        context = replica_context()
        if batch_size is not None and context is not None:
            batch_size *= context.num_replicas_in_sync
        if batch_size is None:
            raise ValueError("The momentum queue needs a static batch size: batch the data with "
                             "drop_remainder=True.")
        if self.size % batch_size:
            raise ValueError(f"MomentumQueue: queue_size={self.size} must be a multiple of the "
                             f"batch size {batch_size} (drop the remainder: e.g. queue_size="
                             f"{self.size - self.size % batch_size}).")

    def enqueue(self, keys, ids):
        """Writes a batch of keys at the pointer, in place, and advances it (wrapping).

        K is a multiple of the batch size, so a batch never straddles the end.
        """
        batch = tf.shape(keys, out_type=tf.int64)[0]
        start = tf.convert_to_tensor(self.pointer)
        slots = start + tf.range(batch)
        # Scatters write into the tf.Variables in place. A slice's assign
        # (`variable[a:b].assign`) reads the whole variable first, and that read
        # made the write copy the queue: 100 MB a step at the paper's K.
        self.keys.value.scatter_update(tf.IndexedSlices(tf.cast(keys, self.keys.dtype), slots))
        self.ids.value.scatter_update(tf.IndexedSlices(ids, slots))
        self.pointer.assign((start + batch) % self.size)

    def step(self, weight_pairs, keys, ids):
        """After an optimizer step: EMA of the key tower, then enqueue; no-op when disabled.

        `weight_pairs` are (query weight, key weight) pairs of the two towers;
        `keys` and `ids` this replica's, gathered here from all replicas.
        """
        # Outside the cond: a collective must not sit in a branch.
        (keys, ids), _ = gather_replicas(keys, ids)

        def update():
            m = self.momentum
            for q, k in weight_pairs:
                k.assign(m * k + (1.0 - m) * tf.cast(q, k.dtype))
            if self.size:
                self.enqueue(keys, ids)
            return tf.constant(True)

        tf.cond(self.enabled, update, lambda: tf.constant(False))


class MomentumQueueCallback(keras.callbacks.Callback):
    """Turns on MoCo for an `SCLModel`: the key tower follows the query tower with
    ``momentum`` and each step's keys enter the queue. Without it the key tower
    stays as built and only in-batch negatives are used.
    """

    def __init__(self, momentum=0.999):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"MomentumQueueCallback: momentum={momentum} must be in [0, 1).")
        self.momentum_value = momentum

    def on_train_begin(self, logs=None):
        queue = getattr(self.model, "queue", None)
        if not isinstance(queue, MomentumQueue):
            raise ValueError("MomentumQueueCallback needs a model with a MomentumQueue "
                             "(tfmm.scl.SCLModel).")
        queue.momentum.assign(self.momentum_value)
        queue.enabled.assign(True)

    def on_train_end(self, logs=None):
        self.model.queue.enabled.assign(False)
