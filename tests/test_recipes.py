"""Preprocessing presets transform pixels exactly as specified."""

import numpy as np

from extractor.images import canonical_pixels, decode_image
from extractor.models.preprocessing import PRESETS, fit_pixels

LECTURE, CAFFE = PRESETS["lecture"], PRESETS["caffe"]


def digits(n=3, seed=0):
    return [np.random.default_rng(seed + i).integers(0, 256, (28, 28, 1), dtype=np.uint8) for i in range(n)]


def test_lecture_recipe_is_mnist_vgg_preprocessing():
    images = digits()
    # mnist_vgg.py: repeat the channel 3 times, zero-pad to 32x32 at [2:30], divide by 255
    expected = np.zeros((3, 32, 32, 3), dtype=np.float32)
    expected[:, 2:30, 2:30, :] = np.repeat(np.stack(images).astype("float32") / 255, 3, axis=3)
    actual = LECTURE.apply(images, 32, 3)
    assert actual.dtype == np.float32 and np.array_equal(actual, expected)


def test_lecture_recipe_on_cifar_is_plain_division():
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert np.array_equal(LECTURE.apply([image], 32, 3)[0], image.astype(np.float32) / 255)


def test_caffe_recipe_equals_keras_preprocess_input():
    from keras.applications.vgg16 import preprocess_input

    image = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    expected = preprocess_input(image[None].astype("float32"))
    np.testing.assert_allclose(CAFFE.apply([image], 32, 3), expected, rtol=0, atol=1e-5)


def test_caffe_recipe_resizes_and_repeats_grayscale():
    out = CAFFE.apply(digits(2), 64, 3)
    assert out.shape == (2, 64, 64, 3)
    assert np.array_equal(out[..., 0] + 103.939, out[..., 2] + 123.68)  # one gray value in every channel


def test_mixed_shapes_are_fitted_one_by_one():
    images = [np.full((10, 12, 3), 200, np.uint8), np.full((40, 40, 1), 100, np.uint8)]
    out = fit_pixels(images, 32, 3)
    assert out.shape == (2, 32, 32, 3) and out[0].min() == 200 and out[1].max() == 100


def test_rgb_to_gray_matches_pillow():
    from PIL import Image

    image = np.random.default_rng(3).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(image).convert("L"))
    assert np.array_equal(fit_pixels([image], 28, 1)[0, :, :, 0], expected)


def test_decode_png_and_canonical_arrays():
    import io

    from PIL import Image

    image = np.random.default_rng(4).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    assert np.array_equal(decode_image(buffer.getvalue()), image)
    assert canonical_pixels(image[:, :, 0]).shape == (5, 7, 1)
