"""DIN attention (Zhou et al., KDD'18): target-aware pooling of a history."""

import tensorflow as tf
from tensorflow.python.ops import control_flow_util  # no public test for an XLA context

from tfmm.keras_compat import keras, register
from tfmm.layers import _validation as v
from tfmm.layers.dice import Dice

NORMALIZATIONS = (None, "softmax")


def _gather_rows(params, rows):
    """``tf.gather(params, rows)`` for ascending `rows`, whose gradient is a sorted
    segment sum: ~4x faster on CPU than the unsorted one `tf.gather`'s takes
    (51,200 rows of 80 into 1,024: 1.1 against 4.2 ms). Under XLA (a
    ``jit_compile`` step: Keras 3's default on a GPU) plain `tf.gather`: XLA
    has no kernel for a segment sum whose size the data decides."""
    if control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()):
        return tf.gather(params, rows)

    @tf.custom_gradient
    def gather(params):
        def grad(upstream):
            sums = tf.math.segment_sum(upstream, rows)  # rows up to the last one gathered
            return tf.pad(sums, [[0, tf.shape(params)[0] - tf.shape(sums)[0]], [0, 0]])

        return tf.gather(params, rows), grad

    return gather(params)


@register
class DINAttention(keras.layers.Layer):
    """Pools history ``keys`` with weights an MLP computes from each key and the query.

    As in the DIN reference code, the attention MLP sees
    ``[q, k, q - k, q * k]`` for every history position, has hidden layers
    ``hidden_units`` and a linear unit on top; padded positions get weight 0
    and the output is the weighted sum of the keys. With
    ``normalization="softmax"`` the scores are divided by ``sqrt(dk)`` and
    softmax-normalised over the real positions (the reference); with ``None``
    (DeepCTR, FuxiCTR) the raw scores are the weights.

    The first layer's ``[4 * d, h]`` kernel keeps the reference layout but is
    applied term by term, so no ``[..., L, 4 * d]`` input is built. With a
    ``[B, d]`` query (training) the MLP runs on the real history positions
    only, so padding costs nothing and does not enter Dice's batch
    statistics. A ``[B, C, d]`` query against ``[B, L, d]`` keys never
    copies the history per candidate: there (one user's history against C
    candidates, the ranking signature's case) the first layer is one matmul
    of the keys and a column of ones ``[B, L, d + 1]`` by a per-candidate
    kernel ``[B, d + 1, C * h]``, and the rest of the MLP runs on
    ``[B * L * C, h]`` rows: the same sums as the per-example path, without
    a ``[B, C, L, h]`` transpose or broadcast additions over it.

    Args:
        hidden_units: sizes of the hidden layers of the attention MLP.
        activation: ``"dice"``, or any Keras activation (default sigmoid, as
            in the reference).
        normalization: ``None`` or ``"softmax"``.
        return_weights: also return the attention weights.
        kernel_initializer: initializer of every kernel of the MLP.

    Call arguments:
        query: ``[B, d]``, or ``[B, C, d]`` for C candidates.
        keys: ``[B, L, d]``; with a ``[B, C, d]`` query also ``[B, C, L, d]``
            (keys that depend on the candidate, e.g. with SimScore).
        mask: optional ``[B, L]`` bool, True for real history items.
        training: Python bool (Dice uses batch statistics when True).

    Returns:
        ``[B, d]`` (or ``[B, C, d]``), and with ``return_weights`` also the
        weights ``[B, L]`` (or ``[B, C, L]``).

    Example:

    >>> import numpy as np
    >>> din = DINAttention(hidden_units=(8, 4))
    >>> din(np.ones((2, 6), "float32"), np.ones((2, 5, 6), "float32")).shape
    TensorShape([2, 6])
    """

    def __init__(self, hidden_units=(80, 40), activation="sigmoid",
                 normalization=None, return_weights=False,
                 kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        hidden_units = tuple(int(u) for u in hidden_units)
        if any(u < 1 for u in hidden_units):
            raise ValueError(
                f"DINAttention: `hidden_units` must be positive, got {hidden_units}."
            )
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"DINAttention: `normalization` must be one of {NORMALIZATIONS}, "
                f"got {normalization!r}."
            )
        self.hidden_units = hidden_units
        self.normalization = normalization
        self.return_weights = return_weights
        # Kept serialised: each kernel gets its own initializer instance (a
        # shared unseeded instance gives identical kernels under tf-keras).
        self.kernel_initializer = keras.initializers.serialize(
            keras.initializers.get(kernel_initializer))
        units = hidden_units + (1,)
        self.dense = [
            keras.layers.Dense(
                u, kernel_initializer=keras.initializers.get(self.kernel_initializer),
                name=f"dense_{i + 1}")
            for i, u in enumerate(units[1:])
        ]
        if activation == "dice":
            self.activation = "dice"
            self.activations = [Dice(name=f"dice_{i}") for i in range(len(hidden_units))]
        else:
            fn = keras.activations.get(activation)
            self.activation = keras.activations.serialize(fn)
            self.activations = [fn] * len(hidden_units)
        self.supports_masking = True

    def build(self, query_shape, keys_shape=None):
        query_shape = tuple(query_shape)
        v.check_rank("DINAttention", "query", query_shape, (2, 3), "[B, d] or [B, C, d]")
        v.check_defined("DINAttention", "query", query_shape, "[B, d] or [B, C, d]")
        d = query_shape[-1]
        units = self.hidden_units + (1,)
        # Rows: the q, k, q - k and q * k blocks of the reference's input.
        self.kernel = self.add_weight(
            name="kernel", shape=(4 * d, units[0]),
            initializer=keras.initializers.get(self.kernel_initializer),
        )
        self.bias = self.add_weight(name="bias", shape=(units[0],), initializer="zeros")
        for i, layer in enumerate(self.dense):
            layer.build((None, units[i]))
            if isinstance(self.activations[i], keras.layers.Layer):
                self.activations[i].build((None, units[i]))
        self.built = True

    def call(self, query, keys, mask=None, training=None):
        name = "DINAttention"
        q = v.check_rank(name, "query", query, (2, 3), "[B, d] or [B, C, d]")
        k = v.check_rank(name, "keys", keys, (3, 4), "[B, L, d] or [B, C, L, d]")
        if len(k) == 4:
            if len(q) != 3:
                raise ValueError(
                    f"{name}: `keys` of shape [B, C, L, d] {k} need a `query` of "
                    f"shape [B, C, d], got shape {q}."
                )
            v.check_dim(name, "keys", k, 1, q[1], f"[B, {q[1]}, L, {q[-1]}]")
        v.check_dim(name, "keys", k, -1, q[-1], f"[B, L, {q[-1]}]")
        v.check_dim(name, "keys", k, 0, q[0], f"[{q[0]}, L, {q[-1]}]")
        weights = v.mask_weights(name, mask, keys, dtype=query.dtype)

        if len(q) == 2:
            scores = self._per_example_scores(query, keys, None if mask is None else weights,
                                              training)
        elif len(k) == 3:
            scores = self._shared_history_scores(query, keys, training)
        else:
            w_q, w_k, w_diff, w_prod = tf.split(tf.cast(self.kernel, query.dtype), 4, axis=0)
            # [q, k, q-k, q*k] @ W == q @ (Wq + Wd) + k @ (Wk - Wd) + (q * k) @ Wp.
            q_term = tf.matmul(query, w_q + w_diff)[:, :, None, :]
            hidden = (q_term + tf.matmul(keys, w_k - w_diff)
                      + tf.matmul(query[:, :, None, :] * keys, w_prod)
                      + tf.cast(self.bias, query.dtype))
            scores = tf.squeeze(self._mlp(hidden, training), axis=-1)

        weights = v.broadcast_history_mask(weights, len(q))
        if self.normalization == "softmax":
            scores = scores / tf.sqrt(tf.cast(q[-1], scores.dtype))
            scores += (1.0 - weights) * tf.cast(-1e9, scores.dtype)
            attention = tf.nn.softmax(scores, axis=-1) * weights
        else:
            attention = scores * weights

        if len(k) == 4:
            pooled = tf.einsum("bcl,bcld->bcd", attention, keys)
        elif len(q) == 2:
            # Not einsum: its batch of [1, L] @ [L, d] products is slow on CPU, backwards too.
            pooled = tf.reduce_sum(attention[..., None] * keys, axis=1)
        else:
            pooled = tf.einsum("bcl,bld->bcd", attention, keys)
        if self.return_weights:
            return pooled, attention
        return pooled

    def _mlp(self, hidden, training):
        """The activations and layers after the first layer's pre-activations."""
        for act, dense in zip(self.activations, self.dense):
            if isinstance(act, keras.layers.Layer):
                hidden = act(hidden, training=training)
            else:
                hidden = act(hidden)
            hidden = dense(hidden)
        return hidden

    def _per_example_scores(self, query, keys, weights, training):
        """Scores [B, L] of queries [B, d] against histories [B, L, d] (weights: 0/1 mask).

        The MLP runs only on the real positions' rows (gathered, then
        scattered back as 0 for padding): padding, often most of a logged
        history, costs nothing, and Dice's batch statistics are those of the
        real items. The first layer is two matmuls of all the
        rows, ``k @ (Wk - Wd) + (q * k) @ Wp``, plus the per-example
        ``q @ (Wq + Wd) + b``, not a batch of small per-example matmuls.
        """
        dtype = query.dtype
        w_q, w_k, w_diff, w_prod = tf.split(tf.cast(self.kernel, dtype), 4, axis=0)
        q_term = tf.matmul(query, w_q + w_diff) + tf.cast(self.bias, dtype)  # [B, h]
        shape = tf.shape(keys)[:2]
        if weights is None:
            rows = tf.repeat(tf.range(shape[0]), shape[1])
            k = tf.reshape(keys, [-1, keys.shape[-1]])
        else:
            real = tf.cast(tf.where(weights > 0), tf.int32)  # [N, 2]: (b, l) of real items
            rows, k = real[:, 0], tf.gather_nd(keys, real)
        q = _gather_rows(query, rows)  # rows ascend: tf.where's order, or tf.repeat's
        # Two matmuls, not one of concat([k, q * k]): copying wide rows (d = 128) costs more.
        hidden = tf.matmul(k, w_k - w_diff) + tf.matmul(q * k, w_prod) + _gather_rows(q_term, rows)
        scores = self._mlp(hidden, training)[:, 0]
        if weights is None:
            return tf.reshape(scores, shape)
        return tf.scatter_nd(real, scores, shape)

    def _shared_history_scores(self, query, keys, training):
        """Scores [B, C, L] of C queries [B, C, d] against one history [B, L, d] each.

        Per candidate c the first layer is, over the key's d features,
        ``k @ (Wk - Wd) + (q_c * k) @ Wp + q_c @ (Wq + Wd) + b
        = [k, 1] @ [q_c[:, None] * Wp + Wk - Wd ; q_c @ (Wq + Wd) + b]``:
        one batched matmul [B, L, d + 1] @ [B, d + 1, C * h] for all candidates,
        whose [B, L, C, h] result the MLP reads as rows.
        """
        dtype = query.dtype
        w_q, w_k, w_diff, w_prod = tf.split(tf.cast(self.kernel, dtype), 4, axis=0)
        d, h = self.kernel.shape[0] // 4, self.kernel.shape[1]
        shape, length = tf.shape(query), tf.shape(keys)[1]
        b, c = shape[0], shape[1]
        per_candidate = (tf.transpose(query, [0, 2, 1])[..., None] * w_prod[None, :, None, :]
                         + (w_k - w_diff)[None, :, None, :])  # [B, d, C, h]
        q_term = tf.matmul(query, w_q + w_diff) + tf.cast(self.bias, dtype)  # [B, C, h]
        kernel = tf.reshape(tf.concat([per_candidate, q_term[:, None]], axis=1),
                            tf.stack([b, d + 1, c * h]))
        keys1 = tf.concat([keys, tf.ones_like(keys[..., :1])], axis=-1)
        hidden = tf.reshape(tf.matmul(keys1, kernel), [-1, h])  # rows (b, l, c)
        scores = tf.reshape(self._mlp(hidden, training), tf.stack([b, length, c]))
        return tf.transpose(scores, [0, 2, 1])

    def compute_mask(self, *args, **kwargs):
        return None

    def get_config(self):
        config = super().get_config()
        config.update(
            hidden_units=list(self.hidden_units),
            activation=self.activation,
            normalization=self.normalization,
            return_weights=self.return_weights,
            kernel_initializer=self.kernel_initializer,
        )
        return config
