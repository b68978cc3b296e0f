"""`tfmm.data.prepare` as an Apache Beam pipeline: ``--runner=NAME`` (any Beam
runner), the runner's pipeline options after a ``--``::

    python -m tfmm.data.prepare --runner=DirectRunner --impressions='logs/part-*.csv' \\
        --items=items.csv --images_dir=img --out_dir=data/mine -- --direct_num_workers=2

The flags, checks and output are the local path's (`tfmm.data.tables` reads
and checks each file, and lays out each record, serialised here one at a time
by ``schema.example``): the same vocabularies, metadata (plus ``runner``) and set
of records per table, byte for byte, in no particular order, in as many shards
as the runner makes (``impressions-train-00000-of-00002.tfrecord``).
``--impressions`` and ``--items`` may be glob patterns: each file is read
whole by one worker, so sharded input is read in parallel. Files are read and
the data directory written through the local file system, which the workers
must share (a mount on a cluster). Each vocabulary (sorted distinct values),
the items' dense ids and the split's timestamp counts are built on one worker
and handed to the others as side inputs; the rest is per impression, histories
per user. Pre-training pairs: ``--pairs_from=clicks`` per user, next to the
histories; a ``--pairs`` file is read whole by one worker, as an items file,
its query photos read per pair. Their mined negatives are the local path's:
each is drawn from ``--seed`` and its own pair (`tfmm.data.pairs.PairDraws`),
whatever the order, with the catalogue grouped by category as a side input.

Bad input is collected in the pipeline and reported after it, as the local
path does: the first error in the order the local path checks, one line;
``out_dir`` is then untouched.
"""

import glob
import importlib.util
import itertools
import json
import os
from typing import Any, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pvalue import AsDict, AsSingleton, TaggedOutput

from tfmm.data import pairs as pair_lib
from tfmm.data import schema, tables
from tfmm.data.history import history_ranges
from tfmm.data.writer import DataDirWriter

SUMMARY = "beam-summary.json"  # the pipeline's counts and first error, read after it
SHARDS = "-SSSSS-of-NNNNN"
CRC32C_MODULES = ("crcmod", "google_crc32c", "snappy")  # WriteToTFRecord's checksum, any one
# The order in which the local path meets each kind of error.
ITEMS_FILE, ITEM_TWICE, NO_IMAGE, LOG_FILE, UNKNOWN_ITEM, SPLIT, PAIRS, IMAGE, PAIR_IMAGE = \
    range(9)

# Functions given to Beam live here (pickled by reference): `tfmm.data.prepare` may be
# the __main__ module of the command, which workers do not have.


def _files(pattern):
    """A path, or the files of a glob pattern in name order (their order as one log)."""
    if not glob.has_magic(pattern):
        return [pattern]  # one that is not there is named by prepare.Table
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise ValueError(f"{pattern}: no file matches.")
    return paths


def _read_items(indexed, images_dir, absolute_image_paths):
    """One items file: (raw id, (position, raw category, title, image file, row))."""
    index, path = indexed
    try:
        items, ids, categories, titles, images = tables.read_catalogue(path, images_dir,
                                                                       absolute_image_paths)
    except (ValueError, OSError) as e:
        yield TaggedOutput("errors", (ITEMS_FILE, (index,), str(e)))
        return
    if "image" not in items.columns:
        yield TaggedOutput("stats", ("files_without_image_column", 1))
    for i, raw in enumerate(ids.tolist()):
        yield raw, ((index, i), None if categories is None else categories[i], titles[i],
                    images[i], items.row(i))


def _item_row(item):
    raw, (position, _, _, _, row) = item
    return raw, (position, row)


def _item_twice(found):
    """An item id in two files (tables.read_items finds it within one)."""
    raw, rows = found
    if len(rows) > 1:
        (_, first), (position, row) = sorted(rows)[:2]
        yield ITEM_TWICE, position, f"{row}: duplicate item_id {raw!r} (first at {first})."


def _category(item):
    if item[1][1] is not None:
        yield item[1][1]


