import numpy as np
import pytest

from tests.conftest import unit
from tests.layer_testing import assert_config_round_trip, assert_keras_file_round_trip
from tfmm.keras_compat import keras
import tfmm.layers
from tfmm.layers import (DINAttention, Dice, KnownIds, MAKEBlock, ShardedEmbedding, SimScore,
                         SimTierLayer, VectorFeature)

pytestmark = pytest.mark.keras  # rerun under tf-keras by tests/test_tf_keras.py


def all_layers_model(l=6, e=4, d=8):
    """A small ranker using every tfmm layer, for round trips."""
    ids_t, ids_h = keras.Input((), dtype="int32"), keras.Input((l,), dtype="int32")
    vec_t, vec_h = keras.Input((d,)), keras.Input((l, d))
    mask = keras.Input((l,), dtype="bool")
    emb = keras.layers.Embedding(50, e)
    et, eh = emb(ids_t), emb(ids_h)
    vt, vh = VectorFeature(projection_dim=3)(et, eh, vec_t, vec_h)
    st, sh = SimScore(similarity="cosine")(et, eh, vec_t, vec_h, mask=mask)
    pooled_v = DINAttention(hidden_units=(8, 4), activation="dice", normalization="softmax")(
        vt, vh, mask=mask)
    pooled_s = DINAttention(hidden_units=(5,))(st, sh, mask=mask)
    tiers = SimTierLayer(num_tiers=6, output="log1p")(vec_t, vec_h, mask=mask)
    logit_make, knowledge = MAKEBlock(din={"hidden_units": (6,), "activation": "dice"},
                                      mlp_units=(8, 6, 4, 1), dropout=0.1,
                                      return_knowledge=True, target_in_mlp=True)(
        vec_t, vec_h, mask=mask)
    x = keras.layers.Concatenate()([pooled_v, pooled_s, tiers, knowledge, et])
    x = Dice()(keras.layers.Dense(8)(x))
    out = keras.layers.Dense(1, activation="sigmoid")(x)
    return keras.Model([ids_t, ids_h, vec_t, vec_h, mask], [out, logit_make])


def model_inputs(rng, b=5, l=6, d=8):
    return [
        rng.integers(0, 50, size=(b,)).astype("int32"),
        rng.integers(0, 50, size=(b, l)).astype("int32"),
        unit(rng.normal(size=(b, d))),
        unit(rng.normal(size=(b, l, d))),
        rng.random((b, l)) < 0.7,
    ]


@pytest.mark.slow
def test_keras_file_round_trip_gives_identical_outputs(rng, tmp_path):
    model = all_layers_model()
    x = model_inputs(rng)
    # Move Dice statistics and weights off their initial values first.
    model.compile(optimizer="adam",
                  loss=["binary_crossentropy", keras.losses.BinaryCrossentropy(from_logits=True)])
    model.fit(x, [np.ones((5, 1)), np.ones((5, 1))], epochs=2, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    for got, want in zip(loaded.predict(x, verbose=0), model.predict(x, verbose=0)):
        np.testing.assert_array_equal(got, want)
    assert {type(layer).__name__ for layer in loaded.layers} >= {
        "VectorFeature", "SimScore", "DINAttention", "SimTierLayer", "MAKEBlock", "Dice"}


# Every public layer with settings away from their defaults; a layer added to
# tfmm.layers.__all__ without cases here fails test_every_public_layer_has_cases.
CASES = {
    "SimTierLayer": lambda: [SimTierLayer(num_tiers=5, output="fraction", similarity="cosine",
                                          boundaries=[-0.5, 0.0, 0.5, 0.9])],
    "DINAttention": lambda: [
        DINAttention(hidden_units=(3,), activation="relu", normalization="softmax",
                     return_weights=True, kernel_initializer="he_normal"),
        DINAttention(activation="dice")],
    "Dice": lambda: [Dice(epsilon=1e-6, momentum=0.9)],
    "MAKEBlock": lambda: [MAKEBlock(din=DINAttention(hidden_units=(4, 2)),
                                    mlp_units=(9, 7, 5, 1), mlp_activation="tanh", dropout=0.3,
                                    return_knowledge=True, target_in_mlp=True)],
    "VectorFeature": lambda: [VectorFeature(projection_dim=7)],
    "SimScore": lambda: [SimScore(similarity="cosine")],
    "KnownIds": lambda: [KnownIds(5, unknown_id=1)],
    "ShardedEmbedding": lambda: [ShardedEmbedding(10, 3, num_shards=2,
                                                  embeddings_initializer="zeros")],
}


def test_every_public_layer_has_cases():
    assert sorted(CASES) == sorted(tfmm.layers.__all__)


@pytest.mark.parametrize("name", tfmm.layers.__all__)
def test_config_round_trip(name):
    for layer in CASES[name]():
        assert_config_round_trip(layer)


def test_known_ids_round_trip_and_errors(tmp_path):
    assert_keras_file_round_trip(KnownIds(5, unknown_id=1), [np.array([[0, 4, 5, -1]])],
                                 tmp_path / "known_ids.keras")
    layer = KnownIds.from_config(KnownIds(5, unknown_id=1).get_config())
    np.testing.assert_array_equal(layer(np.array([[0, 4, 5, -1]])).numpy(), [[0, 4, 1, 1]])
    with pytest.raises(ValueError, match="unknown_id < num_ids"):
        KnownIds(3, unknown_id=3)
