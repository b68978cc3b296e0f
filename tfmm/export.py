"""SavedModels for TF Serving: ``<export_dir>/<integer version>/`` with ``serving_default``.

Keras 3.15's ``model.export()`` traced our towers with batch statistics
(``training=True``) here; the exported endpoint calls the model with
``training=False`` explicitly, so a SavedModel answers exactly like the model.
"""

import os

import keras
import tensorflow as tf


def next_version(export_dir):
    """One more than the largest integer version under `export_dir` (1 if none)."""
    versions = [int(v) for v in os.listdir(export_dir) if v.isdigit()] \
        if os.path.isdir(export_dir) else []
    return max(versions, default=0) + 1


def input_signature(model):
    """Dense TensorSpecs named like the model's inputs (a dict model gives several)."""
    inputs = model.inputs
    return [tf.TensorSpec((None,) + tuple(x.shape[1:]), x.dtype, name=x.name) for x in inputs]


def export_saved_model(model, export_dir, output_name):
    """Writes `model` in inference mode as the next version; returns its path.

    The ``serving_default`` signature takes the model's named inputs and
    returns ``{output_name: output}``.
    """
    path = os.path.join(export_dir, str(next_version(export_dir)))
    signature = input_signature(model)
    names = [s.name for s in signature]

    def serve(*args):
        inputs = dict(zip(names, args)) if isinstance(model.input, dict) else args[0]
        return {output_name: model(inputs, training=False)}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(name="serve", fn=serve, input_signature=signature)
    archive.write_out(path, verbose=False)
    return path
