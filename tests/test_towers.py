"""The towers' own behaviour (their pre-training runs are in test_pretrain.py)."""

import keras
import numpy as np

from tfmm.towers import TokenMean, text_tower


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
