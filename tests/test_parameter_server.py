import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tests import parameter_server_chief as chief
from tests.test_ctr import serve_test_set
from tfmm import ctr, data, distribute, parameter_server
from tfmm.data import schema
from tfmm.keras_compat import keras
from tfmm.layers import ShardedEmbedding
from tfmm.metrics import auc, logloss
from tfmm.ranker import DINRanker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(task_type, index, cluster, args, log):
    """A process of the cluster's task, its output in the file `log`."""
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2", TF_CONFIG=json.dumps(
        {"cluster": cluster, "task": {"type": task_type, "index": index}}))
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=f,
                                stderr=subprocess.STDOUT)


def reference_weights(saved, prefix):
    """The single-table ranker's weights, in order (saved as ``prefix:index``)."""
    return [saved[k] for k in sorted(saved) if k.startswith(prefix + ":")]


def bce(model, features, label, training=False):
    p = model(features, training=training)
    return tf.reduce_mean(keras.losses.binary_crossentropy(tf.reshape(label, [-1, 1]), p))


@pytest.mark.slow
def test_ranker_trains_with_tables_split_over_two_parameter_servers(tiny_dir, tmp_path):
    cluster = distribute.loopback_cluster(chief=1, worker=2, ps=2)
    out = str(tmp_path / "run")
    procs = [start(t, i, cluster, ["tfmm.parameter_server"], tmp_path / f"{t}{i}.log")
             for t in ("ps", "worker") for i in range(len(cluster[t]))]
    try:
        procs.append(start("chief", 0, cluster, ["tests.parameter_server_chief", tiny_dir, out],
                           tmp_path / "chief.log"))
        returncode = procs[-1].wait(timeout=120)
        assert returncode == 0, (tmp_path / "chief.log").read_text()[-3000:]
    finally:
        for proc in procs:  # the servers run until killed
            proc.kill()
            proc.wait()
    with open(out + ".json") as f:
        run = json.load(f)
    saved = dict(np.load(out + ".npz"))
    meta = schema.read_metadata(tiny_dir)
    num_items = meta["vocab"]["num_items"]

    # The item table: one part on each parameter server, the parts make the table.
    shards = run["item_shards"]
    assert sorted(s["device"] for s in shards) == [f"/job:ps/replica:0/task:{i}/device:CPU:0"
                                                    for i in range(2)]
    assert [s["shape"] for s in shards] == [[num_items - num_items // 2, 8],
                                             [num_items // 2, 8]]
    # Each worker reads its own input shard.
    assert sorted(set(run["input_shards"])) == [0, 1]

    # The first step equals one step of the single-table ranker on the first batch.
    model = DINRanker(meta["vocab"], **chief.RANKER)
    model.set_weights(reference_weights(saved, "init"))
    features, label = next(iter(data.impressions(
        tiny_dir, "train", batch_size=chief.BATCH_SIZE, max_history=chief.RANKER["max_history"],
        features=list(model.input), validate=False)))
    optimizer = keras.optimizers.Adam(chief.LEARNING_RATE)
    with tf.GradientTape() as tape:
        loss = bce(model, features, label, training=True)
    optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
    assert run["losses"][0] == pytest.approx(float(loss), rel=1e-5)
    step1, init = reference_weights(saved, "step1"), reference_weights(saved, "init")
    for w, after, initial in zip(model.weights, step1, init):
        np.testing.assert_allclose(after, w.numpy(), atol=1e-6, err_msg=w.path)
        assert w.trainable != np.array_equal(after, initial), w.path

    # More steps on both workers lower the loss of that batch.
    before = float(bce(model, features, label))
    model.set_weights(reference_weights(saved, "end"))
    assert len(run["losses"]) == 1 + chief.STEPS
    assert float(bce(model, features, label)) < before


def test_sharded_embedding_looks_up_the_rows_of_the_whole_table():
    layer = ShardedEmbedding(7, 3, num_shards=3)
    ids = np.array([[0, 2, 3], [4, 6, 5]])
    out = layer(ids).numpy()
    assert [tuple(w.shape) for w in layer.weights] == [(3, 3), (2, 3), (2, 3)]
    table = np.concatenate([w.numpy() for w in layer.weights])
    np.testing.assert_array_equal(out, table[ids])
    clone = ShardedEmbedding.from_config(layer.get_config())
    assert (clone.input_dim, clone.output_dim, clone.num_shards) == (7, 3, 3)
    with pytest.raises(ValueError, match="num_shards=8"):
        ShardedEmbedding(7, 3, num_shards=8)


def test_sharded_ranker_scores_like_the_single_table_ranker():
    vocab = {"num_items": 11, "num_users": 5, "num_categories": 4}
    args = {"max_history": 3, "embedding_dim": 4, "attention_units": (4,), "mlp_units": (4,)}
    sharded = DINRanker(vocab, embedding_shards=2, **args)
    single = parameter_server.joined(sharded)
    assert single.embedding_shards == 1
    np.testing.assert_array_equal(single.item_embedding.embeddings.numpy(), np.concatenate(
        [w.numpy() for w in sharded.item_embedding.weights]))
    rng = np.random.default_rng(0)
    x = {"user_id": rng.integers(0, 5, 6), "item_id": rng.integers(0, 11, 6),
         "category_id": rng.integers(0, 4, 6), "history_item_ids": rng.integers(0, 11, (6, 3)),
         "history_category_ids": rng.integers(0, 4, (6, 3)),
         "history_mask": np.ones((6, 3), bool)}
    np.testing.assert_allclose(sharded(x).numpy(), single(x).numpy(), rtol=1e-6)
    assert DINRanker.from_config(sharded.get_config()).embedding_shards == 2


@pytest.mark.slow
def test_ctr_job_on_parameter_servers_resumes_and_exports_one_ranker(tiny_dir, tmp_path):
    cluster = distribute.loopback_cluster(chief=1, worker=1, ps=2)
    out = tmp_path / "run"
    # The same command on every task.
    args = ["tfmm.train", "--task=ctr", "--model=id", "--strategy=parameter_server",
            f"--data_dir={tiny_dir}", f"--model_dir={out}", f"--export_dir={tmp_path}/export",
            "--epochs=3", "--batch_size=64", "--embedding_dim=8", "--attention_units=8",
            "--mlp_units=16"]
    procs = [start(t, i, cluster, args, tmp_path / f"{t}{i}.log")
             for t in ("ps", "worker") for i in range(len(cluster[t]))]
    try:
        # The chief killed once its first epoch's checkpoint is written ...
        procs.append(start("chief", 0, cluster, args, tmp_path / "chief.log"))
        deadline = time.time() + 120
        while tf.train.latest_checkpoint(str(out / "backup")) is None:
            assert procs[-1].poll() is None, (tmp_path / "chief.log").read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint"
            time.sleep(0.05)
        procs[-1].kill()
        procs[-1].wait()
        # ... and started again: it resumes with the servers that kept running.
        procs.append(start("chief", 0, cluster, args, tmp_path / "chief2.log"))
        returncode = procs[-1].wait(timeout=120)
        log = (tmp_path / "chief2.log").read_text()
        assert returncode == 0, log[-3000:]
    finally:
        for proc in procs:  # the servers run until killed
            proc.kill()
            proc.wait()
    assert "Epoch 1/3" not in log and "Epoch 2/3" in log
    # An epoch is as many steps as one pass over the training days has batches.
    steps = -(-schema.read_metadata(tiny_dir)["counts"]["impressions/train"] // 64)
    assert log.count(f"{steps}/{steps} - ") == 2, log[-3000:]
    with open(out / "metrics.json") as f:
        result = json.load(f)
    assert [e["epoch"] for e in result["epochs"]] == [1, 2, 3]
    with open(out / "epochs.json") as f:
        assert json.load(f) == result["epochs"]
    assert not (out / "backup").exists()

    # The item table: one block of rows on each parameter server.
    num_items = schema.read_metadata(tiny_dir)["vocab"]["num_items"]
    assert result["embedding_shards"]["item_embedding"] == [
        {"device": f"/job:ps/replica:0/task:{i}/device:CPU:0", "rows": num_items // 2}
        for i in range(2)]

    # The export is one table per ID (the shards joined) and scores the test days as the
    # sharded ranker did.
    loaded = tf.saved_model.load(result["export_path"])
    shapes = {v.name: v.shape.as_list() for v in loaded.variables}
    assert shapes["item_embedding/embeddings:0"] == [num_items, 8]
    _, y, users, p = serve_test_set(result["export_path"], tiny_dir)
    assert auc(y, p) == pytest.approx(result["auc"], abs=1e-6)
    assert logloss(y, p) == pytest.approx(result["logloss"], rel=1e-5)


@pytest.mark.slow  # tens of seconds or more: the full suite runs it, the fast loop not
def test_what_parameter_servers_cannot_run_is_refused_in_one_line(tiny_dir, tmp_path,
                                                                  monkeypatch):
    base = dict(data_dir=tiny_dir, model_dir=str(tmp_path), index="x.db",
                strategy="parameter_server")
    with pytest.raises(ctr.SettingsError, match="--optimizer=dense_adam cannot run with "
                                                "--strategy=parameter_server"):
        ctr.CTRConfig(optimizer="dense_adam", **base).validate()
    with pytest.raises(ctr.SettingsError, match="--refresh_vectors cannot run with"):
        ctr.CTRConfig(model="simtier", refresh_vectors=True, **base).validate()
    ctr.CTRConfig(**base).validate()
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="needs the cluster in"):
        distribute.strategy("parameter_server")
    monkeypatch.setenv("TF_CONFIG", json.dumps(
        {"cluster": {"chief": ["localhost:1"], "worker": ["localhost:2"], "ps": ["localhost:3"]},
         "task": {"type": "ps", "index": 0}}))
    with pytest.raises(ValueError, match="names a worker or ps task"):
        distribute.strategy("parameter_server")
    monkeypatch.delenv("TF_CONFIG")  # (a ps task's command would serve)
    # Pre-training's tables are small: the command says so, and writes nothing.
    proc = subprocess.run(
        [sys.executable, "-m", "tfmm.train", "--task=pretrain", "--strategy=parameter_server",
         f"--data_dir={tiny_dir}", f"--model_dir={tmp_path}/pretrain"], cwd=ROOT,
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "--strategy=parameter_server is for --task=ctr, whose ID tables may outgrow a machine; "
        "pre-training's are small: use multi_worker.")
    assert not (tmp_path / "pretrain").exists()


def test_the_chief_says_which_servers_it_waits_for_and_gives_up(capsys):
    cluster = distribute.loopback_cluster(chief=1, worker=1, ps=2)
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(cluster), task_type="chief", task_id=0)
    listening = []
    try:
        for address in cluster["worker"] + cluster["ps"][:1]:  # ps 1 never starts
            host, port = address.split(":")
            listening.append(socket.create_server((host, int(port))))
        start = time.monotonic()
        with pytest.raises(parameter_server.ClusterTimeout) as error:
            parameter_server.wait_for_servers(resolver, timeout=1.0, poll=0.1)
        assert 1.0 <= time.monotonic() - start < 10
        assert str(error.value).startswith(
            f"ps 1 ({cluster['ps'][1]}) of the cluster in $TF_CONFIG did not start within 1 s "
            "(--cluster_timeout): start it")
        assert capsys.readouterr().err == (
            f"chief: waiting for ps 1 ({cluster['ps'][1]}) of the cluster to start "
            "(giving up after 1 s, --cluster_timeout)\n")
        host, port = cluster["ps"][1].split(":")
        listening.append(socket.create_server((host, int(port))))
        parameter_server.wait_for_servers(resolver, timeout=1.0)  # all up: no word
        assert capsys.readouterr().err == ""
    finally:
        for s in listening:
            s.close()


@pytest.mark.slow
def test_a_chief_whose_servers_never_start_gives_up_in_one_line(tiny_dir, tmp_path):
    cluster = distribute.loopback_cluster(chief=1, worker=1, ps=1)
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CONFIG=json.dumps(
        {"cluster": cluster, "task": {"type": "chief", "index": 0}}))
    proc = subprocess.run(
        [sys.executable, "-m", "tfmm.train", "--task=ctr", "--model=id",
         "--strategy=parameter_server", "--cluster_timeout=2", f"--data_dir={tiny_dir}",
         f"--model_dir={tmp_path}/ctr", f"--export_dir={tmp_path}/export"], cwd=ROOT,
        capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-2].startswith("chief: waiting for worker 0 (")
    assert lines[-1].startswith("--strategy=parameter_server: worker 0 (") and \
        "did not start within 2 s (--cluster_timeout)" in lines[-1]
    assert not os.path.exists(tmp_path / "ctr")
