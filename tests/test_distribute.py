"""Training under tf.distribute: two local workers on loopback against one process."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tfmm import distribute
from tests.test_ctr import ENV, _cli

TIMEOUT = 240  # a worker whose peer died waits for it forever: never the test


def _start_workers(cmd, n=2):
    """`cmd` on `n` workers of a fresh loopback cluster (TF_CONFIG), output to pipes."""
    cluster = distribute.loopback_cluster(worker=n)
    return [subprocess.Popen(
        [*cmd, "--strategy=multi_worker"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=dict(ENV, TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": i}})))
        for i in range(n)]


def _finish(procs):
    """The workers' outputs once all exited 0; kills them all on a failure or timeout."""
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT)[0])
            assert proc.returncode == 0, outputs[-1][-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return outputs


def _digest(output):
    return re.search(r"trained weights \(worker \d\): sha256 (\w+)", output).group(1)


def _variables(export):
    return {v.name: v.numpy() for v in tf.saved_model.load(str(export)).variables}


def _files(root):
    """Files under `root`, TensorBoard's event files by their directory."""
    return sorted(re.sub(r"events\.out\.tfevents\..*", "events", str(p.relative_to(root)))
                  for p in root.rglob("*") if p.is_file())


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adam", "sparse_adam"])  # rows as looked up; id sums
def test_two_workers_train_the_one_process_model(tiny_dir, tmp_path, optimizer):
    # 501 rows a batch: the workers' slices differ by one row (250 and 251), which
    # the rows' loss weights must make up for.
    flags = ["--model=id", "--epochs=2", "--batch_size=501", f"--optimizer={optimizer}"]
    one = tmp_path / "one"
    proc = subprocess.run(_cli(tiny_dir, one, *flags), capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two"
    outputs = _finish(_start_workers(_cli(tiny_dir, two, *flags)))
    assert _digest(outputs[0]) == _digest(outputs[1])  # bitwise the same weights

    expected, got = _variables(one / "export" / "1"), _variables(two / "export" / "1")
    assert sorted(got) == sorted(expected)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-6, err_msg=name)
    a, b = (json.load(open(d / "ctr" / "metrics.json")) for d in (one, two))
    assert b["weights_sha256"] == _digest(outputs[0])
    for key in ("auc", "gauc", "logloss"):
        assert b[key] == pytest.approx(a[key], abs=1e-5)
        assert b["new_items"][key] == pytest.approx(a["new_items"][key], abs=1e-5)
    assert [g["impressions"] for g in b["frequency_groups"]] == [
        g["impressions"] for g in a["frequency_groups"]]
    assert [e["epoch"] for e in b["epochs"]] == [1, 2]
    # The chief alone wrote, what one process writes: no worker's temporary
    # checkpoints, no backup left.
    assert _files(two) == _files(one)
    assert "ctr/metrics.json" in _files(two) and "ctr/logs/train/events" in _files(two)
    assert "SavedModel" in outputs[0] and "SavedModel" not in outputs[1]


@pytest.mark.slow
def test_a_worker_killed_mid_epoch_resumes_with_every_epoch_once(tiny_dir, tmp_path):
    cmd = _cli(tiny_dir, tmp_path, "--model=id", "--epochs=3", "--batch_size=64")
    procs = _start_workers(cmd)
    checkpoint = tmp_path / "ctr" / "backup" / "checkpoint"
    deadline = time.time() + TIMEOUT
    try:
        while not checkpoint.exists():  # epoch 1 is done: epoch 2 is under way
            assert all(p.poll() is None for p in procs) and time.time() < deadline, (
                "no checkpoint of epoch 1")
            time.sleep(0.01)
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait()
        try:  # its peer waits for it, or fails
            procs[0].wait(timeout=3)
        except subprocess.TimeoutExpired:
            pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    first = json.load(open(tmp_path / "ctr" / "epochs.json"))
    assert [e["epoch"] for e in first][:1] == [1] and len(first) < 3

    outputs = _finish(_start_workers(cmd))  # the same command, a fresh cluster
    assert "Epoch 1/3" not in outputs[0] and "Epoch 3/3" in outputs[0]
    assert _digest(outputs[0]) == _digest(outputs[1])
    result = json.load(open(tmp_path / "ctr" / "metrics.json"))
    assert [e["epoch"] for e in result["epochs"]] == [1, 2, 3]
    assert result["epochs"][0] == first[0]


# The text tower, which has no BatchNorm: the image tower's synchronized BatchNorm ends up to
# 3e-3 from one process after an epoch here (float rounding of the cross-replica variance that
# Adam magnifies, we believe); tests/scl_replicas.py checks BatchNorm over 3 steps at 1e-5.
PRETRAIN_FLAGS = ["--epochs=1", "--batch_size=32", "--queue_size=128", "--dim=16",
                  "--modality=text", "--min_steps=0"]


def _pretrain_cmd(tiny_dir, runs):
    return [sys.executable, "-m", "tfmm.train", "--flagfile=configs/pretrain.flags",
            f"--data_dir={tiny_dir}", f"--model_dir={runs}/model",
            f"--export_dir={runs}/export", f"--index={runs}/index.db", *PRETRAIN_FLAGS]


@pytest.fixture(scope="module")
def pretrained(tiny_dir, tmp_path_factory):
    """A 2-worker pre-training run: (its directory, the workers' outputs)."""
    runs = tmp_path_factory.mktemp("pretrain2")
    return runs, _finish(_start_workers(_pretrain_cmd(tiny_dir, runs)))


@pytest.mark.slow
def test_two_worker_pretraining_writes_its_outputs_once(pretrained):
    runs, outputs = pretrained
    result = json.load(open(runs / "model" / "metrics.json"))
    assert len(result["history"]["loss"]) == 1 and result["index_items"] == 240
    assert result["export_path"].endswith(os.path.join("export", "1"))
    assert [e["epoch"] for e in json.load(open(runs / "model" / "epochs.json"))] == [1]
    assert os.listdir(runs / "model" / "logs")
    assert not (runs / "model" / "backup").exists()
    assert not any("workertemp" in f for f in _files(runs))
    assert "metrics:" in outputs[0] and "metrics:" not in outputs[1]


@pytest.mark.slow
def test_two_worker_pretraining_equals_one_process(pretrained, tiny_dir, tmp_path):
    runs, outputs = pretrained
    assert _digest(outputs[0]) == _digest(outputs[1])  # queue contents included
    proc = subprocess.run(_pretrain_cmd(tiny_dir, tmp_path), capture_output=True, text=True,
                          env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected, got = _variables(tmp_path / "export" / "1"), _variables(runs / "export" / "1")
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-5, err_msg=name)


@pytest.mark.slow  # tens of seconds or more: the full suite runs it, the fast loop not
def test_multi_worker_without_a_cluster_is_one_line(tiny_dir, tmp_path):
    env = {k: v for k, v in ENV.items() if k != "TF_CONFIG"}
    proc = subprocess.run([*_cli(tiny_dir, tmp_path, "--model=id"), "--strategy=multi_worker"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "--strategy=multi_worker: strategy='multi_worker' needs the cluster in $TF_CONFIG.")
    assert not os.path.exists(tmp_path / "ctr")


class _Context:
    def __init__(self, pipeline, pipelines):
        self.input_pipeline_id, self.num_input_pipelines = pipeline, pipelines


@pytest.mark.parametrize("rows, sizes", [(8, [2, 2, 2, 2]), (10, [2, 3, 2, 3]),
                                         (1, [0, 0, 0, 1])])
def test_replica_slices_split_every_global_batch_and_weigh_its_rows(rows, sizes):
    batches = tf.data.Dataset.range(2 * rows).batch(rows)
    parts = {}
    for worker in range(2):  # 2 workers of 2 replicas: 4 slices of every batch, in turn
        ds = distribute.replica_slices(_Context(worker, 2), 4)(batches)
        parts[worker] = [(x.numpy().tolist(), w.numpy().tolist()) for x, w in ds]
    for k in range(2):  # the k-th global batch: every row once, in order
        pieces = parts[0][2 * k:2 * k + 2] + parts[1][2 * k:2 * k + 2]
        assert sum((x for x, _ in pieces), []) == list(range(k * rows, (k + 1) * rows))
        assert [len(x) for x, _ in pieces] == sizes
        # Keras averages a replica's loss and scales it by 1/4; these weights make
        # every row's share 1/rows: 4 * n / rows each.
        for (_, w), n in zip(pieces, sizes):
            np.testing.assert_allclose(w, [4 * n / rows] * n, rtol=1e-7)


def test_equal_slices_keep_a_static_batch_size():
    batches = tf.data.Dataset.range(16).batch(8, drop_remainder=True)
    ds = distribute.replica_slices(_Context(1, 2), 2, weights=False)(batches)
    assert ds.element_spec.shape.as_list() == [4]
    assert [x.numpy().tolist() for x in ds] == [[4, 5, 6, 7], [12, 13, 14, 15]]


def test_strategy_none_is_one_process():
    assert distribute.strategy("none") is None and distribute.is_chief(None)
    assert distribute.chief_value(None, 7) == 7


@pytest.mark.parametrize("strategy, tf_config, message", [
    ("multi_worker", {}, "names no cluster for strategy='multi_worker': it needs "
     '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": ..., "index": ...}}'),
    ("multi_worker", {"cluster": {"worker": []}}, "names no cluster"),
    ("multi_worker", [], "names no cluster"),
    ("multi_worker", {"cluster": {"worker": ["localhost:1", "localhost:2"]}},
     "task None is not a task of its cluster (worker: 2)"),
    ("multi_worker", {"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker",
                                                                      "index": 1}},
     "task {'type': 'worker', 'index': 1} is not a task of its cluster"),
    ("parameter_server", {"cluster": {"chief": ["localhost:1"], "worker": ["localhost:2"]},
                          "task": {"type": "chief", "index": 0}},
     'it needs {"cluster": {"ps": ["host:port", ...], "worker"'),
])
def test_a_tf_config_without_this_processs_cluster_is_refused(monkeypatch, strategy, tf_config,
                                                               message):
    """An empty TF_CONFIG made MultiWorkerMirroredStrategy train as one local worker."""
    monkeypatch.setenv("TF_CONFIG", json.dumps(tf_config))
    with pytest.raises(ValueError, match=re.escape(message)):
        distribute.strategy(strategy)


def test_a_tf_config_of_one_worker_or_a_sparse_cluster_passes_the_check(monkeypatch):
    for tf_config in ({"cluster": {"worker": ["localhost:1"]},
                       "task": {"type": "worker", "index": 0}},
                      {"cluster": {"chief": ["localhost:1"], "worker": {"3": "localhost:2"}},
                       "task": {"type": "worker", "index": 3}}):
        monkeypatch.setenv("TF_CONFIG", json.dumps(tf_config))
        distribute.check_tf_config("multi_worker")


class _Killed(Exception):
    pass


def test_a_kill_while_a_checkpoint_is_written_resumes(tmp_path, monkeypatch):
    """The --strategy path's backup (tf.train.CheckpointManager): a checkpoint counts once
    the state file names it, which TensorFlow replaces atomically after the checkpoint's
    files are whole; a kill before then leaves the previous one in force."""
    import keras

    from tfmm.callbacks import EpochRecord

    strategy = distribute.strategy("mirrored")
    backup = str(tmp_path / "backup")
    x = np.arange(16, dtype="float32").reshape(8, 2)

    def fit(starts):
        with strategy.scope():
            model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
            model.compile(keras.optimizers.SGD(0.01), "mse")
        record = EpochRecord(str(tmp_path / "epochs.json"), backup)
        begin = keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, _: starts.append(e + 1))
        distribute.fit(model, strategy,
                       lambda _: tf.data.Dataset.from_tensor_slices((x, x[:, :1])).batch(4), 3,
                       backup, chief_callbacks=[record, begin], verbose=0)
        return [v["epoch"] for v in record.values]

    record_state = tf.train.CheckpointManager._record_state

    def torn(manager):
        if manager.latest_checkpoint.endswith("ckpt-2"):  # written, then cut by the kill
            for path in tf.io.gfile.glob(f"{backup}/ckpt-2*"):
                with open(path, "r+b") as f:
                    f.truncate(min(96, os.path.getsize(path)))
            raise _Killed
        record_state(manager)

    monkeypatch.setattr(tf.train.CheckpointManager, "_record_state", torn)
    starts = []
    with pytest.raises(_Killed):
        fit(starts)
    monkeypatch.undo()
    assert starts == [1, 2] and tf.train.latest_checkpoint(backup).endswith("ckpt-1")
    starts = []
    assert fit(starts) == [1, 2, 3]
    assert starts == [2, 3]  # epoch 2 again, from epoch 1's checkpoint
    assert not os.path.exists(backup)
