import contextlib
import json
import multiprocessing
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import redis

from tests.redis_server import RedisServer
from tfmm.data.schema import FIRST_ID
from tfmm.index import (IndexNotFound, IndexUnavailable, RedisIndex, SQLiteIndex, is_empty,
                        is_redis, open_index, redact)


@pytest.fixture
def spec(store_spec):
    """Where a new, empty index lives, on each backend (tests/conftest.py)."""
    return store_spec


def test_put_get_versions_and_missing(spec):
    index = open_index(spec, dim=3)
    v1 = index.put([5, 7], [[1, 2, 3], [4, 5, 6]])
    v2 = index.put([7, 9], [[0, 0, 1], [1, 1, 1]])
    assert (v1, v2) == (1, 2)
    vectors, found = index.get([9, 5, 8, 7])
    np.testing.assert_array_equal(found, [True, True, False, True])
    np.testing.assert_array_equal(vectors, [[1, 1, 1], [1, 2, 3], [0, 0, 0], [0, 0, 1]])
    assert vectors.dtype == np.float32 and vectors.flags.writeable
    version, updated = index.versions([5, 7, 8])
    np.testing.assert_array_equal(version, [1, 2, 0])
    assert updated[0] <= updated[1] <= time.time() and np.isnan(updated[2])
    np.testing.assert_array_equal(index.ids(), [5, 7, 9])
    assert index.count() == 3
    assert index.get([])[0].shape == (0, 3)
    snap = index.snapshot(num_items=9)  # id 9 is outside this vocabulary
    np.testing.assert_array_equal(np.flatnonzero(snap.present), [5, 7])
    # Reopening finds the dimension and the data.
    again = open_index(spec)
    assert again.dim == 3 and again.get([5])[1].all()


@pytest.mark.parametrize("ids, vectors, message", [
    ([1, 2], [[1, 2, 3], [np.nan, 0, 0]], "item 2 has NaN or Inf"),
    ([1, 2], [[1, 2, 3], [np.inf, 0, 0]], "item 2 has NaN or Inf"),
    ([1], [[1, 2]], r"must be \[n, 3\]"),
    ([1, 2], [[1, 2, 3]], "2 ids but 1 vectors"),
    ([1, 1], [[1, 2, 3], [1, 2, 3]], "duplicate item ids"),
])
def test_bad_vectors_are_rejected_and_nothing_is_written(spec, ids, vectors, message):
    index = open_index(spec, dim=3)
    index.put([4], [[9, 9, 9]])
    with pytest.raises(ValueError, match=message):
        index.put(ids, vectors)
    np.testing.assert_array_equal(index.ids(), [4])
    np.testing.assert_array_equal(index.get([4])[0], [[9, 9, 9]])


def test_dimension_is_fixed(spec, tmp_path):
    open_index(spec, dim=3)
    with pytest.raises(ValueError, match="holds 3-d vectors, asked for 4"):
        open_index(spec, dim=4)
    new = str(tmp_path / "new.db") if spec.endswith(".db") else spec + "?prefix=new"
    with pytest.raises(IndexNotFound, match="needs `dim`"):
        open_index(new)


def _writer(spec, start):
    index = open_index(spec)
    for k in range(20):
        ids = np.arange(start + k * 10, start + k * 10 + 10)
        index.put(ids, np.tile(ids[:, None], (1, 4)).astype("float32"))
        time.sleep(0.01)  # spread the puts over the reader's loop


@pytest.mark.slow
def test_concurrent_writers_and_readers_see_whole_puts(spec):
    open_index(spec, dim=4)
    ctx = multiprocessing.get_context("spawn")
    writers = [ctx.Process(target=_writer, args=(spec, s)) for s in (10, 10_000)]
    for w in writers:
        w.start()
    reader = open_index(spec)
    seen = set()
    while any(w.is_alive() for w in writers):
        ids = reader.ids()
        vectors, found = reader.get(ids)
        assert found.all()
        np.testing.assert_array_equal(vectors[:, 0], ids)  # never a torn row
        assert len(ids) % 10 == 0  # never a partial put
        seen.add(len(ids))
    for w in writers:
        w.join()
        assert w.exitcode == 0
    assert len(seen - {0, 400}) >= 5, seen  # reads really ran between the puts
    assert len(reader.ids()) == 400
    np.testing.assert_array_equal(np.sort(reader.versions(reader.ids())[0])[::10],
                                  np.arange(1, 41))  # one version per put, none shared


def _rewriter(spec, n, stop):
    """Puts n items again and again, each put's vectors all equal to its number."""
    index = open_index(spec)
    k = 1
    while not stop.is_set():
        index.put(np.arange(n) + FIRST_ID, np.full((n, 4), k, np.float32))
        k += 1


@pytest.mark.slow
def test_reads_of_any_size_see_one_put_while_puts_land(spec):
    n = 2000  # SQLite once read 900 ids a statement, Redis reads 500-key MGETs here
    ids = np.arange(n) + FIRST_ID
    index = open_index(spec, dim=4)
    index.put(ids, np.zeros((n, 4)))
    if isinstance(index, RedisIndex):
        index.CHUNK = 500
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    writer = ctx.Process(target=_rewriter, args=(spec, n, stop))
    writer.start()
    changes = {"get": 0, "snapshot": 0}
    last = dict.fromkeys(changes, 0.0)
    deadline = time.monotonic() + 120
    try:
        while min(changes.values()) < 10 and time.monotonic() < deadline:
            for how in changes:
                if how == "get":
                    vectors, found = index.get(ids)
                    assert found.all()
                else:
                    snap = index.snapshot(n + FIRST_ID)
                    assert snap.present.sum() == n
                    vectors = snap.table[snap.present]
                assert (vectors == vectors[0, 0]).all(), (how, np.unique(vectors))  # one put
                assert vectors[0, 0] >= last[how]
                changes[how] += vectors[0, 0] > last[how]
                last[how] = vectors[0, 0]
    finally:
        stop.set()
        writer.join()
    # Puts landed between consecutive reads of each kind: the reads overlapped writing.
    assert min(changes.values()) >= 10, changes
    assert writer.exitcode == 0


