import keras
import numpy as np
import tensorflow as tf

from tfmm.optimizers import DenseGradientAdam


def _sparse_gradient():
    # An embedding lookup of ids [0, 0, 2]: one gradient row per lookup, id 0 twice.
    return tf.IndexedSlices(tf.constant([[1.0], [1.0], [-3.0]]), tf.constant([0, 0, 2]),
                            tf.constant([4, 1]))


def _step(optimizer, gradient):
    variable = keras.Variable(np.zeros((4, 1), "float32"))
    optimizer.apply([gradient], [variable])
    return (optimizer._momentums[0].numpy().ravel(), optimizer._velocities[0].numpy().ravel(),
            variable.numpy().ravel())


def test_adam_moments_of_a_sparse_gradient_are_those_of_its_dense_sum():
    m, v, _ = _step(DenseGradientAdam(0.1), _sparse_gradient())
    # The dense gradient is [2, 0, -3, 0]: m = (1 - 0.9) g, v = (1 - 0.999) g^2.
    np.testing.assert_allclose(m, [0.2, 0.0, -0.3, 0.0], rtol=1e-6)
    np.testing.assert_allclose(v, [0.004, 0.0, 0.009, 0.0], rtol=1e-5)
    for ours, dense in zip(_step(DenseGradientAdam(0.1), _sparse_gradient()),
                           _step(keras.optimizers.Adam(0.1),
                                 tf.convert_to_tensor(_sparse_gradient()))):
        np.testing.assert_allclose(ours, dense, rtol=1e-6)
    # Keras 3's own Adam squares the rows before summing them: v[0] = 0.001 * (1 + 1).
    _, keras_v, _ = _step(keras.optimizers.Adam(0.1), _sparse_gradient())
    np.testing.assert_allclose(keras_v[0], 0.002, rtol=1e-5)


def test_embedding_gradients_reach_the_update_dense(rng):
    def kinds(optimizer_class):
        seen = []

        class Spy(optimizer_class):
            def update_step(self, gradient, variable, learning_rate):
                seen.append(isinstance(gradient, tf.IndexedSlices))
                return super().update_step(gradient, variable, learning_rate)

        ids = keras.Input((5,), dtype="int64")
        x = keras.layers.Flatten()(keras.layers.Embedding(50, 4)(ids))
        model = keras.Model(ids, keras.layers.Dense(1)(x))
        model.compile(Spy(1e-2), "mse")
        model.fit(rng.integers(0, 12, (32, 5)), rng.normal(size=(32, 1)), batch_size=32,
                  verbose=0)
        return seen

    assert any(kinds(keras.optimizers.Adam))  # the table's gradient is sparse in a Keras model
    ours = kinds(DenseGradientAdam)
    assert ours and not any(ours)


def test_serialises_as_itself():
    optimizer = DenseGradientAdam(3e-3, beta_1=0.8)
    clone = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(clone) is DenseGradientAdam
    assert clone.get_config()["beta_1"] == 0.8
    assert np.isclose(float(clone.learning_rate), 3e-3)
