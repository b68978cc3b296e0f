import json
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.test_predictor import free_port
from tfmm.momentum_queue import MomentumQueueCallback
from tfmm.scl import SCLModel, info_nce, queue_logsumexp, triplet


def reference_info_nce(q, k, inv_t, extra=None, key_ids=None, extra_ids=None, mask_own=True):
    losses = []
    for i in range(len(q)):
        logits, own = [], None
        for j in range(len(k)):
            if j != i and mask_own and key_ids is not None and key_ids[j] == key_ids[i]:
                continue
            logits.append(q[i] @ k[j] * inv_t)
            if j == i:
                own = logits[-1]
        for j in range(0 if extra is None else len(extra)):
            if extra_ids is not None and (
                    extra_ids[j] == -1 or (mask_own and extra_ids[j] == key_ids[i])):
                continue
            logits.append(q[i] @ extra[j] * inv_t)
        logits = np.array(logits, np.float64)
        losses.append(-(own - np.log(np.exp(logits - logits.max()).sum()) - logits.max()))
    return np.array(losses)


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype("float32")


@pytest.mark.parametrize("mask_own", [True, False])
def test_info_nce_matches_numpy(mask_own):
    rng = np.random.default_rng(0)
    q, k = unit(rng.normal(size=(6, 5))), unit(rng.normal(size=(6, 5)))
    extra = unit(rng.normal(size=(8, 5)))
    key_ids = np.array([3, 4, 3, 5, 6, 7])
    extra_ids = np.array([-1, 4, 9, 9, 3, -1, 8, 10])
    got = info_nce(q, k, 1 / 0.07, extra, key_ids, extra_ids, mask_own).numpy()
    want = reference_info_nce(q, k, 1 / 0.07, extra, key_ids, extra_ids, mask_own)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    np.testing.assert_allclose(info_nce(q, k, 2.0).numpy(), reference_info_nce(q, k, 2.0),
                               rtol=1e-5)


def test_info_nce_of_one_replicas_rows_against_gathered_keys():
    """A replica's queries (rows 3..5 of 8) with the keys of all replicas, its own
    at `start`: the global per-row losses of those rows."""
    rng = np.random.default_rng(1)
    q, k = unit(rng.normal(size=(8, 5))), unit(rng.normal(size=(8, 5)))
    extra = unit(rng.normal(size=(4, 5)))
    key_ids = np.array([3, 4, 3, 5, 6, 4, 7, 8])  # 4 and 3 repeat across the rows' boundary
    extra_ids = np.array([-1, 4, 6, 9])
    want = reference_info_nce(q, k, 1 / 0.07, extra, key_ids, extra_ids)[3:6]
    got = info_nce(q[3:6], k, 1 / 0.07, extra, key_ids, extra_ids, start=3).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert not np.allclose(info_nce(q[3:6], k, 1 / 0.07, extra, key_ids, extra_ids).numpy(), want)


def reference_queue_logsumexp(q, extra, extra_ids, own_ids):
    """(log-sum-exp of each row's unmasked queue logits, its gradient w.r.t. q:
    the softmax-weighted sum of those keys), in float64, one row at a time."""
    values, grads = [], []
    for i in range(len(q)):
        keep = (extra_ids != -1) & (extra_ids != own_ids[i])
        logits = extra[keep].astype(np.float64) @ q[i]
        top = logits.max()
        weights = np.exp(logits - top)
        values.append(top + np.log(weights.sum()))
        grads.append((weights / weights.sum()) @ extra[keep])
    return np.array(values), np.array(grads)


