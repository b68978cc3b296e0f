import json

import keras
import numpy as np
import pytest

from tfmm.callbacks import EpochRecord


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


def _fit(tmp_path, epochs, kill=None, kill_before_backup=True):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    backup = str(tmp_path / "backup")
    record = EpochRecord(str(tmp_path / "epochs.json"), backup,
                         weights=str(tmp_path / "epoch{epoch}.weights.h5"))
    callbacks = [record, keras.callbacks.BackupAndRestore(backup)]
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
