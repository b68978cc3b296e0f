"""Pre-training end to end on the tiny world: train, Acc@N, export, index."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tfmm import data
from tfmm.data import schema
from tfmm.index import SQLiteIndex
from tfmm.metrics import acc_at_n
from tfmm.pretrain import PretrainConfig, run, word_dropout
from tests.test_ctr import ENV, _kill_after_backup

pytestmark = pytest.mark.slow  # trains models or runs the CLIs


def test_cli_trains_exports_and_indexes(tiny_dir, tmp_path):
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "tfmm.train", "--flagfile=configs/pretrain.flags",
           f"--data_dir={tiny_dir}", f"--model_dir={runs}/model", f"--export_dir={runs}/export",
           f"--index={runs}/index.db", "--epochs=1", "--batch_size=32", "--queue_size=128",
           "--dim=16"]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.load(open(runs / "model" / "metrics.json"))
    assert result["config"]["queue_size"] == 128 and result["config"]["momentum"] == 0.99
    assert len(result["history"]["loss"]) == 1
    assert os.listdir(runs / "model" / "logs")  # TensorBoard

    # The exported encoder is the tower: same vectors from catalogue images.
    export = runs / "export" / "1"
    assert result["export_path"].endswith(os.path.join("export", "1"))
    encoder = tf.saved_model.load(str(export)).signatures["serving_default"]
    items = next(iter(data.items(tiny_dir, batch_size=16)))
    vectors = encoder(image=items["image"])["vector"].numpy()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-4)

    index = SQLiteIndex(runs / "index.db")
    meta = schema.read_metadata(tiny_dir)
    assert len(index.ids()) == meta["counts"]["items"] and index.dim == 16
    stored, found = index.get(items["item_id"].numpy())
    assert found.all()
    np.testing.assert_allclose(stored, vectors, rtol=1e-4, atol=1e-5)

    # The reported Acc@N is that of the export: test queries against their positives' vectors.
    test = list(data.triplets(tiny_dir, "test", batch_size=1024))
    queries = np.concatenate([encoder(image=b["query_image"])["vector"].numpy() for b in test])
    positives, _ = index.get(np.concatenate([b["positive_item_id"].numpy() for b in test]))
    want = acc_at_n(queries, positives, ns=(1, 5))
    assert result["acc@1"] == pytest.approx(want["acc@1"], abs=1e-9)
    assert result["acc@5"] == pytest.approx(want["acc@5"], abs=1e-9)


@pytest.mark.parametrize("flags, message", [
    (["--queue_size=100", "--batch_size=32"],
     "--queue_size=100 must be a multiple of --batch_size=32."),
    # The library's own checks (SCLModel, MomentumQueueCallback), in flag terms.
    (["--temperature=0.001"], "--temperature=0.001 must be > 0 with 1/temperature <= 100.0."),
    (["--momentum=1.0"], "--momentum=1.0 must be in [0, 1)."),
    (["--triplet_weight=-1"], "--triplet_weight=-1.0 must be >= 0."),
])
def test_bad_flags_are_one_line_errors(tiny_dir, tmp_path, flags, message):
    proc = subprocess.run(
        [sys.executable, "-m", "tfmm.train", "--task=pretrain", f"--data_dir={tiny_dir}",
         f"--model_dir={tmp_path}/m", *flags],
        capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == message
    assert "Traceback" not in proc.stderr and not (tmp_path / "m").exists()


def test_killed_run_keeps_every_epochs_losses(tiny_dir, tmp_path):
    cmd = [sys.executable, "-m", "tfmm.train", "--task=pretrain", f"--data_dir={tiny_dir}",
           f"--model_dir={tmp_path}/m", "--export_dir=", "--index=", "--modality=text",
           "--queue_size=32", "--dim=8", "--epochs=3", "--batch_size=16"]
    assert _kill_after_backup(cmd, tmp_path / "m", 1) == [1]
    first = json.load(open(tmp_path / "m" / "epochs.json"))[0]["loss"]
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Epoch 1/3" not in rerun.stdout and "Epoch 2/3" in rerun.stdout
    loss = json.load(open(tmp_path / "m" / "metrics.json"))["history"]["loss"]
    assert len(loss) == 3 and loss[0] == first


@pytest.mark.parametrize("objective, modality, queue, triplet", [
    ("random", "image", 0, 0.0), ("generic", "image", 0, 0.0), ("generic", "text", 0, 0.0),
    ("scl", "text", 64, 1.0),
])
def test_objectives_run(tiny_dir, tmp_path, objective, modality, queue, triplet):
    result = run(PretrainConfig(data_dir=tiny_dir, model_dir=str(tmp_path), objective=objective,
                                modality=modality, queue_size=queue, triplet_weight=triplet,
                                epochs=1, batch_size=32, dim=8, verbose=0))
    assert 0.0 <= result["acc@1"] <= result["acc@5"] <= 1.0
    assert json.load(open(tmp_path / "metrics.json"))["acc@5"] == result["acc@5"]


def test_text_scl_learns_synonyms(tiny_dir, tmp_path):
    random = run(PretrainConfig(data_dir=tiny_dir, model_dir=str(tmp_path / "r"), modality="text",
                                objective="random", queue_size=0, triplet_weight=0.0, verbose=0))
    trained = run(PretrainConfig(data_dir=tiny_dir, model_dir=str(tmp_path / "s"), modality="text",
                                 queue_size=0, epochs=15, batch_size=60, learning_rate=3e-3,
                                 verbose=0))
    assert trained["acc@5"] > random["acc@5"] + 0.2, (random["acc@5"], trained["acc@5"])


def test_word_dropout_keeps_words_and_never_empties():
    texts = tf.constant(["red striped cushion", "blue"])
    out = word_dropout(texts, rate=0.99, seed=tf.constant([1, 2])).numpy()
    assert out[1] == b"blue"
    assert all(w in "red striped cushion".split() for w in out[0].decode().split())
    assert out[0]


@pytest.mark.parametrize("kwargs, message", [
    ({"objective": "clip"}, "--objective='clip'"),
    ({"modality": "audio"}, "--modality='audio'"),
    ({"objective": "generic", "triplet_weight": 1.0}, "no hard negatives"),
    ({"queue_size": -128}, "--queue_size=-128 is out of range"),
    ({"learning_rate": 0.0}, "--learning_rate=0.0 must be > 0"),
])
def test_bad_config(tiny_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        PretrainConfig(data_dir=tiny_dir, model_dir="unused", **kwargs).validate()