def _keys_per_command(entry):
    """The arguments of a SLOWLOG entry's command (it shows some, then "... (N more
    arguments)")."""
    words = entry["command"].split()
    if words[-1] == b"arguments)":
        return len(words) - 5 + int(words[-3].lstrip(b"("))
    return len(words) - 1


def test_a_redis_snapshot_never_holds_the_server_for_the_catalogue(redis_url, monkeypatch):
    """A MULTI of every vector stalled every other client (predictors) for the whole read."""
    n = 3000
    index = RedisIndex(redis_url, dim=4)
    index.put(np.arange(n) + FIRST_ID, np.ones((n, 4)))
    monkeypatch.setattr(RedisIndex, "SNAPSHOT_CHUNK", 500, raising=False)
    client = redis.Redis.from_url(redis_url)
    client.config_set("slowlog-log-slower-than", 0)  # every command
    client.config_set("slowlog-max-len", 10_000)
    try:
        client.slowlog_reset()
        snap = index.snapshot(n + FIRST_ID)
        log = client.slowlog_get(10_000)
    finally:
        client.config_set("slowlog-log-slower-than", 10_000)
    assert snap.present.sum() == n
    biggest = max(log, key=_keys_per_command)
    assert _keys_per_command(biggest) <= 500, biggest["command"][:60]


@pytest.mark.parametrize("catch_up", [3, 0])  # re-read in chunks, or atomically at once
def test_a_redis_snapshot_shows_the_puts_made_while_it_read(redis_url, monkeypatch, catch_up):
    n = 2000
    index = RedisIndex(redis_url, dim=4)
    index.put(np.arange(n) + FIRST_ID, np.zeros((n, 4)))
    monkeypatch.setattr(RedisIndex, "SNAPSHOT_CHUNK", 500)
    monkeypatch.setattr(RedisIndex, "CATCH_UP", catch_up)
    writer = RedisIndex(redis_url)
    reads = []
    mget = index._redis.mget

    def mget_then_put(keys):
        values = mget(keys)
        reads.append(len(keys))
        if len(reads) == 2:  # a put over items read and not read yet, one new item
            ids = np.array([FIRST_ID, FIRST_ID + 1900, n + FIRST_ID])
            writer.put(ids, np.ones((3, 4)))
        return values

    monkeypatch.setattr(index._redis, "mget", mget_then_put)
    snap = index.snapshot(n + 10)
    assert reads[:4] == [500] * 4
    present = np.flatnonzero(snap.present)
    np.testing.assert_array_equal(present, np.arange(n + 1) + FIRST_ID)
    ones = snap.table[present][:, 0] == 1
    np.testing.assert_array_equal(np.flatnonzero(ones), [0, 1900, n])  # the put, whole


def test_an_index_belongs_to_one_catalogue(spec):
    index = open_index(spec, dim=2)
    index.claim("abc")
    index.claim("abc")  # the same catalogue again is fine
    with pytest.raises(ValueError, match=r"holds vectors of another catalogue \(abc, not xyz\)"):
        open_index(spec).claim("xyz")


def test_open_index_dispatches_and_is_empty_creates_nothing(tmp_path, redis_url):
    path = str(tmp_path / "sub" / "v.db")
    assert is_empty(path) and not os.path.exists(path)
    assert is_empty(redis_url) and not redis.Redis.from_url(redis_url).keys()
    assert isinstance(open_index(path, dim=2), SQLiteIndex)
    assert isinstance(open_index(redis_url, dim=2), RedisIndex)
    assert is_empty(path) and is_empty(redis_url)  # created, but no vectors yet
    open_index(redis_url).put([3], [[1, 0]])
    assert not is_empty(redis_url)


def test_prefixes_keep_indexes_apart(redis_url):
    a = open_index(redis_url + "?prefix=a", dim=2)
    b = RedisIndex(redis_url, dim=3, prefix="b")
    a.put([3, 2], [[1, 1], [2, 2]])
    a.put([2], [[2, 2]])
    b.put([2], [[3, 3, 3]])
    a.claim("one")
    b.claim("two")
    np.testing.assert_array_equal(a.ids(), [2, 3])
    np.testing.assert_array_equal(b.get([3, 2])[1], [False, True])
    assert a.versions([2])[0][0] == 2 and b.versions([2])[0][0] == 1
    assert "prefix=a" in repr(a) and "prefix=b" in repr(b)
    assert is_empty(redis_url)  # the default prefix holds nothing
    assert {k.split(b":")[0] for k in redis.Redis.from_url(redis_url).keys()} == {b"a", b"b"}


def test_a_blob_of_the_wrong_size_names_its_key(redis_url):
    index = open_index(redis_url + "?prefix=p", dim=4)
    redis.Redis.from_url(redis_url).set("p:v:7", b"\0" * 12)  # a 3-d vector, or another app's
    with pytest.raises(ValueError, match=r"key p:v:7 holds 12 bytes, not a 4-d float32 vector"):
        index.get([1, 7])


