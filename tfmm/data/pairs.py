"""Pre-training pairs: a query (an item, text or a photo) and the item bought or
clicked after it, with a hard negative.

`tfmm.data.prepare` writes them into a data directory, locally and as a Beam
pipeline (`tfmm.data.prepare_beam`), with the pieces here: `click_pair_rows`
(``--pairs_from=clicks``: a click and the same user's next clicks),
`file_pairs` (``--pairs``: a file of query -> item pairs), `mine_negatives`
and `pair_meta`.

Mined hard negatives are drawn per pair (`PairDraws`): each is a hash of
``--seed`` and its pair's own values (`Pairs.key`), not the next number of
one generator running over the pairs in time order, so that a pipeline that
meets the pairs in any order, on any worker, draws the same negatives.

`click_pairs` mines pairs from a prepared directory's impressions, so
pre-training can use them where prepare made none. An impression's history
is its user's clicks strictly before it, oldest first: the last history item
of a clicked impression is that user's previous click, and the two are a pair
(the same pairs as prepare's ``--pair_window=1``, up to clicks at the same
timestamp, which no history holds).
"""

import os
from typing import NamedTuple

import numpy as np

from tfmm.data import reader, schema, tables


class HardNegatives:
    """For each dense id of `positive`, a random other item of its category (of every
    item when its category has no other), never the positive itself.

    `category_of` is indexed by dense id; the catalogue is ids FIRST_ID.. and must
    hold two items. Made once (the catalogue grouped by category), called on any
    number of pairs: ``HardNegatives(category_of)(positive, rng)``, `rng` a NumPy
    Generator or `PairDraws`.
    """

    def __init__(self, category_of):
        self.category_of = np.asarray(category_of)
        ids = np.arange(schema.FIRST_ID, len(self.category_of))
        self.members = ids[np.argsort(self.category_of[ids], kind="stable")]  # by category
        self.rank = np.empty(len(self.category_of), np.int64)
        self.rank[self.members] = np.arange(len(self.members))
        self.grouped = self.category_of[self.members]

    def __call__(self, positive, rng):
        category = self.category_of[positive]
        start = np.searchsorted(self.grouped, category, "left")
        size = np.searchsorted(self.grouped, category, "right") - start
        alone = size == 1
        start, size = np.where(alone, 0, start), np.where(alone, len(self.members), size)
        draw = rng.integers(0, size - 1)
        draw += draw >= self.rank[positive] - start  # skip the positive itself
        return self.members[start + draw]


def hard_negatives(positive, category_of, rng):
    """`HardNegatives` of `category_of`, drawn for `positive` with `rng`."""
    return HardNegatives(category_of)(positive, rng)


class PairDraws:
    """Random integers, one per pair, each a function of `seed` and its pair's `keys`
    row alone (int64 [n, k]): the same pair draws the same number in any order and any
    batch. ``integers(low, high)`` as a NumPy Generator's (`high` exclusive, arrays of n)."""

    def __init__(self, seed, keys):
        keys = np.asarray(keys, np.int64).reshape(len(keys), -1).view(np.uint64)
        h = _mix(np.full(len(keys), seed, np.uint64))
        for column in keys.T:
            h = _mix(h ^ column)
        self.bits = h

    def integers(self, low, high):
        span = np.asarray(high, np.int64) - low
        return low + (self.bits % span.astype(np.uint64)).astype(np.int64)


def _mix(x):
    """SplitMix64's finaliser over uint64 arrays (wrapping arithmetic)."""
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(0xFFFFFFFFFFFFFFFF)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class Pairs(NamedTuple):
    """Pre-training pairs in time order: query image files (None: none), query texts,
    query items (a click pair's query is an item, by dense id; 0: a query of its own),
    dense positives and negatives (0: to be mined), is_test, where each query image
    is named (for errors), each pair's key (`PairDraws`) and what `pair_meta` takes
    of the source."""

    query_image: np.ndarray
    query_text: np.ndarray
    query_item: np.ndarray
    positive: np.ndarray
    negative: np.ndarray
    is_test: np.ndarray
    where: np.ndarray
    key: np.ndarray
    meta: dict


def click_pair_rows(user, item, timestamp, label, is_test, window, max_gap):
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


def click_pairs_of_rows(item, timestamp, is_test, first, second, options):
    """The `Pairs` of log rows (first, second) (`click_pair_rows`): the query is the
    first item, by id (its content is in the catalogue, once); key: both items and
    both timestamps."""
    no_image = np.full(len(first), None)
    return Pairs(no_image, np.full(len(first), "", object), item[first], item[second],
                 np.full(len(second), schema.PAD_ID, np.int64), is_test[second], no_image,
                 np.stack([item[first], item[second], timestamp[first], timestamp[second]], 1),
                 clicks_source(options))