def _vocabulary(values):
    return tables.vocabulary(list(values))


def _dense(vocab):
    """{raw value: dense id} of a tables.vocabulary."""
    return {v: k + schema.FIRST_ID for k, v in enumerate(vocab.to_pylist())}


class _Vocabulary(beam.PTransform):
    """Raw values -> one tables.vocabulary (sorted distinct values), on one worker."""

    def expand(self, values):
        return values | beam.combiners.ToSet() | beam.Map(_vocabulary)


def _item_ids(item, item_ids, category_ids):
    raw, (_, category, _, _, _) = item
    return raw, (item_ids[raw], schema.OOV_ID if category is None else category_ids[category])


def _item_record(item, ids):
    raw, (position, _, title, image, row) = item
    yield TaggedOutput("stats", ("items", 1))
    yield TaggedOutput("stats", ("missing_images", int(image is None)))
    yield TaggedOutput("stats", ("missing_titles", int(title == "")))
    try:
        yield schema.example(**tables.item_features(*ids[raw], tables.item_image(raw, image, row),
                                                   title.encode()))
    except (ValueError, OSError) as e:
        yield TaggedOutput("errors", (IMAGE, position, str(e)))


def _read_log(indexed, items):
    """One impressions file: (raw user, (timestamp, position, raw item, dense item,
    category, label, side values)); "unknown": (position, row, raw item)."""
    index, path = indexed
    try:
        log, _, _, timestamp, label, side = tables.read_log(path)
    except (ValueError, OSError) as e:
        yield TaggedOutput("errors", (LOG_FILE, (index,), str(e)))
        return
    yield TaggedOutput("columns", (index, path, tuple(side)))
    side_values = zip(*(log.ids(c).tolist() for c in side)) if side else itertools.repeat(())
    for i, (user, raw, t, y, values) in enumerate(zip(
            log.ids("user_id").tolist(), log.ids("item_id").tolist(), timestamp.tolist(),
            label.tolist(), side_values)):
        item, category = items.get(raw, (schema.OOV_ID, schema.OOV_ID))
        if item == schema.OOV_ID:
            yield TaggedOutput("unknown", ((index, i), log.row(i), raw))
        yield user, (t, (index, i), raw, item, category, y, tuple(values))


def _side_columns(found):
    """The side columns of the first impressions file."""
    return min(found)[2] if found else ()


def _other_columns(found):
    if found:
        _, first_path, first = min(found)
        for index, path, columns in found:
            if columns != first:
                yield (LOG_FILE, (index,), f"{path}: side columns {list(columns)}, but "
                       f"{first_path} has {list(first)}.")


def _unknown_error(first, items_path, count):
    for position, row, raw in first:
        yield UNKNOWN_ITEM, position, str(tables.unknown_item_error(row, raw, items_path, count))


def _histories(user_rows, max_history, drop_duplicates, clicks=False):
    """A user's impressions, each with its history (`history_ranges` over the
    user's rows in time order, ties in file order); with `clicks`, also (tagged
    "clicks") the user's (timestamps, dense items, labels) in that order."""
    user, rows = user_rows
    seen, kept, duplicates = set(), [], 0
    for row in sorted(rows):
        t, _, raw, _, _, label, side = row
        key = (raw, label, t, side)  # with the user: every column
        if key in seen:
            duplicates += 1
            if drop_duplicates:
                continue
        seen.add(key)
        kept.append(row)
    t = np.array([row[0] for row in kept], np.int64)
    clicks, start, end = history_ranges(np.zeros(len(kept), np.int64), t,
                                        np.array([row[5] for row in kept]), max_history)
    clicks = clicks.tolist()
    for (t, _, _, item, category, label, side), a, b in zip(kept, start.tolist(), end.tolist()):
        history = [kept[k] for k in clicks[a:b]]
        yield user, item, category, label, t, side, tuple(
            tuple(h[j] for h in history) for j in (3, 4, 0))  # items, categories, times
    yield TaggedOutput("stats", ("duplicates", duplicates))
    if clicks:
        yield TaggedOutput("clicks", (np.array([row[0] for row in kept], np.int64),
                                      np.array([row[3] for row in kept], np.int64),
                                      np.array([row[5] for row in kept], np.int64)))


