"""Your files as `tfmm.data.prepare` reads them: CSV or Parquet tables, checked
row by row, their vocabularies, and the records and metadata they become.

What the two preparation paths share: `tfmm.data.prepare` (one process,
vectorised with Arrow and NumPy) and `tfmm.data.prepare_beam` (an Apache Beam
pipeline) read and check each file with these functions and lay out each
record with them, so both write the same data directory. The file formats
are described in `tfmm.data.prepare`.
"""

import codecs
import csv
import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import tensorflow as tf

from tfmm.data import schema
from tfmm.data.images import too_many_pixels

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
    """The file's bytes; with `where` (for the error), checked to decode as an image of at
    most `tfmm.data.images.MAX_PIXELS` pixels (before it is decoded)."""
    if path is None:
        return b""
    with open(path, "rb") as f:
        data = f.read()
    if where is not None:
        too_large = too_many_pixels(data)
        if too_large:
            raise ValueError(f"{path} ({where}): {too_large}.")
        try:
            tf.io.decode_image(data, channels=3, expand_animations=False)
        except tf.errors.InvalidArgumentError:
            raise ValueError(f"{path} ({where}): does not decode as an image.") from None
    return data


def read_items(path):
    items = Table(path)
    items.require(["item_id"])
    codes, _ = items.codes("item_id")
    repeats = repeated_rows([codes])
    if repeats.any():
        i = int(np.argmax(repeats))
        raise ValueError(f"{items.row(i)}: duplicate item_id {items.value('item_id', i)!r} "
                         f"(first at {items.row(int(np.argmax(codes == codes[i])))}).")
    return items, items.ids("item_id")


def repeated_rows(columns):
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


def pair_features(query_item, positive, negative, query_image, query_text):
    """A pre-training pair's record (an SCL triplet), for `schema.example` or
    `schema.examples` (as `item_features`): dense ids (the query item 0 where the
    query is a text or photo of its own), image bytes, encoded query text."""
    return {"ints": {"positive_item_id": positive, "negative_item_id": negative,
                     schema.QUERY_ITEM: query_item},
            "strings": {"query_image": query_image, "query_text": query_text}}


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


def metadata(options, vocab_sizes, side, cut, oov_users, unknown_items, duplicates,
             missing_images, missing_titles, pair_meta=None):
    """metadata.json of a directory prepared with `options` (a `prepare.PrepareOptions`),
    less what DataDirWriter adds; `vocab_sizes` counts the raw values of "items",
    "users", "categories" and of each side column; `oov_users` is (test users not in
    training, their test impressions); `unknown_items` impressions of items missing
    from the items."""
    return {
        "source": "prepared",
        "inputs": {"impressions": os.path.abspath(options.impressions),
                   "items": os.path.abspath(options.items), "images_dir": options.images_dir,
                   "pairs": options.pairs and os.path.abspath(options.pairs)},
        "vocab": {f"num_{k}": n + schema.FIRST_ID for k, n in vocab_sizes.items()},
        "max_history": options.max_history,
        "image_size": None,
        "side_features": side,
        "split_timestamp": int(cut),
        "oov": {"test_users": int(oov_users[0]), "test_user_impressions": int(oov_users[1]),
                "unknown_item_impressions": int(unknown_items)},
        "duplicates": {"impressions": int(duplicates), "dropped": options.drop_duplicates},
        "missing": {"images": int(missing_images), "titles": int(missing_titles)},
        **({"pairs": pair_meta} if pair_meta is not None else {}),
    }


def first_test(n, test_fraction):
    """The position of the first test row of `n` in time order."""
    return min(int(np.ceil((1.0 - test_fraction) * n)), n - 1)
