import json

import numpy as np
import pytest

from tfmm import data
from tfmm.data import schema, world as world_lib
from tfmm.keras_compat import LEGACY, keras
from tfmm.metrics import auc
from tfmm.layers import MAKEBlock
from tfmm.export import ranker_signatures
from tfmm.ranker import DINRanker, build_make_pretrainer

pytestmark = pytest.mark.keras  # rerun under tf-keras by tests/test_tf_keras.py


def test_din_ranker_trains_on_reader_batches(tiny_dir):
    meta = schema.read_metadata(tiny_dir)
    model = DINRanker(meta["vocab"], max_history=10, embedding_dim=8)
    keras.utils.set_random_seed(0)
    names = list(model.input)
    train = data.impressions(tiny_dir, "train", batch_size=128, max_history=10, features=names)
    test = data.impressions(tiny_dir, "test", batch_size=512, max_history=10, features=names)
    model.compile(keras.optimizers.Adam(3e-3), "binary_crossentropy")
    before = model.evaluate(train, verbose=0)
    model.fit(train, epochs=3, verbose=0)
    assert model.evaluate(train, verbose=0) < before
    y = np.concatenate([label.numpy() for _, label in test])
    p = model.predict(test, verbose=0)[:, 0]
    assert p.shape == y.shape and ((p > 0) & (p < 1)).all()
    assert auc(y, p) > 0.55


def test_reader_rejects_unknown_features(tiny_dir):
    with pytest.raises(ValueError,
                       match=r"features \['item_vector'\] are not in .* need `vectors`"):
        data.impressions(tiny_dir, "train", features=["item_id", "item_vector"])


@pytest.mark.slow  # tens of seconds or more: the full suite runs it, the fast loop not
@pytest.mark.parametrize("method", ["vector", "simscore", "simtier", "make", "simtier_make"])
def test_multimodal_rankers_learn_from_their_vectors(tiny_dir, method):
    meta = schema.read_metadata(tiny_dir)
    truth = np.load(f"{tiny_dir}/truth.npz")
    cfg = world_lib.WorldConfig(**meta["world"])
    vecs = world_lib.oracle_vectors(truth["category"], truth["colour"], truth["pattern"], cfg)
    ids = np.arange(len(vecs)) + schema.FIRST_ID
    snapshot = data.Vectors.from_items(ids, vecs, meta["vocab"]["num_items"])
    keras.utils.set_random_seed(0)
    model = DINRanker(meta["vocab"], max_history=10, method=method, vector_dim=vecs.shape[1],
                      embedding_dim=8, attention_units=(8,), mlp_units=(16,))
    features = list(model.input)
    train = data.impressions(tiny_dir, "train", batch_size=256, max_history=10, vectors=snapshot,
                             features=features)
    model.compile(keras.optimizers.Adam(3e-3), "binary_crossentropy")
    before = model.evaluate(train, verbose=0)
    model.fit(train, epochs=2, verbose=0)
    assert model.evaluate(train, verbose=0) < before

    def held_out(vectors):
        test = data.impressions(tiny_dir, "test", batch_size=512, max_history=10,
                                vectors=vectors, features=features)
        return (np.concatenate([label.numpy() for _, label in test]),
                model.predict(test, verbose=0)[:, 0])

    y, p = held_out(snapshot)
    # Above chance on the held-out impressions (two epochs on tiny: Keras 3 reaches
    # 0.59-0.63, tf-keras 0.51-0.55, its ID ranker 0.53: tf-keras' Adam sums an
    # embedding row's gradients over a batch before squaring, as dense Adam does,
    # Keras 3's squares each look-up's, which steps further on rows looked up many
    # times; from the same weights tf-keras' Adam and Keras 3's DenseGradientAdam
    # agree to 1e-8 after 3 steps) ...
    assert auc(y, p) > 0.5
    # ... and its scores depend on the vectors: the same items with each other's
    # vectors are scored differently (a vector path cut off would not be).
    shuffled = vecs[np.random.default_rng(0).permutation(len(vecs))]
    _, p_shuffled = held_out(data.Vectors.from_items(ids, shuffled, meta["vocab"]["num_items"]))
    assert np.abs(p - p_shuffled).max() > 1e-3


def test_make_pretrainer_shares_the_block_with_the_ranker(tiny_dir):
    meta = schema.read_metadata(tiny_dir)
    make = MAKEBlock(din={"hidden_units": (4,)}, mlp_units=(8, 4, 2, 1), return_knowledge=True)
    pretrainer = build_make_pretrainer(make, 10, 6)
    assert sorted(pretrainer.input) == ["history_mask", "history_vectors", "item_vector"]
    make.trainable = False
    ranker = DINRanker(meta["vocab"], 10, method="make", vector_dim=6, make=make)
    shared = {id(w) for w in make.weights}
    assert shared <= {id(w) for w in ranker.weights}
    assert not shared & {id(w) for w in ranker.trainable_weights}


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "clip"}, r"method='clip' is not one of"),
    ({"method": "simtier"}, r"method='simtier' needs multimodal vectors"),
    ({"method": "make", "vector_dim": 4, "make": MAKEBlock()}, "return_knowledge=True"),
])
def test_bad_ranker_arguments(kwargs, message):
    vocab = {"num_items": 10, "num_users": 10, "num_categories": 5}
    with pytest.raises(ValueError, match=message):
        DINRanker(vocab, 5, **kwargs)


