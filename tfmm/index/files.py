"""Vector files in and out of an index table, by raw item id.

A vector file names items by their raw ids (as in the logs `tfmm.data.prepare`
read); `import_vectors` maps them to dense ids through the data directory's
vocabulary (`tfmm.data.schema.dense_ids`) and `export_vectors` back.
Formats, recognised by content (else by name) when read, by name when written:

- Parquet (``PAR1`` magic bytes, or a ``.parquet*`` or ``.pq`` name): an
  ``item_id`` column and a list-of-numbers column (``vector`` unless
  `vector_column` names another); without that column, every other column is
  one component, in file order. Written as ``item_id`` and ``vector``.
- CSV (``.csv``; UTF-8, with or without a byte order mark; a header row): an
  ``item_id`` column and a `vector_column` cell of numbers separated by
  commas or spaces, optionally in brackets (``"[0.1, 0.2]"``); without that
  column, every other column is one component. Written as ``item_id,v0,...``.
- NumPy (``.npy``): a numeric array [n, d], its raw ids in `ids` (a text file,
  one id a line, or a ``.npy`` array), in row order. Written the same way.

Errors are one line naming the file and the row (CSV rows as in a
spreadsheet, the header is row 1; Parquet rows from 1; ``.npy`` rows from 0,
as numpy indexes them) and, where known, the raw item id.
"""

import contextlib
import dataclasses
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pa_compute
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from tfmm import outputs
from tfmm.data import schema
from tfmm.index import IndexNotFound, is_redis, local_index, open_index, redact, remove_files

WRITTEN_BY = b"written_by"  # Parquet metadata: a file an export may replace
# A vector whose norm is this close to 1 is a unit vector: kept bit for bit, so
# an export imported again is written unchanged.
UNIT_TOLERANCE = 1e-4


@dataclasses.dataclass
class VectorFile:
    """The rows of a vector file: raw ids (str) and float32 vectors [n, d]."""

    path: str
    raw_ids: list
    vectors: np.ndarray
    first_row: int  # the number errors give row 0

    def row(self, i):
        return f"{self.path}: row {i + self.first_row} (item {self.raw_ids[i]!r})"


def _read_format(path):
    with open(path, "rb") as f:
        head = f.read(6)
    if schema.is_parquet(path):
        return "parquet"
    if head == b"\x93NUMPY" or str(path).lower().endswith(".npy"):
        return "npy"
    if str(path).lower().endswith(".csv"):
        return "csv"
    raise ValueError(f"{path}: unknown format; expected Parquet, CSV (.csv) or NumPy (.npy).")


def _write_format(path):
    lower = str(path).lower()
    for fmt, matches in (("parquet", schema.is_parquet(path, by_content=False)),
                         ("csv", lower.endswith(".csv")),
                         ("npy", lower.endswith(".npy"))):
        if matches:
            return fmt
    raise ValueError(f"{path}: unknown format; name it .parquet, .csv or .npy.")


def read_vectors(path, ids=None, vector_column="vector"):
    """The `VectorFile` at `path` (a format above), its values checked: every row
    has an id and the same width, every value is finite, no id repeats."""
    path = str(path)
    fmt = _read_format(path)
    if fmt != "npy" and ids is not None:
        raise ValueError(f"{ids}: `ids` is only for .npy vectors; {path} has an item_id column.")
    if fmt == "npy":
        file = _read_npy(path, ids)
    else:
        file = _read_table(path, fmt, vector_column)
    n, d = file.vectors.shape
    if not n or not d:
        raise ValueError(f"{path}: no vectors ({n} rows of width {d}).")
    bad = np.flatnonzero(~np.isfinite(file.vectors).all(axis=1))
    if len(bad):
        raise ValueError(f"{file.row(bad[0])}: the vector has NaN or Inf ({len(bad)} such "
                         "rows).")
    first = {}
    for i, raw in enumerate(file.raw_ids):
        if raw in first:
            raise ValueError(f"{file.row(i)}: a duplicate id (first at row "
                             f"{first[raw] + file.first_row}).")
        first[raw] = i
    return file


