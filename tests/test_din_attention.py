import numpy as np
import pytest
import tensorflow as tf

from tfmm.layers import DINAttention, Dice

pytestmark = pytest.mark.keras  # rerun under tf-keras by tests/test_tf_keras.py


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def mlp_params(din):
    kernels = [din.kernel.numpy()] + [d.kernel.numpy() for d in din.dense]
    biases = [din.bias.numpy()] + [d.bias.numpy() for d in din.dense]
    return kernels, biases


def reference_din(q, k, mask, kernels, biases, act=sigmoid, softmax=False):
    """The DIN reference, written out: MLP over concat[q, k, q-k, q*k]."""
    qq = np.broadcast_to(q[:, None, :], k.shape)
    x = np.concatenate([qq, k, qq - k, qq * k], axis=-1).astype(np.float64)
    for i, (w, b) in enumerate(zip(kernels, biases)):
        x = x @ w + b
        if i < len(kernels) - 1:
            x = act(x)
    s = x[..., 0]
    if softmax:
        s = s / np.sqrt(q.shape[-1])
        s = np.where(mask, s, -np.inf)
        e = np.exp(s - np.max(np.where(mask, s, -1e300), axis=1, keepdims=True))
        e = np.where(mask, e, 0.0)
        denom = e.sum(1, keepdims=True)
        w = np.divide(e, denom, out=np.zeros_like(e), where=denom > 0)
    else:
        w = s * mask
    return np.einsum("bl,bld->bd", w, k), w


@pytest.fixture
def inputs(rng):
    b, l, d = 4, 6, 5
    q = rng.normal(size=(b, d)).astype(np.float32)
    k = rng.normal(size=(b, l, d)).astype(np.float32)
    mask = rng.random((b, l)) < 0.7
    mask[0] = False  # an empty history
    mask[1] = True
    return q, k, mask


