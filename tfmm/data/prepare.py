"""Turns your own logs into a tfmm data directory.

    python -m tfmm.data.prepare --impressions=impressions.csv --items=items.csv \\
        [--images_dir=DIR] --out_dir=DIR [--max_history=50] [--test_fraction=0.1] \\
        [--pairs=pairs.csv | --pairs_from=clicks [--pair_window=1] [--pair_max_gap=T]] \\
        [--runner=DirectRunner|DataflowRunner|... [-- BEAM_PIPELINE_OPTIONS...]]

With ``--runner``, the same preparation runs as an Apache Beam pipeline
(tfmm/data/prepare_beam.py, the ``beam`` extra), the arguments after ``--``
being the runner's pipeline options.

Files are CSV (a header row) or Parquet. A file is read as Parquet when it
starts with Parquet's magic bytes ``PAR1`` or its name holds ``.parquet``
(``items.parquet``, ``items.parquet.snappy``, ...) or ends in ``.pq``, with
any codec pyarrow reads; otherwise its name must end in ``.csv``.

``--impressions``: ``user_id``, ``item_id``, ``label`` (0 or 1),
``timestamp`` (integer), and optionally more columns, each becoming an int64
side feature through its own vocabulary.

``--items``: ``item_id`` and optionally ``category_id``, ``title`` and
``image``. An empty or absent title, or an empty image cell, means the item
has none: it is written with empty bytes (the readers' ``has_image`` is
False) and counted in the output line and ``metadata.json`` (``missing``).
Images are read only with ``--images_dir``; without it no item has one.
An ``image`` cell is a path relative to ``--images_dir``; a cell naming a file
that is not there is an error (a typo must not pass for a missing image).
Without an ``image`` column, ``<item_id>.png``/``.jpg``/``.jpeg`` is looked up
in ``--images_dir``, and an item with none of them has no image (an error only
if no item has one: the directory is then likely wrong). An image path that
leaves ``--images_dir`` (through ``..``) is refused; an absolute one is
refused unless ``--absolute_image_paths`` is passed, and then read as it is.
Symbolic links inside ``--images_dir`` are followed. Every image must decode.

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

Pre-training pairs (the SCL triplet tables ``pretrain/{train,test}``), from
one of two sources:

- ``--pairs=FILE``: your own query -> item pairs: ``query_text`` and/or
  ``query_image`` (a path, resolved like the items' ``image`` cells; empty:
  none, but each row needs one of the two), ``item_id`` (a raw id of
  ``--items``), optionally ``timestamp`` (the impressions' clock) and
  ``negative_item_id`` (empty: mined). Pairs at or after the impressions'
  split timestamp are test; without a ``timestamp`` column, the rows are taken
  as in time order and the last ``--test_fraction`` of them are test. An
  unknown ``item_id`` or ``negative_item_id`` is an error, or with
  ``--unknown_items=oov`` the pair is skipped (counted).
- ``--pairs_from=clicks``: for logs without queries, pairs of a click and
  each of the same user's next ``--pair_window`` clicks (in time order, ties
  in file order), kept when both are in the same split (training pairs from
  training clicks only, test pairs from test clicks only), are of two
  different items and, with ``--pair_max_gap``, at most that many timestamp
  units apart. The query is the first item, written as its id
  (``query_item_id``; pre-training reads its image and title from the
  catalogue, so no image is copied into each pair), the positive the second
  item. Such pairs mostly tell which categories go
  together; ``tfmm.train`` pre-trains on them with ``--center_vectors`` (its
  default for such a data dir), without which the vectors all lie in a cone
  too narrow for SimTier's tiers.

A pair without a given negative gets a hard negative: a random other item of
the positive's category (of the whole catalogue when the category has no
other; without a ``category_id`` column all items are one category), drawn
with ``--seed``. Pairs are written in time order. The counts go to the output
line and ``metadata.json`` (``pairs``).
"""

import codecs
import csv
import functools
import io
import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("impressions", None, "Impression log: CSV or Parquet.")
flags.DEFINE_string("items", None, "Item content: CSV or Parquet.")
flags.DEFINE_string("images_dir", None, "Directory of item images.")
flags.DEFINE_string("out_dir", None, "Directory to write (replaced atomically; one that is "
                    "or holds an input, or holds files tfmm did not write, is refused).")
flags.DEFINE_integer("max_history", 50, "Longest history kept (the most recent).")
flags.DEFINE_float("test_fraction", 0.1, "Latest fraction of impressions used for test.")
flags.DEFINE_integer("split_timestamp", None, "Impressions at or after it are test "
                     "(overrides --test_fraction).")
flags.DEFINE_enum("unknown_items", "error", ["error", "oov"],
                  "An impression's item missing from --items: fail, or map to id 1 "
                  "(a pair's: fail, or skip the pair).")
flags.DEFINE_bool("drop_duplicates", False, "Drop impressions equal to an earlier one in "
                  "every column (default: keep and count them).")
flags.DEFINE_bool("absolute_image_paths", False, "Allow absolute paths in the items' image "
                  "column; relative ones must stay inside --images_dir.")
