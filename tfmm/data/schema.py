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
  ``positive_item_id``, ``negative_item_id``, and ``query_item_id``: where it
  is a dense item id, the query is that catalogue item (a pair from clicks)
  and its content is looked up in ``items.tfrecord`` rather than copied into
  every pair (``query_image``/``query_text`` are then empty); 0 or absent
  (format ``tfmm-logs/1``): the query is the record's own image and text.

Ids are dense int64: 0 is padding, 1 is out-of-vocabulary, real ids start at 2.
A prepared directory maps its raw ids to them in ``vocab/<name>.txt`` (line k
is dense id k + 2); `raw_ids` and `dense_ids` read them.
"""

import hashlib
import json
import os

import numpy as np
import tensorflow as tf

# What is written; what is read. /2 added ``query_item_id`` to the triplets: /1 readers would
# take such a query for an empty one, so they refuse /2 by its name.
FORMAT = "tfmm-logs/2"
FORMATS = ("tfmm-logs/1", FORMAT)
# Keys of metadata.json every reader needs: a dict with these int fields, or an int.
REQUIRED = {"files": (), "counts": (), "vocab": ("num_items", "num_users", "num_categories"),
            "max_history": None}
PAD_ID = 0
OOV_ID = 1
FIRST_ID = 2

IMPRESSION_SCALARS = ("user_id", "item_id", "category_id", "timestamp", "label", "is_new_item")
HISTORY_LISTS = ("history_item_ids", "history_category_ids", "history_timestamps")
ITEM_INTS = ("item_id", "category_id", "first_day")
ITEM_BYTES = ("title", "image")
TRIPLET_INTS = ("positive_item_id", "negative_item_id")
TRIPLET_BYTES = ("query_image", "query_text")
QUERY_ITEM = "query_item_id"


def impression_spec(side_features=()):
    spec = {k: tf.io.FixedLenFeature([], tf.int64)
            for k in IMPRESSION_SCALARS + tuple(side_features)}
    spec.update({k: tf.io.VarLenFeature(tf.int64) for k in HISTORY_LISTS})
    return spec


def item_spec():
    spec = {k: tf.io.FixedLenFeature([], tf.int64) for k in ITEM_INTS}
    spec.update({k: tf.io.FixedLenFeature([], tf.string) for k in ITEM_BYTES})
    return spec


def triplet_spec():
    spec = {k: tf.io.FixedLenFeature([], tf.int64) for k in TRIPLET_INTS}
    spec.update({k: tf.io.FixedLenFeature([], tf.string) for k in TRIPLET_BYTES})
    spec[QUERY_ITEM] = tf.io.FixedLenFeature([], tf.int64, default_value=PAD_ID)
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


GATHER_BYTES = 1 << 22  # bytes of records `examples` lays out at once (~7x that in temporaries)
# Varints of 2, 3, ... bytes start at these values (of the uint64 two's complement).
_VARINT_STARTS = np.array([1 << (7 * k) for k in range(1, 10)], np.uint64)


def _varint_matrix(values):
    """Protobuf varints of int64 `values`: row i's first size[i] bytes encode values[i]."""
    x = np.asarray(values, np.int64).view(np.uint64)
    if x.max(initial=0) < 0x80:  # most lengths and small ids: one byte each
        return x.astype(np.uint8)[:, None], np.ones(len(x), np.int64)
    size = _varint_size(x)
    width = int(size.max(initial=1))
    groups = (x[:, None] >> (np.arange(width, dtype=np.uint64) * np.uint64(7))) & np.uint64(0x7F)
    groups |= (np.arange(1, width + 1) < size[:, None]).astype(np.uint64) << np.uint64(7)
    return groups.astype(np.uint8), size


class Varints:
    """Int values encoded once as protobuf varints, for `examples` whose int lists
    are slices of them (a user's behaviour history is a run of their clicks)."""

    def __init__(self, values):
        matrix, size = _varint_matrix(values)
        self.bytes = matrix[np.arange(matrix.shape[1]) < size[:, None]]
        self.offsets = np.concatenate([[0], np.cumsum(size)])


