"""Writes a data directory so that a failed run leaves nothing half-written.

Everything goes to a temporary sibling directory; only when every table and
``metadata.json`` are written is it renamed into place, replacing an older
directory of the same name. On an error the temporary directory is removed and
whatever was at ``out_dir`` before is untouched. An ``out_dir`` that holds an
input, or user files (a non-empty directory tfmm did not write), is refused
when the writer is made (`tfmm.outputs.check_output_dir`); the directory it
writes is marked as tfmm's, so a rerun may replace it.
"""

import itertools
import json
import os
import shutil

import tensorflow as tf

from tfmm import outputs
from tfmm.data import schema


class DataDirWriter:
    """Context manager: ``with DataDirWriter(out) as w: w.write(...); w.finish(meta)``.

    Made before the inputs are read, it refuses an `out_dir` that is or holds one
    of `inputs` or user files (ValueError naming `flag`).
    """

    def __init__(self, out_dir, inputs=(), flag="out_dir"):
        self._check = lambda: outputs.check_output_dir(out_dir, flag, inputs)
        self._check()
        self.out_dir = os.path.abspath(out_dir)
        self.tmp_dir = f"{self.out_dir}.tmp-{os.getpid()}"
        self.files = {}
        self.counts = {}
        self._finished = False

    def __enter__(self):
        self._check()  # again: the inputs were read meanwhile
        os.makedirs(os.path.dirname(self.out_dir), exist_ok=True)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        os.makedirs(self.tmp_dir)
        return self

    def write(self, table, records, count, num_shards=1):
        """Writes `count` serialised records of `table` (e.g. 'impressions/train').

        `records` is an iterable, consumed once; shards hold contiguous runs of
        it, so a time-ordered table stays time-ordered when read shard by shard.
        """
        stem = table.replace("/", "-")
        names = [
            f"{stem}.tfrecord" if num_shards == 1
            else f"{stem}-{i:05d}-of-{num_shards:05d}.tfrecord"
            for i in range(num_shards)
        ]
        per_shard = -(-count // num_shards)
        records = iter(records)
        written = 0
        for name in names:
            want = min(per_shard, count - written)
            try:
                with tf.io.TFRecordWriter(os.path.join(self.tmp_dir, name)) as w:
                    write, got = w.write, 0
                    for got, record in enumerate(itertools.islice(records, want), 1):
                        write(record)
            except tf.errors.OpError as e:  # a full disk: ResourceExhaustedError, no errno
                raise OSError(f"{self.out_dir}: cannot write {table} "
                              f"({e.message.rsplit('; ', 1)[-1]}); {self.out_dir} is left as "
                              "it was.") from None
            written += got
            if got < want:
                raise ValueError(f"{table}: {written} records, {count} announced.")
        if next(records, None) is not None:
            raise ValueError(f"{table}: more records than the {count} announced.")
        self.files[table] = names
        self.counts[table] = count

    def add(self, table, names, count):
        """Lists a table whose `count` records someone else (a Beam pipeline)
        wrote into the files `names` of this directory."""
        self.files[table] = list(names)
        self.counts[table] = count

    def path(self, name):
        """A path inside the directory being written, for extra files."""
        return os.path.join(self.tmp_dir, name)

    def finish(self, metadata):
        """Moves the directory into place; with `metadata` None, it holds no
        ``metadata.json`` (raw files, not a data directory)."""
        if metadata is not None:
            metadata = dict(metadata, format=schema.FORMAT, files=self.files, counts=self.counts)
            with open(os.path.join(self.tmp_dir, "metadata.json"), "w") as f:
                json.dump(metadata, f, indent=1, sort_keys=True)
        outputs.mark(self.tmp_dir)
        old = f"{self.out_dir}.old-{os.getpid()}"
        if os.path.exists(self.out_dir):
            os.rename(self.out_dir, old)
        os.rename(self.tmp_dir, self.out_dir)
        shutil.rmtree(old, ignore_errors=True)
        self._finished = True

    def __exit__(self, exc_type, exc, tb):
        if not self._finished:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
        return False
