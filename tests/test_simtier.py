import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tests.conftest import unit
from tests.layer_testing import assert_candidates_equal_separate_calls
from tfmm.layers import SimTierLayer

pytestmark = pytest.mark.keras  # rerun under tf-keras by tests/test_tf_keras.py


def reference_simtier(target, history, mask, edges, output="counts"):
    """NumPy SimTier: digitize clipped dot products, count real positions."""
    scores = np.clip(np.einsum("bd,bld->bl", target, history), -1.0, 1.0)
    tiers = np.digitize(scores, edges)  # edges[i-1] <= s < edges[i]
    n = len(edges) + 1
    counts = np.zeros((target.shape[0], n), np.float32)
    for b in range(target.shape[0]):
        for i in range(history.shape[1]):
            if mask[b, i]:
                counts[b, tiers[b, i]] += 1
    if output == "log1p":
        return np.log1p(counts)
    if output == "fraction":
        return counts / np.maximum(mask.sum(1, keepdims=True), 1)
    return counts


def scalar_history(scores):
    """History vectors whose dot product with target e0 are exactly `scores`."""
    scores = np.asarray(scores, np.float32)
    return np.stack([scores, np.zeros_like(scores)], axis=-1)[None]


TARGET = np.array([[1.0, 0.0]], np.float32)


def test_boundaries_go_to_upper_tier_and_ends_to_end_tiers():
    # 4 tiers: [-1,-.5) [-.5,0) [0,.5) [.5,1]
    layer = SimTierLayer(num_tiers=4)
    out = layer(TARGET, scalar_history([-1.0, -0.5, 0.0, 0.5, 1.0])).numpy()
    np.testing.assert_array_equal(out, [[1, 1, 1, 2]])


def test_scores_outside_range_are_clipped():
    layer = SimTierLayer(num_tiers=2)
    # Unnormalised vectors: scores -3 and 2.5 clip to -1 and 1.
    out = layer(TARGET, scalar_history([-3.0, 2.5, -0.2])).numpy()
    np.testing.assert_array_equal(out, [[2, 1]])


def test_single_tier_counts_real_items():
    layer = SimTierLayer(num_tiers=1)
    mask = np.array([[True, False, True]])
    out = layer(TARGET, scalar_history([-1.0, 0.3, 1.0]), mask=mask).numpy()
    np.testing.assert_array_equal(out, [[2]])


def test_masked_positions_are_never_counted():
    layer = SimTierLayer(num_tiers=4)
    history = scalar_history([0.9, 0.9, -0.9])
    mask = np.array([[True, False, False]])
    np.testing.assert_array_equal(layer(TARGET, history, mask=mask).numpy(), [[0, 0, 0, 1]])


def test_all_masked_rows_give_zeros_in_every_output_mode():
    history = np.stack([scalar_history([0.1, 0.7])[0], scalar_history([0.2, -0.4])[0]])
    target = np.repeat(TARGET, 2, axis=0)
    mask = np.array([[False, False], [True, False]])
    for output in ("counts", "log1p", "fraction"):
        out = SimTierLayer(num_tiers=4, output=output)(target, history, mask=mask).numpy()
        assert np.all(np.isfinite(out)), output
        np.testing.assert_array_equal(out[0], np.zeros(4))
    np.testing.assert_allclose(
        SimTierLayer(num_tiers=4, output="fraction")(target, history, mask=mask).numpy()[1],
        [0, 0, 1, 0],
    )


def test_output_modes_hand_computed():
    history = scalar_history([0.9, 0.8, -0.9, 0.1])
    mask = np.array([[True, True, True, False]])
    counts = [1, 0, 0, 2]
    for output, want in (
        ("counts", counts),
        ("log1p", np.log1p(counts)),
        ("fraction", np.array(counts) / 3),
    ):
        got = SimTierLayer(num_tiers=4, output=output)(TARGET, history, mask=mask).numpy()
        np.testing.assert_allclose(got, [want], rtol=1e-6)


def test_numeric_mask_counts_nonzero_as_real():
    history = scalar_history([0.9, 0.9, 0.9])
    out = SimTierLayer(num_tiers=2)(TARGET, history, mask=np.array([[1, 0, 1]])).numpy()
    np.testing.assert_array_equal(out, [[0, 2]])


