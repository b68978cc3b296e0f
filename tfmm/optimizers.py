"""Optimizers for rankers with embedding tables (Keras 3)."""

import keras
import tensorflow as tf

from tfmm.keras_compat import register


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
