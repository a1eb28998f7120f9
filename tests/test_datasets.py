"""Readers: published counts, the lecture's splits, seeded samples, corrupt files skipped."""

import numpy as np
import pytest
from PIL import Image

from extractor.datasets import open_dataset, parse_data_spec
from extractor.errors import InvalidInputError, UnknownNameError

MNIST_TRAIN_PER_DIGIT = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_PER_DIGIT = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_mnist_published_counts_per_class():
    train, test = open_dataset("mnist:train"), open_dataset("mnist:test")
    assert np.bincount(train.labels).tolist() == MNIST_TRAIN_PER_DIGIT
    assert np.bincount(test.labels).tolist() == MNIST_TEST_PER_DIGIT
    assert train.class_names == [str(d) for d in range(10)]


def test_mnist_lecture_splits():
    big, small, small_test = (open_dataset(f"mnist:{s}") for s in ("big", "small", "small-test"))
    assert len(big) == 29_492 and big.class_names == ["0", "2", "4", "6", "8"]
    assert np.bincount(big.labels).tolist() == MNIST_TRAIN_PER_DIGIT[0::2]
    assert len(small) == 100 and small.class_names == ["1", "3", "5", "7", "9"]
    assert len(small_test) == 5_074
    assert np.bincount(small_test.labels).tolist() == MNIST_TEST_PER_DIGIT[1::2]
    assert small.spec == "mnist:small?n=100&seed=0"


def test_mnist_small_sample_is_seeded():
    def sources(spec):
        return open_dataset(spec).sources

    assert sources("mnist:small?seed=1") == sources("mnist:small?seed=1&n=100")
    assert sources("mnist:small?seed=1") != sources("mnist:small?seed=2")
    assert len(sources("mnist:small?n=250")) == 250


def test_mnist_pixels_are_uint8_with_one_channel():
    batch = next(open_dataset("mnist:small").batches(8))
    assert len(batch.images) == 8
    assert all(image.dtype == np.uint8 and image.shape == (28, 28, 1) for image in batch.images)
    assert batch.labels.dtype == np.int64 and set(batch.labels) <= set(range(5))


def test_cifar10_published_counts_and_lecture_splits():
    train, test = open_dataset("cifar10:train"), open_dataset("cifar10:test")
    assert np.bincount(train.labels).tolist() == [5000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert test.class_names[0] == "airplane" and test.class_names[9] == "truck"
    small = open_dataset("cifar10:small")
    assert len(small) == 1_000 and np.bincount(small.labels).tolist() == [100] * 10
    assert open_dataset("cifar10:small?seed=4").sources == open_dataset("cifar10:small?seed=4").sources
    assert open_dataset("cifar10:small?seed=4").sources != small.sources
    image = next(small.batches(1)).images[0]
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8


def test_folder_reader_reports_and_skips_corrupt_images(tmp_path, caplog):
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = (tmp_path / "cat" / "0.png").read_bytes()
    (tmp_path / "cat" / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "dog" / "notes.txt").write_text("not an image, not listed")
    dataset = open_dataset(f"folder:{tmp_path}")
    assert dataset.class_names == ["cat", "dog"] and len(dataset) == 8
    batches = list(dataset.batches(3))
    images = [image for batch in batches for image in batch.images]
    labels = np.concatenate([batch.labels for batch in batches])
    assert len(images) == 6 and labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert sorted(s.source.rsplit("/", 1)[1] for s in dataset.skipped) == ["broken.jpg", "truncated.png"]
    assert all(s.reason for s in dataset.skipped)
    assert "skipping" in caplog.text and "broken.jpg" in caplog.text


def test_npz_reader(tmp_path):
    x = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([1, 0, 1, 2]), class_names=np.array(["a", "b", "c"]))
    dataset = open_dataset(f"npz:{tmp_path / 'd.npz'}")
    batch = next(dataset.batches(10))
    assert dataset.class_names == ["a", "b", "c"] and batch.labels.tolist() == [1, 0, 1, 2]
    assert np.array_equal(batch.images[3][:, :, 0], x[3])


@pytest.mark.parametrize("spec, error, words", [
    ("imagenet:train", UnknownNameError, ["dataset kind", "mnist", "folder"]),
    ("mnist:huge", UnknownNameError, ["mnist split", "small-test"]),
    ("mnist:small?n=abc", InvalidInputError, ["integer"]),
    ("mnist:test?n=5", InvalidInputError, ["takes options"]),
    ("mnist:test?seed=5", InvalidInputError, ["needs per_class"]),
    ("mnist", InvalidInputError, ["must look like"]),
    ("folder:/nonexistent/dir", InvalidInputError, ["not found"]),
    ("mnist:small?source=web", UnknownNameError, ["keras"]),
])
def test_bad_specs_are_clear_errors(spec, error, words):
    with pytest.raises(error) as info:
        open_dataset(spec)
    assert all(word in str(info.value) for word in words)


def test_parse_data_spec():
    assert parse_data_spec("mnist:small?n=5&seed=2") == ("mnist", "small", {"n": "5", "seed": "2"})
    assert parse_data_spec("folder:/a/b") == ("folder", "/a/b", {})


def test_wrong_mnist_checksum_is_refused(tmp_path):
    (tmp_path / "mnist.npz").write_bytes(b"not mnist")
    (tmp_path / "SHA256SUMS").write_text("0" * 64 + "  mnist.npz\n")
    with pytest.raises(Exception, match="sha256 mismatch"):
        open_dataset("mnist:test", data_dir=tmp_path)


def test_any_spec_takes_a_seeded_per_class_sample(tmp_path):
    test = open_dataset("cifar10:test?per_class=20&seed=3")
    assert len(test) == 200 and np.bincount(test.labels).tolist() == [20] * 10
    assert test.spec == "cifar10:test?per_class=20&seed=3"
    assert test.sources == open_dataset("cifar10:test?per_class=20&seed=3").sources
    assert test.sources != open_dataset("cifar10:test?per_class=20").sources
    odd = open_dataset("mnist:small-test?per_class=7")
    assert np.bincount(odd.labels).tolist() == [7] * 5 and odd.spec == "mnist:small-test?per_class=7&seed=0"
    x = np.zeros((6, 4, 4), np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 0, 0, 1, 1, 1]))
    assert len(open_dataset(f"npz:{tmp_path / 'd.npz'}?per_class=2")) == 4


def test_gray_images_among_colour_ones_form_one_colour_array(tmp_path):
    for name, pixels in (("colour", np.arange(48, dtype=np.uint8).reshape(4, 4, 3)),
                         ("gray", np.repeat(np.full((4, 4, 1), 7, np.uint8), 3, axis=2))):  # three equal channels
        (tmp_path / "a").mkdir(exist_ok=True)
        Image.fromarray(pixels).save(tmp_path / "a" / f"{name}.png")
    x, y = open_dataset(f"folder:{tmp_path}").arrays()
    assert x.shape == (2, 4, 4, 3) and (x[[i for i in range(2) if x[i].max() == 7][0]] == 7).all()