flags.DEFINE_string("pairs", None, "Query -> item pairs for pre-training: CSV or Parquet.")
flags.DEFINE_enum("pairs_from", None, ["clicks"], "Derive pre-training pairs from behaviour: "
                  "a click and the same user's next clicks.")
flags.DEFINE_integer("pair_window", 1, "--pairs_from=clicks: pair each click with this many "
                     "of the user's next clicks.")
flags.DEFINE_integer("pair_max_gap", None, "--pairs_from=clicks: the most timestamp units "
                     "between a pair's two clicks (default: any).")
flags.DEFINE_integer("seed", 0, "Seed of the mined hard negatives.")
flags.DEFINE_string("runner", None, "Run as an Apache Beam pipeline on this runner "
                    "(DirectRunner, DataflowRunner, FlinkRunner, SparkRunner, ...); its "
                    "pipeline options follow a `--`. Default: in this process, without Beam.")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.csv as pa_csv  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfmm import _startup  # noqa: E402
from tfmm.data import schema  # noqa: E402
from tfmm.data.history import history_ranges  # noqa: E402
from tfmm.data.pairs import hard_negatives  # noqa: E402
from tfmm.data.writer import DataDirWriter  # noqa: E402

IMPRESSION_COLUMNS = ("user_id", "item_id", "label", "timestamp")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
HISTORY = ("history_item_ids", "history_category_ids", "history_timestamps")


READ_BLOCK = 4 << 20  # bytes of CSV parsed at once
RECORDS_PER_CHUNK = 4096  # records serialised at once (their temporaries: ~30 MB)
IMAGE_BYTES_PER_CHUNK = 16 << 20  # and at most about this many bytes of image files
_ID = pa.dictionary(pa.int32(), pa.string())