@pytest.mark.parametrize("block", [3, 4, 100])  # blocks with a remainder, even ones, one block
def test_queue_logsumexp_and_its_gradient_match_a_reference(block):
    rng = np.random.default_rng(2)
    q = unit(rng.normal(size=(5, 6))) * 14.0
    extra = unit(rng.normal(size=(12, 6)))
    # Slots 0-2 empty (a whole first block when block=3), 7 and 9 hold rows' own items.
    extra_ids = np.array([-1, -1, -1, 20, 21, 22, 23, 11, 24, 13, 25, 26])
    own_ids = np.array([10, 11, 12, 13, 14])
    want, want_grad = reference_queue_logsumexp(q, extra, extra_ids, own_ids)
    upstream = rng.normal(size=5).astype("float32")
    qt = tf.constant(q)
    with tf.GradientTape() as tape:
        tape.watch(qt)
        got = queue_logsumexp(qt, extra, extra_ids, own_ids, block=block)
        weighted = tf.reduce_sum(got * upstream)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    np.testing.assert_allclose(tape.gradient(weighted, qt).numpy(), want_grad * upstream[:, None],
                               rtol=1e-4, atol=1e-6)
    # Without ids nothing is left out.
    unmasked, _ = reference_queue_logsumexp(q, extra, np.zeros(12, int), -np.ones(5, int))
    np.testing.assert_allclose(queue_logsumexp(q, extra, block=block).numpy(), unmasked, rtol=1e-5)
    # A queue of two keys per row: the keys are the chosen columns, value and gradient.
    wide = np.concatenate([unit(rng.normal(size=(12, 6))), extra, unit(rng.normal(size=(12, 2)))],
                          axis=1)
    with tf.GradientTape() as tape:
        tape.watch(qt)
        got = queue_logsumexp(qt, wide, extra_ids, own_ids, block=block, columns=slice(6, 12))
        weighted = tf.reduce_sum(got * upstream)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    np.testing.assert_allclose(tape.gradient(weighted, qt).numpy(), want_grad * upstream[:, None],
                               rtol=1e-4, atol=1e-6)


def test_info_nce_gradients_with_a_queue_match_the_concatenated_softmax():
    """The loss and its gradients (queries, temperature) against the textbook
    form: one softmax over [batch keys, queue] with masked logits at -inf."""
    rng = np.random.default_rng(3)
    q, k = tf.constant(unit(rng.normal(size=(6, 5)))), unit(rng.normal(size=(6, 5)))
    extra = unit(rng.normal(size=(10, 5)))
    key_ids = np.array([3, 4, 3, 5, 6, 7])
    extra_ids = np.array([-1, 4, 9, 9, 3, -1, 8, 10, 6, 6])
    inv_t = tf.constant(1 / 0.07)

    def textbook(q, inv_t):
        logits = tf.matmul(q, tf.concat([k, extra], 0), transpose_b=True) * inv_t
        ids = np.concatenate([key_ids, extra_ids])
        drop = (ids[None, :] == key_ids[:, None]) | (ids[None, :] == -1)
        drop[np.arange(6), np.arange(6)] = False  # each row's own positive stays
        logits = tf.where(drop, -np.inf, logits)
        return -tf.linalg.diag_part(tf.nn.log_softmax(logits)[:, :6])

    def loss_and_grads(fn):
        with tf.GradientTape() as tape:
            tape.watch([q, inv_t])
            loss = tf.reduce_sum(fn(q, inv_t) * np.arange(1, 7, dtype="float32"))
        return [loss.numpy()] + [g.numpy() for g in tape.gradient(loss, [q, inv_t])]

    got = loss_and_grads(lambda q, t: info_nce(q, k, t, extra, key_ids, extra_ids))
    want = loss_and_grads(textbook)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_an_empty_queue_leaves_the_in_batch_loss_and_its_gradient():
    rng = np.random.default_rng(4)
    q, k = tf.constant(unit(rng.normal(size=(4, 5)))), unit(rng.normal(size=(4, 5)))
    ids = np.arange(4)

    def loss_and_grad(extra=None, extra_ids=None):
        with tf.GradientTape() as tape:
            tape.watch(q)
            loss = tf.reduce_mean(info_nce(q, k, 1 / 0.07, extra, ids, extra_ids))
        return loss.numpy(), tape.gradient(loss, q).numpy()

    empty = loss_and_grad(np.zeros((8, 5), "float32"), -np.ones(8, int))
    for got, want in zip(empty, loss_and_grad()):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_triplet_hand_computed():
    q = np.array([[1.0, 0.0]], "float32")
    p = np.array([[0.8, 0.6]], "float32")
    n = np.array([[0.6, 0.8]], "float32")
    np.testing.assert_allclose(triplet(q, p, n, 0.5).numpy(), [0.5 - 0.8 + 0.6], rtol=1e-6)
    np.testing.assert_allclose(triplet(q, n, p, 0.1).numpy(), [0.1 - 0.6 + 0.8], rtol=1e-6)
    assert triplet(q, p, n, 0.1).numpy()[0] == 0.0


