"""Pre-training end to end on the tiny world: train, Acc@N, export, index."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf

from tfmm import data, distribute, encoder_checks
from tfmm.data import schema
from tfmm.data import world as world_lib
from tfmm.data.prepare import PrepareOptions, prepare
from tfmm.data.synthetic import write_raw
from tfmm.index import SQLiteIndex, open_index
from tfmm.metrics import acc_at_n, neighbours_same_label, same_label_chance
from tfmm.pretrain import (Catalogue, PretrainConfig, SettingsError, build_tower, choose_source,
                           evaluate, run, training_data, word_dropout)
from tfmm.towers import BACKBONES, image_tower, preset_text_tower
from tests.test_ctr import (ENV, _error_line, _kill_after_backup, _refused, _torn_backup,
                            blank_content, damaged_copy, own_data_dir)

pytestmark = pytest.mark.slow  # trains models or runs the CLIs


@pytest.fixture(scope="module")
def own_dir(tmp_path_factory):
    return own_data_dir(tmp_path_factory.mktemp("own"))


def test_cli_trains_exports_and_indexes(tiny_dir, tmp_path):
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "tfmm.train", "--flagfile=configs/pretrain.flags",
           f"--data_dir={tiny_dir}", f"--model_dir={runs}/model", f"--export_dir={runs}/export",
           f"--index={runs}/index.db", "--epochs=1", "--batch_size=32", "--queue_size=128",
           "--dim=16", "--min_steps=0"]
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
    assert result["test_pairs"] == len(positives)

    # The label-free check is that of the indexed vectors, over the whole catalogue.
    ids = index.ids()
    every, _ = index.get(ids)
    truth = np.load(f"{tiny_dir}/truth.npz")["category"]
    assert result["neighbours_same_category@10"] == pytest.approx(
        neighbours_same_label(every, truth[ids - schema.FIRST_ID]), abs=1e-6)
    assert result["neighbours_same_category@10_chance"] == pytest.approx(
        same_label_chance(truth), abs=1e-9)
    assert result["neighbours_items"] == len(ids) and result["items_without_content"] == 0


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
           "--queue_size=32", "--dim=8", "--epochs=3", "--batch_size=16", "--min_steps=0"]
    assert _kill_after_backup(cmd, tmp_path / "m", 1) == [1]
    first = json.load(open(tmp_path / "m" / "epochs.json"))[0]["loss"]
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Epoch 1/3" not in rerun.stdout and "Epoch 2/3" in rerun.stdout
    loss = json.load(open(tmp_path / "m" / "metrics.json"))["history"]["loss"]
    assert len(loss) == 3 and loss[0] == first


def test_a_kill_while_the_backup_is_written_resumes(tiny_dir, tmp_path):
    cmd = [sys.executable, "-m", "tfmm.train", "--task=pretrain", f"--data_dir={tiny_dir}",
           f"--model_dir={tmp_path}/m", "--export_dir=", "--index=", "--modality=text",
           "--queue_size=32", "--dim=8", "--epochs=3", "--batch_size=16"]
    assert _torn_backup(cmd, tmp_path / "m", 2) == [1, 2]
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Epoch 1/3" not in rerun.stdout and "Epoch 2/3" in rerun.stdout
    assert len(json.load(open(tmp_path / "m" / "metrics.json"))["history"]["loss"]) == 3
    assert [e["epoch"] for e in json.load(open(tmp_path / "m" / "epochs.json"))] == [1, 2, 3]


def test_damaged_data_and_an_unreachable_index_are_one_line_before_anything_is_written(
        tiny_dir, tmp_path):
    data_dir = damaged_copy(tiny_dir, tmp_path, lambda m: m["counts"].update(
        {"pretrain/train": 700}))
    cmd = [sys.executable, "-m", "tfmm.train", "--task=pretrain", f"--model_dir={tmp_path}/m",
           f"--export_dir={tmp_path}/e", "--modality=text", "--dim=8", "--epochs=1"]
    assert _refused(cmd + [f"--data_dir={data_dir}", f"--index={tmp_path}/i.db"]) == (
        f"--data_dir: {data_dir}/metadata.json counts 700 records of pretrain/train, its files "
        "hold 600; the data directory is damaged: prepare or generate it again.")
    proc = subprocess.run(
        cmd + [f"--data_dir={tiny_dir}", "--index=redis://:pw-s3cret@127.0.0.1:1/0"],
        capture_output=True, text=True, env=ENV)
    assert _error_line(proc).startswith("--index: Redis index at 127.0.0.1:1 is unreachable: ")
    assert "pw-s3cret" not in proc.stdout + proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged"]


@pytest.mark.parametrize("objective, modality, queue, triplet", [
    ("random", "image", 0, 0.0), ("generic", "image", 0, 0.0), ("generic", "text", 0, 0.0),
    ("scl", "text", 64, 1.0),
])
def test_objectives_run(tiny_dir, tmp_path, objective, modality, queue, triplet):
    result = run(PretrainConfig(data_dir=tiny_dir, model_dir=str(tmp_path), objective=objective,
                                modality=modality, queue_size=queue, triplet_weight=triplet,
                                epochs=1, batch_size=32, dim=8, min_steps=0, verbose=0))
    assert 0.0 <= result["acc@1"] <= result["acc@5"] <= 1.0
    assert json.load(open(tmp_path / "metrics.json"))["acc@5"] == result["acc@5"]


def test_the_untrained_towers_checks_are_recorded_in_the_index(tiny_dir, tmp_path):
    settings = dict(data_dir=tiny_dir, modality="text", epochs=1, batch_size=32, dim=8,
                    min_steps=0, verbose=0, seed=3)
    untrained = run(PretrainConfig(model_dir=str(tmp_path / "r"), objective="random",
                                   index=str(tmp_path / "r.db"), **settings))
    trained = run(PretrainConfig(model_dir=str(tmp_path / "s"), objective="scl",
                                 index=str(tmp_path / "s.db"), **settings))
    # The scl run's reference is its own tower before training: the random run's, same seed.
    for k in ("acc@1", "acc@5", "neighbours_same_category@10"):
        assert trained[f"{k}_untrained"] == pytest.approx(untrained[k], abs=1e-9)
    assert "acc@1_untrained" not in untrained
    for path, result in ((tmp_path / "r.db", untrained), (tmp_path / "s.db", trained)):
        assert open_index(str(path)).description() == encoder_checks.record(result)


@pytest.mark.parametrize("objective, modality", [
    ("generic", "image"), ("random", "image"), ("generic", "text"), ("random", "text"),
])
def test_cli_pretrains_a_data_dir_without_triplets(own_dir, tmp_path, objective, modality):
    cmd = [sys.executable, "-m", "tfmm.train", "--task=pretrain", f"--data_dir={own_dir}",
           f"--model_dir={tmp_path}/m", "--export_dir=", f"--index={tmp_path}/index.db",
           f"--objective={objective}", f"--modality={modality}", "--triplet_weight=0",
           "--queue_size=0", "--epochs=1", "--batch_size=32", "--dim=8", "--min_steps=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"no test pairs in {own_dir} (no table 'pretrain/test')" in proc.stdout
    assert f"pre-training: {objective}" in proc.stdout
    result = json.load(open(tmp_path / "m" / "metrics.json"))
    assert result["test_pairs"] == 0 and "acc@1" not in result
    num_items = schema.read_metadata(own_dir)["counts"]["items"]
    assert result["index_items"] == result["neighbours_items"] == num_items
    assert 0.0 <= result["neighbours_same_category@10"] <= 1.0
    assert result["neighbours_same_category@10_chance"] == pytest.approx(
        same_label_chance(next(iter(data.items(own_dir, batch_size=num_items)))
                          ["category_id"].numpy()), abs=1e-9)
    if objective == "random":
        assert result["neighbours_same_category@10"] == result[
            "neighbours_same_category@10_untrained"]
    else:
        assert len(result["history"]["loss"]) == 1


def test_scl_without_triplets_says_what_to_run(own_dir, tmp_path):
    line = _refused([sys.executable, "-m", "tfmm.train", "--task=pretrain",
                     f"--data_dir={own_dir}", f"--model_dir={tmp_path}/m",
                     f"--index={tmp_path}/index.db", "--objective=scl"])
    assert line == (
        f"--objective=scl needs query -> item pairs: {own_dir} has no table 'pretrain/train' "
        "or 'pretrain/test'; make them with `python -m tfmm.data.prepare --pairs=FILE` (your "
        "pairs) or `--pairs_from=clicks` (from behaviour), or pre-train on the items alone: "
        "--objective=image_title (images and titles) or --objective=generic --triplet_weight=0.")
    assert not os.listdir(tmp_path)


def test_generic_pretraining_beats_the_untrained_tower_on_the_label_free_check(own_dir,
                                                                               tmp_path):
    # Images, 10 epochs: at 1 epoch (7 steps) the untrained tower, which already groups
    # shapes (~0.58, chance 0.25), is as often ahead; titles are no better (their one
    # category word among four does not lead the generic objective, whatever the length).
    result = run(PretrainConfig(data_dir=own_dir, model_dir=str(tmp_path), objective="generic",
                                queue_size=0, triplet_weight=0.0, epochs=10, batch_size=32,
                                dim=16, min_steps=0, verbose=0))
    key = "neighbours_same_category@10"
    assert result[key] > result[f"{key}_untrained"] > result[f"{key}_chance"] + 0.2, result


def test_items_without_content_are_skipped_and_counted(own_dir, tmp_path, capsys):
    data_dir = str(tmp_path / "data")
    shutil.copytree(own_dir, data_dir)
    no_image, no_title = [2, 5, 9], [5, 11]
    blank_content(data_dir, images=no_image, titles=no_title)
    num_items = schema.read_metadata(data_dir)["counts"]["items"]
    for modality, missing in (("image", no_image), ("text", no_title)):
        index = tmp_path / f"{modality}.db"
        config = PretrainConfig(data_dir=data_dir, model_dir=str(tmp_path / modality),
                                index=str(index), modality=modality, objective="generic",
                                queue_size=0, triplet_weight=0.0, epochs=1, batch_size=32,
                                dim=8, min_steps=0, verbose=0)
        result = run(config)
        what = "image" if modality == "image" else "title"
        assert (f"{len(missing)} of {num_items} items have no {what}: not embedded, so not in "
                "the index" in capsys.readouterr().out)
        assert result["items_without_content"] == len(missing)
        assert result["index_items"] == result["neighbours_items"] == num_items - len(missing)
        ids = SQLiteIndex(index).ids()
        assert len(ids) == num_items - len(missing) and not set(missing) & set(ids)
        # The CTR reader's snapshot flags them missing.
        present = SQLiteIndex(index).snapshot(num_items + schema.FIRST_ID).present
        assert not present[missing].any() and present[ids].all()
        # Training pairs never show them.
        batches = training_data(config, Catalogue(data_dir))
        seen = np.concatenate([b["positive_id"].numpy() for b in batches.take(30)])
        assert not set(missing) & set(seen) and len(set(seen)) > 100


def test_sources_follow_the_content_the_items_have(own_dir, tmp_path):
    data_dir = str(tmp_path / "data")
    shutil.copytree(own_dir, data_dir)
    catalogue = Catalogue(data_dir)
    catalogue.has_image[:] = False  # as prepared without --images_dir
    config = PretrainConfig(data_dir=data_dir, model_dir="unused")
    with pytest.raises(SettingsError, match="--modality=image: no item in .* has an image; "
                                            "use --modality=text"):
        choose_source(config, catalogue)
    # Titles only: no image <-> title pairs; the click pairs of the impressions, centred.
    chosen, source = choose_source(config, catalogue, fallback=True)
    assert (chosen.objective, chosen.modality, chosen.pairs_from, chosen.center_vectors) == (
        "scl", "text", "clicks", True)
    assert source == ("SCL on the 751 click pairs of the training impressions (a click and the "
                      "same user's next click); text tower, centred (no item has an image, no "
                      "triplets for SCL)")
    # Too few clicks for a batch: the generic objective on the titles.
    chosen, source = choose_source(dataclasses.replace(config, batch_size=1024), catalogue,
                                   fallback=True)
    assert (chosen.objective, chosen.modality, chosen.triplet_weight) == ("generic", "text", 0.0)
    assert source == ("generic, on the 240 item titles (two word-dropout views of a title are "
                      "a pair); text tower (no item has an image, no triplets for SCL)")
    catalogue.has_title[:] = False
    with pytest.raises(SettingsError, match="no item has an image or a title"):
        choose_source(config, catalogue, fallback=True)


def test_text_scl_learns_synonyms(tiny_dir, tmp_path):
    random = run(PretrainConfig(data_dir=tiny_dir, model_dir=str(tmp_path / "r"), modality="text",
                                objective="random", queue_size=0, triplet_weight=0.0, verbose=0))
    trained = run(PretrainConfig(data_dir=tiny_dir, model_dir=str(tmp_path / "s"), modality="text",
                                 queue_size=0, epochs=15, batch_size=60, learning_rate=3e-3,
                                 min_steps=0, verbose=0))
    assert trained["acc@5"] > random["acc@5"] + 0.2, (random["acc@5"], trained["acc@5"])
    # ... and groups items by category better than the untrained tower (0.78 against 0.68).
    key = "neighbours_same_category@10"
    assert trained[key] > trained[f"{key}_untrained"] + 0.05, trained
    assert random[key] == random[f"{key}_untrained"]


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
    ({"queue_size": -128}, "--queue_size=-128 must be >= 0"),
    ({"learning_rate": 0.0}, "--learning_rate=0.0 must be > 0"),
    # A config backbone is randomly initialised: frozen, only the head would learn.
    ({"freeze_backbone": True}, "--freeze_backbone keeps a pretrained backbone's weights, "
     "but --backbone=resnet_tiny is a config backbone, randomly initialised"),
    ({"freeze_backbone": True, "modality": "text", "backbone": "resnet_small"},
     "but --backbone=resnet_small is a config backbone"),
])
def test_bad_config(tiny_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        PretrainConfig(data_dir=tiny_dir, model_dir="unused", **kwargs).validate()


# Pretrained backbones: tiny ones saved by KerasHub's own save_to_preset, loaded by --backbone=DIR.
WORDS = ["red", "blue", "mug", "pillow", "lamp"]


def save_resnet_preset(path):
    """A tiny ResNet preset with an ImageNet-style converter at 24x24; returns its backbone."""
    backbone = keras_hub.models.ResNetBackbone(**BACKBONES["resnet_tiny"],
                                               image_shape=(None, None, 3))
    backbone.save_to_preset(str(path))
    keras_hub.layers.ResNetImageConverter(
        image_size=(24, 24), scale=[1 / (255 * s) for s in (0.229, 0.224, 0.225)],
        offset=[-m / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))],
    ).save_to_preset(str(path))
    return backbone


def save_clip_preset(path):
    """A tiny CLIP preset (vision, text, BPE tokenizer of WORDS, converter); returns it."""
    vocabulary = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789":  # every title and query tokenises
        vocabulary.update({c: len(vocabulary), c + "</w>": len(vocabulary) + 1})
    merges = []
    for word in WORDS:  # each word merged left to right into one token
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        for s in symbols:
            vocabulary.setdefault(s, len(vocabulary))
        for s in symbols[1:]:
            merges.append(f"{symbols[0]} {s}")
            symbols[0] += s
            vocabulary.setdefault(symbols[0], len(vocabulary))
    vision = keras_hub.models.CLIPVisionEncoder(
        patch_size=8, hidden_dim=16, num_layers=1, num_heads=2, intermediate_dim=32,
        image_shape=(32, 32, 3))
    text = keras_hub.models.CLIPTextEncoder(
        vocabulary_size=len(vocabulary), embedding_dim=16, hidden_dim=16, num_layers=1,
        num_heads=2, intermediate_dim=32, max_sequence_length=8)
    backbone = keras_hub.models.CLIPBackbone(vision_encoder=vision, text_encoder=text,
                                             projection_dim=8)
    backbone.save_to_preset(str(path))
    tokenizer = keras_hub.models.CLIPTokenizer(vocabulary=vocabulary, merges=merges)
    converter = keras_hub.layers.CLIPImageConverter(
        image_size=(32, 32), interpolation="bicubic",
        scale=[1 / (255 * s) for s in (0.2686, 0.2613, 0.2758)],
        offset=[-m / s for m, s in zip((0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758))])
    keras_hub.models.CLIPPreprocessor(tokenizer=tokenizer, image_converter=converter,
                                      sequence_length=8).save_to_preset(str(path))
    return backbone


@pytest.fixture(scope="module")
def resnet_preset(tmp_path_factory):
    path = tmp_path_factory.mktemp("resnet_preset")
    return str(path), save_resnet_preset(path)


@pytest.fixture(scope="module")
def clip_preset(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip_preset")
    return str(path), save_clip_preset(path)


def _same_weights(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def _backbone(tower):
    return next(layer for layer in tower.layers if isinstance(layer, keras_hub.models.Backbone))


def test_preset_image_tower_loads_weights_and_preprocessing(resnet_preset, clip_preset):
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3)).astype("uint8")
    for path, saved, encoder in [(*resnet_preset, resnet_preset[1]),
                                 (*clip_preset, clip_preset[1].vision_encoder)]:
        tower = image_tower(path, dim=8)
        loaded = _backbone(tower)
        assert type(loaded) is type(encoder)  # CLIP: the vision encoder alone
        assert _same_weights(loaded.get_weights(), encoder.get_weights())
        # The comparison can fail: a fresh init of the same architecture differs.
        fresh = type(encoder).from_config(encoder.get_config())
        assert not _same_weights(fresh.get_weights(), encoder.get_weights())
        # The preset's converter sets size and normalisation: what the backbone sees is
        # KerasHub's own converter's output on the images.
        seen = keras.Model(tower.input, tower.get_layer("resize").output)
        converter = keras_hub.layers.ImageConverter.from_preset(path)
        want = converter(images.astype("float32"))
        got = seen.predict_on_batch(images)
        assert got.shape == want.shape and got.shape[1] in (24, 32)
        np.testing.assert_allclose(got, want, atol=1e-3)


def test_preset_text_tower_is_clips_text_encoder_on_its_tokenizer(clip_preset):
    path, saved = clip_preset
    tower = preset_text_tower(path, dim=8)
    loaded = _backbone(tower)
    assert isinstance(loaded, keras_hub.models.CLIPTextEncoder)
    assert _same_weights(loaded.get_weights(), saved.text_encoder.get_weights())
    ids = keras.Model(tower.input, tower.get_layer("tokenize").output[0])
    got = ids.predict_on_batch(np.array(["Red mug", "blue lamp"], object))
    tokenizer = keras_hub.tokenizers.Tokenizer.from_preset(path)
    red, mug, blue, lamp = (tokenizer.token_to_id(w + "</w>") for w in ("red", "mug", "blue",
                                                                       "lamp"))
    start, end = tokenizer.start_token_id, tokenizer.end_token_id  # lowercased, as CLIP's
    assert got.tolist() == [[start, red, mug, end, 0, 0, 0, 0],
                            [start, blue, lamp, end, 0, 0, 0, 0]]


def _cli(tiny_dir, runs, *flags):
    cmd = [sys.executable, "-m", "tfmm.train", "--task=pretrain", f"--data_dir={tiny_dir}",
           f"--model_dir={runs}/model", f"--export_dir={runs}/export", f"--index={runs}/index.db",
           "--epochs=1", "--batch_size=32", "--queue_size=64", "--dim=8", "--min_steps=0", *flags]
    # A proxy that refuses: a preset name fails fast, here or on a machine with network.
    env = dict(ENV, HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


@pytest.mark.parametrize("freeze", [True, False])
def test_cli_trains_on_a_preset_directory(tiny_dir, tmp_path, resnet_preset, freeze):
    path, saved = resnet_preset
    proc = _cli(tiny_dir, tmp_path, f"--backbone={path}", f"--freeze_backbone={freeze}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    export = json.load(open(tmp_path / "model" / "metrics.json"))["export_path"]
    loaded = tf.saved_model.load(export)
    exported = [v.numpy() for v in loaded.variables]
    kept = [any(w.shape == v.shape and np.array_equal(w, v) for v in exported)
            for w in saved.get_weights()]
    # Frozen: every backbone weight (BatchNorm statistics too) as saved; else trained.
    assert all(kept) if freeze else sum(kept) < len(kept) / 2, kept
    # The export is the tower that wrote the index.
    items = next(iter(data.items(tiny_dir, batch_size=16)))
    vectors = loaded.signatures["serving_default"](image=items["image"])["vector"].numpy()
    stored, found = SQLiteIndex(tmp_path / "index.db").get(items["item_id"].numpy())
    assert found.all()
    np.testing.assert_allclose(stored, vectors, atol=1e-5)


def test_cli_text_tower_from_clip_preset(tiny_dir, tmp_path, clip_preset):
    path, _ = clip_preset
    refused = _error_line(_cli(tiny_dir, tmp_path, f"--backbone={path}", "--modality=text"))
    assert refused.startswith(f"--backbone={path} --modality=text: the preset's tokenizer runs "
                              "tensorflow-text ops") and "set --export_dir=''" in refused
    assert not os.path.exists(tmp_path / "model")
    proc = _cli(tiny_dir, tmp_path, f"--backbone={path}", "--modality=text", "--export_dir=")
    assert proc.returncode == 0, proc.stderr[-3000:]
    index = SQLiteIndex(tmp_path / "index.db")
    assert len(index.ids()) == schema.read_metadata(tiny_dir)["counts"]["items"]
    assert json.load(open(tmp_path / "model" / "metrics.json"))["config"]["backbone"] == path


@pytest.mark.parametrize("backbone, message", [
    ("resnet_tinny", "--backbone='resnet_tinny' is neither a config name ['resnet_small', "
                     "'resnet_tiny'], a KerasHub preset name nor a preset directory."),
    ("resnet_18_imagenet", "--backbone='resnet_18_imagenet': the KerasHub preset could not be "
                           "loaded (offline? built-in presets download their weights): "),
])
def test_bad_backbones_are_one_line(tiny_dir, tmp_path, backbone, message):
    assert _error_line(_cli(tiny_dir, tmp_path, f"--backbone={backbone}")).startswith(message)
    assert not os.path.exists(tmp_path / "model")


@pytest.fixture(scope="module")
def clicks_dir(tmp_path_factory):
    """The tiny world's raw export prepared with pairs from its clicks (no triplets)."""
    tmp = tmp_path_factory.mktemp("clicks")
    world = world_lib.generate(world_lib.PRESETS["tiny"])
    write_raw(world, tmp / "raw")
    prepare(PrepareOptions(str(tmp / "raw" / "impressions.csv"), str(tmp / "raw" / "items.csv"),
                           str(tmp / "data"), str(tmp / "raw" / "images"),
                           split_timestamp=world_lib.T0 + world.config.train_days * world_lib.DAY,
                           pairs_from="clicks"))
    return str(tmp / "data")


