import itertools

import numpy as np
import pytest

from tfmm.metrics import auc


def brute_force_auc(labels, scores):
    pos = [s for y, s in zip(labels, scores) if y]
    neg = [s for y, s in zip(labels, scores) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auc_hand_computed():
    assert auc([0, 1], [0.1, 0.9]) == 1.0
    assert auc([0, 1], [0.9, 0.1]) == 0.0
    assert auc([0, 1, 1], [0.5, 0.5, 0.7]) == 0.75
    assert np.isnan(auc([1, 1], [0.2, 0.3]))


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(300) < 0.3
    scores = np.round(rng.random(300), 1)  # many ties
    assert auc(labels, scores) == pytest.approx(brute_force_auc(labels, scores), abs=1e-12)


def test_auc_shape_mismatch():
    with pytest.raises(ValueError, match="3 labels but 2 scores"):
        auc([0, 1, 0], [0.1, 0.2])


def brute_force_acc(q, p, n):
    hits = 0
    for i in range(len(q)):
        scores = p @ q[i]
        others_at_least = sum(1 for j in range(len(p)) if j != i and scores[j] >= scores[i])
        hits += others_at_least < n
    return hits / len(q)


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_acc_at_n_equals_brute_force(chunk_size):
    from tfmm.metrics import acc_at_n

    rng = np.random.default_rng(0)
    q = rng.normal(size=(60, 8)).astype("float32")
    p = (q + rng.normal(size=q.shape) * 1.5).astype("float32")
    got = acc_at_n(q, p, ns=(1, 3, 10), chunk_size=chunk_size)
    for n in (1, 3, 10):
        assert got[f"acc@{n}"] == pytest.approx(brute_force_acc(q, p, n))
    assert 0 < got["acc@1"] < got["acc@10"] < 1


def test_acc_at_n_ties_count_against_the_query():
    from tfmm.metrics import acc_at_n, retrieval_ranks

    q = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], "float32")
    p = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], "float32")  # items 0 and 2 identical
    np.testing.assert_array_equal(retrieval_ranks(q, p), [1, 0, 1])
    assert acc_at_n(q, p, ns=(1, 2)) == {"acc@1": pytest.approx(1 / 3), "acc@2": 1.0}
    with pytest.raises(ValueError, match="one shape"):
        retrieval_ranks(q, p[:2])
