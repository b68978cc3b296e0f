"""`tfmm.serving.embed` as an Apache Beam pipeline (``pip install -e ".[beam]"``).

item shards -> records parsed and decoded by the reader's
`tfmm.data.reader.item_parser` (so the images are those the local job and
pre-training embed) -> items without
content counted and dropped -> ``RunInference`` with `EncoderHandler` ->
batches put into the index (`PutVectors`: one put per batch, the index opened
in ``setup`` and closed in ``teardown``) or Parquet files by raw id.

Beam's own TensorFlow handlers (``TFModelHandlerNumpy``/``Tensor``) do not fit
our exports: they load with ``tf.keras.models.load_model``, which in Keras 3
reads only ``.keras`` files, not a SavedModel, and their module imports
``tensorflow_hub``. `EncoderHandler` is a plain ``ModelHandler`` whose model is
`tfmm.serving.encoding.Encoder` (the SavedModel's ``serving_default``, as the
near-line service calls it), in batches RunInference makes.

Rerun after a kill: index puts are keyed by item id; Parquet goes to a fixed
number of shards (``part-SSSSS-of-NNNNN.parquet``), which Beam's file sink
writes to a temporary directory and renames at the end, so a rerun rewrites the
same names. A killed run's ``beam-temp-*`` directory is removed at the start.
"""

import glob
import os
import shutil

import apache_beam as beam
import numpy as np
import pyarrow as pa
import tensorflow as tf
from apache_beam.metrics.metric import Metrics, MetricsFilter
from apache_beam.ml.inference.base import (KeyedModelHandler, ModelHandler, PredictionResult,
                                           RunInference)
from apache_beam.options.pipeline_options import PipelineOptions

from tfmm.data import reader, schema
from tfmm.index import open_index
from tfmm.serving.encoding import Encoder, claim_dir, has_content, item_inputs

NAMESPACE = "tfmm.embed"


class EncoderHandler(ModelHandler):
    """RunInference's handler for an encoder export: examples are the inputs `Encoder`
    takes (uint8 [h, w, 3] images or title bytes), inferences their vectors."""

    def __init__(self, path, batch_size):
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size)
        self.path = path

    def load_model(self):
        return Encoder(self.path)

    def run_inference(self, batch, model, inference_args=None):
        return [PredictionResult(x, v, self.path) for x, v in zip(batch, model(batch))]


class Contents(beam.DoFn):
    """An item shard -> (item id, the encoder's input) of each item with content for the
    encoder; items without are counted. Read with tf.data (Beam's TFRecord source
    needs a CRC package apache-beam does not install), so shards are the unit of
    parallel reading; a reshuffle after spreads the items over the workers."""

    def __init__(self, data_dir, modality, image_size):
        self.data_dir, self.modality, self.image_size = data_dir, modality, image_size
        self.items = Metrics.counter(NAMESPACE, "items")
        self.without = Metrics.counter(NAMESPACE, "without_content")

    def process(self, path):
        parse = reader.item_parser(self.data_dir, self.image_size)
        batches = (tf.data.TFRecordDataset(path)
                   .map(parse, num_parallel_calls=tf.data.AUTOTUNE).batch(256)
                   .prefetch(tf.data.AUTOTUNE))
        for batch in batches.as_numpy_iterator():
            has = has_content(self.modality, batch)
            self.items.inc(len(has))
            self.without.inc(int((~has).sum()))
            yield from zip(batch["item_id"][has].tolist(), item_inputs(self.modality, batch, has))


class PutVectors(beam.DoFn):
    """Batches of (item id, vector) into the index table, one put per batch."""

    def __init__(self, spec, dim):
        self.spec, self.dim = spec, dim
        self.embedded = Metrics.counter(NAMESPACE, "embedded")

    def setup(self):
        self.index = open_index(self.spec, dim=self.dim)

    def process(self, batch):
        ids, vectors = zip(*batch)
        self.index.put(np.array(ids, np.int64), np.stack(vectors))
        self.embedded.inc(len(batch))

    def teardown(self):
        self.index.close()


class RawIds(beam.DoFn):
    """(item id, vector) -> a Parquet row of the raw id and the vector."""

    def __init__(self, data_dir):
        self.data_dir = data_dir
        self.embedded = Metrics.counter(NAMESPACE, "embedded")

    def setup(self):
        self.raw = schema.raw_ids(self.data_dir)

    def process(self, element):
        item, vector = element
        self.embedded.inc()
        yield {"item_id": self.raw[item - schema.FIRST_ID], "vector": vector.tolist()}


def run(encoder, data_dir, manifest, options, index=None, out_dir=None, batch_size=256,
        shards=4):
    """Runs the pipeline with Beam `options` (command-line form); returns the counts
    {"items", "embedded", "without_content"} of `tfmm.serving.embed.embed_catalogue`."""
    paths = schema.files(data_dir, schema.read_metadata(data_dir), "items")
    reader.check_records(paths, schema.item_spec())  # one clear line before any worker runs
    if index:
        held = open_index(index, dim=encoder.dim)
        held.claim(manifest["catalogue"])
        held.close()
    else:
        claim_dir(out_dir, dict(manifest, layout=f"beam, {shards} shards"), inputs=(data_dir,))
        for temp in glob.glob(os.path.join(out_dir, "beam-temp-*")):
            shutil.rmtree(temp)  # a killed run's
    pipeline = beam.Pipeline(options=PipelineOptions(options))
    vectors = (pipeline
               | "Files" >> beam.Create(paths)
               | "Contents" >> beam.ParDo(Contents(data_dir, encoder.modality,
                                                  encoder.image_size))
               | "Spread" >> beam.Reshuffle()
               | "Embed" >> RunInference(KeyedModelHandler(EncoderHandler(encoder.path,
                                                                          batch_size)))
               | "Vectors" >> beam.MapTuple(lambda item, result: (item, result.inference)))
    if index:
        _ = (vectors
             | "Batch" >> beam.BatchElements(min_batch_size=batch_size,
                                             max_batch_size=batch_size)
             | "Put" >> beam.ParDo(PutVectors(index, encoder.dim)))
    else:
        table = pa.schema([("item_id", pa.string()), ("vector", pa.list_(pa.float32()))])
        _ = (vectors
             | "RawIds" >> beam.ParDo(RawIds(data_dir))
             | "Write" >> beam.io.WriteToParquet(os.path.join(out_dir, "part"), table,
                                                 file_name_suffix=".parquet",
                                                 num_shards=shards))
    result = pipeline.run()
    result.wait_until_finish()
    counters = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    counts = {"items": 0, "embedded": 0, "without_content": 0}
    for counter in counters:
        counts[counter.key.metric.name] += counter.committed
    return counts