def _click_pairs(user_clicks, cut, negatives, options):
    """The pairs of one user's clicks (tables.click_pair_rows over them), as
    (split, position, query image, where, query text, query item, positive,
    negative); stats "pairs/train", "pairs/test", "mined_negatives"."""
    t, item, label = user_clicks
    is_test = t >= cut
    first, second = pair_lib.click_pair_rows(np.zeros(len(t), np.int64), item, t, label,
                                             is_test, options.pair_window,
                                             options.pair_max_gap)
    pairs = pair_lib.click_pairs_of_rows(item, t, is_test, first, second, options)
    yield from _pair_rows(pair_lib.mine_negatives(pairs, negatives, options), None)


def _file_pairs(path, item_vocab, cut, negatives, options):
    """The pairs of the --pairs file (read whole, as locally), as `_click_pairs`;
    "errors": the first bad row, or a catalogue of one item."""
    try:
        pairs = pair_lib.file_pairs(options, item_vocab, cut)
        pairs = pair_lib.mine_negatives(pairs, negatives, options)
    except (ValueError, OSError) as e:
        yield TaggedOutput("errors", (PAIRS, (), str(e)))
        return
    yield TaggedOutput("stats", ("skipped_unknown", pairs.meta["skipped_unknown"]))
    yield from _pair_rows(pairs, pairs.is_test)


def _pair_rows(pairs, is_test):
    """`pairs` (`tfmm.data.pairs.Pairs`) one by one, each with its split and position
    in the local path's writing order (train then test, each in time order: given by
    `is_test` where the whole file is here); and their stats."""
    split = np.where(pairs.is_test, "test", "train")
    order = np.argsort(pairs.is_test, kind="stable") if is_test is not None else None
    position = np.empty(len(split), np.int64)
    if order is not None:
        position[order] = np.arange(len(order))
    for i in range(len(split)):
        yield (split[i], (int(position[i]),) if order is not None else (), pairs.query_image[i],
               pairs.where[i], pairs.query_text[i], int(pairs.query_item[i]),
               int(pairs.positive[i]), int(pairs.negative[i]))
    for name, n in (("pairs/train", int((~pairs.is_test).sum())),
                    ("pairs/test", int(pairs.is_test.sum())),
                    ("mined_negatives", pairs.meta["mined_negatives"])):
        yield TaggedOutput("stats", (name, n))


def _pair_record(pair):
    split, position, image, where, text, query_item, positive, negative = pair
    try:
        yield TaggedOutput(split, schema.example(**tables.pair_features(
            query_item, positive, negative, tables.read_image(image, where), text.encode())))
    except (ValueError, OSError) as e:
        yield TaggedOutput("errors", (PAIR_IMAGE, position, str(e)))


def _negatives(dense_ids):
    """The catalogue grouped by category (`tfmm.data.pairs.HardNegatives`)."""
    size = max((dense for _, (dense, _) in dense_ids), default=schema.FIRST_ID - 1) + 1
    category_of = np.full(size, schema.OOV_ID, np.int64)  # an item in two files: one id
    for _, (dense, category) in dense_ids:
        category_of[dense] = category
    return pair_lib.HardNegatives(category_of)


def _timestamp(row):
    return row[4]


def _cut(counts, test_fraction, split_timestamp):
    """The split timestamp: given, or the one at tables.first_test in time order."""
    if split_timestamp is not None or not counts:
        return split_timestamp or 0
    counts = sorted(counts)
    first = tables.first_test(sum(n for _, n in counts), test_fraction)
    for t, seen in zip((t for t, _ in counts), itertools.accumulate(n for _, n in counts)):
        if seen > first:
            return t


def _train(row, cut):
    return row[4] < cut


def _user(row):
    return row[0]