class Table:
    """A CSV or Parquet file read by pyarrow: columns named in `ints` as int64
    arrays, the others dictionary-encoded (int32 codes into their sorted distinct
    values, "" for empty and null cells); with row names for errors. A cell that
    is not an integer is reported when its column is asked for."""

    def __init__(self, path, ints=()):
        self.path = path
        if not os.path.exists(path):
            raise ValueError(f"{path}: file not found.")
        if schema.is_parquet(path):
            table, self._first_row = self._read_parquet(), 1
        elif path.endswith(".csv"):
            table, self._first_row = self._read_csv(ints), 2  # spreadsheet rows: header is 1
        else:
            raise ValueError(f"{path}: unknown format, expected CSV (.csv) or Parquet "
                             "(.parquet*, .pq, or content starting with PAR1).")
        index = {name: j for j, name in enumerate(table.column_names)}  # repeated: last wins
        self.columns = list(index)
        self.num_rows = table.num_rows
        if not self.num_rows:
            raise ValueError(f"{path}: no data rows.")
        self._ints, self._codes, self._errors = {}, {}, {}
        # Column by column, each freed once converted: one column's copy at a time.
        columns = {name: table.column(j).chunks for name, j in index.items()}
        del table
        for name in index:
            chunks = columns.pop(name)
            if name in ints:
                starts = np.cumsum([0] + [len(c) for c in chunks])
                self._ints[name] = np.concatenate(
                    [self._int_chunk(name, c, first) for c, first in zip(chunks, starts)])
            else:
                self._codes[name] = _unify([_ids(c) for c in chunks])
            del chunks
        pa.default_memory_pool().release_unused()  # the parsed text, before arrays grow
        # A blank CSV line reads as a row of empty cells; Python's csv module, which
        # names structural errors, tells it (and any other) apart.
        if self._first_row == 2 and (self._errors or any(
                len(v) and v[0].as_py() == "" for _, v in self._codes.values())):
            self._check_csv_structure()

    def _read_csv(self, ints):
        try:
            with open(self.path, encoding="utf-8-sig", newline="") as f:
                header = next(csv.reader(f), None)
        except UnicodeDecodeError:
            _raise_utf8_error(self.path)
        except csv.Error:
            self._check_csv_structure()
        if header is None:
            raise ValueError(f"{self.path}: empty file, expected a header row.")
        for types in ({n: pa.int64() if n in ints else _ID for n in header},
                      {n: pa.string() if n in ints else _ID for n in header}):
            try:
                return pa_csv.read_csv(
                    self.path,
                    read_options=pa_csv.ReadOptions(block_size=READ_BLOCK, use_threads=False),
                    parse_options=pa_csv.ParseOptions(newlines_in_values=True,
                                                      ignore_empty_lines=False),
                    convert_options=pa_csv.ConvertOptions(
                        column_types=types, strings_can_be_null=False,
                        quoted_strings_can_be_null=False))
            except pa.ArrowInvalid as e:
                error = e
                if "conversion error" not in str(e):
                    break  # else read the int columns as text, for int() to judge
        self._check_csv_structure()
        raise ValueError(f"{self.path}: {str(error).splitlines()[0]}")

    def _read_parquet(self):
        try:
            texts = [f.name for f in pq.read_schema(self.path) if pa.types.is_string(f.type)]
            return pq.read_table(self.path, use_threads=False, read_dictionary=texts)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{self.path}: not a readable Parquet file: "
                             f"{str(e).splitlines()[0]}") from None

    def _check_csv_structure(self):
        """Raises the first structural error of the CSV file, as Python's csv module sees it."""
        rows = 0
        try:
            with open(self.path, encoding="utf-8-sig", newline="") as f:
                reader = csv.reader(f)
                header = next(reader)
                rows = 1
                for row in reader:
                    rows += 1
                    if len(row) != len(header):
                        raise ValueError(f"{self.path}: row {rows}: {len(row)} fields, the "
                                         f"header has {len(header)}.")
        except csv.Error as e:
            raise ValueError(f"{self.path}: row {rows + 1}: {e}.") from None
        except UnicodeDecodeError:
            _raise_utf8_error(self.path)

    def _int_chunk(self, name, column, first):
        """int64 values of a column's chunk (rows from `first`), as Python's int() reads
        them (text, whole floats, bools); a bad cell is recorded for `ints` to report."""
        kind = column.type
        if column.null_count == 0 and (pa.types.is_integer(kind) or pa.types.is_boolean(kind)
                                       or pa.types.is_string(kind) or pa.types.is_floating(kind)
                                       and pc.all(pc.equal(column, pc.floor(column))).as_py()
                                       and pc.all(pc.is_finite(column)).as_py()):
            try:
                return pc.cast(column, pa.int64()).to_numpy()
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                pass  # outside int64, or text int() may still read (" 7", "+7")
        out = np.zeros(len(column), np.int64)
        for i, v in enumerate(column.to_pylist()):
            try:
                if isinstance(v, float) and not v.is_integer():
                    raise ValueError  # NaN, inf or a fraction, which int() would truncate
                out[i] = int(v)
            except (TypeError, ValueError):
                self._errors.setdefault(name, f"{self.row(first + i)}, column {name!r}: {v!r} "
                                              "is not an integer.")
                break
            except OverflowError:
                self._errors.setdefault(name, f"{self.row(first + i)}, column {name!r}: {v!r} "
                                              "is outside the int64 range.")
                break
        return out

    def row(self, i):
        return f"{self.path}: row {i + self._first_row}"

    def require(self, names):
        missing = [n for n in names if n not in self.columns]
        if missing:
            raise ValueError(f"{self.path}: missing column(s) {missing}; it has "
                             f"{sorted(self.columns)}.")

    def ints(self, name):
        if name in self._errors:
            raise ValueError(self._errors[name])
        return self._ints[name]

    def codes(self, name):
        """(int32 codes [num_rows], sorted distinct values: a pyarrow string array) of an
        id column; an empty id is an error."""
        codes, values = self._codes[name]
        if len(values) and values[0].as_py() == "":
            raise ValueError(f"{self.row(int(np.argmax(codes == 0)))}, column {name!r}: "
                             "empty id.")
        return codes, values

    def value(self, name, i):
        """The text of one cell."""
        codes, values = self._codes[name]
        return values[int(codes[i])].as_py()

    def texts(self, name):
        """A column as str, "" where a cell is empty or null or the column absent."""
        if name not in self._codes:
            return np.full(self.num_rows, "", object)
        codes, values = self._codes[name]
        return values.to_numpy(zero_copy_only=False)[codes]

    def ids(self, name):
        codes, values = self.codes(name)
        return values.to_numpy(zero_copy_only=False)[codes]


def _ids(column):
    """A column chunk of any type as a dictionary array of text, as Python's str()
    writes each value; "" for nulls."""
    if pa.types.is_dictionary(column.type):
        if pa.types.is_string(column.type.value_type) and not column.null_count:
            return column
        column = column.dictionary_decode()
    if pa.types.is_large_string(column.type) or pa.types.is_integer(column.type):
        column = pc.cast(column, pa.string())
    elif not pa.types.is_string(column.type):
        column = pa.array([None if v is None else str(v) for v in column.to_pylist()],
                          pa.string())
    return pc.dictionary_encode(pc.fill_null(column, ""))


def _unify(parts):
    """Dictionary arrays as one (int32 codes, sorted distinct values)."""
    dictionaries = pa.concat_arrays([p.dictionary for p in parts])
    values = vocabulary(dictionaries)
    remap = pc.index_in(dictionaries, value_set=values).to_numpy()
    offsets = np.cumsum([0] + [len(p.dictionary) for p in parts])
    return (np.concatenate([remap[o + p.indices.to_numpy()] for o, p in zip(offsets, parts)])
            .astype(np.int32), values)


def _raise_utf8_error(path):
    with open(path, "rb") as f:
        data = f.read().removeprefix(codecs.BOM_UTF8)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        # The rows before the bad byte, plus the one it is in ("x" starts it if none is open).
        row = len(list(csv.reader(io.StringIO(data[:e.start].decode("utf-8") + "x", newline=""))))
        raise ValueError(f"{path}: row {row}: byte 0x{data[e.start]:02x} is not UTF-8; save the "
                         "file as UTF-8.") from None


