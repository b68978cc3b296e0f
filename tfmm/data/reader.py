"""tf.data readers: TFRecords -> batches of dense features.

Impression batches are ``(features, label)``; every feature is dense:

- ``user_id``, ``item_id``, ``category_id``, ``timestamp``, ``is_new_item``: [B]
- ``history_item_ids``, ``history_category_ids``, ``history_timestamps``:
  [B, L], oldest first, padded with 0 after the real items; a history longer
  than L keeps its L most recent items.
- ``history_mask`` [B, L] bool (True = real item), ``history_length`` [B].
- side features of a prepared dataset: [B].
- with ``vectors``: ``item_vector`` [B, d], ``history_vectors`` [B, L, d],
  ``item_vector_missing`` [B] and ``history_vector_missing`` [B, L] bool. A
  missing vector is zeros, and its flag is True (never for padding).
"""

import dataclasses

import numpy as np
import tensorflow as tf

from tfmm.data import schema
from tfmm.data.images import too_many_pixels

AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass(frozen=True)
class Vectors:
    """A snapshot of multimodal vectors by dense item id: row i is item id i.

    ``table`` is float32 [num_items, d]; ``present`` bool [num_items] says which
    rows hold a real vector (row 0, padding, never does).
    """

    table: np.ndarray
    present: np.ndarray

    def live(self):
        """This snapshot in (non-trainable) tf.Variables: datasets joined with it
        see every later `refresh`, without being rebuilt (near-line training)."""
        return Vectors(tf.Variable(self.table, trainable=False, name="vectors"),
                       tf.Variable(self.present, trainable=False, name="vectors_present"))

    def refresh(self, snapshot):
        """Copies a newer `snapshot` of the same shape into this live table."""
        if not isinstance(self.table, tf.Variable):
            raise TypeError("Vectors.refresh: only a `live()` table can be refreshed.")
        self.table.assign(snapshot.table)
        self.present.assign(snapshot.present)

    @classmethod
    def from_items(cls, item_ids, vectors, num_items, source="Vectors"):
        """Scatters `vectors` [n, d] of dense `item_ids` [n] into a snapshot;
        errors start with `source` (where the vectors come from)."""
        item_ids = np.asarray(item_ids, np.int64)
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim != 2 or len(vectors) != len(item_ids):
            raise ValueError(f"{source}: want [n, d] vectors for n ids, got {vectors.shape} "
                             f"for {len(item_ids)} ids.")
        bad = item_ids[(item_ids < schema.FIRST_ID) | (item_ids >= num_items)]
        if len(bad):
            shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
            raise ValueError(f"{source}: item ids outside [{schema.FIRST_ID}, {num_items}): "
                             f"{shown} ({len(bad)} in all); 0 is padding and 1 "
                             "out-of-vocabulary.")
        table = np.zeros((num_items, vectors.shape[1]), np.float32)
        present = np.zeros(num_items, bool)
        table[item_ids] = vectors
        present[item_ids] = True
        return cls(table, present)


def check_records(paths, spec):
    """Reads every record of `paths` and parses it with `spec`.

    Raises ValueError naming the file and record number of the first record
    that is truncated, corrupt or does not parse, or whose image header
    declares more than `tfmm.data.images.MAX_PIXELS` pixels (`prepare` refuses such
    images; a directory written otherwise would decode them whole at every read).
    Returns the number of records.
    """
    total = 0
    for path in paths:
        done = 0
        batches = iter(tf.data.TFRecordDataset(path).batch(4096))
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except tf.errors.DataLossError:
                n = sum(1 for _ in _records_until_error(path))
                raise ValueError(f"{path}: record {n} is truncated or corrupt "
                                 f"({n} good records before it).") from None
            try:
                parsed = tf.io.parse_example(batch, spec)
            except tf.errors.InvalidArgumentError:
                for i, record in enumerate(batch):
                    try:
                        tf.io.parse_single_example(record, spec)
                    except tf.errors.InvalidArgumentError as e:
                        raise ValueError(f"{path}: record {done + i} does not parse: "
                                         f"{e.message.splitlines()[0]}") from None
            for name in set(spec) & {"image", "query_image"}:
                for i, data in enumerate(parsed[name].numpy()):
                    too_large = too_many_pixels(data)
                    if too_large:
                        raise ValueError(f"{path}: record {done + i}, {name}: {too_large}.")
            done += int(batch.shape[0])
        total += done
    return total


