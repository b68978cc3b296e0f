"""The on-disk format shared by the generator, `prepare` and the readers.

A data directory holds TFRecords of `tf.train.Example`s and `metadata.json`:

- ``impressions-{train,test}-*.tfrecord``: one impression each: ``user_id``,
  ``item_id``, ``category_id``, ``timestamp`` (seconds), ``label`` (0/1),
  ``is_new_item`` (the item has no training impression), and the user's
  behaviour history before ``timestamp``, oldest first, at most
  ``max_history`` long: ``history_item_ids``, ``history_category_ids``,
  ``history_timestamps``; plus any int64 side features listed in metadata.
- ``items.tfrecord``: the catalogue: ``item_id``, ``category_id``, ``title``,
  ``image`` (PNG or JPEG bytes), ``first_day``. Empty ``image`` or ``title``
  bytes: the item has none (a prepared catalogue's missing content).
- ``pretrain-{train,test}.tfrecord``: SCL triplets: ``query_image``,
  ``query_text`` (either may be empty: the query has none),
  ``positive_item_id``, ``negative_item_id``.

Ids are dense int64: 0 is padding, 1 is out-of-vocabulary, real ids start at 2.
A prepared directory maps its raw ids to them in ``vocab/<name>.txt`` (line k
is dense id k + 2); `item_raw_ids` and `item_dense_ids` read the items'.
"""

import hashlib
import json
import os

import tensorflow as tf

FORMAT = "tfmm-logs/1"
PAD_ID = 0
OOV_ID = 1
FIRST_ID = 2

IMPRESSION_SCALARS = ("user_id", "item_id", "category_id", "timestamp", "label", "is_new_item")
HISTORY_LISTS = ("history_item_ids", "history_category_ids", "history_timestamps")
ITEM_INTS = ("item_id", "category_id", "first_day")
ITEM_BYTES = ("title", "image")
TRIPLET_INTS = ("positive_item_id", "negative_item_id")
TRIPLET_BYTES = ("query_image", "query_text")


def impression_spec(side_features=()):
    spec = {k: tf.io.FixedLenFeature([], tf.int64) for k in IMPRESSION_SCALARS + tuple(side_features)}
    spec.update({k: tf.io.VarLenFeature(tf.int64) for k in HISTORY_LISTS})
    return spec


def item_spec():
    spec = {k: tf.io.FixedLenFeature([], tf.int64) for k in ITEM_INTS}
    spec.update({k: tf.io.FixedLenFeature([], tf.string) for k in ITEM_BYTES})
    return spec


def triplet_spec():
    spec = {k: tf.io.FixedLenFeature([], tf.int64) for k in TRIPLET_INTS}
    spec.update({k: tf.io.FixedLenFeature([], tf.string) for k in TRIPLET_BYTES})
    return spec


def example(ints=None, int_lists=None, strings=None):
    """A serialised tf.train.Example from plain Python values."""
    feature = {}
    for k, v in (ints or {}).items():
        feature[k] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v)]))
    for k, v in (int_lists or {}).items():
        feature[k] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(x) for x in v]))
    for k, v in (strings or {}).items():
        feature[k] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))
    # Deterministic: map fields in a fixed order, so a seed gives the same bytes.
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(
        deterministic=True)


def triplet_example(query_image, query_text, positive_item_id, negative_item_id):
    """A serialised SCL triplet: encoded image bytes (b"": none), a str query text
    (empty: none), and dense item ids."""
    return example(ints={"positive_item_id": positive_item_id,
                         "negative_item_id": negative_item_id},
                   strings={"query_image": query_image, "query_text": query_text.encode()})


def read_metadata(data_dir):
    path = os.path.join(data_dir, "metadata.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: {data_dir} is not a tfmm data directory "
            "(make one with `python -m tfmm.data.generate` or `python -m tfmm.data.prepare`)."
        )
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}.")
    return meta


def catalogue_fingerprint(data_dir):
    """A short hash of the catalogue (its item records): vectors are functions of it."""
    meta = read_metadata(data_dir)
    digest = hashlib.sha256()
    for path in files(data_dir, meta, "items"):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def item_raw_ids(data_dir):
    """The raw item ids of a data directory by dense id: entry k names dense id k + FIRST_ID.

    A prepared directory lists them in ``vocab/items.txt`` (line k, UTF-8; ids
    of a Parquet integer column are written as decimal text). A generated
    world has no vocabulary: its items are named by their dense ids, so entry k
    is ``str(k + FIRST_ID)``.
    """
    num_items = read_metadata(data_dir)["vocab"]["num_items"]
    path = os.path.join(data_dir, "vocab", "items.txt")
    if not os.path.exists(path):
        return [str(i) for i in range(FIRST_ID, num_items)]
    with open(path, encoding="utf-8", newline="") as f:
        raw = f.read().split("\n")[:-1]  # each line ends with "\n"; ids keep any other byte
    if len(raw) != num_items - FIRST_ID:
        raise ValueError(f"{path}: {len(raw)} item ids, but metadata.json counts "
                         f"{num_items - FIRST_ID} items.")
    return raw


def item_dense_ids(data_dir):
    """{raw item id: dense id} of a data directory (see `item_raw_ids`)."""
    return {raw: k + FIRST_ID for k, raw in enumerate(item_raw_ids(data_dir))}


def files(data_dir, meta, table):
    """Absolute paths of one table's shards, e.g. table='impressions/train'."""
    if table not in meta["files"]:
        raise ValueError(
            f"{data_dir}/metadata.json has no table {table!r}; it has {sorted(meta['files'])}."
        )
    return [os.path.join(data_dir, f) for f in meta["files"][table]]


def is_parquet(path, by_content=True):
    """Whether `path` is a Parquet file: named ``*.parquet*`` (any codec suffix) or
    ``*.pq``, or, with `by_content`, starting with Parquet's magic bytes ``PAR1``."""
    name = os.path.basename(str(path)).lower()
    if ".parquet" in name or name.endswith(".pq"):
        return True
    if not by_content:
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"PAR1"
