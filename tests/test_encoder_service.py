import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
import redis
import tensorflow as tf

from tests.test_images import huge_png
from tfmm.export import export_saved_model
from tfmm.index import open_index
from tfmm.ranker import DINRanker
from tfmm.serving.encoder import Encoder, process, serve
from tfmm.serving.events import BadEvent, SQLiteEvents, open_events
from tfmm.towers import image_tower, text_tower

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def image_encoder(tmp_path_factory):
    tower = image_tower(dim=8, input_size=16, image_size=16)
    return export_saved_model(tower, str(tmp_path_factory.mktemp("encoder")), "vector"), tower


def new_items(ids, size=16, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (len(ids), size, size, 3), dtype=np.uint8)
    events = [{"item_id": int(i), "image": tf.io.encode_png(img).numpy(), "title": f"item {i}",
               "category_id": 3} for i, img in zip(ids, images)]
    return events, images


@pytest.fixture
def events_spec(store_spec):
    """A new, empty event queue on each backend (tests/conftest.py)."""
    return store_spec


def test_events_are_delivered_until_acknowledged_and_reclaimed_from_dead_consumers(events_spec):
    events = open_events(events_spec, reclaim_after=0.2)
    ids = events.publish([{"item_id": i, "title": f"t{i}"} for i in range(2, 7)])
    assert len(ids) == 5 and events.pending() == 5
    first = events.read("a", count=3, block=0.1)
    assert [e["item_id"] for _, e in first] == [2, 3, 4]
    assert first[0][1]["title"] == "t2" and first[0][1]["category_id"] == 0
    events.ack([first[0][0]])
    # "a" dies holding items 3 and 4: "b" gets the rest now, and 3, 4 once they are stale.
    assert [e["item_id"] for _, e in events.read("b", count=10, block=0.1)] == [5, 6]
    assert events.read("b", count=10, block=0.05) == []
    time.sleep(0.3)
    reclaimed = events.read("b", count=10, block=0.1)
    assert sorted(e["item_id"] for _, e in reclaimed) == [3, 4, 5, 6]
    events.ack([i for i, _ in reclaimed])
    assert events.pending() == 0


def test_bad_events_are_rejected_at_publish(tmp_path):
    events = SQLiteEvents(tmp_path / "e.db")
    with pytest.raises(BadEvent, match="missing field 'item_id'"):
        events.publish([{"item_id": 2, "title": "ok"}, {"title": "no id"}])
    with pytest.raises(BadEvent, match="item 7: needs an `image` or a `title`"):
        events.publish([{"item_id": 7}])
    assert events.pending() == 0  # the batch with a bad event wrote nothing


def test_encoder_writes_the_models_vectors_and_dead_letters_what_it_cannot_embed(image_encoder,
                                                                        tmp_path):
    path, tower = image_encoder
    encoder = Encoder(os.path.dirname(path))
    assert (encoder.modality, encoder.image_size, encoder.dim) == ("image", (16, 16), 8)
    events = SQLiteEvents(tmp_path / "e.db")
    published, images = new_items(range(100, 110))
    published[3]["image"] = b"not a png"
    del published[5]["image"]  # a title only: nothing this encoder can embed
    events.publish(published)
    index = open_index(str(tmp_path / "v.db"), dim=8)
    assert process(encoder, events, index, "w", batch_size=64, block=0.1) == (8, 2)
    assert events.pending() == 0  # the bad events too: they must not block the stream
    letters = sorted(events.dead_letters(), key=lambda letter: letter["item_id"])
    assert [letter["item_id"] for letter in letters] == [103, 105]
    assert "the image does not decode" in letters[0]["reason"]
    assert "the encoder embeds images; the event has none" in letters[1]["reason"]
    vectors, found = index.get(np.arange(100, 110))
    assert found.tolist() == [True] * 3 + [False, True, False] + [True] * 4
    keep = ~np.isin(np.arange(10), [3, 5])
    np.testing.assert_allclose(vectors[keep], tower(images[keep], training=False).numpy(),
                               atol=1e-5)


