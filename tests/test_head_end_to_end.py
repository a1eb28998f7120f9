"""A head trained on cached VGG16 features equals the lecture's freeze-and-retrain model trained on images."""

import numpy as np
import pytest

from classifiers.heads import KerasHead, build_head_layers, fit_in_order
from extractor.paths import published_sha256, verified_file

WEIGHTS = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
SEED, EPOCHS, BATCH = 4, 2, 4


def _lecture_images(x: np.ndarray) -> np.ndarray:
    """mnist_vgg's preprocessing: 28x28 digits zero-padded to 32x32 at [2:30], repeated to 3 channels, / 255."""
    images = np.zeros((len(x), 32, 32, 3), np.float32)
    images[:, 2:30, 2:30, :] = np.repeat(x[..., None], 3, axis=3) / 255
    return images


@pytest.fixture(scope="module")
def lecture(data_dir):
    import keras

    mnist = np.load(data_dir / "mnist.npz")
    odd = np.flatnonzero(mnist["y_train"] % 2 == 1)
    rng = np.random.default_rng(0)
    train, test = odd[rng.permutation(len(odd))[:40]], odd[rng.permutation(len(odd))[-100:]]
    weights = verified_file(data_dir / WEIGHTS, published_sha256(WEIGHTS, data_dir))
    vgg16 = keras.applications.VGG16(include_top=False, weights=str(weights), input_shape=(32, 32, 3))
    backbone = [layer for layer in vgg16.layers if not isinstance(layer, keras.layers.InputLayer)]
    for layer in backbone:
        layer.trainable = False
    images = _lecture_images(mnist["x_train"][np.concatenate([train, test])])
    extractor = keras.Sequential([keras.Input((32, 32, 3))] + backbone + [keras.layers.Flatten()])
    features = np.asarray(extractor.predict(images, batch_size=64, verbose=0))
    labels = mnist["y_train"][np.concatenate([train, test])]
    return backbone, images[:40], features[:40], labels[:40], images[40:], features[40:], labels[40:]


@pytest.mark.parametrize("spec", ["linear", "mlp512-tanh"])
def test_cached_features_train_like_the_lecture_model(spec, lecture):
    import keras

    backbone, images, features, labels, test_images, test_features, test_labels = lecture
    head = KerasHead(spec, epochs=EPOCHS, batch_size=BATCH, random_state=SEED).fit(features, labels)

    classes = np.unique(labels)
    model = keras.Sequential([keras.Input((32, 32, 3))] + backbone + [keras.layers.Flatten()]
                             + build_head_layers(spec, features.shape[1], len(classes), SEED))
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(), optimizer="adam", metrics=["accuracy"])
    fit_in_order(model, images, np.searchsorted(classes, labels).astype(np.int32), seed=SEED, epochs=EPOCHS,
                 batch_size=BATCH)

    end_to_end = [w for layer in model.layers[len(backbone) + 1:] for w in layer.get_weights()]
    for expected, actual in zip(end_to_end, head.model_.get_weights(), strict=True):
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    lecture_predictions = classes[np.argmax(model.predict(test_images, verbose=0), axis=1)]
    np.testing.assert_array_equal(head.predict(test_features), lecture_predictions)
    assert head.score(test_features, test_labels) == np.mean(lecture_predictions == test_labels)