def test_password_and_address_from_the_environment(tmp_path, monkeypatch):
    server = RedisServer(tmp_path)
    try:
        redis.Redis(port=server.port).config_set("requirepass", "s3cret")
        monkeypatch.delenv("TFMM_REDIS_PASSWORD", raising=False)
        with pytest.raises(IndexUnavailable, match=f"127.0.0.1:{server.port} refused the "
                           "credentials .*TFMM_REDIS_PASSWORD"):
            open_index(server.url, dim=2)
        monkeypatch.setenv("TFMM_REDIS_PASSWORD", "s3cret")
        index = open_index(server.url, dim=2)
        index.put([2], [[1, 2]])
        assert "s3cret" not in repr(index)
        assert open_index(f"redis://:s3cret@127.0.0.1:{server.port}/0").count() == 1
        monkeypatch.setenv("TFMM_REDIS_URL", server.url)
        assert RedisIndex().count() == 1  # no URL: $TFMM_REDIS_URL
    finally:
        server.stop()


@pytest.mark.parametrize("spec, shown", [
    ("redis://:s3cret@h:6379/0?prefix=p", "redis://:***@h:6379/0?prefix=p"),
    ("rediss://ann:s3cret@h:6380/1", "rediss://ann:***@h:6380/1"),
    ("redis://h:6379/0?password=s3cret&prefix=p", "redis://h:6379/0?password=***&prefix=p"),
    ("unix://:s3cret@/run/redis.sock?db=2", "unix://:***@/run/redis.sock?db=2"),
    ("unix:///run/redis.sock?password=s3cret", "unix:///run/redis.sock?password=***"),
    ("redis://ann:p%40ss:w@h:1/0", "redis://ann:***@h:1/0"),
    ("redis://h:6379/0", "redis://h:6379/0"),
    ("redis://ann@h:6379/0", "redis://ann@h:6379/0"),  # a user name alone
    ("redis://h:6379/0?password=p@ss&prefix=a@b", "redis://h:6379/0?password=***&prefix=a%40b"),
    ("runs/x/index.db", "runs/x/index.db"),
])
def test_redact_hides_only_the_password(spec, shown):
    assert redact(spec) == shown


@pytest.mark.parametrize("spec, shown", [
    # An unescaped '?', '#' or '/' ends the host part early: urllib and redis-py then read
    # part of the password as the port ("Port could not be cast to integer value as 'PWa'").
    ("redis://:PWa?PWb@h", "redis://***@h"),
    ("redis://:PWa?x=PWb@h", "redis://***@h"),
    ("redis://:PWa#PWb@h:6379/0", "redis://***@h:6379/0"),
    ("redis://ann:PWa/PWb@h:6379/0", "redis://***@h:6379/0"),
    ("unix://:PWa?PWb@/run/redis.sock?db=0", "unix://***@/run/redis.sock?db=0"),
])
def test_a_malformed_redis_url_is_refused_without_any_of_its_password(spec, shown):
    from tfmm.serving.events import open_events

    assert redact(spec) == shown
    for opener in (open_index, open_events):
        with pytest.raises(ValueError) as refused:
            opener(spec)
        message = str(refused.value)
        assert message.startswith(f"{shown} is not a valid Redis URL: ") and \
            "percent-encoded" in message
        assert "PWa" not in message and "PWb" not in message


def test_a_password_in_the_index_url_stays_out_of_settings_files():
    from tfmm import ctr, jobs

    config = ctr.CTRConfig(data_dir="d", model_dir="m", index="redis://:s3cret@h:1/0")
    assert jobs.config_json(config)["index"] == "redis://:***@h:1/0"
    assert "s3cret" not in json.dumps(jobs.settings(config))


@pytest.mark.slow
def test_a_dead_redis_is_named_quickly_and_the_same_object_recovers(redis_server, redis_url):
    index = open_index(redis_url, dim=2)
    index.put([2, 4], [[1, 1], [2, 2]])
    redis_server.stop()
    where = f"Redis index at 127.0.0.1:{redis_server.port} is unreachable"
    for call in (lambda: index.get([1]), lambda: index.put([3], [[3, 3]]), index.ids,
                 lambda: open_index(redis_url)):
        start = time.perf_counter()
        with pytest.raises(IndexUnavailable, match=where):
            call()
        assert time.perf_counter() - start < 1.0  # a short, bounded retry
    # Restarted without persistence: the data is gone, and the old object says so.
    redis_server.start()
    vectors, found = index.get([2, 4])
    assert not found.any() and not vectors.any()
    assert index.put([3], [[3, 3]]) == 1
    assert open_index(redis_url).dim == 2  # a put records the dimension again
    np.testing.assert_array_equal(index.ids(), [3])


@pytest.mark.slow
def test_cli_trains_a_ranker_on_a_redis_index(redis_url, tmp_path):
    """--index=redis://...: the encoder fills it when empty, the ranker reads it."""
    runs = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "-m", "tfmm.train", "--flagfile=configs/ctr.flags", "--world=tiny",
         f"--data_dir={tmp_path}/tiny", f"--model_dir={runs}/ctr", "--export_dir=",
         f"--index={redis_url}?prefix=tiny", f"--pretrain_model_dir={runs}/pretrain",
         "--encoder_export_dir=", "--model=simscore", "--objective=random",
         "--pretrain_epochs=0", "--queue_size=0", "--dim=8", "--embedding_dim=8",
         "--attention_units=8", "--mlp_units=16"],
        capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "is empty: pre-training the encoder first" in proc.stdout
    index = open_index(redis_url + "?prefix=tiny")
    meta = json.load(open(tmp_path / "tiny" / "metadata.json"))
    assert index.dim == 8 and index.count() == meta["counts"]["items"]
    assert json.load(open(runs / "ctr" / "metrics.json"))["missing_item_vectors"] == 0


