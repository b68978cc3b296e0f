"""The job skeleton (tfmm.jobs) and the one-process distribution it hands the jobs."""

import dataclasses
import hashlib
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfmm import distribute, jobs
from tfmm.callbacks import EpochRecord
from tfmm.config import SettingsError, check_settings, setting


@dataclasses.dataclass
class Settings:
    model_dir: str = setting(dataclasses.MISSING, "Where.")
    epochs: int = setting(1, "Epochs.", low=1)
    strategy: str = setting("none", "Strategy.", choices=distribute.STRATEGIES)
    index: str = setting("", "Index.")

    def validate(self):
        return check_settings(self)


class Job(jobs.Job):
    """Records the order of its steps; refuses its input when `bad`."""

    def __init__(self, config, steps, bad=False):
        super().__init__(config)
        self.steps, self.bad = steps, bad

    def check(self, dist):
        self.steps.append("check")
        if self.bad:
            raise SettingsError("--model_dir: bad input")

    def load(self, dist):
        self.steps.append("load")

    def train(self, dist):
        self.steps.append("train")
        return {"auc": 0.75}


def test_a_job_takes_the_steps_in_order_and_writes_its_metrics(tmp_path):
    steps = []
    config = Settings(model_dir=str(tmp_path / "m"), index="redis://:s3cret@h:1/0")
    result = jobs.run(Job(config, steps), before=[
        lambda dist: steps.append("before") or {"pretrain_source": "SCL"}])
    assert steps == ["check", "before", "load", "train"]
    written = json.load(open(tmp_path / "m" / "metrics.json"))
    assert written == result and result["auc"] == 0.75 and result["pretrain_source"] == "SCL"
    assert result["config"]["index"] == "redis://:***@h:1/0" and result["train_seconds"] >= 0
    claimed = json.load(open(tmp_path / "m" / "config.json"))
    assert claimed == {"model_dir": str(tmp_path / "m"), "epochs": 1, "strategy": "none",
                       "index": "redis://:***@h:1/0"}
    # The same directory with other settings is refused before any step.
    steps.clear()
    with pytest.raises(SettingsError, match=r"holds a run with other settings \(epochs\)"):
        jobs.run(Job(dataclasses.replace(config, epochs=2), steps))
    assert steps == []


def test_a_refused_job_writes_nothing(tmp_path):
    for job, message in ((Job(Settings(model_dir=str(tmp_path), epochs=0), []),
                          "--epochs=0 must be >= 1."),
                         (Job(Settings(model_dir=str(tmp_path)), [], bad=True),
                          "--model_dir: bad input")):
        with pytest.raises(SettingsError, match=message):
            jobs.run(job)
    with pytest.raises(SettingsError, match="--index: gone"):
        jobs.run(Job(Settings(model_dir=str(tmp_path)), []), before=[_refuse])
    assert not list(tmp_path.iterdir())


def _refuse(dist):
    raise SettingsError("--index: gone")


def _data(rows=64):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 3)).astype("float32")
    return x, (x.sum(axis=1) > 0).astype("float32")


def _model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(keras.optimizers.SGD(0.1), "binary_crossentropy")
    return model


def test_one_process_distribution_trains_as_keras_fit_does(tmp_path):
    dist = distribute.distribution("none")
    assert dist is distribute.distribution("none") and dist.strategy is None
    assert dist.is_chief and dist.chief_value(7) == 7 and dist.embedding_shards == 1
    x, y = _data()
    expected = _model()
    expected.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    with dist.scope():
        model = _model()
    record = EpochRecord(str(tmp_path / "epochs.json"), distribute.backup_dir(str(tmp_path)))
    batches = lambda slices=None, shard=None: tf.data.Dataset.from_tensor_slices(  # noqa: E731
        (x, y)).batch(16)
    dist.fit(model, batches, 2, str(tmp_path), record, verbose=0)
    for got, want in zip(model.get_weights(), expected.get_weights()):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
    assert [e["epoch"] for e in json.load(open(tmp_path / "epochs.json"))] == [1, 2]
    assert list((tmp_path / "logs").iterdir()) and not (tmp_path / "backup").exists()
    np.testing.assert_allclose(dist.predict(model, batches()), model.predict(x, verbose=0),
                               atol=1e-6)
    np.testing.assert_allclose(dist.predict_on_batch(model, x[:5]),
                               model.predict(x[:5], verbose=0), atol=1e-6)
    assert dist.describe(model) == {} and dist.exportable(model) is model


def test_replicas_in_sync_train_as_one_process_and_describe_their_weights(tmp_path):
    # One local replica: every global batch is its slice, weighing each row 1.
    dist = distribute.distribution("mirrored")
    assert isinstance(dist, distribute.Replicas) and dist.is_chief
    x, y = _data()
    one = _model()
    one.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    with dist.scope():
        model = _model()
    record = EpochRecord(str(tmp_path / "epochs.json"), distribute.backup_dir(str(tmp_path)))

    def batches(slices=None, shard=None):  # as the reader: rows cut, then "parsed"
        rows = tf.data.Dataset.range(len(x)).batch(16)
        rows = rows.map(lambda i: (i,)) if slices is None else slices(rows)
        return rows.map(lambda i, *w: (tf.gather(x, i), tf.gather(y, i), *w))

    dist.fit(model, batches, 2, str(tmp_path), record, verbose=0)
    for got, want in zip(model.get_weights(), one.get_weights()):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert [e["epoch"] for e in record.values] == [1, 2] and not (tmp_path / "backup").exists()
    np.testing.assert_allclose(dist.predict(model, batches()), one.predict(x, verbose=0),
                               atol=1e-6)
    digest = hashlib.sha256(b"".join(np.ascontiguousarray(w).tobytes()
                                     for w in model.get_weights())).hexdigest()
    assert dist.describe(model) == {"weights_sha256": digest}