def tiny_tower(dim=4):
    x = keras.Input((3,))
    h = keras.layers.Dense(8, activation="tanh")(x)
    return keras.Model(x, keras.layers.UnitNormalization()(keras.layers.Dense(dim)(h)))


def batches(n=32, batch=8, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 1000, n)
    x = rng.normal(size=(n, 3)).astype("float32")
    return tf.data.Dataset.from_tensor_slices({
        "query": x + 0.1 * rng.normal(size=x.shape).astype("float32"), "positive": x,
        "negative": rng.normal(size=(n, 3)).astype("float32"), "positive_id": ids,
    }).batch(batch, drop_remainder=True)


def moco(queue_size=16, momentum=0.9, **kw):
    keras.utils.set_random_seed(0)
    model = SCLModel(tiny_tower(), make_key_tower=tiny_tower, queue_size=queue_size,
                     momentum=momentum, **kw)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    return model


def test_key_tower_is_the_ema_after_one_step():
    model = moco(momentum=0.9)
    key_before = [w.numpy().copy() for w in model.key_tower.trainable_weights]
    assert len(key_before) == len(model.tower.trainable_weights) == 4
    np.testing.assert_array_equal(key_before[0], model.tower.trainable_weights[0].numpy())
    model.fit(batches().take(1), epochs=1, verbose=0)
    query_after = [w.numpy() for w in model.tower.trainable_weights]
    assert not np.array_equal(query_after[0], key_before[0])
    for k_old, q_new, k_new in zip(key_before, query_after, model.key_tower.trainable_weights):
        want = np.float32(0.9) * k_old + np.float32(1 - 0.9) * q_new
        np.testing.assert_allclose(k_new.numpy(), want, rtol=1e-6, atol=1e-7)


def test_queue_fills_in_order_and_the_pointer_wraps():
    model = moco(queue_size=16)
    data = batches(n=24, batch=8)
    model.fit(data.take(1), epochs=1, verbose=0)
    assert model.queue.pointer.numpy() == 8
    ids = np.concatenate([b["positive_id"].numpy() for b in data])
    np.testing.assert_array_equal(model.queue.ids.numpy()[:8], ids[:8])
    np.testing.assert_array_equal(model.queue.ids.numpy()[8:], -1)
    model.fit(data.skip(1), epochs=1, verbose=0)  # 2 more batches: 8 + 16 = 24 -> wraps to 8
    assert model.queue.pointer.numpy() == 8
    np.testing.assert_array_equal(model.queue.ids.numpy(), np.concatenate([ids[16:24], ids[8:16]]))
    norms = np.linalg.norm(model.queue.keys.numpy(), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)


def test_queue_size_must_be_a_multiple_of_the_batch():
    model = moco(queue_size=20)
    with pytest.raises(ValueError, match=r"queue_size=20 must be a multiple of the batch size 8"):
        model.fit(batches(), epochs=1, verbose=0)
    with pytest.raises(ValueError, match="drop_remainder=True"):
        model.fit(batches().unbatch().batch(8), epochs=1, verbose=0)


def test_inverse_temperature_is_learned_and_clamped():
    model = moco()
    assert model.inverse_temperature().numpy() == pytest.approx(1 / 0.07, rel=1e-6)
    model.log_inverse_temperature.assign(math.log(1000.0))
    assert model.inverse_temperature().numpy() == pytest.approx(100.0)
    model.log_inverse_temperature.assign(math.log(10.0))
    model.fit(batches().take(1), epochs=1, verbose=0)
    assert abs(model.log_inverse_temperature.numpy() - math.log(10.0)) > 1e-5  # a trained weight
    with pytest.raises(ValueError, match="SCLModel: temperature=0.001"):
        SCLModel(tiny_tower(), temperature=0.001)


