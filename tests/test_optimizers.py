import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfmm.optimizers import DenseGradientAdam, PerIdAdam, PerIdSGD, sum_by_id


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


@pytest.mark.parametrize("optimizer_class", [DenseGradientAdam, PerIdAdam])
def test_serialises_as_itself(optimizer_class):
    optimizer = optimizer_class(3e-3, beta_1=0.8)
    clone = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(clone) is optimizer_class
    assert clone.get_config()["beta_1"] == 0.8
    assert np.isclose(float(clone.learning_rate), 3e-3)


def test_sum_by_id_keeps_the_dense_gradient():
    g = _sparse_gradient()
    summed = sum_by_id(g)
    assert summed.indices.numpy().tolist() == [0, 2]
    np.testing.assert_array_equal(summed.values.numpy().ravel(), [2.0, -3.0])
    np.testing.assert_array_equal(tf.convert_to_tensor(summed), tf.convert_to_tensor(g))
    dense = tf.ones([2, 2])
    assert sum_by_id(dense) is dense


def _exchanged(optimizer, monkeypatch):
    """The sparse gradients `optimizer` hands to the replicas' all-reduce (the default
    strategy's, in one process) on one step of `_sparse_gradient`."""
    seen, all_reduce = [], tf.distribute.ReplicaContext.all_reduce

    def spy(self, reduce_op, value, options=None):
        seen.extend(g for g in value if isinstance(g, tf.IndexedSlices))
        return all_reduce(self, reduce_op, value, options)

    monkeypatch.setattr(tf.distribute.ReplicaContext, "all_reduce", spy)
    optimizer.apply([_sparse_gradient()], [keras.Variable(np.zeros((4, 1), "float32"))])
    return seen


@pytest.mark.parametrize("optimizer", [PerIdAdam, PerIdSGD])
def test_the_exchange_gets_each_id_once_with_its_rows_sum(optimizer, monkeypatch):
    (g,) = _exchanged(optimizer(0.1), monkeypatch)
    assert g.indices.numpy().tolist() == [0, 2]  # not [0, 0, 2]: one row per id
    np.testing.assert_array_equal(tf.convert_to_tensor(g).numpy().ravel(), [2, 0, -3, 0])
    # Keras 3's own optimizers hand it the rows as looked up.
    (rows,) = _exchanged(keras.optimizers.Adam(0.1), monkeypatch)
    assert rows.indices.numpy().tolist() == [0, 0, 2]


def test_per_id_adam_is_adam_on_the_dense_sum():
    for ours, dense in zip(_step(PerIdAdam(0.1), _sparse_gradient()),
                           _step(DenseGradientAdam(0.1), _sparse_gradient())):
        np.testing.assert_allclose(ours, dense, rtol=1e-6)


@pytest.mark.slow  # tens of seconds: the full suite runs it, the fast loop not
def test_two_replicas_exchange_each_id_once_and_equal_one_process(tmp_path):
    """tests/per_id_replicas.py: 3 steps of an embedding model, MirroredStrategy on 2
    logical CPUs against one process on the same global batches."""
    out = tmp_path / "runs.npz"
    proc = subprocess.run([sys.executable, "-m", "tests.per_id_replicas", str(out)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = np.load(out)

    def run(optimizer, name):
        prefix = f"{optimizer}/{name}/"
        return {k[len(prefix):]: runs[k] for k in runs.files if k.startswith(prefix)}

    for optimizer in ("keras_adam", "per_id_adam", "dense_adam", "per_id_sgd"):
        single, replicas = run(optimizer, "single"), run(optimizer, "replicas")
        weights = [k for k in single if k.startswith("weight_")]
        assert len(weights) == 3  # the table, the kernel, the bias
        for k in weights:
            np.testing.assert_allclose(replicas[k], single[k], rtol=0, atol=1e-6,
                                       err_msg=f"{optimizer} {k}")
        indices = [replicas[k] for k in replicas if k.startswith("indices_")]
        assert len(indices) == (0 if optimizer == "dense_adam" else 6)  # 3 steps, 2 replicas
        # 4 rows of 5 lookups a replica: Keras' Adam sends the 20 rows, ours each id once.
        for i in indices:
            assert len(i) == (20 if optimizer == "keras_adam" else len(np.unique(i)))
    for k in ("weight_0", "weight_1", "weight_2"):  # Adam's update, as DenseGradientAdam's
        np.testing.assert_allclose(run("per_id_adam", "replicas")[k],
                                   run("dense_adam", "single")[k], rtol=0, atol=1e-6)
