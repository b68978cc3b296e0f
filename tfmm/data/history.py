"""Behaviour histories built strictly from earlier events."""

import numpy as np


def history_ranges(user, timestamp, label, max_history):
    """For each impression, the user's clicks strictly before it.

    Args:
        user: int64 [n] user indices (any non-negative ints).
        timestamp: int64 [n] event times.
        label: [n] clicks (non-zero) or not.
        max_history: keep at most this many, the most recent.

    Returns:
        ``(clicks, start, end)``: impression i's history is
        ``clicks[start[i]:end[i]]``, impression numbers oldest first.
    """
    user = np.asarray(user, np.int64)
    timestamp = np.asarray(timestamp, np.int64)
    clicks = np.flatnonzero(np.asarray(label) != 0)
    clicks = clicks[np.lexsort((clicks, timestamp[clicks], user[clicks]))]
    if len(timestamp) == 0:
        empty = np.zeros(0, np.int64)
        return clicks, empty, empty
    # Ranks, not raw times, so that no span of int64 timestamps overflows the keys.
    t_rank = np.unique(timestamp, return_inverse=True)[1].reshape(-1).astype(np.int64)
    span = int(t_rank.max()) + 1
    if int(user.max()) + 1 > np.iinfo(np.int64).max // span:
        raise ValueError("history_ranges: users x distinct timestamps overflow int64 keys.")
    # One sorted (user, time) key; a binary search finds the clicks before each event.
    click_key = user[clicks] * span + t_rank[clicks]
    end = np.searchsorted(click_key, user * span + t_rank, side="left")
    user_start = np.searchsorted(user[clicks], user, side="left")
    return clicks, np.maximum(user_start, end - max_history), end
