r"""Checks that TF Serving's loader loads and runs a SavedModel like Python does.

    python -m tfmm.serving.check EXPORT_DIR [EXPORT_DIR ...]

EXPORT_DIR is a version directory (``<base>/<n>/``) or a base directory, whose
highest integer version is checked. No ``tensorflow_model_server`` can be
installed here, so the check builds ``check.cc`` once against the tensorflow
wheel's ``libtensorflow_cc.so.2`` (cached under ``$TFMM_CACHE_DIR``, else
``$XDG_CACHE_HOME/tfmm`` or ``~/.cache/tfmm``): it loads the SavedModel with
``tensorflow::LoadSavedModel(..., {"serve"})``, the loader TF Serving uses,
and *runs* the signature, since ops inside functions (a ``py_function``, an
op from a Python-only library) fail only at run time. Its outputs must match
the SavedModel run in Python (and the Keras model, through the Python API)
within ``--atol``.

Inputs: the version's first warmup request for the signature when it has
one, else a small batch built from the signature (`tfmm.export.example_inputs`).
A ranker's ``rank`` signature (``--signature=rank``) is compared with the Keras
model through `tfmm.ranker.DINRanker.rank`.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf
from absl import flags
from tensorflow.core.protobuf import named_tensor_pb2

from tfmm import cli
from tfmm.export import SIGNATURE, conform_inputs, example_inputs, latest_version, read_warmup

FLAGS = flags.FLAGS

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "check.cc")


class ServingCheckError(Exception):
    """The SavedModel does not load, run or answer alike under TF Serving's loader."""


def cache_dir():
    """Where the compiled checker lives: ``$TFMM_CACHE_DIR/serving_check`` or under XDG's cache."""
    root = os.environ.get("TFMM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tfmm")
    return os.path.join(root, "serving_check")


