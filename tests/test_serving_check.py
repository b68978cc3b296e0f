"""SavedModels load and run under TF Serving's C++ loader, with warmup records."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from tfmm.export import WARMUP_FILE, export_saved_model, read_warmup
from tfmm.keras_compat import keras
from tfmm.layers import MAKEBlock
from tfmm.ranker import METHODS, DINRanker
from tfmm.serving.check import ServingCheckError, check_saved_model, resolve_export_dir
from tfmm.towers import image_tower, preset_text_tower, text_tower

pytestmark = pytest.mark.slow  # trains models or runs the CLIs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def serving_check_cache(tmp_path_factory):
    """One build of the C++ checker for the session (subprocesses inherit it too)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TFMM_CACHE_DIR", str(tmp_path_factory.mktemp("tfmm-cache")))
        yield


@pytest.fixture(scope="module")
def text_export(tmp_path_factory):
    tower = text_tower(["red", "mug", "pillow"], dim=4)
    base = tmp_path_factory.mktemp("text")
    return tower, export_saved_model(tower, str(base), "vector")


@pytest.fixture(scope="module")
def py_function_export(tmp_path_factory):
    """A SavedModel whose serving function calls Python: it cannot run in TF Serving."""
    class Doubler(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="x")])
        def serve(self, x):
            return {"y": tf.py_function(lambda v: v * 2.0, [x], tf.float32)}

    module = Doubler()
    base = tmp_path_factory.mktemp("py_function")
    tf.saved_model.save(module, str(base / "1"), signatures={"serving_default": module.serve})
    return str(base)


def test_text_tower_passes_with_its_warmup_request(text_export):
    tower, path = text_export
    report = check_saved_model(os.path.dirname(path), keras_model=tower)
    assert report["path"] == path and report["inputs_from"] == "warmup"
    assert report["inputs"] == {"text": {"dtype": "string", "shape": [4]}}
    assert report["outputs"]["vector"]["shape"] == [4, 4]
    assert set(report["outputs"]["vector"]["max_abs_diff"]) == {"python", "keras"}


def test_image_tower_passes_on_caller_inputs(tmp_path):
    tower = image_tower(dim=8)
    path = export_saved_model(tower, str(tmp_path), "vector")
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3))
    report = check_saved_model(path, inputs={"image": images}, keras_model=tower)
    assert report["inputs_from"] == "caller"
    assert report["inputs"]["image"] == {"dtype": "uint8", "shape": [3, 64, 64, 3]}
    assert report["outputs"]["vector"]["shape"] == [3, 8]


@pytest.mark.parametrize("save", ["resnet", "clip"])
def test_preset_image_towers_pass(tmp_path, save):
    """A tower on a saved KerasHub preset (CLIP: its vision encoder, bicubic resize and
    mean/std normalisation) runs under the C++ loader like in Keras."""
    from tests.test_pretrain import save_clip_preset, save_resnet_preset

    (save_clip_preset if save == "clip" else save_resnet_preset)(tmp_path / "preset")
    tower = image_tower(str(tmp_path / "preset"), dim=8)
    path = export_saved_model(tower, str(tmp_path / "export"), "vector")
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3))
    report = check_saved_model(path, inputs={"image": images}, keras_model=tower)
    assert report["outputs"]["vector"]["shape"] == [3, 8]


def test_preset_text_tower_needs_tensorflow_text_ops(tmp_path):
    """Why pre-training refuses to export a preset text tower: KerasHub's BPE tokenizer
    graph runs tensorflow-text's RegexSplitWithOffsets, unknown to a stock TensorFlow."""
    from tests.test_pretrain import save_clip_preset

    save_clip_preset(tmp_path / "preset")
    tower = preset_text_tower(str(tmp_path / "preset"), dim=8)
    path = export_saved_model(tower, str(tmp_path / "export"), "vector")
    with pytest.raises(ServingCheckError, match="Op type not registered 'RegexSplitWithOffsets'"):
        check_saved_model(path)


