"""Writes a data directory so that a failed run leaves nothing half-written.

Everything goes to a temporary sibling directory; only when every table and
``metadata.json`` are written is it renamed into place, replacing an older
directory of the same name. On an error the temporary directory is removed and
whatever was at ``out_dir`` before is untouched.
"""

import itertools
import json
import os
import shutil

import tensorflow as tf

from tfmm.data import schema


class DataDirWriter:
    """Context manager: ``with DataDirWriter(out) as w: w.write(...); w.finish(meta)``."""

    def __init__(self, out_dir):
        self.out_dir = os.path.abspath(out_dir)
        self.tmp_dir = f"{self.out_dir}.tmp-{os.getpid()}"
        self.files = {}
        self.counts = {}
        self._finished = False

    def __enter__(self):
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
            f"{stem}.tfrecord" if num_shards == 1 else f"{stem}-{i:05d}-of-{num_shards:05d}.tfrecord"
            for i in range(num_shards)
        ]
        per_shard = -(-count // num_shards)
        records = iter(records)
        written = 0
        for name in names:
            want = min(per_shard, count - written)
            with tf.io.TFRecordWriter(os.path.join(self.tmp_dir, name)) as w:
                write, got = w.write, 0
                for got, record in enumerate(itertools.islice(records, want), 1):
                    write(record)
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