def test_candidates_equal_separate_calls(rng):
    b, c, l, d = 3, 5, 7, 8
    target = unit(rng.normal(size=(b, c, d)))
    history = unit(rng.normal(size=(b, l, d)))
    mask = rng.random((b, l)) < 0.6
    joint, = assert_candidates_equal_separate_calls(
        SimTierLayer(num_tiers=10, output="log1p"), target, history, mask=mask, rtol=0, atol=0)
    assert joint.shape == (b, c, 10)


def test_cosine_similarity_ignores_norms(rng):
    target = unit(rng.normal(size=(2, 4)))
    history = unit(rng.normal(size=(2, 6, 4)))
    scale = rng.uniform(0.1, 5.0, size=(2, 6, 1)).astype(np.float32)
    cosine = SimTierLayer(num_tiers=8, similarity="cosine")
    dot = SimTierLayer(num_tiers=8)
    np.testing.assert_array_equal(
        cosine(3.0 * target, history * scale).numpy(), dot(target, history).numpy()
    )


def test_custom_boundaries_as_muse_bins():
    edges = [-0.5, 0.0, 0.5, 0.9]  # two wide edge bins
    layer = SimTierLayer(num_tiers=5, boundaries=edges)
    out = layer(TARGET, scalar_history([-0.7, 0.95, 0.9, 0.6, 0.89])).numpy()
    np.testing.assert_array_equal(out, [[1, 0, 0, 2, 2]])


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    num_tiers=st.integers(1, 12),
    length=st.integers(1, 9),
    output=st.sampled_from(["counts", "log1p", "fraction"]),
)
def test_matches_reference_and_is_permutation_invariant(seed, num_tiers, length, output):
    rng = np.random.default_rng(seed)
    b, d = 3, 5
    target = unit(rng.normal(size=(b, d)))
    history = unit(rng.normal(size=(b, length, d)))
    mask = rng.random((b, length)) < 0.7
    layer = SimTierLayer(num_tiers=num_tiers, output=output)
    out = layer(target, history, mask=mask).numpy()
    edges = [-1.0 + 2.0 * k / num_tiers for k in range(1, num_tiers)]
    np.testing.assert_allclose(out, reference_simtier(target, history, mask, edges, output),
                               rtol=1e-6)
    perm = rng.permutation(length)
    np.testing.assert_array_equal(layer(target, history[:, perm], mask=mask[:, perm]).numpy(), out)
    if output == "counts":
        np.testing.assert_array_equal(out.sum(-1), mask.sum(-1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_tiers": 0}, "num_tiers"),
        ({"num_tiers": 2.5}, "num_tiers"),
        ({"num_tiers": 4, "output": "sum"}, "output"),
        ({"num_tiers": 4, "similarity": "l2"}, "similarity"),
        ({"num_tiers": 4, "boundaries": [0.0]}, "boundaries"),
        ({"num_tiers": 3, "boundaries": [0.5, 0.0]}, "boundaries"),
        ({"num_tiers": 2, "boundaries": [1.0]}, "boundaries"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SimTierLayer(**kwargs)


@pytest.mark.parametrize(
    "target, history, mask, message",
    [
        (np.ones((2,)), np.ones((2, 3, 2)), None,
         r"`target` must have shape \[B, d\] or \[B, C, d\]"),
        (np.ones((2, 2)), np.ones((2, 2)), None, r"`history` must have shape \[B, L, d\]"),
        (np.ones((2, 4)), np.ones((2, 3, 2)), None, r"`history` must have shape \[B, L, 4\]"),
        (np.ones((2, 2)), np.ones((2, 3, 2)), np.ones((2, 4), bool),
         r"`mask` must have shape \[B, L\] = \[2, 3\]"),
        (np.ones((2, 2)), np.ones((2, 3, 2)), np.ones((2, 3, 1), bool), r"`mask` must have shape"),
        (np.ones((2, 2)), np.ones((3, 3, 2)), None, r"`history` must have shape \[2, L, d\]"),
    ],
)
def test_bad_shapes_name_the_argument(target, history, mask, message):
    with pytest.raises(ValueError, match=message):
        SimTierLayer(num_tiers=4)(target.astype("float32"), history.astype("float32"), mask=mask)