@pytest.mark.parametrize("method", METHODS)
def test_rankers_of_every_method_pass(tmp_path, method):
    vocab = {"num_items": 10, "num_users": 10, "num_categories": 5}
    make = (MAKEBlock(din={"hidden_units": (4,)}, mlp_units=(8, 4, 2, 1), return_knowledge=True)
            if "make" in method else None)
    model = DINRanker(vocab, 5, method=method, vector_dim=None if method == "id" else 4,
                         make=make, embedding_dim=4, attention_units=(4,), mlp_units=(8,))
    path = export_saved_model(model, str(tmp_path), "probability")
    report = check_saved_model(str(tmp_path), keras_model=model)
    assert report["inputs"]["history_mask"]["dtype"] == "bool"
    assert report["outputs"]["probability"]["shape"] == [4, 1]  # the warmup batch
    # The rank signature: 4 users x 4 candidates of its warmup request, under the C++ loader.
    report = check_saved_model(str(tmp_path), keras_model=model, signature="rank")
    assert report["inputs_from"] == "warmup"
    assert report["inputs"]["item_id"]["shape"] == [4, 4]
    assert report["outputs"]["probability"]["shape"] == [4, 4]
    # The same request as one row per candidate through serving_default: same probabilities.
    loaded = tf.saved_model.load(path)
    (request,) = read_warmup(path, "rank")
    b, c = request["item_id"].shape
    rows = {k: np.repeat(v, c, axis=0) if k == "user_id" or k.startswith("history")
            else v.reshape((b * c,) + v.shape[2:]) for k, v in request.items()}
    ranked = loaded.signatures["rank"](**request)["probability"].numpy()
    per_example = loaded.signatures["serving_default"](**rows)["probability"].numpy()
    assert np.abs(ranked - per_example.reshape(b, c)).max() <= 1e-5


def test_signature_built_inputs_when_there_is_no_warmup(tmp_path):
    class Affine(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x"),
                                      tf.TensorSpec([None], tf.int64, name="ids")])
        def serve(self, x, ids):
            return {"y": 2.0 * x + 1.0, "n": ids + 1}

    module = Affine()
    tf.saved_model.save(module, str(tmp_path / "2"), signatures={"serving_default": module.serve})
    report = check_saved_model(str(tmp_path), batch_size=5)
    assert report["inputs_from"] == "signature"
    assert report["outputs"]["y"]["shape"] == [5, 3]
    assert report["outputs"]["n"] == {"dtype": "int64", "shape": [5],
                                      "max_abs_diff": {"python": 0.0}}


def test_py_function_fails_naming_the_op(py_function_export):
    with pytest.raises(ServingCheckError, match=r"(?s)TF Serving's loader.*exited with 4: "
                                                r"running signature 'serving_default' failed"
                                                r".*EagerPyFunc"):
        check_saved_model(py_function_export)


def test_keras_model_that_answers_otherwise_fails(text_export):
    _, path = text_export
    keras.utils.set_random_seed(1)  # not the export's draw: every test starts from seed 0
    other = text_tower(["red", "mug", "pillow"], dim=4)
    with pytest.raises(ServingCheckError, match=r"output 'vector' .* and keras .*max abs diff"):
        check_saved_model(path, keras_model=other)


def test_bad_inputs_and_directories(tmp_path, text_export):
    _, path = text_export
    with pytest.raises(ServingCheckError, match=r"missing \['text'\], unknown \['txt'\]"):
        check_saved_model(path, inputs={"txt": ["red"]})
    with pytest.raises(ServingCheckError, match=r"input 'text' is float64, .* wants string"):
        check_saved_model(path, inputs={"text": [1.5]})
    with pytest.raises(ServingCheckError, match=r"no signature 'predict'; it has"):
        check_saved_model(path, signature="predict")
    with pytest.raises(ServingCheckError, match=r"no SavedModel"):
        check_saved_model(str(tmp_path))
    with pytest.raises(ServingCheckError, match=r"missing: no such directory"):
        check_saved_model(str(tmp_path / "missing"))


