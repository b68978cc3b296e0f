"""Turns your own logs into a tfmm data directory.

    python -m tfmm.data.prepare --impressions=impressions.csv --items=items.csv \\
        [--images_dir=DIR] --out_dir=DIR [--max_history=50] [--test_fraction=0.1] \\
        [--pairs=pairs.csv | --pairs_from=clicks [--pair_window=1] [--pair_max_gap=T]] \\
        [--runner=DirectRunner|DataflowRunner|... [-- BEAM_PIPELINE_OPTIONS...]]

With ``--runner``, the same preparation runs as an Apache Beam pipeline
(tfmm/data/prepare_beam.py, the ``beam`` extra), the arguments after ``--``
being the runner's pipeline options.

As a library: ``prepare(PrepareOptions(impressions=..., items=..., out_dir=...))``,
the options being the flags of the same names.

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
Symbolic links inside ``--images_dir`` are followed. Every image must decode,
and its header may declare at most `tfmm.data.images.MAX_PIXELS` pixels (50
million), checked before it is decoded: a larger one is an error naming the
file and row, not a skip (the user's catalogue would lose content without a
word), and it would be decoded whole at every read.

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
from ``--seed`` and the pair's own values (`tfmm.data.pairs.PairDraws`: the
same with ``--runner``, whatever order the pipeline meets the pairs in).
Pairs are written in time order. The counts go to the output line and
``metadata.json`` (``pairs``).
"""

import dataclasses
import os
from typing import NamedTuple, Optional

import numpy as np
import pyarrow as pa
from absl import flags

from tfmm import cli
from tfmm.config import SettingsError
from tfmm.data import schema, tables
from tfmm.data.history import history_ranges
from tfmm.data import pairs as pair_lib
from tfmm.data.writer import DataDirWriter

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    """What `prepare` reads and how: the fields are the CLI's flags of the same names
    (the module's docstring); `beam_args` are the pipeline options of `runner`."""

    impressions: str
    items: str
    out_dir: str
    images_dir: Optional[str] = None
    max_history: int = 50
    test_fraction: float = 0.1
    split_timestamp: Optional[int] = None
    unknown_items: str = "error"
    drop_duplicates: bool = False
    absolute_image_paths: bool = False
    pairs: Optional[str] = None
    pairs_from: Optional[str] = None
    pair_window: int = 1
    pair_max_gap: Optional[int] = None
    seed: int = 0
    runner: Optional[str] = None
    beam_args: tuple = ()

    def validate(self):
        """Returns the options; SettingsError names the first bad one."""
        if self.max_history < 1:
            raise SettingsError(f"--max_history={self.max_history}: must be >= 1.")
        if not 0.0 < self.test_fraction < 1.0 and (self.split_timestamp is None or self.pairs):
            raise SettingsError(f"--test_fraction={self.test_fraction}: must be in (0, 1).")
        if self.unknown_items not in ("error", "oov"):
            raise SettingsError(f"--unknown_items={self.unknown_items!r}: want 'error' or "
                                "'oov'.")
        if self.pairs and self.pairs_from:
            raise SettingsError(f"--pairs={self.pairs} and --pairs_from={self.pairs_from}: pass "
                                "one of them.")
        if self.pairs_from not in (None, "clicks"):
            raise SettingsError(f"--pairs_from={self.pairs_from!r}: the only source is "
                                "'clicks'.")
        if self.pair_window < 1:
            raise SettingsError(f"--pair_window={self.pair_window}: must be >= 1.")
        if self.pair_max_gap is not None and self.pair_max_gap < 0:
            raise SettingsError(f"--pair_max_gap={self.pair_max_gap}: must be >= 0.")
        return self


def prepare(options):
    """Writes the data directory ``options.out_dir`` (replaced atomically); returns its
    metadata. With ``options.runner``, as an Apache Beam pipeline on that runner
    (`tfmm.data.prepare_beam`, the ``beam`` extra).

    Bad input raises ValueError (SettingsError for bad options) naming the file,
    row and column; ``out_dir`` is then untouched.
    """
    options.validate()
    if options.runner:
        from tfmm.data import prepare_beam  # the beam extra

        return prepare_beam.prepare(options)
    # Made first: an out_dir that holds an input or user files is refused before any reading.
    writer = DataDirWriter(options.out_dir, inputs=(options.impressions, options.items,
                                                    options.images_dir, options.pairs))
    catalogue = read_catalogue(options)
    log = read_log(options, catalogue)
    pairs = read_pairs(options, catalogue, log) if options.pairs or options.pairs_from else None
    write(writer, options, catalogue, log, pairs)
    return schema.read_metadata(options.out_dir)