def _checked(data_dir, meta, table, spec):
    """The files of `table`, every record read (`check_records`) and counted: a count in
    metadata.json that its files do not hold is named here, not as a failed step later."""
    paths = schema.files(data_dir, meta, table)
    found = check_records(paths, spec)
    if found != meta["counts"][table]:
        raise ValueError(f"{data_dir}/metadata.json counts {meta['counts'][table]} records of "
                         f"{table}, its files hold {found}; the data directory is damaged: "
                         "prepare or generate it again.")
    return paths


def _records_until_error(path):
    it = iter(tf.data.TFRecordDataset(path))
    while True:
        try:
            yield next(it)
        except (StopIteration, tf.errors.DataLossError):
            return


def _parse_impressions(max_history, side_features, features=None):
    """Parses a batch of records; the category and timestamp lists only if `features` has them.

    (The item ids are always parsed: the mask, the length and the vectors come from them.)
    """
    lists = [k for k in schema.HISTORY_LISTS
             if features is None or k in features or k == "history_item_ids"]
    spec = {k: v for k, v in schema.impression_spec(side_features).items()
            if k not in schema.HISTORY_LISTS}
    # Ragged, not VarLen: no sparse -> ragged conversion on the way to [B, L].
    spec.update({k: tf.io.RaggedFeature(tf.int64) for k in lists})

    def parse(serialized):
        raw = tf.io.parse_example(serialized, spec)
        parsed = {k: raw[k] for k in schema.IMPRESSION_SCALARS + tuple(side_features)
                  if k != "label"}
        for k in lists:  # the most recent L items, padded at the end
            parsed[k] = raw[k][:, -max_history:].to_tensor(default_value=0,
                                                            shape=[None, max_history])
        mask = parsed["history_item_ids"] != schema.PAD_ID
        parsed["history_mask"] = mask
        parsed["history_length"] = tf.reduce_sum(tf.cast(mask, tf.int64), axis=1)
        return parsed, tf.cast(raw["label"], tf.float32)

    return parse


def _join_vectors(vectors):
    table, present = vectors.table, vectors.present
    if not isinstance(table, tf.Variable):
        table, present = tf.constant(table), tf.constant(present)

    def join(features, label):
        features = dict(features)
        item, history = features["item_id"], features["history_item_ids"]
        features["item_vector"] = tf.gather(table, item)
        features["item_vector_missing"] = ~tf.gather(present, item)
        features["history_vectors"] = tf.gather(table, history)
        features["history_vector_missing"] = ~tf.gather(present, history) & features["history_mask"]
        return features, label

    return join


