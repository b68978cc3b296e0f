"""Ranking metrics, exact, from arrays: AUC, GAUC, LogLoss, item-frequency groups, Acc@N."""

import functools

import numpy as np


def _midranks(x):
    """1-based ranks of x, ties sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    boundaries = np.flatnonzero(np.diff(sorted_x)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(x)]])
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def auc(labels, scores):
    """P(score of a random positive > a random negative), ties counting 1/2.

    NaN when the labels hold a single class.
    """
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"auc: {labels.shape[0]} labels but {scores.shape[0]} scores.")
    n_pos = labels.sum()
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _midranks(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(labels, scores, groups):
    """Group AUC: per-group (per-user) AUC, averaged over groups with both classes.

    Returns ``{"gauc": mean weighted by each group's impressions,
    "gauc_unweighted": plain mean, "gauc_groups": groups counted}``; users
    with only clicks or only non-clicks have no AUC and are left out (NaN
    values when no group has both classes).
    """
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, np.float64).ravel()
    groups = np.asarray(groups).ravel()
    if not labels.shape == scores.shape == groups.shape:
        raise ValueError(f"gauc: {len(labels)} labels, {len(scores)} scores and "
                         f"{len(groups)} groups; want one of each per impression.")
    order = np.argsort(groups, kind="mergesort")
    starts = np.flatnonzero(np.r_[True, np.diff(groups[order]) != 0])
    values, weights = [], []
    for rows in np.split(order, starts[1:]):
        y = labels[rows]
        if 0 < y.sum() < len(y):
            values.append(auc(y, scores[rows]))
            weights.append(len(rows))
    if not values:
        return {"gauc": float("nan"), "gauc_unweighted": float("nan"), "gauc_groups": 0}
    return {"gauc": float(np.average(values, weights=weights)),
            "gauc_unweighted": float(np.mean(values)), "gauc_groups": len(values)}


def logloss(labels, probabilities, eps=1e-7):
    """Mean binary cross-entropy of click probabilities (clipped to [eps, 1-eps])."""
    labels = np.asarray(labels, np.float64).ravel()
    p = np.clip(np.asarray(probabilities, np.float64).ravel(), eps, 1 - eps)
    if labels.shape != p.shape:
        raise ValueError(f"logloss: {len(labels)} labels but {len(p)} probabilities.")
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log1p(-p)))


def frequency_groups(train_counts, num_groups=8):
    """Item id -> frequency group (paper §6.3.3), from training impressions per item id.

    Items seen in training are ranked by their count (ties by id) and cut into
    `num_groups` groups of equal size: 1 holds the rarest, `num_groups` the
    most frequent. Items never seen in training (new, cold-start) get 0.
    """
    counts = np.asarray(train_counts).ravel()
    seen = np.flatnonzero(counts > 0)
    if len(seen) < num_groups:
        raise ValueError(f"frequency_groups: {len(seen)} items seen in training, fewer than "
                         f"{num_groups} groups.")
    ranked = seen[np.lexsort((seen, counts[seen]))]
    group = np.zeros(len(counts), np.int64)
    for g, items in enumerate(np.array_split(ranked, num_groups), start=1):
        group[items] = g
    return group


def retrieval_ranks(queries, positives, chunk_size=4096):
    """For each query i, how many *other* positives score at least as high as its own.

    Scores are dot products of ``queries[i]`` with every row of ``positives``
    (paper eq. 6: S is the set of all test positives). Ties count against the
    query. Exact, in chunks of queries, so memory stays
    ``chunk_size * len(positives)`` scores.
    """
    import tensorflow as tf

    q = tf.convert_to_tensor(queries, tf.float32)
    p = tf.convert_to_tensor(positives, tf.float32)
    if (q.shape.rank != 2 or p.shape.rank != 2
            or q.shape[0] != p.shape[0] or q.shape[1] != p.shape[1]):
        raise ValueError(f"retrieval_ranks: want queries and positives of one shape [D, d], got "
                         f"{tuple(q.shape)} and {tuple(p.shape)}.")
    return _ranks(q, p, int(chunk_size)).numpy()


def _ranks(q, p, chunk_size):
    import tensorflow as tf

    n = int(q.shape[0])
    chunk_ranks = _chunk_ranks()
    return tf.concat([chunk_ranks(q, p, tf.constant(s), tf.constant(min(s + chunk_size, n)))
                      for s in range(0, n, chunk_size)], axis=0)


@functools.cache
def _chunk_ranks():
    """One traced function for every call (a function per call retraced each time, and
    TensorFlow warned of it)."""
    import tensorflow as tf

    # XLA fuses the comparison, cast and sum into one pass over the [c, D] scores
    # (three passes and two [c, D] temporaries without it); the product stays
    # TensorFlow's own.
    @tf.function(jit_compile=True, reduce_retracing=True)
    def count_at_least(scores, own):
        return tf.reduce_sum(tf.cast(scores >= own[:, None], tf.int32), axis=1) - 1

    @tf.function(reduce_retracing=True)
    def chunk_ranks(q, p, start, stop):
        scores = tf.matmul(q[start:stop], p, transpose_b=True)  # [c, D]
        own = tf.linalg.diag_part(scores[:, start:stop])  # the same matmul's own score
        return count_at_least(scores, own)

    return chunk_ranks


def acc_at_n(queries, positives, ns=(1, 5), chunk_size=4096):
    """Acc@N (paper eq. 6) for each N: is the query's own positive in its top N?"""
    ranks = retrieval_ranks(queries, positives, chunk_size)
    return {f"acc@{n}": float(np.mean(ranks < n)) for n in ns}


def neighbours_same_label(vectors, labels, k=10, chunk_size=1024):
    """The mean share of each row's k nearest other rows (by cosine) that have its label.

    A check of item vectors that needs no pairs: with item categories as labels,
    vectors that group items by what they show score above
    `same_label_chance`. ``k`` is cut to the other rows there are.
    """
    v = np.asarray(vectors, np.float32)
    labels = np.asarray(labels).ravel()
    if v.ndim != 2 or len(v) != len(labels):
        raise ValueError(f"neighbours_same_label: want vectors [n, d] and n labels, got "
                         f"{v.shape} and {len(labels)}.")
    if len(v) < 2 or k < 1:
        raise ValueError(f"neighbours_same_label: want >= 2 rows and k >= 1, got {len(v)} "
                         f"and k={k}.")
    k = min(k, len(v) - 1)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    shares = []
    for start in range(0, len(v), chunk_size):
        scores = v[start:start + chunk_size] @ v.T
        rows = np.arange(len(scores))
        scores[rows, start + rows] = -np.inf  # not its own neighbour
        nearest = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        shares.append((labels[nearest] == labels[start + rows, None]).mean(axis=1))
    return float(np.concatenate(shares).mean())


def same_label_chance(labels):
    """`neighbours_same_label`'s expected value for neighbours drawn at random."""
    counts = np.unique(np.asarray(labels).ravel(), return_counts=True)[1]
    n = counts.sum()
    return float((counts * (counts - 1)).sum() / (n * (n - 1)))