def _item(row):
    return row[1]


def _side_values(row):
    return enumerate(row[5])


def _column_vocabulary(column_values):
    column, values = column_values
    return column, _vocabulary(values)


def _column_dense(column_vocab):
    column, vocab = column_vocab
    return column, _dense(vocab)


def _impression(row, cut, columns, users, side_ids, trained):
    user, item, category, label, t, side, history = row
    split = "test" if t >= cut else "train"
    user_id = users.get(user, schema.OOV_ID)
    yield TaggedOutput("stats", (f"impressions/{split}", 1))
    if split == "test" and user_id == schema.OOV_ID:
        yield TaggedOutput("stats", ("test_oov_impressions", 1))
        yield TaggedOutput("oov_users", user)
    yield TaggedOutput("stats", ("unknown_items", int(item == schema.OOV_ID)))
    yield TaggedOutput(split, schema.example(**tables.impression_features(
        user_id, item, category, t, label, int(item not in trained),
        {c: side_ids.get(j, {}).get(v, schema.OOV_ID)
         for j, (c, v) in enumerate(zip(columns, side))}, history)))


def _stat(value, name):
    return name, value


def _write_vocabulary(vocab, out, name):
    tables.write_vocabulary(os.path.join(out, "vocab", f"{name}.txt"), vocab)
    return f"vocab/{name}", len(vocab)


def _write_side_vocabulary(column_vocab, out, columns):
    column, vocab = column_vocab
    return _write_vocabulary(vocab, out, f"side-{columns[column]}")


def _write_summary(path, stats, first_error, cut, columns):
    with open(path, "w") as f:
        json.dump({"stats": stats, "errors": first_error, "split_timestamp": cut,
                   "side_features": list(columns)}, f)


def _write_records(records, out, stem):
    return records | f"Write {stem} records" >> beam.io.WriteToTFRecord(
        os.path.join(out, stem), file_name_suffix=".tfrecord", shard_name_template=SHARDS)


