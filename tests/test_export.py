import os
import socket
import subprocess
import sys
import uuid

import numpy as np
import pytest
import tensorflow as tf

from tfmm import export
from tfmm.export import export_saved_model, next_version
from tfmm.ranker import DINRanker
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
    with pytest.raises(ValueError, match="is a non-empty directory tfmm did not write"):
        export_saved_model(tower, str(tmp_path), "vector")  # a base holds versions only
    (tmp_path / "notes").rmdir()
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


def test_staging_left_by_a_killed_exporter_is_removed_by_the_next_export(tmp_path):
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid no longer runs
    names = {"dead": f".tmp-{host}-{dead.pid}-{uuid.uuid4().hex}",
             "running": f".tmp-{host}-{os.getpid()}-{uuid.uuid4().hex}",
             "other host": f".tmp-{host}x-{dead.pid}-{uuid.uuid4().hex}",
             "not ours": ".tmp-notes"}
    for name in names.values():
        os.makedirs(tmp_path / name / "variables")
    assert export.remove_abandoned_staging(str(tmp_path)) == [str(tmp_path / names["dead"])]
    assert sorted(os.listdir(tmp_path)) == sorted(
        [names[k] for k in ("running", "other host", "not ours")])
    tower = text_tower(["red", "mug"], dim=4)
    with pytest.raises(ValueError, match="is a non-empty directory tfmm did not write"):
        export_saved_model(tower, str(tmp_path), "vector")  # .tmp-notes: not a version
    os.rmdir(tmp_path / names["not ours"] / "variables")
    os.rmdir(tmp_path / names["not ours"])
    export_saved_model(tower, str(tmp_path), "vector")
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["1"] + [names[k] for k in ("running", "other host")])


@pytest.mark.slow
def test_rankers_get_a_rank_signature_and_other_models_none(tmp_path):
    vocab = {"num_items": 10, "num_users": 10, "num_categories": 5}
    model = DINRanker(vocab, 5, method="vector", vector_dim=4, embedding_dim=4,
                         attention_units=(4,), mlp_units=(8,))
    path = export_saved_model(model, str(tmp_path / "ranker"), "probability")
    rank = tf.saved_model.load(path).signatures["rank"]
    specs = rank.structured_input_signature[1]
    assert {k: (v.shape.as_list(), v.dtype.name) for k, v in specs.items()} == {
        "user_id": ([None], "int64"), "item_id": ([None, None], "int64"),
        "category_id": ([None, None], "int64"), "history_item_ids": ([None, 5], "int64"),
        "history_category_ids": ([None, 5], "int64"), "history_mask": ([None, 5], "bool"),
        "item_vector": ([None, None, 4], "float32"),
        "history_vectors": ([None, 5, 4], "float32")}
    (request,) = export.read_warmup(path, "rank")
    np.testing.assert_allclose(rank(**request)["probability"].numpy(),
                               model.rank(request).numpy(), atol=1e-6)
    plain = export_saved_model(model, str(tmp_path / "plain"), "probability",
                               extra_signatures={})
    assert "rank" not in tf.saved_model.load(plain).signatures
    assert len(export.read_warmup(plain)) == 1
    tower = text_tower(["red", "mug"], dim=4)
    path = export_saved_model(tower, str(tmp_path / "tower"), "vector")
    assert "rank" not in tf.saved_model.load(path).signatures
    with pytest.raises(ValueError, match="may not be named 'serving_default'"):
        export_saved_model(tower, str(tmp_path / "tower"), "vector",
                           extra_signatures={"serving_default": (tower, [])})