def test_checkpoint_restores_queue_pointer_and_key_tower(tmp_path):
    model = moco(queue_size=16)
    model.fit(batches(n=24), epochs=1, verbose=0)
    model.save_weights(tmp_path / "scl.weights.h5")
    resumed = moco(queue_size=16)
    resumed.load_weights(tmp_path / "scl.weights.h5")
    for name in ("keys", "ids", "pointer"):
        np.testing.assert_array_equal(getattr(resumed.queue, name).numpy(),
                                      getattr(model.queue, name).numpy())
    for a, b in zip(resumed.key_tower.weights, model.key_tower.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # Continuing both gives the same next state.
    model.fit(batches(n=8, seed=5), epochs=1, verbose=0)
    resumed.fit(batches(n=8, seed=5), epochs=1, verbose=0)
    np.testing.assert_allclose(resumed.queue.keys.numpy(), model.queue.keys.numpy(), rtol=1e-6)


def test_keras_file_round_trip_keeps_towers_queue_and_temperature(tmp_path):
    model = SCLModel(tiny_tower(), queue_size=16, momentum=0.9, temperature=0.1,
                     positive_tower="query")  # the key tower: a clone of the tower
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    model.fit(batches(n=24), epochs=1, verbose=0)
    model.save(tmp_path / "scl.keras")
    loaded = keras.saving.load_model(tmp_path / "scl.keras")
    assert type(loaded) is SCLModel
    assert json.dumps(loaded.get_config()) == json.dumps(model.get_config())  # tuples as lists
    assert loaded.positive_tower == "query" and loaded.queue.size == 16
    for a, b in zip(loaded.weights, model.weights):  # towers, temperature, queue, pointer
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert loaded.queue.pointer.numpy() == 8 and (loaded.queue.ids.numpy() != -1).sum() == 16
    x = next(iter(batches()))["query"]
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())


def test_in_batch_only_without_queue_trains_one_tower():
    keras.utils.set_random_seed(0)
    model = SCLModel(tiny_tower(), queue_size=0, triplet_weight=0.0)
    model.compile(optimizer=keras.optimizers.Adam(0.01))
    assert model.key_tower is None and model.queue is None
    before = model.evaluate(batches(), verbose=0, return_dict=True)["info_nce"]
    model.fit(batches(), epochs=20, verbose=0)
    assert model.evaluate(batches(), verbose=0, return_dict=True)["info_nce"] < before


def test_callback_needs_a_queue_model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="needs a model with a MomentumQueue"):
        model.fit(np.zeros((4, 3)), np.zeros((4, 1)), callbacks=[MomentumQueueCallback()],
                  verbose=0)
    with pytest.raises(ValueError, match="momentum=1.0 must be in"):
        MomentumQueueCallback(1.0)


@pytest.mark.parametrize("positive_tower", ["momentum", "query"])
def test_positive_tower_encodes_the_loss_side_and_the_key_tower_the_queue(positive_tower):
    model = moco(queue_size=16, positive_tower=positive_tower, triplet_weight=1.0)
    for w in model.key_tower.trainable_weights:  # make the two towers differ
        w.assign(w * 0.5 + 0.1)
    batch = next(iter(batches()))
    with tf.GradientTape() as tape:
        nce, trip, positive_out, _ = model.compute_losses(batch, training=False)
        loss = nce + trip
    enqueue = model.queue_keys(batch, positive_out, training=False)
    grads = tape.gradient(loss, model.tower.trainable_weights)
    query = model.tower(batch["query"]).numpy()
    loss_tower = model.tower if positive_tower == "query" else model.key_tower
    positive = loss_tower(batch["positive"]).numpy()
    negative = loss_tower(batch["negative"]).numpy()
    inv_t = float(model.inverse_temperature())
    ids = batch["positive_id"].numpy()
    queue_keys, queue_ids = model.queue.keys.numpy(), model.queue.ids.numpy()
    want = reference_info_nce(query, positive, inv_t, queue_keys, ids, queue_ids).mean()
    np.testing.assert_allclose(float(nce), want, rtol=1e-5)
    want_trip = np.maximum(0.2 - (query * positive).sum(-1) + (query * negative).sum(-1), 0)
    np.testing.assert_allclose(float(trip), want_trip.mean(), rtol=1e-5, atol=1e-7)
    # The queue always gets the key tower's encodings.
    np.testing.assert_allclose(enqueue.numpy(), model.key_tower(batch["positive"]).numpy(),
                               rtol=1e-6)
    # The gradient reaches the tower through the positives only with positive_tower="query".
    with tf.GradientTape() as tape:
        pos = model.tower(batch["positive"])
        pos = pos if positive_tower == "query" else tf.stop_gradient(loss_tower(batch["positive"]))
        neg = model.tower(batch["negative"])
        neg = neg if positive_tower == "query" else tf.stop_gradient(loss_tower(batch["negative"]))
        q = model.tower(batch["query"])
        want_loss = (tf.reduce_mean(info_nce(q, pos, inv_t, model.queue.keys, ids, queue_ids))
                     + tf.reduce_mean(triplet(q, pos, neg, 0.2)))
    for got, want in zip(grads, tape.gradient(want_loss, model.tower.trainable_weights)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-6)


