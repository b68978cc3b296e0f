"""Image <-> title pre-training (`tfmm.image_title`) and the sources pre-training chooses."""

import collections
import dataclasses
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfmm import data, image_title
from tfmm.data import schema
from tfmm.data.pairs import click_pairs
from tfmm.index import SQLiteIndex
from tfmm.pretrain import Catalogue, PretrainConfig, SettingsError, choose_source, run
from tfmm.serving.encoding import Encoder, IndexSink, embed_catalogue
from tfmm.towers import image_tower, text_tower
from tests.test_ctr import ENV, _error_line, blank_content, own_data_dir
from tests.test_pretrain import clicks_dir  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def own_dir(tmp_path_factory):
    return own_data_dir(tmp_path_factory.mktemp("own"))


def test_fuse_is_the_unit_sum_of_the_modalities_an_item_has():
    image_vectors = np.array([[1, 0], [1, 0], [1, 0], [1, 0]], np.float32)
    title_vectors = np.array([[0, 1], [0, 1], [0, 1], [0, 1]], np.float32)
    images = np.zeros((4, 2, 2, 3), np.uint8)
    images[[0, 1], 1, 1, 2] = 7  # items 0 and 1 have an image; 2 and 3 send zeros
    titles = np.array([b"red mug", b"  ", b"blue hat", b""], object)
    fused = image_title.Fuse()([image_vectors, title_vectors, images, titles]).numpy()
    r = np.sqrt(0.5)
    np.testing.assert_allclose(fused, [[r, r], [1, 0], [0, 1], [0, 0]], atol=1e-7)
    np.testing.assert_allclose(
        image_title.fuse(image_vectors, title_vectors, [1, 1, 0, 0], [1, 0, 1, 0]), fused,
        atol=1e-7)
    layer = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(image_title.Fuse(name="f")))
    assert isinstance(layer, image_title.Fuse) and layer.name == "f"


def test_held_out_items_have_both_modalities_and_never_train():
    ids = np.arange(2, 102)
    has_image, has_title = ids % 7 != 0, ids % 5 != 0
    train, held = image_title.split_items(ids, has_image, has_title, seed=3)
    both = set(ids[has_image & has_title].tolist())
    assert set(train) | set(held) == both and not set(train) & set(held)
    assert len(held) == round(0.1 * len(both)) == 7
    again = image_title.split_items(ids, has_image, has_title, seed=3)
    assert [a.tolist() for a in again] == [train.tolist(), held.tolist()]
    assert image_title.split_items(ids, has_image, has_title, seed=4)[1].tolist() != held.tolist()


def _towers(dim=8):
    vocabulary = ["red", "blue", "mug", "hat", "striped"]
    return (image_tower("resnet_tiny", dim, input_size=16, image_size=16),
            text_tower(vocabulary, dim))


def _batches(n, batch_size, seed=0):
    rng = np.random.default_rng(seed)
    words = np.array(["red", "blue"]), np.array(["mug", "hat"])
    for _ in range(n):
        colour, noun = rng.integers(2, size=batch_size), rng.integers(2, size=batch_size)
        images = np.zeros((batch_size, 16, 16, 3), np.uint8)
        images[:, :, :, 0] = 200 * colour[:, None, None]
        images[:, :8, :, 2] = 200 * noun[:, None, None]
        titles = np.array([f"{words[0][c]} {words[1][k]}" for c, k in zip(colour, noun)], object)
        yield {"image": images, "title": titles,
               "item_id": (2 + 2 * colour + noun + 4 * rng.integers(8, size=batch_size))}


def test_the_queue_holds_both_keys_and_a_frozen_tower_stays_as_built():
    keras.utils.set_random_seed(0)
    images, texts = _towers()
    before = [w.copy() for w in texts.get_weights()]
    model = image_title.ImageTitleModel(images, texts, queue_size=32, momentum=0.9,
                                        train="image")
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    batches = list(_batches(6, 8))
    image_start = [w.copy() for w in images.get_weights()]
    model.fit(tf.data.Dataset.from_generator(lambda: iter(batches), output_signature={
        "image": tf.TensorSpec((8, 16, 16, 3), tf.uint8), "title": tf.TensorSpec((8,), tf.string),
        "item_id": tf.TensorSpec((8,), tf.int64)}), epochs=1, steps_per_epoch=6, verbose=0)
    for a, b in zip(before, texts.get_weights()):
        np.testing.assert_array_equal(a, b)  # the frozen text tower
    assert any(not np.array_equal(a, b) for a, b in zip(image_start, images.get_weights()))
    # 6 batches of 8 into a queue of 32: the last 4 batches' ids, in order from slot 16.
    ids = model.queue.ids.numpy()
    expected = np.concatenate([b["item_id"] for b in batches[2:]])
    np.testing.assert_array_equal(np.roll(ids, -16), expected)
    # Each row: the key image tower's vector, then the (frozen) text tower's of its title.
    keys = model.queue.keys.numpy()
    last = batches[-1]
    np.testing.assert_allclose(keys[8:16, 8:], texts.predict_on_batch(last["title"]), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(keys[:, :8], axis=1), 1.0, rtol=1e-4)


