"""The SimScore baseline (paper §6.1.3): similarity to the target as side information."""

import tensorflow as tf

from tfmm.keras_compat import keras, register
from tfmm.layers import _validation as v
from tfmm.layers.simtier import SIMILARITIES


@register
class SimScore(keras.layers.Layer):
    """Appends ``s_i = v_i · v_c`` to each history item's ID embedding.

    The target's embedding gets its own similarity ``v_c · v_c`` (1 for
    L2-normalised vectors, 0 for a missing all-zero vector), so that query and
    keys keep one width for DIN attention, which then sees ``1 - s_i`` and
    ``s_i`` in its ``q - k`` and ``q * k`` terms. Masked history positions get
    score 0. With a ``[B, C, e]`` target the history output is per candidate,
    ``[B, C, L, e + 1]``, which ``DINAttention`` accepts as keys.

    Args:
        similarity: ``"dot"`` (the paper) or ``"cosine"``.

    Call arguments:
        target_emb: ``[B, e]`` or ``[B, C, e]``; history_emb: ``[B, L, e]``.
        target_vec: ``[B, d]`` or ``[B, C, d]``; history_vec: ``[B, L, d]``.
        mask: optional ``[B, L]`` bool, True for real history items.

    Returns:
        ``(target [B, (C,) e + 1], history [B, (C,) L, e + 1])``.

    Example:

    >>> import numpy as np
    >>> t, h = SimScore()(np.zeros((1, 2), "float32"), np.zeros((1, 2, 2), "float32"),
    ...                   np.array([[1.0, 0.0]], "float32"),
    ...                   np.array([[[0.6, 0.8], [0.0, 1.0]]], "float32"))
    >>> t.numpy()[..., -1], h.numpy()[..., -1]
    (array([1.], dtype=float32), array([[0.6, 0. ]], dtype=float32))
    """

    def __init__(self, similarity="dot", **kwargs):
        super().__init__(**kwargs)
        if similarity not in SIMILARITIES:
            raise ValueError(
                f"SimScore: `similarity` must be one of {SIMILARITIES}, got {similarity!r}."
            )
        self.similarity = similarity
        self.supports_masking = True

    def call(self, target_emb, history_emb, target_vec, history_vec, mask=None):
        t = v.check_embeddings_and_vectors("SimScore", target_emb, history_emb, target_vec,
                                           history_vec)
        weights = v.mask_weights("SimScore", mask, history_vec)
        scores = v.similarity(target_vec, history_vec, self.similarity)
        scores *= v.broadcast_history_mask(weights, len(t))
        own = tf.cast(target_vec, tf.float32)
        if self.similarity == "cosine":
            own = tf.math.l2_normalize(own, axis=-1)
        self_score = tf.reduce_sum(own * own, axis=-1, keepdims=True)
        if len(t) == 3:
            # [B, C, 1, e]: one copy of the history per candidate.
            history_emb = tf.broadcast_to(
                history_emb[:, None],
                tf.concat([tf.shape(target_emb)[:2], tf.shape(history_emb)[1:]], 0),
            )
        dtype = target_emb.dtype
        return (tf.concat([target_emb, tf.cast(self_score, dtype)], axis=-1),
                tf.concat([history_emb, tf.cast(scores[..., None], dtype)], axis=-1))

    def compute_mask(self, *args, **kwargs):
        return None

    def get_config(self):
        config = super().get_config()
        config.update(similarity=self.similarity)
        return config