def test_padding_oov_and_negative_ids_are_refused_at_put(spec):
    index = open_index(spec, dim=2)
    with pytest.raises(ValueError, match=r"item id -3 is not an item \(3 such ids\): ids start "
                       "at 2, 0 is padding and 1 out-of-vocabulary; nothing was written"):
        index.put([5, -3, 0, 1], [[1, 1], [2, 2], [3, 3], [4, 4]])
    assert index.count() == 0
    from tfmm.data import schema
    from tfmm.index import FIRST_ID

    assert FIRST_ID == schema.FIRST_ID  # a copy, so that the index needs no TensorFlow


def test_a_snapshot_with_ids_below_2_names_the_index_and_the_ids(tmp_path):
    """Such rows come from an index written before `put` refused them."""
    import re
    import sqlite3

    index = open_index(str(tmp_path / "v.db"), dim=2)
    index.put([2, 5], [[1, 1], [2, 2]])
    with sqlite3.connect(tmp_path / "v.db") as db:
        db.executemany("INSERT INTO vectors VALUES (?, ?, 1, 0)",
                       [(i, bytes(8)) for i in (-3, 0, 1)])
    with pytest.raises(ValueError, match=re.escape(
            f"{index!r}: item ids outside [2, 9): -3, 0, 1 (3 in all); 0 is padding and 1 "
            "out-of-vocabulary.")):
        index.snapshot(num_items=9)


