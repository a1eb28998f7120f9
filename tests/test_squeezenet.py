"""SqueezeNet 1.1: architecture shapes, strict weight loading, and features of real images."""

import io
import re
import shutil
import tarfile

import h5py
import numpy as np
import pytest
from PIL import Image

from extractor import paths
from extractor.errors import InvalidInputError
from extractor.models.squeezenet import build_squeezenet, load_squeezenet_weights

WEIGHTS = "squeezenet_weights_tf_dim_ordering_tf_kernels_notop.h5"


@pytest.fixture(scope="module")
def weights_path(data_dir):
    return paths.verified_file(data_dir / WEIGHTS, paths.published_sha256(WEIGHTS, data_dir))


def _dataset_paths(h5_path) -> list[str]:
    found = []
    with h5py.File(h5_path, "r") as f:
        f.visititems(lambda path, obj: found.append(path) if isinstance(obj, h5py.Dataset) else None)
    return found


def test_every_tensor_of_the_file_is_loaded_into_its_layer(weights_path):
    model = build_squeezenet((64, 64, 3), None)
    loaded = load_squeezenet_weights(model, weights_path)
    assert loaded == len(_dataset_paths(weights_path)) == 50
    # Within a layer tensors go by order: 'uniform1' is conv1's kernel, 'conv1_b' its bias.
    kernel, bias = model.get_layer("conv1").get_weights()
    with h5py.File(weights_path, "r") as f:
        np.testing.assert_array_equal(kernel, f["conv1/uniform1"][()])
        np.testing.assert_array_equal(bias, f["conv1/conv1_b"][()])
        np.testing.assert_array_equal(model.get_layer("fire9_expand3x3").get_weights()[0],
                                      f["fire9/expand3x3/uniform25"][()])


@pytest.mark.parametrize("side, map_side", [
    (224, 13), (64, 3),
    (31, 1),  # the smallest input: fire9 sees a 1x1 map
])
def test_fire9_map_follows_input_size(side, map_side):
    model = build_squeezenet((side, side, 3), None)
    assert model.output_shape == (None, map_side, map_side, 512)
    assert model(np.zeros((2, side, side, 3), np.float32)).shape == (2, map_side, map_side, 512)


@pytest.mark.parametrize("input_shape, message", [
    ((30, 64, 3), "at least 31; got (30, 64, 3)"),
    ((224, 224), "got (224, 224)"),
])
def test_bad_arguments_are_refused_clearly(input_shape, message):
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        build_squeezenet(input_shape, None)


def _drop_tensor(f):
    del f["fire5/expand3x3/fire5/expand3x3_b"]


def _add_unlisted_tensor(f):
    f["conv1"].create_dataset("extra", data=np.zeros(3, np.float32))


def _add_layer_the_model_lacks(f):
    f["conv10/kernel"] = np.zeros((1, 1, 512, 1000), np.float32)
    f["conv10"].attrs["weight_names"] = [b"kernel"]
    f.attrs["layer_names"] = list(f.attrs["layer_names"]) + [b"conv10"]


def _remove_layer(f):
    del f["fire9/expand3x3"]
    f.attrs["layer_names"] = [n for n in f.attrs["layer_names"] if n != b"fire9/expand3x3"]


def _change_shape(f):
    del f["conv1/conv1_b"]
    f["conv1/conv1_b"] = np.zeros(32, np.float32)


@pytest.mark.parametrize("alter, message", [
    (_drop_tensor, "tensor 'fire5/expand3x3/fire5/expand3x3_b' is listed but not in the file"),
    (_add_unlisted_tensor, "tensor(s) conv1/extra belong to no layer"),
    (_add_layer_the_model_lacks, "tensor 'conv10/kernel' belongs to layer 'conv10', which the model"),
    (_remove_layer, "no tensors in the file for layer(s) fire9_expand3x3"),
    (_change_shape, "tensor 'conv1/conv1_b' has shape (32,), layer 'conv1' expects (64,)"),
])
def test_a_file_that_does_not_match_the_model_is_refused_whole(weights_path, tmp_path, alter, message):
    altered = tmp_path / "altered.h5"
    shutil.copyfile(weights_path, altered)
    altered.chmod(0o644)  # the shared original is read-only
    with h5py.File(altered, "r+") as f:
        alter(f)
    model = build_squeezenet((64, 64, 3), None)
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        load_squeezenet_weights(model, altered)
    for old, new in zip(before, model.get_weights()):
        np.testing.assert_array_equal(old, new)


def test_a_file_that_is_not_hdf5_is_refused(tmp_path):
    not_h5 = tmp_path / "weights.h5"
    not_h5.write_bytes(b"not an hdf5 file")
    with pytest.raises(InvalidInputError, match="cannot read .* as an HDF5 weights file"):
        build_squeezenet((64, 64, 3), not_h5)


def _cifar_images(data_dir, count: int) -> np.ndarray:
    """The first `count` JPEGs of the CIFAR-10 archive, as (count, 32, 32, 3) uint8."""
    images = []
    with tarfile.open(data_dir / "cifar10-jpeg.tar.gz", "r|gz") as archive:
        for member in archive:
            if member.name.endswith(".jpg"):
                images.append(np.asarray(Image.open(io.BytesIO(archive.extractfile(member).read())).convert("RGB")))
                if len(images) == count:
                    break
    return np.stack(images)


def test_real_images_give_distinct_informative_features(weights_path, data_dir):
    from keras.applications.vgg16 import preprocess_input

    small = _cifar_images(data_dir, 2)
    pixels = np.stack([np.asarray(Image.fromarray(im).resize((224, 224), Image.BILINEAR)) for im in small])
    batch = preprocess_input(pixels[[0, 1, 0]].astype(np.float32))
    features = np.asarray(build_squeezenet((224, 224, 3), weights_path)(batch)).mean(axis=(1, 2))

    assert features.shape == (3, 512) and features.dtype == np.float32
    assert np.isfinite(features).all() and (features >= 0).all()  # averages of ReLU outputs
    assert features[0].std() > 0.1 and (features[0] > 0).mean() > 0.5
    assert np.abs(features[0] - features[1]).max() > 0.1
    np.testing.assert_array_equal(features[0], features[2])
