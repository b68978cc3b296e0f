import os

import numpy as np
import pytest
import tensorflow as tf

from tfmm import export
from tfmm.export import export_saved_model, next_version
from tfmm.towers import image_tower, text_tower


def test_exported_tower_answers_like_the_model_in_inference_mode(tmp_path):
    tower = image_tower(dim=8)
    x = np.random.default_rng(0).integers(0, 255, (16, 64, 64, 3)).astype("uint8")
    tower(x, training=True)
    for w in tower.weights:  # statistics unlike any one batch's
        if "moving_mean" in w.path:
            w.assign(w + 0.5)
    path = export_saved_model(tower, str(tmp_path), "vector")
    assert path == str(tmp_path / "1")
    serve = tf.saved_model.load(path).signatures["serving_default"]
    got = serve(image=tf.constant(x))["vector"].numpy()
    np.testing.assert_allclose(got, tower(x, training=False).numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, tower(x, training=True).numpy(), atol=1e-3)


def test_versions_increase_and_text_signature(tmp_path):
    (tmp_path / "7").mkdir()
    (tmp_path / "notes").mkdir()
    assert next_version(str(tmp_path)) == 8
    tower = text_tower(["red", "mug"], dim=4)
    path = export_saved_model(tower, str(tmp_path), "vector")
    assert path.endswith("8")
    serve = tf.saved_model.load(path).signatures["serving_default"]
    texts = np.array(["red mug", "unknown words"])
    np.testing.assert_allclose(serve(text=tf.constant(texts))["vector"].numpy(),
                               tower(texts).numpy(), rtol=1e-5, atol=1e-6)


def test_bad_warmup_inputs_name_the_input_and_leave_no_version(tmp_path):
    tower = text_tower(["red", "mug"], dim=4)
    with pytest.raises(ValueError, match=r"warmup_inputs: the signature takes \['text'\]; "
                                         r"missing \['text'\], unknown \['title'\]"):
        export_saved_model(tower, str(tmp_path), "vector", warmup_inputs={"title": ["red"]})
    with pytest.raises(ValueError, match=r"input 'text' has shape \[2, 1\], .* wants \[None\]"):
        export_saved_model(tower, str(tmp_path), "vector", warmup_inputs={"text": [["a"], ["b"]]})
    assert os.listdir(tmp_path) == []


def test_a_failed_export_leaves_nothing_and_no_partial_version(tmp_path, monkeypatch):
    tower = text_tower(["red", "mug"], dim=4)
    export_saved_model(tower, str(tmp_path), "vector")

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(export, "write_warmup", broken)
    with pytest.raises(OSError, match="disk full"):
        export_saved_model(tower, str(tmp_path), "vector")
    assert os.listdir(tmp_path) == ["1"]  # no version 2, no staging directory
