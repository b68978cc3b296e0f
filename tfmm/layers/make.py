"""MAKE, the MultimodAl Knowledge Extractor (paper §4.3)."""

import tensorflow as tf

from tfmm.keras_compat import keras, register
from tfmm.layers import _validation as v
from tfmm.layers.din_attention import DINAttention


@register
class MAKEBlock(keras.layers.Layer):
    """DIN over multimodal vectors, then a four-layer MLP to a click logit.

    ``v_MAKE = DIN({v_i}, v_c)`` (eq. 3) and ``logit = MLP_MAKE(v_MAKE)``
    (eq. 4). MAKE is pre-trained alone on the CTR task for several epochs
    (eq. 5: binary cross-entropy on the logit); its knowledge is then
    ``concat(v_MAKE, outputs of the MLP's hidden layers)``, which the ranker
    concatenates with its other embeddings. After pre-training, set
    ``block.trainable = False`` to freeze it: its weights stop training and
    it runs in inference mode (Dice statistics, dropout) inside the ranker.

    Args:
        din: the ``DINAttention`` to use, or a dict of its arguments; default
            ``DINAttention()``.
        mlp_units: sizes of the four MLP layers; the last must be 1 (the logit).
        mlp_activation: activation of the MLP's hidden layers.
        dropout: dropout rate after each hidden layer.
        return_knowledge: return ``(logit, knowledge)`` instead of the logit.
        target_in_mlp: feed ``concat(v_MAKE, v_c)`` to the MLP, as DIN's own
            head does, instead of ``v_MAKE`` alone (eq. 4).

    Call arguments:
        target: multimodal vector of the target, ``[B, d]`` or ``[B, C, d]``.
        history: multimodal vectors of the history, ``[B, L, d]``.
        mask: optional ``[B, L]`` bool, True for real history items.
        training: Python bool.

    Returns:
        logit ``[B, 1]`` (or ``[B, C, 1]``); with ``return_knowledge`` also
        knowledge ``[B, d + sum(mlp_units[:-1])]`` (or ``[B, C, ...]``).

    Example:

    >>> import numpy as np
    >>> make = MAKEBlock(din={"hidden_units": (8,)}, mlp_units=(16, 8, 4, 1),
    ...                  return_knowledge=True)
    >>> logit, knowledge = make(np.ones((2, 6), "float32"),
    ...                         np.ones((2, 5, 6), "float32"))
    >>> logit.shape, knowledge.shape
    (TensorShape([2, 1]), TensorShape([2, 34]))
    """

    def __init__(self, din=None, mlp_units=(256, 128, 64, 1), mlp_activation="relu",
                 dropout=0.0, return_knowledge=False, target_in_mlp=False, **kwargs):
        super().__init__(**kwargs)
        mlp_units = tuple(int(u) for u in mlp_units)
        if len(mlp_units) != 4 or mlp_units[-1] != 1 or min(mlp_units) < 1:
            raise ValueError(
                "MAKEBlock: `mlp_units` must be the sizes of four positive layers "
                f"ending with the logit, e.g. (256, 128, 64, 1); got {mlp_units}."
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MAKEBlock: `dropout` must be in [0, 1), got {dropout}.")
        if din is None:
            din = DINAttention(name="din")
        elif isinstance(din, dict):
            din = DINAttention.from_config({"name": "din", **din})
        elif not isinstance(din, DINAttention):
            raise ValueError(
                f"MAKEBlock: `din` must be a DINAttention or a dict of its arguments, "
                f"got {type(din).__name__}."
            )
        if din.return_weights:
            raise ValueError("MAKEBlock: `din` must be built with return_weights=False.")
        self.din = din
        self.mlp_units = mlp_units
        self.mlp_activation = keras.activations.serialize(keras.activations.get(mlp_activation))
        self.dropout = dropout
        self.return_knowledge = return_knowledge
        self.target_in_mlp = bool(target_in_mlp)
        self.mlp = [
            keras.layers.Dense(
                u, activation=None if i == 3 else mlp_activation, name=f"mlp_{i + 1}"
            )
            for i, u in enumerate(mlp_units)
        ]
        self.drop = keras.layers.Dropout(dropout, name="dropout")
        self.supports_masking = True

    def build(self, target_shape, history_shape=None):
        target_shape = tuple(target_shape)
        self.din.build(target_shape)
        width = target_shape[-1] * (2 if self.target_in_mlp else 1)
        for dense in self.mlp:
            dense.build((None, width))
            width = dense.units
        self.built = True

    def call(self, target, history, mask=None, training=None):
        v.check_target_history("MAKEBlock", target, history)
        if not self.trainable:
            training = False
        v_make = self.din(target, history, mask=mask, training=training)
        x = tf.concat([v_make, target], axis=-1) if self.target_in_mlp else v_make
        knowledge = [v_make]
        for dense in self.mlp[:-1]:
            x = self.drop(dense(x), training=training)
            knowledge.append(x)
        logit = self.mlp[-1](x)
        if self.return_knowledge:
            return logit, tf.concat(knowledge, axis=-1)
        return logit

    @property
    def knowledge_dim(self):
        """Width of the knowledge vector, given the vector dimension d once built."""
        return self.din.kernel.shape[0] // 4 + sum(self.mlp_units[:-1])

    def compute_mask(self, *args, **kwargs):
        return None

    def get_config(self):
        config = super().get_config()
        din = self.din.get_config()
        din.pop("name", None)
        config.update(
            din=din,
            mlp_units=list(self.mlp_units),
            mlp_activation=self.mlp_activation,
            dropout=self.dropout,
            return_knowledge=self.return_knowledge,
            target_in_mlp=self.target_in_mlp,
        )
        return config