def summary(meta, options):
    """What the CLI prints of a prepared directory's metadata: its counts, and a note on
    duplicate impressions kept."""
    lines = [f"wrote {options.out_dir}: {meta['counts']}, vocab {meta['vocab']}, "
             f"out of vocabulary: {oov_line(meta['oov'])}, "
             f"duplicates {meta['duplicates']}, items without {meta['missing']}"
             + (f", pairs {meta['pairs']}" if "pairs" in meta else "")]
    if meta["duplicates"]["impressions"] and not options.drop_duplicates:
        lines.append(f"{meta['duplicates']['impressions']} impressions repeat an earlier one in "
                     "every column; kept (--drop_duplicates drops them).")
    return "\n".join(lines)


def oov_line(oov):
    """The output line's words for metadata's "oov"."""
    return (f"{oov['test_users']} test users not in training ({oov['test_user_impressions']} "
            f"test impressions, user id 1), {oov['unknown_item_impressions']} impressions of "
            "items not in --items (item id 1)")


def oov_users(codes, dense_of_code):
    """(distinct users, impressions) among the raw user `codes` of test impressions whose
    user is out of the training vocabulary."""
    oov = dense_of_code[codes] == schema.OOV_ID
    return len(np.unique(codes[oov])), int(oov.sum())


class Catalogue(NamedTuple):
    """The items file: its table and rows (raw ids, titles, image files, dense ids and
    categories), the vocabularies, and each dense item id's category."""

    table: tables.Table
    ids: np.ndarray
    titles: np.ndarray
    images: np.ndarray
    dense: np.ndarray
    category: np.ndarray
    vocab: pa.Array
    category_vocab: pa.Array
    category_of: np.ndarray


def read_catalogue(options):
    items, ids, raw_categories, titles, images = tables.read_catalogue(
        options.items, options.images_dir, options.absolute_image_paths)
    vocab = tables.vocabulary(ids)
    if raw_categories is not None:
        category_vocab = tables.vocabulary(raw_categories)
        category = tables.lookup(category_vocab, raw_categories)
    else:
        category_vocab = tables.vocabulary([])
        category = np.full(len(ids), schema.OOV_ID, np.int64)
    category_of = np.full(len(vocab) + schema.FIRST_ID, schema.OOV_ID, np.int64)
    dense = tables.lookup(vocab, ids)
    category_of[dense] = category
    if (options.images_dir and "image" not in items.columns
            and (images == None).all()):  # noqa: E711 (elementwise)
        raise tables.no_image_error(options.items, options.images_dir)
    return Catalogue(items, ids, titles, images, dense, category, vocab, category_vocab,
                     category_of)


class Log(NamedTuple):
    """The impressions (kept after dropping duplicates, in file order) as dense ids,
    the split, the vocabularies of the training split and each user's history ranges
    (`history_ranges`)."""

    user_codes: np.ndarray  # codes of the raw users (histories go by raw user)
    item: np.ndarray
    timestamp: np.ndarray
    label: np.ndarray
    side_codes: dict  # {side column: (codes, sorted distinct values)}
    duplicate: np.ndarray  # of every row read
    cut: int
    is_test: np.ndarray
    train_rows: np.ndarray  # in time order
    test_rows: np.ndarray
    user_vocab: pa.Array
    user_of_code: np.ndarray
    side_vocab: dict
    side_of_code: dict
    clicks: np.ndarray
    start: np.ndarray
    end: np.ndarray
    trained: np.ndarray  # whether each dense item id has a training impression


