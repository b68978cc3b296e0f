"""Turns your own logs into a tfmm data directory.

    python -m tfmm.data.prepare --impressions=impressions.csv --items=items.csv \\
        [--images_dir=DIR] --out_dir=DIR [--max_history=50] [--test_fraction=0.1]

``--impressions`` (CSV with a header row, or Parquet): ``user_id``,
``item_id``, ``label`` (0 or 1), ``timestamp`` (integer), and optionally more
columns, each becoming an int64 side feature through its own vocabulary.
``--items``: ``item_id`` and optionally ``category_id``, ``title`` and
``image`` (a path relative to ``--images_dir``; without the column,
``<item_id>.png``/``.jpg``/``.jpeg`` is looked up there). An image path that
leaves ``--images_dir`` (through ``..``) is refused; an absolute one is
refused unless ``--absolute_image_paths`` is passed, and then read as it is.
Symbolic links inside ``--images_dir`` are followed.

CSV files are read as UTF-8 whatever the locale, with or without a byte order
mark (Excel's "CSV UTF-8"); rows are numbered as in a spreadsheet (the header
is row 1), Parquet rows from 1. Integer columns take Parquet floats that are
whole numbers (pandas stores an integer column with a missing value as float).

Exact duplicate impressions (every column equal) are kept, since a log may
show an item twice at the same second, and counted in the output line and in
``metadata.json`` (``duplicates``); ``--drop_duplicates`` keeps only the first.

Histories are each user's clicks strictly before the impression. The latest
``--test_fraction`` of impressions (or those at or after
``--split_timestamp``) are the test split. Users and side-feature values
are indexed from the training split, items and categories from the items
file; anything else is out of vocabulary (id 1). Vocabularies are written to
``vocab/*.txt`` (line k is id k + 2).
"""

import codecs
import csv
import io
import os

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("impressions", None, "Impression log: CSV or Parquet.")
flags.DEFINE_string("items", None, "Item content: CSV or Parquet.")
flags.DEFINE_string("images_dir", None, "Directory of item images.")
flags.DEFINE_string("out_dir", None, "Directory to write (replaced atomically).")
flags.DEFINE_integer("max_history", 50, "Longest history kept (the most recent).")
flags.DEFINE_float("test_fraction", 0.1, "Latest fraction of impressions used for test.")
flags.DEFINE_integer("split_timestamp", None, "Impressions at or after it are test "
                     "(overrides --test_fraction).")
flags.DEFINE_enum("unknown_items", "error", ["error", "oov"],
                  "An impression's item missing from --items: fail, or map to id 1.")
flags.DEFINE_bool("drop_duplicates", False, "Drop impressions equal to an earlier one in "
                  "every column (default: keep and count them).")
flags.DEFINE_bool("absolute_image_paths", False, "Allow absolute paths in the items' image "
                  "column; relative ones must stay inside --images_dir.")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfmm.data import schema  # noqa: E402
from tfmm.data.history import history_ranges  # noqa: E402
from tfmm.data.writer import DataDirWriter  # noqa: E402