def vocabulary(values):
    """Sorted distinct raw values (a pyarrow string array): value k is dense id
    k + schema.FIRST_ID."""
    distinct = pc.unique(pa.array(values, pa.string()) if not isinstance(values, pa.Array)
                         else values)
    return distinct.take(pc.array_sort_indices(distinct))


def lookup(vocab, values):
    """Dense int64 ids of raw `values` in `vocab` (schema.OOV_ID where absent)."""
    values = pa.array(values, pa.string()) if not isinstance(values, pa.Array) else values
    position = pc.fill_null(pc.index_in(values, value_set=vocab), -1).to_numpy()
    return np.where(position < 0, schema.OOV_ID, position.astype(np.int64) + schema.FIRST_ID)


def image_paths(table, column, images_dir, absolute_image_paths, ids=None):
    """Each row's image file, None where it has none.

    With `column`, its cell is the path (empty: none; a file that is not there
    is an error); without, the first of ``<id>.png/.jpg/.jpeg`` that exists.
    """
    root = os.path.abspath(images_dir)
    paths = np.full(table.num_rows, None, object)
    cells = table.texts(column) if column else None
    for i in range(table.num_rows):
        if column:
            where, names = f"{table.row(i)}, column {column!r}", [cells[i]]
            if not names[0]:
                continue
        else:
            where, names = table.row(i), [f"{ids[i]}{s}" for s in IMAGE_SUFFIXES]
        candidates = []
        for name in names:
            path = os.path.join(images_dir, name)
            if os.path.isabs(name) and not absolute_image_paths:
                raise ValueError(f"{where}: image path {name!r} is absolute; pass "
                                 "--absolute_image_paths to read it, or make it relative to "
                                 "--images_dir.")
            if not os.path.isabs(name) and \
                    os.path.commonpath([root, os.path.abspath(path)]) != root:
                raise ValueError(f"{where}: image path {name!r} leaves --images_dir={images_dir}.")
            candidates.append(path)
        paths[i] = next((p for p in candidates if os.path.isfile(p)), None)
        if paths[i] is None and column:
            raise ValueError(f"{where}: image {names[0]!r} not found (looked for {candidates[0]}).")
    return paths


def read_image(path, where=None):
    """The file's bytes; with `where` (for the error), checked to decode as an image."""
    if path is None:
        return b""
    with open(path, "rb") as f:
        data = f.read()
    if where is not None:
        try:
            tf.io.decode_image(data, channels=3, expand_animations=False)
        except tf.errors.InvalidArgumentError:
            raise ValueError(f"{path} ({where}): does not decode as an image.") from None
    return data


def read_items(path):
    items = Table(path)
    items.require(["item_id"])
    codes, _ = items.codes("item_id")
    repeats = _repeats([codes])
    if repeats.any():
        i = int(np.argmax(repeats))
        raise ValueError(f"{items.row(i)}: duplicate item_id {items.value('item_id', i)!r} "
                         f"(first at {items.row(int(np.argmax(codes == codes[i])))}).")
    return items, items.ids("item_id")


def _repeats(columns):
    """Whether each row equals an earlier one in every column (equal-length int arrays)."""
    # Columns whose value ranges multiply within int64 are one sort key (fewer to sort by).
    keys, key, span = [], None, 1
    for column in columns:
        low, high = int(column.min()), int(column.max())
        if key is not None and span * (high - low + 1) < 2**62:
            key = key * (high - low + 1) + (column.astype(np.int64) - low)
            span *= high - low + 1
        else:
            if key is not None:
                keys.append(key)
            # A column spanning more than 2**62 (int64 timestamps) is a key as it is.
            key = column.astype(np.int64) - low if high - low < 2**62 else column
            span = high - low + 1
    columns = keys + [key]
    order = np.lexsort(columns[::-1])  # stable: equal rows stay in file order
    same = np.ones(len(order) - 1, bool)
    for column in columns:
        sorted_column = column[order]
        same &= sorted_column[1:] == sorted_column[:-1]
    repeats = np.zeros(len(order), bool)
    repeats[order[1:][same]] = True
    return repeats


def item_image(raw, path, row):
    """An item's image bytes (b"": none), checked to decode; `row` names the item's row."""
    return read_image(path, f"item {raw!r}, {row}")


def item_features(item_id, category_id, image, title):
    """An item record's features, for `schema.example` (one item's values) or
    `schema.examples` (arrays of them): dense ids, image bytes, encoded title."""
    return {"ints": {"item_id": item_id, "category_id": category_id,
                     "first_day": np.zeros_like(item_id)},
            "strings": {"image": image, "title": title}}


def impression_features(user_id, item_id, category_id, timestamp, label, is_new_item, side,
                        history):
    """An impression record's features, for `schema.example` or `schema.examples`
    (as `item_features`): `side` maps each side column to its dense ids, `history`
    holds the history's (item ids, category ids, timestamps), as lists or as
    `schema.examples` int_lists triples."""
    return {"ints": {"user_id": user_id, "item_id": item_id, "category_id": category_id,
                     "timestamp": timestamp, "label": label, "is_new_item": is_new_item,
                     **side},
            "int_lists": dict(zip(HISTORY, history))}


