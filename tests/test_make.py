import numpy as np
import pytest

from tests.conftest import unit
from tests.layer_testing import assert_candidates_equal_separate_calls
from tfmm.keras_compat import keras
from tfmm.layers import DINAttention, MAKEBlock

pytestmark = pytest.mark.keras  # rerun under tf-keras by tests/test_tf_keras.py


@pytest.mark.parametrize("target_in_mlp", [False, True])
def test_logit_and_knowledge_are_din_then_mlp(rng, target_in_mlp):
    b, l, d = 3, 5, 6
    target = unit(rng.normal(size=(b, d)))
    history = unit(rng.normal(size=(b, l, d)))
    mask = rng.random((b, l)) < 0.7
    make = MAKEBlock(din={"hidden_units": (8, 4)}, mlp_units=(16, 8, 4, 1), return_knowledge=True,
                     target_in_mlp=target_in_mlp)
    logit, knowledge = make(target, history, mask=mask)
    assert logit.shape == (b, 1)
    # The knowledge is v_MAKE and the hidden outputs either way, never the target itself.
    assert knowledge.shape == (b, d + 16 + 8 + 4) == (b, make.knowledge_dim)
    assert make.mlp[0].kernel.shape == ((2 if target_in_mlp else 1) * d, 16)

    v_make = make.din(target, history, mask=mask).numpy()
    x = np.concatenate([v_make, target], -1) if target_in_mlp else v_make
    parts = [v_make]
    for dense in make.mlp:
        x = x @ dense.kernel.numpy() + dense.bias.numpy()
        if dense is not make.mlp[-1]:
            x = np.maximum(x, 0)
            parts.append(x)
    np.testing.assert_allclose(logit.numpy(), x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(knowledge.numpy(), np.concatenate(parts, -1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target_in_mlp", [False, True])
def test_candidates_shape_and_consistency(rng, target_in_mlp):
    target = unit(rng.normal(size=(2, 4, 6)))
    history = unit(rng.normal(size=(2, 5, 6)))
    make = MAKEBlock(din={"hidden_units": (8,)}, mlp_units=(8, 8, 8, 1),
                     target_in_mlp=target_in_mlp)
    logits, = assert_candidates_equal_separate_calls(make, target, history)
    assert logits.shape == (2, 4, 1)


def _pretrain_and_rank(rng, freeze):
    """MAKE pre-trained alone, then inside a ranker, frozen or not."""
    b, l, d = 64, 6, 8
    target = unit(rng.normal(size=(b, d)))
    history = unit(rng.normal(size=(b, l, d)))
    label = (np.einsum("bd,bld->b", target, history) > 0).astype(np.float32)[:, None]

    t_in = keras.Input((d,))
    h_in = keras.Input((l, d))
    make = MAKEBlock(din={"hidden_units": (8,), "activation": "dice"}, mlp_units=(16, 8, 4, 1),
                     dropout=0.2, return_knowledge=True, name="make")
    logit, knowledge = make(t_in, h_in)
    pretrain = keras.Model([t_in, h_in], logit)
    pretrain.compile(optimizer=keras.optimizers.Adam(0.01),
                     loss=keras.losses.BinaryCrossentropy(from_logits=True))
    before = pretrain.evaluate([target, history], label, verbose=0)
    pretrain.fit([target, history], label, epochs=5, batch_size=16, verbose=0)
    after = pretrain.evaluate([target, history], label, verbose=0)

    make.trainable = not freeze
    ranker = keras.Model([t_in, h_in], keras.layers.Dense(1)(knowledge))
    ranker.compile(optimizer=keras.optimizers.Adam(0.01),
                   loss=keras.losses.BinaryCrossentropy(from_logits=True))
    snapshot = [w.numpy().copy() for w in make.weights]
    ranker.fit([target, history], label, epochs=1, batch_size=16, verbose=0)
    return make, before, after, snapshot


def test_pretraining_learns_and_freezing_keeps_weights(rng):
    make, before, after, snapshot = _pretrain_and_rank(rng, freeze=True)
    assert after < before
    assert make.trainable_weights == []
    # Frozen: no gradient step and no Dice statistics update (inference mode).
    for w, old in zip(make.weights, snapshot):
        np.testing.assert_array_equal(w.numpy(), old)


def test_unfrozen_make_is_fine_tuned(rng):
    make, _, _, snapshot = _pretrain_and_rank(rng, freeze=False)
    old = {id(w): value for w, value in zip(make.weights, snapshot)}
    # Every trainable weight the ranker reads took a step: all but the last MLP layer's,
    # the logit, which the ranker (reading the knowledge) does not use.
    unchanged = [w for w in make.trainable_weights if np.array_equal(w.numpy(), old[id(w)])]
    assert {id(w) for w in unchanged} == {id(w) for w in make.mlp[-1].trainable_weights}
    assert len(make.trainable_weights) > len(unchanged)


def test_frozen_make_is_deterministic_even_in_training_mode(rng):
    target = unit(rng.normal(size=(4, 6)))
    history = unit(rng.normal(size=(4, 5, 6)))
    make = MAKEBlock(din={"hidden_units": (8,), "activation": "dice"}, mlp_units=(8, 8, 8, 1),
                     dropout=0.5)
    make(target, history)
    make.trainable = False
    np.testing.assert_array_equal(make(target, history, training=True).numpy(),
                                  make(target, history).numpy())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mlp_units": (8, 4, 1)}, "mlp_units"),
        ({"mlp_units": (8, 4, 2, 2)}, "mlp_units"),
        ({"dropout": 1.0}, "dropout"),
        ({"din": "din"}, "din"),
        ({"din": DINAttention(return_weights=True)}, "return_weights"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MAKEBlock(**kwargs)


def test_bad_shapes_name_the_argument():
    make = MAKEBlock(mlp_units=(4, 4, 4, 1))
    with pytest.raises(ValueError, match=r"MAKEBlock: `history` must have shape \[B, L, 6\]"):
        make(np.ones((2, 6), "float32"), np.ones((2, 3, 5), "float32"))