def with_copied_queries(data_dir, out):
    """`data_dir` as tfmm-logs/1 wrote it: each click pair holds a copy of its query item's
    image and title, and no query_item_id."""
    shutil.copytree(data_dir, out)
    content = {}
    for r in tf.data.TFRecordDataset(os.path.join(out, "items.tfrecord")):
        f = tf.train.Example.FromString(r.numpy()).features.feature
        content[f["item_id"].int64_list.value[0]] = (f["image"].bytes_list.value[0],
                                                     f["title"].bytes_list.value[0].decode())
    for split in ("train", "test"):
        path = os.path.join(out, f"pretrain-{split}.tfrecord")
        pairs = [tf.train.Example.FromString(r.numpy()).features.feature
                 for r in tf.data.TFRecordDataset(path)]
        with tf.io.TFRecordWriter(path) as w:
            for f in pairs:
                w.write(schema.triplet_example(
                    *content[f["query_item_id"].int64_list.value[0]],
                    f["positive_item_id"].int64_list.value[0],
                    f["negative_item_id"].int64_list.value[0]))
    meta = json.load(open(os.path.join(out, "metadata.json")))
    json.dump(dict(meta, format="tfmm-logs/1"), open(os.path.join(out, "metadata.json"), "w"))
    return str(out)


