"""The synthetic world: determinism, no leakage into histories, and its knobs."""

import dataclasses
import filecmp
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tfmm import data
from tfmm.data import schema, world as world_lib
from tfmm.data.synthetic import config_from_flags, write_world

TINY = world_lib.PRESETS["tiny"]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("worlds") / "tiny"
    world = world_lib.generate(TINY)
    write_world(world, out)
    return world, str(out)


def test_same_seed_gives_byte_identical_output(tiny, tmp_path):
    _, first = tiny
    write_world(world_lib.generate(TINY), tmp_path / "again")
    names = sorted(os.listdir(first))
    assert names == sorted(os.listdir(tmp_path / "again"))
    match, mismatch, errors = filecmp.cmpfiles(first, tmp_path / "again", names, shallow=False)
    assert mismatch == [] and errors == [] and len(match) == len(names) >= 7
    write_world(world_lib.generate(dataclasses.replace(TINY, seed=1)), tmp_path / "other")
    assert not filecmp.cmp(os.path.join(first, "impressions-train.tfrecord"),
                           tmp_path / "other" / "impressions-train.tfrecord", shallow=False)


def _read_all(data_dir, split, max_history=None, wanted=None):
    features, labels = [], []
    for f, y in data.impressions(data_dir, split, batch_size=512, max_history=max_history,
                                 features=wanted):
        features.append({k: v.numpy() for k, v in f.items()})
        labels.append(y.numpy())
    return ({k: np.concatenate([f[k] for f in features]) for k in features[0]},
            np.concatenate(labels))


def test_histories_are_earlier_clicks_of_the_same_user(tiny):
    world, path = tiny
    meta = schema.read_metadata(path)
    train, y_train = _read_all(path, "train")
    test, y_test = _read_all(path, "test")
    f = {k: np.concatenate([train[k], test[k]]) for k in train}
    label = np.concatenate([y_train, y_test])
    n = len(label)
    assert n == TINY.num_impressions and meta["counts"]["impressions/train"] == len(y_train)
    ts, mask = f["timestamp"], f["history_mask"]
    # No history item is at or after its impression's timestamp.
    assert (np.where(mask, f["history_timestamps"], 0) < ts[:, None]).all()
    assert mask.sum() > n  # histories are not trivially empty
    # Brute force: the most recent max_history clicks of the user strictly before.
    for i in range(0, n, 37):
        earlier = np.flatnonzero((f["user_id"] == f["user_id"][i]) & (ts < ts[i]) & (label == 1))
        earlier = earlier[np.lexsort((earlier, ts[earlier]))][-TINY.max_history:]
        length = f["history_length"][i]
        np.testing.assert_array_equal(f["history_item_ids"][i, :length], f["item_id"][earlier])
        np.testing.assert_array_equal(f["history_category_ids"][i, :length],
                                      f["category_id"][earlier])
        assert not mask[i, length:].any() and (f["history_item_ids"][i, length:] == 0).all()
    # Test impressions come after every training impression.
    assert train["timestamp"].max() <= test["timestamp"].min()
    # Cold start: new items have no training impression; some are shown at test.
    new = set(test["item_id"][test["is_new_item"] == 1])
    assert new and not new & set(train["item_id"])


def test_short_max_history_keeps_the_most_recent(tiny):
    _, path = tiny
    full, _ = _read_all(path, "train")
    short, _ = _read_all(path, "train", max_history=3)
    for i in np.flatnonzero(full["history_length"] > 3)[:50]:
        length = full["history_length"][i]
        np.testing.assert_array_equal(short["history_item_ids"][i],
                                      full["history_item_ids"][i, length - 3:length])
        assert short["history_mask"][i].all()


@pytest.mark.parametrize("wanted", [["history_category_ids", "item_id"],
                                    ["history_mask", "history_length", "label_free_user"]])
