"""The Keras that tfmm's layers subclass: Keras 3, or tf-keras when asked.

TensorFlow resolves ``tf.keras`` to tf-keras when ``TF_USE_LEGACY_KERAS`` is
set (TFRS 0.7.7 needs that); tfmm follows the same switch so that one set of
layer classes lives in whichever Keras the user's model is built with. The
layers compute with TensorFlow ops, which both Keras flavours accept on the
TensorFlow backend.
"""

import os

LEGACY = os.environ.get("TF_USE_LEGACY_KERAS", "0").strip().lower() in ("1", "true", "yes")

if LEGACY:
    import tf_keras as keras
else:
    import keras

    if keras.backend.backend() != "tensorflow":
        raise ImportError(
            "tfmm needs Keras on the TensorFlow backend; KERAS_BACKEND is "
            f"{keras.backend.backend()!r}. Set KERAS_BACKEND=tensorflow."
        )


def register(cls):
    """Registers a tfmm class for serialisation as ``tfmm>ClassName``."""
    return keras.saving.register_keras_serializable(package="tfmm")(cls)
