import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tfmm import ctr, data, encoder_checks, jobs
from tfmm.data import schema, world as world_lib
from tfmm.data.prepare import PrepareOptions, prepare
from tfmm.data.synthetic import write_raw
from tfmm.index import SQLiteIndex
from tfmm.metrics import auc, gauc, logloss

pytestmark = pytest.mark.slow  # trains models or runs the CLIs

SMALL_MODEL = dict(embedding_dim=8, attention_units=(8,), mlp_units=(16,),
                   make_units=(16, 8, 4, 1), batch_size=256)
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def own_data_dir(tmp):
    """The tiny world as a user's own data: its raw export prepared (no triplets)."""
    raw = tmp / "raw"
    write_raw(world_lib.generate(world_lib.PRESETS["tiny"]), raw)
    prepare(PrepareOptions(str(raw / "impressions.csv"), str(raw / "items.csv"),
                           str(tmp / "own"), str(raw / "images")))
    return str(tmp / "own")


def blank_content(data_dir, images=(), titles=()):
    """Empties the image bytes / titles of these item ids in a data directory's catalogue."""
    path = os.path.join(data_dir, "items.tfrecord")
    records = [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(path)]
    with tf.io.TFRecordWriter(path) as w:
        for example in records:
            f = example.features.feature
            for name, ids in (("image", images), ("title", titles)):
                if f["item_id"].int64_list.value[0] in ids:
                    f[name].bytes_list.value[0] = b""
            w.write(example.SerializeToString())


@pytest.fixture(scope="module")
def oracle(tiny_dir):
    meta = schema.read_metadata(tiny_dir)
    truth = np.load(f"{tiny_dir}/truth.npz")
    vecs = world_lib.oracle_vectors(truth["category"], truth["colour"], truth["pattern"],
                                    world_lib.WorldConfig(**meta["world"]))
    return data.Vectors.from_items(np.arange(len(vecs)) + schema.FIRST_ID, vecs,
                                   meta["vocab"]["num_items"])


def serve_test_set(export_path, tiny_dir, vectors=None):
    """Labels, users and the SavedModel's click probabilities on the test days."""
    serve = tf.saved_model.load(export_path).signatures["serving_default"]
    names = list(serve.structured_input_signature[1])
    ys, users, ps = [], [], []
    for f, y in data.impressions(tiny_dir, "test", batch_size=500, vectors=vectors):
        ps.append(serve(**{k: f[k] for k in names})["probability"].numpy()[:, 0])
        ys.append(y.numpy())
        users.append(f["user_id"].numpy())
    return names, np.concatenate(ys), np.concatenate(users), np.concatenate(ps)


def test_id_run_writes_metrics_that_its_savedmodel_reproduces(tiny_dir, tmp_path):
    config = ctr.CTRConfig(data_dir=tiny_dir, model_dir=str(tmp_path / "m"), model="id",
                           export_dir=str(tmp_path / "export"), epochs=2, **SMALL_MODEL)
    result = ctr.run(config)
    on_disk = json.load(open(tmp_path / "m" / "metrics.json"))
    assert on_disk["auc"] == result["auc"] and on_disk["config"]["model"] == "id"

    # The exported ranker, fed the reader's dense features, gives the reported metrics.
    names, y, users, p = serve_test_set(result["export_path"], tiny_dir)
    assert sorted(names) == sorted(["user_id", "item_id", "category_id", "history_item_ids",
                                    "history_category_ids", "history_mask"])
    assert result["export_path"] == str(tmp_path / "export" / "1")
    assert result["impressions"] == len(y)
    assert result["auc"] == pytest.approx(auc(y, p), abs=1e-5)
    assert result["gauc"] == pytest.approx(gauc(y, p, users)["gauc"], abs=1e-5)
    assert result["logloss"] == pytest.approx(logloss(y, p), abs=1e-5)
    assert result["gauc_unweighted"] == pytest.approx(gauc(y, p, users)["gauc_unweighted"],
                                                      abs=1e-5)

    # Per-epoch values: the last epoch's are the final model's.
    assert [e["epoch"] for e in result["epochs"]] == [1, 2]
    assert result["epochs"][-1]["auc"] == pytest.approx(result["auc"], abs=1e-9)

    # Frequency groups partition the impressions of items seen in training.
    groups = result["frequency_groups"]
    assert [g["group"] for g in groups] == list(range(1, 9))
    new = result["new_items"]["impressions"]
    assert 0 < new < len(y)
    assert sum(g["impressions"] for g in groups) + new == len(y)
    sizes = [g["items"] for g in groups]
    assert max(sizes) - min(sizes) <= 1
    assert "missing_item_vectors" not in result and "make" not in result
    assert os.listdir(tmp_path / "m" / "logs")  # TensorBoard