def read_log(options, catalogue):
    log, (user_codes, user_values), (item_codes, item_values), timestamp, label, side_codes = \
        tables.read_log(options.impressions)
    item = tables.lookup(catalogue.vocab, item_values).astype(np.int32)[item_codes]
    unknown = np.flatnonzero(item == schema.OOV_ID)
    if len(unknown) and options.unknown_items == "error":
        raise tables.unknown_item_error(log.row(unknown[0]), log.value("item_id", unknown[0]),
                                        options.items, len(unknown))
    del log  # what is left of it: the item codes and int64 labels

    duplicate = tables.repeated_rows([user_codes, item_codes, label, timestamp,
                                      *(codes for codes, _ in side_codes.values())])
    del item_codes
    if options.drop_duplicates:
        keep = ~duplicate
        user_codes, item, label, timestamp = (a[keep] for a in (user_codes, item, label,
                                                                 timestamp))
        side_codes = {c: (codes[keep], values) for c, (codes, values) in side_codes.items()}

    order = np.argsort(timestamp, kind="stable")
    if options.split_timestamp is None:
        cut = timestamp[order[tables.first_test(len(order), options.test_fraction)]]
    else:
        cut = options.split_timestamp
    is_test = timestamp >= cut
    if is_test.all() or not is_test.any():
        raise tables.split_error(options.impressions, cut)
    train_rows = order[~is_test[order]].astype(np.int32)  # int32 halves what is held
    test_rows = order[is_test[order]].astype(np.int32)
    del order

    user_vocab, user_of_code = _train_vocabulary(user_codes, user_values, ~is_test)
    # OOV users keep their own history: histories go by raw user (code), not dense id.
    clicks, start, end = history_ranges(user_codes, timestamp, label, options.max_history)
    side_vocab, side_of_code = {}, {}
    for c, (codes, values) in side_codes.items():
        side_vocab[c], side_of_code[c] = _train_vocabulary(codes, values, ~is_test)
    trained = np.zeros(len(catalogue.category_of), bool)
    trained[item[~is_test]] = True
    return Log(user_codes, item, timestamp, label, side_codes, duplicate, cut, is_test,
               train_rows, test_rows, user_vocab, user_of_code, side_vocab, side_of_code,
               clicks, start, end, trained)


def read_pairs(options, catalogue, log):
    """The pairs of ``options.pairs`` or ``options.pairs_from``, their missing
    negatives mined (`tfmm.data.pairs`)."""
    if options.pairs:
        pairs = pair_lib.file_pairs(options, catalogue.vocab, log.cut)
    else:
        first, second = pair_lib.click_pair_rows(log.user_codes, log.item, log.timestamp,
                                                 log.label, log.is_test, options.pair_window,
                                                 options.pair_max_gap)
        pairs = pair_lib.click_pairs_of_rows(log.item, log.timestamp, log.is_test, first,
                                             second, options)
        if pairs.is_test.all() or not pairs.is_test.any():
            raise pair_lib.no_click_pairs_error("train" if pairs.is_test.all() else "test")
    return pair_lib.mine_negatives(pairs, pair_lib.HardNegatives(catalogue.category_of),
                                   options)


def write(writer, options, catalogue, log, pairs=None):
    """The data directory, with `writer` (a `DataDirWriter`): impressions, items, pairs,
    vocabularies and metadata."""
    def triplets(rows):
        for chunk in tables.image_chunks(rows, pairs.query_image):
            yield from schema.examples(**tables.pair_features(
                pairs.query_item[chunk], pairs.positive[chunk], pairs.negative[chunk],
                [tables.read_image(pairs.query_image[i], pairs.where[i]) for i in chunk],
                [pairs.query_text[i].encode() for i in chunk]))

    item, category_of, side = log.item, catalogue.category_of, list(log.side_codes)
    # A history is a run of its user's clicks: their varints are made once.
    history = [schema.Varints(v) for v in (item[log.clicks], category_of[item[log.clicks]],
                                           log.timestamp[log.clicks])]

    def records(rows):
        for a in range(0, len(rows), tables.RECORDS_PER_CHUNK):
            chunk = rows[a:a + tables.RECORDS_PER_CHUNK]
            chunk_item = item[chunk]
            yield from schema.examples(**tables.impression_features(
                log.user_of_code[log.user_codes[chunk]], chunk_item, category_of[chunk_item],
                log.timestamp[chunk], log.label[chunk], ~log.trained[chunk_item],
                {c: log.side_of_code[c][log.side_codes[c][0][chunk]] for c in side},
                [(v, log.start[chunk], log.end[chunk]) for v in history]))

    with writer as w:
        w.write("impressions/train", records(log.train_rows), len(log.train_rows))
        w.write("impressions/test", records(log.test_rows), len(log.test_rows))
        w.write("items", tables.item_records(catalogue.table, catalogue.ids, catalogue.vocab,
                                             catalogue.category, catalogue.images,
                                             catalogue.titles), len(catalogue.ids))
        if pairs is not None:
            for split, rows in (("train", np.flatnonzero(~pairs.is_test)),
                                ("test", np.flatnonzero(pairs.is_test))):
                w.write(f"pretrain/{split}", triplets(rows), len(rows))
        os.makedirs(w.path("vocab"))
        for name, vocab in (("users", log.user_vocab), ("items", catalogue.vocab),
                            ("categories", catalogue.category_vocab),
                            *((f"side-{c}", log.side_vocab[c]) for c in side)):
            tables.write_vocabulary(w.path(f"vocab/{name}.txt"), vocab)
        sizes = {"items": len(catalogue.vocab), "users": len(log.user_vocab),
                 "categories": len(catalogue.category_vocab),
                 **{c: len(log.side_vocab[c]) for c in side}}
        w.finish(tables.metadata(
            options, sizes, side, log.cut,
            oov_users(log.user_codes[log.test_rows], log.user_of_code),
            (item == schema.OOV_ID).sum(), log.duplicate.sum(),
            (catalogue.images == None).sum(), (catalogue.titles == "").sum(),  # noqa: E711
            None if pairs is None else pairs.meta))