def test_click_pairs_name_their_query_item_and_train_as_copies_did(clicks_dir, tmp_path):
    catalogue = Catalogue(clicks_dir)
    meta = schema.read_metadata(clicks_dir)
    for split in ("train", "test"):
        pairs = [tf.io.parse_single_example(r, schema.triplet_spec()) for r in
                 tf.data.TFRecordDataset(schema.files(clicks_dir, meta, f"pretrain/{split}"))]
        assert len(pairs) == meta["counts"][f"pretrain/{split}"] > 0
        # No image (or title) bytes in any pair: the query is a catalogue item, by id.
        assert {(p["query_image"].numpy(), p["query_text"].numpy()) for p in pairs} == {
            (b"", b"")}
        assert (catalogue.row[[int(p["query_item_id"]) for p in pairs]] >= 0).all()

    # A data dir whose pairs copy the query's content (older tfmm) is still read, and
    # pre-training gets the same batches and the same Acc@N from both.
    copied = with_copied_queries(clicks_dir, tmp_path / "copied")
    for modality in ("image", "text"):
        config = PretrainConfig(data_dir=clicks_dir, model_dir="unused", modality=modality,
                                batch_size=32, dim=8, image_size=32)
        old = dataclasses.replace(config, data_dir=copied)
        batches = zip(training_data(config, catalogue).take(4),
                      training_data(old, Catalogue(copied)).take(4))
        for new_batch, old_batch in batches:
            assert new_batch.keys() == old_batch.keys()
            for k in new_batch:
                np.testing.assert_array_equal(new_batch[k], old_batch[k], err_msg=k)
            assert len({bytes(q) for q in new_batch["query"].numpy()}) > 8  # real content
        tower = build_tower(config, catalogue)()
        one = distribute.distribution("none")
        assert (evaluate(config, tower, catalogue, one)
                == evaluate(old, tower, Catalogue(copied), one))