def test_simtier_make_run_pretrains_make_once_for_rankers_sharing_it(tiny_dir, oracle, tmp_path,
                                                                     capsys):
    shared = str(tmp_path / "make")
    config = ctr.CTRConfig(data_dir=tiny_dir, model_dir=str(tmp_path / "m"),
                           model="simtier_make", index="unused.db", make_epochs=2,
                           make_dir=shared, export_dir=str(tmp_path / "export"), **SMALL_MODEL)
    result = ctr.run(config, vectors=oracle)
    assert result["make"]["pretrain_epochs"] == 2 and not result["make"]["trainable"]
    assert [e["epoch"] for e in result["make"]["epochs"]] == [1, 2]
    assert result["missing_item_vectors"] == 0
    names, y, users, p = serve_test_set(result["export_path"], tiny_dir, oracle)
    assert {"item_vector", "history_vectors"} <= set(names)
    assert result["auc"] == pytest.approx(auc(y, p), abs=1e-5)
    assert "pre-training MAKE for 2 epochs" in capsys.readouterr().out

    # A ranker wanting fewer MAKE epochs reuses the shared directory's epoch-1 weights.
    fewer = ctr.run(dataclasses.replace(config, model="make", make_epochs=1, export_dir="",
                                        model_dir=str(tmp_path / "m1")), vectors=oracle)
    assert "pre-training MAKE" not in capsys.readouterr().out
    assert fewer["make"]["epochs"] == result["make"]["epochs"][:1]
    # ... and a different MAKE setting there is refused.
    with pytest.raises(ctr.SettingsError, match=r"--make_dir=.*other settings \(seed\)"):
        ctr.run(dataclasses.replace(config, seed=1, model_dir=str(tmp_path / "m2")),
                vectors=oracle)
    # MAKE's MLP input is one of them: eq. 4's weights do not fit a target-reading MLP.
    with pytest.raises(ctr.SettingsError,
                       match=r"--make_dir=.*other settings \(make_target_in_mlp\)"):
        ctr.run(dataclasses.replace(config, make_target_in_mlp=False,
                                    model_dir=str(tmp_path / "m3")), vectors=oracle)


def test_missing_vectors_fall_back_to_zeros_and_are_counted(tiny_dir, oracle, tmp_path):
    seen = np.concatenate([f["item_id"].numpy() for f, _ in data.impressions(
        tiny_dir, "train", features=["item_id"])])
    present = np.zeros_like(oracle.present)
    present[seen] = True  # the encoder has not embedded the new items yet
    table = np.where(present[:, None], oracle.table, 0.0).astype(np.float32)
    config = ctr.CTRConfig(data_dir=tiny_dir, model_dir=str(tmp_path / "m"), model="simtier",
                           index="unused.db", **SMALL_MODEL)
    result = ctr.run(config, vectors=data.Vectors(table, present))
    assert result["missing_item_vectors"] == result["new_items"]["impressions"] > 0