def examples(ints=None, int_lists=None, strings=None):
    """Serialised tf.train.Examples of n rows at once, each byte for byte what
    `example` makes of that row: the wire format written with NumPy.

    Args:
        ints: {name: int [n]}.
        int_lists: {name: (values, starts, ends)}: row i's list is
            ``values[starts[i]:ends[i]]`` of a `Varints`.
        strings: {name: n bytes objects}.

    Returns:
        A list of n bytes.
    """
    n = len(next(iter([*(ints or {}).values(), *(v[1] for v in (int_lists or {}).values()),
                       *(strings or {}).values()])))
    if n == 0:
        return []
    # Per feature: its Feature field's tag, its list's payload size in bytes per row,
    # whether the list has values (None: every row's has), and the payload: a
    # byte-matrix block written inline (a scalar's varint), or (flat bytes, row i's
    # start in them: None when the rows' follow each other).
    features = {}
    for k, v in (ints or {}).items():
        block = _varint_matrix(v)
        features[k] = (b"\x1a", block[1], None, block)
    for k, (values, starts, ends) in (int_lists or {}).items():
        first, last = values.offsets[starts], values.offsets[ends]
        features[k] = (b"\x1a", last - first, np.asarray(ends) > starts, (values.bytes, first))
    for k, v in (strings or {}).items():
        size = np.fromiter(map(len, v), np.int64, n)
        features[k] = (b"\x0a", size, None, (np.frombuffer(b"".join(v), np.uint8), None))
    # Example{features: Features{feature: map entries in key order (`deterministic`)}}, an
    # entry {key, value: Feature{int64_list | bytes_list: {repeated value (packed ints)}}}.
    # Small parts (tags, lengths, scalar varints) are rows of byte matrices, joined into
    # runs; list and string payloads are copied between the runs.
    parts, run, entries = [], [], 0
    for k in sorted(features, key=str.encode):
        tag, size, present, payload = features[k]
        inner = 1 + _varint_size(size) + size
        if present is not None:
            inner = np.where(present, inner, 0)
        feature = 1 + _varint_size(inner) + inner
        key = k.encode()
        head = b"\x0a" + _varint_bytes(len(key)) + key + b"\x12"
        entry = len(head) + _varint_size(feature) + feature
        entries = entries + 1 + _varint_size(entry) + entry
        run += [_constant(b"\x0a", n), _varint_matrix(entry), _constant(head, n),
                _varint_matrix(feature), _constant(tag, n), _varint_matrix(inner)]
        run += [_constant(b"\x0a", n), _varint_matrix(size)] if present is None else [
            _masked(_constant(b"\x0a", n), present), _masked(_varint_matrix(size), present)]
        if k in (ints or {}):
            run.append(payload)
        else:
            parts += [_join(run), (*payload, size)]
            run = []
    parts = [_join([_constant(b"\x0a", n), _varint_matrix(entries)]), *parts,
             *([_join(run)] if run else [])]
    # Gathers: row i's bytes are each part's, in turn; a part's are flat[first[i]:][:size[i]]
    # (first None: the rows' bytes follow each other).
    source = np.concatenate([flat for flat, _, _ in parts])
    base = np.cumsum([0] + [len(flat) for flat, _, _ in parts])
    size = np.stack([size for _, _, size in parts], axis=1)  # [n, parts]
    start = np.stack([b + (np.cumsum(s) - s if first is None else first)
                      for b, (_, first, s) in zip(base, parts)], axis=1)
    ends = np.cumsum(size.sum(axis=1))
    index = np.int32 if len(source) < 2**31 else np.int64  # halves the largest temporaries
    records, a = [], 0
    while a < n:  # rows of about GATHER_BYTES at a time: the index costs 4-8 bytes a byte
        done = ends[a - 1] if a else 0
        b = max(a + 1, int(np.searchsorted(ends, done + GATHER_BYTES, "right")))
        piece, begin = size[a:b].ravel(), start[a:b].ravel()
        stop = np.cumsum(piece)
        at = np.repeat((begin - (stop - piece)).astype(index), piece)
        at += np.arange(stop[-1], dtype=index)
        data = source[at].tobytes()
        offsets = [0] + (ends[a:b] - done).tolist()
        records += [data[i:j] for i, j in zip(offsets[:-1], offsets[1:])]
        a = b
    return records


