"""Keras callbacks of tfmm's jobs that any Keras training can reuse.

- `BackupAndRestore`: Keras' callback of that name, crash-safe: a kill while
  it writes leaves the previous backup whole.
- `EpochRecord`: per-epoch records that survive a kill, next to the backup
  (below).
- `RefreshVectors`: a new snapshot of the index table before every epoch, for
  datasets that read live vectors (near-line training).
- `MomentumQueueCallback` (`tfmm.momentum_queue`): MoCo's key-tower EMA and
  queue, switched on for `SCLModel` training.

`BackupAndRestore` marks an epoch done when its backup is written; a record
written after that (test metrics, losses, an epoch's weights) is lost when the
run is killed between the two, and the resumed run starts at the next epoch.
`EpochRecord`, listed before the backup callback, writes first: a run killed
between the two trains that epoch again and replaces its entry, so the record
lists every epoch exactly once.
"""

import json
import os

import keras

from tfmm.momentum_queue import MomentumQueueCallback

__all__ = ["BackupAndRestore", "EpochRecord", "MomentumQueueCallback", "RefreshVectors",
           "write_json"]


def write_json(path, value):
    """Whole or not at all: a killed run never leaves half a file."""
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1)
    os.replace(path + ".tmp", path)


class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` whose backup a kill cannot tear.

    Keras writes ``latest.weights.h5`` in place: a kill during the write leaves
    a truncated HDF5 file that the next run fails to open, so the run can
    never resume. Here each backup's weights go to a new file, written whole
    under another name and renamed; ``training_metadata.json``, replaced
    atomically after it, names that file and its epoch, and only then is the
    previous file deleted. A kill at any moment leaves the metadata naming a
    whole file: the run resumes from the last backup written in full and
    trains the epoch whose backup was torn again.

        callbacks = [record, BackupAndRestore("runs/x/backup")]
    """

    def _save_model(self):
        epoch = self._current_epoch
        os.makedirs(self.backup_dir, exist_ok=True)
        name = f"epoch{epoch}-batch{self._last_batch_seen}.weights.h5"
        partial = os.path.join(self.backup_dir, "partial.weights.h5")
        self.model.save_weights(partial, overwrite=True)
        os.replace(partial, os.path.join(self.backup_dir, name))
        write_json(self._training_metadata_path,
                   {"epoch": epoch, "batch": self._last_batch_seen, "weights": name})
        for old in os.listdir(self.backup_dir):  # the previous backup, now replaced
            if old.endswith(".weights.h5") and old != name:
                os.remove(os.path.join(self.backup_dir, old))

    def _load_model(self):
        if not os.path.exists(self._training_metadata_path):
            return super()._load_model()  # nothing to restore (or a backup of Keras' own)
        with open(self._training_metadata_path) as f:
            metadata = json.load(f)
        if "weights" not in metadata:
            return super()._load_model()
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        self.model.load_weights(os.path.join(self.backup_dir, metadata["weights"]))
        self.model._initial_epoch = metadata["epoch"]


class EpochRecord(keras.callbacks.Callback):
    """A JSON list with one entry per finished epoch, ``{"epoch": k, ...}``.

    Put it before ``BackupAndRestore(backup)`` in the callback list. The list
    is kept while `backup` exists (a killed run resuming); a fresh run empties
    it before its first epoch, so it never lists another run's epochs.

    Args:
        path: the JSON file.
        backup: the `BackupAndRestore` directory.
        weights: a file pattern with ``{epoch}`` ending in ``.weights.h5``:
            each epoch's weights are written there, whole, before its entry,
            so an entry always names weights of the same run.
    """

    def __init__(self, path, backup, weights=None):
        super().__init__()
        self.path, self.backup, self.weights = path, backup, weights
        self.values = []

    def epoch_values(self, epoch, logs):
        """The entry of 0-based `epoch` (without "epoch"); by default its logs."""
        return {k: float(v) for k, v in (logs or {}).items()}

    def columns(self):
        """The entries by key, without "epoch" (as Keras' ``History.history``)."""
        keys = [k for k in self.values[0] if k != "epoch"] if self.values else []
        return {k: [v[k] for v in self.values] for k in keys}

    def on_train_begin(self, logs=None):
        self.values = []
        if os.path.isdir(self.backup) and os.path.exists(self.path):
            with open(self.path) as f:
                self.values = json.load(f)
        write_json(self.path, self.values)

    def on_epoch_begin(self, epoch, logs=None):
        kept = [v for v in self.values if v["epoch"] <= epoch]
        if kept != self.values:  # killed after its entry, before its backup: trained again
            self.values = kept
            write_json(self.path, kept)

    def on_epoch_end(self, epoch, logs=None):
        if self.weights:
            path = self.weights.format(epoch=epoch + 1)
            partial = path[:-len(".weights.h5")] + ".partial.weights.h5"
            self.model.save_weights(partial)
            os.replace(partial, path)
        self.values.append({"epoch": epoch + 1, **self.epoch_values(epoch, logs)})
        write_json(self.path, self.values)


class RefreshVectors(keras.callbacks.Callback):
    """Copies a new snapshot of the index into the live vectors before each epoch.

    Datasets joined with `live` (`tfmm.data.Vectors.live`) read it when an
    epoch's iterator starts, which Keras does after ``on_epoch_begin``.
    """

    def __init__(self, index, live):
        super().__init__()
        self.index, self.live = index, live
        self.values = []

    def on_train_begin(self, logs=None):
        self.values = []  # MAKE's pre-training and the ranker each report their own

    def on_epoch_begin(self, epoch, logs=None):
        snapshot = self.index.snapshot(self.live.table.shape[0])
        self.live.refresh(snapshot)
        self.values.append({"epoch": epoch + 1, "items_with_vectors": int(snapshot.present.sum())})
