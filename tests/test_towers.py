"""The towers' own behaviour (their pre-training runs are in test_pretrain.py)."""

import keras
import numpy as np
import pytest

from tfmm.towers import Centring, TokenMean, centred, text_tower


def test_an_empty_text_gets_a_finite_unit_vector_and_others_their_token_mean():
    keras.utils.set_random_seed(0)
    tower = text_tower(["red", "hat", "blue"], dim=4)
    vectors = tower(np.array(["", "red hat", "blue"])).numpy()
    assert np.isfinite(vectors).all()  # GlobalAveragePooling1D gave NaN for ""
    np.testing.assert_allclose(np.linalg.norm(vectors[1:], axis=1), 1.0, rtol=1e-5)
    # Where a text has tokens, the mean of its tokens, as Keras' masked average pooling.
    x = np.random.default_rng(0).normal(size=(3, 4, 2)).astype("float32")
    mask = np.array([[True, True, False, False], [True, False, False, False], [False] * 4])
    got = TokenMean()(x, mask=mask).numpy()
    np.testing.assert_array_equal(got[:2], keras.layers.GlobalAveragePooling1D()(
        x[:2], mask=mask[:2]).numpy())
    np.testing.assert_array_equal(got[2], 0.0)


def test_centring_subtracts_the_mean_and_renormalises(tmp_path):
    layer = Centring([1.0, 0.0])
    got = layer(np.array([[1.0, 1.0], [3.0, 0.0], [1.0, 0.0]], "float32")).numpy()
    # (0, 1) and (2, 0) normalised; the mean itself becomes zero, not NaN.
    np.testing.assert_allclose(got, [[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]], atol=1e-7)

    keras.utils.set_random_seed(0)
    tower = text_tower(["red", "hat", "blue"], dim=3)
    texts = np.array(["red hat", "blue", "red"])
    raw = tower(texts).numpy()
    model = centred(tower, raw.mean(axis=0))
    assert model.name == tower.name
    assert [x.name for x in model.inputs] == [x.name for x in tower.inputs]
    want = (raw - raw.mean(axis=0)) / np.linalg.norm(raw - raw.mean(axis=0), axis=1,
                                                      keepdims=True)
    np.testing.assert_allclose(model(texts).numpy(), want, atol=1e-6)
    model.save(tmp_path / "centred.keras")  # the mean travels with the model
    np.testing.assert_allclose(keras.models.load_model(tmp_path / "centred.keras")(texts),
                               want, atol=1e-6)
    with pytest.raises(ValueError, match=r"centred: mean has 2 values, the tower's vectors 3"):
        centred(tower, [0.0, 0.0])