def build(p, out, log_files, item_files, options):
    """Adds the preparation with `options` (a `prepare.PrepareOptions`) to pipeline `p`:
    tables, ``vocab/`` and the summary into the existing directory `out`."""
    images_dir, absolute_image_paths = options.images_dir, options.absolute_image_paths
    stats, errors = [], []
    items = (p | "Item files" >> beam.Create(list(enumerate(item_files)))
             | "Read items" >> beam.FlatMap(_read_items, images_dir, absolute_image_paths)
             .with_outputs("errors", "stats", main="items"))
    errors.append(items.errors)
    stats.append(items.stats)
    items = items.items
    errors.append(items | "Item rows" >> beam.Map(_item_row) | "By item" >> beam.GroupByKey()
                  | "Items twice" >> beam.FlatMap(_item_twice))
    item_vocab = items | "Item ids" >> beam.Keys() | "Item vocabulary" >> _Vocabulary()
    category_vocab = (items | "Categories" >> beam.FlatMap(_category)
                      | "Category vocabulary" >> _Vocabulary())
    item_ids = item_vocab | "Item dense ids" >> beam.Map(_dense)
    category_ids = category_vocab | "Category dense ids" >> beam.Map(_dense)
    dense_ids = items | "Dense ids" >> beam.Map(_item_ids, AsSingleton(item_ids),
                                                AsSingleton(category_ids))
    ids = AsDict(dense_ids)
    records = (items | "Item records" >> beam.FlatMap(_item_record, ids)
               .with_outputs("errors", "stats", main="records"))
    errors.append(records.errors)
    stats.append(records.stats)
    _write_records(records.records, out, "items")

    log = (p | "Log files" >> beam.Create(list(enumerate(log_files)))
           | "Read log" >> beam.FlatMap(_read_log, ids)
           .with_output_types(Tuple[str, Any])  # as inferred, it would include the tagged ones
           .with_outputs("errors", "columns", "unknown", main="rows"))
    errors.append(log.errors)
    found = log.columns | "All columns" >> beam.combiners.ToList()
    columns = AsSingleton(found | "Side columns" >> beam.Map(_side_columns))
    errors.append(found | "Other columns" >> beam.FlatMap(_other_columns))
    if options.unknown_items == "error":
        count = log.unknown | "Count unknown" >> beam.combiners.Count.Globally()
        errors.append(log.unknown | "First unknown" >> beam.combiners.Top.Smallest(1)
                      | "Unknown error" >> beam.FlatMap(_unknown_error, options.items,
                                                        AsSingleton(count)))

    rows = (log.rows | "By user" >> beam.GroupByKey()
            | "Histories" >> beam.FlatMap(_histories, options.max_history,
                                          options.drop_duplicates, bool(options.pairs_from))
            .with_outputs("stats", "clicks", main="rows"))
    stats.append(rows.stats)
    clicks, rows = rows.clicks, rows.rows
    cut = (rows | "Timestamps" >> beam.Map(_timestamp)
           | "Count timestamps" >> beam.combiners.Count.PerElement()
           | "All timestamps" >> beam.combiners.ToList()
           | "Cut" >> beam.Map(_cut, options.test_fraction, options.split_timestamp))
    train = rows | "Train" >> beam.Filter(_train, AsSingleton(cut))
    user_vocab = train | "Users" >> beam.Map(_user) | "User vocabulary" >> _Vocabulary()
    side_vocab = (train | "Side values" >> beam.FlatMap(_side_values)
                  | "Distinct side values" >> beam.Distinct()
                  | "By column" >> beam.GroupByKey()
                  | "Side vocabularies" >> beam.Map(_column_vocabulary))
    trained = train | "Trained items" >> beam.Map(_item) | "Item set" >> beam.combiners.ToSet()
    user_ids = user_vocab | "User dense ids" >> beam.Map(_dense)
    side_ids = side_vocab | "Side dense ids" >> beam.Map(_column_dense)
    impressions = (rows | "Impressions" >> beam.FlatMap(
        _impression, AsSingleton(cut), columns, AsSingleton(user_ids), AsDict(side_ids),
        AsSingleton(trained)).with_outputs("train", "test", "stats", "oov_users"))
    stats.append(impressions.stats)
    stats.append(impressions.oov_users | "OOV users" >> beam.Distinct()
                 | "Count OOV users" >> beam.combiners.Count.Globally()
                 | "OOV users stat" >> beam.Map(_stat, "test_oov_users"))
    for split in ("train", "test"):
        _write_records(impressions[split], out, f"impressions-{split}")

    if options.pairs or options.pairs_from:
        negatives = AsSingleton(dense_ids | "All dense ids" >> beam.combiners.ToList()
                                | "By category" >> beam.Map(_negatives))
        if options.pairs_from:
            pairs = clicks | "Click pairs" >> beam.FlatMap(
                _click_pairs, AsSingleton(cut), negatives, options).with_outputs(
                    "errors", "stats", main="pairs")
        else:
            pairs = (p | "Pairs file" >> beam.Create([options.pairs])
                     | "Read pairs" >> beam.FlatMap(
                         _file_pairs, AsSingleton(item_vocab), AsSingleton(cut), negatives,
                         options).with_outputs("errors", "stats", main="pairs"))
        errors.append(pairs.errors)
        stats.append(pairs.stats)
        records = (pairs.pairs | "Spread pairs" >> beam.Reshuffle()  # their photos: any worker
                   | "Pair records" >> beam.FlatMap(_pair_record)
                   .with_outputs("train", "test", "errors"))
        errors.append(records.errors)
        for split in ("train", "test"):
            _write_records(records[split], out, f"pretrain-{split}")

    for name, vocab in (("users", user_vocab), ("items", item_vocab),
                        ("categories", category_vocab)):
        stats.append(vocab | f"Write {name} vocabulary" >> beam.Map(_write_vocabulary, out, name))
    stats.append(side_vocab | "Write side" >> beam.Map(_write_side_vocabulary, out, columns))
    stats = tuple(stats) | "All stats" >> beam.Flatten() | "Sum" >> beam.CombinePerKey(sum)
    first_error = (tuple(errors) | "All errors" >> beam.Flatten()
                   | "First error" >> beam.combiners.Top.Smallest(1))
    (p | "Summary" >> beam.Create([os.path.join(out, SUMMARY)])
     | "Write summary" >> beam.Map(_write_summary, AsDict(stats), AsSingleton(first_error),
                                   AsSingleton(cut), columns))


