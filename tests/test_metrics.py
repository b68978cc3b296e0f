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
