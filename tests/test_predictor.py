"""The online predictor: request assembly, the three backends, errors, concurrency."""

import shutil
import socket
import subprocess
import sys
import threading
import types

import numpy as np
import pytest
import tensorflow as tf

from tests.fake_tf_serving import FakeTFServing
from tfmm.data import schema
from tfmm.export import export_saved_model
from tfmm.index import RedisIndex, SQLiteIndex
from tfmm.keras_compat import keras
from tfmm.ranker import DINRanker
from tfmm.serving.predictor import (GrpcModel, Predictor, Request, RestModel, SavedModel,
                                    ServingError)

VOCAB = {"num_items": 30, "num_users": 10, "num_categories": 5}
L, D = 5, 8
MISSING = 29  # an item the index has no vector for
CATEGORIES = np.random.default_rng(0).integers(2, VOCAB["num_categories"], VOCAB["num_items"])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two rankers (ID, SimTier) exported, their Keras models, an index and a fake TF Serving."""
    root = tmp_path_factory.mktemp("predictor")
    keras.utils.set_random_seed(0)
    models, dirs = {}, {}
    for method in ("id", "simtier"):
        model = DINRanker(VOCAB, L, method, vector_dim=None if method == "id" else D,
                             embedding_dim=4, attention_units=(8,), mlp_units=(8,))
        dirs[method] = str(root / method)
        export_saved_model(model, dirs[method], "probability")
        models[method] = model
    vectors = np.random.default_rng(1).normal(size=(VOCAB["num_items"], D)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = SQLiteIndex(root / "index.db", dim=D)
    index.put(np.arange(2, MISSING), vectors[2:MISSING])
    server = FakeTFServing(dirs)
    yield {"models": models, "dirs": dirs, "vectors": vectors, "index": index, "server": server}
    server.stop()


def category(item):
    return CATEGORIES[item] if 0 < item < len(CATEGORIES) else 0


def expected(world, method, request):
    """The Keras model on inputs assembled by hand, as the training reader would."""
    history = list(request.history_item_ids)[-L:]
    history = history + [0] * (L - len(history))
    n = len(request.candidate_item_ids)
    rows = {"user_id": [request.user_id] * n, "item_id": list(request.candidate_item_ids),
            "category_id": [category(i) for i in request.candidate_item_ids],
            "history_item_ids": [history] * n,
            "history_category_ids": [[category(i) for i in history]] * n,
            "history_mask": [[i != 0 for i in history]] * n}
    inputs = {k: np.array(v, bool if k == "history_mask" else np.int64) for k, v in rows.items()}
    if method != "id":
        vector = lambda i: world["vectors"][i] if 2 <= i < MISSING else np.zeros(D)  # noqa: E731
        inputs["item_vector"] = np.array([vector(i) for i in request.candidate_item_ids],
                                         np.float32)
        inputs["history_vectors"] = np.array([[vector(i) for i in history]] * n, np.float32)
    scores = world["models"][method](inputs, training=False).numpy()[:, 0]
    # An id neither the catalogue nor the index knows gets the unknown score (0).
    return np.where(np.array(request.candidate_item_ids) < len(CATEGORIES), scores, 0)


def predictor(world, method, backend, signature=None):
    model = {"in_process": world["dirs"][method], "rest": world["server"].rest(method),
             "grpc": world["server"].grpc(method)}[backend]
    return Predictor(model, None if method == "id" else world["index"],
                     item_categories=CATEGORIES, signature=signature)


REQUESTS = [
    # History longer than L (the most recent 5 count); a candidate without a vector.
    Request(3, [4, 9, 11, 2, 7, 5, 20, 14], [6, MISSING, 12, 4, 25]),
    Request(7, [], [8, 3]),  # empty history
    Request(1, [13, 13, 28], [13]),  # repeated items, candidate also in the history
    # A new user and a new item (ids outside the vocabulary, no vector, no category):
    # the item is unknown.
    Request(12, [4, 1000], [1000, 5]),
]


@pytest.mark.parametrize("signature", ["rank", "serving_default"])
@pytest.mark.parametrize("backend", ["in_process", "rest", "grpc"])
@pytest.mark.parametrize("method", ["id", "simtier"])
def test_backends_score_like_the_keras_model(world, method, backend, signature):
    # rank is the default where the model has it (tfmm exports rankers with it).
    p = predictor(world, method, backend, None if signature == "rank" else signature)
    assert p.model.signature == signature and p.per_user == (signature == "rank")
    assert (p.max_history, p.vector_dim) == (L, None if method == "id" else D)
    for request in REQUESTS:
        got = p.predict(request)
        assert got.dtype == np.float32 and got.shape == (len(request.candidate_item_ids),)
        np.testing.assert_allclose(got, expected(world, method, request), rtol=0, atol=1e-5)
    # Distinct items of the 4 requests: 10 (the recent 5 and 5 candidates), 2, 2 and 3.
    looked_up, missing = (0, 0) if method == "id" else (17, 2)  # MISSING and 1000
    assert p.stats == {"requests": 4, "candidates": 10, "vectors_looked_up": looked_up,
                       "missing_vectors": missing, "unknown_candidates": 1}


def test_a_redis_index_serves_the_vectors(world, redis_url):
    index = RedisIndex(redis_url, dim=D)
    index.put(np.arange(2, MISSING), world["vectors"][2:MISSING])
    p = Predictor(world["dirs"]["simtier"], index, item_categories=CATEGORIES)
    for request in REQUESTS:
        np.testing.assert_allclose(p.predict(request), expected(world, "simtier", request),
                                   atol=1e-5)
    assert p.stats["missing_vectors"] == 2


def test_a_redis_index_emptied_under_the_predictor_is_warned_about(world, redis_server,
                                                                   redis_url, caplog):
    index = RedisIndex(redis_url, dim=D)
    index.put(np.arange(2, MISSING), world["vectors"][2:MISSING])
    p = Predictor(world["dirs"]["simtier"], index, item_categories=CATEGORIES)
    caplog.set_level("WARNING", logger="tfmm.serving.predictor")
    p.predict(REQUESTS[0])  # 1 of 10 items without a vector: no warning
    assert not caplog.records
    redis_server.flush()  # as a restart without persistence leaves it
    for _ in range(3):
        p.predict(REQUESTS[0])
    assert p.stats == {"requests": 4, "candidates": 20, "vectors_looked_up": 40,
                       "missing_vectors": 31, "unknown_candidates": 0}
    [record] = caplog.records  # once, not once a request
    assert record.getMessage().startswith(
        f"10 of the 10 items of a request have no vector in {index} and were scored with zeros")
    assert "'missing_vectors': 11" in record.getMessage()


def test_an_index_of_another_catalogue_is_refused(world, tmp_path):
    index = SQLiteIndex(tmp_path / "other.db", dim=D)
    index.put([2], world["vectors"][2:3])
    model = world["dirs"]["simtier"]
    Predictor(model, index, item_categories=CATEGORIES, catalogue="xyz")  # not claimed yet
    index.claim("abc")
    Predictor(model, index, item_categories=CATEGORIES, catalogue="abc")
    with pytest.raises(ValueError, match=r"other.db, dim=8\) holds vectors of another "
                                         r"catalogue \(abc, not xyz\)"):
        Predictor(model, index, item_categories=CATEGORIES, catalogue="xyz")


@pytest.mark.parametrize("signature", ["rank", "serving_default"])
def test_history_keeps_the_most_recent_items_and_missing_vectors_are_zeros(world, signature):
    p = predictor(world, "simtier", "in_process", signature)
    features, missing = p.assemble(Request(3, list(range(2, 10)), [MISSING, 2]))
    rows = 1 if signature == "rank" else 2  # one row per user, or per candidate
    assert {k: v.shape for k, v in features.items()} == (
        {"user_id": (1,), "item_id": (1, 2), "category_id": (1, 2), "history_item_ids": (1, L),
         "history_category_ids": (1, L), "history_mask": (1, L), "item_vector": (1, 2, D),
         "history_vectors": (1, L, D)} if rows == 1 else
        {"user_id": (2,), "item_id": (2,), "category_id": (2,), "history_item_ids": (2, L),
         "history_category_ids": (2, L), "history_mask": (2, L), "item_vector": (2, D),
         "history_vectors": (2, L, D)})
    candidate_vectors = features["item_vector"].reshape(2, D)
    np.testing.assert_array_equal(features["history_item_ids"], [[5, 6, 7, 8, 9]] * rows)
    np.testing.assert_array_equal(features["history_category_ids"][0], CATEGORIES[5:10])
    assert features["history_mask"].all()
    np.testing.assert_array_equal(missing, [MISSING])
    np.testing.assert_array_equal(candidate_vectors[0], np.zeros(D))
    np.testing.assert_array_equal(candidate_vectors[1], world["vectors"][2])
    np.testing.assert_array_equal(features["history_vectors"][-1, 0], world["vectors"][5])

    features, missing = p.assemble(Request(3, [], [4]))
    assert not features["history_mask"].any() and not features["history_item_ids"].any()
    assert not features["history_vectors"].any() and len(missing) == 0


def test_request_categories_override_the_catalogue_and_unknown_ids_get_zero(world):
    p = predictor(world, "id", "in_process")
    features, _ = p.assemble(Request(3, [4, 99], [5, 6], history_category_ids=[1, 2],
                                     candidate_category_ids=[3, 4]))
    np.testing.assert_array_equal(features["category_id"], [[3, 4]])
    np.testing.assert_array_equal(features["history_category_ids"][0], [1, 2, 0, 0, 0])
    features, _ = p.assemble(Request(3, [4, 99], [5, 123]))  # 99, 123: not in the table
    np.testing.assert_array_equal(features["category_id"], [[CATEGORIES[5], 0]])
    np.testing.assert_array_equal(features["history_category_ids"][0], [CATEGORIES[4], 0, 0, 0, 0])
    mapping = Predictor(world["dirs"]["id"], item_categories={5: 2})
    np.testing.assert_array_equal(mapping.assemble(Request(3, [], [5, 6]))[0]["category_id"],
                                  [[2, 0]])
    assert len(p.predict(Request(3, [4], []))) == 0


def test_bad_requests_and_settings_are_refused(world):
    p = predictor(world, "id", "in_process")
    with pytest.raises(ValueError, match="candidate_category_ids: 1 category ids for 2 items"):
        p.assemble(Request(3, [], [5, 6], candidate_category_ids=[1]))
    with pytest.raises(ValueError, match="history_item_ids: want integer ids"):
        p.assemble(Request(3, [1.5], [5]))
    with pytest.raises(ValueError, match="takes 8-d item vectors: pass the index"):
        Predictor(world["dirs"]["simtier"])
    with pytest.raises(ValueError, match="holds 3-d vectors"):
        Predictor(world["dirs"]["simtier"], SQLiteIndex(world["index"].path + "3", dim=3))


@pytest.mark.parametrize("method", ["id", "simtier"])
def test_invalid_candidates_are_refused_and_unknown_ones_ranked_after_known(world, method,
                                                                          tmp_path):
    """An id neither the catalogue nor the index knows came out 1st of 200 with the
    padding embedding; a negative id was scored too."""
    p = predictor(world, method, "in_process")
    for bad in (-4, 0, 1):
        with pytest.raises(ValueError, match=rf"Request.candidate_item_ids: {bad} is not an "
                           r"item id \(item ids start at 2; 0 is padding, 1 "
                           r"out-of-vocabulary\)"):
            p.predict(Request(3, [4], [5, bad]))
    with pytest.raises(ValueError, match=r"Request.history_item_ids: -1 is not an item id"):
        p.predict(Request(3, [4, -1], [5]))
    assert p.stats["requests"] == 0
    catalogue = list(range(2, VOCAB["num_items"]))  # MISSING (no vector) included
    got = p.predict(Request(3, [4, 9], [999999] + catalogue + [1000]))
    assert got[0] == got[-1] == 0 and got[1:-1].min() > 0  # last of all
    np.testing.assert_allclose(got[1:-1], expected(world, method, Request(3, [4, 9], catalogue)),
                               atol=1e-5)
    assert p.stats["unknown_candidates"] == 2
    prior = Predictor(world["dirs"][method], p.index, item_categories=CATEGORIES,
                      unknown_score=0.03)  # e.g. the click rate of the training set
    assert prior.predict(Request(3, [4], [999999, 5]))[0] == np.float32(0.03)
    if method == "simtier":  # a new item the encoder service indexed is known by its vector
        index = SQLiteIndex(tmp_path / "v.db", dim=D)
        index.put([4, 1000], world["vectors"][[4, 5]])
        fresh = Predictor(world["dirs"][method], index, item_categories=CATEGORIES)
        request = Request(3, [4], [1000, 999999])
        features, missing = fresh.assemble(request)
        np.testing.assert_array_equal(missing, [999999])
        scores = fresh.model(features).reshape(-1)
        np.testing.assert_allclose(fresh.predict(request), [scores[0], 0], atol=1e-6)
        assert scores[0] > 0


def test_base_dir_loads_the_highest_version(world, tmp_path):
    model = DINRanker(VOCAB, L, "id", embedding_dim=4, attention_units=(8,), mlp_units=(8,))
    export_saved_model(world["models"]["id"], str(tmp_path), "probability")
    export_saved_model(model, str(tmp_path), "probability")
    p = Predictor(str(tmp_path), item_categories=CATEGORIES)
    assert str(p.model).startswith(str(tmp_path / "2"))
    request = REQUESTS[0]
    np.testing.assert_allclose(p.predict(request), model.rank(
        p.assemble(request)[0]).numpy()[0], atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["in_process", "rest", "grpc"])
def test_eight_threads_get_their_own_answers(world, backend):
    p = predictor(world, "simtier", backend)
    rng = np.random.default_rng(2)
    requests = [Request(int(rng.integers(2, 10)), rng.integers(2, 30, rng.integers(0, 9)),
                        rng.integers(2, 30, rng.integers(1, 7))) for _ in range(24)]
    want = [expected(world, "simtier", r) for r in requests]
    errors = []

    def client(k):
        try:
            for _ in range(4):
                for i in range(k, len(requests), 8):
                    np.testing.assert_allclose(p.predict(requests[i]), want[i], atol=1e-5)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert p.stats["requests"] == 4 * len(requests)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_clear_errors_from_servers(world):
    port = free_port()  # nothing listens there
    with pytest.raises(ServingError, match=f"http://127.0.0.1:{port}/v1/models/ranker.*refused"):
        RestModel("127.0.0.1", port, "ranker", timeout=2)
    with pytest.raises(ServingError, match=f"grpc://127.0.0.1:{port}/ranker: UNAVAILABLE"):
        GrpcModel(f"127.0.0.1:{port}", "ranker", timeout=2)

    server = world["server"]
    with pytest.raises(ServingError, match=r"/v1/models/nope: HTTP 404: Servable not found "
                                           r"for request: Latest\(nope\)"):
        RestModel("127.0.0.1", server.rest_port, "nope")
    with pytest.raises(ServingError, match=r"/nope/versions/9: NOT_FOUND: .*Specific\(nope, 9\)"):
        GrpcModel(f"127.0.0.1:{server.grpc_port}", "nope", version=9)

    rest = RestModel("127.0.0.1", server.rest_port, "id")
    features = predictor(world, "id", "in_process").assemble(REQUESTS[0])[0]
    with pytest.raises(ServingError, match="HTTP 400: .*user_id.* not of expected type: int64"):
        rest({**features, "user_id": features["user_id"] + 0.5})
    grpc_model = GrpcModel(f"127.0.0.1:{server.grpc_port}", "id")
    with pytest.raises(ServingError, match="INVALID_ARGUMENT: Expects arg.* int64 but float"):
        grpc_model({**features, "user_id": features["user_id"].astype(np.float32)})


def test_closed_keep_alive_connections_are_reopened_and_a_dead_server_is_named(world):
    with FakeTFServing({"id": world["dirs"]["id"]}) as server:
        rest = Predictor(server.rest("id"), item_categories=CATEGORIES)
        grpc_predictor = Predictor(server.grpc("id"), item_categories=CATEGORIES)
        want = rest.predict(REQUESTS[0])  # opens the keep-alive connection
        server.drop_connections()
        np.testing.assert_array_equal(rest.predict(REQUESTS[0]), want)
    with pytest.raises(ServingError, match=f"127.0.0.1:{server.rest_port}/v1/models/id"):
        rest.predict(REQUESTS[0])
    with pytest.raises(ServingError, match=f"127.0.0.1:{server.grpc_port}/id: UNAVAILABLE"):
        grpc_predictor.predict(REQUESTS[0])


def test_rest_row_format_and_metadata_as_tf_serving_prints_it(world):
    import http.client
    import json

    server = world["server"]
    conn = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=5)
    conn.request("GET", "/v1/models/id/metadata")
    meta = json.loads(conn.getresponse().read())
    user = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"][
        "user_id"]
    assert user["dtype"] == "DT_INT64" and user["tensor_shape"]["dim"][0]["size"] == "-1"
    features = predictor(world, "id", "in_process", "serving_default").assemble(REQUESTS[1])[0]
    rows = [{k: v[i].tolist() for k, v in features.items()} for i in range(2)]
    conn.request("POST", "/v1/models/id:predict", json.dumps({"instances": rows}))
    got = np.array(json.loads(conn.getresponse().read())["predictions"])[:, 0]
    np.testing.assert_allclose(got, expected(world, "id", REQUESTS[1]), atol=1e-5)


@pytest.mark.slow
def test_cli_ranks_candidates_with_the_default_paths(tiny_dir, tmp_path):
    """python -m tfmm.serving.predict in a directory laid out as tfmm.train leaves it."""
    data_dir = tmp_path / "data" / "tiny"
    shutil.copytree(tiny_dir, data_dir)
    meta = schema.read_metadata(data_dir)
    model = DINRanker(meta["vocab"], meta["max_history"], "simtier", vector_dim=D,
                         embedding_dim=4, attention_units=(8,), mlp_units=(8,))
    export_saved_model(model, str(tmp_path / "runs" / "tiny" / "export" / "ranker"), "probability")
    index = SQLiteIndex(tmp_path / "runs" / "tiny" / "index" / "vectors.db", dim=D)
    items = np.arange(schema.FIRST_ID, meta["vocab"]["num_items"] - 1)  # the last has none
    index.put(items, np.random.default_rng(0).normal(size=(len(items), D)))

    def run(*flags):
        out = subprocess.run([sys.executable, "-m", "tfmm.serving.predict", "--world=tiny",
                              *flags], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.splitlines()

    lines = run("--top_k=3")
    assert len(lines) <= 10, lines
    assert "(test impression 0)" in lines[1] and "200 candidates" in lines[1]
    assert "items without a vector: " in lines[2]
    top = [float(line.split()[-1]) for line in lines[5:8]]
    assert top == sorted(top, reverse=True)
    assert lines[-1].startswith("the impression's item")
    lines = run("--user_id=3", "--history=5,6,7", f"--candidates=5,{items[-1] + 1}", "--top_k=2")
    assert "items without a vector: 1" in lines[2] and len(lines) == 7
    assert lines[3] == ("predictor totals: requests 2, candidates 4, vectors_looked_up 8, "
                        "missing_vectors 2, unknown_candidates 0")  # the last item is known

    # Bad flags and bad indexes: one line naming the flag or the file.
    real = tmp_path / "runs" / "tiny" / "index" / "vectors.db"
    index.close()
    other = SQLiteIndex(tmp_path / "other.db", dim=D)  # an index claimed by another catalogue
    other.put(items, np.zeros((len(items), D)))
    other.claim("0123456789abcdef")
    (tmp_path / "garbage.db").write_bytes(b"not an index " * 1000)
    (tmp_path / "cut.db").write_bytes(real.read_bytes()[:real.stat().st_size // 2])
    fingerprint = schema.catalogue_fingerprint(data_dir)
    for flags, message in [
            (["--num_candidates=0"], "--num_candidates=0: want at least 1."),
            (["--num_candidates=-5"], "--num_candidates=-5: want at least 1."),
            ([f"--index={tmp_path}/other.db"], f"SQLiteIndex({tmp_path}/other.db, dim=8) holds "
             f"vectors of another catalogue (0123456789abcdef, not {fingerprint}): its item "
             "ids name other items."),
            ([f"--index={tmp_path}/garbage.db"], f"--index: {tmp_path}/garbage.db is not a "
             "valid index: the SQLite file is corrupt or not a database (file is not a "
             "database)."),
            ([f"--index={tmp_path}/cut.db"], f"--index: {tmp_path}/cut.db is not a valid "
             "index: the SQLite file is corrupt or not a database (database disk image is "
             "malformed)."),
    ]:
        out = subprocess.run([sys.executable, "-m", "tfmm.serving.predict", "--world=tiny",
                              *flags], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert out.returncode == 1 and out.stderr.splitlines()[-1] == message, out.stderr[-2000:]
        assert "Traceback" not in out.stderr


def test_signature_choice_and_a_missing_one_is_named(world):
    server = world["server"]
    for spec in (world["dirs"]["id"], server.rest("id"), server.grpc("id")):
        assert Predictor(spec, item_categories=CATEGORIES).model.signature == "rank"
        with pytest.raises((ValueError, ServingError),
                           match=r"no 'nope' signature \(it has .*'rank', 'serve', "):
            Predictor(spec, signature="nope")


def test_candidate_counts_are_padded_to_few_sizes():
    padded = SavedModel.padded.__get__(types.SimpleNamespace(_compiled=True))
    # Eight sizes per power of two: 1..16 as they are, then steps of 2, 4, ... 64 from 512.
    assert [padded(n) for n in (0, 1, 7, 16, 17, 33, 200, 208, 209, 1000)] == [
        0, 1, 7, 16, 18, 36, 208, 208, 224, 1024]
    sizes = [padded(n) for n in range(1, 1025)]
    assert all(n <= m <= n * 9 / 8 for n, m in zip(range(1, 1025), sizes))
    assert len(set(sizes)) == 16 + 8 * 6  # 1..16, then 8 per octave up to 1024
    assert SavedModel.padded(types.SimpleNamespace(_compiled=None), 33) == 33


@pytest.mark.parametrize("method", ["id", "simtier"])
def test_xla_scores_padded_requests_like_the_uncompiled_signature(world, method):
    index = None if method == "id" else world["index"]
    rng = np.random.default_rng(3)
    request = Request(4, rng.integers(2, MISSING, 7).tolist(), rng.integers(2, 30, 33).tolist())
    for signature in ("rank", "serving_default"):
        xla = Predictor(SavedModel(world["dirs"][method], signature=signature), index,
                        item_categories=CATEGORIES)
        plain = Predictor(SavedModel(world["dirs"][method], signature=signature,
                                     jit_compile=False), index, item_categories=CATEGORIES)
        features = xla.assemble(request)[0]
        assert features["item_id"].size == 36 and not features["item_id"].reshape(-1)[33:].any()
        assert plain.assemble(request)[0]["item_id"].size == 33
        got = xla.predict(request)
        assert got.shape == (33,)
        np.testing.assert_allclose(got, plain.predict(request), rtol=0, atol=1e-6)
        np.testing.assert_allclose(got, expected(world, method, request), rtol=0, atol=1e-5)


def test_a_signature_xla_cannot_compile_is_called_uncompiled(tmp_path, caplog):
    class Strings(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.int64, name="item_id")])
        def serve(self, item_id):  # string ops have no XLA kernels
            return {"p": tf.cast(tf.strings.length(tf.strings.as_string(item_id)), tf.float32)}

    module = Strings()
    tf.saved_model.save(module, str(tmp_path), signatures={"serving_default": module.serve})
    with caplog.at_level("WARNING", logger="tfmm.serving.predictor"):
        model = SavedModel(str(tmp_path))
    assert "XLA cannot compile the 'serving_default' signature" in caplog.text
    assert model.padded(33) == 33
    np.testing.assert_array_equal(model({"item_id": np.array([7, 42, 1234])}), [1, 2, 4])
