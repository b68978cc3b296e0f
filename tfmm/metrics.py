"""Ranking metrics: AUC and GAUC, exact, from arrays of labels and scores."""

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
    if q.shape.rank != 2 or p.shape.rank != 2 or q.shape[0] != p.shape[0] or q.shape[1] != p.shape[1]:
        raise ValueError(f"retrieval_ranks: want queries and positives of one shape [D, d], got "
                         f"{tuple(q.shape)} and {tuple(p.shape)}.")
    return _ranks(q, p, int(chunk_size)).numpy()


def _ranks(q, p, chunk_size):
    import tensorflow as tf

    n = int(q.shape[0])

    @tf.function
    def chunk_ranks(start, stop):
        scores = tf.matmul(q[start:stop], p, transpose_b=True)  # [c, D]
        own = tf.linalg.diag_part(scores[:, start:stop])  # the same matmul's own score
        # int32 counts: an int64 copy of the [c, D] comparison would double the traffic.
        return tf.reduce_sum(tf.cast(scores >= own[:, None], tf.int32), axis=1) - 1

    return tf.concat([chunk_ranks(tf.constant(s), tf.constant(min(s + chunk_size, n)))
                      for s in range(0, n, chunk_size)], axis=0)


def acc_at_n(queries, positives, ns=(1, 5), chunk_size=4096):
    """Acc@N (paper eq. 6) for each N: is the query's own positive in its top N?"""
    ranks = retrieval_ranks(queries, positives, chunk_size)
    return {f"acc@{n}": float(np.mean(ranks < n)) for n in ns}
