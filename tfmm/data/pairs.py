"""Pre-training pairs from behaviour: a click and the same user's next click.

`tfmm.data.prepare --pairs_from=clicks` writes such pairs into a data
directory; `click_pairs` mines them from a prepared directory's impressions,
so pre-training can use them where prepare made none. An impression's history
is its user's clicks strictly before it, oldest first: the last history item
of a clicked impression is that user's previous click, and the two are a pair
(the same pairs as prepare's ``--pair_window=1``, up to clicks at the same
timestamp, which no history holds).
"""

import numpy as np

from tfmm.data import reader, schema


def hard_negatives(positive, category_of, rng):
    """For each dense id in `positive`, a random other item of its category (of
    every item when its category has no other). `category_of` is indexed by
    dense id; the catalogue is ids FIRST_ID.. and must hold two items."""
    ids = np.arange(schema.FIRST_ID, len(category_of))
    members = ids[np.argsort(category_of[ids], kind="stable")]  # items grouped by category
    rank = np.empty(len(category_of), np.int64)
    rank[members] = np.arange(len(members))
    grouped = category_of[members]
    start = np.searchsorted(grouped, category_of[positive], "left")
    size = np.searchsorted(grouped, category_of[positive], "right") - start
    alone = size == 1
    start, size = np.where(alone, 0, start), np.where(alone, len(members), size)
    draw = rng.integers(0, size - 1)
    draw += draw >= rank[positive] - start  # skip the positive itself
    return members[start + draw]


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
