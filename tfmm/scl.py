"""Semantic-aware contrastive learning (SCL, paper §3).

A query tower embeds the user's query (image or text); the positive is the
purchased item's catalogue image or title, the hard negative a near-duplicate
clicked next to it. The loss is InfoNCE (eq. 1) over the positive, the other
positives of the batch and, with MoCo, a queue of past keys, with a learnable
temperature; plus a triplet loss on the hard negative. All vectors are
L2-normalised, so scores are dot products.

- ``queue_size > 0`` (MoCo): positives and negatives are encoded by a key tower,
  an EMA of the query tower, and enter the queue after each step
  (`tfmm.momentum_queue`).
- ``queue_size == 0``: one tower encodes both sides (in-batch negatives only).

Under tf.distribute (``strategy.run(model.train_step, ...)`` on N replicas) a
step equals one process on the global batch: each replica's queries contrast
with the positives of all replicas (gathered), the queue takes every
replica's keys, each replica's loss is its share of the global mean (Keras'
optimizer sums the replicas' gradients), and the towers' BatchNormalization
layers are synchronized (statistics of the global batch).
"""

import math

import keras
import tensorflow as tf

from tfmm.keras_compat import register
from tfmm.momentum_queue import (EMPTY, MomentumQueue, MomentumQueueCallback, gather_replicas,
                                  replica_context)

NEG_INF = -1e9
POSITIVE_TOWERS = ("momentum", "query")
QUEUE_BLOCK = 4096  # queue keys per block of its logits ([4096, B]: 1 MiB at B = 64)


def info_nce(query, keys, inverse_temperature, extra=None, key_ids=None, extra_ids=None,
             mask_own_positive=True, start=0, extra_columns=None):
    """InfoNCE of eq. 1 with the positive of row i at keys[start + i].

    Args:
        query: [B, d]; keys: [N, d] (positives of the batch, in-batch negatives;
            N > B where they were gathered from several replicas, this
            replica's at `start`).
        inverse_temperature: scalar 1/tau.
        extra: optional [K, d] more negatives (the queue): a memory bank, no
            gradient flows into it (`queue_logsumexp`); with `extra_columns`
            (a slice), [K, D] rows whose columns `extra_columns` are the keys.
        key_ids, extra_ids: item ids of keys [N] and extra [K]; with
            `mask_own_positive`, entries that are the query's own positive item
            (other than its diagonal) are left out, and extra entries with id
            -1 (empty queue slots) always are.
    Returns:
        per-example loss [B].
    """
    # Scale the [B, d] queries rather than the logits, mask with additive
    # penalties, and combine per-part log-sum-exps instead of concatenating.
    query = tf.convert_to_tensor(query)
    q = query * tf.cast(inverse_temperature, query.dtype)
    logits = tf.matmul(q, keys, transpose_b=True)
    own = start + tf.range(tf.shape(query)[0])  # each row's positive in keys
    own_ids = None
    if key_ids is not None and mask_own_positive:
        own_ids = tf.gather(key_ids, own)
        same = (tf.equal(own_ids[:, None], key_ids[None, :])
                & ~tf.equal(own[:, None], tf.range(tf.shape(keys)[0])[None, :]))
        logits += tf.where(same, NEG_INF, 0.0)
    positive = tf.gather(logits, own, batch_dims=1)
    lse = tf.reduce_logsumexp(logits, axis=1)
    if extra is not None:
        lse = tf.experimental.numpy.logaddexp(lse, queue_logsumexp(q, extra, extra_ids, own_ids,
                                                                 columns=extra_columns))
    return lse - positive


