"""`models optimize`: a Keras entry made here converted to TFLite, ONNX and mixed bfloat16; the new entry's vectors
match the source's to 1e-5 or to the quantisation step, it has its own fingerprint and a [measured] table;
bad requests are one line and exit code 2."""

import tomllib

import numpy as np
import pytest

from conftest import small_image_model
from extractor.cli import main
from extractor.errors import InvalidInputError
from extractor.models import ModelRepository, load_backbone
from extractor.models.optimize import optimize_entry, vector_deviation
from extractor.models.preprocessing import PRESETS

SIDE = 16
MEASURED_KEYS = {"source", "source_fingerprint", "quantization", "sample", "sample_images", "images_per_second",
                 "source_images_per_second", "speedup", "max_abs_deviation", "min_cosine"}


def _images(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """The small model with a dense 'embedding' of 2,048 weights: enough for the TFLite converter to
    quantize them (it leaves tensors under 1,024 elements in float)."""
    path = tmp_path_factory.mktemp("optimize") / "model.keras"
    small_image_model(SIDE, 32, embedding_units=64).save(path)
    return path


@pytest.fixture(scope="module")
def repository(model_file, tmp_path_factory):
    repository = ModelRepository(tmp_path_factory.mktemp("repository"))
    repository.add("mine", model_file, cut="embedding", preprocessing=PRESETS["unit"])
    return repository


def _vectors(spec, images):
    return load_backbone(spec).embed(images)


def _config(spec) -> dict:
    with open(f"{spec.config.folder}/config.toml", "rb") as file:
        return tomllib.load(file)


@pytest.mark.parametrize("runtime", ["tflite", "onnx"])
def test_an_exact_conversion_gives_the_source_vectors_under_its_own_fingerprint(repository, runtime):
    source = repository.spec("mine")
    result = optimize_entry(repository, "mine", runtime=runtime, images=_images(), sample="test images", rounds=1)
    spec = result.spec
    assert spec.name == f"mine_{runtime}_fp32" and spec.runtime == runtime and spec.config.output_dim == 64
    assert spec.preprocessing == source.preprocessing and spec.fingerprint != source.fingerprint
    images = _images(4, seed=1)
    np.testing.assert_allclose(_vectors(spec, images), _vectors(source, images), rtol=1e-5, atol=1e-5)
    measured = _config(spec)["measured"]
    assert set(measured) == MEASURED_KEYS
    assert measured["source"] == "mine" and measured["source_fingerprint"] == source.fingerprint
    assert measured["quantization"] == "none" and measured["sample"] == "test images"
    assert measured["sample_images"] == 6 and measured["max_abs_deviation"] <= 1e-5
    assert measured["min_cosine"] > 1 - 1e-6 and measured["images_per_second"] > 0 and measured["speedup"] > 0
    assert repository.spec(spec.name).config.measured == measured  # the schema accepts what was written


def test_dynamic_int8_stays_within_the_quantisation_step(repository):
    """Dynamic-range int8 quantizes each weight column to 127 steps of its largest magnitude, and each row
    of activations to 255 steps of its range: the error of a dot product is bounded by both half-steps."""
    import keras

    source = repository.spec("mine")
    spec = optimize_entry(repository, "mine", runtime="tflite", quantize="dynamic-int8", new_name="mine-int8",
                          sample_images=4, rounds=1).spec
    images = _images(8, seed=2)
    exact, quantized = _vectors(source, images), _vectors(spec, images)
    model = keras.models.load_model(source.path)
    gap = keras.Model(model.inputs, model.get_layer("gap").output).predict(np.stack(images) / np.float32(255),
                                                                            verbose=0)
    weights = model.get_layer("embedding").get_weights()[0]  # (32, 64)
    weight_step = np.abs(weights).max(axis=0) / 127
    activation_step = (np.maximum(gap.max(axis=1), 0) - np.minimum(gap.min(axis=1), 0)) / 255
    bound = (np.abs(gap).sum(axis=1, keepdims=True) * weight_step / 2
             + activation_step[:, None] * np.abs(weights).sum(axis=0) / 2
             + activation_step[:, None] * weight_step * len(weights) / 4)
    error = np.abs(quantized - exact)
    assert error.max() > 1e-6  # the weights really are int8
    assert (error <= bound + 1e-6).all()
    measured = _config(spec)["measured"]
    assert measured["quantization"] == "dynamic-int8" and measured["sample"] == "random"
    assert spec.fingerprint != source.fingerprint


def test_mixed_bfloat16_keras_is_close_to_float32(repository):
    source = repository.spec("mine")
    spec = optimize_entry(repository, "mine", runtime="keras", sample_images=4, rounds=1).spec
    assert spec.name == "mine_bf16" and spec.runtime == "keras"
    images = _images(8, seed=3)
    exact, mixed = _vectors(source, images), _vectors(spec, images)
    assert mixed.dtype == np.float32
    max_abs, min_cosine = vector_deviation(exact, mixed)
    assert 0 < max_abs <= 2**-7 * np.abs(exact).max() * 4  # a few bfloat16 roundings (8-bit mantissa)
    assert min_cosine > 0.999


def test_vector_deviation():
    a = np.array([[1.0, 0.0], [0.0, 0.0], [3.0, 4.0]], dtype=np.float32)
    b = np.array([[0.0, 1.0], [0.0, 0.0], [3.0, 4.5]], dtype=np.float32)
    max_abs, min_cosine = vector_deviation(a, b)
    assert max_abs == 1.0 and min_cosine == 0.0
    assert vector_deviation(a, a) == (0.0, pytest.approx(1.0))


def test_the_command_line_optimizes_and_shows_the_measurement(model_file, tmp_path, capsys):
    repo = str(tmp_path / "repo")
    assert main(["models", "add", "mine", "--file", str(model_file), "--cut", "embedding", "--recipe", "unit",
                 "--model-repository", repo]) == 0
    capsys.readouterr()
    assert main(["models", "optimize", "mine", "--runtime", "tflite", "--as", "fast", "--images", "4",
                 "--model-repository", repo]) == 0
    out = capsys.readouterr().out
    assert "added fast: tflite (none) from mine, 64-d" in out and "min cosine" in out
    assert main(["models", "show", "fast", "--model-repository", repo]) == 0
    shown = capsys.readouterr().out
    assert '"speedup"' in shown and '"source": "mine"' in shown


@pytest.mark.parametrize("argv, message", [
    (["models", "optimize", "mobilenet_v1", "--runtime", "tflite"],
     "models optimize converts Keras entries; mobilenet_v1 is a tflite entry"),
    (["models", "optimize", "mine", "--runtime", "tensorrt"], "unknown optimize runtime 'tensorrt'; known: keras"),
    (["models", "optimize", "mine", "--runtime", "onnx", "--quantize", "float16"],
     "--quantize float16 does not apply to the onnx runtime"),
    (["models", "optimize", "mine", "--runtime", "tflite", "--as", "mine"], "'mine' exists already"),
    (["models", "optimize", "nope", "--runtime", "tflite"], "unknown model 'nope'"),
])
def test_bad_requests_are_one_line_and_exit_2(repository, caplog, argv, message):
    assert main(argv + ["--model-repository", str(repository.folder)]) == 2
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and message in errors[0].getMessage() and not errors[0].exc_info


def test_nothing_is_left_behind_when_the_request_is_refused(repository):
    before = repository.names()
    with pytest.raises(InvalidInputError):
        optimize_entry(repository, "mine", runtime="tflite", images=[])
    assert repository.names() == before
