import numpy as np
import pytest

from tfmm import data
from tfmm.data import schema, world as world_lib
from tfmm.data.synthetic import write_world
from tfmm.keras_compat import keras
from tfmm.metrics import auc
from tfmm.ranker import build_din


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranker") / "tiny"
    write_world(world_lib.generate(world_lib.PRESETS["tiny"]), out)
    return str(out)


def test_din_ranker_trains_on_reader_batches(tiny_dir):
    meta = schema.read_metadata(tiny_dir)
    model = build_din(meta["vocab"], max_history=10, embedding_dim=8)
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
    with pytest.raises(ValueError, match=r"features \['item_vector'\] are not in .* need `vectors`"):
        data.impressions(tiny_dir, "train", features=["item_id", "item_vector"])