def image_chunks(rows, paths):
    """`rows` in runs of at most RECORDS_PER_CHUNK whose image files (`paths` by row, None:
    none) hold about IMAGE_BYTES_PER_CHUNK at most: what is serialised at once."""
    ends = np.cumsum([0 if paths[i] is None else os.path.getsize(paths[i]) for i in rows])
    a = 0
    while a < len(rows):
        fits = np.searchsorted(ends, (ends[a - 1] if a else 0) + IMAGE_BYTES_PER_CHUNK, "right")
        b = min(a + RECORDS_PER_CHUNK, max(a + 1, int(fits)))
        yield rows[a:b]
        a = b


def item_records(items, ids, item_vocab, categories, images, titles):
    dense = lookup(item_vocab, ids)
    for rows in image_chunks(range(len(ids)), images):
        yield from schema.examples(**item_features(
            dense[rows], categories[rows],
            [item_image(ids[i], images[i], items.row(i)) for i in rows],
            [titles[i].encode() for i in rows]))


def read_catalogue(path, images_dir, absolute_image_paths):
    """An items file: (table, raw ids, raw categories (None without the column),
    titles, image files (None: none))."""
    items, ids = read_items(path)
    categories = items.ids("category_id") if "category_id" in items.columns else None
    images = np.full(len(ids), None, object)
    if images_dir:
        column = "image" if "image" in items.columns else None
        images = image_paths(items, column, images_dir, absolute_image_paths, ids)
    return items, ids, categories, items.texts("title"), images


def no_image_error(items_path, images_dir):
    return ValueError(f"{items_path}: no item has an image in --images_dir={images_dir} "
                      "(looked for <item_id>.png, .jpg, .jpeg).")


def read_log(path):
    """An impressions file, its ids and labels checked: (table, user (codes, values),
    item (codes, values), int64 timestamps, int8 labels, {side column: (codes,
    values)}), codes as `Table.codes` gives them."""
    log = Table(path, ints=("label", "timestamp"))
    log.require(IMPRESSION_COLUMNS)
    users = log.codes("user_id")
    timestamp, label = log.ints("timestamp"), log.ints("label")
    bad = np.flatnonzero((label != 0) & (label != 1))
    if len(bad):
        raise ValueError(f"{log.row(bad[0])}, column 'label': {label[bad[0]]} is not 0 or 1.")
    items = log.codes("item_id")
    side = {c: log.codes(c) for c in log.columns if c not in IMPRESSION_COLUMNS}
    return log, users, items, timestamp, label.astype(np.int8), side


def unknown_item_error(where, raw, items_path, count):
    return ValueError(f"{where}, column 'item_id': {raw!r} is not in {items_path} ({count} such "
                      "rows; --unknown_items=oov maps them to id 1).")


def split_error(impressions_path, cut):
    return ValueError(f"{impressions_path}: the split at timestamp {cut} leaves an empty train "
                      "or test split.")


def write_vocabulary(path, vocab):
    """`vocab` (a `vocabulary`) as text: line k is dense id k + schema.FIRST_ID."""
    with open(path, "w") as f:
        f.writelines(f"{v}\n" for v in vocab.to_pylist())


def metadata(impressions_path, items_path, images_dir, pairs, vocab_sizes, max_history, side,
             cut, oov_users, unknown_items, duplicates, drop_duplicates, missing_images,
             missing_titles, pair_meta=None):
    """metadata.json of a prepared directory, less what DataDirWriter adds;
    `vocab_sizes` counts the raw values of "items", "users", "categories" and
    of each side column; `oov_users` is (test users not in training, their test
    impressions); `unknown_items` impressions of items missing from the items."""
    return {
        "source": "prepared",
        "inputs": {"impressions": os.path.abspath(impressions_path),
                   "items": os.path.abspath(items_path), "images_dir": images_dir,
                   "pairs": pairs and os.path.abspath(pairs)},
        "vocab": {f"num_{k}": n + schema.FIRST_ID for k, n in vocab_sizes.items()},
        "max_history": max_history,
        "image_size": None,
        "side_features": side,
        "split_timestamp": int(cut),
        "oov": {"test_users": int(oov_users[0]), "test_user_impressions": int(oov_users[1]),
                "unknown_item_impressions": int(unknown_items)},
        "duplicates": {"impressions": int(duplicates), "dropped": drop_duplicates},
        "missing": {"images": int(missing_images), "titles": int(missing_titles)},
        **({"pairs": pair_meta} if pair_meta is not None else {}),
    }


def oov_users(codes, dense_of_code):
    """(distinct users, impressions) among the raw user `codes` of test impressions whose
    user is out of the training vocabulary."""
    oov = dense_of_code[codes] == schema.OOV_ID
    return len(np.unique(codes[oov])), int(oov.sum())


def oov_line(oov):
    """The output line's words for metadata's "oov"."""
    return (f"{oov['test_users']} test users not in training ({oov['test_user_impressions']} "
            f"test impressions, user id 1), {oov['unknown_item_impressions']} impressions of "
            "items not in --items (item id 1)")