def test_live_vectors_reach_an_existing_dataset_after_a_refresh(tiny_dir, oracle):
    half = oracle.present & (np.arange(len(oracle.present)) % 2 == 0)
    live = data.Vectors(np.where(half[:, None], oracle.table, 0).astype(np.float32), half).live()
    ds = data.impressions(tiny_dir, "test", batch_size=4096, vectors=live,
                          features=["item_id", "item_vector", "item_vector_missing"])

    def first_batch():
        f, _ = next(iter(ds))
        return f["item_id"].numpy(), f["item_vector"].numpy(), f["item_vector_missing"].numpy()

    ids, vectors, missing = first_batch()
    np.testing.assert_array_equal(missing, ~half[ids])
    live.refresh(oracle)  # the same dataset object, a new epoch's iterator
    ids, vectors, missing = first_batch()
    assert not missing.any()
    np.testing.assert_array_equal(vectors, oracle.table[ids])
    with pytest.raises(TypeError, match=r"only a `live\(\)` table"):
        oracle.refresh(oracle)


def _oracle_index(path, data_dir, oracle):
    """An index at `path` holding `oracle`'s vectors for `data_dir`'s catalogue (no record)."""
    index = SQLiteIndex(path, dim=oracle.table.shape[1])
    index.claim(schema.catalogue_fingerprint(data_dir))
    ids = np.flatnonzero(oracle.present)
    index.put(ids, oracle.table[ids])
    index.close()


def test_refresh_vectors_trains_on_vectors_written_between_epochs(tiny_dir, oracle, tmp_path,
                                                                  monkeypatch):
    ids = np.flatnonzero(oracle.present)
    index = SQLiteIndex(tmp_path / "v.db", dim=oracle.table.shape[1])
    index.claim(schema.catalogue_fingerprint(tiny_dir))
    index.put(ids[::2], oracle.table[ids[::2]])
    begin = ctr.RefreshVectors.on_epoch_begin

    def encoder_writes_the_rest_during_epoch_1(self, epoch, logs=None):
        if epoch == 1:
            index.put(ids[1::2], oracle.table[ids[1::2]])
        begin(self, epoch, logs)

    monkeypatch.setattr(ctr.RefreshVectors, "on_epoch_begin",
                        encoder_writes_the_rest_during_epoch_1)
    config = ctr.CTRConfig(data_dir=tiny_dir, model_dir=str(tmp_path / "m"), model="simtier",
                           index=str(tmp_path / "v.db"), epochs=2, refresh_vectors=True,
                           **SMALL_MODEL)
    result = ctr.run(config)
    assert result["vector_refreshes"] == [
        {"epoch": 1, "items_with_vectors": len(ids[::2])},
        {"epoch": 2, "items_with_vectors": len(ids)}]
    assert result["missing_item_vectors"] == 0  # evaluated with the refreshed table
    with pytest.raises(ctr.SettingsError, match="--refresh_vectors needs a multimodal"):
        ctr.CTRConfig(data_dir=tiny_dir, model_dir="m", refresh_vectors=True,
                      model="id").validate()


