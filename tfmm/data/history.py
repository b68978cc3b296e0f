"""Behaviour histories built strictly from earlier events."""

import numpy as np

BLOCK = 1 << 18  # events per binary-search pass: bounds the temporaries (~8 MB)


def history_ranges(user, timestamp, label, max_history):
    """For each impression, the user's clicks strictly before it.

    Args:
        user: [n] user indices (any non-negative ints).
        timestamp: int64 [n] event times.
        label: [n] clicks (non-zero) or not.
        max_history: keep at most this many, the most recent.

    Returns:
        ``(clicks, start, end)``: impression i's history is
        ``clicks[start[i]:end[i]]``, impression numbers oldest first; `start`
        and `end` are int32 when they fit.
    """
    user = np.asarray(user)
    timestamp = np.asarray(timestamp, np.int64)
    clicks = np.flatnonzero(np.asarray(label) != 0)
    clicks = clicks[np.lexsort((clicks, timestamp[clicks], user[clicks]))]
    index = np.int32 if len(clicks) < 2**31 else np.int64
    start, end = np.zeros(len(timestamp), index), np.zeros(len(timestamp), index)
    if len(clicks) == 0:
        return clicks, start, end
    # Times as ranks among the click times (a click at t_c is before t iff fewer clicks
    # precede t_c than t), so that no span of int64 timestamps overflows the keys.
    click_times = np.sort(timestamp[clicks])
    span = len(clicks) + 1
    if int(user.max()) + 1 > np.iinfo(np.int64).max // span:
        raise ValueError("history_ranges: users x clicks overflow int64 keys.")
    click_user = user[clicks]
    # One sorted (user, time) key; a binary search finds the clicks before each event.
    click_key = click_user.astype(np.int64) * span + np.searchsorted(click_times,
                                                                     timestamp[clicks])
    for a in range(0, len(timestamp), BLOCK):
        u = user[a:a + BLOCK]
        key = u.astype(np.int64) * span + np.searchsorted(click_times, timestamp[a:a + BLOCK])
        end[a:a + BLOCK] = np.searchsorted(click_key, key, side="left")
        start[a:a + BLOCK] = np.maximum(np.searchsorted(click_user, u, side="left"),
                                        end[a:a + BLOCK] - max_history)
    return clicks, start, end