def first_test(n, test_fraction):
    """The position of the first test row of `n` in time order."""
    return min(int(np.ceil((1.0 - test_fraction) * n)), n - 1)


def file_pairs(path, items_path, item_vocab, images_dir, absolute_image_paths, unknown_items,
               cut, test_fraction):
    """Pairs of a --pairs file: (query image paths, query texts, dense positives,
    given negatives (0: mine one), is_test, where-for-errors per pair, metadata),
    in time order."""
    table = Table(path, ints=("timestamp",))
    table.require(["item_id"])
    if "query_text" not in table.columns and "query_image" not in table.columns:
        raise ValueError(f"{path}: needs a 'query_text' or 'query_image' column; it has "
                         f"{sorted(table.columns)}.")
    text = table.texts("query_text")
    image = np.full(table.num_rows, None, object)
    if "query_image" in table.columns:
        if not images_dir and table.texts("query_image").any():
            raise ValueError(f"{path}: column 'query_image' names image files; pass "
                             "--images_dir (they are read relative to it).")
        if images_dir:
            image = image_paths(table, "query_image", images_dir, absolute_image_paths)
    empty = np.flatnonzero((text == "") & (image == None))  # noqa: E711 (elementwise)
    if len(empty):
        raise ValueError(f"{table.row(empty[0])}: no query: both 'query_text' and "
                         "'query_image' are empty.")
    positive = lookup(item_vocab, table.ids("item_id"))
    named = table.texts("negative_item_id")
    negative = np.where(named != "", lookup(item_vocab, named), schema.PAD_ID)
    for column, ids in (("item_id", positive), ("negative_item_id", negative)):
        unknown = np.flatnonzero(ids == schema.OOV_ID)
        if len(unknown) and unknown_items == "error":
            raise ValueError(f"{table.row(unknown[0])}, column {column!r}: "
                             f"{table.value(column, unknown[0])!r} is not in {items_path} "
                             f"({len(unknown)} such rows; --unknown_items=oov skips those "
                             "pairs).")
    same = np.flatnonzero((negative == positive) & (positive != schema.OOV_ID))
    if len(same):
        raise ValueError(f"{table.row(same[0])}, column 'negative_item_id': "
                         f"{named[same[0]]!r} is the pair's own item_id.")
    known = (positive != schema.OOV_ID) & (negative != schema.OOV_ID)
    if "timestamp" in table.columns:
        timestamp = table.ints("timestamp")
        rows = np.argsort(timestamp, kind="stable")
        rows = rows[known[rows]]
        is_test = timestamp[rows] >= cut
        split = f"the split at timestamp {cut}"
    else:
        rows = np.flatnonzero(known)
        is_test = np.arange(len(rows)) >= first_test(len(rows), test_fraction)
        split = f"{len(rows)} rows without timestamps, split by --test_fraction"
    if is_test.all() or not is_test.any():
        raise ValueError(f"{path}: {split} leaves no {'train' if is_test.all() else 'test'} "
                         "pairs.")
    where = np.array([f"{table.row(i)}, column 'query_image'" for i in rows], dtype=object)
    return (image[rows], text[rows], positive[rows], negative[rows], is_test, where,
            {"source": os.path.abspath(path), "skipped_unknown": int((~known).sum())})


def _train_vocabulary(codes, values, train):
    """The vocabulary of the `values` (sorted distinct) that training rows hold, and
    each code's dense id: what `vocabulary` and `lookup` give, from the codes."""
    seen = np.zeros(len(values), bool)
    seen[codes[train]] = True
    dense = np.where(seen, np.cumsum(seen) - 1 + schema.FIRST_ID, schema.OOV_ID)
    return values.filter(pa.array(seen)), dense


def click_pairs(user, item, timestamp, label, is_test, window, max_gap):
    """Log rows (first, second) of a user's click and each of their next `window`
    clicks of another item in the same split, at most `max_gap` later (None: any);
    in time order of the second click."""
    clicks = np.flatnonzero((label == 1) & (item != schema.OOV_ID))
    clicks = clicks[np.lexsort((timestamp[clicks], user[clicks]))]  # stable: ties in file order
    first, second = [], []
    for k in range(1, window + 1):
        a, b = clicks[:-k], clicks[k:]
        keep = (user[a] == user[b]) & (is_test[a] == is_test[b]) & (item[a] != item[b])
        if max_gap is not None:  # b is not earlier than a, so the uint64 difference is exact
            keep &= timestamp[b].view(np.uint64) - timestamp[a].view(np.uint64) <= max_gap
        first.append(a[keep])
        second.append(b[keep])
    first, second = np.concatenate(first), np.concatenate(second)
    order = np.lexsort((first, second, timestamp[second]))
    return first[order], second[order]