@pytest.mark.parametrize("normalization", [None, "softmax"])
@pytest.mark.parametrize("hidden_units", [(80, 40), (7,), ()])
def test_matches_numpy_reference(inputs, normalization, hidden_units):
    q, k, mask = inputs
    din = DINAttention(hidden_units=hidden_units, normalization=normalization,
                       return_weights=True)
    pooled, weights = din(q, k, mask=mask)
    want, want_w = reference_din(q, k, mask, *mlp_params(din), softmax=normalization == "softmax")
    np.testing.assert_allclose(pooled.numpy(), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(weights.numpy(), want_w, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(pooled.numpy()[0], 0.0)  # empty history pools to 0
    if normalization == "softmax":
        np.testing.assert_allclose(weights.numpy()[1:].sum(-1)[mask[1:].any(-1)], 1.0, rtol=1e-5)


@pytest.mark.parametrize("empty_rows", [(0,), (0, 3), None])  # None: no mask
def test_gradients_match_the_reference_layout(rng, inputs, empty_rows):
    """Query, keys and every weight get the gradients of the reference's
    concat[q, k, q-k, q*k] MLP over every position, padding's weight 0: the
    real positions gathered (empty histories first, inside and last) and their
    sums scattered back lose nothing."""
    q, k, mask = inputs
    if empty_rows is not None:
        mask[list(empty_rows)] = False
    din = DINAttention(hidden_units=(7, 3))
    q, k = tf.constant(q), tf.constant(k)
    din(q, k)
    upstream = tf.constant(rng.normal(size=q.shape).astype(np.float32))

    def reference(q, k):
        qq = tf.broadcast_to(q[:, None, :], tf.shape(k))
        x = tf.concat([qq, k, qq - k, qq * k], axis=-1) @ din.kernel + din.bias
        for dense in din.dense:
            x = dense(tf.sigmoid(x))
        weights = x[..., 0] * (1.0 if empty_rows is None else tf.cast(mask, x.dtype))
        return tf.einsum("bl,bld->bd", weights, k)

    def gradients(fn, q, k):
        with tf.GradientTape() as tape:
            tape.watch([q, k])
            out = tf.reduce_sum(fn(q, k) * upstream)
        return [tf.convert_to_tensor(g) for g in tape.gradient(out, [q, k] + din.trainable_weights)]

    layer = lambda q, k: din(q, k, mask=None if empty_rows is None else mask)  # noqa: E731
    want = gradients(reference, q, k)
    # Eager, and in one XLA program (jit_compile: Keras 3's default train step on a GPU).
    for got in (gradients(layer, q, k),
                tf.function(lambda q, k: gradients(layer, q, k), jit_compile=True)(q, k)):
        assert len(got) == 2 + 2 * 3
        for g, w in zip(got, want):
            np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-4, atol=1e-5)


def test_other_keras_activation_matches_reference(inputs):
    q, k, mask = inputs
    din = DINAttention(hidden_units=(6, 3), activation="relu")
    din.build(q.shape)
    want, _ = reference_din(q, k, mask, *mlp_params(din), act=lambda x: np.maximum(x, 0))
    np.testing.assert_allclose(din(q, k, mask=mask).numpy(), want, rtol=1e-4, atol=1e-5)


def test_dice_matches_reference_in_both_modes(rng, inputs):
    q, k, mask = inputs
    din = DINAttention(hidden_units=(6, 3), activation="dice")
    din(q, k, mask=mask)
    dice_params = []
    for dice in din.activations:
        alpha = rng.normal(size=dice.alpha.shape).astype(np.float32)
        mean = rng.normal(size=dice.alpha.shape).astype(np.float32)
        var = rng.uniform(0.5, 2.0, size=dice.alpha.shape).astype(np.float32)
        dice.alpha.assign(alpha)
        dice.moving_mean.assign(mean)
        dice.moving_variance.assign(var)
        dice_params.append((alpha, mean, var))

    def dice_inference(x):
        alpha, mean, var = next(acts)
        p = sigmoid((x - mean) / np.sqrt(var + 1e-9))
        return p * x + (1 - p) * alpha * x

    acts = iter(dice_params)
    want, _ = reference_din(q, k, mask, *mlp_params(din), act=dice_inference)
    np.testing.assert_allclose(din(q, k, mask=mask).numpy(), want, rtol=1e-4, atol=1e-5)

    def dice_training(x):
        alpha, _, _ = next(acts)
        flat = x[mask]  # the batch statistics of the real history items only
        p = sigmoid((x - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-9))
        return p * x + (1 - p) * alpha * x

    acts = iter(dice_params)
    want, _ = reference_din(q, k, mask, *mlp_params(din), act=dice_training)
    np.testing.assert_allclose(din(q, k, mask=mask, training=True).numpy(), want,
                               rtol=1e-3, atol=1e-4)
    # One training call moved the statistics by (1 - momentum) towards the batch's.
    assert not np.allclose(din.activations[0].moving_mean.numpy(), dice_params[0][1])


def test_dice_standalone_formula():
    dice = Dice()
    x = np.array([[-2.0, 0.5], [1.0, 3.0]], np.float32)
    dice(x)
    dice.alpha.assign([0.25, -1.0])
    p = sigmoid(x / np.sqrt(1 + 1e-9))
    want = p * x + (1 - p) * np.array([0.25, -1.0]) * x
    np.testing.assert_allclose(dice(x).numpy(), want, rtol=1e-6)


@pytest.mark.parametrize("activation", ["sigmoid", "dice"])
@pytest.mark.parametrize("normalization", [None, "softmax"])
def test_candidates_equal_separate_calls(rng, inputs, normalization, activation):
    _, k, mask = inputs
    q = rng.normal(size=(k.shape[0], 3, k.shape[-1])).astype(np.float32)
    din = DINAttention(hidden_units=(8, 4), normalization=normalization, return_weights=True,
                       activation=activation)
    pooled, weights = din(q, k, mask=mask)
    if activation == "dice":  # inference statistics unlike the defaults
        for dice in din.activations:
            dice.moving_mean.assign(rng.normal(size=dice.moving_mean.shape))
            dice.moving_variance.assign(rng.uniform(0.5, 2.0, size=dice.moving_variance.shape))
            dice.alpha.assign(rng.normal(size=dice.alpha.shape))
        pooled, weights = din(q, k, mask=mask)
    assert pooled.shape == (k.shape[0], 3, k.shape[-1])
    per_candidate_keys = np.repeat(k[:, None], 3, axis=1)
    pooled4, _ = din(q, per_candidate_keys, mask=mask)
    for c in range(3):
        p, w = din(q[:, c], k, mask=mask)
        # The paths sum the first layer in different orders: float32 rounding apart.
        np.testing.assert_allclose(pooled.numpy()[:, c], p.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(weights.numpy()[:, c], w.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(pooled4.numpy()[:, c], p.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", ["sigmoid", "dice"])
@pytest.mark.parametrize("training", [False, True])
def test_padded_keys_do_not_change_the_output(rng, inputs, activation, training):
    # In training too: Dice's batch statistics are those of the real items.
    q, k, mask = inputs
    din = DINAttention(hidden_units=(8,), normalization="softmax", activation=activation)
    noisy = np.where(mask[..., None], k, rng.normal(size=k.shape) * 100).astype(np.float32)
    np.testing.assert_allclose(din(q, k, mask=mask, training=training).numpy(),
                               din(q, noisy, mask=mask, training=training).numpy(),
                               rtol=1e-5, atol=1e-6)


def test_history_permutation_invariance(rng, inputs):
    q, k, mask = inputs
    din = DINAttention()
    perm = rng.permutation(k.shape[1])
    np.testing.assert_allclose(din(q, k, mask=mask).numpy(),
                               din(q, k[:, perm], mask=mask[:, perm]).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "query, keys, mask, message",
    [
        (np.ones((2,)), np.ones((2, 3, 2)), None,
         r"`query` must have shape \[B, d\] or \[B, C, d\]"),
        (np.ones((2, 2)), np.ones((2, 2)), None,
         r"`keys` must have shape \[B, L, d\] or \[B, C, L, d\]"),
        (np.ones((2, 4)), np.ones((2, 3, 2)), None, r"`keys` must have shape \[B, L, 4\]"),
        (np.ones((2, 2)), np.ones((2, 1, 3, 2)), None, r"need a `query` of shape \[B, C, d\]"),
        (np.ones((2, 3, 2)), np.ones((2, 4, 3, 2)), None, r"`keys` must have shape \[B, 3, L, 2\]"),
        (np.ones((2, 2)), np.ones((2, 3, 2)), np.ones((3,), bool),
         r"`mask` must have shape \[B, L\] = \[2, 3\]"),
        (np.ones((2, 2)), np.ones((2, 3, 2)), np.ones((2, 5), bool),
         r"`mask` must have shape \[B, L\] = \[2, 3\]"),
    ],
)
def test_bad_shapes_name_the_argument(query, keys, mask, message):
    with pytest.raises(ValueError, match=message):
        DINAttention(hidden_units=(4,))(query.astype("float32"), keys.astype("float32"), mask=mask)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"normalization": "sparsemax"}, "normalization"), ({"hidden_units": (4, 0)}, "hidden_units")],
)
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DINAttention(**kwargs)
