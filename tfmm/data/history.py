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
    t_min, span = timestamp.min(), int(timestamp.max() - timestamp.min()) + 1
    if int(user.max()) + 1 > np.iinfo(np.int64).max // span:
        raise ValueError("history_ranges: users x time span overflow int64 keys.")
    # One sorted (user, time) key; a binary search finds the clicks before each event.
    click_key = user[clicks] * span + (timestamp[clicks] - t_min)
    end = np.searchsorted(click_key, user * span + (timestamp - t_min), side="left")
    user_start = np.searchsorted(user[clicks], user, side="left")
    return clicks, np.maximum(user_start, end - max_history), end