def test_a_corrupt_sqlite_file_is_named_at_open_reads_and_puts(tmp_path):
    real = SQLiteIndex(tmp_path / "real.db", dim=16)
    real.put(np.arange(2, 5002), np.ones((5000, 16)))
    real.close()
    data = (tmp_path / "real.db").read_bytes()
    garbage, truncated, damaged = (tmp_path / f"{n}.db" for n in ("garbage", "cut", "damaged"))
    garbage.write_bytes(b"not an index " * 1000)
    truncated.write_bytes(data[:len(data) // 2])
    for path in (garbage, truncated):
        with pytest.raises(ValueError, match=f"^{path} is not a valid index: the SQLite file "
                                             "is corrupt or not a database"):
            open_index(str(path))
    # A data page overwritten: the file opens, its reads fail.
    damaged.write_bytes(data[:50 * 4096] + b"\xff" * 4096 + data[51 * 4096:])
    index = open_index(str(damaged))
    for call in (index.count, index.ids, lambda: index.get(np.arange(2, 5002)),
                 lambda: index.snapshot(6000), lambda: index.put([3], np.zeros((1, 16)))):
        with pytest.raises(ValueError, match=f"^{damaged} is not a valid index"):
            call()


SECRET = "pw-Le4k-7f3a"


def _secret_urls(server, prefix):
    """Every way redis-py takes the password: the URL's user info, with or without a user
    name, ``?password=``, a unix socket URL, and $TFMM_REDIS_PASSWORD (environment)."""
    host = f"127.0.0.1:{server.port}"
    return {
        "userinfo": (f"redis://:{SECRET}@{host}/0?prefix={prefix}", {}),
        "user": (f"redis://default:{SECRET}@{host}/0?prefix={prefix}", {}),
        "query": (f"redis://{host}/0?password={SECRET}&prefix={prefix}", {}),
        "unix": (f"unix://:{SECRET}@{server.socket}?db=0&prefix={prefix}", {}),
        "environment": (f"redis://{host}/0?prefix={prefix}", {"TFMM_REDIS_PASSWORD": SECRET}),
    }


def _leaks(root, *texts):
    """Files under `root` (any bytes: TensorBoard events, SavedModels) and texts holding
    the password."""
    found = [str(p) for p in root.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    return found + [t[-300:] for t in texts if SECRET in t]


@pytest.fixture(scope="module")
def locked(tmp_path_factory):
    """A password-protected Redis, and a CTR run (pre-training the encoder into the empty
    index first) given the password in the URL's ``?password=``."""
    root = tmp_path_factory.mktemp("locked")
    server = RedisServer(root, password=SECRET)
    url, _ = _secret_urls(server, "full")["query"]
    runs = root / "runs"
    proc = subprocess.run(
        [sys.executable, "-m", "tfmm.train", "--flagfile=configs/ctr.flags", "--world=tiny",
         f"--data_dir={root}/tiny", f"--model_dir={runs}/ctr", f"--export_dir={runs}/ranker",
         f"--index={url}", f"--pretrain_model_dir={runs}/pretrain",
         f"--encoder_export_dir={runs}/encoder", "--model=simtier", "--pretrain_epochs=1",
         "--min_steps=0", "--pretrain_batch_size=32", "--queue_size=128", "--dim=8",
         "--embedding_dim=8",
         "--attention_units=8", "--mlp_units=16", "--batch_size=256"],
        capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    yield server, root, proc
    server.stop()


@pytest.mark.slow
def test_a_ctr_and_pretraining_run_write_no_password(locked):
    server, root, proc = locked
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the index redis://127.0.0.1" in proc.stdout and "password=***" in proc.stdout
    runs = root / "runs"
    for job in ("ctr", "pretrain"):
        config = json.load(open(runs / job / "metrics.json"))["config"]
        assert config["index"].endswith("/0?password=***&prefix=full")
        assert list((runs / job / "logs").rglob("events.out.tfevents.*"))  # TensorBoard
    assert (runs / "ctr" / "config.json").exists() and list((runs / "ranker").iterdir())
    assert not _leaks(runs, proc.stdout, proc.stderr)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["userinfo", "user", "query", "unix", "environment"])
def test_no_url_form_shows_the_password(locked, form, monkeypatch):
    server, root, _ = locked
    empty, env = _secret_urls(server, "empty")[form]
    full, _ = _secret_urls(server, "full")[form]
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    index = open_index(full)
    assert index.count() > 0 and SECRET not in repr(index) + redact(full)
    # A wrong password is refused without echoing it.
    wrong = full.replace(SECRET, "Wr0ng-pw") if not env else full + "&password=Wr0ng-pw"
    with pytest.raises(IndexUnavailable) as refused:
        open_index(wrong)
    assert "refused the credentials" in str(refused.value) and "Wr0ng" not in str(refused.value)
    # The CLI's error for an empty index and its output for a full one.
    cli = [sys.executable, "-m", "tfmm.serving.predict", f"--data_dir={root}/tiny",
           f"--export_dir={root}/runs/ranker"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **env)
    failed = subprocess.run(cli + [f"--index={empty}"], capture_output=True, text=True,
                            env=env)
    assert failed.returncode != 0 and "holds no vectors" in failed.stderr.splitlines()[-1]
    ranked = subprocess.run(cli + [f"--index={full}"], capture_output=True, text=True,
                            env=env)
    assert ranked.returncode == 0, ranked.stderr[-2000:]
    assert not _leaks(root / "runs", failed.stdout, failed.stderr, ranked.stdout,
                      ranked.stderr)


@pytest.mark.slow
def test_the_clis_name_a_corrupt_index_file(locked, tmp_path):
    """Training and the encoder service (as the predictor, tests/test_predictor.py)."""
    _, root, _ = locked
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not an index " * 1000)
    for cli in (["tfmm.train", "--flagfile=configs/ctr.flags", f"--data_dir={root}/tiny",
                 f"--model_dir={tmp_path}/ctr", f"--pretrain_model_dir={tmp_path}/pretrain"],
                ["tfmm.serving.encoder", f"--encoder={root}/runs/encoder",
                 f"--events={tmp_path}/events.db"]):
        proc = subprocess.run([sys.executable, "-m", *cli, f"--index={garbage}"],
                              capture_output=True, text=True,
                              env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
        assert proc.returncode == 1 and proc.stderr.splitlines()[-1] == (
            f"--index: {garbage} is not a valid index: the SQLite file is corrupt or not a "
            "database (file is not a database)."), proc.stderr[-2000:]


# Your own vectors: `python -m tfmm.index import|export` and tfmm.index.files.

# Raw ids as a real export has them: text, one with a comma, quotes and non-ASCII.
RAW_ITEMS = ["sku-10", "sku-2", 'Größe "7", rot', "sku-9"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A data directory prepared from logs with string item ids (vocab/items.txt)."""
    import csv

    from tfmm.data.prepare import PrepareOptions, prepare

    root = tmp_path_factory.mktemp("own")
    with open(root / "log.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("user_id", "item_id", "label", "timestamp")] + [
            (f"u{t % 3}", RAW_ITEMS[t % 4], t % 2, t) for t in range(12)])
    with open(root / "items.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("item_id",)] + [(i,) for i in RAW_ITEMS])
    prepare(PrepareOptions(str(root / "log.csv"), str(root / "items.csv"), str(root / "data")))
    return str(root / "data")


def _dense(data_dir):
    from tfmm.data import schema

    return schema.dense_ids(data_dir)


def _write(path, raw_ids, vectors, form):
    """A vector file of `form` (parquet, csv, csv_cells: one text cell, npy, npy_ids)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    vectors = np.asarray(vectors, np.float32)
    path = str(path)
    if form == "parquet":
        pq.write_table(pa.table({"item_id": raw_ids, "vector": vectors.tolist()}), path)
    elif form in ("csv", "csv_cells"):
        import csv

        with open(path, "w", newline="", encoding="utf-8-sig") as f:  # with a BOM
            w = csv.writer(f)
            if form == "csv":
                w.writerows([["item_id", *(f"c{j}" for j in range(vectors.shape[1]))]]
                            + [[r, *map(repr, v.tolist())] for r, v in zip(raw_ids, vectors)])
            else:
                w.writerows([["item_id", "vector"]]
                            + [[r, str(v.tolist())] for r, v in zip(raw_ids, vectors)])
    else:
        np.save(path, vectors)
        ids = path + (".ids.npy" if form == "npy_ids" else ".ids.txt")
        if form == "npy_ids":
            np.save(ids, np.array(raw_ids))
        else:
            with open(ids, "w", encoding="utf-8") as f:
                f.writelines(f"{r}\n" for r in raw_ids)
        return path, ids
    return path, None


FORMS = {"parquet": ".parquet", "csv": ".csv", "csv_cells": ".csv", "npy": ".npy",
         "npy_ids": ".npy"}


@pytest.mark.parametrize("form", FORMS)
def test_own_vectors_import_by_raw_id_and_round_trip_exactly(spec, prepared, tmp_path, form):
    from tfmm.data import schema
    from tfmm.index import files

    rng = np.random.default_rng(0)
    raw = RAW_ITEMS[::-1]  # file order is not vocabulary order
    given = rng.normal(size=(4, 5)).astype(np.float32) * 3
    path, ids = _write(tmp_path / f"in{FORMS[form]}", raw, given, form)
    result = files.import_vectors(spec, prepared, path, ids)
    assert (result["items"], result["skipped"], result["dim"]) == (4, 0, 5)
    index = open_index(spec)
    assert index.catalogue() == schema.catalogue_fingerprint(prepared)
    dense = _dense(prepared)
    got, found = index.get([dense[r] for r in raw])
    assert found.all()
    np.testing.assert_allclose(got, given / np.linalg.norm(given, axis=1, keepdims=True),
                               rtol=1e-6)
    # Out by raw id in the same format, and in again: the same float32 bits.
    out = tmp_path / f"out{FORMS[form]}"
    out_ids = str(out) + ".ids" + (".npy" if form == "npy_ids" else ".txt") \
        if form.startswith("npy") else None
    assert files.export_vectors(spec, prepared, out, out_ids) == 4
    back = files.read_vectors(out, out_ids)
    assert sorted(back.raw_ids) == sorted(raw)
    np.testing.assert_array_equal(back.vectors, index.get([dense[r] for r in back.raw_ids])[0])
    second = spec + "?prefix=b" if is_redis(spec) else str(tmp_path / "second.db")
    files.import_vectors(second, prepared, out, out_ids)
    np.testing.assert_array_equal(open_index(second).get(list(dense.values()))[0],
                                  index.get(list(dense.values()))[0])


GOOD = [("sku-10", [1, 0, 0]), ("sku-2", [0, 1, 0])]


def _csv(path, rows, header=("item_id", "vector")):
    with open(path, "w", encoding="utf-8") as f:
        f.write(",".join(header) + "\n" + "".join(f"{r}\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("rows, message", [
    (['sku-10,"1 0 0"', 'sku-2,"0 1"'], "row 3 (item 'sku-2'): 2 values, but row 2 has 3."),
    (['sku-10,"1 0 0"', 'sku-2,"nan 1 0"'], "row 3 (item 'sku-2'): the vector has NaN or Inf "
     "(1 such rows)."),
    (['sku-10,"1 0 0"', 'sku-2,"0 inf 0"'], "row 3 (item 'sku-2'): the vector has NaN or Inf "
     "(1 such rows)."),
    (['sku-10,"1 0 0"', 'nope,"0 1 0"'], "row 3 (item 'nope'): not an item of {data} (1 such "
     "rows; unknown='skip' leaves them out)."),
    (['sku-10,"1 0 0"', 'sku-2,"0 1 0"', 'sku-10,"0 0 1"'], "row 4 (item 'sku-10'): a "
     "duplicate id (first at row 2)."),
    (['sku-10,"1 0 0"', 'sku-2,"0 0 0"'], "row 3 (item 'sku-2'): a zero vector has no "
     "direction to normalise (1 such rows)."),
    (['sku-10,"1 0 0"', 'sku-2,"0 one 0"'], "row 3 (item 'sku-2'), column 'vector': '0 one 0' "
     "is not a list of numbers."),
    (['sku-10,"1 0 0"', ',"0 1 0"'], "row 3: empty item id."),
    (['sku-10,"1 0 0"', 'sku-2'], "CSV parse error: Row #3: Expected 2 columns, got 1: sku-2"),
    (['sku-10,"1 0 0"', 'sku-2,"0 1 0"'], "{vectors}: 3-d vectors, but {index} holds 2-d "
     "vectors; nothing was imported."),
])
def test_a_bad_vector_file_is_named_and_leaves_the_index_as_it_was(spec, prepared, tmp_path,
                                                                   rows, message):
    from tfmm.data import schema
    from tfmm.index import files

    dense = _dense(prepared)
    index = open_index(spec, dim=2 if "2-d" in message else 3)
    index.claim(schema.catalogue_fingerprint(prepared))
    before = index.put([dense["sku-9"]], [[1] + [0] * (index.dim - 1)])
    path = _csv(tmp_path / "v.csv", rows)
    with pytest.raises(ValueError) as error:
        files.import_vectors(spec, prepared, path)
    assert str(error.value).endswith(message.format(data=prepared, vectors=path,
                                                    index=repr(index))), str(error.value)
    assert str(error.value).startswith(path)
    np.testing.assert_array_equal(index.ids(), [dense["sku-9"]])
    assert index.versions([dense["sku-9"]])[0][0] == before


@pytest.mark.parametrize("form, message", [
    ("parquet_nan", "{path}: row 2 (item 'sku-2'): the vector has NaN or Inf (1 such rows)."),
    ("parquet_ragged", "{path}: row 2 (item 'sku-2'): 2 values, but row 1 has 3."),
    ("parquet_no_ids", "{path}: no 'item_id' column; it has ['id', 'vector']."),
    ("wide_text", "{path}: row 3 (item 'sku-2'), column 'c1': 'x' is not a number."),
    ("wide_empty", "{path}: row 3 (item 'sku-2'), column 'c1': empty cell."),
    ("npy_no_ids", "{path}: .npy vectors need `ids`, their raw item ids in row order."),
    ("npy_short_ids", "{path}.ids.txt: 1 ids for the 2 rows of {path}."),
    ("npy_1d", "{path}: want a numeric array [n, d], got float32 (3,)."),
    ("txt", "{path}: unknown format; expected Parquet, CSV (.csv) or NumPy (.npy)."),
])
def test_each_vector_file_error_is_one_line_naming_the_file(prepared, tmp_path, form,
                                                            message):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tfmm.index import files

    path, ids = str(tmp_path / "v"), None
    if form.startswith("parquet"):
        vectors = {"parquet_nan": [[1, 0, 0], [0, np.nan, 0]],
                   "parquet_ragged": [[1, 0, 0], [0, 1]]}.get(form, [[1, 0, 0], [0, 1, 0]])
        path += ".parquet"
        pq.write_table(pa.table({"id" if form == "parquet_no_ids" else "item_id":
                                 ["sku-10", "sku-2"], "vector": vectors}), path)
    elif form.startswith("wide"):
        path = _csv(path + ".csv", ["sku-10,1,0", "sku-2,1,x" if form == "wide_text"
                                    else "sku-2,1,"], header=("item_id", "c0", "c1"))
    elif form.startswith("npy"):
        path += ".npy"
        np.save(path, np.eye(2, 3, dtype=np.float32) if form != "npy_1d"
                else np.ones(3, np.float32))
        if form != "npy_no_ids":
            ids = path + ".ids.txt"
            with open(ids, "w") as f:
                f.write("sku-10\n" if form == "npy_short_ids" else "sku-10\nsku-2\n")
    else:
        path += ".txt"
        with open(path, "w") as f:
            f.write("item_id,vector\n")
    with pytest.raises(ValueError) as error:
        files.import_vectors(str(tmp_path / "i.db"), prepared, path, ids)
    assert str(error.value) == message.format(path=path)
    assert not os.path.exists(tmp_path / "i.db")  # a refused import creates no index


def test_unknown_ids_can_be_skipped_and_unit_vectors_kept_as_given(spec, prepared, tmp_path):
    from tfmm.index import files

    path = _csv(tmp_path / "v.csv", ['sku-10,"[0.6, 0.8]"', 'gone,"1 0"', 'sku-2,"3 4"'])
    with pytest.raises(ValueError, match=r"row 4 \(item 'sku-2'\): the vector's norm is 5, "
                       r"not 1 \(1 such rows\); normalize=False takes unit vectors only."):
        files.import_vectors(spec, prepared, path, unknown="skip", normalize=False)
    result = files.import_vectors(spec, prepared, path, unknown="skip")
    assert (result["items"], result["skipped"]) == (2, 1)
    dense = _dense(prepared)
    got, found = open_index(spec).get([dense["sku-10"], dense["sku-2"]])
    assert found.all()
    np.testing.assert_array_equal(got, np.array([[0.6, 0.8], [0.6, 0.8]], np.float32))
    with pytest.raises(ValueError, match=r"none of its 1 item ids is an item of"):
        files.import_vectors(spec, prepared, _csv(tmp_path / "w.csv", ['gone,"1 0"']),
                             unknown="skip")


def test_an_index_of_another_catalogue_is_refused_both_ways(spec, prepared, tmp_path):
    from tfmm.index import files

    index = open_index(spec, dim=3)
    index.claim("0123456789abcdef")
    path = _csv(tmp_path / "v.csv", ['sku-10,"1 0 0"'])
    for call in (lambda: files.import_vectors(spec, prepared, path),
                 lambda: files.export_vectors(spec, prepared, str(tmp_path / "o.csv"))):
        with pytest.raises(ValueError, match=r"holds vectors of another catalogue "
                           r"\(0123456789abcdef, not [0-9a-f]{16} of "):
            call()
    assert index.count() == 0 and not os.path.exists(tmp_path / "o.csv")


def _index_cli(*args):
    """`python -m tfmm.index` as a user runs it: quiet by its own default, so an error is
    all of stderr."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([sys.executable, "-m", "tfmm.index", *args], capture_output=True,
                          text=True, env=env)


@pytest.mark.slow  # tens of seconds or more: the full suite runs it, the fast loop not
def test_index_cli_imports_exports_and_names_errors_without_the_password(prepared, tmp_path):
    server = RedisServer(tmp_path, password=SECRET)
    try:
        url = f"redis://:{SECRET}@127.0.0.1:{server.port}/0?prefix=own"
        path, ids = _write(tmp_path / "v.npy", RAW_ITEMS, np.eye(4, 6), "npy")
        done = _index_cli("import", f"--data_dir={prepared}", f"--vectors={path}",
                          f"--ids={ids}", f"--index={url}")
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip() == (f"imported 4 6-d vectors from {path} into RedisIndex("
                                       f"redis://127.0.0.1:{server.port}/0 prefix=own, dim=6) "
                                       "(version 1)")
        out = tmp_path / "out.parquet"
        done = _index_cli("export", f"--data_dir={prepared}", f"--index={url}", f"--out={out}")
        assert done.returncode == 0, done.stderr[-2000:]
        assert "exported 4 vectors from redis://:***@" in done.stdout
        bad = _csv(tmp_path / "bad.csv", ['sku-10,"1 0 0 0 0 0"', 'nope,"0 1 0 0 0 0"'])
        failed = _index_cli("import", f"--data_dir={prepared}", f"--vectors={bad}",
                            f"--index={url}")
        assert failed.returncode == 1 and failed.stderr.strip() == (
            f"{bad}: row 3 (item 'nope'): not an item of {prepared} (1 such rows; "
            "unknown='skip' leaves them out).")
        usage = _index_cli("import", f"--data_dir={prepared}", f"--index={url}",
                           f"--out={out}")
        assert usage.returncode == 1 and usage.stderr.strip() == "--vectors is required for import."
        assert not _leaks(tmp_path, *(p.stdout + p.stderr for p in (done, failed, usage)))
    finally:
        server.stop()


@pytest.mark.slow  # tens of seconds or more: the full suite runs it, the fast loop not
def test_a_ranker_trains_on_imported_vectors_of_a_generated_world(tmp_path):
    """A generated world has no vocabulary: its raw ids are its dense ids."""
    from tfmm.data.synthetic import write_world
    from tfmm.data import world as world_lib

    data_dir = tmp_path / "tiny"
    write_world(world_lib.generate(world_lib.PRESETS["tiny"]), data_dir)
    num_items = json.load(open(data_dir / "metadata.json"))["vocab"]["num_items"]
    path, ids = _write(tmp_path / "v.npy", [str(i) for i in range(FIRST_ID, num_items)],
                       np.random.default_rng(0).normal(size=(num_items - FIRST_ID, 8)), "npy")
    index = str(tmp_path / "index.db")
    done = _index_cli("import", f"--data_dir={data_dir}", f"--vectors={path}", f"--ids={ids}",
                      f"--index={index}")
    assert done.returncode == 0, done.stderr[-2000:]
    proc = subprocess.run(
        [sys.executable, "-m", "tfmm.train", "--flagfile=configs/ctr.flags",
         f"--data_dir={data_dir}", f"--model_dir={tmp_path}/ctr", "--export_dir=",
         f"--index={index}", f"--pretrain_model_dir={tmp_path}/pretrain",
         "--encoder_export_dir=", "--model=simtier", "--embedding_dim=8",
         "--attention_units=8", "--mlp_units=16"],
        capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pre-training" not in proc.stdout
    assert json.load(open(tmp_path / "ctr" / "metrics.json"))["missing_item_vectors"] == 0


@pytest.mark.parametrize("name", ["v.parquet.snappy", "v.pq", "v.export"])
def test_parquet_is_recognised_by_its_bytes_or_any_parquet_name(prepared, tmp_path, name):
    from tfmm.index import files

    path, _ = _write(tmp_path / name, ["sku-2"], [[0, 1]], "parquet")
    assert files.import_vectors(str(tmp_path / "i.db"), prepared, path)["items"] == 1


def test_import_to_a_folder_is_one_line_and_creates_nothing(prepared, tmp_path):
    path, _ = _write(tmp_path / "v.parquet", RAW_ITEMS, np.eye(4, 6), "parquet")
    folder = tmp_path / "folder"
    folder.mkdir()
    proc = _index_cli("import", f"--data_dir={prepared}", f"--vectors={path}",
                      f"--index={folder}")
    assert proc.returncode == 1 and proc.stderr.strip() == (
        f"{folder} is a directory; an index is a file (e.g. {folder}/vectors.db).")
    assert not any(folder.iterdir())


@pytest.mark.slow
def test_import_onto_a_full_disk_is_one_line_and_leaves_no_index(prepared, tmp_path):
    from tests.test_prepare import _disk_limit

    # 4 x 32768 float32: 512 KB, past the 64 KB the process may write.
    path, _ = _write(tmp_path / "v.parquet", RAW_ITEMS,
                     np.random.default_rng(0).normal(size=(4, 32768)), "parquet")
    index = tmp_path / "index" / "vectors.db"
    proc = subprocess.run(
        [sys.executable, "-m", "tfmm.index", "import", f"--data_dir={prepared}",
         f"--vectors={path}", f"--index={index}"],
        capture_output=True, text=True, preexec_fn=_disk_limit(64 << 10),
        env={k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"})
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"{index}: disk I/O error (SQLite); nothing was written."], proc.stderr[-2000:]
    assert list((tmp_path / "index").iterdir()) == []  # no idx.db, -wal or -shm


@pytest.mark.parametrize("pages", [2, 12])  # full while creating the index, or at the put
def test_a_full_disk_leaves_no_new_index_and_an_old_one_unchanged(prepared, tmp_path,
                                                                  monkeypatch, pages):
    import sqlite3

    from tfmm.index import files

    connect = sqlite3.connect

    def small_disk(*args, **kwargs):  # SQLite's own "database or disk is full"
        db = connect(*args, **kwargs)
        db.execute(f"PRAGMA max_page_count={pages}")  # never below the file's size
        return db

    vectors = np.random.default_rng(0).normal(size=(4, 4096))  # 16 KB each
    half, _ = _write(tmp_path / "half.parquet", RAW_ITEMS[:2], vectors[:2], "parquet")
    whole, _ = _write(tmp_path / "whole.parquet", RAW_ITEMS, vectors, "parquet")
    old = tmp_path / "old.db"
    files.import_vectors(str(old), prepared, half)
    with contextlib.closing(SQLiteIndex(old)) as index:
        before = index.get(np.arange(2, 6)), index.versions(np.arange(2, 6))
    monkeypatch.setattr(sqlite3, "connect", small_disk)
    for target in (tmp_path / "new.db", old):
        with pytest.raises(OSError, match=r"db: database or disk is full \(SQLite\); nothing "
                                          r"was written\.$"):
            files.import_vectors(str(target), prepared, whole)
    monkeypatch.undo()
    assert not list(tmp_path.glob("new.db*"))  # not even an empty index without a width
    with contextlib.closing(SQLiteIndex(old)) as index:
        after = index.get(np.arange(2, 6)), index.versions(np.arange(2, 6))
    for a, b in zip([*before[0], *before[1]], [*after[0], *after[1]]):
        np.testing.assert_array_equal(a, b)
    assert before[0][1].sum() == 2  # two of the four items had vectors
