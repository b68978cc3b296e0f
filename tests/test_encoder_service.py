import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tfmm.export import export_saved_model
from tfmm.index import open_index
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
    ids = events.publish([{"item_id": i, "title": f"t{i}"} for i in range(5)])
    assert len(ids) == 5 and events.pending() == 5
    first = events.read("a", count=3, block=0.1)
    assert [e["item_id"] for _, e in first] == [0, 1, 2]
    assert first[0][1]["title"] == "t0" and first[0][1]["category_id"] == 0
    events.ack([first[0][0]])
    # "a" dies holding items 1 and 2: "b" gets the rest now, and 1, 2 once they are stale.
    assert [e["item_id"] for _, e in events.read("b", count=10, block=0.1)] == [3, 4]
    assert events.read("b", count=10, block=0.05) == []
    time.sleep(0.3)
    reclaimed = events.read("b", count=10, block=0.1)
    assert sorted(e["item_id"] for _, e in reclaimed) == [1, 2, 3, 4]
    events.ack([i for i, _ in reclaimed])
    assert events.pending() == 0


def test_bad_events_are_rejected_at_publish(tmp_path):
    events = SQLiteEvents(tmp_path / "e.db")
    with pytest.raises(BadEvent, match="missing field 'item_id'"):
        events.publish([{"item_id": 1, "title": "ok"}, {"title": "no id"}])
    with pytest.raises(BadEvent, match="item 7: needs an `image` or a `title`"):
        events.publish([{"item_id": 7}])
    assert events.pending() == 0  # the batch with a bad event wrote nothing


def test_encoder_writes_the_models_vectors_and_skips_undecodable_images(image_encoder,
                                                                        tmp_path):
    path, tower = image_encoder
    encoder = Encoder(os.path.dirname(path))
    assert (encoder.modality, encoder.image_size, encoder.dim) == ("image", (16, 16), 8)
    events = SQLiteEvents(tmp_path / "e.db")
    published, images = new_items(range(100, 110))
    published[3]["image"] = b"not a png"
    events.publish(published)
    index = open_index(str(tmp_path / "v.db"), dim=8)
    assert process(encoder, events, index, "w", batch_size=64, block=0.1) == (9, 1)
    assert events.pending() == 0  # the bad event too: it must not block the stream
    vectors, found = index.get(np.arange(100, 110))
    assert found.tolist() == [True] * 3 + [False] + [True] * 6
    keep = np.arange(10) != 3
    np.testing.assert_allclose(vectors[keep], tower(images[keep], training=False).numpy(),
                               atol=1e-5)


def test_text_encoder_and_republished_items(tmp_path):
    tower = text_tower(["red", "mug", "blue", "lamp"], dim=4)
    encoder = Encoder(export_saved_model(tower, str(tmp_path / "enc"), "vector"))
    events = SQLiteEvents(tmp_path / "e.db")
    events.publish([{"item_id": 1, "title": "red mug"}, {"item_id": 2, "title": "blue lamp"},
                    {"item_id": 1, "title": "blue mug"}])  # item 1 changed: the latest wins
    index = open_index(str(tmp_path / "v.db"), dim=4)
    assert serve(encoder, events, index, "w", block=0.05, idle_exit=0.1) == (3, 0)
    vectors, _ = index.get([1, 2])
    np.testing.assert_allclose(vectors, tower(np.array(["blue mug", "blue lamp"])).numpy(),
                               atol=1e-6)


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