def test_the_highest_version_is_checked(tmp_path):
    for version in ("1", "3", "notes"):
        (tmp_path / version).mkdir()
        (tmp_path / version / "saved_model.pb").write_bytes(b"")
    (tmp_path / "20.tmp").mkdir()
    assert resolve_export_dir(str(tmp_path)) == str(tmp_path / "3")
    assert resolve_export_dir(str(tmp_path / "1")) == str(tmp_path / "1")
    (tmp_path / "7").mkdir()  # what TF Serving would try to load next
    with pytest.raises(ServingCheckError, match=r"7: the highest version has no saved_model.pb"):
        resolve_export_dir(str(tmp_path))


def test_warmup_records_match_the_signature_and_replay(tmp_path):
    vocab = {"num_items": 10, "num_users": 10, "num_categories": 5}
    model = DINRanker(vocab, 5, method="simtier", vector_dim=4, embedding_dim=4,
                         attention_units=(4,), mlp_units=(8,))
    path = export_saved_model(model, str(tmp_path), "probability")
    serve = tf.saved_model.load(path).signatures["serving_default"]
    specs = serve.structured_input_signature[1]
    records = [prediction_log_pb2.PredictionLog.FromString(r.numpy())
               for r in tf.data.TFRecordDataset(os.path.join(path, WARMUP_FILE))]
    assert len(records) == 2  # serving_default, then rank
    assert records[1].predict_log.request.model_spec.signature_name == "rank"
    request = records[0].predict_log.request
    assert request.model_spec.signature_name == "serving_default"
    assert set(request.inputs) == set(specs) == set(model.input)
    for name, spec in specs.items():
        assert request.inputs[name].dtype == spec.dtype.as_datatype_enum, name
        assert spec.shape.is_compatible_with(tf.make_ndarray(request.inputs[name]).shape), name
    replayed, _ = read_warmup(path)
    assert read_warmup(path, "serving_default")[0].keys() == replayed.keys()
    probability = serve(**replayed)["probability"].numpy()
    np.testing.assert_allclose(probability, model(replayed, training=False).numpy(), atol=1e-6)
    assert ((probability > 0) & (probability < 1)).all()


def test_real_warmup_inputs_are_written(tmp_path):
    tower = text_tower(["red", "mug"], dim=4)
    path = export_saved_model(tower, str(tmp_path), "vector",
                              warmup_inputs={"text": ["red mug", "a blue mug"]})
    (request,) = read_warmup(path)
    assert request["text"].tolist() == [b"red mug", b"a blue mug"]


def _cli(*dirs):
    return subprocess.run([sys.executable, "-m", "tfmm.serving.check", *dirs], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def ranker_export(tmp_path_factory):
    vocab = {"num_items": 10, "num_users": 10, "num_categories": 5}
    model = DINRanker(vocab, 5, method="simtier", vector_dim=4, embedding_dim=4,
                         attention_units=(4,), mlp_units=(8,))
    base = tmp_path_factory.mktemp("ranker")
    export_saved_model(model, str(base), "probability")
    return str(base)


def test_cli(tmp_path, text_export, py_function_export, ranker_export):
    _, path = text_export
    ok = _cli(os.path.dirname(path))
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert f"OK {path} (serving_default, inputs from warmup): vector [4, 4]" in ok.stdout
    bad = _cli(py_function_export, str(tmp_path))
    assert bad.returncode != 0
    assert f"FAIL {py_function_export}/1: TF Serving's loader" in bad.stderr
    assert "No OpKernel was registered to support Op 'EagerPyFunc'" in bad.stderr
    assert f"FAIL {tmp_path}: no SavedModel" in bad.stderr
    ranked = _cli("--signature=rank", ranker_export)
    assert ranked.returncode == 0, ranked.stderr[-3000:]
    assert f"OK {ranker_export}/1 (rank, inputs from warmup): probability [4, 4]" in ranked.stdout
    usage = _cli()
    assert usage.returncode != 0 and "usage: python -m tfmm.serving.check" in usage.stderr