def test_loss_decreases_on_pairs_that_tell_colour_and_noun():
    keras.utils.set_random_seed(0)
    model = image_title.ImageTitleModel(*_towers(), temperature=0.1)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    batches = list(_batches(40, 16))
    first = model.test_step({k: tf.constant(v) for k, v in batches[0].items()})["loss"]
    for batch in batches:
        model.train_on_batch(batch)
    model.reset_metrics()
    last = model.test_step({k: tf.constant(v) for k, v in batches[0].items()})["loss"]
    assert float(last) < float(first) - 0.5, (float(first), float(last))


@pytest.mark.slow
def test_image_title_pretraining_learns_and_its_export_is_the_index(own_dir, tmp_path):
    data_dir = str(tmp_path / "data")
    shutil.copytree(own_dir, data_dir)
    no_image, no_title, neither = [2, 5, 9], [11, 14], [20]
    blank_content(data_dir, images=no_image + neither, titles=no_title + neither)
    config = PretrainConfig(data_dir=data_dir, model_dir=str(tmp_path / "m"),
                            export_dir=str(tmp_path / "export"), index=str(tmp_path / "index.db"),
                            objective="image_title", queue_size=64, epochs=8, batch_size=32,
                            dim=16, min_steps=0, verbose=0)
    result = run(config)
    loss = result["history"]["loss"]
    assert len(loss) == 8 and loss[-1] < loss[0] - 1.0, loss
    # Acc@N of held-out items' images against their titles: 10% of the 234 with both.
    assert result["test_pairs"] == 23 and result["acc_pairs"] == "held-out items: image -> title"
    assert result["acc@5"] > 3 * 5 / 23, result  # chance: 5 of 23
    key = "neighbours_same_category@10"
    assert result[key] > result[f"{key}_untrained"] + 0.1, result
    # Every item with an image or a title has a fused vector; the one with neither none.
    index = SQLiteIndex(tmp_path / "index.db")
    num_items = schema.read_metadata(data_dir)["counts"]["items"]
    assert sorted(index.ids()) == [i for i in range(2, 2 + num_items) if i not in neither]
    assert result["items_without_content"] == 1 and result["index_items"] == num_items - 1

    # The exported encoder gives the vectors the index holds, items lacking one modality too.
    items = next(iter(data.items(data_dir, batch_size=num_items)))
    ids = items["item_id"].numpy()
    serve = tf.saved_model.load(result["export_path"]).signatures["serving_default"]
    exported = serve(image=items["image"], text=items["title"])["vector"].numpy()
    stored, found = index.get(ids)
    assert found.tolist() == [i not in neither for i in ids]
    np.testing.assert_allclose(exported[found], stored[found], atol=1e-6)
    row = {i: k for k, i in enumerate(ids)}
    image_only, title_only = exported[[row[i] for i in no_title]], exported[
        [row[i] for i in no_image]]
    np.testing.assert_allclose(np.linalg.norm(exported[found], axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(image_only, title_only[:2])

    # The encoder service and the catalogue job read the fused export: same vectors.
    encoder = Encoder(result["export_path"])
    assert (encoder.modality, encoder.image_size, encoder.dim) == ("fused", (64, 64), 16)
    event = {"item_id": 5, "image": b"", "title": items["title"].numpy()[row[5]].decode()}
    np.testing.assert_allclose(encoder([encoder.content(event)])[0], stored[row[5]], atol=1e-6)
    sink = IndexSink(str(tmp_path / "again.db"), 16, schema.catalogue_fingerprint(data_dir))
    counts = embed_catalogue(encoder, data_dir, sink, batch_size=64, verbose=0)
    assert (counts["embedded"], counts["without_content"]) == (num_items - 1, 1)
    again, _ = SQLiteIndex(tmp_path / "again.db").get(ids[found])
    np.testing.assert_allclose(again, stored[found], atol=1e-6)


@pytest.mark.slow
def test_click_pairs_mined_from_impressions_are_prepares(clicks_dir):  # noqa: F811
    first, second = click_pairs(clicks_dir, "train")
    mined = collections.Counter(zip(first.tolist(), second.tolist()))
    prepared = collections.Counter()
    for batch in data.triplets(clicks_dir, "train", batch_size=512):
        prepared.update(zip(batch[schema.QUERY_ITEM].numpy().tolist(),
                            batch["positive_item_id"].numpy().tolist()))
    assert sum(mined.values()) > 500 and mined == prepared


@pytest.mark.slow
def test_image_title_with_click_pairs_trains_the_item_vectors(clicks_dir, tmp_path):  # noqa: F811
    result = run(PretrainConfig(data_dir=clicks_dir, model_dir=str(tmp_path),
                                objective="image_title", pairs_from="clicks", queue_size=0,
                                epochs=2, batch_size=32, dim=8, min_steps=0, verbose=0))
    first, _ = click_pairs(clicks_dir, "train")
    assert result["source"] == (
        f"image_title, on the 216 items with an image and a title (24 held out for Acc@N), and "
        f"the {len(first)} click pairs of the training impressions (a click and the same "
        "user's next click); both towers' vectors fused")
    history = result["history"]
    assert len(history["behaviour_pairs"]) == 2 and history["behaviour_pairs"][-1] > 0
    np.testing.assert_allclose(
        history["loss"], (np.add(history["image_to_title"], history["title_to_image"]) / 2
                          + history["behaviour_pairs"]), rtol=1e-5)


@pytest.mark.slow
def test_sources_the_ctr_job_falls_back_to(own_dir, tiny_dir, tmp_path):
    catalogue = Catalogue(own_dir)
    config = PretrainConfig(data_dir=own_dir, model_dir="unused", batch_size=32)
    # Images and titles, no triplets: image <-> title.
    chosen, source = choose_source(config, catalogue, fallback=True)
    assert (chosen.objective, chosen.index_vector) == ("image_title", "fused")
    assert source == ("image_title, on the 216 items with an image and a title (24 held out "
                      "for Acc@N); both towers' vectors fused (no triplets for SCL)")
    # The world's triplets: SCL on them.
    chosen, source = choose_source(dataclasses.replace(config, data_dir=tiny_dir),
                                   Catalogue(tiny_dir), fallback=True)
    assert chosen.objective == "scl" and source.startswith("SCL on the 600 triplets")
    # Images only: SCL on the impressions' click pairs, centred (as such pairs need).
    catalogue.has_title[:] = False
    chosen, source = choose_source(config, catalogue, fallback=True)
    assert (chosen.objective, chosen.modality, chosen.pairs_from, chosen.center_vectors) == (
        "scl", "image", "clicks", True)
    assert source == ("SCL on the 751 click pairs of the training impressions (a click and the "
                      "same user's next click); image tower, centred (no triplets for SCL)")
    # Asked for explicitly, image_title without titles is one line saying what to do.
    with pytest.raises(SettingsError, match=r"^--objective=image_title needs items with both an "
                       r"image and a title: 0 of 240 in .* have both"):
        choose_source(dataclasses.replace(config, objective="image_title"), catalogue)


@pytest.mark.slow
@pytest.mark.parametrize("flags, message", [
    (["--objective=generic", "--triplet_weight=0", "--pairs_from=clicks"],
     "--pairs_from=clicks mines pairs for --objective=scl or image_title: --objective=generic "
     "takes none."),
    (["--objective=image_title", "--strategy=mirrored"],
     "--objective=image_title trains in one process: --strategy=mirrored is not supported "
     "with it."),
    (["--objective=image_title", "--min_steps=-1"], "--min_steps=-1 must be >= 0."),
])
def test_bad_flags_are_one_line(tiny_dir, tmp_path, flags, message):
    proc = subprocess.run(
        [sys.executable, "-m", "tfmm.train", "--task=pretrain", f"--data_dir={tiny_dir}",
         f"--model_dir={tmp_path}/m", *flags], capture_output=True, text=True, env=ENV)
    assert _error_line(proc) == message
    assert not (tmp_path / "m").exists()
