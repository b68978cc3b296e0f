"""Optimizers for rankers with embedding tables (Keras 3)."""

import keras
import tensorflow as tf

from tfmm.keras_compat import register


def sum_by_id(gradient):
    """`gradient` with each id's rows summed into one, if it is a ``tf.IndexedSlices``
    (ids in order of first appearance); any other gradient as it is.

    >>> g = tf.IndexedSlices(tf.constant([[1.0], [2.0], [4.0]]), tf.constant([3, 0, 3]))
    >>> summed = sum_by_id(g)
    >>> summed.indices.numpy().tolist(), summed.values.numpy().ravel().tolist()
    ([3, 0], [5.0, 2.0])
    """
    if not isinstance(gradient, tf.IndexedSlices):
        return gradient
    ids, position = tf.unique(gradient.indices)
    return tf.IndexedSlices(
        tf.math.unsorted_segment_sum(gradient.values, position, tf.size(ids)), ids,
        gradient.dense_shape)


class PerIdSums:
    """A Keras optimizer mixin that sums each sparse gradient's rows by id before the
    replicas exchange them, and again after.

    An embedding lookup's gradient has one row per looked-up position (a
    1,024-row batch of the ranker: ~100k rows, ~1k distinct ids), and under
    MirroredStrategy or MultiWorkerMirroredStrategy Keras' optimizer
    all-gathers such rows as they come. Summed first, each replica sends each
    id it touched once. The gathered sums repeat an id once per replica that
    touched it; summing them again gives every replica the global per-id sum,
    what one process computes on the global batch, so an update that squares
    the gradient (Adam, Adagrad) sees ``(sum g) ** 2`` in both.
    """

    def apply(self, grads, trainable_variables=None):
        # In the replica context under a strategy: before Keras' all-reduce.
        return super().apply([sum_by_id(g) for g in grads], trainable_variables)

    def update_step(self, gradient, variable, learning_rate):
        # After the exchange: the replicas' sums, gathered (one replica: already summed).
        if tf.distribute.get_strategy().num_replicas_in_sync > 1:
            gradient = sum_by_id(gradient)
        return super().update_step(gradient, variable, learning_rate)


@register
class PerIdAdam(PerIdSums, keras.optimizers.Adam):
    """Adam's update on each embedding table's rows summed by id (`PerIdSums`).

    Mathematically `DenseGradientAdam`'s update (and tf-keras' Adam's), with the
    gradient kept sparse: under a mirrored strategy each replica exchanges the
    ids it touched once, not a whole table's gradient (`DenseGradientAdam`) nor
    a row per lookup (Keras 3's Adam, whose second moment of an id looked up n
    times sums n squared rows instead).

    Example:

    >>> model = keras.Sequential([keras.layers.Embedding(100, 8), keras.layers.Dense(1)])
    >>> model.compile(PerIdAdam(1e-3), "mse")
    """


@register
class PerIdSGD(PerIdSums, keras.optimizers.SGD):
    """Keras' SGD on each embedding table's rows summed by id (`PerIdSums`): the same
    update, with each touched id exchanged once between replicas.

    Example:

    >>> model = keras.Sequential([keras.layers.Embedding(100, 8), keras.layers.Dense(1)])
    >>> model.compile(PerIdSGD(0.1), "mse")
    """


@register
class DenseGradientAdam(keras.optimizers.Adam):
    """Adam that sums each sparse gradient into a dense one before the update.

    An embedding lookup's gradient is a ``tf.IndexedSlices`` with one row per
    looked-up id, so a popular item appears in many rows of one batch. Keras
    3's Adam (3.15) computes the second moment from those rows squared and
    then summed, ``sum(g_j ** 2)``, where Adam's is ``(sum g_j) ** 2`` (as
    tf-keras' Adam, which sums duplicates first): an id seen n times with
    like gradients gets a second moment about n times too small, so steps
    about sqrt(n) times too large. It also densifies the gradient twice per
    step (in ``g - m`` and after ``g ** 2``). Summing once first gives Adam's
    update, for one dense segment sum.

    Example:

    >>> model = keras.Sequential([keras.layers.Embedding(100, 8), keras.layers.Dense(1)])
    >>> model.compile(DenseGradientAdam(1e-3), "mse")
    """

    def apply(self, grads, trainable_variables=None):
        grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g
                 for g in grads]
        return super().apply(grads, trainable_variables)
