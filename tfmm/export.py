"""SavedModels for TF Serving: ``<export_dir>/<integer version>/`` with ``serving_default``.

A `tfmm.ranker.DINRanker` also gets a ``rank`` signature: the
same weights scoring one user per row (``[B]`` user, ``[B, C]`` candidates,
``[B, L]`` history, ``[B, C, d]`` and ``[B, L, d]`` vectors -> ``[B, C]``),
so a request of 200 candidates carries its history once, not 200 times
(`tfmm.ranker.DINRanker.rank`).

Keras 3.15's ``model.export()`` traced our towers with batch statistics
(``training=True``) here; the exported endpoint calls the model with
``training=False`` explicitly, so a SavedModel answers exactly like the model.

Each version carries ``assets.extra/tf_serving_warmup_requests``: PredictionLog
records (one per signature) that TF Serving replays before it serves the
version, so the first real request does not pay for graph initialisation.
"""

import os
import re
import shutil
import socket
import uuid

import keras
import numpy as np
import tensorflow as tf

from tfmm import outputs

SIGNATURE = "serving_default"
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
# Words for string inputs of a signature-built batch.
_WORDS = np.array(["red", "blue mug", "striped pillow", "lamp"], dtype=object)


_STAGING = re.compile(r"\.tmp-(.+)-(\d+)-[0-9a-f]{32}")


def is_model_base(directory):
    """Whether `directory` holds only SavedModel versions (integer directories) and
    exporters' staging: a model base as TF Serving reads it, tfmm's or another tool's."""
    return all(_STAGING.fullmatch(name) or name.isdigit()
               and os.path.isdir(os.path.join(directory, name))
               for name in os.listdir(directory))


def check_export_dir(export_dir, inputs=()):
    """Refuses (ValueError naming --export_dir) a base that is or holds one of `inputs`,
    or holds anything but versions: another export's or a user's files."""
    outputs.check_output_dir(export_dir, "export_dir", inputs, owned=is_model_base)


def next_version(export_dir):
    """One more than the largest integer version under `export_dir` (1 if none)."""
    versions = [int(v) for v in os.listdir(export_dir) if v.isdigit()] \
        if os.path.isdir(export_dir) else []
    return max(versions, default=0) + 1


def latest_version(path):
    """The SavedModel TF Serving would serve from `path`: `path` itself when it
    holds one, else its highest integer version (FileNotFoundError if none)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such directory.")
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    versions = [int(v) for v in os.listdir(path)
                if v.isdigit() and os.path.isdir(os.path.join(path, v))]
    if not versions:
        raise FileNotFoundError(f"{path}: no SavedModel (no saved_model.pb in it, no integer "
                                "version directory under it).")
    version = os.path.join(path, str(max(versions)))
    # TF Serving serves the highest version, whatever it holds.
    if not os.path.isfile(os.path.join(version, "saved_model.pb")):
        raise FileNotFoundError(f"{version}: the highest version has no saved_model.pb; TF "
                                "Serving would try to load it and fail.")
    return version


def input_signature(model):
    """Dense TensorSpecs named like the model's inputs (a dict model gives several)."""
    inputs = model.inputs
    return [tf.TensorSpec((None,) + tuple(x.shape[1:]), x.dtype, name=x.name) for x in inputs]


def example_inputs(specs, batch_size=4, seed=0):
    """A small valid batch for a signature: ``{name: array}`` from ``{name: TensorSpec}``.

    Unknown dimensions become `batch_size`; integers are 0 or 1 (padding and
    out-of-vocabulary ids, valid in every tfmm vocabulary); uint8 is random
    pixels, floats standard normal, strings a few words.
    """
    rng = np.random.default_rng(seed)
    batch = {}
    for name, spec in specs.items():
        if spec.shape.rank is None:
            raise ValueError(f"example_inputs: input {name!r} has an unknown rank; "
                             "pass example inputs instead.")
        shape = tuple(batch_size if d is None else d for d in spec.shape.as_list())
        dtype = tf.as_dtype(spec.dtype)
        if dtype == tf.string:
            value = rng.choice(_WORDS, size=shape)
        elif dtype == tf.bool:
            value = rng.random(shape) < 0.5
        elif dtype == tf.uint8:
            value = rng.integers(0, 256, shape, dtype=np.uint8)
        elif dtype.is_integer:
            value = rng.integers(0, 2, shape).astype(dtype.as_numpy_dtype)
        elif dtype.is_floating:
            value = rng.standard_normal(shape).astype(dtype.as_numpy_dtype)
        else:
            raise ValueError(f"example_inputs: input {name!r} has dtype {dtype.name}, "
                             "which has no example; pass example inputs instead.")
        batch[name] = value
    return batch


def conform_inputs(specs, inputs, what="inputs"):
    """`inputs` as arrays of the signature's dtypes; raises ValueError naming a bad input."""
    missing, unknown = sorted(set(specs) - set(inputs)), sorted(set(inputs) - set(specs))
    if missing or unknown:
        raise ValueError(f"{what}: the signature takes {sorted(specs)}; missing {missing}, "
                         f"unknown {unknown}.")
    batch = {}
    for name, spec in specs.items():
        value = np.asarray(inputs[name])
        dtype = tf.as_dtype(spec.dtype)
        # Only casts within a kind (never float ids truncated to ints).
        kinds = ("USO" if dtype == tf.string else "b" if dtype == tf.bool
                 else "iu" if dtype.is_integer else "fiu")
        if value.dtype.kind not in kinds:
            raise ValueError(f"{what}: input {name!r} is {value.dtype}, the signature wants "
                             f"{dtype.name}.")
        value = tf.constant(value, dtype=dtype).numpy()
        if not spec.shape.is_compatible_with(value.shape):
            raise ValueError(f"{what}: input {name!r} has shape {list(value.shape)}, the "
                             f"signature wants {spec.shape.as_list()}.")
        batch[name] = value
    return batch


