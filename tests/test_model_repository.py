"""Bring your own model: Keras (.keras, .h5), SavedModel, TFLite and ONNX files made here, added, cut and
embedded; each entry's vectors equal a direct call of the model at the cut; bad entries are clear errors."""

import dataclasses

import numpy as np
import pytest

from conftest import small_image_model
from extractor.cli import main
from extractor.errors import ChecksumError, InvalidInputError
from extractor.models import ModelRepository, load_backbone
from extractor.models.preprocessing import PRESETS

SIDE = 16


def _images(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8) for _ in range(n)]


def _unit(images):
    return np.stack(images).astype(np.float32) / np.float32(255)


@pytest.fixture(scope="module")
def keras_model():
    """A small functional image model: conv (6 filters) -> relu -> global average pool -> dense logits."""
    return small_image_model(SIDE, 6)


@pytest.fixture(scope="module")
def files(keras_model, tmp_path_factory):
    """The same model as a .keras file, an .h5 file, a SavedModel folder and a TFLite file."""
    import tensorflow as tf

    folder = tmp_path_factory.mktemp("models")
    keras_model.save(folder / "model.keras")
    keras_model.save(folder / "model.h5")
    keras_model.export(str(folder / "saved"), verbose=False)
    converter = tf.lite.TFLiteConverter.from_saved_model(str(folder / "saved"))
    (folder / "model.tflite").write_bytes(converter.convert())
    return folder


@pytest.fixture
def repository(tmp_path):
    return ModelRepository(tmp_path / "repository")


def _cut_output(keras_model, layer, images):
    import keras

    return keras.Model(keras_model.inputs, keras_model.get_layer(layer).output).predict(_unit(images), verbose=0)


@pytest.mark.parametrize("file", ["model.keras", "model.h5"])
def test_keras_entry_equals_the_model_at_the_cut(keras_model, files, repository, file):
    spec = repository.add("mine", files / file, cut="gap", preprocessing=PRESETS["unit"])
    assert spec.runtime == "keras" and spec.pooling == "none" and spec.config.output_dim == 6
    images = _images()
    np.testing.assert_allclose(load_backbone(spec).embed(images), _cut_output(keras_model, "gap", images),
                               rtol=1e-5, atol=1e-5)


def test_a_feature_map_cut_is_pooled_and_the_default_is_average(keras_model, files, repository):
    images = _images()
    relu = _cut_output(keras_model, "relu", images)  # (n, 14, 14, 6)
    pooled = repository.add("avg", files / "model.keras", cut="relu", preprocessing=PRESETS["unit"])
    assert pooled.pooling == "avg"
    np.testing.assert_allclose(load_backbone(pooled).embed(images), relu.mean(axis=(1, 2)), rtol=1e-5, atol=1e-5)
    flat = repository.spec("avg", pooling="flatten")
    np.testing.assert_allclose(load_backbone(flat).embed(images), relu.reshape(len(images), -1), rtol=1e-5,
                               atol=1e-5)
    biggest = repository.spec("avg", pooling="max")
    np.testing.assert_allclose(load_backbone(biggest).embed(images), relu.max(axis=(1, 2)), rtol=1e-5, atol=1e-5)


def test_savedmodel_entry_equals_the_signature_output(keras_model, files, repository):
    spec = repository.add("saved", files / "saved", preprocessing=PRESETS["unit"])
    assert spec.runtime == "savedmodel" and spec.config.output_dim == 5
    images = _images()
    np.testing.assert_allclose(load_backbone(spec).embed(images), keras_model.predict(_unit(images), verbose=0),
                               rtol=1e-5, atol=1e-5)