def _read_npy(path, ids):
    if ids is None:
        raise ValueError(f"{path}: .npy vectors need `ids`, their raw item ids in row order.")
    try:
        vectors = np.load(path, allow_pickle=False)
    except ValueError as e:  # not an array file, or an object array
        raise ValueError(f"{path}: not a numeric .npy array ({e}).") from None
    if vectors.ndim != 2 or not (np.issubdtype(vectors.dtype, np.integer)
                                 or np.issubdtype(vectors.dtype, np.floating)):
        raise ValueError(f"{path}: want a numeric array [n, d], got {vectors.dtype} "
                         f"{vectors.shape}.")
    if str(ids).lower().endswith(".npy"):
        try:
            raw = [str(v) for v in np.load(ids, allow_pickle=False).reshape(-1).tolist()]
        except ValueError as e:
            raise ValueError(f"{ids}: not a .npy array of ids ({e}).") from None
    else:
        with open(ids, "rb") as f:
            try:
                raw = f.read().decode("utf-8-sig").splitlines()
            except UnicodeDecodeError as e:
                raise ValueError(f"{ids}: byte {e.start} is not UTF-8.") from None
    if len(raw) != len(vectors):
        raise ValueError(f"{ids}: {len(raw)} ids for the {len(vectors)} rows of {path}.")
    file = VectorFile(path, raw, vectors.astype(np.float32), first_row=0)
    _require_ids(file)
    return file


def _require_ids(file):
    for i, raw in enumerate(file.raw_ids):
        if not raw:
            raise ValueError(f"{file.path}: row {i + file.first_row}: empty item id.")


def _read_table(path, fmt, vector_column):
    if fmt == "parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{path}: not a readable Parquet file ({e}).") from None
        first_row = 1
        raw = ["" if v is None else str(v) for v in table.column("item_id").to_pylist()] \
            if "item_id" in table.column_names else None
    else:
        # Ids as bytes, decoded below to name a row that is not UTF-8; an empty cell is
        # null (named below) but "nan" a NaN; a blank line is a row, so that row numbers
        # stay spreadsheet rows.
        options = dict(
            parse_options=pa_csv.ParseOptions(ignore_empty_lines=False),
            convert_options=pa_csv.ConvertOptions(column_types={"item_id": pa.binary()},
                                                  null_values=[""]))
        try:
            table = pa_csv.read_csv(path, **options)
        except pa.ArrowException:
            try:  # again in one thread, whose errors number the row
                table = pa_csv.read_csv(
                    path, read_options=pa_csv.ReadOptions(use_threads=False), **options)
            except pa.ArrowException as e:
                raise ValueError(f"{path}: {e}") from None
        first_row = 2  # the header is row 1
        raw = None
        if "item_id" in table.column_names:
            raw = []
            for i, v in enumerate(table.column("item_id").to_pylist()):
                try:
                    raw.append(v.decode("utf-8"))
                except UnicodeDecodeError:
                    raise ValueError(f"{path}: row {i + first_row}, column 'item_id': "
                                     f"{v!r} is not UTF-8.") from None
    if raw is None:
        raise ValueError(f"{path}: no 'item_id' column; it has {table.column_names}.")
    file = VectorFile(path, raw, np.zeros((len(raw), 0), np.float32), first_row)
    _require_ids(file)
    if vector_column in table.column_names:
        file.vectors = _vector_column(file, table.column(vector_column), vector_column)
    else:
        names = [c for c in table.column_names if c != "item_id"]
        if not names:
            raise ValueError(f"{path}: no {vector_column!r} column and no component "
                             "columns; it has only 'item_id'.")
        file.vectors = np.stack([_component(file, table.column(c), c) for c in names], axis=1)
    return file


def _numbers(column):
    return pa.types.is_integer(column.type) or pa.types.is_floating(column.type)


def _component(file, column, name):
    """One numeric column of the wide form, as float32 [n]."""
    if _numbers(column):
        if column.null_count:
            i = column.is_null().to_numpy(zero_copy_only=False).argmax()
            raise ValueError(f"{file.row(i)}, column {name!r}: empty cell.")
        return column.to_numpy().astype(np.float32)
    out = np.empty(len(column), np.float32)
    for i, v in enumerate(column.to_pylist()):
        try:
            out[i] = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{file.row(i)}, column {name!r}: {v!r} is not a number.") from None
    return out