IMPRESSION_COLUMNS = ("user_id", "item_id", "label", "timestamp")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class Table:
    """Columns of a CSV or Parquet file as lists, with row names for errors."""

    def __init__(self, path):
        self.path = path
        if not os.path.exists(path):
            raise ValueError(f"{path}: file not found.")
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            self._values = pq.read_table(path).to_pydict()
            self.columns = {k: [None if v is None else str(v) for v in vals]
                            for k, vals in self._values.items()}
            self._first_row = 1
        elif path.endswith(".csv"):
            rows = _csv_rows(path)
            if not rows:
                raise ValueError(f"{path}: empty file, expected a header row.")
            header, body = rows[0], rows[1:]
            for i, row in enumerate(body):
                if len(row) != len(header):
                    raise ValueError(f"{path}: row {i + 2}: {len(row)} fields, the header has "
                                     f"{len(header)}.")
            self.columns = {name: [row[j] for row in body] for j, name in enumerate(header)}
            self._values = self.columns
            self._first_row = 2  # spreadsheet rows: the header is row 1
        else:
            raise ValueError(f"{path}: unknown format, expected .csv or .parquet.")
        self.num_rows = len(next(iter(self.columns.values()), []))
        if not self.num_rows:
            raise ValueError(f"{path}: no data rows.")

    def row(self, i):
        return f"{self.path}: row {i + self._first_row}"

    def require(self, names):
        missing = [n for n in names if n not in self.columns]
        if missing:
            raise ValueError(f"{self.path}: missing column(s) {missing}; it has "
                             f"{sorted(self.columns)}.")

    def ints(self, name):
        out = np.empty(self.num_rows, np.int64)
        for i, v in enumerate(self._values[name]):
            try:
                if isinstance(v, float) and not v.is_integer():
                    raise ValueError  # NaN, inf or a fraction, which int() would truncate
                out[i] = int(v)
            except (TypeError, ValueError):
                raise ValueError(f"{self.row(i)}, column {name!r}: {v!r} is not an integer.") \
                    from None
            except OverflowError:
                raise ValueError(f"{self.row(i)}, column {name!r}: {v!r} is outside the int64 "
                                 "range.") from None
        return out

    def ids(self, name):
        values = self.columns[name]
        for i, v in enumerate(values):
            if v is None or v == "":
                raise ValueError(f"{self.row(i)}, column {name!r}: empty id.")
        return np.array(values, dtype=object)


def _csv_rows(path):
    """The rows of a UTF-8 CSV file; a leading byte order mark is skipped."""
    with open(path, "rb") as f:
        data = f.read().removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        # The rows before the bad byte, plus the one it is in ("x" starts it if none is open).
        row = len(list(csv.reader(io.StringIO(data[:e.start].decode("utf-8") + "x", newline=""))))
        raise ValueError(f"{path}: row {row}: byte 0x{data[e.start]:02x} is not UTF-8; save the "
                         "file as UTF-8.") from None
    rows = []
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        rows.extend(reader)
    except csv.Error as e:
        raise ValueError(f"{path}: row {len(rows) + 1}: {e}.") from None
    return rows


def vocabulary(values):
    """Sorted distinct raw values -> dense ids from schema.FIRST_ID."""
    return {v: i + schema.FIRST_ID for i, v in enumerate(sorted(set(values)))}


def lookup(vocab, values):
    return np.array([vocab.get(v, schema.OOV_ID) for v in values], np.int64)


def _image_bytes(items, images_dir, i, item_id, absolute_image_paths):
    if "image" in items.columns:
        where, names = f"{items.row(i)}, column 'image'", [items.columns["image"][i]]
    else:
        where, names = items.row(i), [f"{item_id}{s}" for s in IMAGE_SUFFIXES]
    root = os.path.abspath(images_dir)
    candidates = []
    for name in names:
        if not name:
            raise ValueError(f"{where}: empty image path for item {item_id!r}.")
        path = os.path.join(images_dir, name)
        if os.path.isabs(name) and not absolute_image_paths:
            raise ValueError(f"{where}: image path {name!r} is absolute; pass "
                             "--absolute_image_paths to read it, or make it relative to "
                             "--images_dir.")
        if not os.path.isabs(name) and os.path.commonpath([root, os.path.abspath(path)]) != root:
            raise ValueError(f"{where}: image path {name!r} leaves --images_dir={images_dir}.")
        candidates.append(path)
    path = next((p for p in candidates if os.path.isfile(p)), None)
    if path is None:
        raise ValueError(f"{items.row(i)}: no image for item {item_id!r} (looked for "
                         f"{', '.join(candidates)}).")
    with open(path, "rb") as f:
        data = f.read()
    try:
        tf.io.decode_image(data, channels=3, expand_animations=False)
    except tf.errors.InvalidArgumentError:
        raise ValueError(f"{path} (item {item_id!r}, {items.row(i)}): does not decode as "
                         "an image.") from None
    return data