def test_settings_errors_name_the_flag(tiny_dir, tmp_path):
    with pytest.raises(ctr.SettingsError, match="needs item vectors: set --index"):
        ctr.run(ctr.CTRConfig(data_dir=tiny_dir, model_dir=str(tmp_path), model="make"))
    with pytest.raises(ctr.SettingsError, match="--optimizer='rmsprop' is not one of"):
        ctr.run(ctr.CTRConfig(data_dir=tiny_dir, model_dir=str(tmp_path), optimizer="rmsprop"))
    empty = tmp_path / "empty.db"
    SQLiteIndex(empty, dim=4).close()
    with pytest.raises(ctr.SettingsError, match="empty.db holds no vectors"):
        ctr.run(ctr.CTRConfig(data_dir=tiny_dir, model_dir=str(tmp_path / "a"),
                              model="simtier", index=str(empty)))
    # An index built from another catalogue is refused, not silently joined by id.
    other = tmp_path / "other.db"
    index = SQLiteIndex(other, dim=4)
    index.claim("0123456789abcdef")
    index.put([2, 3], np.eye(2, 4, dtype=np.float32))
    with pytest.raises(ctr.SettingsError, match="other.db holds vectors of another catalogue"):
        ctr.run(ctr.CTRConfig(data_dir=tiny_dir, model_dir=str(tmp_path / "c"),
                              model="simtier", index=str(other)))
    # A model directory keeps one configuration: a different run there is refused.
    config = ctr.CTRConfig(data_dir=tiny_dir, model_dir=str(tmp_path / "b"), model="id",
                           **SMALL_MODEL)
    (directory, settings, flag), = ctr.CTRJob(config).directories()
    jobs.claim_dir(directory, settings)
    jobs.check_dir(directory, settings, flag)  # the same settings may resume
    (_, other, _), = ctr.CTRJob(dataclasses.replace(config, embedding_dim=4)).directories()
    with pytest.raises(ctr.SettingsError, match=r"other settings \(embedding_dim\)"):
        jobs.check_dir(directory, other, flag)
    # A user's folder that holds what a run writes (its backup is deleted when the run
    # ends, MAKE's epochs replaced) is refused before anything is written.
    mine = tmp_path / "mine"
    (mine / "backup").mkdir(parents=True)
    (mine / "backup" / "thesis.tex").write_text("years of work")
    (mine / "notes.txt").write_text("kept")
    with pytest.raises(ctr.SettingsError, match=re.escape(
            f"--model_dir={mine} holds backup but no run of tfmm (no config.json): a run "
            "would replace or delete them; use a fresh --model_dir.")):
        ctr.run(dataclasses.replace(config, model_dir=str(mine)))
    assert sorted(p.name for p in mine.rglob("*")) == ["backup", "notes.txt", "thesis.tex"]
    (mine / "backup" / "thesis.tex").unlink()
    (mine / "backup").rmdir()
    jobs.check_dir(str(mine), settings, flag)  # other files: kept beside the run's
    # Layer sizes are checked with the other settings, naming the flag.
    for name, units, message in (("mlp_units", (16, 0), "--mlp_units=16,0: every value must"),
                                 ("attention_units", (-1,), "--attention_units=-1: every"),
                                 ("make_units", (16, 8, 1), "--make_units=16,8,1: MAKEBlock")):
        with pytest.raises(ctr.SettingsError, match=message):
            dataclasses.replace(config, **{name: units}).validate()


def test_a_refused_run_writes_nothing(tiny_dir, oracle, tmp_path):
    other = tmp_path / "other.db"
    index = SQLiteIndex(other, dim=4)
    index.claim("0123456789abcdef")
    index.put([2, 3], np.eye(2, 4, dtype=np.float32))
    config = ctr.CTRConfig(data_dir=tiny_dir, model_dir=str(tmp_path / "m"), model="simtier",
                           index=str(other), export_dir="", **SMALL_MODEL)
    with pytest.raises(ctr.SettingsError, match="holds vectors of another catalogue"):
        ctr.run(config)
    with pytest.raises(ctr.SettingsError, match="--mlp_units=0: every value must be >= 1"):
        ctr.run(dataclasses.replace(config, mlp_units=(0,)), vectors=oracle)
    assert not os.path.exists(tmp_path / "m")
    # The fixed command runs in the same --model_dir.
    result = ctr.run(dataclasses.replace(config, index=str(tmp_path / "v.db")), vectors=oracle)
    assert [e["epoch"] for e in result["epochs"]] == [1]


def _truncated_copy(tiny_dir, tmp_path):
    """A copy of the tiny world whose first training shard lost its last bytes."""
    out = tmp_path / "data"
    shutil.copytree(tiny_dir, out)
    shard = schema.files(str(out), schema.read_metadata(str(out)), "impressions/train")[0]
    return str(out), shard


