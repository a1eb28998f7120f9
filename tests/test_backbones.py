"""The shipped model repository: errors, fingerprints, checksums, and real weights giving the right vectors."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from extractor.errors import ChecksumError, InvalidInputError, UnknownNameError
from extractor.models import backbone_names, get_backbone_spec, load_backbone

SHIPPED = ("vgg16", "mnist_cnn", "squeezenet", "mobilenet_v1", "efficientnet_lite0", "efficientnet_lite2",
           "efficientnet_lite0_tflite", "mobilenet_edgetpu")
# The first CIFAR-10 test image through each shipped entry: (first four values, L2 norm).
KNOWN_VECTORS = {
    "vgg16": ([0.8382, 0.0, 0.74, 0.0], 11.8010),
    "squeezenet": ([0.1282, 0.0, 1.4377, 0.0], 67.1374),
    "mobilenet_v1": ([1.7411, 0.8706, 0.1647, 1.0353], 30.1237),
    "efficientnet_lite0": ([0.1713, 0.3365, 0.1117, 2.8714], 19.3139),
    "efficientnet_lite2": ([0.2144, 0.0, 0.0084, 0.0406], 14.9661),
    "efficientnet_lite0_tflite": ([0.1683, 0.3385, 0.1089, 2.8792], 19.2977),
    "mobilenet_edgetpu": ([0.1706, 0.0, 0.0, 1.8762], 29.2881),
}


def test_unknown_backbone_lists_known_names():
    with pytest.raises(UnknownNameError) as info:
        get_backbone_spec("resnet50")
    assert "resnet50" in str(info.value)
    assert all(name in str(info.value) for name in ("vgg16", "mnist_cnn", "squeezenet", "mobilenet_v1"))


def test_bad_options_are_clear_errors():
    with pytest.raises(UnknownNameError, match="preprocessing preset"):
        get_backbone_spec("vgg16", recipe="imagenet")
    with pytest.raises(InvalidInputError, match="input size"):
        get_backbone_spec("vgg16", input_size=16)
    with pytest.raises(InvalidInputError, match="only input size 224"):
        get_backbone_spec("mobilenet_v1", input_size=96)


def test_fingerprint_changes_with_everything_that_changes_vectors():
    base = get_backbone_spec("vgg16")
    variants = [
        get_backbone_spec("vgg16", recipe="caffe"),
        get_backbone_spec("vgg16", input_size=64),
        get_backbone_spec("vgg16", pooling="avg"),
        dataclasses.replace(base, sha256="ab" * 32),
        get_backbone_spec("squeezenet"),
    ]
    fingerprints = {base.fingerprint, *(v.fingerprint for v in variants)}
    assert len(fingerprints) == 1 + len(variants)
    assert get_backbone_spec("vgg16").fingerprint == base.fingerprint  # and is stable


def test_output_widths():
    assert get_backbone_spec("vgg16").output_dim == 512 and get_backbone_spec("mobilenet_v1").output_dim == 1024
    other = get_backbone_spec("vgg16", input_size=64)
    assert other.output_dim is None and load_backbone(other).output_dim == 2048  # measured by building
    assert load_backbone(get_backbone_spec("vgg16", input_size=224, pooling="avg")).output_dim == 512


def test_sha256_mismatch_is_refused():
    spec = dataclasses.replace(get_backbone_spec("vgg16", input_size=48), sha256="0" * 64)
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        load_backbone(spec)


def test_vgg16_golden_vector_equals_plain_keras(data_dir):
    import keras

    spec = get_backbone_spec("vgg16")
    backbone = load_backbone(spec)
    images = [np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8) for i in range(3)]
    ours = backbone.embed(images)
    plain = keras.applications.VGG16(include_top=False, weights=spec.path, input_shape=(32, 32, 3))
    expected = plain.predict(np.stack(images).astype("float32") / 255, verbose=0).reshape(3, -1)
    assert ours.shape == (3, 512) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
    assert load_backbone(spec) is backbone  # built once per process


def test_backbones_command_prints_json():
    out = subprocess.run([sys.executable, "-m", "extractor", "backbones", "--json"], capture_output=True,
                         text=True, check=True).stdout
    entries = {e["name"]: e for e in json.loads(out)}
    assert set(entries) == set(backbone_names()) >= set(SHIPPED)
    for entry in entries.values():
        assert {"name", "output_dim", "input_size", "runtime", "cut", "fingerprint"} <= set(entry)
    assert entries["vgg16"]["output_dim"] == 512 and entries["vgg16"]["preprocessing"] == "lecture"
    assert len(entries["vgg16"]["fingerprint"]) == 64
    assert entries["mnist_cnn"]["fingerprint"] is None or len(entries["mnist_cnn"]["fingerprint"]) == 64


def test_efficientnet_lite0_keras_and_tflite_entries_agree(data_dir):
    """One network in two runtimes: the Keras file normalises in its preprocessing ("lite"), the TFLite file
    inside the graph ("raw" pixels in); the vectors agree, so both preprocessings are the right ones."""
    from extractor.datasets import open_dataset

    images = next(open_dataset("cifar10:test").batches(3)).images
    keras_vectors = load_backbone(get_backbone_spec("efficientnet_lite0")).embed(images)
    tflite_vectors = load_backbone(get_backbone_spec("efficientnet_lite0_tflite")).embed(images)
    assert keras_vectors.shape == tflite_vectors.shape == (3, 1280)
    cosine = (keras_vectors * tflite_vectors).sum(1) / np.linalg.norm(keras_vectors, axis=1) / np.linalg.norm(
        tflite_vectors, axis=1)
    assert cosine.min() >= 0.9999, cosine
    assert not np.allclose(keras_vectors[0], keras_vectors[1])


def test_mnist_cnn_pretrained_and_cut_after_flatten():
    from extractor.pretrain import pretrain_mnist_cnn

    path, meta = pretrain_mnist_cnn(epochs=1)  # the lecture's 15 epochs run in `make run`
    spec = get_backbone_spec("mnist_cnn")
    assert spec.sha256 == meta["sha256"] and meta["test_accuracy_even_digits"] > 0.9
    assert pretrain_mnist_cnn(epochs=1)[1]["sha256"] == meta["sha256"]  # reused, not retrained
    vectors = load_backbone(spec).embed([np.zeros((28, 28, 1), np.uint8), np.full((28, 28, 1), 255, np.uint8)])
    assert vectors.shape == (2, 1600) and np.isfinite(vectors).all()
    assert (vectors >= 0).all()  # ReLU then max pooling: the Dropout after Flatten is not in the backbone


def _probe_accuracy(features_train, y_train, features_test, y_test):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return probe.fit(features_train, y_train).score(features_test, y_test)


@pytest.mark.parametrize("per_class, n_test", [
    (20, 400),
    pytest.param(100, 2000, marks=pytest.mark.slow),
])
def test_pretrained_weights_are_really_used(per_class, n_test):
    """A linear probe on ImageNet VGG16 features beats the same probe on a randomly initialised VGG16."""
    import keras

    from extractor.datasets import open_dataset

    train = open_dataset(f"cifar10:small?per_class={per_class}")
    test = open_dataset("cifar10:test").subset(np.arange(0, 10_000, 10_000 // n_test), "cifar10:test-sample")
    images = {name: [(img, lab) for b in ds.batches(512) for img, lab in zip(b.images, b.labels)]
              for name, ds in (("train", train), ("test", test))}
    backbone = load_backbone(get_backbone_spec("vgg16", recipe="caffe"))
    keras.utils.set_random_seed(0)
    random_vgg = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))

    def features(name, pretrained):
        batch = backbone.preprocess([img for img, _ in images[name]])
        return backbone.forward(batch) if pretrained else random_vgg.predict(batch, verbose=0).reshape(len(batch), -1)

    labels = {name: np.array([lab for _, lab in images[name]]) for name in images}
    scores = {pretrained: _probe_accuracy(features("train", pretrained), labels["train"],
                                          features("test", pretrained), labels["test"])
              for pretrained in (True, False)}
    assert scores[True] > scores[False] + 0.08, scores


@pytest.mark.parametrize("name, dim", [("squeezenet", 512), ("mobilenet_v1", 1024), ("mobilenet_edgetpu", 1280)])
def test_imagenet_backbones_through_the_registry(name, dim):
    from extractor.datasets import open_dataset

    images = next(open_dataset("cifar10:test").batches(3)).images
    vectors = load_backbone(get_backbone_spec(name)).embed(images)
    assert vectors.shape == (3, dim) and vectors.dtype == np.float32 and np.isfinite(vectors).all()
    assert not np.allclose(vectors[0], vectors[1])


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in SHIPPED if n != "mnist_cnn"])
def test_shipped_entries_match_their_sha256_and_known_vectors(name, data_dir):
    """Every shipped entry's file is the one its config pins, and a CIFAR-10 image gives the vector recorded
    for it (first values, and the norm), so a changed file, preset or runtime is noticed."""
    from extractor import paths
    from extractor.datasets import open_dataset

    spec = get_backbone_spec(name)
    assert paths.file_sha256(spec.path) == spec.sha256
    image = next(open_dataset("cifar10:test").batches(1)).images
    vector = load_backbone(spec).embed(image)[0]
    first, norm = KNOWN_VECTORS[name]
    np.testing.assert_allclose(vector[:4], first, rtol=1e-3, atol=1e-3)
    assert np.linalg.norm(vector) == pytest.approx(norm, rel=1e-3)