def test_positive_tower_is_checked():
    with pytest.raises(ValueError, match=r"SCLModel: positive_tower='key' is not one of"):
        moco(positive_tower="key")


def replicas_run(out, *worker):
    """tests/scl_replicas.py in a subprocess (devices are set before TF starts)."""
    return subprocess.Popen([sys.executable, "-m", "tests.scl_replicas", str(out), *worker],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def assert_replicas_equal_one_process(runs, cases=("momentum", "query")):
    """Each case (positive_tower momentum or query; fit: Keras' fit) on 2 replicas
    equals one process."""
    ids = runs["ids"]  # 3 global batches of 8 into a queue of 16
    for case in cases:
        single, replicas = (
            {k.split("/")[-1]: runs[k] for k in runs.files if k.startswith(f"{case}/{name}/")}
            for name in ("single", "replicas"))
        assert replicas["copies_equal"], case
        for run in (single, replicas):  # the pointer advanced by the global batch
            assert run["pointer"] == 8
            np.testing.assert_array_equal(run["queue_ids"], np.concatenate([ids[16:], ids[8:16]]))
        np.testing.assert_allclose(replicas["losses"], single["losses"], rtol=1e-5)
        weights = sorted(k for k in single if k.startswith("weight_"))
        assert len(weights) == 20  # temperature, 2 towers of 8, queue (4), BN moving stats
        for k in weights:
            np.testing.assert_allclose(replicas[k], single[k], rtol=1e-5, atol=1e-6,
                                       err_msg=f"{case} {k}")


@pytest.mark.slow  # tens of seconds or more: the full suite runs it, the fast loop not
def test_two_replicas_equal_one_process_on_the_global_batch(tmp_path):
    """MirroredStrategy on 2 logical CPUs, strategy.run(train_step) and fit, vs one process."""
    proc = replicas_run(tmp_path / "replicas.npz")
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    runs = np.load(tmp_path / "replicas.npz")
    # gather_replicas: replica 0's rows [0, 1, 2] then replica 1's [10, 11, 12], on both.
    np.testing.assert_array_equal(runs["gathered"], [[0, 1, 2, 10, 11, 12]] * 2)
    np.testing.assert_array_equal(runs["starts"], [0, 3])
    assert_replicas_equal_one_process(runs, ("momentum", "query", "fit"))


@pytest.mark.slow
def test_two_workers_equal_each_other_and_one_process(tmp_path):
    """MultiWorkerMirroredStrategy, 2 worker processes on loopback ports."""
    ports = f"{free_port()},{free_port()}"
    procs = [replicas_run(tmp_path / f"worker{i}.npz", str(i), ports) for i in range(2)]
    for proc in procs:
        assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    runs = [np.load(tmp_path / f"worker{i}.npz") for i in range(2)]
    assert runs[0].files == runs[1].files
    for k in runs[0].files:
        np.testing.assert_array_equal(runs[0][k], runs[1][k], err_msg=k)
    assert_replicas_equal_one_process(runs[0])