def check_options(max_history, test_fraction, split_timestamp, pairs, pairs_from, pair_window,
                  pair_max_gap):
    if max_history < 1:
        raise ValueError(f"--max_history={max_history}: must be >= 1.")
    if not 0.0 < test_fraction < 1.0 and (split_timestamp is None or pairs):
        raise ValueError(f"--test_fraction={test_fraction}: must be in (0, 1).")
    if pairs and pairs_from:
        raise ValueError(f"--pairs={pairs} and --pairs_from={pairs_from}: pass one of them.")
    if pairs_from not in (None, "clicks"):
        raise ValueError(f"--pairs_from={pairs_from!r}: the only source is 'clicks'.")
    if pair_window < 1:
        raise ValueError(f"--pair_window={pair_window}: must be >= 1.")
    if pair_max_gap is not None and pair_max_gap < 0:
        raise ValueError(f"--pair_max_gap={pair_max_gap}: must be >= 0.")


def prepare(impressions_path, items_path, out_dir, images_dir=None, max_history=50,
            test_fraction=0.1, split_timestamp=None, unknown_items="error",
            drop_duplicates=False, absolute_image_paths=False, pairs=None, pairs_from=None,
            pair_window=1, pair_max_gap=None, seed=0):
    """Writes the data directory; returns its metadata."""
    check_options(max_history, test_fraction, split_timestamp, pairs, pairs_from, pair_window,
                  pair_max_gap)
    writer = DataDirWriter(out_dir, inputs=(impressions_path, items_path, images_dir, pairs))
    items, item_ids, raw_categories, titles, images = read_catalogue(
        items_path, images_dir, absolute_image_paths)
    item_vocab = vocabulary(item_ids)
    if raw_categories is not None:
        category_vocab = vocabulary(raw_categories)
        item_category = lookup(category_vocab, raw_categories)
    else:
        category_vocab = vocabulary([])
        item_category = np.full(len(item_ids), schema.OOV_ID, np.int64)
    category_of = np.full(len(item_vocab) + schema.FIRST_ID, schema.OOV_ID, np.int64)
    item_dense = lookup(item_vocab, item_ids)
    category_of[item_dense] = item_category
    if images_dir and "image" not in items.columns and (images == None).all():  # noqa: E711
        raise no_image_error(items_path, images_dir)

    log, (user_codes, user_values), (item_codes, item_values), timestamp, label, side_codes = \
        read_log(impressions_path)
    item = lookup(item_vocab, item_values).astype(np.int32)[item_codes]
    unknown = np.flatnonzero(item == schema.OOV_ID)
    if len(unknown) and unknown_items == "error":
        raise unknown_item_error(log.row(unknown[0]), log.value("item_id", unknown[0]),
                                 items_path, len(unknown))
    side = list(side_codes)
    del log  # what is left of it: the item codes and int64 labels

    duplicate = _repeats([user_codes, item_codes, label, timestamp,
                          *(codes for codes, _ in side_codes.values())])
    del item_codes
    if drop_duplicates:
        keep = ~duplicate
        user_codes, item, label, timestamp = (a[keep] for a in (user_codes, item, label,
                                                                 timestamp))
        side_codes = {c: (codes[keep], values) for c, (codes, values) in side_codes.items()}

    order = np.argsort(timestamp, kind="stable")
    if split_timestamp is None:
        cut = timestamp[order[first_test(len(order), test_fraction)]]
    else:
        cut = split_timestamp
    is_test = timestamp >= cut
    if is_test.all() or not is_test.any():
        raise split_error(impressions_path, cut)
    train_rows = order[~is_test[order]].astype(np.int32)  # int32 halves what is held
    test_rows = order[is_test[order]].astype(np.int32)
    del order

    user_vocab, user_of_code = _train_vocabulary(user_codes, user_values, ~is_test)
    # OOV users keep their own history: histories go by raw user (code), not dense id.
    clicks, start, end = history_ranges(user_codes, timestamp, label, max_history)
    side_vocab, side_of_code = {}, {}
    for c, (codes, values) in side_codes.items():
        side_vocab[c], side_of_code[c] = _train_vocabulary(codes, values, ~is_test)
    trained = np.zeros(len(category_of), bool)
    trained[item[~is_test]] = True

    if pairs:
        (query_image, query_text, positive, negative, pair_test, where,
         pair_meta) = file_pairs(pairs, items_path, item_vocab, images_dir, absolute_image_paths,
                                 unknown_items, cut, test_fraction)
        query_item = np.full(len(positive), schema.PAD_ID, np.int64)  # queries of their own
    elif pairs_from:
        first, second = click_pairs(user_codes, item, timestamp, label, is_test, pair_window,
                                    pair_max_gap)
        pair_test = is_test[second]
        if pair_test.all() or not pair_test.any():
            raise ValueError(f"--pairs_from=clicks: no {'train' if pair_test.all() else 'test'} "
                             "pairs (no user clicks two items in that split within "
                             "--pair_window and --pair_max_gap).")
        # The query is the first item, by id: its content is in the catalogue, once.
        query_item, positive = item[first], item[second]
        query_image, query_text = np.full(len(first), None), np.full(len(first), "", object)
        where = query_image
        negative = np.full(len(second), schema.PAD_ID, np.int64)
        pair_meta = {"source": "clicks", "window": pair_window, "max_gap": pair_max_gap}
    if pairs or pairs_from:
        mine = negative == schema.PAD_ID
        if mine.any() and len(item_vocab) < 2:
            raise ValueError(f"{items_path}: one item only; a hard negative needs another.")
        negative = np.where(mine, hard_negatives(positive, category_of,
                                                 np.random.default_rng(seed)), negative)
        pair_meta.update(train=int((~pair_test).sum()), test=int(pair_test.sum()),
                         mined_negatives=int(mine.sum()), seed=seed)

    def triplets(rows):
        for chunk in image_chunks(rows, query_image):
            yield from schema.examples(
                ints={"positive_item_id": positive[chunk], "negative_item_id": negative[chunk],
                      schema.QUERY_ITEM: query_item[chunk]},
                strings={"query_image": [read_image(query_image[i], where[i]) for i in chunk],
                         "query_text": [query_text[i].encode() for i in chunk]})

    # A history is a run of its user's clicks: their varints are made once.
    history = [schema.Varints(v) for v in (item[clicks], category_of[item[clicks]],
                                           timestamp[clicks])]

    def records(rows):
        for a in range(0, len(rows), RECORDS_PER_CHUNK):
            chunk = rows[a:a + RECORDS_PER_CHUNK]
            chunk_item = item[chunk]
            yield from schema.examples(**impression_features(
                user_of_code[user_codes[chunk]], chunk_item, category_of[chunk_item],
                timestamp[chunk], label[chunk], ~trained[chunk_item],
                {c: side_of_code[c][side_codes[c][0][chunk]] for c in side},
                [(v, start[chunk], end[chunk]) for v in history]))

    with writer as w:
        w.write("impressions/train", records(train_rows), len(train_rows))
        w.write("impressions/test", records(test_rows), len(test_rows))
        w.write("items", item_records(items, item_ids, item_vocab, item_category, images,
                                      titles), len(item_ids))
        if pairs or pairs_from:
            for split, rows in (("train", np.flatnonzero(~pair_test)),
                                ("test", np.flatnonzero(pair_test))):
                w.write(f"pretrain/{split}", triplets(rows), len(rows))
        os.makedirs(w.path("vocab"))
        for name, vocab in (("users", user_vocab), ("items", item_vocab),
                            ("categories", category_vocab),
                            *((f"side-{c}", side_vocab[c]) for c in side)):
            write_vocabulary(w.path(f"vocab/{name}.txt"), vocab)
        sizes = {"items": len(item_vocab), "users": len(user_vocab),
                 "categories": len(category_vocab), **{c: len(side_vocab[c]) for c in side}}
        w.finish(metadata(
            impressions_path, items_path, images_dir, pairs, sizes, max_history, side, cut,
            oov_users(user_codes[test_rows], user_of_code), (item == schema.OOV_ID).sum(),
            duplicate.sum(), drop_duplicates,
            (images == None).sum(), (titles == "").sum(),  # noqa: E711 (elementwise)
            pair_meta if pairs or pairs_from else None))
    return schema.read_metadata(out_dir)