def test_new_items_and_users_score_like_the_padding_id():
    vocab = {"num_items": 20, "num_users": 7, "num_categories": 4}
    keras.utils.set_random_seed(0)  # the draws would otherwise follow the tests run before
    model = DINRanker(vocab, max_history=3, method="simtier", vector_dim=4, embedding_dim=4,
                         attention_units=(4,), mlp_units=(8,))
    rng = np.random.default_rng(0)
    vectors = {"item_vector": rng.normal(size=(2, 4)).astype("float32"),
               "history_vectors": rng.normal(size=(2, 3, 4)).astype("float32"),
               "history_mask": np.array([[True, True, False]] * 2)}

    def score(user, item, category, history):
        return model({"user_id": np.array([user, user]), "item_id": np.array([item, item]),
                      "category_id": np.array([category, category]),
                      "history_item_ids": np.array([history, history]),
                      "history_category_ids": np.array([[1, 2, 0]] * 2), **vectors}).numpy()

    padding = score(0, 0, 0, [5, 0, 0])
    np.testing.assert_allclose(score(7, 20, 4, [5, 123, 0]), padding, atol=1e-7)
    np.testing.assert_allclose(score(-3, 10**9, 99, [5, -1, 0]), padding, atol=1e-7)
    # Known ids move an untrained ranker's score by 3e-4..2e-2 (seeds 0-19; one unseeded
    # draw in CI: 4e-5); float32 resolves ~6e-8 at 0.5.
    assert not np.allclose(score(3, 11, 2, [5, 6, 0]), padding, rtol=0, atol=1e-6)


def plain_config(model):
    """The config as JSON has it (tuples as lists), without tf-keras' build record of MAKE."""
    config = json.loads(json.dumps(model.get_config()))
    if config["make"] is not None:
        config["make"].pop("build_config", None)
    return config


@pytest.mark.parametrize("method", ["id", "vector", "simscore", "simtier", "make", "simtier_make"])
def test_rank_scores_like_call_on_repeated_rows_and_survives_a_keras_file(method, tmp_path):
    """One row per user with C candidates == C rows repeating the user's history."""
    vocab = {"num_items": 30, "num_users": 10, "num_categories": 5}
    b, c, length, d = 3, 7, 6, 4
    make = (MAKEBlock(din={"hidden_units": (4,)}, mlp_units=(8, 4, 2, 1), return_knowledge=True)
            if "make" in method else None)
    model = DINRanker(vocab, length, method, vector_dim=None if method == "id" else d,
                      make=make, embedding_dim=4, attention_units=(8, 4), mlp_units=(8,),
                      batch_norm=method == "simtier")
    rng = np.random.default_rng(0)
    mask = rng.random((b, length)) < 0.7
    mask[0] = False  # an empty history
    x = {"user_id": rng.integers(0, 12, b), "item_id": rng.integers(0, 32, (b, c)),
         "category_id": rng.integers(0, 6, (b, c)),
         "history_item_ids": rng.integers(0, 32, (b, length)),
         "history_category_ids": rng.integers(0, 6, (b, length)), "history_mask": mask}
    if method != "id":
        x["item_vector"] = rng.normal(size=(b, c, d)).astype("float32")
        x["history_vectors"] = rng.normal(size=(b, length, d)).astype("float32")
    assert [s.name for s in model.rank_input_signature] == list(x)
    got = model.rank(x).numpy()
    rows = {k: np.repeat(v, c, axis=0) if k == "user_id" or k.startswith("history")
            else v.reshape((b * c,) + v.shape[2:]) for k, v in x.items()}
    want = model(rows, training=False).numpy().reshape(b, c)
    assert got.shape == (b, c)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert len({round(float(v), 6) for v in got.ravel()}) > 1  # not a constant

    model.save(tmp_path / "ranker.keras")
    loaded = keras.saving.load_model(tmp_path / "ranker.keras")
    assert type(loaded) is DINRanker
    assert plain_config(loaded) == plain_config(model)
    np.testing.assert_allclose(loaded.rank(x).numpy(), got, rtol=0, atol=1e-7)
    np.testing.assert_allclose(loaded(rows, training=False).numpy().reshape(b, c), want,
                               rtol=0, atol=1e-7)