def test_text_encoder_and_republished_items(tmp_path):
    tower = text_tower(["red", "mug", "blue", "lamp"], dim=4)
    encoder = Encoder(export_saved_model(tower, str(tmp_path / "enc"), "vector"))
    events = SQLiteEvents(tmp_path / "e.db")
    events.publish([{"item_id": 3, "title": "red mug"}, {"item_id": 2, "title": "blue lamp"},
                    {"item_id": 3, "title": "blue mug"}])  # item 3 changed: the latest wins
    index = open_index(str(tmp_path / "v.db"), dim=4)
    assert serve(encoder, events, index, "w", block=0.05, idle_exit=0.1) == (3, 0)
    vectors, _ = index.get([3, 2])
    np.testing.assert_allclose(vectors, tower(np.array(["blue mug", "blue lamp"])).numpy(),
                               atol=1e-6)


@pytest.mark.slow
def test_an_encoder_killed_mid_stream_loses_no_event(image_encoder, events_spec, tmp_path):
    path, tower = image_encoder
    index_path = str(tmp_path / "v.db")
    events = open_events(events_spec)
    ids = np.arange(1000, 1300)
    published, images = new_items(ids, seed=1)
    events.publish(published)
    command = [sys.executable, "-m", "tfmm.serving.encoder", f"--encoder={path}",
               f"--events={events_spec}", f"--index={index_path}", "--max_batch=4",
               "--reclaim_after=0.5", "--block=0.1"]
    worker = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    index = open_index(index_path, dim=8)
    deadline = time.monotonic() + 120
    while index.count() < 40:
        assert worker.poll() is None, worker.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the encoder wrote nothing in 120 s"
        time.sleep(0.02)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    assert 0 < index.count() < len(ids)  # killed mid-stream
    restarted = subprocess.run(command + ["--idle_exit=1.5"], cwd=ROOT, capture_output=True,
                               timeout=180)
    assert restarted.returncode == 0, restarted.stderr.decode()[-2000:]
    vectors, found = index.get(ids)
    assert found.all() and events.pending() == 0
    np.testing.assert_allclose(vectors, tower(images, training=False).numpy(), atol=1e-5)


@pytest.mark.slow
def test_poison_entries_are_dead_lettered_and_the_rest_of_the_batch_indexed(image_encoder,
                                                                            redis_url, tmp_path):
    """Raw XADDs no `publish` would accept, one of them left pending by a crashed encoder."""
    path, tower = image_encoder
    events = open_events(redis_url)
    client = redis.Redis.from_url(redis_url)
    client.xgroup_create("tfmm:new_items", "encoder", id="0", mkstream=True)
    good, images = new_items([100, 101, 103])
    undecodable = dict(good[0], item_id=104, image=b"not a png")
    bad = {client.xadd("tfmm:new_items", {"title": "no id here"}).decode():
           "missing field 'item_id'"}
    client.xreadgroup("encoder", "crashed", {"tfmm:new_items": ">"}, count=1)  # never acked
    events.publish(good[:2])
    bad[client.xadd("tfmm:new_items", {"item_id": "abc", "title": "x"}).decode()] = \
        "item_id b'abc' is not an integer"
    bad[client.xadd("tfmm:new_items", {"item_id": "102", "title": b"\xff\xfe"}).decode()] = \
        "item 102: the title is not UTF-8"
    bad[client.xadd("tfmm:new_items", {"item_id": "-3", "title": "x"}).decode()] = \
        "item -3: item ids start at 2"
    bad[events.publish([undecodable])[0]] = "item 104: the image does not decode"
    events.publish(good[2:])
    index_path = str(tmp_path / "v.db")
    worker = subprocess.run(
        [sys.executable, "-m", "tfmm.serving.encoder", f"--encoder={path}",
         f"--events={redis_url}", f"--index={index_path}", "--block=0.1",
         "--reclaim_after=0.2", "--idle_exit=1"], cwd=ROOT, capture_output=True, text=True,
        timeout=180)
    assert worker.returncode == 0, worker.stderr[-2000:]
    assert "embedded 3 new items; 5 bad events moved to the dead-letter list" in worker.stdout
    index = open_index(index_path)
    np.testing.assert_array_equal(index.ids(), [100, 101, 103])
    np.testing.assert_allclose(index.get([100, 101, 103])[0],
                               tower(images, training=False).numpy(), atol=1e-5)
    assert events.pending() == 0
    letters = events.dead_letters()
    assert [d["event_id"] for d in letters] == list(bad)
    for letter in letters:
        assert bad[letter["event_id"]] in letter["reason"]
        assert f"event {letter['event_id']} " in worker.stderr  # logged with its id
    assert letters[2]["title"] == b"\xff\xfe"  # the fields as they were queued


