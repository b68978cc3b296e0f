"""The Vector baseline (paper §6.1.3): multimodal vectors as item side information."""

import tensorflow as tf

from tfmm.keras_compat import keras, register
from tfmm.layers import _validation as v


@register
class VectorFeature(keras.layers.Layer):
    """Appends each item's multimodal vector to its ID embedding.

    The target's vector goes after the target's ID embedding and each history
    item's vector after that item's ID embedding; the results feed the
    ranker's DIN attention as query and keys. An optional ``Dense``
    projection, shared by target and history, shrinks the vectors first.

    Args:
        projection_dim: project vectors to this size first (None: as they are).

    Call arguments:
        target_emb: ``[B, e]`` or ``[B, C, e]``; history_emb: ``[B, L, e]``.
        target_vec: ``[B, d]`` or ``[B, C, d]``; history_vec: ``[B, L, d]``.

    Returns:
        ``(target [B, (C,) e + d'], history [B, L, e + d'])``.

    Example:

    >>> import numpy as np
    >>> t, h = VectorFeature()(np.ones((2, 4), "float32"), np.ones((2, 5, 4), "float32"),
    ...                        np.ones((2, 3), "float32"), np.ones((2, 5, 3), "float32"))
    >>> t.shape, h.shape
    (TensorShape([2, 7]), TensorShape([2, 5, 7]))
    """

    def __init__(self, projection_dim=None, **kwargs):
        super().__init__(**kwargs)
        if projection_dim is not None and projection_dim < 1:
            raise ValueError(
                f"VectorFeature: `projection_dim` must be >= 1 or None, got {projection_dim}."
            )
        self.projection_dim = projection_dim
        self.projection = (
            None if projection_dim is None
            else keras.layers.Dense(projection_dim, use_bias=False, name="projection")
        )

    def build(self, target_emb_shape, history_emb_shape=None, target_vec_shape=None,
              history_vec_shape=None):
        # tf-keras passes only the first input's shape; the projection then
        # builds on its first call.
        if self.projection is not None and target_vec_shape is not None:
            self.projection.build(tuple(target_vec_shape))
        self.built = True

    def call(self, target_emb, history_emb, target_vec, history_vec):
        v.check_embeddings_and_vectors("VectorFeature", target_emb, history_emb, target_vec,
                                       history_vec)
        target_vec = tf.cast(target_vec, target_emb.dtype)
        history_vec = tf.cast(history_vec, history_emb.dtype)
        if self.projection is not None:
            target_vec = self.projection(target_vec)
            history_vec = self.projection(history_vec)
        return (tf.concat([target_emb, target_vec], axis=-1),
                tf.concat([history_emb, history_vec], axis=-1))

    def get_config(self):
        config = super().get_config()
        config.update(projection_dim=self.projection_dim)
        return config