def test_a_feature_subset_reads_the_same_values(tiny, wanted):
    # Lists that no wanted feature needs are not parsed; the others are unchanged.
    _, path = tiny
    full, labels = _read_all(path, "train", max_history=5)
    if "label_free_user" in wanted:
        with pytest.raises(ValueError, match=r"features \['label_free_user'\] are not in"):
            _read_all(path, "train", max_history=5, wanted=wanted)
        wanted = wanted[:-1]
    subset, subset_labels = _read_all(path, "train", max_history=5, wanted=wanted)
    assert sorted(subset) == sorted(wanted)
    for k in wanted:
        np.testing.assert_array_equal(subset[k], full[k])
    np.testing.assert_array_equal(subset_labels, labels)


def test_items_and_triplets(tiny):
    world, path = tiny
    items = next(iter(data.items(path, batch_size=TINY.num_items)))
    assert items["image"].shape == (TINY.num_items, 64, 64, 3)
    ids = items["item_id"].numpy() - schema.FIRST_ID
    np.testing.assert_array_equal(items["category_id"].numpy() - schema.FIRST_ID,
                                  world.category[ids])
    assert [t.decode() for t in items["title"].numpy()[:3]] == world.titles[:3]
    for split, count in (("train", TINY.pretrain_train), ("test", TINY.pretrain_test)):
        t = next(iter(data.triplets(path, split, batch_size=10_000)))
        pos = t["positive_item_id"].numpy() - schema.FIRST_ID
        neg = t["negative_item_id"].numpy() - schema.FIRST_ID
        assert len(pos) == count and t["query_image"].shape[1:] == (64, 64, 3)
        # Hard negatives are near-duplicates: same family, other pattern.
        np.testing.assert_array_equal(world.family[pos], world.family[neg])
        assert (world.pattern[pos] != world.pattern[neg]).all()
        if split == "train":
            assert (world.first_day[pos] == 0).all()
        else:
            assert len(set(pos)) == len(pos)
        text = t["query_text"].numpy()[0].decode().split()
        assert 2 <= len(text) <= 3


def test_vectors_join_with_missing_flag(tiny):
    _, path = tiny
    meta = schema.read_metadata(path)
    num_items = meta["vocab"]["num_items"]
    known = np.arange(schema.FIRST_ID, num_items, 2)  # every other item has a vector
    vecs = np.random.default_rng(0).normal(size=(len(known), 4)).astype("float32")
    snapshot = data.Vectors.from_items(known, vecs, num_items)
    f, _ = next(iter(data.impressions(path, "train", batch_size=256, vectors=snapshot)))
    item = f["item_id"].numpy()
    has = np.isin(item, known)
    np.testing.assert_array_equal(f["item_vector_missing"].numpy(), ~has)
    np.testing.assert_array_equal(f["item_vector"].numpy()[~has], 0.0)
    row = {k: i for i, k in enumerate(known)}
    for j in np.flatnonzero(has)[:10]:
        np.testing.assert_array_equal(f["item_vector"].numpy()[j], vecs[row[item[j]]])
    hist, mask = f["history_item_ids"].numpy(), f["history_mask"].numpy()
    np.testing.assert_array_equal(f["history_vector_missing"].numpy(), mask & ~np.isin(hist, known))
    assert f["history_vectors"].shape == hist.shape + (4,)
    with pytest.raises(ValueError, match="outside"):
        data.Vectors.from_items([1], vecs[:1], num_items)


def test_shuffle_is_seeded_and_order_is_deterministic(tiny):
    _, path = tiny

    def first_ids(**kw):
        features, _ = next(iter(data.impressions(path, "train", batch_size=64, **kw)))
        return features["timestamp"].numpy()

    in_order = first_ids()
    assert (np.diff(in_order) >= 0).all()  # time order
    np.testing.assert_array_equal(first_ids(shuffle=True, seed=3), first_ids(shuffle=True, seed=3))
    assert not np.array_equal(first_ids(shuffle=True, seed=3), in_order)