def _truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 7)


def test_a_truncated_record_is_named_by_file_and_number(tiny_dir, tmp_path, monkeypatch):
    data_dir, shard = _truncated_copy(tiny_dir, tmp_path)
    _truncate(shard)
    config = ctr.CTRConfig(data_dir=data_dir, model_dir=str(tmp_path / "m"), model="id",
                           **SMALL_MODEL)
    named = rf"--data_dir: {re.escape(shard)}: record \d+ is truncated or corrupt \(\d+ good"
    with pytest.raises(ctr.SettingsError, match=named):
        ctr.run(config)
    assert not os.path.exists(tmp_path / "m")

    # A file that goes bad during the run is named too (TensorFlow names none).
    data_dir, shard = _truncated_copy(tiny_dir, tmp_path / "later")
    counts = ctr.train_counts

    def truncated_after_the_check(config, num_items):
        _truncate(shard)
        return counts(config, num_items)

    monkeypatch.setattr(ctr, "train_counts", truncated_after_the_check)
    with pytest.raises(ctr.SettingsError, match=rf"{re.escape(shard)}: record \d+ is truncated"):
        ctr.run(dataclasses.replace(config, data_dir=data_dir,
                                    model_dir=str(tmp_path / "m2")))


def _cli(tiny_dir, runs, *extra):
    return [sys.executable, "-m", "tfmm.train", "--flagfile=configs/ctr.flags",
            f"--data_dir={tiny_dir}", f"--model_dir={runs}/ctr", f"--export_dir={runs}/export",
            f"--index={runs}/index.db", f"--pretrain_model_dir={runs}/pretrain",
            f"--encoder_export_dir={runs}/encoder", "--embedding_dim=8",
            "--attention_units=8", "--mlp_units=16", *extra]