def binary():
    """Path of the checker, compiled on first use for this source and tensorflow."""
    tf_dir = os.path.dirname(tf.__file__)
    with open(SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(b"\0".join([source, tf.__version__.encode(), tf_dir.encode()]))
    path = os.path.join(cache_dir(), key.hexdigest()[:16], "serving_check")
    if os.access(path, os.X_OK):
        return path
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise ServingCheckError(f"the serving check needs a C++ compiler: {compiler!r} is not "
                                "installed (apt-get install g++, or set CXX).")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # A private file renamed into place: concurrent builds never run a half-written binary.
    fd, tmp = tempfile.mkstemp(prefix=".build-", dir=os.path.dirname(path))
    os.close(fd)
    command = [compiler, "-std=c++17", "-D_GLIBCXX_USE_CXX11_ABI=1", "-DEIGEN_MAX_ALIGN_BYTES=64",
               "-Wno-deprecated-declarations", f"-I{tf_dir}/include", SOURCE, "-o", tmp,
               # --no-as-needed: the program names no symbol of libtensorflow_cc's
               # kernels, yet needs them registered.
               "-Wl,--no-as-needed", f"-L{tf_dir}", "-l:libtensorflow_cc.so.2",
               "-l:libtensorflow_framework.so.2", f"-Wl,-rpath,{tf_dir}"]
    try:
        build = subprocess.run(command, capture_output=True, text=True)
        if build.returncode:
            raise ServingCheckError(f"building {SOURCE} failed:\n{' '.join(command)}\n"
                                    f"{build.stderr[-4000:]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def resolve_export_dir(export_dir):
    """The version directory to check: `export_dir` itself or its highest integer version."""
    try:
        return latest_version(export_dir)
    except FileNotFoundError as e:
        raise ServingCheckError(str(e)) from None


def _run_binary(exe, path, signature, inputs, specs):
    """Outputs ``{name: array}`` of `signature` run by the C++ checker `exe`."""
    with tempfile.TemporaryDirectory(prefix="tfmm-serving-check-") as tmp:
        inputs_file, outputs_file = os.path.join(tmp, "inputs"), os.path.join(tmp, "outputs")
        with tf.io.TFRecordWriter(inputs_file) as writer:
            for name, spec in specs.items():
                named = named_tensor_pb2.NamedTensorProto(
                    name=name, tensor=tf.make_tensor_proto(inputs[name], dtype=spec.dtype))
                writer.write(named.SerializeToString())
        env = dict(os.environ)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TF's INFO lines would bury the reason
        run = subprocess.run([exe, path, signature, inputs_file, outputs_file],
                             capture_output=True, text=True, env=env)
        if run.returncode:
            how = (f"was killed by signal {-run.returncode}" if run.returncode < 0
                   else f"exited with {run.returncode}")
            # The program's own reason last; TensorFlow's log lines before it.
            log, _, reason = run.stderr.rpartition("serving_check: ")
            raise ServingCheckError(f"{path}: TF Serving's loader (C++ LoadSavedModel, tag "
                                    f"'serve', signature '{signature}') {how}: "
                                    f"{(reason.strip() or '(no reason given)')[-3000:]}\n"
                                    f"--- its log ---\n{log.strip()[-3000:]}")
        outputs = {}
        for record in tf.data.TFRecordDataset(outputs_file):
            named = named_tensor_pb2.NamedTensorProto.FromString(record.numpy())
            outputs[named.name] = tf.make_ndarray(named.tensor)
        return outputs


def _keras_outputs(model, inputs, output_names, signature=SIGNATURE):
    """`model`'s outputs on `inputs`, keyed like the signature's outputs."""
    from tfmm.ranker import RANK_SIGNATURE, DINRanker

    if signature == RANK_SIGNATURE and isinstance(model, DINRanker):
        model = model.rank
        args = inputs
    elif isinstance(model.input, dict):
        args = inputs
    else:
        args = [inputs[x.name] for x in model.inputs]
        args = args[0] if len(args) == 1 else args
    result = model(args, training=False)
    if isinstance(result, dict):
        return {k: np.asarray(v) for k, v in result.items()}
    if len(output_names) != 1:
        raise ServingCheckError(f"the Keras model returns one tensor but the signature has "
                                f"outputs {sorted(output_names)}; return a dict named like them.")
    return {output_names[0]: np.asarray(result)}


def _max_abs_diff(a, b):
    """Largest |a - b| (inf when shapes or non-numeric values differ)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return float("inf")
    if a.dtype.kind not in "iuf" or b.dtype.kind not in "iuf":
        return 0.0 if np.array_equal(a, b) else float("inf")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0))


def check_saved_model(export_dir, inputs=None, keras_model=None, signature=SIGNATURE,
                      batch_size=4, atol=1e-5):
    """Runs `signature` of a SavedModel under TF Serving's loader and compares.

    Args:
        export_dir: a version directory or a base directory (highest version).
        inputs: ``{name: array}``; default: the version's first warmup request,
            else a batch of `batch_size` built from the signature.
        keras_model: also compare with this model called with ``training=False``.
        atol: largest absolute difference allowed per output.

    Returns:
        A report: ``path``, ``signature``, ``inputs_from``, ``inputs`` (dtype
        and shape per input), ``outputs`` (dtype, shape and ``max_abs_diff``
        against ``python`` and ``keras`` per output), ``binary``, ``seconds``.

    Raises:
        ServingCheckError: naming the directory, signature and output, with
        the C++ program's stderr when it failed to load or run the model.
    """
    start = time.time()
    path = resolve_export_dir(export_dir)
    try:
        loaded = tf.saved_model.load(path)
    except Exception as e:  # any loader failure is the check's answer
        raise ServingCheckError(f"{path}: tf.saved_model.load failed: {e}") from e
    if signature not in loaded.signatures:
        raise ServingCheckError(f"{path}: no signature {signature!r}; it has "
                                f"{sorted(loaded.signatures)}.")
    function = loaded.signatures[signature]
    specs = function.structured_input_signature[1]
    try:
        if inputs is not None:
            inputs_from = "caller"
        else:
            warmup = read_warmup(path, signature)
            inputs_from = "warmup" if warmup else "signature"
            inputs = warmup[0] if warmup else example_inputs(specs, batch_size)
        inputs = conform_inputs(specs, inputs, f"{path} signature {signature!r}")
    except ValueError as e:
        raise ServingCheckError(str(e)) from e

    exe = binary()
    served = _run_binary(exe, path, signature, inputs, specs)
    try:
        python = {k: v.numpy() for k, v in function(**inputs).items()}
    except Exception as e:  # the C++ run passed: a Python-only failure is still a failure
        raise ServingCheckError(f"{path}: signature {signature!r} ran under TF Serving's loader "
                                f"but failed in Python: {e}") from e
    others = {"python": python}
    if keras_model is not None:
        others["keras"] = _keras_outputs(keras_model, inputs, list(python), signature)
    outputs = {}
    for name, value in served.items():
        diffs = {}
        for other, values in others.items():
            if name not in values:
                raise ServingCheckError(f"{path}: output {name!r} of signature {signature!r} is "
                                        f"missing from the {other} outputs {sorted(values)}.")
            diffs[other] = _max_abs_diff(value, values[name])
            if not diffs[other] <= atol:
                raise ServingCheckError(
                    f"{path}: output {name!r} of signature {signature!r} differs between TF "
                    f"Serving's loader {list(value.shape)} and {other} "
                    f"{list(np.shape(values[name]))}: max abs diff {diffs[other]:.3g} > {atol}.")
        outputs[name] = {"dtype": value.dtype.name, "shape": list(value.shape),
                         "max_abs_diff": diffs}
    return {"path": path, "signature": signature, "inputs_from": inputs_from,
            "inputs": {k: {"dtype": specs[k].dtype.name, "shape": list(v.shape)}
                       for k, v in inputs.items()},
            "outputs": outputs, "binary": exe, "seconds": time.time() - start}


def define_flags():
    flags.DEFINE_string("signature", SIGNATURE, "The signature to run.")
    flags.DEFINE_integer("batch_size", 4, "Batch size of inputs built from the signature.")
    flags.DEFINE_float("atol", 1e-5, "Largest absolute difference allowed between outputs.")


def main(argv):
    if len(argv) < 2:
        cli.fail("usage: python -m tfmm.serving.check EXPORT_DIR [EXPORT_DIR ...]")
    failed = 0
    for export_dir in argv[1:]:
        try:
            report = check_saved_model(export_dir, signature=FLAGS.signature,
                                       batch_size=FLAGS.batch_size, atol=FLAGS.atol)
        except ServingCheckError as e:
            failed += 1
            print(f"FAIL {e}", file=sys.stderr)  # the message names the directory
            continue
        outputs = ", ".join(f"{k} {v['shape']} max abs diff {v['max_abs_diff']['python']:.3g}"
                            for k, v in report["outputs"].items())
        print(f"OK {report['path']} ({report['signature']}, inputs from "
              f"{report['inputs_from']}): {outputs}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    cli.run(main, positional=True)