def test_tflite_entry_at_an_output_and_at_an_intermediate_tensor(keras_model, files, repository):
    from extractor.models.runtimes import inspect_model

    images = _images()
    out = repository.add("lite", files / "model.tflite", preprocessing=PRESETS["unit"])
    np.testing.assert_allclose(load_backbone(out).embed(images), keras_model.predict(_unit(images), verbose=0),
                               rtol=1e-4, atol=1e-4)
    names = inspect_model("tflite", str(files / "model.tflite")).names
    mean_tensor = next(n for n in names if n.endswith("gap_1/Mean"))  # the pooled features, inside the graph
    inner = repository.add("lite-gap", files / "model.tflite", cut=mean_tensor, preprocessing=PRESETS["unit"])
    np.testing.assert_allclose(load_backbone(inner).embed(images), _cut_output(keras_model, "gap", images),
                               rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    """An NCHW ONNX graph made with the onnx helpers: Conv -> Relu (node output 'features') -> GlobalAveragePool."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    weight = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w"], ["conv"]), helper.make_node("Relu", ["conv"], ["features"]),
         helper.make_node("GlobalAveragePool", ["features"], ["pooled"])],
        "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 3, SIDE, SIDE])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, [None, 4, 1, 1])],
        initializer=[numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    onnx.save(model, path)
    return path, weight


def test_onnx_entry_cut_at_an_inner_node_output(onnx_file, repository):
    path, weight = onnx_file
    images = _images()
    x = _unit(images)  # (n, H, W, 3); the direct computation of Conv (valid) + Relu in numpy
    windows = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(1, 2))  # (n, 14, 14, 3, 3, 3)
    features = np.maximum(np.einsum("nhwcij,ocij->nhwo", windows, weight), 0)
    spec = repository.add("onnx-features", path, cut="features", preprocessing=PRESETS["unit"])
    assert spec.config.layout == "nchw" and spec.pooling == "avg"
    np.testing.assert_allclose(load_backbone(spec).embed(images), features.mean(axis=(1, 2)), rtol=1e-4,
                               atol=1e-5)
    whole = repository.add("onnx-pooled", path, pooling="flatten", preprocessing=PRESETS["unit"])
    np.testing.assert_allclose(load_backbone(whole).embed(images), features.mean(axis=(1, 2)), rtol=1e-4,
                               atol=1e-5)


def test_keys_change_with_file_cut_and_preprocessing(files, repository):
    base = repository.add("a", files / "model.keras", cut="gap", preprocessing=PRESETS["unit"])
    other_cut = repository.add("b", files / "model.keras", cut="logits", preprocessing=PRESETS["unit"])
    other_file = repository.add("c", files / "model.tflite", preprocessing=PRESETS["unit"])
    other_preprocessing = repository.spec("a", recipe="tf")
    renamed = repository.add("d", files / "model.keras", cut="gap", preprocessing=PRESETS["unit"])
    fingerprints = {s.fingerprint for s in (base, other_cut, other_file, other_preprocessing)}
    assert len(fingerprints) == 4
    assert renamed.fingerprint == base.fingerprint  # content-addressed: the name is not part of it


def test_added_entries_are_listed_and_removed(files, repository):
    repository.add("mine", files / "model.keras", cut="gap", preprocessing=PRESETS["unit"])
    assert "mine" in repository.names() and "vgg16" in repository.names()  # the shipped ones too
    assert (repository.folder / "mine" / "model.keras").is_file()
    repository.remove("mine")
    assert "mine" not in repository.names()
    with pytest.raises(InvalidInputError, match="shipped"):
        repository.remove("vgg16")


def test_a_changed_file_is_refused_before_loading(files, repository, tmp_path):
    spec = repository.add("mine", files / "model.keras", cut="gap", preprocessing=PRESETS["unit"])
    changed = dataclasses.replace(spec, sha256="0" * 64)
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        load_backbone(changed)


@pytest.mark.parametrize("options, message", [
    ({"cut": "gapp"}, "has no layer or tensor 'gapp'; closest: gap"),
    ({"cut": "relu", "pooling": "none"}, "not (n, d): choose pooling flatten, avg or max"),
    ({"input_size": 32}, "takes only input size 16"),
])
def test_bad_additions_are_clear_and_leave_nothing(files, repository, options, message):
    with pytest.raises(InvalidInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        repository.add("bad", files / "model.keras", preprocessing=PRESETS["unit"], **options)
    assert "bad" not in repository.names()
    assert not [p for p in repository.folder.iterdir() if p.name.startswith(".")] if repository.folder.exists() \
        else True


def test_a_model_giving_nan_is_refused(tmp_path, repository):
    import keras

    inputs = keras.Input((SIDE, SIDE, 3))
    outputs = keras.layers.Flatten()(keras.layers.Rescaling(float("nan"))(inputs))
    keras.Model(inputs, outputs).save(tmp_path / "nan.keras")
    with pytest.raises(InvalidInputError, match="NaN"):
        repository.add("nan", tmp_path / "nan.keras", preprocessing=PRESETS["unit"])


def _entry(repository_folder, name, text):
    folder = repository_folder / name
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(text)
    return folder


@pytest.mark.parametrize("text, message", [
    ('runtime = "keras"\nfile = "m.keras"\ncolour = "red"\n[input]\nsize = 16\n', "unknown key 'colour'"),
    ('runtime = "keras"\nfile = "m.keras"\n[input]\nsize = "16"\n', "key 'size' in [input] must be int"),
    ('runtime = "pytorch"\nfile = "m.pt"\n[input]\nsize = 16\n', "runtime 'pytorch' is not one of"),
    ('runtime = "keras"\nfile = "m.keras"\n[input]\nsize = 16\n[preprocessing]\npreset = "x"\n',
     "unknown preprocessing preset 'x'"),
    ('runtime = "keras"\nfile = "m.keras"\n', "missing key 'size' in [input]"),
    ('runtime = "keras\n', "not valid TOML"),
])
def test_bad_configs_name_the_file_and_the_key(tmp_path, text, message):
    folder = _entry(tmp_path / "repo", "broken", text)
    with pytest.raises(InvalidInputError) as info:
        ModelRepository(tmp_path / "repo").spec("broken")
    assert str(folder / "config.toml") in str(info.value) and message in str(info.value)


def test_a_folder_without_config_and_two_entries_with_one_name(tmp_path):
    (tmp_path / "repo" / "empty").mkdir(parents=True)
    with pytest.raises(InvalidInputError, match="no config.toml"):
        ModelRepository(tmp_path / "repo").spec("empty")
    _entry(tmp_path / "repo", "vgg16", 'runtime = "keras"\nfile = "m.keras"\n[input]\nsize = 16\n')
    with pytest.raises(InvalidInputError, match="two models named 'vgg16'"):
        ModelRepository(tmp_path / "repo").names()


def test_the_command_line_adds_shows_checks_embeds_and_removes(files, tmp_path, capsys):
    repo = str(tmp_path / "repo")
    assert main(["models", "add", "mine", "--file", str(files / "model.keras"), "--cut", "gap", "--recipe", "unit",
                 "--model-repository", repo]) == 0
    assert "added mine: keras, cut gap" in capsys.readouterr().out
    assert main(["models", "list", "--model-repository", repo]) == 0
    assert "mine" in capsys.readouterr().out
    assert main(["models", "show", "mine", "--model-repository", repo]) == 0
    shown = capsys.readouterr().out
    assert "> gap" in shown and "relu" in shown  # the layers around the cut
    assert main(["models", "check", "mine", "--images", "8", "--model-repository", repo]) == 0
    assert "output (8, 6) float32" in capsys.readouterr().out
    store = str(tmp_path / "store.sqlite")
    np.savez(tmp_path / "d.npz", x=np.stack(_images(6)), y=np.arange(6) % 2)
    assert main(["embed", "--backbone", "mine", "--model-repository", repo, "--data", f"npz:{tmp_path / 'd.npz'}",
                 "--feature-set", "mine-set", "--store", store, "--no-progress"]) == 0
    assert "6" in capsys.readouterr().out
    assert main(["models", "remove", "mine", "--model-repository", repo]) == 0


@pytest.mark.parametrize("argv, message", [
    (["models", "add", "x", "--file", "nowhere.keras"], "file not found"),
    (["models", "add", "x", "--file", "{files}/model.keras", "--cut", "nope"], "closest:"),
    (["models", "add", "vgg16", "--file", "{files}/model.keras"], "exists already"),
    (["models", "show", "nope"], "unknown model 'nope'"),
])
def test_command_line_errors_are_one_line_and_exit_2(files, tmp_path, caplog, argv, message):
    argv = [a.replace("{files}", str(files)) for a in argv] + ["--model-repository", str(tmp_path / "repo")]
    assert main(argv) == 2
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and message in errors[0].getMessage() and not errors[0].exc_info