def main(argv):
    if len(argv) > 1 and not FLAGS.runner:
        sys.exit(f"unexpected arguments: {argv[1:]} (pipeline options need --runner)")
    for name in ("impressions", "items", "out_dir"):
        if not FLAGS[name].value:
            sys.exit(f"--{name} is required.")
    run = prepare
    if FLAGS.runner:
        _startup.quiet_logging()  # Beam logs every step at INFO
        # prepare_beam imports this module's helpers: let it find this one (run as __main__)
        # rather than import it again and define its flags twice.
        sys.modules.setdefault("tfmm.data.prepare", sys.modules[__name__])
        try:
            from tfmm.data import prepare_beam
        except ImportError as e:
            if (e.name or "").partition(".")[0] != "apache_beam":
                raise
            sys.exit(f"--runner={FLAGS.runner} needs Apache Beam, an extra of tfmm: "
                     'pip install -e ".[beam]"')
        run = functools.partial(prepare_beam.prepare, runner=FLAGS.runner, beam_args=argv[1:])
    try:
        meta = run(FLAGS.impressions, FLAGS.items, FLAGS.out_dir, FLAGS.images_dir,
                   FLAGS.max_history, FLAGS.test_fraction, FLAGS.split_timestamp,
                   FLAGS.unknown_items, FLAGS.drop_duplicates, FLAGS.absolute_image_paths,
                   FLAGS.pairs, FLAGS.pairs_from, FLAGS.pair_window, FLAGS.pair_max_gap,
                   FLAGS.seed)
    except (ValueError, OSError) as e:  # bad input: one line naming the file, not a trace
        sys.exit(str(e))
    print(f"wrote {FLAGS.out_dir}: {meta['counts']}, vocab {meta['vocab']}, "
          f"out of vocabulary: {oov_line(meta['oov'])}, "
          f"duplicates {meta['duplicates']}, items without {meta['missing']}"
          + (f", pairs {meta['pairs']}" if "pairs" in meta else ""))
    if meta["duplicates"]["impressions"] and not FLAGS.drop_duplicates:
        print(f"{meta['duplicates']['impressions']} impressions repeat an earlier one in every "
              "column; kept (--drop_duplicates drops them).")


if __name__ == "__main__":
    app.run(main)