def test_malformed_rows_are_dead_lettered_on_sqlite(image_encoder, tmp_path):
    path, tower = image_encoder
    events = SQLiteEvents(tmp_path / "e.db")
    good, images = new_items([100, 101])
    events.publish(good[:1])
    with contextlib.closing(sqlite3.connect(tmp_path / "e.db")) as db, db:
        db.executemany("INSERT INTO events (item_id, image, title, category_id, created_at) "
                       "VALUES (?, ?, ?, ?, 0)",
                       [("abc", None, "x", 0), (102, None, b"\xff\xfe", 0),
                        (-3, good[0]["image"], "x", 0), (105, "zz", None, 0),
                        (106, None, "x", "many")])
    events.publish(good[1:])
    index = open_index(str(tmp_path / "v.db"), dim=8)
    encoder = Encoder(path)
    assert process(encoder, events, index, "w", block=0.1) == (2, 5)
    np.testing.assert_array_equal(index.ids(), [100, 101])
    np.testing.assert_allclose(index.get([100, 101])[0], tower(images, training=False).numpy(),
                               atol=1e-5)
    assert events.pending() == 0 and events.dead_lettered == 5
    assert process(encoder, events, index, "w", block=0.05) == (0, 0)  # nothing left to block
    letters = SQLiteEvents(tmp_path / "e.db").dead_letters()  # what an operator sees
    assert [(d["event_id"], d["item_id"]) for d in letters] == [
        ("2", "abc"), ("3", 102), ("4", -3), ("5", 105), ("6", 106)]
    reasons = [d["reason"] for d in letters]
    for reason, want in zip(reasons, ["item_id 'abc' is not an integer",
                                      "item 102: the title is not UTF-8",
                                      "item -3: item ids start at 2",
                                      "item 105: the image must be bytes, not str",
                                      "item 106: invalid literal for int()"]):
        assert want in reason


@pytest.mark.parametrize("item_id", [-3, 0, 1])
def test_padding_and_oov_ids_are_refused_at_publish(events_spec, item_id):
    events = open_events(events_spec)
    with pytest.raises(BadEvent, match=f"item {item_id}: item ids start at 2 "
                       r"\(0 is padding, 1 out-of-vocabulary\)"):
        events.publish([{"item_id": 5, "title": "ok"}, {"item_id": item_id, "title": "x"}])
    assert events.pending() == 0