def clicks_source(options):
    """`pair_meta`'s source fields of ``--pairs_from=clicks``."""
    return {"source": "clicks", "window": options.pair_window, "max_gap": options.pair_max_gap}


def no_click_pairs_error(split):
    return ValueError(f"--pairs_from=clicks: no {split} pairs (no user clicks two items in "
                      "that split within --pair_window and --pair_max_gap).")


def file_pairs(options, item_vocab, cut):
    """The pairs of the ``options.pairs`` file, in time order; their negatives are
    the given ones (0: mine one); key: the row's position in the file and its item."""
    path, images_dir = options.pairs, options.images_dir
    table = tables.Table(path, ints=("timestamp",))
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
            image = tables.image_paths(table, "query_image", images_dir,
                                       options.absolute_image_paths)
    empty = np.flatnonzero((text == "") & (image == None))  # noqa: E711 (elementwise)
    if len(empty):
        raise ValueError(f"{table.row(empty[0])}: no query: both 'query_text' and "
                         "'query_image' are empty.")
    positive = tables.lookup(item_vocab, table.ids("item_id"))
    named = table.texts("negative_item_id")
    negative = np.where(named != "", tables.lookup(item_vocab, named), schema.PAD_ID)
    for column, ids in (("item_id", positive), ("negative_item_id", negative)):
        unknown = np.flatnonzero(ids == schema.OOV_ID)
        if len(unknown) and options.unknown_items == "error":
            raise ValueError(f"{table.row(unknown[0])}, column {column!r}: "
                             f"{table.value(column, unknown[0])!r} is not in {options.items} "
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
        is_test = np.arange(len(rows)) >= tables.first_test(len(rows), options.test_fraction)
        split = f"{len(rows)} rows without timestamps, split by --test_fraction"
    if is_test.all() or not is_test.any():
        raise ValueError(f"{path}: {split} leaves no {'train' if is_test.all() else 'test'} "
                         "pairs.")
    where = np.array([f"{table.row(i)}, column 'query_image'" for i in rows], dtype=object)
    return Pairs(image[rows], text[rows], np.full(len(rows), schema.PAD_ID, np.int64),
                 positive[rows], negative[rows], is_test, where,
                 np.stack([rows, positive[rows]], 1),
                 {"source": os.path.abspath(path), "skipped_unknown": int((~known).sum())})


def mine_negatives(pairs, negatives, options):
    """`pairs` with a hard negative (`negatives`, a `HardNegatives` of the catalogue)
    for each pair without one, drawn with `PairDraws` of ``options.seed`` and the
    pair's key; and their `pair_meta`."""
    mine = pairs.negative == schema.PAD_ID
    if mine.any() and len(negatives.members) < 2:
        raise ValueError(f"{options.items}: one item only; a hard negative needs another.")
    negative = pairs.negative.copy()
    if mine.any():
        negative[mine] = negatives(pairs.positive[mine],
                                   PairDraws(options.seed, pairs.key[mine]))
    meta = pair_meta(pairs.meta, int((~pairs.is_test).sum()), int(pairs.is_test.sum()),
                     int(mine.sum()), options.seed)
    return pairs._replace(negative=negative, meta=meta)


def pair_meta(source, train, test, mined, seed):
    """``metadata.json``'s ``pairs``: the source's fields and the counts."""
    return dict(source, train=train, test=test, mined_negatives=mined, seed=seed)


def click_pairs(data_dir, split="train", batch_size=8192):
    """(first, second) dense item ids [n]: for each click of `split` on a known item,
    the user's previous click and the clicked item, where the two differ, in the
    order of the impressions."""
    first, second = [], []
    for features, label in reader.impressions(
            data_dir, split, batch_size=batch_size, max_history=1, validate=False,
            features=["item_id", "history_item_ids", "history_length"]):
        previous = features["history_item_ids"].numpy()[:, 0]  # the most recent click
        item = features["item_id"].numpy()
        keep = ((label.numpy() == 1) & (features["history_length"].numpy() > 0)
                & (item != schema.OOV_ID) & (previous != schema.OOV_ID) & (previous != item))
        first.append(previous[keep])
        second.append(item[keep])
    return (np.concatenate(first) if first else np.zeros(0, np.int64),
            np.concatenate(second) if second else np.zeros(0, np.int64))
