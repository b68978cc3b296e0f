"""Ids a ranker has never seen, e.g. items created after its training."""

import tensorflow as tf

from tfmm.keras_compat import keras, register


@register
class KnownIds(keras.layers.Layer):
    """Maps ids outside ``[0, num_ids)`` to ``unknown_id`` before an Embedding.

    A new item gets an id after the ranker's vocabulary was fixed; its
    multimodal vector carries what is known about it, and its ID embedding
    falls back to ``unknown_id`` (the padding id, 0, by default) instead of
    failing the lookup, as an out-of-range gather does on CPU.

    Args:
        num_ids: the Embedding's ``input_dim``.
        unknown_id: the id unknown ones become.

    Example:

    >>> import numpy as np
    >>> KnownIds(10)(np.array([3, 10, -1, 9])).numpy().tolist()
    [3, 0, 0, 9]
    """

    def __init__(self, num_ids, unknown_id=0, **kwargs):
        super().__init__(**kwargs)
        if num_ids < 1 or not 0 <= unknown_id < num_ids:
            raise ValueError(f"KnownIds: need num_ids >= 1 and 0 <= unknown_id < num_ids, "
                             f"got num_ids={num_ids}, unknown_id={unknown_id}.")
        self.num_ids = int(num_ids)
        self.unknown_id = int(unknown_id)

    def call(self, ids):
        known = (ids >= 0) & (ids < tf.cast(self.num_ids, ids.dtype))
        return tf.where(known, ids, tf.cast(self.unknown_id, ids.dtype))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(num_ids=self.num_ids, unknown_id=self.unknown_id)
        return config