@pytest.mark.slow
def test_a_ranker_export_is_refused_as_an_encoder_in_one_line(tmp_path):
    ranker = DINRanker({"num_items": 10, "num_users": 10, "num_categories": 5}, 5,
                          method="vector", vector_dim=4, embedding_dim=4, attention_units=(4,),
                          mlp_units=(8,))
    path = export_saved_model(ranker, str(tmp_path / "ranker"), "probability")
    with pytest.raises(ValueError, match=f"{path} is not an encoder export: its serving_default "
                       "takes category_id, history_category_ids, .* and returns probability"):
        Encoder(path)
    run = subprocess.run([sys.executable, "-m", "tfmm.serving.encoder",
                          f"--encoder={tmp_path}/ranker", f"--events={tmp_path}/e.db",
                          f"--index={tmp_path}/v.db"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"--encoder={tmp_path}/ranker: {path} is not an encoder export")
    assert "Traceback" not in run.stderr
    assert not os.path.exists(tmp_path / "v.db")  # nothing was created


@pytest.mark.parametrize("field, value", [("item_id", 2**70), ("item_id", 2**63),
                                          ("category_id", 2**70)])
def test_ids_beyond_int64_are_refused_at_publish(events_spec, field, value):
    events = open_events(events_spec)
    event = dict({"item_id": 7, "title": "x"}, **{field: value})
    with pytest.raises(BadEvent, match=f"{field} {value} does not fit in a signed 64-bit "
                       "integer"):
        events.publish([{"item_id": 5, "title": "ok"}, event])
    assert events.pending() == 0


def _queue_raw(spec, fields):
    """Queues `fields` as another producer would, past `publish`'s checks; on SQLite the
    item id is written as an SQL literal (as a client in another language may)."""
    if spec.startswith("redis://"):
        client = redis.Redis.from_url(spec)
        with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: made by an earlier read
            client.xgroup_create("tfmm:new_items", "encoder", id="0", mkstream=True)
        client.xadd("tfmm:new_items", dict(fields, item_id=str(fields["item_id"])))
        return
    with contextlib.closing(sqlite3.connect(spec)) as db, db:
        db.execute(f"INSERT INTO events (item_id, image, created_at) VALUES "
                   f"({fields['item_id']}, ?, 0)", (fields["image"],))


def test_an_id_beyond_int64_is_dead_lettered_and_the_batch_indexed(image_encoder, events_spec,
                                                                  tmp_path):
    path, tower = image_encoder
    events = open_events(events_spec)
    good, images = new_items([100, 101])
    events.publish(good[:1])
    # With an image the encoder embeds: only the id is wrong.
    _queue_raw(events_spec, {"item_id": 2**70, "image": good[0]["image"]})
    _queue_raw(events_spec, {"item_id": "1e999", "image": good[0]["image"]})  # SQLite: Inf
    events.publish(good[1:])
    index = open_index(str(tmp_path / "v.db"), dim=8)
    assert process(Encoder(path), events, index, "w", block=0.1) == (2, 2)
    np.testing.assert_array_equal(index.ids(), [100, 101])
    np.testing.assert_allclose(index.get([100, 101])[0], tower(images, training=False).numpy(),
                               atol=1e-5)
    assert events.pending() == 0
    reasons = [d["reason"] for d in events.dead_letters()]
    assert "does not fit in a signed 64-bit integer" in reasons[0], reasons
    assert "is not an integer" in reasons[1], reasons


def test_an_image_over_the_pixel_limit_is_dead_lettered_before_it_is_decoded(image_encoder,
                                                                            tmp_path):
    """A 20000 x 20000 PNG (49 kB) was decoded whole: the encoder peaked at 1.96 GB."""
    path, tower = image_encoder
    events = SQLiteEvents(tmp_path / "e.db")
    good, images = new_items([100, 102])
    events.publish([good[0], {"item_id": 101, "image": huge_png()}, good[1]])
    index = open_index(str(tmp_path / "v.db"), dim=8)
    assert process(Encoder(path), events, index, "w", block=0.1) == (2, 1)
    np.testing.assert_array_equal(index.ids(), [100, 102])
    np.testing.assert_allclose(index.get([100, 102])[0], tower(images, training=False).numpy(),
                               atol=1e-5)
    [letter] = events.dead_letters()
    assert letter["item_id"] == 101 and letter["reason"] == (
        "item 101: the image is 20000x20000 pixels, over the limit of 50,000,000 "
        "(tfmm.data.images.MAX_PIXELS); downscale it.")
    assert events.pending() == 0
