import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tests import parameter_server_chief as chief
from tfmm import data
from tfmm.data import schema
from tfmm.keras_compat import keras
from tfmm.layers import ShardedEmbedding
from tfmm.ranker import DINRanker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start(task_type, index, cluster, args, log):
    """A process of the cluster's task, its output in the file `log`."""
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2", TF_CONFIG=json.dumps(
        {"cluster": cluster, "task": {"type": task_type, "index": index}}))
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=f,
                                stderr=subprocess.STDOUT)


def reference_weights(saved, prefix):
    """The single-table ranker's weights, in order, from a sharded ranker's
    (``prefix:index:path`` keys; each table's shards concatenated)."""
    keys = sorted(k for k in saved if k.startswith(prefix + ":"))
    out, tables = [], []
    for key in keys:
        table, _, shard = key.split(":", 2)[2].rpartition("/embeddings_")
        if shard.isdigit() and tables and tables[-1] == table:
            out[-1] = np.concatenate([out[-1], saved[key]])
        else:
            out.append(saved[key])
        tables.append(table if shard.isdigit() else None)
    return out


def bce(model, features, label, training=False):
    p = model(features, training=training)
    return tf.reduce_mean(keras.losses.binary_crossentropy(tf.reshape(label, [-1, 1]), p))


@pytest.mark.slow
def test_ranker_trains_with_tables_split_over_two_parameter_servers(tiny_dir, tmp_path):
    ports = free_ports(5)
    cluster = {"chief": [f"localhost:{ports[0]}"],
               "worker": [f"localhost:{p}" for p in ports[1:3]],
               "ps": [f"localhost:{p}" for p in ports[3:]]}
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
    single = DINRanker(vocab, **args)
    single.set_weights(reference_weights(chief.weights(sharded, "w"), "w"))
    rng = np.random.default_rng(0)
    x = {"user_id": rng.integers(0, 5, 6), "item_id": rng.integers(0, 11, 6),
         "category_id": rng.integers(0, 4, 6), "history_item_ids": rng.integers(0, 11, (6, 3)),
         "history_category_ids": rng.integers(0, 4, (6, 3)),
         "history_mask": np.ones((6, 3), bool)}
    np.testing.assert_allclose(sharded(x).numpy(), single(x).numpy(), rtol=1e-6)
    assert DINRanker.from_config(sharded.get_config()).embedding_shards == 2