def queue_logsumexp(query, extra, extra_ids=None, own_ids=None, block=QUEUE_BLOCK,
                    columns=None):
    """log sum_j exp(query_i · extra_j) for each row i of `query` [B, d] over the
    rows j of `extra` [K, d], leaving out, with `extra_ids` [K], the empty slots
    (id -1) and, with `own_ids` [B], the slots holding row i's own item. With
    `columns` (a slice), `extra` is [K, D] and its rows' `columns` are the keys
    (a queue of several keys per row), taken block by block: slicing the whole
    queue's columns first would copy it.

    The gradient flows to `query` only (`extra` is MoCo's queue, a memory bank).
    The logits are made `block` keys at a time, as [block, B] (keys @ q^T: a
    faster product than q @ keys^T), each block masked, exponentiated and summed
    while it is in cache, and its exponentials kept for the gradient, which then
    needs no pass over them (each block's [B, d] product is scaled instead).
    Against one [B, K] tensor and autodiff (50 MB at the paper's K and B = 64,
    each op a pass over memory) this took the queue's loss, forward and
    backward, from 1.42x to 1.15-1.3x the CPU time of its two products
    (BENCHMARKS.md, the MoCo queue).

    Example: ``queue_logsumexp(q, queue_keys, queue_ids, own_ids)`` -> [B].
    """
    query, extra = tf.convert_to_tensor(query), tf.convert_to_tensor(extra, query.dtype)
    size = extra.shape[0]
    sizes = [size] if size is None or size <= block else (
        [block] * (size // block) + ([size % block] if size % block else []))
    extra_blocks = tf.split(extra, sizes) if len(sizes) > 1 else [extra]
    if columns is not None:
        extra_blocks = [keys[:, columns] for keys in extra_blocks]
    id_blocks = [None] * len(sizes)
    if extra_ids is not None:
        extra_ids = tf.convert_to_tensor(extra_ids, tf.int64)
        id_blocks = tf.split(extra_ids, sizes) if len(sizes) > 1 else [extra_ids]
    if own_ids is not None:
        own_ids = tf.cast(own_ids, tf.int64)

    @tf.custom_gradient
    def logsumexp(q):
        exps, maxima, sums = [], [], []
        for block_keys, ids in zip(extra_blocks, id_blocks):
            x = tf.matmul(block_keys, q, transpose_b=True)
            if ids is not None:
                masked = tf.equal(ids, EMPTY)[:, None]
                if own_ids is not None:
                    masked = masked | tf.equal(ids[:, None], own_ids[None, :])
                x = tf.where(masked, tf.constant(NEG_INF, x.dtype), x)
            top = tf.reduce_max(x, axis=0, keepdims=True)
            e = tf.exp(x - top)
            exps.append(e)
            maxima.append(top)
            sums.append(tf.reduce_sum(e, axis=0, keepdims=True))
        maxima = tf.concat(maxima, axis=0)  # [blocks, B]
        top = tf.reduce_max(maxima, axis=0, keepdims=True)
        scales = tf.exp(maxima - top)
        total = tf.reduce_sum(tf.concat(sums, axis=0) * scales, axis=0, keepdims=True)

        def grad(upstream):
            # d lse_i / d q_i = sum_j softmax_ij extra_j, a block's softmax being
            # its exponentials times exp(its max - top) / total.
            weights = tf.transpose(scales * (upstream[None, :] / total))  # [B, blocks]
            return tf.add_n([weights[:, b:b + 1] * tf.matmul(e, block_keys, transpose_a=True)
                             for b, (e, block_keys) in enumerate(zip(exps, extra_blocks))])

        return (top + tf.math.log(total))[0], grad

    return logsumexp(query)


def triplet(query, positive, negative, margin):
    """max(0, margin - q·p + q·n) per example [B]."""
    return tf.nn.relu(margin - tf.reduce_sum(query * positive, -1)
                      + tf.reduce_sum(query * negative, -1))


def check_arguments(triplet_weight=1.0, temperature=0.07, max_inverse_temperature=100.0,
                    positive_tower="momentum"):
    """`SCLModel`'s checks of its scalar arguments, for callers that validate
    settings before building towers; ValueError names the argument."""
    if positive_tower not in POSITIVE_TOWERS:
        raise ValueError(f"SCLModel: positive_tower={positive_tower!r} is not one of "
                         f"{POSITIVE_TOWERS}.")
    if temperature <= 0 or 1.0 / temperature > max_inverse_temperature:
        raise ValueError(f"SCLModel: temperature={temperature} must be > 0 with 1/temperature "
                         f"<= {max_inverse_temperature}.")
    if triplet_weight < 0:
        raise ValueError(f"SCLModel: triplet_weight={triplet_weight} must be >= 0.")


@register
class SCLModel(keras.Model):
    """Trains `tower` (the query tower) with SCL; the tower is what gets exported.

    ``fit`` takes batches ``{"query", "positive", "negative", "positive_id"}``
    (``negative`` only with ``triplet_weight > 0``). ``make_key_tower`` builds a
    tower of the same architecture for MoCo (its weights start as a copy).

    Args:
        tower: the query tower (a Keras model to unit vectors [B, d]).
        make_key_tower: callable returning a fresh tower (MoCo only; default:
            `keras.models.clone_model` of `tower`).
        queue_size: K; 0 means no MoCo (in-batch negatives only).
        momentum: EMA momentum of the key tower (MoCo).
        triplet_weight: weight of the triplet loss; 0 disables it.
        margin: triplet margin.
        temperature: initial tau; 1/tau is learned in log space, clamped at
            `max_inverse_temperature`.
        mask_own_positive: leave a query's own positive item out of its negatives.
        positive_tower: with MoCo, the tower that encodes the batch's
            positives (and hard negatives) for the loss: ``"momentum"`` (MoCo:
            the key tower, no gradient) or ``"query"`` (the query tower, with
            gradient, as without MoCo; the key tower then only fills the queue,
            at the cost of one more forward pass).
    """

    def __init__(self, tower, make_key_tower=None, queue_size=0, momentum=0.999,
                 triplet_weight=1.0, margin=0.2, temperature=0.07,
                 max_inverse_temperature=100.0, mask_own_positive=True,
                 positive_tower="momentum", **kwargs):
        super().__init__(**kwargs)
        check_arguments(triplet_weight=triplet_weight, temperature=temperature,
                        max_inverse_temperature=max_inverse_temperature,
                        positive_tower=positive_tower)
        self.tower = tower
        self.dim = int(tower.output_shape[-1])
        self.triplet_weight = float(triplet_weight)
        self.margin = float(margin)
        self.max_inverse_temperature = float(max_inverse_temperature)
        self.mask_own_positive = mask_own_positive
        self.positive_tower = positive_tower
        self.default_momentum = momentum
        self.temperature = float(temperature)
        self.log_inverse_temperature = self.add_weight(
            name="log_inverse_temperature", shape=(),
            initializer=keras.initializers.Constant(math.log(1.0 / temperature)))
        self.key_tower = None
        self.queue = None
        towers = [tower]
        if queue_size:
            self.key_tower = (make_key_tower or (lambda: keras.models.clone_model(tower)))()
            self.key_tower.set_weights(tower.get_weights())
            # The optimizer never sees the key tower; it stays "trainable" so that,
            # as in MoCo, it runs with batch statistics (a frozen Keras BatchNorm
            # would use its stale moving averages instead).
            self._weight_pairs = list(zip(tower.trainable_weights,
                                          self.key_tower.trainable_weights))
            self.queue = MomentumQueue(self, queue_size, self.dim)
            towers.append(self.key_tower)
        if tf.distribute.get_strategy().num_replicas_in_sync > 1:
            # Global-batch statistics, as in one process (MoCo shuffles BN instead).
            for layer in (x for t in towers for x in t._flatten_layers()):
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.synchronized = True
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.nce_tracker = keras.metrics.Mean(name="info_nce")
        self.triplet_tracker = keras.metrics.Mean(name="triplet")
        self.built = True  # the towers own every weight already

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable,
                "tower": keras.saving.serialize_keras_object(self.tower),
                "queue_size": 0 if self.queue is None else self.queue.size,
                "momentum": self.default_momentum, "triplet_weight": self.triplet_weight,
                "margin": self.margin, "temperature": self.temperature,
                "max_inverse_temperature": self.max_inverse_temperature,
                "mask_own_positive": self.mask_own_positive,
                "positive_tower": self.positive_tower}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["tower"] = keras.saving.deserialize_keras_object(config["tower"])
        return cls(**config)

    @property
    def metrics(self):
        return [self.loss_tracker, self.nce_tracker, self.triplet_tracker]

    def trained_weights(self):
        """What the optimizer updates: the query tower and the temperature, not the key tower."""
        return self.tower.trainable_weights + [self.log_inverse_temperature]

    def inverse_temperature(self):
        return tf.minimum(tf.exp(self.log_inverse_temperature), self.max_inverse_temperature)

    def call(self, inputs, training=False):
        return self.tower(inputs, training=training)

    def _keys(self, x, training, tower=None):
        if (tower or self.positive_tower) == "query" or self.key_tower is None:
            return self.tower(x, training=training)
        return tf.stop_gradient(self.key_tower(x, training=training))

    def queue_keys(self, batch, positive, training):
        """The keys to enqueue: the key tower's, reusing `positive` when it encoded them."""
        if self.positive_tower == "momentum":
            return tf.stop_gradient(positive)
        return self._keys(batch["positive"], training, tower="momentum")

    def compute_losses(self, batch, training=False):
        """(InfoNCE, triplet, the batch's encoded positives, their ids), of this
        replica's rows under tf.distribute."""
        query = self.tower(batch["query"], training=training)
        positive = self._keys(batch["positive"], training)
        ids = tf.cast(batch["positive_id"], tf.int64)
        extra = extra_ids = None
        if self.queue is not None:
            extra, extra_ids = tf.cast(self.queue.keys, query.dtype), self.queue.ids
        # The in-batch negatives: every replica's positives.
        (keys, key_ids), start = gather_replicas(positive, ids)
        nce = tf.reduce_mean(info_nce(query, keys, self.inverse_temperature(), extra, key_ids,
                                      extra_ids, self.mask_own_positive, start))
        trip = tf.constant(0.0)
        if self.triplet_weight:
            negative = self._keys(batch["negative"], training)
            trip = tf.reduce_mean(triplet(query, positive, negative, self.margin))
        return nce, trip, positive, ids

    def train_step(self, batch):
        if self.queue is not None:
            self.queue.check_batch(batch["positive_id"].shape[0])
        trainable = self.trained_weights()
        context = replica_context()
        with tf.GradientTape() as tape:
            nce, trip, positive, ids = self.compute_losses(batch, training=True)
            loss = nce + self.triplet_weight * trip
            # The optimizer sums the replicas' gradients: each adds its share of the mean.
            share = loss / context.num_replicas_in_sync if context else loss
        self.optimizer.apply(tape.gradient(share, trainable), trainable)
        if self.queue is not None:
            self.queue.step(self._weight_pairs, self.queue_keys(batch, positive, True), ids)
        return self._track(loss, nce, trip)

    def test_step(self, batch):
        nce, trip, _, _ = self.compute_losses(batch, training=False)
        return self._track(nce + self.triplet_weight * trip, nce, trip)

    def _track(self, loss, nce, trip):
        self.loss_tracker.update_state(loss)
        self.nce_tracker.update_state(nce)
        self.triplet_tracker.update_state(trip)
        return {m.name: m.result() for m in self.metrics}

    def fit(self, *args, callbacks=None, **kwargs):
        """Keras fit; with a queue, adds a MomentumQueueCallback if none was given."""
        callbacks = list(callbacks or [])
        if self.queue is not None and not any(isinstance(c, MomentumQueueCallback)
                                              for c in callbacks):
            callbacks.append(MomentumQueueCallback(self.default_momentum))
        kwargs.setdefault("shuffle", False)  # datasets arrive shuffled
        if not self.optimizer.built:  # else BackupAndRestore builds it for other variables
            with self.distribute_strategy.scope():  # the model's, which made its variables
                self.optimizer.build(self.trained_weights())
        return super().fit(*args, callbacks=callbacks, **kwargs)
