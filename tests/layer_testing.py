"""Checks every tfmm layer passes, shared by the layer tests (as keras-rs's TestCase).

- `assert_config_round_trip`: `get_config`/`from_config` and Keras (de)serialisation
  give the same config, and the class is registered as ``tfmm>ClassName``.
- `assert_keras_file_round_trip`: a model around the layer, saved as ``.keras``
  and loaded, gives the same outputs.
- `assert_candidates_equal_separate_calls`: with a candidate axis ([B, C, ...]
  target arguments) the layer gives, for each candidate, what it gives that
  candidate alone.

The layer test files also run under tf-keras (tests/test_tf_keras.py), so these
checks run in both Keras flavours.
"""

import numpy as np
import tensorflow as tf

from tfmm.keras_compat import keras


def assert_config_round_trip(layer):
    config = layer.get_config()
    assert type(layer).from_config(config).get_config() == config
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(revived) is type(layer) and revived.get_config() == config
    assert keras.saving.get_registered_name(type(layer)) == f"tfmm>{type(layer).__name__}"


def assert_keras_file_round_trip(layer, inputs, path, mask=None):
    """`inputs`: the layer's positional arrays (a batch); `mask` its ``mask=`` array."""
    tensors = [keras.Input(x.shape[1:], dtype=str(x.dtype)) for x in inputs]
    mask_input = None if mask is None else keras.Input(mask.shape[1:], dtype="bool")
    kwargs = {} if mask is None else {"mask": mask_input}
    outputs = tf.nest.flatten(layer(*tensors, **kwargs))
    model = keras.Model(tensors + ([] if mask is None else [mask_input]), outputs)
    arrays = list(inputs) + ([] if mask is None else [mask])
    want = model.predict(arrays, verbose=0)
    model.save(path)
    got = keras.models.load_model(path).predict(arrays, verbose=0)
    for a, b in zip(tf.nest.flatten(got), tf.nest.flatten(want)):
        np.testing.assert_array_equal(a, b)


def assert_candidates_equal_separate_calls(layer, candidates, *others, per_candidate=None,
                                           rtol=1e-5, atol=1e-6, **kwargs):
    """`candidates`: the layer's first argument [B, C, ...], or a tuple of its first
    arguments that all have the candidate axis; `others` and `kwargs` the rest,
    shared by the candidates. `per_candidate`: which flat outputs carry the
    candidate axis (default all). Returns the joint call's flat outputs."""
    candidates = candidates if isinstance(candidates, tuple) else (candidates,)
    joint = [np.asarray(o) for o in tf.nest.flatten(layer(*candidates, *others, **kwargs))]
    which = range(len(joint)) if per_candidate is None else per_candidate
    for j in range(candidates[0].shape[1]):
        alone = tf.nest.flatten(layer(*(c[:, j] for c in candidates), *others, **kwargs))
        for i in which:
            np.testing.assert_allclose(joint[i][:, j], np.asarray(alone[i]), rtol=rtol,
                                       atol=atol, err_msg=f"output {i}, candidate {j}")
    return joint