def test_cli_fills_an_empty_index_then_trains_and_exports(tiny_dir, tmp_path):
    proc = subprocess.run(
        _cli(tiny_dir, tmp_path, "--model=simtier_make", "--pretrain_epochs=1", "--min_steps=0",
             "--pretrain_batch_size=32",
             "--queue_size=128", "--dim=16", "--make_epochs=1", "--make_units=16,8,4,1"),
        capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "is empty: pre-training the encoder first" in proc.stdout
    assert len(SQLiteIndex(tmp_path / "index.db").ids()) == schema.read_metadata(
        tiny_dir)["counts"]["items"]
    result = json.load(open(tmp_path / "ctr" / "metrics.json"))
    assert result["model"] == "simtier_make" and result["missing_item_vectors"] == 0
    lines = proc.stdout.strip().splitlines()
    assert lines[-2] == f"metrics: {tmp_path}/ctr/metrics.json"
    assert lines[-1] == f"SavedModel: {tmp_path}/export/1"
    assert f"{result['auc']:7.4f}" in lines[-4]  # the summary's "all test impressions" row


def test_cli_on_an_empty_index_pretrains_on_what_the_data_has_and_says_so(tmp_path):
    own = own_data_dir(tmp_path)
    proc = subprocess.run(
        _cli(own, tmp_path, "--model=simtier", "--pretrain_epochs=1", "--min_steps=0",
             "--pretrain_batch_size=32",
             "--queue_size=128", "--dim=8"), capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    source = ("image_title, on the 216 items with an image and a title (24 held out for "
              "Acc@N); both towers' vectors fused (no triplets for SCL)")
    assert f"pre-training: {source}" in proc.stdout
    result = json.load(open(tmp_path / "ctr" / "metrics.json"))
    assert result["pretrain_source"] == source and result["missing_item_vectors"] == 0
    pretrained = json.load(open(tmp_path / "pretrain" / "metrics.json"))["config"]
    # Not centred by default: the data dir's pairs do not come from clicks (it has none).
    assert pretrained["objective"] == "image_title" and not pretrained["center_vectors"]

    # Items with neither an image nor a title: one line, nothing written.
    blank_content(own, images=range(2, 242), titles=range(2, 242))
    runs = tmp_path / "again"
    assert _refused(_cli(own, runs, "--model=simtier")) == (
        f"{own}: no item has an image or a title, so there is nothing to pre-train the "
        "encoder on or to embed; prepare the items with --images_dir and/or a 'title' column.")
    assert not runs.exists()


def test_the_pretraining_into_an_empty_index_is_refused_by_its_own_flags(tiny_dir, tmp_path):
    from tfmm import pretrain, train

    config = ctr.CTRConfig(data_dir=tiny_dir, model_dir=str(tmp_path / "ctr"), model="simtier",
                           index=str(tmp_path / "index.db"), **SMALL_MODEL)
    encoder = pretrain.PretrainConfig(data_dir=tiny_dir, model_dir=str(tmp_path / "pretrain"),
                                      index=config.index, epochs=2, dim=8)
    # Its directory holds a pre-training of another length: refused before anything runs.
    jobs.claim_dir(encoder.model_dir, jobs.settings(dataclasses.replace(encoder, epochs=1)))
    with pytest.raises(ctr.SettingsError, match=re.escape(
            f"--pretrain_model_dir={tmp_path}/pretrain holds a run with other settings "
            "(epochs); use a fresh --pretrain_model_dir.")):
        train.ranker(config, encoder)
    assert sorted(os.listdir(tmp_path)) == ["pretrain"] and not os.path.exists(config.model_dir)


def _error_line(proc):
    """The one line a refused CLI run prints (after TensorFlow's start-up lines)."""
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def _refused(cmd):
    """Runs `cmd`, which must be refused; its one line."""
    return _error_line(subprocess.run(cmd, capture_output=True, text=True, env=ENV))


def test_cli_bad_flags_are_one_line_errors(tiny_dir, tmp_path):
    assert _refused(_cli(tiny_dir, tmp_path, "--model=id", "--mlp_units=16,x")) == (
        "--mlp_units=16,x: want integers.")
    assert _refused(_cli(tiny_dir, tmp_path, "--model=id", "--mlp_units=0")) == (
        "--mlp_units=0: every value must be >= 1.")
    assert not os.path.exists(tmp_path / "ctr")
    # The encoder's pre-training settings are named by the flags that set them.
    assert _refused(_cli(tiny_dir, tmp_path, "--model=simtier", "--queue_size=100",
                         "--pretrain_batch_size=32")) == (
        "--queue_size=100 must be a multiple of --pretrain_batch_size=32.")
    # A --data_dir without data is not filled with a new world unless --world asks for one.
    typo = tmp_path / "tinyy"
    assert _refused(_cli(str(typo), tmp_path, "--model=id")) == (
        f"--data_dir={typo} does not exist; give --world to generate a synthetic world there.")
    assert not typo.exists()


def damaged_copy(tiny_dir, tmp_path, edit):
    """A copy of the tiny world whose metadata.json `edit` (a function of the dict) changed."""
    copy = tmp_path / "damaged"
    shutil.copytree(tiny_dir, copy)
    meta = json.load(open(copy / "metadata.json"))
    edit(meta)
    (copy / "metadata.json").write_text(json.dumps(meta))
    return copy


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("vocab"), "'vocab' is missing (want {'num_items': int, 'num_users': int, "
     "'num_categories': int, ...}); the data directory is damaged: prepare or generate it "
     "again."),
    (lambda m: m["counts"].update({"impressions/train": 9000}),
     "counts 9000 records of impressions/train, its files hold 4500; the data directory is "
     "damaged: prepare or generate it again."),
])
def test_metadata_that_the_files_contradict_is_one_line_before_anything_is_written(
        tiny_dir, tmp_path, edit, message):
    data_dir = damaged_copy(tiny_dir, tmp_path, edit)
    path = data_dir / "metadata.json"
    assert _refused(_cli(str(data_dir), tmp_path, "--model=id")) == f"--data_dir: {path}" + (
        ": " if "vocab" in message else " ") + message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged"]  # no ctr/, no export/