def test_only_a_din_ranker_gets_a_rank_signature():
    vocab = {"num_items": 10, "num_users": 10, "num_categories": 5}
    ranker = DINRanker(vocab, 4, embedding_dim=4, attention_units=(4,), mlp_units=(4,))
    assert list(ranker_signatures(ranker)) == ["rank"]
    inputs = {"x": keras.Input((3,), name="x")}
    assert ranker_signatures(keras.Model(inputs, keras.layers.Dense(1)(inputs["x"]))) == {}


def _oracle_snapshot(tiny_dir):
    meta = schema.read_metadata(tiny_dir)
    truth = np.load(f"{tiny_dir}/truth.npz")
    cfg = world_lib.WorldConfig(**meta["world"])
    vecs = world_lib.oracle_vectors(truth["category"], truth["colour"], truth["pattern"], cfg)
    return meta, data.Vectors.from_items(np.arange(len(vecs)) + schema.FIRST_ID, vecs,
                                         meta["vocab"]["num_items"])


def _small_ranker(meta, method, seed, vector_dim, **kwargs):
    keras.utils.set_random_seed(seed)
    return DINRanker(meta["vocab"], max_history=10, method=method,
                     vector_dim=None if method == "id" else vector_dim, embedding_dim=8,
                     attention_units=(8,), mlp_units=(16,), **kwargs)


def _make_block(vector_dim, frozen):
    make = MAKEBlock(din={"hidden_units": (4,)}, mlp_units=(8, 4, 2, 1), return_knowledge=True,
                     target_in_mlp=True, name="make")
    make.build((None, vector_dim))
    make.trainable = not frozen
    return make


# A MAKE the ranker makes itself draws after the ranker under Keras 3 only: under
# tf-keras it shifts the ranker's initial draws (0.03 in scores), so no such case there.
@pytest.mark.parametrize("method,integration", [
    ("simtier", "residual"), ("make", "residual"), ("simtier_make", "residual"),
    ("make", "concat"), ("simtier_make", "concat")] + ([] if LEGACY else [
    ("simtier_make", "joint")]))
def test_multimodal_rankers_start_as_the_id_ranker(tiny_dir, method, integration):
    """The same seed gives the same initial scores as the ID ranker: the multimodal inputs
    enter with zero weights, a residual MAKE's head adds zero, and a MAKE trained jointly
    (made by the ranker) draws its weights after the ranker's."""
    meta, snapshot = _oracle_snapshot(tiny_dir)
    d = snapshot.table.shape[1]
    make = None if integration == "joint" else _make_block(d, frozen=True)
    mm = _small_ranker(meta, method, 7, d, make=make,
                       make_integration="concat" if integration == "concat" else "residual")
    plain = _small_ranker(meta, "id", 7, d)
    x, _ = next(iter(data.impressions(tiny_dir, "test", batch_size=64, max_history=10,
                                      vectors=snapshot, features=list(mm.input))))
    want = plain.predict_on_batch({k: x[k] for k in plain.input})
    np.testing.assert_allclose(mm.predict_on_batch(x), want, atol=1e-6)  # float rounding
    assert np.ptp(want) > 1e-3  # scores that differ by example: not a trivial equality
    glorot = _small_ranker(meta, method, 7, d, make=make, start_as_id=False,
                           make_integration="concat")
    assert np.abs(glorot.predict_on_batch(x) - want).max() > 1e-3


@pytest.mark.slow  # tens of seconds or more: the full suite runs it, the fast loop not
@pytest.mark.parametrize("frozen", [True, False])
def test_residual_make_leaves_the_ranker_to_train_as_without_make(tiny_dir, frozen):
    """With a residual MAKE the ranker's own weights follow the same steps as the ID
    ranker's (they learn from their own loss only); the head and, where it trains, MAKE
    learn too."""
    meta, snapshot = _oracle_snapshot(tiny_dir)
    d = snapshot.table.shape[1]
    make = _make_block(d, frozen)
    start = [w.numpy() for w in make.weights]
    models = {"id": _small_ranker(meta, "id", 3, d),
              "make": _small_ranker(meta, "make", 3, d, make=make)}
    for model in models.values():
        model.compile(keras.optimizers.Adam(3e-3), "binary_crossentropy")
        model.fit(data.impressions(tiny_dir, "train", batch_size=256, max_history=10,
                                   vectors=snapshot, features=list(model.input)),
                  epochs=1, verbose=0)
    ranker = models["id"].weights
    theirs = {id(w) for w in [*make.weights, *models["make"].make_head.weights]}
    own = [w for w in models["make"].weights if id(w) not in theirs]
    assert [w.shape for w in own] == [w.shape for w in ranker]
    for w, v in zip(own, ranker):
        np.testing.assert_allclose(w.numpy(), v.numpy(), atol=1e-6,
                                   err_msg=getattr(w, "path", w.name))
    assert np.abs(models["make"].make_head.kernel.numpy()).max() > 1e-4
    moved = [not np.array_equal(a, w.numpy()) for a, w in zip(start, make.weights)]
    assert any(moved) != frozen
