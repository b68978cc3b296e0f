"""SimTier (paper §4.2): a histogram of target-to-history similarities."""

import math

import tensorflow as tf

from tfmm.keras_compat import keras, register
from tfmm.layers import _validation as v

OUTPUTS = ("counts", "log1p", "fraction")
SIMILARITIES = ("dot", "cosine")


@register
class SimTierLayer(keras.layers.Layer):
    """Counts how many history items fall in each similarity tier of the target.

    For each history item, ``s_i = v_i · v_c``; the range [-1, 1] is cut into
    ``num_tiers`` equal tiers and the output is the number of scores per tier.
    Scores are clipped to [-1, 1]; a score equal to an interior boundary goes
    to the upper tier, so 1.0 is in the last tier and -1.0 in the first.
    Masked (padded) history positions are never counted; an all-padding
    history gives zeros.

    Args:
        num_tiers: number of tiers N (>= 1).
        output: ``"counts"`` (the paper), ``"log1p"`` (``log(1 + count)``) or
            ``"fraction"`` (counts divided by the number of real history items).
        similarity: ``"dot"`` (the paper; vectors are L2-normalised upstream) or
            ``"cosine"`` (normalises both sides first, as alimama-tech/MUSE).
        boundaries: optional increasing interior tier edges in (-1, 1), of
            length ``num_tiers - 1``, replacing the equal tiers (e.g. MUSE's
            0.1-wide bins with two wide edge bins).

    Call arguments:
        target: ``[B, d]``, or ``[B, C, d]`` for C candidates sharing a history.
        history: ``[B, L, d]``.
        mask: optional ``[B, L]`` bool, True for real history items.

    Returns:
        float32 ``[B, N]`` (or ``[B, C, N]``).

    Example:

    >>> import numpy as np
    >>> layer = SimTierLayer(num_tiers=4)
    >>> target = np.array([[1.0, 0.0]], "float32")
    >>> history = np.array([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]], "float32")
    >>> layer(target, history, mask=np.array([[True, True, False]])).numpy()
    array([[0., 0., 1., 1.]], dtype=float32)
    """

    def __init__(self, num_tiers, output="counts", similarity="dot",
                 boundaries=None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(num_tiers, int) or num_tiers < 1:
            raise ValueError(
                f"SimTierLayer: `num_tiers` must be an integer >= 1, got {num_tiers!r}."
            )
        if output not in OUTPUTS:
            raise ValueError(
                f"SimTierLayer: `output` must be one of {OUTPUTS}, got {output!r}."
            )
        if similarity not in SIMILARITIES:
            raise ValueError(
                f"SimTierLayer: `similarity` must be one of {SIMILARITIES}, "
                f"got {similarity!r}."
            )
        if boundaries is None:
            edges = [-1.0 + 2.0 * k / num_tiers for k in range(1, num_tiers)]
        else:
            edges = [float(b) for b in boundaries]
            if len(edges) != num_tiers - 1:
                raise ValueError(
                    f"SimTierLayer: `boundaries` must have num_tiers - 1 = "
                    f"{num_tiers - 1} interior edges, got {len(edges)}."
                )
            if any(not (-1.0 < b < 1.0) or math.isnan(b) for b in edges) or any(
                a >= b for a, b in zip(edges, edges[1:])
            ):
                raise ValueError(
                    "SimTierLayer: `boundaries` must be strictly increasing and "
                    f"inside (-1, 1), got {edges}."
                )
        self.num_tiers = num_tiers
        self.output_mode = output
        self.similarity = similarity
        self.boundaries = None if boundaries is None else edges
        self._edges = edges
        self.supports_masking = True

    def call(self, target, history, mask=None):
        name = "SimTierLayer"
        t, _ = v.check_target_history(name, target, history)
        weights = v.mask_weights(name, mask, history)
        scores = tf.clip_by_value(v.similarity(target, history, self.similarity), -1.0, 1.0)
        tiers = tf.raw_ops.Bucketize(input=scores, boundaries=self._edges)
        weights = v.broadcast_history_mask(weights, len(t))
        counts = self._counts(tiers, tf.broadcast_to(weights, tf.shape(scores)))
        if self.output_mode == "log1p":
            return tf.math.log1p(counts)
        if self.output_mode == "fraction":
            length = tf.reduce_sum(weights, axis=-1, keepdims=True)
            return tf.math.divide_no_nan(counts, length)
        return counts

    def _counts(self, tiers, weights):
        """counts[..., n] = sum over l of weights[..., l] where tiers[..., l] == n.

        One segment sum over the (row, tier) pairs: a [..., L, N] one-hot, its
        product with the mask and its sum took most of the layer's time when
        serving 200 candidates (the scores are [C, L]).
        """
        shape = tf.shape(tiers)
        rows = tf.reduce_prod(shape[:-1])
        segments = tf.reshape(tf.range(rows)[:, None] * self.num_tiers
                              + tf.reshape(tiers, tf.stack([rows, shape[-1]])), [-1])
        counts = tf.math.unsorted_segment_sum(tf.reshape(weights, [-1]), segments,
                                              rows * self.num_tiers)
        return tf.reshape(counts, tf.concat([shape[:-1], [self.num_tiers]], 0))

    def compute_mask(self, *args, **kwargs):
        return None

    def compute_output_shape(self, target_shape, history_shape=None):
        return tuple(target_shape[:-1]) + (self.num_tiers,)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_tiers=self.num_tiers,
            output=self.output_mode,
            similarity=self.similarity,
            boundaries=self.boundaries,
        )
        return config