@pytest.mark.parametrize("url, server", [
    ("redis://:pw-s3cret@127.0.0.1:1/0", "127.0.0.1:1"),
    ("unix:///nonexistent/redis.sock?prefix=x", "/nonexistent/redis.sock"),
])
def test_an_unreachable_index_server_is_one_line_before_anything_is_written(
        tiny_dir, tmp_path, url, server):
    proc = subprocess.run(_cli(tiny_dir, tmp_path, "--model=simtier", f"--index={url}"),
                          capture_output=True, text=True, env=ENV)
    assert _error_line(proc).startswith(f"--index: Redis index at {server} is unreachable: ")
    assert "pw-s3cret" not in proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []


def _kill_after_backup(cmd, out, epoch):
    """Runs `cmd` and kills it with SIGKILL as soon as `out`'s backup marks `epoch` done.

    Returns the epochs `out`'s epochs.json lists at the kill.
    """
    metadata = out / "backup" / "training_metadata.json"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 300
    while True:
        try:
            if json.loads(metadata.read_text())["epoch"] >= epoch:
                break
        except (OSError, ValueError):  # not there yet, or being written
            pass
        assert proc.poll() is None and time.time() < deadline, f"no backup of epoch {epoch}"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # The kill came after the backup and before the run's next epoch ended.
    assert json.loads(metadata.read_text())["epoch"] == epoch
    return [e["epoch"] for e in json.load(open(out / "epochs.json"))]


def _torn_backup(cmd, out, epoch):
    """Runs `cmd` (a ``python -m`` command) and kills it while it writes `out`'s backup of
    `epoch`, leaving that file truncated (tests/torn_backup.py); the epochs epochs.json
    lists at the kill."""
    module = cmd.index("-m") + 1
    proc = subprocess.run([*cmd[:module], "tests.torn_backup", str(epoch), str(out / "backup"),
                           *cmd[module:]], capture_output=True, text=True, env=ENV)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    return [e["epoch"] for e in json.load(open(out / "epochs.json"))]


def test_a_kill_while_the_backup_is_written_resumes(tiny_dir, tmp_path):
    cmd = _cli(tiny_dir, tmp_path, "--model=id", "--epochs=3", "--batch_size=32", "--export_dir=")
    # Epoch 2's metrics were written before its backup, which the kill tore.
    assert _torn_backup(cmd, tmp_path / "ctr", 2) == [1, 2]
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # Resumed from epoch 1's backup: epoch 2 trained again, its entry replaced.
    assert "Epoch 1/3" not in rerun.stdout and "Epoch 2/3" in rerun.stdout
    result = json.load(open(tmp_path / "ctr" / "metrics.json"))
    assert [e["epoch"] for e in result["epochs"]] == [1, 2, 3]
    assert not (tmp_path / "ctr" / "backup").exists()


def test_killed_run_resumes_from_its_last_epoch_with_every_epochs_metrics(tiny_dir, tmp_path):
    cmd = _cli(tiny_dir, tmp_path, "--model=id", "--epochs=3", "--batch_size=32")
    # Killed right after the backup of epoch 1: its test metrics were written before it.
    assert _kill_after_backup(cmd, tmp_path / "ctr", 1) == [1]
    first = json.load(open(tmp_path / "ctr" / "epochs.json"))[0]

    rerun = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Epoch 1/3" not in rerun.stdout and "Epoch 2/3" in rerun.stdout
    result = json.load(open(tmp_path / "ctr" / "metrics.json"))
    assert [e["epoch"] for e in result["epochs"]] == [1, 2, 3]
    assert result["epochs"][0] == first