def _vector_column(file, column, name):
    """A list column, or text cells of numbers, as float32 [n, d]."""
    column = column.combine_chunks()
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        rows = []
        for i, cell in enumerate(column.to_pylist()):
            parts = [p for p in re.split(r"[\s,]+", (cell or "").strip().strip("[]")) if p]
            if not parts:
                raise ValueError(f"{file.row(i)}, column {name!r}: empty cell.")
            try:
                rows.append(np.array(parts, np.float32))
            except ValueError:
                raise ValueError(f"{file.row(i)}, column {name!r}: {cell!r} is not a list "
                                 "of numbers.") from None
        lengths = np.array([len(r) for r in rows])
        values = np.concatenate(rows) if rows else np.zeros(0, np.float32)
    elif pa.types.is_list(column.type) or pa.types.is_large_list(column.type) \
            or pa.types.is_fixed_size_list(column.type):
        if column.null_count:
            i = column.is_null().to_numpy(zero_copy_only=False).argmax()
            raise ValueError(f"{file.row(i)}, column {name!r}: empty cell.")
        lengths = pa_compute.list_value_length(column).to_numpy(zero_copy_only=False)
        flat = column.flatten()
        if not _numbers(flat):
            raise ValueError(f"{file.path}: column {name!r} holds lists of {flat.type}, not "
                             "numbers.")
        if flat.null_count:
            at = flat.is_null().to_numpy(zero_copy_only=False).argmax()
            i = np.searchsorted(np.cumsum(lengths), at, side="right")
            raise ValueError(f"{file.row(i)}, column {name!r}: a missing value in the list.")
        values = flat.to_numpy().astype(np.float32)
    else:
        raise ValueError(f"{file.path}: column {name!r} is {column.type}, not a list of "
                         "numbers.")
    odd = np.flatnonzero(lengths != lengths[0]) if len(lengths) else []
    if len(odd):
        raise ValueError(f"{file.row(odd[0])}: {lengths[odd[0]]} values, but row "
                         f"{file.first_row} has {lengths[0]}.")
    return values.reshape(len(lengths), lengths[0] if len(lengths) else 0)


def unit_vectors(file, rows, normalize=True):
    """`file`'s vectors of `rows` at unit length, the dot product the rankers compare.

    Vectors within `UNIT_TOLERANCE` of it are kept as they are; others are
    scaled with `normalize`, refused without. A zero vector has no direction.
    """
    vectors = file.vectors[rows]
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    zero = np.flatnonzero(norms == 0)
    if len(zero):
        raise ValueError(f"{file.row(rows[zero[0]])}: a zero vector has no direction to "
                         f"normalise ({len(zero)} such rows).")
    off = np.abs(norms - 1.0) > UNIT_TOLERANCE
    if off.any() and not normalize:
        i = np.flatnonzero(off)[0]
        raise ValueError(f"{file.row(rows[i])}: the vector's norm is {norms[i]:.6g}, not 1 "
                         f"({off.sum()} such rows); normalize=False takes unit vectors only.")
    vectors[off] = (vectors[off] / norms[off, None]).astype(np.float32)
    return vectors


def _exists(spec):
    """Whether the index at `spec` exists, creating nothing."""
    return is_redis(spec) or os.path.exists(spec)


def import_vectors(index, data_dir, path, ids=None, vector_column="vector", unknown="error",
                   normalize=True):
    """Writes the vectors of a vector file to the index `index` (a spec), by the dense ids of
    `data_dir`'s catalogue, in one `VectorIndex.put`: all rows or, on any error, none.

    Args:
      unknown: "error" refuses a raw id the vocabulary lacks; "skip" leaves such
        rows out and counts them.
      normalize: scale vectors to unit length (else only unit vectors are taken).

    Every check (the file, the ids, the index's width and catalogue) runs before
    anything is written; a new index is created only then. Memory: the file's
    table, float32 [n, d] twice, and the put's per-item arguments.

    Returns {"items", "skipped", "dim", "version", "index"} (the index as its repr,
    never with a password).
    """
    if unknown not in ("error", "skip"):
        raise ValueError(f"unknown={unknown!r}: want 'error' or 'skip'.")
    file = read_vectors(path, ids, vector_column)
    dense_of = schema.dense_ids(data_dir)
    dense = np.array([dense_of.get(raw, -1) for raw in file.raw_ids], np.int64)
    missing = np.flatnonzero(dense < 0)
    if len(missing) and unknown == "error":
        raise ValueError(f"{file.row(missing[0])}: not an item of {data_dir} ({len(missing)} "
                         "such rows; unknown='skip' leaves them out).")
    rows = np.flatnonzero(dense >= 0)
    if not len(rows):
        raise ValueError(f"{file.path}: none of its {len(dense)} item ids is an item of "
                         f"{data_dir}.")
    vectors = unit_vectors(file, rows, normalize)
    dim = vectors.shape[1]
    catalogue = schema.catalogue_fingerprint(data_dir)
    if _exists(index):
        with contextlib.suppress(IndexNotFound), contextlib.closing(open_index(index)) as held:
            if held.dim != dim:
                raise ValueError(f"{file.path}: {dim}-d vectors, but {held!r} holds "
                                 f"{held.dim}-d vectors; nothing was imported.")
            theirs = held.catalogue()
            if theirs not in (None, catalogue):
                raise ValueError(f"{held!r} holds vectors of another catalogue ({theirs}, not "
                                 f"{catalogue} of {data_dir}); nothing was imported.")
    new = not _exists(index)
    try:
        with contextlib.closing(open_index(index, dim=dim)) as target:
            target.claim(catalogue)
            version = target.put(dense[rows], vectors)
            target.describe({"source": f"imported from {file.path}", "items": len(rows)})
            return {"items": len(rows), "skipped": len(missing), "dim": dim,
                    "version": version, "index": repr(target)}
    except BaseException:
        if new:  # a failed import (a full disk) leaves no index behind
            remove_files(os.path.abspath(index))
        raise


