"""The TFLite runtime on the quantized MobileNet V1: dequantized output, batching, input checks, threads."""

import re
import threading
import warnings

import numpy as np
import pytest

from extractor.errors import InvalidInputError
from extractor.models import FrozenBackbone, get_backbone_spec

SCALE = 0.02352848  # the output tensor's published scale (zero point 0)


class Embedder:
    """The backbone's forward pass under the name these tests use."""

    def __init__(self, backbone):
        self.embed = backbone.forward


@pytest.fixture(scope="module")
def embedder():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the interpreter's deprecation notices must not leak out
        return Embedder(FrozenBackbone(get_backbone_spec("mobilenet_v1")))


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, size=(4, 224, 224, 3), dtype=np.uint8)


def test_embeddings_are_dequantized_float32_relu6_outputs(embedder, images):
    features = embedder.embed(images[:2])
    assert features.shape == (2, 1024) and features.dtype == np.float32
    assert np.isfinite(features).all()
    assert (features >= 0).all() and (features <= 6.0 + 1e-5).all()  # averages of ReLU6 outputs
    assert features.std() > 0.1 and np.abs(features[0] - features[1]).max() > 0.1
    # Dequantized with the model's own scale and zero point: every value is a step.
    steps = features / SCALE
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)


def test_a_batch_equals_its_images_one_by_one(embedder, images):
    batch = embedder.embed(images[:3])
    singles = np.concatenate([embedder.embed(images[i:i + 1]) for i in range(3)])
    np.testing.assert_array_equal(batch, singles)


def test_an_empty_batch_gives_no_rows(embedder):
    assert embedder.embed(np.zeros((0, 224, 224, 3), np.uint8)).shape == (0, 1024)


@pytest.mark.parametrize("bad, received", [
    (np.zeros((1, 224, 224, 3), np.float32), "got float32 array of shape (1, 224, 224, 3)"),
    (np.zeros((1, 224, 224, 4), np.uint8), "got uint8 array of shape (1, 224, 224, 4)"),
    (np.zeros((224, 224, 3), np.uint8), "got uint8 array of shape (224, 224, 3)"),
    ([[0]], "got list"),
])
def test_wrong_dtype_or_shape_names_what_was_expected_and_received(embedder, bad, received):
    expected = f"expected a uint8 array of shape (n, 224, 224, 3), {received}"
    with pytest.raises(InvalidInputError, match=re.escape(expected)):
        embedder.embed(bad)


def test_concurrent_calls_give_the_same_results_as_serial_ones(embedder, images):
    expected = [embedder.embed(images[i:i + 1]) for i in range(len(images))]
    results = [None] * len(images)

    def embed_one(i):
        results[i] = embedder.embed(images[i:i + 1])

    threads = [threading.Thread(target=embed_one, args=(i,)) for i in range(len(images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for got, want in zip(results, expected):
        np.testing.assert_array_equal(got, want)
