"""Dice, the data-adaptive activation of DIN (Zhou et al., KDD'18)."""

import tensorflow as tf

from tfmm.keras_compat import keras, register


@register
class Dice(keras.layers.Layer):
    """``p(x) * x + (1 - p(x)) * alpha * x`` with ``p = sigmoid(BN(x))``.

    ``BN`` standardises each channel (last axis) with batch statistics while
    training and their moving averages at inference, without scale or offset;
    ``alpha`` is learned per channel. As in the DIN reference, all leading
    axes (batch, candidates, history positions) contribute to the statistics.

    Args:
        epsilon: added to the variance (the reference uses 1e-9).
        momentum: momentum of the moving statistics.

    Example:

    >>> import numpy as np
    >>> dice = Dice()
    >>> dice(np.zeros((2, 3), "float32")).shape
    TensorShape([2, 3])
    """

    def __init__(self, epsilon=1e-9, momentum=0.99, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon
        self.momentum = momentum

    def build(self, input_shape):
        channels = (input_shape[-1],)
        self.alpha = self.add_weight(name="alpha", shape=channels, initializer="zeros")
        # Own statistics rather than a BatchNormalization sublayer: the same
        # Dice sees [B, H], [B, L, H] or [B, C, L, H] inputs.
        self.moving_mean = self.add_weight(
            name="moving_mean", shape=channels, initializer="zeros", trainable=False
        )
        self.moving_variance = self.add_weight(
            name="moving_variance", shape=channels, initializer="ones", trainable=False
        )
        self.built = True

    def call(self, inputs, training=None):
        if training:
            axes = list(range(inputs.shape.rank - 1))
            mean, variance = tf.nn.moments(inputs, axes=axes)
            for var, value in ((self.moving_mean, mean), (self.moving_variance, variance)):
                var.assign(var * self.momentum + tf.cast(value, var.dtype) * (1.0 - self.momentum))
        else:
            mean = tf.cast(self.moving_mean, inputs.dtype)
            variance = tf.cast(self.moving_variance, inputs.dtype)
        p = tf.sigmoid((inputs - mean) * tf.math.rsqrt(variance + self.epsilon))
        alpha = tf.cast(self.alpha, inputs.dtype)
        return p * inputs + (1.0 - p) * alpha * inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(epsilon=self.epsilon, momentum=self.momentum)
        return config
