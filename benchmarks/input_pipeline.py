"""Is the input pipeline ever the bottleneck? Reader examples/s next to the
training step's examples/s of the ID DIN ranker, same batch size.

    python -m benchmarks.input_pipeline --data_dir=data/small --batch_size=1024
"""

import os
import time

from absl import flags
import tensorflow as tf

from tfmm import cli, data
from tfmm.data import schema
from tfmm.keras_compat import keras
from tfmm.ranker import DINRanker

FLAGS = flags.FLAGS


def reader_rate(data_dir, batch_size, max_history):
    """Examples/s of the reader as training uses it: the ID ranker's features only."""
    model = DINRanker(schema.read_metadata(data_dir)["vocab"], max_history)
    n, start = 0, time.perf_counter()
    for _, label in data.impressions(data_dir, "train", batch_size=batch_size,
                                     max_history=max_history, features=list(model.input),
                                     validate=False):
        n += int(label.shape[0])
    return n, n / (time.perf_counter() - start)


def step_rate(data_dir, batch_size, max_history, steps):
    meta = schema.read_metadata(data_dir)
    model = DINRanker(meta["vocab"], max_history)
    model.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy")
    batches = data.impressions(data_dir, "train", batch_size=batch_size,
                               max_history=max_history, drop_remainder=True,
                               features=list(model.input), validate=False)
    cached = batches.take(20).cache()
    for _ in cached:  # fill the cache: the model step alone is timed
        pass
    model.fit(cached.take(3), shuffle=False, verbose=0)  # trace and warm up
    start = time.perf_counter()
    model.fit(cached.repeat(), steps_per_epoch=steps, shuffle=False, verbose=0)
    return steps * batch_size / (time.perf_counter() - start)


def define_flags():
    cli.define_data_flags("A tfmm data directory (default data/<world>).")
    flags.DEFINE_integer("batch_size", 1024, "Batch size of both.")
    flags.DEFINE_integer("max_history", 50, "History length L.")
    flags.DEFINE_integer("steps", 100, "Training steps to time.")


def main(argv):
    del argv
    data_dir = cli.data_dir()
    n, reader = reader_rate(data_dir, FLAGS.batch_size, FLAGS.max_history)
    model = step_rate(data_dir, FLAGS.batch_size, FLAGS.max_history, FLAGS.steps)
    print(f"data {data_dir}: {n} train impressions, batch {FLAGS.batch_size}, "
          f"L={FLAGS.max_history}, {os.cpu_count()} CPUs, TF {tf.__version__}")
    print(f"reader (parse, pad, mask, prefetch): {reader:12,.0f} examples/s")
    print(f"ID DIN ranker training step:         {model:12,.0f} examples/s")
    print(f"reader / model step:                 {reader / model:12.1f}x")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