def impressions(data_dir, split="train", batch_size=256, max_history=None, shuffle=False,
                shuffle_buffer=100_000, seed=None, deterministic=True, repeat=False,
                drop_remainder=False, vectors=None, features=None, validate=True,
                slices=None, shard=None):
    """Impression batches ``(features, label)`` of one split, in time order unless shuffled.

    Args:
        data_dir: a tfmm data directory (generated or prepared).
        split: 'train' or 'test'.
        max_history: L; default the dataset's own maximum.
        shuffle: shuffle records (buffer `shuffle_buffer`, seeded by `seed`).
        deterministic: keep element order fixed under parallel parsing.
        vectors: a `Vectors` snapshot to join by item id.
        features: keep only these feature names (a Keras model's inputs).
        validate: first read every record once, so that a truncated or
            malformed record fails with its file and number before training.
        slices: under tf.distribute, `tfmm.distribute.replica_slices`: keeps
            this replica's rows of every batch, before they are parsed, and
            adds a third element, the rows' loss weights.
        shard: ``(num_shards, index)`` (integers or scalar tensors): keeps every
            num_shards-th batch from the index-th, before they are parsed (a
            parameter-server worker's share, `tfmm.parameter_server`).
    """
    meta = schema.read_metadata(data_dir)
    paths = schema.files(data_dir, meta, f"impressions/{split}")
    side = tuple(meta.get("side_features", ()))
    length = int(max_history or meta["max_history"])
    if length < 1:
        raise ValueError(f"impressions: max_history must be >= 1, got {max_history}.")
    if validate:
        _checked(data_dir, meta, f"impressions/{split}", schema.impression_spec(side))
    # A known size gives Keras its step count, and fails loudly if a file is short.
    ds = tf.data.TFRecordDataset(paths).apply(
        tf.data.experimental.assert_cardinality(meta["counts"][f"impressions/{split}"]))
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if shard is not None:
        ds = ds.shard(*shard)
    parse = _parse_impressions(length, side, features)
    if slices is not None:
        ds = slices(ds)
        parse = _with_weights(parse)
    ds = ds.map(parse, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    if vectors is not None:
        ds = ds.map(_with_weights(_join_vectors(vectors)) if slices else _join_vectors(vectors),
                    num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    if features is not None:
        available = set(ds.element_spec[0])
        missing = [k for k in features if k not in available]
        if missing:
            raise ValueError(f"impressions: features {missing} are not in {data_dir} "
                             f"(it has {sorted(available)}; vector features need `vectors`).")
        ds = ds.map(lambda f, *rest: ({k: f[k] for k in features}, *rest))
    return ds.prefetch(AUTOTUNE)


def _with_weights(fn):
    """`fn` of an element, carrying one more, last (the weights), through unchanged."""
    return lambda *x: (*fn(*x[:-1]), x[-1])


def _decode_image(size):
    """PNG/JPEG bytes -> uint8 [h, w, 3] (`size` is h = w, or (h, w)), resized only when
    needed; no bytes (no image) -> zeros."""
    shape = [size, size] if isinstance(size, int) else list(size)

    def decode_present(encoded):
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        image.set_shape([None, None, 3])
        resized = lambda: tf.cast(  # noqa: E731
            tf.image.resize(image, shape, antialias=True) + 0.5, tf.uint8)
        same = tf.reduce_all(tf.equal(tf.shape(image)[:2], shape))
        return tf.ensure_shape(tf.cond(same, lambda: image, resized), shape + [3])

    def decode(encoded):
        return tf.cond(tf.strings.length(encoded) > 0, lambda: decode_present(encoded),
                       lambda: tf.zeros(shape + [3], tf.uint8))

    return decode


def item_parser(data_dir, image_size=None):
    """One serialised item record -> the features of an `items` batch row."""
    meta = schema.read_metadata(data_dir)
    decode = _decode_image(image_size or meta.get("image_size") or 64)

    def parse(serialized):
        raw = tf.io.parse_single_example(serialized, schema.item_spec())
        raw["has_image"] = tf.strings.length(raw["image"]) > 0
        raw["has_title"] = tf.strings.length(tf.strings.strip(raw["title"])) > 0
        raw["image"] = decode(raw["image"])
        return raw

    return parse


def items(data_dir, batch_size=256, image_size=None, validate=True):
    """Catalogue batches: item_id, category_id, first_day, title, image (uint8; `image_size`
    is h = w or (h, w), default the data's), has_image and has_title (bool; an item
    without an image has zeros, one without a title b"" or blanks)."""
    meta = schema.read_metadata(data_dir)
    paths = schema.files(data_dir, meta, "items")
    if validate:
        _checked(data_dir, meta, "items", schema.item_spec())
    return (tf.data.TFRecordDataset(paths)
            .map(item_parser(data_dir, image_size), num_parallel_calls=AUTOTUNE,
                 deterministic=True)
            .batch(batch_size).prefetch(AUTOTUNE))


def item_categories(data_dir, num_items):
    """Each dense item id's category id, int64 [num_items] (1, unknown, where the catalogue
    has no such item); reads only the two ids of the items table (no image decoded)."""
    meta = schema.read_metadata(data_dir)
    spec = {k: schema.item_spec()[k] for k in ("item_id", "category_id")}
    categories = np.full(num_items, schema.OOV_ID, np.int64)
    for batch in (tf.data.TFRecordDataset(schema.files(data_dir, meta, "items")).batch(4096)
                  .map(lambda b: tf.io.parse_example(b, spec))):
        ids = batch["item_id"].numpy()
        keep = ids < num_items
        categories[ids[keep]] = batch["category_id"].numpy()[keep]
    return categories


def triplets(data_dir, split="train", batch_size=256, shuffle=False, seed=None, repeat=False,
             image_size=None, drop_remainder=False, validate=True):
    """Pre-training triplet batches: query_image (uint8), query_text, positive/negative ids,
    has_query_image (bool; a query without one has zeros, one without text b""), and
    query_item_id: a dense item id where the query is that catalogue item, whose image and
    title are then not in the record (zeros and b"" here; `tfmm.pretrain.Catalogue` looks
    them up), else 0."""
    meta = schema.read_metadata(data_dir)
    paths = schema.files(data_dir, meta, f"pretrain/{split}")
    if validate:
        _checked(data_dir, meta, f"pretrain/{split}", schema.triplet_spec())
    decode = _decode_image(image_size or meta.get("image_size") or 64)

    def parse(serialized):
        raw = tf.io.parse_single_example(serialized, schema.triplet_spec())
        raw["has_query_image"] = tf.strings.length(raw["query_image"]) > 0
        raw["query_image"] = decode(raw["query_image"])
        return raw

    ds = tf.data.TFRecordDataset(paths)
    if shuffle:
        ds = ds.shuffle(50_000, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    return (ds.map(parse, num_parallel_calls=AUTOTUNE, deterministic=True)
            .batch(batch_size, drop_remainder=drop_remainder).prefetch(AUTOTUNE))