def test_shards_of_a_repeated_stream_interleave_into_it(tiny):
    _, path = tiny
    rows = schema.read_metadata(path)["counts"]["impressions/train"]

    def batches(n, **kw):  # n batches of 1000 rows: over two passes of the split
        ds = data.impressions(path, "train", batch_size=1000, repeat=True,
                              features=["item_id", "timestamp"], **kw)
        return [f["timestamp"].numpy() for f, _ in ds.take(n)]

    whole = batches(2 * 6)
    assert sum(map(len, whole)) > 2 * rows
    shards = [batches(6, shard=(2, 0)), batches(6, shard=(2, tf.constant(1, tf.int64)))]
    for k, batch in enumerate(whole):
        np.testing.assert_array_equal(shards[k % 2][k // 2], batch)


def test_visual_taste_knob_drives_clicks():
    """On `small`, an oracle knowing the visual attributes beats one knowing only
    categories; with visual_weight=0 it does not (no signal in the pictures)."""
    gains = {}
    for weight in (1.0, 0.0):
        w = world_lib.generate(
            dataclasses.replace(world_lib.PRESETS["small"], visual_weight=weight))
        visual, category = w.oracle_aucs()
        gains[weight] = visual - category
    assert gains[1.0] > 0.05
    assert abs(gains[0.0]) < 1e-9


@pytest.mark.parametrize("knob, value, message", [
    ("num_items", 2, "--num_items=2"),
    ("test_days", 4, "--test_days=4"),
    ("num_patterns", 3, "--num_patterns=3"),
    ("label_noise", 1.5, "--label_noise=1.5"),
    ("visual_weight", -1.0, "--visual_weight=-1.0"),
    ("new_item_fraction", 1.0, "left no item"),
])
def test_bad_knobs_name_the_flag(knob, value, message):
    with pytest.raises(ValueError, match=message):
        world_lib.generate(config_from_flags("tiny", {knob: value}))


@pytest.mark.slow
def test_cli_generates_and_rejects_bad_flags(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = tmp_path / "cli"
    ok = subprocess.run([sys.executable, "-m", "tfmm.data.generate", "--world=tiny", "--seed=5",
                         "--num_users=40", f"--out_dir={out}"], capture_output=True, text=True,
                        env=env)
    assert ok.returncode == 0, ok.stderr
    meta = schema.read_metadata(out)
    assert meta["world"]["seed"] == 5 and meta["world"]["num_users"] == 40
    bad = subprocess.run([sys.executable, "-m", "tfmm.data.generate", "--world=tiny",
                          "--num_days=1", f"--out_dir={tmp_path / 'bad'}"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "--num_days=1" in bad.stderr
    assert not (tmp_path / "bad").exists()


def _dense_ids(data_dir, name):
    """Prepared dense id -> the generated world's (a raw export's ids are those, prefixed)."""
    with open(os.path.join(data_dir, "vocab", f"{name}.txt")) as f:
        raw = [int(line.strip()[1:]) for line in f]
    return np.array([schema.PAD_ID, schema.OOV_ID, *raw])


def test_raw_export_prepares_into_the_generated_impressions(tiny, tmp_path):
    world, path = tiny
    raw, out = tmp_path / "raw", tmp_path / "prepared"
    gen = subprocess.run([sys.executable, "-m", "tfmm.data.generate", "--world=tiny",
                          f"--raw_dir={raw}"], capture_output=True, text=True, env=ENV)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert f"prepare it with: python -m tfmm.data.prepare --flagfile={raw}/prepare.flags" in (
        gen.stdout)
    assert sorted(os.listdir(raw)) == [".tfmm-output", "images", "impressions.csv",
                                       "items.csv", "prepare.flags"]
    assert len(os.listdir(raw / "images")) == TINY.num_items
    prep = subprocess.run([sys.executable, "-m", "tfmm.data.prepare",
                           f"--flagfile={raw}/prepare.flags", f"--out_dir={out}"],
                          capture_output=True, text=True, env=ENV)
    assert prep.returncode == 0, prep.stderr[-3000:]
    meta = schema.read_metadata(out)
    assert sorted(meta["files"]) == ["impressions/test", "impressions/train", "items"]
    generated = schema.read_metadata(path)
    assert {k: meta["counts"][k] for k in generated["counts"] if "pretrain" not in k} == {
        k: v for k, v in generated["counts"].items() if "pretrain" not in k}

    users, items, categories = (_dense_ids(out, n) for n in ("users", "items", "categories"))
    for split in ("train", "test"):
        ours, our_labels = _read_all(str(out), split)
        theirs, their_labels = _read_all(path, split)
        np.testing.assert_array_equal(our_labels, their_labels)
        for k in ("timestamp", "is_new_item", "history_timestamps", "history_length"):
            np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
        for k, ids in (("item_id", items), ("history_item_ids", items),
                       ("category_id", categories), ("history_category_ids", categories)):
            np.testing.assert_array_equal(ids[ours[k]], theirs[k], err_msg=k)
        # Users are indexed from the training days: one seen only in the test days is OOV.
        known = ours["user_id"] != schema.OOV_ID
        np.testing.assert_array_equal(users[ours["user_id"][known]], theirs["user_id"][known])
        trained_users = set(_read_all(path, "train")[0]["user_id"])
        assert set(theirs["user_id"][~known]).isdisjoint(trained_users)
        if split == "train":
            assert known.all()
        else:  # users, and their impressions
            assert len(set(theirs["user_id"][~known])) == meta["oov"]["test_users"]
            assert (~known).sum() == meta["oov"]["test_user_impressions"]

    # The catalogue: the same titles, images and categories (no release day: first_day is 0).
    ours = next(iter(data.items(str(out), batch_size=TINY.num_items)))
    theirs = next(iter(data.items(path, batch_size=TINY.num_items)))
    order = np.argsort(items[ours["item_id"].numpy()])
    np.testing.assert_array_equal(items[ours["item_id"].numpy()][order], theirs["item_id"])
    np.testing.assert_array_equal(categories[ours["category_id"].numpy()][order],
                                  theirs["category_id"])
    np.testing.assert_array_equal(ours["title"].numpy()[order], theirs["title"])
    np.testing.assert_array_equal(ours["image"].numpy()[order], theirs["image"])
    assert not ours["first_day"].numpy().any() and theirs["first_day"].numpy().any()


def test_truncated_or_malformed_records_name_file_and_record(tiny, tmp_path):
    _, path = tiny
    meta = schema.read_metadata(path)
    src = os.path.join(path, meta["files"]["impressions/test"][0])
    broken = tmp_path / "broken.tfrecord"
    raw = open(src, "rb").read()
    broken.write_bytes(raw[: len(raw) - 100])
    count = meta["counts"]["impressions/test"]
    with pytest.raises(ValueError, match=rf"broken.tfrecord: record {count - 1} is truncated"):
        data.check_records([str(broken)], schema.impression_spec())
    bad = tmp_path / "bad.tfrecord"
    with tf.io.TFRecordWriter(str(bad)) as w:
        for record in list(tf.data.TFRecordDataset(src).take(5).as_numpy_iterator()):
            w.write(record)
        w.write(schema.example(ints={"user_id": 3}, strings={"label": b"yes"}))
    with pytest.raises(ValueError, match=r"bad.tfrecord: record 5 does not parse"):
        data.check_records([str(bad)], schema.impression_spec())


@pytest.mark.parametrize("seed", range(20))
def test_families_cover_the_catalogue(seed):
    sizes = world_lib._family_sizes(np.random.default_rng(seed), 241)
    assert sum(sizes) == 241 and min(sizes) >= 2 and max(sizes) <= 4