def test_centring_spreads_the_narrow_cone_of_click_pair_vectors(clicks_dir, tmp_path):
    config = PretrainConfig(data_dir=clicks_dir, model_dir=str(tmp_path / "plain"),
                            index=str(tmp_path / "plain.db"), queue_size=0, epochs=2,
                            batch_size=32, dim=16, min_steps=0, center_vectors=False,
                            verbose=0)
    run(config)
    # Centred by the library's default: the pairs come from clicks.
    result = run(dataclasses.replace(config, model_dir=str(tmp_path / "centred"),
                                     index=str(tmp_path / "centred.db"), center_vectors=None,
                                     export_dir=str(tmp_path / "export")))
    assert result["config"]["center_vectors"] is True
    plain_index, index = SQLiteIndex(tmp_path / "plain.db"), SQLiteIndex(tmp_path / "centred.db")
    ids = index.ids()
    plain, _ = plain_index.get(ids)
    vectors, _ = index.get(ids)

    def mean_cosine(v):  # over distinct pairs of unit vectors
        return float((np.square(v.sum(axis=0)).sum() - len(v)) / (len(v) * (len(v) - 1)))

    # Click pairs alone: every item in one narrow cone; centred: spread around the sphere.
    assert mean_cosine(plain) > 0.9 and abs(mean_cosine(vectors)) < 0.01, (
        mean_cosine(plain), mean_cosine(vectors))
    # The same training (one seed) then the catalogue's mean taken off.
    want = plain - plain.mean(axis=0)
    np.testing.assert_allclose(vectors, want / np.linalg.norm(want, axis=1, keepdims=True),
                               atol=2e-4)
    # The exported encoder centres too, so new items land where the index's do.
    encoder = tf.saved_model.load(result["export_path"]).signatures["serving_default"]
    items = next(iter(data.items(clicks_dir, batch_size=len(ids))))
    stored, _ = index.get(items["item_id"].numpy())
    np.testing.assert_allclose(encoder(image=items["image"])["vector"].numpy(), stored,
                               atol=1e-5)