def _train_vocabulary(codes, values, train):
    """The vocabulary of the `values` (sorted distinct) that training rows hold, and
    each code's dense id: what `tables.vocabulary` and `tables.lookup` give, from the codes."""
    seen = np.zeros(len(values), bool)
    seen[codes[train]] = True
    dense = np.where(seen, np.cumsum(seen) - 1 + schema.FIRST_ID, schema.OOV_ID)
    return values.filter(pa.array(seen)), dense


def define_flags():
    """The CLI's flags: `PrepareOptions`' fields, with its defaults."""
    o = PrepareOptions
    flags.DEFINE_string("impressions", None, "Impression log: CSV or Parquet.")
    flags.DEFINE_string("items", None, "Item content: CSV or Parquet.")
    flags.DEFINE_string("images_dir", o.images_dir, "Directory of item images.")
    flags.DEFINE_string("out_dir", None, "Directory to write (replaced atomically; one that "
                        "is or holds an input, or holds files tfmm did not write, is refused).")
    flags.DEFINE_integer("max_history", o.max_history, "Longest history kept (the most recent).")
    flags.DEFINE_float("test_fraction", o.test_fraction, "Latest fraction of impressions used "
                       "for test.")
    flags.DEFINE_integer("split_timestamp", o.split_timestamp, "Impressions at or after it are "
                         "test (overrides --test_fraction).")
    flags.DEFINE_enum("unknown_items", o.unknown_items, ["error", "oov"],
                      "An impression's item missing from --items: fail, or map to id 1 "
                      "(a pair's: fail, or skip the pair).")
    flags.DEFINE_bool("drop_duplicates", o.drop_duplicates, "Drop impressions equal to an "
                      "earlier one in every column (default: keep and count them).")
    flags.DEFINE_bool("absolute_image_paths", o.absolute_image_paths, "Allow absolute paths in "
                      "the items' image column; relative ones must stay inside --images_dir.")
    flags.DEFINE_string("pairs", o.pairs, "Query -> item pairs for pre-training: CSV or Parquet.")
    flags.DEFINE_enum("pairs_from", o.pairs_from, ["clicks"], "Derive pre-training pairs from "
                      "behaviour: a click and the same user's next clicks.")
    flags.DEFINE_integer("pair_window", o.pair_window, "--pairs_from=clicks: pair each click "
                         "with this many of the user's next clicks.")
    flags.DEFINE_integer("pair_max_gap", o.pair_max_gap, "--pairs_from=clicks: the most "
                         "timestamp units between a pair's two clicks (default: any).")
    flags.DEFINE_integer("seed", o.seed, "Seed of the mined hard negatives.")
    cli.define_runner_flag()


def main(argv):
    beam_args = cli.pipeline_options(argv)
    for name in ("impressions", "items", "out_dir"):
        if not FLAGS[name].value:
            cli.fail(f"--{name} is required.")
    if FLAGS.runner:
        cli.require_extra("beam", f"--runner={FLAGS.runner}")
    options = PrepareOptions(beam_args=beam_args, **{
        f.name: FLAGS[f.name].value for f in dataclasses.fields(PrepareOptions) if f.name in FLAGS})
    print(summary(prepare(options), options))


if __name__ == "__main__":
    define_flags()
    cli.run(main, positional=True, errors=(ValueError, OSError))  # bad input: one line