def _varint_size(values):
    x = np.asarray(values, np.int64).view(np.uint64)
    size = np.ones(len(x), np.int64)
    top = x.max(initial=0)
    for start in _VARINT_STARTS[_VARINT_STARTS <= top]:
        size += x >= start
    return size


def _varint_bytes(value):
    matrix, size = _varint_matrix([value])
    return matrix[0, :size[0]].tobytes()


def _constant(data, n):
    return np.broadcast_to(np.frombuffer(data, np.uint8), (n, len(data))), np.full(n, len(data))


def _masked(block, mask):
    return block[0], np.where(mask, block[1], 0)


def _join(blocks):
    """Byte-matrix blocks (matrix, size: row i's first size[i] bytes) as one run:
    (flat bytes, start of each row's, bytes per row)."""
    matrix = np.hstack([m for m, _ in blocks])
    keep = np.hstack([np.arange(m.shape[1]) < size[:, None] for m, size in blocks])
    size = keep.sum(axis=1)
    return matrix[keep], None, size


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
        try:
            meta = json.load(f)
        except ValueError as e:
            raise ValueError(f"{path}: not JSON ({e}).") from None
    if not isinstance(meta, dict) or meta.get("format") not in FORMATS:
        raise ValueError(f"{path}: format {isinstance(meta, dict) and meta.get('format')!r}, "
                         f"expected one of {FORMATS} (written by another version of tfmm).")
    for key, fields in REQUIRED.items():  # what every reader of a data directory needs
        value = meta.get(key)
        if fields is None:
            bad, want = not isinstance(value, int), "an int"
        else:
            bad = not isinstance(value, dict) or any(not isinstance(value.get(k), int)
                                                     for k in fields)
            want = "{" + "".join(f"{k!r}: int, " for k in fields) + "...}"
        if bad:
            raise ValueError(f"{path}: {key!r} is {'missing' if value is None else 'incomplete'}"
                             f" (want {want}); the data directory is damaged: prepare or "
                             "generate it again.")
    for table in meta["files"]:
        if not isinstance(meta["counts"].get(table), int):
            raise ValueError(f"{path}: no count of table {table!r} in 'counts'; the data "
                             "directory is damaged: prepare or generate it again.")
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


def has_vocabulary(data_dir):
    """Whether `data_dir` maps raw ids to dense ids (``vocab/``, a prepared directory's)."""
    return os.path.isdir(os.path.join(data_dir, "vocab"))


def raw_ids(data_dir, name="items"):
    """The raw ids of one of a data directory's vocabularies (``items``, ``users``,
    ``categories``) by dense id: entry k names dense id k + FIRST_ID.

    A prepared directory lists them in ``vocab/<name>.txt`` (line k, UTF-8; ids
    of a Parquet integer column are written as decimal text). A generated
    world has no vocabulary: its ids are named by their dense ids, so entry k
    is ``str(k + FIRST_ID)``.
    """
    count = read_metadata(data_dir)["vocab"][f"num_{name}"]
    path = os.path.join(data_dir, "vocab", f"{name}.txt")
    if not os.path.exists(path):
        return [str(i) for i in range(FIRST_ID, count)]
    with open(path, encoding="utf-8", newline="") as f:
        raw = f.read().split("\n")[:-1]  # each line ends with "\n"; ids keep any other byte
    if len(raw) != count - FIRST_ID:
        raise ValueError(f"{path}: {len(raw)} ids, but metadata.json counts "
                         f"{count - FIRST_ID} {name}.")
    return raw


def dense_ids(data_dir, name="items"):
    """{raw id: dense id} of one of a data directory's vocabularies (see `raw_ids`)."""
    return {raw: k + FIRST_ID for k, raw in enumerate(raw_ids(data_dir, name))}


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
