import numpy as np
import pytest

from tests.conftest import unit
from tests.layer_testing import assert_candidates_equal_separate_calls
from tfmm.layers import DINAttention, SimScore, VectorFeature

pytestmark = pytest.mark.keras  # rerun under tf-keras by tests/test_tf_keras.py


def test_vector_feature_appends_vectors(rng):
    te, he = rng.normal(size=(2, 3)), rng.normal(size=(2, 4, 3))
    tv, hv = rng.normal(size=(2, 5)), rng.normal(size=(2, 4, 5))
    t, h = VectorFeature()(*(x.astype("float32") for x in (te, he, tv, hv)))
    np.testing.assert_allclose(t.numpy(), np.concatenate([te, tv], -1), rtol=1e-6)
    np.testing.assert_allclose(h.numpy(), np.concatenate([he, hv], -1), rtol=1e-6)


def test_vector_feature_projection_is_shared(rng):
    layer = VectorFeature(projection_dim=2)
    te, he = np.zeros((1, 3), "float32"), np.zeros((1, 4, 3), "float32")
    tv = rng.normal(size=(1, 5)).astype("float32")
    hv = np.repeat(tv[:, None], 4, axis=1)
    t, h = layer(te, he, tv, hv)
    assert t.shape == (1, 5) and h.shape == (1, 4, 5)
    np.testing.assert_allclose(t.numpy()[:, 3:], tv @ layer.projection.kernel.numpy(), rtol=1e-5)
    np.testing.assert_allclose(h.numpy()[:, 0, 3:], t.numpy()[:, 3:], rtol=1e-5, atol=1e-6)


def test_vector_feature_with_candidates(rng):
    te, he = rng.normal(size=(2, 7, 3)), rng.normal(size=(2, 4, 3))
    tv, hv = rng.normal(size=(2, 7, 5)), rng.normal(size=(2, 4, 5))
    t, h = VectorFeature()(*(x.astype("float32") for x in (te, he, tv, hv)))
    # Each candidate's target is its own embedding and vector; the history is unchanged.
    np.testing.assert_allclose(t.numpy(), np.concatenate([te, tv], -1), rtol=1e-6)
    np.testing.assert_allclose(h.numpy(), np.concatenate([he, hv], -1), rtol=1e-6)


def test_simscore_appends_scores_and_self_similarity(rng):
    te, he = rng.normal(size=(2, 3)).astype("float32"), rng.normal(size=(2, 4, 3)).astype("float32")
    tv, hv = unit(rng.normal(size=(2, 5))), unit(rng.normal(size=(2, 4, 5)))
    mask = np.array([[True, True, False, True], [False] * 4])
    t, h = SimScore()(te, he, tv, hv, mask=mask)
    np.testing.assert_allclose(t.numpy()[:, :3], te)
    np.testing.assert_allclose(t.numpy()[:, 3], 1.0, rtol=1e-6)
    np.testing.assert_allclose(h.numpy()[..., :3], he)
    np.testing.assert_allclose(h.numpy()[..., 3], np.einsum("bd,bld->bl", tv, hv) * mask, atol=1e-6)


def test_simscore_missing_target_vector_scores_zero():
    t, h = SimScore()(np.zeros((1, 2), "float32"), np.zeros((1, 3, 2), "float32"),
                      np.zeros((1, 4), "float32"), np.ones((1, 3, 4), "float32"))
    np.testing.assert_array_equal(t.numpy()[:, -1], 0.0)
    np.testing.assert_array_equal(h.numpy()[..., -1], 0.0)
    t, _ = SimScore(similarity="cosine")(
        np.zeros((1, 2), "float32"), np.zeros((1, 3, 2), "float32"),
        np.zeros((1, 4), "float32"), np.ones((1, 3, 4), "float32"))
    np.testing.assert_array_equal(t.numpy()[:, -1], 0.0)


def test_simscore_candidates_feed_din_per_candidate_keys(rng):
    b, c, l, e, d = 2, 3, 4, 3, 5
    te = rng.normal(size=(b, c, e)).astype("float32")
    he = rng.normal(size=(b, l, e)).astype("float32")
    tv, hv = unit(rng.normal(size=(b, c, d))), unit(rng.normal(size=(b, l, d)))
    mask = rng.random((b, l)) < 0.8
    simscore = SimScore()
    t, h = simscore(te, he, tv, hv, mask=mask)
    assert t.shape == (b, c, e + 1) and h.shape == (b, c, l, e + 1)
    din = DINAttention(hidden_units=(6,))

    def simscore_then_din(target, target_vector, history, history_vectors):
        t, h = simscore(target, history, target_vector, history_vectors, mask=mask)
        return t, h, din(t, h, mask=mask)

    assert_candidates_equal_separate_calls(simscore_then_din, (te, tv), he, hv)


@pytest.mark.parametrize("layer", [VectorFeature(), SimScore()])
def test_bad_shapes_name_the_argument(layer):
    with pytest.raises(ValueError, match=r"`history_vec` must have shape \[B, 4, d\]"):
        layer(np.ones((2, 3), "float32"), np.ones((2, 4, 3), "float32"),
              np.ones((2, 5), "float32"), np.ones((2, 6, 5), "float32"))
    with pytest.raises(ValueError, match=r"`target_vec` .* must have the rank of `target_emb`"):
        layer(np.ones((2, 3), "float32"), np.ones((2, 4, 3), "float32"),
              np.ones((2, 1, 5), "float32"), np.ones((2, 4, 5), "float32"))