def test_killed_make_pretraining_leaves_its_directory_to_one_run(tiny_dir, oracle, tmp_path):
    _oracle_index(tmp_path / "index.db", tiny_dir, oracle)
    cmd = _cli(tiny_dir, tmp_path, "--model=make", "--make_epochs=3", "--make_units=16,8,4,1",
               "--batch_size=32", "--export_dir=")
    make_dir = tmp_path / "ctr" / "make"
    assert _kill_after_backup(cmd, make_dir, 2) == [1, 2]

    # A ranker sharing the directory uses epochs 1-2 of that run, with their metrics.
    config = ctr.CTRConfig(data_dir=tiny_dir, model_dir=str(tmp_path / "other"), model="make",
                           index=str(tmp_path / "index.db"), make_epochs=2,
                           make_dir=str(make_dir), **dict(SMALL_MODEL, batch_size=32))
    shared = ctr.run(config)
    assert shared["make"]["epochs"] == json.load(open(make_dir / "epochs.json"))

    rerun = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Epoch 3/3" in rerun.stdout and "Epoch 2/3" not in rerun.stdout
    result = json.load(open(tmp_path / "ctr" / "metrics.json"))
    assert [e["epoch"] for e in result["make"]["epochs"]] == [1, 2, 3]
    assert result["make"]["epochs"][:2] == shared["make"]["epochs"]


def test_a_kill_while_makes_backup_is_written_resumes(tiny_dir, oracle, tmp_path):
    _oracle_index(tmp_path / "index.db", tiny_dir, oracle)
    cmd = _cli(tiny_dir, tmp_path, "--model=make", "--make_epochs=3", "--make_units=16,8,4,1",
               "--batch_size=64", "--export_dir=")
    assert _torn_backup(cmd, tmp_path / "ctr" / "make", 2) == [1, 2]
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Epoch 2/3" in rerun.stdout  # MAKE's epoch 2 again, from epoch 1's backup
    result = json.load(open(tmp_path / "ctr" / "metrics.json"))
    assert [e["epoch"] for e in result["make"]["epochs"]] == [1, 2, 3]


def test_a_ranker_on_an_untrained_encoder_says_so(tiny_dir, oracle, tmp_path, capsys):
    from tfmm import pretrain

    index = str(tmp_path / "random.db")
    pretrain.run(pretrain.PretrainConfig(data_dir=tiny_dir, model_dir=str(tmp_path / "p"),
                                         index=index, objective="random", dim=8, verbose=0))
    config = ctr.CTRConfig(data_dir=tiny_dir, model_dir=str(tmp_path / "m"), model="simtier",
                           index=index, **SMALL_MODEL)
    capsys.readouterr()
    result = ctr.run(config)
    printed = capsys.readouterr().out
    checks = result["encoder"]
    assert checks["recorded"]["source"].startswith("random: the untrained tower")
    # The untrained tower is its own reference: no better, by construction.
    assert (checks["snapshot"][encoder_checks.KEY]
            == checks["recorded"][f"{encoder_checks.KEY}_untrained"])
    assert checks["warning"].startswith("warning: the item vectors are no better than its "
                                        "untrained tower")
    assert checks["warning"] in printed.splitlines()
    with open(os.path.join(config.model_dir, "metrics.json")) as f:
        assert json.load(f)["encoder"] == checks
    # Vectors that group items as the world does, put in without a record: no warning.
    _oracle_index(tmp_path / "oracle.db", tiny_dir, oracle)
    good = ctr.run(dataclasses.replace(config, index=str(tmp_path / "oracle.db"),
                                       model_dir=str(tmp_path / "m2")))["encoder"]
    assert good["recorded"] is None and good["warning"] is None
    assert good["snapshot"][encoder_checks.KEY] > good["snapshot"][
        f"{encoder_checks.KEY}_chance"] + encoder_checks.MARGIN
