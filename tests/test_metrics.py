import itertools

import numpy as np
import pytest

from tfmm.metrics import (auc, frequency_groups, gauc, logloss, neighbours_same_label,
                          same_label_chance)


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


def brute_force_gauc(labels, scores, users):
    values, weights = [], []
    for u in sorted(set(users)):
        rows = [i for i in range(len(users)) if users[i] == u]
        y = [labels[i] for i in rows]
        if 0 < sum(y) < len(y):
            values.append(brute_force_auc(y, [scores[i] for i in rows]))
            weights.append(len(rows))
    return sum(v * w for v, w in zip(values, weights)) / sum(weights), sum(values) / len(values)


def test_gauc_hand_computed():
    # user 7: AUC 1 over 3 impressions; user 3: AUC 0.5 (a tie) over 2; user 5 only clicks.
    labels = [1, 0, 0, 1, 0, 1, 1]
    scores = [0.9, 0.1, 0.2, 0.4, 0.4, 0.3, 0.8]
    users = [7, 7, 7, 3, 3, 5, 5]
    g = gauc(labels, scores, users)
    assert g["gauc"] == pytest.approx((3 * 1.0 + 2 * 0.5) / 5)
    assert g["gauc_unweighted"] == pytest.approx(0.75)
    assert g["gauc_groups"] == 2


@pytest.mark.parametrize("seed", range(4))
def test_gauc_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 30, 400)
    labels = rng.random(400) < 0.25
    scores = np.round(rng.random(400), 1)
    weighted, unweighted = brute_force_gauc(labels.tolist(), scores.tolist(), users.tolist())
    g = gauc(labels, scores, users)
    assert g["gauc"] == pytest.approx(weighted, abs=1e-12)
    assert g["gauc_unweighted"] == pytest.approx(unweighted, abs=1e-12)


def test_gauc_without_two_class_users_is_nan_and_lengths_are_checked():
    g = gauc([1, 0], [0.3, 0.2], [1, 2])
    assert np.isnan(g["gauc"]) and g["gauc_groups"] == 0
    with pytest.raises(ValueError, match="3 labels, 2 scores and 3 groups"):
        gauc([1, 0, 1], [0.1, 0.2], [1, 1, 1])


def test_logloss_hand_computed():
    expected = -(np.log(0.8) + np.log(1 - 0.4)) / 2
    assert logloss([1, 0], [0.8, 0.4]) == pytest.approx(expected)
    assert np.isfinite(logloss([1, 0], [0.0, 1.0]))  # clipped, not inf


def test_frequency_groups_split_seen_items_by_training_count():
    counts = np.array([0, 0, 5, 1, 9, 3, 0, 7, 2, 4])  # ids 0, 1 and 6 never seen
    group = frequency_groups(counts, num_groups=3)
    # seen items by count: 3(1) 8(2) 5(3) | 9(4) 2(5) | 7(7) 4(9)
    assert group.tolist() == [0, 0, 2, 1, 3, 1, 0, 3, 1, 2]
    rng = np.random.default_rng(0)
    counts = rng.zipf(1.5, 1000) * (rng.random(1000) < 0.9)
    group = frequency_groups(counts)
    sizes = np.bincount(group[counts > 0], minlength=9)[1:]
    assert sizes.max() - sizes.min() <= 1 and (group[counts == 0] == 0).all()
    for g in range(1, 8):  # every item of a group is at most as frequent as the next's
        assert counts[group == g].max() <= counts[group == g + 1].min()
    with pytest.raises(ValueError, match="2 items seen in training, fewer than 8"):
        frequency_groups([0, 3, 4])


@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_neighbours_same_label_hand_computed(chunk_size):
    # Two clusters of directions, A B C near the x axis, D E F near y (D is long:
    # cosine ignores length). Labels: a a b | b b a.
    vectors = [[1, 0], [1, 0.1], [1, 0.3], [0, 5], [0.1, 1], [0.3, 1]]
    labels = ["a", "a", "b", "b", "b", "a"]
    # k=1: A->B, B->A, C->B, D->E, E->D, F->E: same label for A, B, D, E.
    assert neighbours_same_label(vectors, labels, k=1, chunk_size=chunk_size) == \
        pytest.approx(4 / 6)
    # k=2: A {B, C}, B {A, C}, C {B, A}, D {E, F}, E {D, F}, F {E, D}: 1/2 1/2 0 1/2 1/2 0.
    assert neighbours_same_label(vectors, labels, k=2, chunk_size=chunk_size) == \
        pytest.approx(1 / 3)
    # k past the catalogue: every other item, which is the chance level, 2/5.
    assert neighbours_same_label(vectors, labels, k=10, chunk_size=chunk_size) == \
        pytest.approx(0.4)
    assert same_label_chance(labels) == pytest.approx(0.4)


def test_neighbours_same_label_checks_shapes():
    with pytest.raises(ValueError, match="want vectors \\[n, d\\] and n labels"):
        neighbours_same_label(np.zeros((3, 2)), [1, 2])
    with pytest.raises(ValueError, match=">= 2 rows"):
        neighbours_same_label(np.zeros((1, 2)), [1])