def export_vectors(index, data_dir, path, ids=None):
    """Writes every vector of the index `index` (a spec) to `path` by raw id of `data_dir`'s
    catalogue, as of one moment; `ids` is where .npy output puts the raw ids.

    The file (and `ids`) appear whole or not at all. Returns the number of vectors.
    """
    fmt = _write_format(path)
    if fmt == "npy" and ids is None:
        raise ValueError(f"{path}: .npy output needs `ids`, a file for the raw item ids.")
    if fmt != "npy" and ids is not None:
        raise ValueError(f"{ids}: `ids` is only for .npy output; {path} holds its own ids.")
    for out, flag in ((path, "out"), (ids, "ids")):
        if out is not None:  # before anything is read: never over an input or a user's file
            outputs.check_output_file(out, flag, (data_dir, local_index(index)),
                                      owned=lambda _: written_vectors(path, ids))
    raw = schema.raw_ids(data_dir)
    if not _exists(index):
        raise ValueError(f"{redact(index)} holds no vectors.")
    catalogue = schema.catalogue_fingerprint(data_dir)
    try:
        held = open_index(index)
    except IndexNotFound:
        raise ValueError(f"{redact(index)} holds no vectors.") from None
    with contextlib.closing(held):
        theirs = held.catalogue()
        if theirs not in (None, catalogue):
            raise ValueError(f"{held!r} holds vectors of another catalogue ({theirs}, not "
                             f"{catalogue} of {data_dir}).")
        snapshot = held.snapshot(len(raw) + schema.FIRST_ID)
    dense = np.flatnonzero(snapshot.present)
    write_vectors(path, [raw[i - schema.FIRST_ID] for i in dense], snapshot.table[dense], ids)
    return len(dense)


def written_vectors(path, ids=None):
    """Whether `path` (with .npy, and `ids`) holds vectors laid out as `write_vectors`
    writes them, so an export may replace them: Parquet marked as tfmm's, CSV of
    ``item_id,v0,...``, a float32 .npy [n, d] with as many ids."""
    try:
        fmt = _write_format(path)
        if fmt == "parquet":
            return (pq.read_schema(path).metadata or {}).get(WRITTEN_BY) == b"tfmm"
        if fmt == "csv":
            with open(path, encoding="utf-8") as f:
                header = f.readline().rstrip("\n").replace('"', "")  # pyarrow quotes it
                return re.fullmatch(r"item_id(,v\d+)+", header) is not None
        vectors = np.load(path, mmap_mode="r", allow_pickle=False)
        return (vectors.dtype == np.float32 and vectors.ndim == 2
                and len(read_vectors(path, ids).raw_ids) == len(vectors))
    except (OSError, ValueError, UnicodeDecodeError, pa.ArrowException):
        return False


def write_vectors(path, raw_ids, vectors, ids=None):
    """Writes raw ids and float32 vectors [n, d] in the format `path` names (with .npy, the
    ids to `ids`), each file through a temporary sibling renamed into place."""
    fmt = _write_format(path)
    vectors = np.asarray(vectors, np.float32)
    n, d = vectors.shape
    with replacing(path) as tmp:
        if fmt == "npy":
            with open(tmp, "wb") as f:
                np.save(f, vectors)
        else:
            columns = {"item_id": pa.array(raw_ids, pa.string())}
            if fmt == "parquet":
                offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32)
                                   if d else np.zeros(n + 1, np.int32))
                columns["vector"] = pa.ListArray.from_arrays(offsets,
                                                             pa.array(vectors.reshape(-1)))
                pq.write_table(pa.table(columns).replace_schema_metadata({WRITTEN_BY: "tfmm"}),
                               tmp)
            else:
                # One column per component: float32 written as its shortest exact text.
                columns.update({f"v{j}": pa.array(vectors[:, j]) for j in range(d)})
                pa_csv.write_csv(pa.table(columns), tmp)
    if fmt == "npy":
        with replacing(ids) as tmp:
            if str(ids).lower().endswith(".npy"):
                with open(tmp, "wb") as f:
                    np.save(f, np.array(raw_ids, dtype=str))
            else:
                with open(tmp, "w", encoding="utf-8", newline="\n") as f:
                    f.writelines(f"{raw}\n" for raw in raw_ids)


@contextlib.contextmanager
def replacing(path):
    """A temporary sibling of `path`, renamed to it when the block succeeds."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