def prepare(options):
    """`tfmm.data.prepare.prepare` of `options` (a `prepare.PrepareOptions`) as a Beam
    pipeline on ``options.runner`` (default DirectRunner), with its pipeline options
    ``options.beam_args`` (``["--project=...", ...]``)."""
    options.validate()
    runner = options.runner or "DirectRunner"
    if not any(map(importlib.util.find_spec, CRC32C_MODULES)):
        raise ValueError("Beam writes TFRecords with crcmod (or google-crc32c, python-snappy), "
                         'which is not installed: pip install -e ".[beam]"')
    log_files, item_files = _files(options.impressions), _files(options.items)
    with DataDirWriter(options.out_dir, inputs=(*log_files, *item_files, options.images_dir,
                                                options.pairs)) as w:
        os.makedirs(w.path("vocab"))
        pipeline = PipelineOptions([f"--runner={runner}", *options.beam_args])
        with beam.Pipeline(options=pipeline) as p:
            build(p, w.tmp_dir, log_files, item_files, options)
        with open(w.path(SUMMARY)) as f:
            summary = json.load(f)
        os.remove(w.path(SUMMARY))
        stats, cut, side = summary["stats"], summary["split_timestamp"], summary["side_features"]
        errors = summary["errors"]
        if options.images_dir and stats.get("files_without_image_column") and \
                stats.get("missing_images") == stats.get("items"):
            errors.append([NO_IMAGE, [], str(tables.no_image_error(options.items,
                                                                   options.images_dir))])
        if not stats.get("impressions/train") or not stats.get("impressions/test"):
            errors.append([SPLIT, [], str(tables.split_error(options.impressions, cut))])
        pair_tables = {"pretrain/train": "pairs/train", "pretrain/test": "pairs/test"} \
            if options.pairs or options.pairs_from else {}
        if options.pairs_from and not (stats.get("pairs/train") and stats.get("pairs/test")):
            errors.append([PAIRS, [], str(pair_lib.no_click_pairs_error(
                "test" if stats.get("pairs/train") else "train"))])
        if errors:
            raise ValueError(min(errors)[2])
        for table, stat in {"impressions/train": "impressions/train",
                            "impressions/test": "impressions/test", "items": "items",
                            **pair_tables}.items():
            names = glob.glob(w.path(f"{table.replace('/', '-')}-*-of-*.tfrecord"))
            w.add(table, sorted(map(os.path.basename, names)), stats[stat])
        sizes = {"items": stats["vocab/items"], "users": stats["vocab/users"],
                 "categories": stats["vocab/categories"],
                 **{c: stats[f"vocab/side-{c}"] for c in side}}
        w.finish(dict(tables.metadata(
            options, sizes, side, cut,
            (stats["test_oov_users"], stats.get("test_oov_impressions", 0)),
            stats["unknown_items"], stats["duplicates"], stats["missing_images"],
            stats["missing_titles"], _pair_meta(options, stats)), runner=runner))
    return schema.read_metadata(options.out_dir)


def _pair_meta(options, stats):
    """metadata.json's "pairs" (None without pairs), as the local path writes it."""
    if options.pairs_from:
        source = pair_lib.clicks_source(options)
    elif options.pairs:
        source = {"source": os.path.abspath(options.pairs),
                  "skipped_unknown": stats["skipped_unknown"]}
    else:
        return None
    return pair_lib.pair_meta(source, stats["pairs/train"], stats["pairs/test"],
                              stats["mined_negatives"], options.seed)