def write_warmup(version_dir, requests):
    """Writes PredictRequests to ``<version_dir>/assets.extra/``.

    Args:
        requests: ``{signature name: (specs {name: TensorSpec}, inputs {name: array})}``,
            one record per signature, in this order.
    """
    # Imported here: only exports need the serving protos.
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    path = os.path.join(version_dir, WARMUP_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for signature, (specs, inputs) in requests.items():
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(signature_name=signature))
            for name, spec in specs.items():
                request.inputs[name].CopyFrom(tf.make_tensor_proto(inputs[name],
                                                                   dtype=spec.dtype))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())


def read_warmup(version_dir, signature=None):
    """The warmup requests of a version as ``[{name: array}]`` ([] when it has none).

    With `signature`, only the requests for that signature (a request that
    names none is for ``serving_default``, as in TF Serving).
    """
    from tensorflow_serving.apis import prediction_log_pb2

    path = os.path.join(version_dir, WARMUP_FILE)
    if not os.path.exists(path):
        return []
    requests = []
    for record in tf.data.TFRecordDataset(path):
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        if log.WhichOneof("log_type") != "predict_log":
            raise ValueError(f"{path}: a warmup record is a {log.WhichOneof('log_type')}, "
                             "not a predict_log.")
        request = log.predict_log.request
        if signature is not None and (request.model_spec.signature_name or SIGNATURE) != signature:
            continue
        requests.append({k: tf.make_ndarray(v) for k, v in request.inputs.items()})
    return requests


def ranker_signatures(model):
    """``{"rank": (fn, input_signature)}`` for a `DINRanker`, else ``{}``."""
    from tfmm.ranker import RANK_SIGNATURE, DINRanker

    if not isinstance(model, DINRanker):
        return {}
    return {RANK_SIGNATURE: (model.rank, model.rank_input_signature)}


def _endpoint(fn, names, output_name):
    def endpoint(*args):
        return {output_name: fn(dict(zip(names, args)))}
    return endpoint


def remove_abandoned_staging(export_dir):
    """Removes the staging directories in `export_dir` of dead exporters on this host.

    A killed export leaves its hidden ``.tmp-<host>-<pid>-<uuid>`` behind;
    one whose process no longer runs here is removed. Those of other hosts
    (a shared file system) and of running exporters are left alone.
    Returns the removed paths.
    """
    if not os.path.isdir(export_dir):
        return []
    removed = []
    for name in sorted(os.listdir(export_dir)):
        match = _STAGING.fullmatch(name)
        if match and match[1] == socket.gethostname() and not _running(int(match[2])):
            shutil.rmtree(os.path.join(export_dir, name), ignore_errors=True)
            removed.append(os.path.join(export_dir, name))
    return removed


def _running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def export_saved_model(model, export_dir, output_name, warmup_inputs=None,
                       extra_signatures=None):
    """Writes `model` in inference mode as the next version; returns its path.

    The ``serving_default`` signature takes the model's named inputs and
    returns ``{output_name: output}``. `warmup_inputs` (``{name: array}``, a
    batch of real requests) becomes the warmup record; without it a small
    batch is built from the signature (`example_inputs`).

    `extra_signatures` adds signatures over the same weights: ``{name: (fn,
    [TensorSpec])}``, with ``fn({input name: tensor})`` returning the output
    (``{output_name: fn(...)}``; its warmup record is built from the specs).
    Default: a ``rank`` signature for a `tfmm.ranker.DINRanker`
    (`ranker_signatures`), none for other models; ``{}`` adds none.

    The version is written under a hidden ``.tmp-<host>-<pid>-*`` directory
    and renamed into place, so TF Serving (which loads only integer
    directories) never sees a half-written version; those of exporters that
    were killed are removed (`remove_abandoned_staging`). A base that holds
    anything else is refused (`check_export_dir`) before anything is written.
    """
    check_export_dir(export_dir)
    signature = input_signature(model)
    specs = {s.name: s for s in signature}
    warmup = (example_inputs(specs) if warmup_inputs is None
              else conform_inputs(specs, warmup_inputs, "export_saved_model: warmup_inputs"))
    names = list(specs)
    extra = ranker_signatures(model) if extra_signatures is None else dict(extra_signatures)
    if SIGNATURE in extra or "serve" in extra:
        raise ValueError(f"export_saved_model: extra_signatures may not be named "
                         f"{SIGNATURE!r} or 'serve'.")
    warmups = {SIGNATURE: (specs, warmup)}

    def serve(*args):
        inputs = dict(zip(names, args)) if isinstance(model.input, dict) else args[0]
        return {output_name: model(inputs, training=False)}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(name="serve", fn=serve, input_signature=signature)
    for name, (fn, extra_signature) in extra.items():
        extra_specs = {s.name: s for s in extra_signature}
        archive.add_endpoint(name=name, fn=_endpoint(fn, list(extra_specs), output_name),
                             input_signature=list(extra_signature))
        warmups[name] = (extra_specs, example_inputs(extra_specs))
    remove_abandoned_staging(export_dir)
    # Not mkdtemp: its 0700 would keep a TF Serving of another user out.
    staging = os.path.join(export_dir, f".tmp-{socket.gethostname()}-{os.getpid()}-"
                                       f"{uuid.uuid4().hex}")
    try:
        archive.write_out(staging, verbose=False)
        write_warmup(staging, warmups)
        while True:
            path = os.path.join(export_dir, str(next_version(export_dir)))
            try:
                os.rename(staging, path)
                return path
            except OSError:
                if not os.path.isdir(path):
                    raise
                # Another exporter took this version meanwhile: take the next.
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