def read_items(path):
    items = Table(path)
    items.require(["item_id"])
    ids = items.ids("item_id")
    first = {}
    for i, v in enumerate(ids):
        if v in first:
            raise ValueError(f"{items.row(i)}: duplicate item_id {v!r} (first at "
                             f"{items.row(first[v])}).")
        first[v] = i
    return items, ids


def item_records(items, ids, item_vocab, categories, images_dir, absolute_image_paths=False):
    titles = items.columns.get("title", [""] * items.num_rows)
    for i, raw in enumerate(ids):
        image = (_image_bytes(items, images_dir, i, raw, absolute_image_paths) if images_dir
                 else b"")
        yield schema.example(
            ints={"item_id": item_vocab[raw], "category_id": categories[i], "first_day": 0},
            strings={"image": image, "title": (titles[i] or "").encode()})


def prepare(impressions_path, items_path, out_dir, images_dir=None, max_history=50,
            test_fraction=0.1, split_timestamp=None, unknown_items="error",
            drop_duplicates=False, absolute_image_paths=False):
    """Writes the data directory; returns its metadata."""
    if max_history < 1:
        raise ValueError(f"--max_history={max_history}: must be >= 1.")
    if split_timestamp is None and not 0.0 < test_fraction < 1.0:
        raise ValueError(f"--test_fraction={test_fraction}: must be in (0, 1).")
    items, item_ids = read_items(items_path)
    item_vocab = vocabulary(item_ids)
    if "category_id" in items.columns:
        category_vocab = vocabulary(items.ids("category_id"))
        item_category = lookup(category_vocab, items.ids("category_id"))
    else:
        category_vocab, item_category = {}, np.full(len(item_ids), schema.OOV_ID, np.int64)
    category_of = np.full(len(item_vocab) + schema.FIRST_ID, schema.OOV_ID, np.int64)
    category_of[lookup(item_vocab, item_ids)] = item_category

    log = Table(impressions_path)
    log.require(IMPRESSION_COLUMNS)
    users, timestamp, label = log.ids("user_id"), log.ints("timestamp"), log.ints("label")
    bad = np.flatnonzero((label != 0) & (label != 1))
    if len(bad):
        raise ValueError(f"{log.row(bad[0])}, column 'label': {label[bad[0]]} is not 0 or 1.")
    raw_items = log.ids("item_id")
    item = lookup(item_vocab, raw_items)
    unknown = np.flatnonzero(item == schema.OOV_ID)
    if len(unknown) and unknown_items == "error":
        raise ValueError(f"{log.row(unknown[0])}, column 'item_id': "
                         f"{log.columns['item_id'][unknown[0]]!r} is not in {items_path} "
                         f"({len(unknown)} such rows; --unknown_items=oov maps them to id 1).")
    side = [c for c in log.columns if c not in IMPRESSION_COLUMNS]
    side_raw = {c: log.ids(c) for c in side}

    seen = set()
    duplicate = np.zeros(log.num_rows, bool)
    for i, row in enumerate(zip(users, raw_items, label.tolist(), timestamp.tolist(),
                                *side_raw.values())):
        duplicate[i] = row in seen
        seen.add(row)
    if drop_duplicates:
        users, item, label, timestamp = (a[~duplicate] for a in (users, item, label, timestamp))
        side_raw = {c: v[~duplicate] for c, v in side_raw.items()}

    order = np.argsort(timestamp, kind="stable")
    if split_timestamp is None:
        cut = timestamp[order][min(int(np.ceil((1.0 - test_fraction) * len(order))),
                                   len(order) - 1)]
    else:
        cut = split_timestamp
    is_test = timestamp >= cut
    if is_test.all() or not is_test.any():
        raise ValueError(f"{impressions_path}: the split at timestamp {cut} leaves an empty "
                         "train or test split.")
    train_rows = order[~is_test[order]]
    test_rows = order[is_test[order]]

    user_vocab = vocabulary(users[train_rows])
    user_id = lookup(user_vocab, users)
    user_index = np.unique(users, return_inverse=True)[1]  # OOV users keep their own history
    clicks, start, end = history_ranges(user_index, timestamp, label, max_history)
    side_vocab = {c: vocabulary(side_raw[c][train_rows]) for c in side}
    side_ids = {c: lookup(side_vocab[c], side_raw[c]) for c in side}
    trained = np.zeros(len(category_of), bool)
    trained[item[train_rows]] = True

    def records(rows):
        for i in rows:
            h = clicks[start[i]:end[i]]
            yield schema.example(
                ints={"user_id": user_id[i], "item_id": item[i], "category_id": category_of[item[i]],
                      "timestamp": timestamp[i], "label": label[i],
                      "is_new_item": int(not trained[item[i]]),
                      **{c: side_ids[c][i] for c in side}},
                int_lists={"history_item_ids": item[h], "history_category_ids": category_of[item[h]],
                           "history_timestamps": timestamp[h]})

    with DataDirWriter(out_dir) as w:
        w.write("impressions/train", records(train_rows), len(train_rows))
        w.write("impressions/test", records(test_rows), len(test_rows))
        w.write("items", item_records(items, item_ids, item_vocab, item_category, images_dir,
                                      absolute_image_paths), len(item_ids))
        os.makedirs(w.path("vocab"))
        for name, vocab in (("users", user_vocab), ("items", item_vocab),
                            ("categories", category_vocab),
                            *((f"side-{c}", side_vocab[c]) for c in side)):
            with open(w.path(f"vocab/{name}.txt"), "w") as f:
                f.writelines(f"{v}\n" for v in sorted(vocab, key=vocab.get))
        w.finish({
            "source": "prepared",
            "inputs": {"impressions": os.path.abspath(impressions_path),
                       "items": os.path.abspath(items_path), "images_dir": images_dir},
            "vocab": {"num_items": len(item_vocab) + schema.FIRST_ID,
                      "num_users": len(user_vocab) + schema.FIRST_ID,
                      "num_categories": len(category_vocab) + schema.FIRST_ID,
                      **{f"num_{c}": len(side_vocab[c]) + schema.FIRST_ID for c in side}},
            "max_history": max_history,
            "image_size": None,
            "side_features": side,
            "split_timestamp": int(cut),
            "oov": {"test_users": int((user_id[test_rows] == schema.OOV_ID).sum()),
                    "unknown_items": int((item == schema.OOV_ID).sum())},
            "duplicates": {"impressions": int(duplicate.sum()), "dropped": drop_duplicates},
        })
    return schema.read_metadata(out_dir)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    for name in ("impressions", "items", "out_dir"):
        if not FLAGS[name].value:
            raise app.UsageError(f"--{name} is required.")
    try:
        meta = prepare(FLAGS.impressions, FLAGS.items, FLAGS.out_dir, FLAGS.images_dir,
                       FLAGS.max_history, FLAGS.test_fraction, FLAGS.split_timestamp,
                       FLAGS.unknown_items, FLAGS.drop_duplicates, FLAGS.absolute_image_paths)
    except (ValueError, OSError) as e:  # bad input: one line naming the file, not a trace
        raise app.UsageError(str(e)) from None
    print(f"wrote {FLAGS.out_dir}: {meta['counts']}, vocab {meta['vocab']}, oov {meta['oov']}, "
          f"duplicates {meta['duplicates']}")
    if meta["duplicates"]["impressions"] and not FLAGS.drop_duplicates:
        print(f"{meta['duplicates']['impressions']} impressions repeat an earlier one in every "
              "column; kept (--drop_duplicates drops them).")


if __name__ == "__main__":
    app.run(main)
