"""Paper §5 / Figure 4 end to end: new item -> encoder service -> index -> predictor."""

import threading
import time

import numpy as np
import pytest
import tensorflow as tf

from tfmm.export import export_saved_model
from tfmm.index import IndexUnavailable, RedisIndex
from tfmm.ranker import DINRanker
from tfmm.serving.encoder import Encoder, serve
from tfmm.serving.events import open_events
from tfmm.serving.predictor import Predictor, Request
from tfmm.towers import image_tower

pytestmark = pytest.mark.slow  # trains models or runs the CLIs

DIM, L = 8, 5


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    out = tmp_path_factory.mktemp("nearline")
    tower = image_tower(dim=DIM, input_size=16, image_size=16)
    ranker = DINRanker({"num_items": 50, "num_users": 10, "num_categories": 4}, L, "simtier",
                          vector_dim=DIM, embedding_dim=4, attention_units=(4,), mlp_units=(8,))
    return (export_saved_model(tower, str(out / "encoder"), "vector"),
            export_saved_model(ranker, str(out / "ranker"), "probability"))


def new_item(item_id, seed):
    image = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    return {"item_id": item_id, "image": tf.io.encode_png(image).numpy(), "category_id": 2}


def wait_until_used(predictor, item, known, timeout=30.0):
    """Predicts until a prediction had `item`'s vector; returns the predictions made."""
    deadline = time.monotonic() + timeout
    made = 0
    while time.monotonic() < deadline:
        _, missing = predictor.assemble(Request(3, known[:L], [item, *known[:3]]))
        predictor.predict(Request(3, known[:L], [item, *known[:3]]))
        made += 1
        if item not in missing:
            return made
        time.sleep(0.01)
    raise AssertionError(f"no prediction used item {item}'s vector within {timeout} s")


def test_new_items_reach_predictions_and_survive_a_redis_restart(exports, redis_server,
                                                                  redis_url):
    encoder_path, ranker_path = exports
    index = RedisIndex(redis_url, dim=DIM, timeout=0.5)
    known = np.arange(2, 12)
    table = np.random.default_rng(0).normal(size=(10, DIM)).astype(np.float32)
    index.put(known, table)
    predictor = Predictor(ranker_path, index)
    events = open_events(redis_url, reclaim_after=0.5)
    worker = threading.Thread(target=serve, daemon=True, kwargs=dict(
        encoder=Encoder(encoder_path), events=open_events(redis_url, reclaim_after=0.5),
        index=RedisIndex(redis_url, dim=DIM), consumer="w", block=0.05, max_events=2,
        retry_after=0.1))
    worker.start()

    events.publish([new_item(1001, seed=1)])  # an id beyond the ranker's vocabulary
    wait_until_used(predictor, 1001, known)
    before = predictor.stats["missing_vectors"]

    redis_server.stop()
    start = time.monotonic()
    with pytest.raises(IndexUnavailable, match=f"127.0.0.1:{redis_server.port} is unreachable"):
        predictor.predict(Request(3, known[:L], known[:3]))
    assert time.monotonic() - start < 5  # a clear error, not a hang
    redis_server.start()  # empty: no persistence in the tests' server

    # No manual step: the same predictor answers, counting the lost vectors ...
    p = predictor.predict(Request(3, known[:L], known[:3]))
    assert p.shape == (3,) and predictor.stats["missing_vectors"] == before + L  # distinct ids
    # ... and the same encoder (it kept retrying) embeds the next new item.
    index.put(known, table)
    events.publish([new_item(1002, seed=2)])
    wait_until_used(predictor, 1002, known)
    worker.join(timeout=30)
    assert not worker.is_alive()
