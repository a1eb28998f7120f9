"""One deployable model: a saved head exported with its backbone runs on uint8 pixels in plain Keras, TF
Serving's SavedModel, TFLite and ONNX Runtime, giving the probabilities the project gives (embed, then
the head, as the service's Classify does); `models add` takes the Keras file back."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from classifiers import cli as classifiers_cli
from classifiers.persistence import load_head
from conftest import random_images
from extractor import api
from extractor.models import PRESETS, ModelRepository, load_backbone

# Runs in a clean interpreter from an empty folder: each format's own runtime, and a check that nothing of
# this project was imported.
RUN_EXPORTED = textwrap.dedent("""
    import json, sys
    import numpy as np
    pixels = np.load(sys.argv[1])
    out = []
    for fmt, path in zip(sys.argv[2::2], sys.argv[3::2]):
        if fmt == "keras":
            import keras
            probabilities = keras.models.load_model(path).predict(pixels, verbose=0)
        elif fmt == "savedmodel":
            import tensorflow as tf
            loaded = tf.saved_model.load(path)  # held: its variables go with it
            probabilities = loaded.serve(tf.constant(pixels)).numpy()
        elif fmt == "tflite":
            import tensorflow as tf
            interpreter = tf.lite.Interpreter(model_path=path)
            given = interpreter.get_input_details()[0]
            interpreter.resize_tensor_input(given["index"], pixels.shape)
            interpreter.allocate_tensors()
            interpreter.set_tensor(given["index"], pixels)
            interpreter.invoke()
            probabilities = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
        else:
            import onnxruntime
            session = onnxruntime.InferenceSession(path)
            probabilities = session.run(None, {session.get_inputs()[0].name: pixels})[0]
        out.append(np.asarray(probabilities).tolist())
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("classifiers", "extractor", "protos"))
    print(json.dumps({"probabilities": out, "project_modules": leaked}))
""")
# Float32 end to end. Keras and the SavedModel run TensorFlow's kernels as the project does; TFLite (XNNPACK)
# and ONNX Runtime order the backbone's sums their own way, and a logistic regression on standardised
# features (weights up to 1/sigma) magnifies that: measured 1.8e-5 (TFLite), 1.1e-5 (ONNX) on VGG16.
TOLERANCE = {"keras": 1e-5, "savedmodel": 1e-5, "tflite": 1e-4, "onnx": 1e-4}


@pytest.fixture(scope="module")
def saved_heads(spec, tmp_path_factory):
    """Two heads trained through the command line on VGG16 vectors of 24 random 32x32 images: a Keras head
    with dropout and a logistic regression; the images and what the project predicts for them."""
    folder = tmp_path_factory.mktemp("deploy")
    images = np.stack(random_images(24, seed=7))
    store = str(folder / "store.sqlite")
    api.embed_to_store(images, spec, "train", labels=["cat", "dog", "owl"] * 8, store=store)
    heads = {}
    for head, params in (("dropout-mlp512-tanh-dropout", ["--epochs", "3"]), ("logreg", [])):
        assert classifiers_cli.main(["--store", store, "train", "--train-set", "train", "--head", head,
                                     "--out", str(folder / head), *params]) == 0
        path = next(folder.glob(f"{head}.*[!n]"))  # the model file, not its .json sidecar
        vectors = load_backbone(spec).embed(list(images))
        heads[head] = (path, load_head(path).predict_proba(vectors))
    np.save(folder / "pixels.npy", images)
    return folder, images, heads


def run_exported(exports: list[tuple[str, str]], pixels_file, cwd) -> list[np.ndarray]:
    """The probabilities of every exported (format, path), computed in one clean interpreter."""
    arguments = [str(part) for export in exports for part in export]
    run = subprocess.run([sys.executable, "-I", "-c", RUN_EXPORTED, str(pixels_file), *arguments], cwd=cwd,
                         capture_output=True, text=True, timeout=600,
                         env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin", "HOME": str(cwd)})
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["project_modules"] == []
    return [np.array(probabilities, np.float32) for probabilities in result["probabilities"]]


def check_formats(saved_heads, tmp_path, formats):
    folder, images, heads = saved_heads
    exports, expectations = [], []
    for head, (path, expected) in heads.items():
        for fmt in formats:
            out = tmp_path / f"{head}-{fmt}"
            assert classifiers_cli.main(["export", "--head", str(path), "--out", str(out), "--format", fmt]) == 0
            exports.append((fmt, out if fmt == "savedmodel" else out.with_name(f"{out.name}.{fmt}")))
            expectations.append((f"{head} as {fmt}", expected, TOLERANCE[fmt]))
    for probabilities, (what, expected, tolerance) in zip(run_exported(exports, folder / "pixels.npy", tmp_path),
                                                          expectations, strict=True):
        np.testing.assert_allclose(probabilities, expected, rtol=0, atol=tolerance, err_msg=what)


def test_keras_exports_give_the_projects_probabilities_in_plain_keras(saved_heads, tmp_path):
    check_formats(saved_heads, tmp_path, ["keras"])


@pytest.mark.slow  # converting VGG16 takes 5 s (SavedModel) to 30 s (ONNX) a head, and each runtime starts up
def test_savedmodel_tflite_and_onnx_exports_give_the_projects_probabilities(saved_heads, tmp_path):
    check_formats(saved_heads, tmp_path, ["savedmodel", "tflite", "onnx"])


def test_models_add_takes_an_exported_model_back(saved_heads, tmp_path):
    folder, images, heads = saved_heads
    path, expected = heads["dropout-mlp512-tanh-dropout"]
    assert classifiers_cli.main(["export", "--head", str(path), "--out", str(tmp_path / "classifier")]) == 0
    entry = ModelRepository(tmp_path / "repository").add("classifier", tmp_path / "classifier.keras",
                                                         preprocessing=PRESETS["uint8"])
    assert entry.config.output_dim == 3
    np.testing.assert_allclose(load_backbone(entry).embed(list(images)), expected, rtol=0, atol=1e-5)


def test_heads_that_cannot_be_exported_say_why(spec, tmp_path, caplog):
    store = str(tmp_path / "s.sqlite")
    api.import_vectors(np.random.default_rng(0).normal(size=(12, 4)), "elsewhere", labels=[0, 1] * 6, store=store)
    assert classifiers_cli.main(["--store", store, "train", "--train-set", "elsewhere", "--head", "knn",
                                 "--out", str(tmp_path / "knn")]) == 0
    assert classifiers_cli.main(["export", "--head", str(tmp_path / "knn.skops"), "--out", str(tmp_path / "x")]) == 2
    assert "trained on vectors made elsewhere" in caplog.text
