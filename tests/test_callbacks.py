import json
import os

import keras
import numpy as np
import pytest

from tfmm.callbacks import BackupAndRestore, EpochRecord


class Killed(Exception):
    pass


class KillAfterEpoch(keras.callbacks.Callback):
    """Stops the run at the end of an epoch, between two callbacks, as a kill there would."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            raise Killed


class EpochStarts(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch + 1)


def _fit(tmp_path, epochs, kill=None, kill_before_backup=True, more=()):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    backup = str(tmp_path / "backup")
    record = EpochRecord(str(tmp_path / "epochs.json"), backup,
                         weights=str(tmp_path / "epoch{epoch}.weights.h5"))
    callbacks = [record, BackupAndRestore(backup), *more]
    if kill:
        callbacks.insert(1 if kill_before_backup else 2, KillAfterEpoch(kill))
    x = np.arange(16, dtype="float32").reshape(8, 2)
    model.fit(x, x[:, :1], epochs=epochs, callbacks=callbacks, verbose=0)
    return model, record


def _epochs(tmp_path):
    return [v["epoch"] for v in json.load(open(tmp_path / "epochs.json"))]


@pytest.mark.slow
@pytest.mark.parametrize("kill_before_backup", [True, False])
def test_a_killed_run_records_every_epoch_once(tmp_path, kill_before_backup):
    with pytest.raises(Killed):
        _fit(tmp_path, 3, kill=2, kill_before_backup=kill_before_backup)
    # Epoch 2's entry and weights are written before its backup marks it done.
    assert _epochs(tmp_path) == [1, 2]
    assert (tmp_path / "epoch2.weights.h5").exists()
    model, record = _fit(tmp_path, 3)
    assert _epochs(tmp_path) == [1, 2, 3] == [v["epoch"] for v in record.values]
    assert set(record.values[0]) == {"epoch", "loss"}
    # The last epoch's weights file holds the final weights.
    saved = keras.models.clone_model(model)
    saved.load_weights(tmp_path / "epoch3.weights.h5")
    for a, b in zip(saved.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_fresh_run_empties_another_runs_record(tmp_path):
    _fit(tmp_path, 2)
    assert _epochs(tmp_path) == [1, 2]  # finished: the backup is gone
    with pytest.raises(Killed):
        _fit(tmp_path, 3, kill=1, kill_before_backup=False)
    assert _epochs(tmp_path) == [1]  # not the finished run's epoch 2


def test_a_kill_while_the_backup_is_written_resumes(tmp_path, monkeypatch):
    backup, written = str(tmp_path / "backup"), []
    save_weights = keras.Model.save_weights

    def torn(model, filepath, *args, **kwargs):
        save_weights(model, filepath, *args, **kwargs)
        if os.path.dirname(str(filepath)) == backup:
            written.append(filepath)
            if len(written) == 2:  # epoch 2's backup: a kill mid-write leaves it truncated
                with open(filepath, "r+b") as f:
                    f.truncate(96)
                raise Killed

    monkeypatch.setattr(keras.Model, "save_weights", torn)
    with pytest.raises(Killed):
        _fit(tmp_path, 3)
    monkeypatch.undo()
    assert _epochs(tmp_path) == [1, 2]
    starts = EpochStarts()
    model, record = _fit(tmp_path, 3, more=[starts])
    assert starts.epochs == [2, 3]  # from epoch 1's backup, the last one written whole
    assert _epochs(tmp_path) == [1, 2, 3] == [v["epoch"] for v in record.values]
    assert not os.path.exists(backup)


def test_the_backup_restores_the_weights_and_epoch_it_wrote(tmp_path):
    with pytest.raises(Killed):
        _fit(tmp_path, 3, kill=2, kill_before_backup=False)  # after epoch 2's backup
    backup = tmp_path / "backup"
    metadata = json.load(open(backup / "training_metadata.json"))
    assert metadata["epoch"] == 2
    assert sorted(os.listdir(backup)) == sorted(["training_metadata.json", metadata["weights"]])
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    restore = BackupAndRestore(str(backup))
    restore.set_model(model)
    restore.on_train_begin()
    saved = keras.models.clone_model(model)
    saved.load_weights(tmp_path / "epoch2.weights.h5")  # EpochRecord's copy of epoch 2
    for a, b in zip(saved.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert model._initial_epoch == 2
