"""An embedding table stored as row shards, for tables that outgrow one machine."""

import tensorflow as tf

from tfmm.keras_compat import LEGACY, keras, register


@register
class ShardedEmbedding(keras.layers.Layer):
    """``keras.layers.Embedding`` whose table is ``num_shards`` variables of rows.

    Shard ``i`` holds a contiguous block of rows, the first ``input_dim %
    num_shards`` shards one row more (``tf.nn.embedding_lookup``'s "div"
    split), and a lookup gathers from each shard where it lives: under
    ``tf.distribute.ParameterServerStrategy`` the shards are placed on the
    parameter servers in turn, so no task ever holds the whole table, and a
    Keras optimizer updates each shard on its server.

    Keras 3's Embedding cannot do that: with the strategy's
    ``variable_partitioner`` its table becomes a ``ShardedVariable`` that the
    lookup reads whole (``ops.take`` converts it to one tensor), and neither
    ``GradientTape`` nor the optimizer accepts it (DECISIONS.md, "ShardedEmbedding
    for tables bigger than one worker").

    Args:
        input_dim, output_dim: the table's rows and width.
        num_shards: how many variables hold the rows (at most ``input_dim``).
        embeddings_initializer: of every shard.

    Example:

    >>> import numpy as np
    >>> layer = ShardedEmbedding(5, 2, num_shards=2)
    >>> rows = layer(np.array([4, 0]))
    >>> [tuple(w.shape) for w in layer.weights]
    [(3, 2), (2, 2)]
    >>> table = np.concatenate([w.numpy() for w in layer.weights])
    >>> bool((rows.numpy() == table[[4, 0]]).all())
    True
    """

    def __init__(self, input_dim, output_dim, num_shards=1, embeddings_initializer="uniform",
                 **kwargs):
        super().__init__(**kwargs)
        if not 1 <= num_shards <= input_dim or output_dim < 1:
            raise ValueError(f"ShardedEmbedding: need 1 <= num_shards <= input_dim and "
                             f"output_dim >= 1, got input_dim={input_dim}, "
                             f"output_dim={output_dim}, num_shards={num_shards}.")
        self.input_dim, self.output_dim = int(input_dim), int(output_dim)
        self.num_shards = int(num_shards)
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)

    def build(self, input_shape=None):
        rows, extra = divmod(self.input_dim, self.num_shards)
        self.shards = [self.add_weight(shape=(rows + (i < extra), self.output_dim),
                                       initializer=self.embeddings_initializer,
                                       name=f"embeddings_{i}")
                       for i in range(self.num_shards)]
        self.built = True

    def call(self, ids):
        if ids.dtype not in (tf.int32, tf.int64):
            ids = tf.cast(ids, tf.int64)
        # Keras 3 wraps each tf.Variable; the lookup must see the variables
        # themselves to gather on the tasks that hold them.
        shards = self.shards if LEGACY else [s.value for s in self.shards]
        return tf.cast(tf.nn.embedding_lookup(shards, ids), self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return (*input_shape, self.output_dim)

    def get_config(self):
        config = super().get_config()
        config.update(input_dim=self.input_dim, output_dim=self.output_dim,
                      num_shards=self.num_shards,
                      embeddings_initializer=keras.initializers.serialize(
                          self.embeddings_initializer))
        return config
